// icecache-demo: prefill + decode against a running icecached (or one it
// spawns with --spawn PATH), verifying that every fetched page is
// byte-identical to what was appended and printing per-step latency and
// attention-mass recall. Exit status 0 only when every check passed.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/daemon_process.h"
#include "client/kv_check.h"
#include "client/output.h"
#include "client/tool_session.h"
#include "common/cli.h"
#include "common/dtype.h"
#include "common/mutex_checks.h"
#include "common/status_macros.h"
#include "server/index/quality.h"

namespace icecache {
namespace {

struct DemoFlags {
  std::string spawn;
  std::string socket;
  std::string preset = "llama3-8b-like";
  int layers = 4;
  int64_t tokens = 4096;
  int steps = 8;
  int append = 16;
  int budget = 256;
  int page_tokens = 16;
  std::string selector = "mdci";
  uint64_t seed = 42;
};

// <dir of this binary>/../server/icecached (the build tree layout), else
// "icecached" next to this binary (an install), else plain "icecached".
std::string DefaultDaemonPath() {
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    self[n] = '\0';
    std::string dir(self);
    dir = dir.substr(0, dir.rfind('/'));
    for (const std::string& p : {dir + "/../server/icecached", dir + "/icecached"}) {
      if (::access(p.c_str(), X_OK) == 0) return p;
    }
  }
  return "icecached";
}

void AddFlags(CLI::App& app, DemoFlags* f) {
  app.add_option("--spawn", f->spawn,
                 "start the icecached binary at PATH (bare --spawn: the one built next to this "
                 "binary) on a temporary socket, stopped again at the end; otherwise connect to "
                 "--socket")
      ->type_name("[PATH]")
      ->expected(0, 1);
  app.add_option("--socket", f->socket,
                 "a running daemon (default: $ICECACHE_SOCKET / the daemon's default socket)")
      ->type_name("PATH");
  app.add_option("--preset", f->preset, "synthetic model preset");
  app.add_option("--layers", f->layers, "layers to simulate")->check(cli::Positive());
  app.add_option("--tokens", f->tokens, "context tokens at the end of the run")
      ->check(cli::Positive());
  app.add_option("--steps", f->steps, "decode steps; each appends --append tokens first")
      ->check(cli::Positive());
  app.add_option("--append", f->append, "tokens appended per decode step")->check(cli::Positive());
  app.add_option("--budget", f->budget, "selected tokens per KV head")->check(cli::Positive());
  app.add_option("--page-tokens,--page_tokens", f->page_tokens, "tokens per page")
      ->check(cli::Positive());
  app.add_option("--selector", f->selector,
                 "mdci | exact-mdci | exact | quest | streaming | arkvale | pqcache | snapkv | "
                 "omnikv | magicpig | mdci-published");
  app.add_option("--seed", f->seed, "generator seed")->check(cli::Positive());
}

// Checks what one flag alone cannot; fills in a bare --spawn.
absl::Status FinishFlags(const CLI::App& app, DemoFlags* f) {
  if (app.count("--spawn") > 0 && f->spawn.empty()) f->spawn = DefaultDaemonPath();
  if (f->tokens <= static_cast<int64_t>(f->steps) * f->append) {
    return absl::InvalidArgumentError("--tokens must exceed --steps x --append (the prefill)");
  }
  return absl::OkStatus();
}

// Sends tokens [0, prefill) one layer group per AppendKvLayers call through
// `staging`, with a progress bar on stderr (layers sent, trees indexed).
absl::StatusOr<uint64_t> PrefillByLayerGroups(Client& client, const std::string& session_id,
                                              const HostKv& kv, int64_t prefill, int group_layers,
                                              ShmBuffer& staging) {
  const int layers = kv.layers();
  for (int first = 0; first < layers; first += group_layers) {
    const int count = std::min(group_layers, layers - first);
    const size_t bytes = kv.ChunkBytes(0, prefill) / layers * count;
    kv.FillLayers(0, prefill, first, count, staging.data());
    ASSIGN_OR_RETURN(uint32_t next, client.AppendKvLayers(session_id, staging.buffer_id(), 0, bytes,
                                                          static_cast<uint32_t>(prefill), first,
                                                          static_cast<uint32_t>(count)));
    ASSIGN_OR_RETURN(SessionInfo info, client.GetSession(session_id));
    const int done = next == 0 ? layers : static_cast<int>(next);
    const int width = 30;
    const int bar = done * width / layers;
    std::cerr << absl::StrFormat("\rprefill [%s%s] layers %d/%d, indexed %d/%d trees",
                                 std::string(bar, '#'), std::string(width - bar, ' '), done, layers,
                                 info.trees_built, info.trees_total)
              << std::flush;
  }
  std::cerr << "\n";
  ASSIGN_OR_RETURN(SessionInfo info, client.GetSession(session_id));
  return info.tokens;
}

absl::Status RunDemo(const DemoFlags& f) {
  ClientOptions options;
  options.socket_path = f.socket;
  ASSIGN_OR_RETURN(DaemonConnection conn, SpawnOrConnect(f.spawn, options));
  if (conn.daemon) {
    std::cout << "spawned icecached pid " << conn.daemon->pid() << " on "
              << conn.daemon->socket_path() << "\n";
  }
  Client* client = conn.client.get();
  ASSIGN_OR_RETURN(bool serving, client->Health());
  if (!serving) return absl::UnavailableError("daemon health is NOT_SERVING");

  SyntheticModelOptions mo;
  mo.preset = f.preset;
  mo.layers = f.layers;
  mo.tokens = f.tokens;
  mo.steps = f.steps;
  mo.seed = f.seed;
  mo.page_tokens = f.page_tokens;
  mo.selector = f.selector;
  mo.ttl = absl::Seconds(120);
  const absl::Time gen_start = absl::Now();
  // What the daemon holds is fp16: recall is judged against the same numbers.
  ASSIGN_OR_RETURN(const SyntheticModel model, MakeSyntheticModel(mo));
  const KvDump& dump = model.dump;
  const HostKv& kv = model.kv;
  const SessionSpec& spec = model.spec;
  std::cout << absl::StrFormat(
      "model %s: layers=%d kv_heads=%d q_heads=%d head_dim=%d dtype=float16 tokens=%d "
      "(generated in %.0f ms)\n",
      f.preset, dump.layers, dump.kv_heads, dump.q_heads, dump.head_dim, dump.tokens,
      absl::ToDoubleMilliseconds(absl::Now() - gen_start));

  ASSIGN_OR_RETURN(SessionInfo session, client->CreateSession(spec));
  std::cout << "session " << session.id << " (tenant " << session.tenant << ", selector "
            << SelectorTypeName(session.spec.selector) << ", page_tokens "
            << session.spec.page_tokens << ")\n";

  const int64_t prefill = f.tokens - static_cast<int64_t>(f.steps) * f.append;
  const uint32_t sink = 4;
  const size_t fetch_bytes = model.FetchBytes(f.budget, sink);
  // The prefill goes one layer group per call: no call waits for the whole
  // model's index, and the daemon indexes each group as it arrives.
  const int group_layers = std::max(1, session.spec.layer_reuse);
  const size_t group_bytes =
      spec.ChunkBytes(prefill) / dump.layers * std::min(group_layers, dump.layers);
  const size_t kv_bytes = std::max(group_bytes, spec.ChunkBytes(f.append));
  ASSIGN_OR_RETURN(ShmBuffer kv_buf, client->CreateShmBuffer(kv_bytes));
  ASSIGN_OR_RETURN(ShmBuffer out_buf, client->CreateShmBuffer(fetch_bytes));

  absl::Time t0 = absl::Now();
  ASSIGN_OR_RETURN(uint64_t have,
                   PrefillByLayerGroups(*client, session.id, kv, prefill, group_layers, kv_buf));
  std::cout << absl::StrFormat(
      "prefill: %d tokens, %s through shm in %.1f ms (%d calls of %d layer(s), index built)\n",
      have, HumanBytes(static_cast<int64_t>(spec.ChunkBytes(prefill))),
      absl::ToDoubleMilliseconds(absl::Now() - t0), (dump.layers + group_layers - 1) / group_layers,
      group_layers);

  SelectOptions sel;
  sel.budget_tokens = static_cast<uint32_t>(f.budget);
  sel.sink_tokens = sink;
  sel.want_positions = true;
  TextTable table({"STEP", "TOKENS", "APPEND_MS", "LAYER_P50_MS", "LAYER_MAX_MS", "MASS_MEAN",
                   "MASS_MIN", "PAGES", "VERIFIED"});
  std::vector<double> all_lat, all_mass;
  int64_t verified_pages = 0;
  int64_t tokens = static_cast<int64_t>(have);
  for (int step = 0; step < f.steps; ++step) {
    t0 = absl::Now();
    kv.FillChunk(tokens, tokens + f.append, kv_buf.data());
    ASSIGN_OR_RETURN(have, client->AppendKv(session.id, kv_buf, 0, spec.ChunkBytes(f.append),
                                            static_cast<uint32_t>(f.append)));
    const double append_ms = absl::ToDoubleMilliseconds(absl::Now() - t0);
    tokens = static_cast<int64_t>(have);
    std::vector<double> lat, mass;
    int64_t pages = 0;
    for (int layer = 0; layer < dump.layers; ++layer) {
      t0 = absl::Now();
      ASSIGN_OR_RETURN(StepResult r,
                       client->DecodeStep(session.id, layer, model.Queries(step, layer),
                                          out_buf.buffer_id(), 0, sel));
      lat.push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
      ASSIGN_OR_RETURN(int64_t checked,
                       VerifyFetch(kv, tokens, r.layout, r.heads, out_buf.data(), out_buf.size()));
      pages += checked;
      const int g = dump.group_size();
      for (const HeadSelection& h : r.heads) {
        // Exact attention over the tokens appended so far (rows 0..tokens).
        std::vector<float> keys(static_cast<size_t>(tokens) * dump.head_dim);
        std::memcpy(keys.data(), dump.key(layer, h.kv_head), keys.size() * sizeof(float));
        ASSIGN_OR_RETURN(ExactAttention ex,
                         ComputeExactAttention(keys.data(), nullptr, tokens, dump.head_dim,
                                               dump.query(step, layer, h.kv_head), g));
        ASSIGN_OR_RETURN(double m, MassRecall(ex, h.positions));
        mass.push_back(m);
      }
    }
    verified_pages += pages;
    double mean = 0;
    for (double m : mass) mean += m;
    mean /= std::max<size_t>(1, mass.size());
    table.AddRow({absl::StrCat(step), absl::StrCat(tokens), absl::StrFormat("%.2f", append_ms),
                  absl::StrFormat("%.3f", Percentile(lat, 0.5)),
                  absl::StrFormat("%.3f", *std::max_element(lat.begin(), lat.end())),
                  absl::StrFormat("%.4f", mean),
                  absl::StrFormat("%.4f", *std::min_element(mass.begin(), mass.end())),
                  absl::StrCat(pages), "ok"});
    all_lat.insert(all_lat.end(), lat.begin(), lat.end());
    all_mass.insert(all_mass.end(), mass.begin(), mass.end());
  }
  std::cout << "\n" << table.Render() << "\n";
  double mean = 0;
  for (double m : all_mass) mean += m;
  mean /= std::max<size_t>(1, all_mass.size());
  std::cout << absl::StrFormat(
      "summary: %d steps x %d layers over the Unix socket; DecodeStep per layer p50 %.3f ms, "
      "p99 %.3f ms; attention-mass recall mean %.4f (budget %d of %d tokens); %d fetched pages "
      "byte-identical to what was appended\n",
      f.steps, dump.layers, Percentile(all_lat, 0.5), Percentile(all_lat, 0.99), mean, f.budget,
      tokens, verified_pages);
  RETURN_IF_ERROR(client->DropSession(session.id));
  return absl::OkStatus();
}

}  // namespace
}  // namespace icecache

int main(int argc, char** argv) {
  CLI::App app(
      "Runs a synthetic model's prefill and decode loop through icecached, checking every "
      "fetched page byte for byte.",
      "icecache-demo");
  icecache::cli::Configure(app);
  icecache::DemoFlags flags;
  icecache::AddFlags(app, &flags);
  if (auto code = icecache::cli::Parse(app, argc, argv)) return *code;
  icecache::SetMutexDeadlockChecks(false);  // as the daemon (common/mutex_checks.h)
  if (absl::Status s = icecache::FinishFlags(app, &flags); !s.ok()) {
    std::cerr << "icecache-demo: " << s.message() << "\n(run icecache-demo --help for usage)\n";
    return icecache::cli::kExitUsage;
  }
  absl::Status s = icecache::RunDemo(flags);
  if (!s.ok()) {
    std::cerr << "icecache-demo: FAILED: " << s << "\n";
    return 1;
  }
  return 0;
}
