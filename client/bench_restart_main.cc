// icecache-bench-restart: warm restart time against a re-prefill
// (docs/architecture.md §5, docs/bench/restart_32768.txt). One session of
// --tokens tokens and --layers layers is prefilled through the socket
// (AppendKv from a shm buffer, --chunk-tokens per call, the indexes built by
// the daemon: what a client pays again after a cold restart), then the
// daemon drains for upgrade (snapshot written, exit 3) and a new daemon on
// the same backing directory recovers the session (frames checked, indexes
// loaded from the images the drain wrote). With --compare-replay the
// recovered daemon drains again, the index images are removed, and a third
// daemon recovers the session by replaying its appends (the path before
// index images, and the fallback). Prints the times side by side and one
// JSON line.
//   icecache-bench-restart --icecached build/server/icecached
//       --layers 32 --kv-heads 8 --tokens 32768   (one command line)
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <random>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/daemon_process.h"
#include "common/cli.h"
#include "common/dtype.h"
#include "common/json.h"
#include "common/status_macros.h"

namespace icecache {
namespace {

struct Flags {
  std::string icecached, dir = "/dev/shm/icecache-bench-restart", selector = "mdci";
  int layers = 32, kv_heads = 8, q_heads = 32, head_dim = 128, page_tokens = 16;
  int64_t tokens = 32768, chunk_tokens = 1024;
  bool compare_replay = false;
};

// The last line of `log` holding "msg=<msg>".
std::string LogLine(const std::string& log, absl::string_view msg) {
  std::string line;
  for (absl::string_view l : absl::StrSplit(log, '\n')) {
    if (l.find(absl::StrCat("msg=", msg)) != absl::string_view::npos) line = std::string(l);
  }
  return line;
}

// Drains `d` for an upgrade through `client` (reset here) and waits for exit 3.
absl::StatusOr<absl::Duration> DrainForUpgrade(std::unique_ptr<Client>& client, DaemonProcess& d) {
  const absl::Time t0 = absl::Now();
  RETURN_IF_ERROR(client->Drain(true, true).status());
  client.reset();
  ASSIGN_OR_RETURN(int status, d.Wait(absl::Minutes(5)));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 3) {
    return absl::InternalError(
        absl::StrCat("drain for upgrade: wait status ", status, "\n", d.Stderr()));
  }
  return absl::Now() - t0;
}

absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(const Flags& f, uint64_t capacity) {
  DaemonOptions o;
  o.binary = f.icecached;
  o.log_level = "info";
  o.ready_timeout = absl::Minutes(20);
  o.stop_timeout = absl::Minutes(5);
  o.config_textproto =
      absl::StrCat("pool { capacity_bytes: ", capacity, " backing_dir: \"", f.dir,
                   "\" }\nsessions { max_ttl_ms: 86400000 buffer_idle_ttl_ms: 86400000 }\n");
  return DaemonProcess::Start(o);
}

absl::StatusOr<std::unique_ptr<Client>> Connect(const DaemonProcess& d) {
  ClientOptions o;
  o.socket_path = d.socket_path();
  o.timeout = absl::Minutes(10);
  return Client::Create(o);
}

// Prefills the session from a shm buffer, --chunk-tokens per call, Gaussian
// fp16 keys and values (made before each call, not timed).
absl::StatusOr<absl::Duration> Prefill(Client& client, const SessionSpec& spec,
                                       const std::string& id, const Flags& f) {
  const size_t bytes = spec.ChunkBytes(f.chunk_tokens);
  ASSIGN_OR_RETURN(ShmBuffer buf, client.CreateShmBuffer(bytes));
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> row(static_cast<size_t>(f.head_dim));
  absl::Duration spent;
  for (int64_t t = 0; t < f.tokens; t += f.chunk_tokens) {
    for (size_t off = 0; off < bytes; off += row.size() * 2) {
      for (float& x : row) x = nd(rng);
      FromFloat(DType::kF16, row.data(), buf.data() + off, row.size());
    }
    const absl::Time t0 = absl::Now();
    RETURN_IF_ERROR(client.AppendKv(id, buf, 0, bytes, f.chunk_tokens).status());
    spent += absl::Now() - t0;
  }
  return spent;
}

// What one run measured.
struct Report {
  absl::Duration prefill, drain;
  std::pair<absl::Duration, std::string> loaded, replayed;  // time, the warm_restart line
  uint64_t image_bytes = 0;
  std::string written;  // the drain's snapshot_written line
  uint64_t kv_bytes = 0;
};

// The table and the JSON line.
void Print(const Flags& f, const Report& r) {
  const absl::Duration prefill = r.prefill, drain = r.drain, restart_s = r.loaded.first;
  const uint64_t kv_bytes = r.kv_bytes, image_bytes = r.image_bytes;
  const auto& loaded = r.loaded;
  const auto& replayed = r.replayed;
  const std::string& written = r.written;
  absl::PrintF(
      "session: %d layers x %d KV heads x %d dims fp16, %d tokens (%.2f GiB of K and V), "
      "selector %s, %d CPUs\n",
      f.layers, f.kv_heads, f.head_dim, f.tokens, kv_bytes / double(1 << 30), f.selector,
      static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)));
  absl::PrintF("%-46s %10.2f s\n", "re-prefill (AppendKv + index build)",
               absl::ToDoubleSeconds(prefill));
  absl::PrintF("%-46s %10.2f s\n", "drain --for-upgrade (snapshot written, exit)",
               absl::ToDoubleSeconds(drain));
  const double indexes = static_cast<double>(f.layers) * f.kv_heads;
  absl::PrintF("%-46s %10.2f s\n", "warm restart, index images loaded",
               absl::ToDoubleSeconds(restart_s));
  if (f.compare_replay) {
    absl::PrintF("%-46s %10.2f s\n", "warm restart, indexes replayed (no images)",
                 absl::ToDoubleSeconds(replayed.first));
  }
  absl::PrintF("%-46s %10.2fx\n", "re-prefill / warm restart (images)",
               absl::ToDoubleSeconds(prefill) / absl::ToDoubleSeconds(restart_s));
  if (f.compare_replay) {
    absl::PrintF("%-46s %10.2fx\n", "replay / images",
                 absl::ToDoubleSeconds(replayed.first) / absl::ToDoubleSeconds(restart_s));
  }
  absl::PrintF("%-46s %10.1f MiB (%.1f B per token per layer x KV head)\n", "index images",
               image_bytes / double(1 << 20), image_bytes / (indexes * f.tokens));
  absl::PrintF("daemon (drain): %s\n", written);
  absl::PrintF("daemon (images): %s\n", loaded.second);
  if (f.compare_replay) absl::PrintF("daemon (replay): %s\n", replayed.second);
  double load[3] = {0, 0, 0};
  getloadavg(load, 3);
  absl::PrintF("load average at the end: %.2f %.2f %.2f\n", load[0], load[1], load[2]);
  Json j{{"layers", f.layers},
         {"kv_heads", f.kv_heads},
         {"head_dim", f.head_dim},
         {"tokens", f.tokens},
         {"selector", f.selector},
         {"prefill_s", absl::ToDoubleSeconds(prefill)},
         {"drain_s", absl::ToDoubleSeconds(drain)},
         {"warm_restart_s", absl::ToDoubleSeconds(restart_s)},
         {"index_image_bytes", image_bytes}};
  if (f.compare_replay) j["replay_restart_s"] = absl::ToDoubleSeconds(replayed.first);
  std::cout << DumpJson(j) << "\n";
}

