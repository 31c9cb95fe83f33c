#include "tests/bench/decode_rpc_overhead.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/file_util.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "tests/bench/decode_backend.h"
#include "tests/bench/decode_model.h"
#include "tests/bench/machine_info.h"

namespace icecache::bench {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kRing = 0, kStream = 1, kInProcess = 2, kPaths = 3;
constexpr const char* kPathNames[kPaths] = {"ring", "stream", "in-process"};
constexpr int kWarmupMessages = 50;
// Paths alternate by blocks, not message by message: on a machine with few
// cores, the worker threads one path's message leaves spinning (oneTBB's, in
// the daemon or in this process) would otherwise tax the next path's message.
constexpr int64_t kBlockMessages = 20;

double UsSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

double Quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * static_cast<double>(v.size() - 1) + 0.5)];
}

double LoadAverage1() {
  std::ifstream f("/proc/loadavg");
  double one = 0;
  f >> one;
  return one;
}

struct Path {
  DecodeBackend* backend = nullptr;
  std::string id;
  std::vector<double> us;
  // The call beyond the manager's own time in it (step_ns): what the
  // transport and the handler around the manager cost, whatever the step did.
  std::vector<double> beyond_us;
};

// Creates the session on `b`, prefills every layer in one chunk and waits
// until every tree is built (the daemon builds in the background).
absl::StatusOr<std::string> Prepare(DecodeBackend& b, const DecodeModel& m,
                                    const DecodeSessionSpec& spec, size_t output_bytes) {
  const int64_t n = m.prefill_tokens();
  RETURN_IF_ERROR(b.Reserve(m.AppendBytes(n, m.layers()), output_bytes));
  ASSIGN_OR_RETURN(std::string id, b.CreateSession(spec));
  RETURN_IF_ERROR(m.FillAppend(0, n, 0, m.layers(), b.staging()));
  RETURN_IF_ERROR(b.Append(id, n, 0, 0));
  for (int tries = 0;; ++tries) {
    ASSIGN_OR_RETURN(auto trees, b.Trees(id));
    if (trees.first >= trees.second) break;
    if (tries > 6000) return absl::DeadlineExceededError("index builds did not finish in 60 s");
    absl::SleepFor(absl::Milliseconds(10));
  }
  return id;
}

absl::Status Message(const DecodeModel& m, const DecodeSelect& sel, int step, int layer, Path& p,
                     bool record) {
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(StepOutcome out,
                   p.backend->DecodeStep(p.id, layer, m.queries(step, layer), 0, sel));
  const double us = UsSince(t0);
  if (record) {
    p.us.push_back(us);
    p.beyond_us.push_back(us - out.step_ms * 1000.0);
  }
  return absl::OkStatus();
}

Json Summary(const std::array<Path, kPaths>& paths, int which) {
  const std::vector<double>& mine = paths[which].us;
  const std::vector<double>& base = paths[kInProcess].us;
  std::vector<double> diff(mine.size());
  for (size_t i = 0; i < mine.size(); ++i) diff[i] = mine[i] - base[i];
  return {{"message_us_p50", Quantile(mine, 0.5)},
          {"message_us_p99", Quantile(mine, 0.99)},
          {"overhead_us_p50", Quantile(diff, 0.5)},
          {"overhead_us_p99", Quantile(diff, 0.99)},
          {"beyond_step_us_p50", Quantile(paths[which].beyond_us, 0.5)},
          {"beyond_step_us_p99", Quantile(paths[which].beyond_us, 0.99)}};
}

