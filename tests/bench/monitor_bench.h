// icecache-bench monitor: the cost and the effect of the online quality
// monitor and the self-calibrating width (docs/architecture.md §5.1) in the
// real session core. One run, the same generated data and steps twice: the
// monitor off, then on at the daemon's defaults; a decode loop (append one
// token, select every KV head). Prints per run the select time (median and
// mean per step), and for the monitored run the measurement CPU as a share
// of the selection time, samples by outcome, the mass ratio and the width
// each head settled on, and the sample after which no width changed.
#ifndef ICECACHE_TESTS_BENCH_MONITOR_BENCH_H_
#define ICECACHE_TESTS_BENCH_MONITOR_BENCH_H_

#include <string>

#include "absl/status/status.h"
#include "common/cli.h"

namespace icecache::bench {

struct MonitorBenchOptions {
  std::string preset = "llama3-8b-like";
  std::string family = "baseline";
  int64_t tokens = 32768;
  int kv_heads = 4;
  int steps = 1024;
  int budget = 256;
  int page_tokens = 16;
  double target = 0.95;
  double cpu_share = 0.05;
  int sample_every = 64;
  int warmup = 16;
  int burst_ms = 250;
  uint64_t seed = 7;
  bool json = false;
};

// Registers the flags of `icecache-bench monitor` on `app`.
void AddMonitorFlags(CLI::App* app, MonitorBenchOptions* options);
// InvalidArgument for bad options; the core's errors otherwise.
absl::Status RunMonitorBench(const MonitorBenchOptions& options);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_MONITOR_BENCH_H_