absl::Status Run(const Flags& f) {
  SessionSpec spec;
  spec.layers = f.layers;
  spec.kv_heads = f.kv_heads;
  spec.q_heads = f.q_heads;
  spec.head_dim = f.head_dim;
  spec.page_tokens = f.page_tokens;
  ASSIGN_OR_RETURN(spec.selector, ParseSelectorType(f.selector));
  spec.ttl = absl::Hours(1);
  const uint64_t kv_bytes = spec.ChunkBytes(f.tokens);
  // Room for the mdci layout's part-filled pages (at 32k tokens the session
  // held 5.6 GB for 4.3 GB of KV: twice the KV), and for what one append
  // reserves before it knows its placement: an mdci index may open a page
  // per token, so a chunk reserves chunk_tokens pages per (layer, KV head)
  // and gives back what it did not use (at 32 layers x 8 heads x 1024
  // tokens, 2 GiB; without it the last chunks were refused).
  const uint64_t frame_bytes = 2ull * f.page_tokens * f.head_dim * 2;
  const uint64_t chunk_reserve = static_cast<uint64_t>(f.chunk_tokens) * f.layers * f.kv_heads *
                                 ((frame_bytes + 63) / 64 * 64);
  const uint64_t capacity =
      (kv_bytes * 2 + chunk_reserve + (uint64_t{64} << 20) + (uint64_t{2} << 20) - 1) >> 21 << 21;
  ASSIGN_OR_RETURN(auto before, Start(f, capacity));
  ASSIGN_OR_RETURN(auto client, Connect(*before));
  ASSIGN_OR_RETURN(SessionInfo s, client->CreateSession(spec));
  ASSIGN_OR_RETURN(absl::Duration prefill, Prefill(*client, spec, s.id, f));
  ASSIGN_OR_RETURN(absl::Duration drain, DrainForUpgrade(client, *before));
  const std::string images_path = f.dir + "/icecached-indexes";
  struct stat st;
  const uint64_t image_bytes = stat(images_path.c_str(), &st) == 0 ? st.st_size : 0;
  const std::string written = LogLine(before->Stderr(), "snapshot_written");
  // Starts a daemon that recovers the session, times it, then drains it for
  // the next restart (then_drain) or stops it (arena file removed).
  auto restart = [&](bool then_drain) -> absl::StatusOr<std::pair<absl::Duration, std::string>> {
    const absl::Time r0 = absl::Now();
    ASSIGN_OR_RETURN(auto after, Start(f, capacity));
    ASSIGN_OR_RETURN(client, Connect(*after));
    ASSIGN_OR_RETURN(SessionInfo back, client->GetSession(s.id));
    const absl::Duration took = absl::Now() - r0;
    if (back.tokens != static_cast<uint64_t>(f.tokens) || back.epoch != s.epoch) {
      return absl::InternalError("the recovered session differs");
    }
    std::string line = LogLine(after->Stderr(), "warm_restart");
    if (then_drain) {
      RETURN_IF_ERROR(DrainForUpgrade(client, *after).status());
    } else {
      client.reset();
      RETURN_IF_ERROR(after->Stop().status());
    }
    return std::make_pair(took, line);
  };
  ASSIGN_OR_RETURN(auto loaded, restart(f.compare_replay));
  std::pair<absl::Duration, std::string> replayed;
  if (f.compare_replay) {
    unlink(images_path.c_str());  // the next daemon finds no images: replay
    ASSIGN_OR_RETURN(replayed, restart(false));
  }
  Report r{prefill, drain, loaded, replayed, image_bytes, written, kv_bytes};
  Print(f, r);
  return absl::OkStatus();
}

}  // namespace
}  // namespace icecache

