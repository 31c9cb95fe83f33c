// icecache-bench-rpc: the RPC cost of IceCache's decode path.
//
// Sweep mode (default): for each K in --sessions (default 1,4,8,32), K
// sessions with the same synthetic prefill decode concurrently over the Unix
// socket (one thread and one DecodeStep stream per session). Reports the
// per-layer DecodeStep latency p50/p99, decode steps per second, the
// in-process cost of the same selection + gather measured in this process
// with the core library (same selector, same KV, same queries), the RPC
// overhead (difference and ratio), and the pool bytes per session.
// --soak SECONDS: decode for that long and count failed requests by code.
// --churn N: N create/append/drop cycles, daemon RSS before and after.
// Output: a table on stdout; --json FILE writes the figures as JSON (common/json.h),
// atomically and only when the run succeeded.
// `icecache-bench rpc ARGS` is meant to exec this binary with ARGS.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/daemon_process.h"
#include "client/kv_check.h"
#include "client/output.h"
#include "client/tool_session.h"
#include "common/cli.h"
#include "common/dtype.h"
#include "common/file_util.h"
#include "common/mutex_checks.h"
#include "common/status_macros.h"
#include "server/index/kernels.h"
#include "server/index/owned_page_keys.h"
#include "server/index/selector.h"

namespace icecache {
namespace {

struct Flags {
  std::string spawn, socket, json, selector = "mdci", transport = "ring";
  int pid = 0;
  std::vector<int> sessions = {1, 4, 8, 32};
  int64_t tokens = 4096;
  int layers = 2, steps = 8, budget = 256, page_tokens = 16;
  int soak_s = 0, churn = 0;
};

// Registers the flags on `app`; `sessions` receives --sessions as given.
void AddFlags(CLI::App& app, Flags* f, std::string* sessions) {
  app.add_option("--spawn", f->spawn,
                 "start icecached at PATH on a temporary socket (else --socket)")
      ->type_name("PATH");
  app.add_option("--socket", f->socket,
                 "a running daemon (default $ICECACHE_SOCKET / default socket)")
      ->type_name("PATH");
  app.add_option("--pid", f->pid, "the running daemon's pid (for --churn RSS without --spawn)")
      ->check(cli::Positive());
  app.add_option("--sessions", *sessions, "concurrent sessions to sweep")->type_name("LIST");
  app.add_option("--tokens", f->tokens, "prefill tokens per session")->check(cli::Positive());
  app.add_option("--layers", f->layers, "layers")->check(cli::Positive());
  app.add_option("--steps", f->steps, "decode steps per session")->check(cli::Positive());
  app.add_option("--budget", f->budget, "selected tokens per KV head")->check(cli::Positive());
  app.add_option("--page-tokens,--page_tokens", f->page_tokens, "tokens per page")
      ->check(cli::Positive());
  app.add_option("--selector", f->selector,
                 "mdci | exact-mdci | exact | quest | streaming | arkvale | pqcache | snapkv | "
                 "omnikv | magicpig | mdci-published");
  app.add_option("--soak", f->soak_s,
                 "soak mode: decode with the first K of --sessions for SECONDS")
      ->check(cli::Positive());
  app.add_option("--churn", f->churn, "churn mode: N create/append/drop cycles, RSS before/after")
      ->check(cli::Positive());
  app.add_option("--json", f->json, "write results as JSON to FILE")->type_name("FILE");
  app.add_option("--transport", f->transport,
                 "DecodeStep path: ring (shared-memory ring, the client's default; the stream "
                 "where the daemon refuses it) or stream (the gRPC stream)")
      ->check(CLI::IsMember({"ring", "stream"}))
      ->capture_default_str();
}

absl::Status FinishFlags(const std::string& sessions, Flags* f) {
  f->sessions.clear();
  for (absl::string_view part : absl::StrSplit(sessions, ',')) {
    int k = 0;
    if (!absl::SimpleAtoi(part, &k) || k <= 0 || k > 1024) {
      return absl::InvalidArgumentError(absl::StrCat("--sessions: bad count '", part, "'"));
    }
    f->sessions.push_back(k);
  }
  if (f->budget > f->tokens) return absl::InvalidArgumentError("--budget exceeds --tokens");
  return absl::OkStatus();
}

double Pct(const std::vector<double>& v, double p) { return Percentile(v, p); }

// The llama3-8b-like model of every sweep point, soak and churn cycle.
struct Model : SyntheticModel {
  std::vector<uint8_t> prefill;  // the AppendKv chunk of all tokens
};

absl::StatusOr<Model> MakeModel(const Flags& f) {
  SyntheticModelOptions o;
  o.layers = f.layers;
  o.tokens = f.tokens;
  o.steps = f.steps;
  o.page_tokens = f.page_tokens;
  o.selector = f.selector;
  Model m;
  ASSIGN_OR_RETURN(static_cast<SyntheticModel&>(m), MakeSyntheticModel(o));
  m.prefill = m.kv.Chunk(0, f.tokens);
  return m;
}

absl::Span<const float> Queries(const Model& m, int step, int layer) {
  return m.Queries(step, layer);
}

size_t FetchBytes(const Model& m, const Flags& f) { return m.FetchBytes(f.budget, 4); }

// --- in-process reference: the same selection + gather with the core ---

struct InProcess {
  std::vector<std::unique_ptr<OwnedPageKeys>> pages;  // [layer][head]
  std::vector<std::unique_ptr<Selector>> selectors;
  std::vector<uint8_t> out;
};

absl::StatusOr<InProcess> BuildInProcess(const Model& m, const Flags& f) {
  InProcess ip;
  ASSIGN_OR_RETURN(SelectorKind kind, ParseSelectorKind(f.selector));
  const int64_t n = m.dump.tokens;
  for (int l = 0; l < m.spec.layers; ++l) {
    for (int h = 0; h < m.spec.kv_heads; ++h) {
      SelectorConfig c;
      c.kind = kind;
      c.head_dim = m.spec.head_dim;
      c.dtype = DType::kF16;
      c.page_tokens = f.page_tokens;
      c.num_query_heads = m.dump.group_size();
      ASSIGN_OR_RETURN(auto keys, OwnedPageKeys::ForSelector(c, /*with_values=*/true));
      ASSIGN_OR_RETURN(auto sel, Selector::Create(c, keys.get()));
      std::vector<Placement> placements;
      RETURN_IF_ERROR(sel->Build(m.dump.key(l, h), n, &placements));
      RETURN_IF_ERROR(keys->Apply(placements, m.dump.key(l, h), m.dump.value(l, h)));
      ip.pages.push_back(std::move(keys));
      ip.selectors.push_back(std::move(sel));
    }
  }
  ip.out.resize(FetchBytes(m, f));
  return ip;
}

// One layer: select per KV head, gather K and V blocks into `out`.
absl::Status InProcessLayer(const Model& m, const Flags& f, InProcess& ip, int step, int layer,
                            Selection* sel, uint64_t* keys_touched, int64_t* pages) {
  SelectParams p;
  p.budget_tokens = f.budget;
  p.sink_tokens = 4;
  const size_t block = static_cast<size_t>(f.page_tokens) * m.spec.head_dim * 2;
  size_t off = 0;
  for (int h = 0; h < m.spec.kv_heads; ++h) {
    const size_t idx = static_cast<size_t>(layer) * m.spec.kv_heads + h;
    sel->Clear();
    RETURN_IF_ERROR(ip.selectors[idx]->Select(m.dump.query(step % m.dump.steps, layer, h),
                                              m.dump.group_size(), p, sel));
    *keys_touched += sel->keys_touched;
    *pages += static_cast<int64_t>(sel->pages.size());
    for (uint32_t page : sel->pages) {
      if (off + 2 * block > ip.out.size())
        return absl::InternalError("in-process buffer too small");
      std::memcpy(ip.out.data() + off, ip.pages[idx]->page_keys(page), block);
      std::memcpy(ip.out.data() + off + block, ip.pages[idx]->page_values(page), block);
      off += 2 * block;
    }
  }
  return absl::OkStatus();
}

// --- RPC sweep ---

struct SweepPoint {
  int sessions = 0;
  std::vector<double> layer_ms;
  double wall_s = 0;
  int64_t steps = 0;  // decode steps (all layers of one token) over all sessions
  int64_t failed = 0;
  uint64_t bytes_per_session = 0;
  double prefill_ms_p50 = 0;
  uint64_t keys_touched = 0, pages = 0, heads = 0;
};

absl::StatusOr<SweepPoint> RunSweepPoint(Client& client, const Model& m, const Flags& f, int k) {
  SweepPoint pt;
  pt.sessions = k;
  std::vector<SessionInfo> sessions;
  std::vector<ShmBuffer> outs;
  ASSIGN_OR_RETURN(ShmBuffer kv_buf, client.CreateShmBuffer(m.prefill.size()));
  std::memcpy(kv_buf.data(), m.prefill.data(), m.prefill.size());
  std::vector<double> prefill_ms;
  for (int i = 0; i < k; ++i) {
    ASSIGN_OR_RETURN(SessionInfo s, client.CreateSession(m.spec));
    const absl::Time t0 = absl::Now();
    RETURN_IF_ERROR(
        client.AppendKv(s.id, kv_buf, 0, m.prefill.size(), static_cast<uint32_t>(f.tokens))
            .status());
    prefill_ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
    sessions.push_back(s);
    ASSIGN_OR_RETURN(ShmBuffer out, client.CreateShmBuffer(FetchBytes(m, f)));
    outs.push_back(std::move(out));
  }
  pt.prefill_ms_p50 = Pct(prefill_ms, 0.5);
  ASSIGN_OR_RETURN(SessionInfo info, client.GetSession(sessions[0].id));
  pt.bytes_per_session = info.bytes;
  SelectOptions opt;
  opt.budget_tokens = static_cast<uint32_t>(f.budget);
  opt.sink_tokens = 4;
  // Warm-up: open every stream with one step.
  for (int i = 0; i < k; ++i) {
    RETURN_IF_ERROR(
        client.DecodeStep(sessions[i].id, 0, Queries(m, 0, 0), outs[i].buffer_id(), 0, opt)
            .status());
  }
  std::vector<std::vector<double>> lat(k);
  std::vector<uint64_t> touched(k, 0), npages(k, 0), nheads(k, 0);
  std::vector<int64_t> failed(k, 0);
  std::vector<absl::Status> first_error(k);
  const absl::Time t0 = absl::Now();
  std::vector<std::thread> threads;
  for (int i = 0; i < k; ++i) {
    threads.emplace_back([&, i] {
      for (int step = 0; step < f.steps; ++step) {
        for (int layer = 0; layer < m.spec.layers; ++layer) {
          const absl::Time s0 = absl::Now();
          auto r = client.DecodeStep(sessions[i].id, layer, Queries(m, step, layer),
                                     outs[i].buffer_id(), 0, opt);
          lat[i].push_back(absl::ToDoubleMilliseconds(absl::Now() - s0));
          if (!r.ok()) {
            ++failed[i];
            if (first_error[i].ok()) first_error[i] = r.status();
            continue;
          }
          for (const HeadSelection& h : r->heads) {
            touched[i] += h.keys_touched;
            npages[i] += h.pages.size();
            ++nheads[i];
          }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  pt.wall_s = absl::ToDoubleSeconds(absl::Now() - t0);
  for (int i = 0; i < k; ++i) {
    pt.layer_ms.insert(pt.layer_ms.end(), lat[i].begin(), lat[i].end());
    pt.failed += failed[i];
    pt.keys_touched += touched[i];
    pt.pages += npages[i];
    pt.heads += nheads[i];
    if (!first_error[i].ok()) std::cerr << "session " << i << ": " << first_error[i] << "\n";
  }
  pt.steps = static_cast<int64_t>(k) * f.steps;
  outs.clear();
  for (const auto& s : sessions) RETURN_IF_ERROR(client.DropSession(s.id));
  return pt;
}

absl::Status RunSweep(Client& client, const Model& m, const Flags& f, Json& report) {
  // In-process reference, single thread, same selector/KV/queries.
  std::cout << "building the in-process reference index...\n";
  ASSIGN_OR_RETURN(InProcess ip, BuildInProcess(m, f));
  std::vector<double> inproc_ms;
  Selection sel;
  uint64_t in_touched = 0;
  int64_t in_pages = 0;
  for (int step = 0; step < f.steps; ++step) {
    for (int layer = 0; layer < m.spec.layers; ++layer) {
      const absl::Time t0 = absl::Now();
      RETURN_IF_ERROR(InProcessLayer(m, f, ip, step, layer, &sel, &in_touched, &in_pages));
      inproc_ms.push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
    }
  }
  const double in_p50 = Pct(inproc_ms, 0.5), in_p99 = Pct(inproc_ms, 0.99);
  TextTable t({"SESSIONS", "LAYER_P50_MS", "LAYER_P99_MS", "STEPS_PER_S", "INPROC_P50_MS",
               "OVERHEAD_P50_MS", "RPC/INPROC", "POOL_PER_SESSION", "FAILED"});
  const double in_heads = static_cast<double>(f.steps) * m.spec.layers * m.spec.kv_heads;
  report["inprocess"] = {{"layer_ms_p50", in_p50},
                         {"layer_ms_p99", in_p99},
                         {"threads", 1},
                         {"keys_touched_per_head", in_touched / in_heads},
                         {"pages_per_head", in_pages / in_heads}};
  std::cout << absl::StrFormat("in-process: keys touched per head %.0f, pages per head %.1f\n",
                               in_touched / in_heads, in_pages / in_heads);
  report["results"] = Json::array();
  for (int k : f.sessions) {
    std::cout << "sweep: " << k << " concurrent sessions...\n";
    ASSIGN_OR_RETURN(SweepPoint pt, RunSweepPoint(client, m, f, k));
    const double p50 = Pct(pt.layer_ms, 0.5), p99 = Pct(pt.layer_ms, 0.99);
    const double sps = pt.steps / pt.wall_s;
    t.AddRow({absl::StrCat(k), absl::StrFormat("%.3f", p50), absl::StrFormat("%.3f", p99),
              absl::StrFormat("%.1f", sps), absl::StrFormat("%.3f", in_p50),
              absl::StrFormat("%.3f", p50 - in_p50),
              absl::StrFormat("%.2f", in_p50 > 0 ? p50 / in_p50 : 0.0),
              HumanBytes(static_cast<int64_t>(pt.bytes_per_session)), absl::StrCat(pt.failed)});
    report["results"].push_back(
        {{"sessions", k},
         {"layer_ms_p50", p50},
         {"layer_ms_p99", p99},
         {"steps_per_s", sps},
         {"layer_steps_per_s", sps * m.spec.layers},
         {"inprocess_layer_ms_p50", in_p50},
         {"rpc_overhead_ms_p50", p50 - in_p50},
         {"rpc_over_inprocess_p50", in_p50 > 0 ? p50 / in_p50 : 0.0},
         {"pool_bytes_per_session", pt.bytes_per_session},
         {"prefill_ms_p50", pt.prefill_ms_p50},
         {"wall_s", pt.wall_s},
         {"failed", pt.failed},
         {"keys_touched_per_head", pt.heads ? double(pt.keys_touched) / pt.heads : 0},
         {"pages_per_head", pt.heads ? double(pt.pages) / pt.heads : 0}});
    std::cout << absl::StrFormat("  rpc: keys touched per head %.0f, pages per head %.1f\n",
                                 pt.heads ? double(pt.keys_touched) / pt.heads : 0,
                                 pt.heads ? double(pt.pages) / pt.heads : 0);
    if (pt.failed > 0) {
      std::cout << t.Render();
      return absl::InternalError(absl::StrCat(pt.failed, " failed DecodeStep calls"));
    }
  }
  std::cout << "\n" << t.Render();
  std::cout << absl::StrFormat(
      "in-process reference (1 thread, same selector/KV/queries): select+gather per layer "
      "p50 %.3f ms p99 %.3f ms; kernels %s\n",
      in_p50, in_p99, KernelIsa());
  return absl::OkStatus();
}

absl::Status RunSoak(Client& client, const Model& m, const Flags& f, Json& report) {
  const int k = f.sessions.front();
  std::vector<SessionInfo> sessions;
  std::vector<ShmBuffer> outs;
  ASSIGN_OR_RETURN(ShmBuffer kv_buf, client.CreateShmBuffer(m.prefill.size()));
  std::memcpy(kv_buf.data(), m.prefill.data(), m.prefill.size());
  for (int i = 0; i < k; ++i) {
    ASSIGN_OR_RETURN(SessionInfo s, client.CreateSession(m.spec));
    RETURN_IF_ERROR(
        client.AppendKv(s.id, kv_buf, 0, m.prefill.size(), static_cast<uint32_t>(f.tokens))
            .status());
    sessions.push_back(s);
    ASSIGN_OR_RETURN(ShmBuffer out, client.CreateShmBuffer(FetchBytes(m, f)));
    outs.push_back(std::move(out));
  }
  SelectOptions opt;
  opt.budget_tokens = static_cast<uint32_t>(f.budget);
  std::mutex mu;
  std::map<std::string, int64_t> failures;
  std::atomic<int64_t> ok{0};
  std::vector<double> lat_all;
  const absl::Time end = absl::Now() + absl::Seconds(f.soak_s);
  std::vector<std::thread> threads;
  for (int i = 0; i < k; ++i) {
    threads.emplace_back([&, i] {
      std::vector<double> lat;
      for (int step = 0; absl::Now() < end; ++step) {
        for (int layer = 0; layer < m.spec.layers; ++layer) {
          const absl::Time s0 = absl::Now();
          auto r = client.DecodeStep(sessions[i].id, layer, Queries(m, step, layer),
                                     outs[i].buffer_id(), 0, opt);
          lat.push_back(absl::ToDoubleMilliseconds(absl::Now() - s0));
          if (r.ok()) {
            ++ok;
          } else {
            std::lock_guard<std::mutex> l(mu);
            ++failures[absl::StatusCodeToString(r.status().code())];
          }
        }
        if (step % 16 == 0) {
          auto ka = client.KeepAlive({sessions[i].id});
          if (ka.ok()) {
            ++ok;
          } else {
            std::lock_guard<std::mutex> l(mu);
            ++failures[absl::StatusCodeToString(ka.status().code())];
          }
        }
      }
      std::lock_guard<std::mutex> l(mu);
      lat_all.insert(lat_all.end(), lat.begin(), lat.end());
    });
  }
  for (auto& t : threads) t.join();
  int64_t failed = 0;
  for (const auto& [code, n] : failures) failed += n;
  std::cout << absl::StrFormat(
      "soak: %d s, %d sessions: %d requests ok, %d failed; DecodeStep per layer p50 %.3f ms p99 "
      "%.3f ms max %.3f ms\n",
      f.soak_s, k, ok.load(), failed, Pct(lat_all, 0.5), Pct(lat_all, 0.99), Pct(lat_all, 1.0));
  for (const auto& [code, n] : failures) std::cout << "  failed " << code << ": " << n << "\n";
  Json by_code = Json::object();
  for (const auto& [code, n] : failures) by_code[code] = n;
  report["soak"] = {{"seconds", f.soak_s},
                    {"sessions", k},
                    {"ok", ok.load()},
                    {"failed", failed},
                    {"layer_ms_p50", Pct(lat_all, 0.5)},
                    {"layer_ms_p99", Pct(lat_all, 0.99)},
                    {"failures_by_code", std::move(by_code)}};
  outs.clear();
  for (const auto& s : sessions) (void)client.DropSession(s.id);
  return failed == 0 ? absl::OkStatus()
                     : absl::InternalError(absl::StrCat(failed, " failed requests in soak"));
}

absl::Status RunChurn(Client& client, const Model& m, const Flags& f, int pid, Json& report) {
  if (pid <= 0)
    return absl::InvalidArgumentError("--churn needs --spawn or --pid to read the daemon's RSS");
  ASSIGN_OR_RETURN(ShmBuffer kv_buf, client.CreateShmBuffer(m.prefill.size()));
  std::memcpy(kv_buf.data(), m.prefill.data(), m.prefill.size());
  auto cycle = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(SessionInfo s, client.CreateSession(m.spec));
    RETURN_IF_ERROR(
        client.AppendKv(s.id, kv_buf, 0, m.prefill.size(), static_cast<uint32_t>(f.tokens))
            .status());
    return client.DropSession(s.id);
  };
  // One warm-up cycle so first-use allocations (size classes, thread pools)
  // are in the "before" figure.
  RETURN_IF_ERROR(cycle());
  ASSIGN_OR_RETURN(int64_t before, ProcessRssBytes(pid));
  int64_t failed = 0;
  const absl::Time t0 = absl::Now();
  // RSS at every tenth of the run: a plateau is reuse, a ramp is a leak.
  std::vector<std::pair<int, int64_t>> trace;
  const int every = std::max(1, f.churn / 10);
  for (int i = 0; i < f.churn; ++i) {
    if (!cycle().ok()) ++failed;
    if ((i + 1) % every == 0) {
      ASSIGN_OR_RETURN(int64_t rss, ProcessRssBytes(pid));
      trace.emplace_back(i + 1, rss);
      std::cout << absl::StrFormat("  after %d cycles: daemon RSS %s\n", i + 1, HumanBytes(rss));
    }
  }
  const double wall = absl::ToDoubleSeconds(absl::Now() - t0);
  ASSIGN_OR_RETURN(int64_t after, ProcessRssBytes(pid));
  std::cout << absl::StrFormat(
      "churn: %d create/append(%d tokens)/drop cycles in %.2f s (%.1f/s), %d failed; daemon RSS "
      "%s before, %s after (%+.1f MiB)\n",
      f.churn, f.tokens, wall, f.churn / wall, failed, HumanBytes(before), HumanBytes(after),
      (after - before) / 1048576.0);
  Json rss_trace = Json::array();
  for (const auto& [n, rss] : trace) rss_trace.push_back({n, rss});
  report["churn"] = {{"cycles", f.churn},        {"failed", failed},
                     {"wall_s", wall},           {"rss_before_bytes", before},
                     {"rss_after_bytes", after}, {"rss_trace", std::move(rss_trace)}};
  return failed == 0 ? absl::OkStatus()
                     : absl::InternalError(absl::StrCat(failed, " failed churn cycles"));
}

absl::Status Run(const Flags& f) {
  ClientOptions options;
  options.socket_path = f.socket;
  options.timeout = absl::Seconds(300);
  options.decode_ring = f.transport == "ring";
  ASSIGN_OR_RETURN(DaemonConnection conn, SpawnOrConnect(f.spawn, options));
  const int pid = conn.daemon ? conn.daemon->pid() : f.pid;
  Client* client = conn.client.get();
  std::cout << "generating synthetic llama3-8b-like KV...\n";
  ASSIGN_OR_RETURN(Model m, MakeModel(f));
  Json report = Json::object();
  report["benchmark"] = "rpc";
  report["machine"] = {{"cores", std::thread::hardware_concurrency()}, {"kernel_isa", KernelIsa()}};
  report["config"] = {
      {"target", client->target()},  {"tokens", f.tokens},           {"layers", f.layers},
      {"kv_heads", m.spec.kv_heads}, {"q_heads", m.spec.q_heads},    {"head_dim", m.spec.head_dim},
      {"dtype", "float16"},          {"page_tokens", f.page_tokens}, {"budget_tokens", f.budget},
      {"selector", f.selector},      {"transport", f.transport},     {"steps", f.steps}};
  absl::Status st;
  if (f.soak_s > 0) {
    st = RunSoak(*client, m, f, report);
  } else if (f.churn > 0) {
    st = RunChurn(*client, m, f, pid, report);
  } else {
    st = RunSweep(*client, m, f, report);
  }
  // Only a complete run writes its report, whole or not at all.
  RETURN_IF_ERROR(st);
  if (!f.json.empty()) RETURN_IF_ERROR(WriteFileAtomically(f.json, DumpJson(report) + "\n"));
  return absl::OkStatus();
}

}  // namespace
}  // namespace icecache

int main(int argc, char** argv) {
  CLI::App app("The RPC cost of IceCache's decode path (sweep, --soak or --churn).",
               "icecache-bench-rpc");
  icecache::cli::Configure(app);
  icecache::Flags flags;
  std::string sessions = "1,4,8,32";
  icecache::AddFlags(app, &flags, &sessions);
  if (auto code = icecache::cli::Parse(app, argc, argv)) return *code;
  icecache::SetMutexDeadlockChecks(false);  // as the daemon (common/mutex_checks.h)
  if (absl::Status s = icecache::FinishFlags(sessions, &flags); !s.ok()) {
    std::cerr << "icecache-bench-rpc: " << s.message()
              << "\n(run icecache-bench-rpc --help for usage)\n";
    return icecache::cli::kExitUsage;
  }
  absl::Status s = icecache::Run(flags);
  if (!s.ok()) {
    std::cerr << "icecache-bench-rpc: FAILED: " << s << "\n";
    return 1;
  }
  return 0;
}