absl::StatusOr<Json> RunPolicy(const DecodeBenchOptions& o, const DecodeModel& m,
                               const std::string& selector, std::array<Path, kPaths>& paths) {
  DecodeSessionSpec spec;
  spec.layers = m.layers();
  spec.kv_heads = m.kv_heads();
  spec.q_heads = m.q_heads();
  spec.head_dim = m.head_dim();
  spec.page_tokens = o.page_tokens;
  spec.selector = selector;
  // Every page a head may get (as LayerOutputBytes in decode_bench.cc).
  const int pt = o.page_tokens;
  const int64_t pages = std::min<int64_t>((m.tokens() + pt - 1) / pt + 1,
                                          o.budget + (o.sink_tokens + o.recent_tokens) / pt + 4);
  const size_t output_bytes =
      static_cast<size_t>(pages) * m.kv_heads() * 2 * pt * m.head_dim() * sizeof(uint16_t);
  for (int i = 0; i < kPaths; ++i) {
    paths[i].us.clear();
    paths[i].beyond_us.clear();
    ASSIGN_OR_RETURN(paths[i].id, Prepare(*paths[i].backend, m, spec, output_bytes));
  }
  DecodeSelect sel;
  sel.budget_tokens = o.budget;
  sel.sink_tokens = o.sink_tokens;
  sel.recent_tokens = o.recent_tokens;
  for (int w = 0; w < kWarmupMessages; ++w) {
    for (Path& p : paths) RETURN_IF_ERROR(Message(m, sel, 0, w % m.layers(), p, false));
  }
  // Blocks of kBlockMessages (step, layer) messages, each sent to the three
  // paths in turn, the order rotating block by block.
  std::vector<std::pair<int, int>> order;
  for (int step = 0; step < m.steps(); ++step) {
    for (int layer = 0; layer < m.layers(); ++layer) order.emplace_back(step, layer);
  }
  const int64_t k = static_cast<int64_t>(order.size());
  for (int64_t begin = 0, block = 0; begin < k; begin += kBlockMessages, ++block) {
    const int64_t end = std::min(k, begin + kBlockMessages);
    for (int j = 0; j < kPaths; ++j) {
      Path& p = paths[(block + j) % kPaths];
      for (int64_t i = begin; i < end; ++i) {
        RETURN_IF_ERROR(Message(m, sel, order[i].first, order[i].second, p, true));
      }
    }
  }
  for (Path& p : paths) RETURN_IF_ERROR(p.backend->Drop(p.id));
  Json out = {{"selector", selector}, {"messages", k}};
  for (int i = 0; i < kPaths; ++i) {
    out[kPathNames[i]] = i == kInProcess ? Json{{"message_us_p50", Quantile(paths[i].us, 0.5)},
                                                {"message_us_p99", Quantile(paths[i].us, 0.99)}}
                                         : Summary(paths, i);
  }
  return out;
}

void PrintRow(const Json& r) {
  const auto f = [&](const char* path, const char* key) {
    return absl::StrFormat("%.0f", r[path][key].get<double>());
  };
  std::printf("%-10s %8lld  %7s %7s  %7s %7s  %7s %7s  %7s %7s %7s %7s  %7s %7s %7s %7s\n",
              r["selector"].get<std::string>().c_str(),
              static_cast<long long>(r["messages"].get<int64_t>()),
              f("in-process", "message_us_p50").c_str(), f("in-process", "message_us_p99").c_str(),
              f("ring", "message_us_p50").c_str(), f("ring", "message_us_p99").c_str(),
              f("stream", "message_us_p50").c_str(), f("stream", "message_us_p99").c_str(),
              f("ring", "overhead_us_p50").c_str(), f("ring", "overhead_us_p99").c_str(),
              f("stream", "overhead_us_p50").c_str(), f("stream", "overhead_us_p99").c_str(),
              f("ring", "beyond_step_us_p50").c_str(), f("ring", "beyond_step_us_p99").c_str(),
              f("stream", "beyond_step_us_p50").c_str(), f("stream", "beyond_step_us_p99").c_str());
}

}  // namespace

