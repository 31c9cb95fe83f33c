// The figures of `icecache-bench decode` (decode_bench.h) and their views:
// the text tables, the JSON report and the SVG plot (decode_report.cc).
// Internal to the benchmark; values only.
#ifndef ICECACHE_TESTS_BENCH_DECODE_RESULTS_H_
#define ICECACHE_TESTS_BENCH_DECODE_RESULTS_H_

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "common/json.h"
#include "tests/bench/decode_backend.h"
#include "tests/bench/decode_bench.h"

namespace icecache::bench {

// Per-token figures in ms (the whole model: sums over its layers, scaled to
// DecodeBenchOptions::layers when the context ran with fewer). Medians over
// the decode steps after the first. NaN where a figure does not apply.
struct TokenCost {
  double append = 0, select = 0, gather = 0, rpc = 0, attention = 0;
  double tpot = 0;  // append + the DecodeStep calls + attention, measured per step
};

struct PolicyResult {
  DecodePolicy policy;
  double prefill_s = 0;  // KV ingest + index builds (NaN: no offload)
  double first_step_s = 0;
  double tt2t_s = 0;  // prefill + first step
  TokenCost cost;
  // The same figures as means over the same steps: the throughput's. A
  // per-step cost that alternates between two values (every head scanning
  // on the same step) makes the median one of them (docs/bench/stagger38.md).
  TokenCost mean_cost;
  // Each figure's own 99th percentile over the same steps (rpc: NaN).
  TokenCost p99_cost;
  // Every decode step's figures (the first included, step 0), per token of
  // the model (scaled like the medians): where a tail comes from.
  std::vector<double> step_append_ms, step_select_ms, step_gather_ms, step_decode_ms;
  // Median per DecodeStep call of its round trip beyond the daemon's own
  // select + gather in it (in-process: the call's own overhead).
  double rpc_per_message_us = 0;
  // The companion's split (in-process, --reference-layers, scaled): select
  // and gather per token, and the paired median per message of the
  // measured call over the companion's DecodeStep (the split before sel8).
  double companion_select_ms = 0, companion_gather_ms = 0, paired_rpc_per_message_us = 0;
  // Of rpc_per_message_us: the median per call of the daemon's session
  // manager beyond its select + gather (lookup, lock and build waits, probe
  // hand-off, prefetch start); the rest is the transport and the proto.
  double manager_rest_per_message_us = 0;
  double message_us = 0;  // median DecodeStep call per layer
  int messages_per_token = 0;
  double pages_per_head = 0, tokens_per_head = 0;
  std::vector<double> layer_mass, layer_error;  // per layer, mean over steps and heads
  double mass = 0, error = 0;                   // mean over layers
  double min_layer_mass = 0;
  // The DecodeStep calls per token (select + gather + RPC, all layers), and
  // that split into the groups' first layers and their later layers (which
  // only wait for a flag when prefetched). prefetched_share: of the later
  // layers' calls, those that found their layer written.
  double decode_ms = 0, first_layers_ms = 0, later_layers_ms = 0;
  double prefetched_share = 0;
  // "+pf" policies alternate prefetch on (odd steps) and off (even steps):
  // the later layers' calls per token, medians over each set (NaN: none).
  double later_on_ms = 0, later_off_ms = 0;
  // Token rows written over the steps after the first, per token of the
  // model (scaled like the times), and the share of the rows the calls
  // returned that stayed in place ("+ip"; 0 otherwise). NaN: no token rows.
  double rows_copied_per_token = 0, rows_kept_share = 0;
  // --in-place-ab: the gather per token on the in-place (odd) and whole
  // (even) steps of a "+ip" policy (NaN otherwise).
  double gather_in_place_ms = std::numeric_limits<double>::quiet_NaN();
  double gather_whole_ms = std::numeric_limits<double>::quiet_NaN();
  // The quality monitors after the decode steps: the measured backend's
  // session (the daemon's) and the companion's.
  MonitorSummary monitor, companion_monitor;
  // Where the time went (DecodeBackend::DaemonCpu: a spawned
  // daemon's user + system time; NaN otherwise): the daemon's and this
  // process's CPU over the prefill (scaled like prefill_s, so / prefill_s
  // gives the cores busy), and the daemon's over the decode steps, per token
  // (scaled like the times; selection, gather, references, appends, ring).
  double prefill_daemon_cpu_s = std::numeric_limits<double>::quiet_NaN();
  double prefill_daemon_system_s = std::numeric_limits<double>::quiet_NaN();  // of it, the kernel's
  double prefill_client_cpu_s = std::numeric_limits<double>::quiet_NaN();
  double decode_daemon_cpu_ms = std::numeric_limits<double>::quiet_NaN();
  double decode_wall_s = 0;  // the decode steps' wall (decode_daemon_cores: CoresOver)
  double decode_daemon_cores = std::numeric_limits<double>::quiet_NaN();  // over the steps' wall
};

struct BatchResult {
  int batch = 0;
  double step_ms = 0;  // one token of every sequence, all layers (scaled)
  double tokens_per_s = 0;
  double speedup = 0;  // aggregate tokens/s over batch 1's
  // The daemon's cores busy over the timed steps (its CPU time / their
  // wall; NaN: not a spawned daemon): near the machine's cores, a batch
  // has nothing idle left to fill.
  double daemon_cores = std::numeric_limits<double>::quiet_NaN();
  double wall_ms = 0;  // the timed steps' (too short for daemon_cores: NaN, CoresOver)
};

struct ContextResult {
  int64_t tokens = 0;
  int layers = 0;         // layers that ran
  double scale = 1.0;     // options.layers / layers
  double generate_s = 0;  // the model's first pass (queries, decode tokens, quality layers)
  // The prefill's generation, every policy together (FillAppend; not timed).
  double regenerate_s = 0;
  // The prefill was generated once and held (DecodeBenchOptions::hold_prefill),
  // in hold_s seconds; the policies streamed it pipelined.
  bool prefill_held = false;
  double hold_s = 0;
  std::vector<int> quality_layers;  // the layers PolicyResult::layer_mass is of
  double full_attention_ms = 0;
  std::vector<PolicyResult> policies;
  std::string batch_policy;
  int batch_layers = 0;
  std::vector<BatchResult> batches;
};

// Prints the table of one context (stdout).
void PrintContext(const DecodeBenchOptions& o, const ContextResult& c);
// The JSON report of the run.
Json DecodeReportJson(const DecodeBenchOptions& o, const std::vector<ContextResult>& contexts);
// The SVG: TPOT against context per policy, and mass recall per policy.
std::string DecodePlotSvg(const DecodeBenchOptions& o, const std::vector<ContextResult>& contexts);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_DECODE_RESULTS_H_