int main(int argc, char** argv) {
  CLI::App app("Warm restart time against a re-prefill of one session.", "icecache-bench-restart");
  icecache::cli::Configure(app);
  icecache::Flags f;
  app.add_option("--icecached", f.icecached, "path of the icecached binary")->required();
  app.add_option("--dir", f.dir, "pool.backing_dir of both daemons");
  app.add_option("--layers", f.layers, "layers")->check(icecache::cli::Positive());
  app.add_option("--kv-heads,--kv_heads", f.kv_heads, "KV heads")->check(icecache::cli::Positive());
  app.add_option("--q-heads,--q_heads", f.q_heads, "query heads")->check(icecache::cli::Positive());
  app.add_option("--head-dim,--head_dim", f.head_dim, "head dim")->check(icecache::cli::Positive());
  app.add_option("--page-tokens,--page_tokens", f.page_tokens, "tokens per page")
      ->check(icecache::cli::Positive());
  app.add_option("--tokens", f.tokens, "prefill tokens")->check(icecache::cli::Positive());
  app.add_option("--chunk-tokens,--chunk_tokens", f.chunk_tokens, "tokens per AppendKv")
      ->check(icecache::cli::Positive());
  app.add_option("--selector", f.selector, "mdci, exact, quest, ...");
  app.add_flag("--compare-replay", f.compare_replay,
               "also time a restart without the index images (indexes replayed)");
  if (auto code = icecache::cli::Parse(app, argc, argv)) return *code;
  const absl::Status s = icecache::Run(f);
  if (!s.ok()) {
    std::cerr << "icecache-bench-restart: FAILED: " << s << "\n";
    return 1;
  }
  return 0;
}