absl::Status RunRpcOverhead(const DecodeBenchOptions& o) {
  if (o.mode != "socket") {
    return absl::InvalidArgumentError("--rpc-overhead measures the socket: use --mode socket");
  }
  DecodeModelOptions mo;
  mo.preset = o.preset;
  mo.seed = o.seed;
  mo.layers = o.layers;
  mo.tokens = o.contexts.front();
  mo.steps = o.steps;
  mo.quality_layers = 1;  // no quality figures here
  ASSIGN_OR_RETURN(std::unique_ptr<DecodeModel> m, DecodeModel::Generate(mo));
  const uint64_t pool = 4 * m->AppendBytes(m->tokens(), m->layers()) + (uint64_t{256} << 20);
  // The in-process SessionManager has neither the quality monitor nor
  // MDCI's self-calibrated width (the daemon's defaults): a spawned daemon
  // runs without them too, so both do the same work per message.
  ASSIGN_OR_RETURN(std::unique_ptr<DecodeBackend> ring,
                   MakeSocketBackend(o.spawn, o.socket, pool,
                                     absl::StrCat("quality { enabled: false "
                                                  "default_target_mass_ratio: 0 }\n",
                                                  o.daemon_config, "\n"),
                                     RingSpin(o)));
  ASSIGN_OR_RETURN(std::unique_ptr<DecodeBackend> stream, MakeStreamTwin(*ring));
  ASSIGN_OR_RETURN(std::unique_ptr<DecodeBackend> local,
                   MakeInProcessBackend(pool, /*quality=*/false));
  std::array<Path, kPaths> paths;
  paths[kRing].backend = ring.get();
  paths[kStream].backend = stream.get();
  paths[kInProcess].backend = local.get();
  const double load_start = LoadAverage1();
  std::printf(
      "RPC cost per DecodeStep layer message (%s, %d layers x %d KV heads, %lld tokens, budget %d, "
      "page %d; %d steps; ring, stream and in-process interleaved); load average %.2f at "
      "start\nmachine: %s\n",
      o.preset.c_str(), m->layers(), m->kv_heads(), static_cast<long long>(m->prefill_tokens()),
      o.budget, o.page_tokens, m->steps(), load_start, MachineLine().c_str());
  std::printf("%-10s %8s  %15s  %15s  %15s  %15s %15s  %15s %15s\n", "", "", "IN-PROCESS us",
              "RING us", "STREAM us", "RING-INPROC us", "STREAM-INPROC us", "RING-STEP us",
              "STREAM-STEP us");
  std::printf("%-10s %8s  %7s %7s  %7s %7s  %7s %7s  %7s %7s %7s %7s  %7s %7s %7s %7s\n",
              "SELECTOR", "MESSAGES", "p50", "p99", "p50", "p99", "p50", "p99", "p50", "p99", "p50",
              "p99", "p50", "p99", "p50", "p99");
  Json report = {{"benchmark", "decode --rpc-overhead"},
                 {"preset", o.preset},
                 {"layers", m->layers()},
                 {"tokens", m->prefill_tokens()},
                 {"steps", m->steps()},
                 {"budget", o.budget},
                 {"page_tokens", o.page_tokens},
                 {"load_average_start", load_start},
                 {"results", Json::array()}};
  for (const std::string& name : o.policies) {
    ASSIGN_OR_RETURN(DecodePolicy p, ParseDecodePolicy(name));
    if (p.kind != DecodePolicy::Kind::kSelector) continue;
    ASSIGN_OR_RETURN(Json r, RunPolicy(o, *m, p.selector, paths));
    PrintRow(r);
    report["results"].push_back(std::move(r));
  }
  const double load_end = LoadAverage1();
  report["load_average_end"] = load_end;
  std::printf(
      "RING-STEP / STREAM-STEP: the call beyond the daemon's own time in its session manager "
      "(kv.proto step_ns): the transport and the handler around the manager, whatever the step "
      "did\n");
  std::printf("load average %.2f at the end\n", load_end);
  if (!o.json.empty()) RETURN_IF_ERROR(WriteFileAtomically(o.json, DumpJson(report) + "\n"));
  return absl::OkStatus();
}

}  // namespace icecache::bench
