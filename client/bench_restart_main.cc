// icecache-bench-restart: warm restart time against a re-prefill
// (docs/architecture.md §5, docs/bench/warm_restart.md). One session of
// --tokens tokens and --layers layers is prefilled through the socket
// (AppendKv from a shm buffer, --chunk-tokens per call, the indexes built by
// the daemon: what a client pays again after a cold restart), then the
// daemon drains for upgrade (snapshot written, exit 3) and a new daemon on
// the same backing directory recovers the session (frames checked, indexes
// rebuilt). Prints the times side by side and one JSON line.
//   icecache-bench-restart --icecached build/server/icecached \
//       --layers 32 --kv-heads 8 --tokens 32768
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <random>
#include <string>

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
};

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
  const absl::Time d0 = absl::Now();
  RETURN_IF_ERROR(client->Drain(true, true).status());
  client.reset();
  ASSIGN_OR_RETURN(int status, before->Wait(absl::Minutes(5)));
  const absl::Duration drain = absl::Now() - d0;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 3) {
    return absl::InternalError(
        absl::StrCat("drain for upgrade: wait status ", status, "\n", before->Stderr()));
  }
  const absl::Time r0 = absl::Now();
  ASSIGN_OR_RETURN(auto after, Start(f, capacity));
  ASSIGN_OR_RETURN(client, Connect(*after));
  ASSIGN_OR_RETURN(SessionInfo back, client->GetSession(s.id));
  const absl::Duration restart = absl::Now() - r0;
  if (back.tokens != static_cast<uint64_t>(f.tokens) || back.epoch != s.epoch) {
    return absl::InternalError("the recovered session differs");
  }
  std::string line;
  for (absl::string_view l : absl::StrSplit(after->Stderr(), '\n')) {
    if (l.find("msg=warm_restart") != absl::string_view::npos) line = std::string(l);
  }
  absl::PrintF(
      "session: %d layers x %d KV heads x %d dims fp16, %d tokens (%.2f GiB of K and V), "
      "selector %s, %d CPUs\n",
      f.layers, f.kv_heads, f.head_dim, f.tokens, kv_bytes / double(1 << 30), f.selector,
      static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)));
  absl::PrintF("%-46s %10.2f s\n", "re-prefill (AppendKv + index build)",
               absl::ToDoubleSeconds(prefill));
  absl::PrintF("%-46s %10.2f s\n", "drain --for-upgrade (snapshot written, exit)",
               absl::ToDoubleSeconds(drain));
  absl::PrintF("%-46s %10.2f s\n", "warm restart (start to session served)",
               absl::ToDoubleSeconds(restart));
  absl::PrintF("%-46s %10.2fx\n", "re-prefill / warm restart",
               absl::ToDoubleSeconds(prefill) / absl::ToDoubleSeconds(restart));
  absl::PrintF("daemon: %s\n", line);
  Json j{{"layers", f.layers},
         {"kv_heads", f.kv_heads},
         {"head_dim", f.head_dim},
         {"tokens", f.tokens},
         {"selector", f.selector},
         {"prefill_s", absl::ToDoubleSeconds(prefill)},
         {"drain_s", absl::ToDoubleSeconds(drain)},
         {"warm_restart_s", absl::ToDoubleSeconds(restart)}};
  std::cout << DumpJson(j) << "\n";
  client.reset();
  return after->Stop().status();
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
  if (auto code = icecache::cli::Parse(app, argc, argv)) return *code;
  const absl::Status s = icecache::Run(f);
  if (!s.ok()) {
    std::cerr << "icecache-bench-restart: FAILED: " << s << "\n";
    return 1;
  }
  return 0;
}
