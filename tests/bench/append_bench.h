// `icecache-bench append`: the cost of decode appends as the daemon does
// them (docs/architecture.md §5). An in-process SessionManager over a real
// pool holds one session per selector, prefilled to --tokens by layer
// ranges; then --steps appends of one token each (every layer and KV head of
// the model in one AppendKv call, as an inference server sends them) are
// timed one by one. Reported per selector, side by side: the prefill, the
// first append after it, p50/p99/max of the others, and the same divided by
// the (layer, head) count ("per head"); then the steps split by cause (those
// that carved a pool slab, whose memory is faulted in unless the prefault
// thread got there first, and the others), the pages the indexes opened per
// step, and the slowest steps with their positions. With --evict-mib the
// caches are flushed between steps (the trees cold, as in a real decode).
#ifndef ICECACHE_TESTS_BENCH_APPEND_BENCH_H_
#define ICECACHE_TESTS_BENCH_APPEND_BENCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace CLI {
class App;
}  // namespace CLI

namespace icecache::bench {

struct AppendBenchOptions {
  int64_t tokens = 131072;  // prefill context
  int layers = 2;
  int kv_heads = 8;
  int q_heads = 32;
  int head_dim = 128;
  int page_tokens = 16;
  int steps = 1000;  // timed 1-token appends
  std::vector<std::string> selectors = {"mdci", "exact"};
  int build_threads = 2;
  // Threads of a decode append's index inserts and row writes (the decode
  // lanes); 0: all cores, as the daemon.
  int decode_threads = 0;
  uint64_t seed = 1;
  int slowest = 12;  // slowest steps listed with their positions
  // > 0: between steps, write this many MiB of another buffer, untimed, so
  // each append finds its trees out of cache, as in a decode where the
  // selections of 32 layers run between two appends; 0: warm appends.
  int evict_mib = 0;
  // >= 0: MdciParams::insert_route_fov of the sessions (nodes kept per
  // routing level by a decode insert; 0 = route_fov); -1: the default.
  int insert_route_fov = -1;
  // >= 0: MdciParams::insert_fit of the sessions (a decode key that fits a
  // recent node with room joins it unrouted; 0: every key routed); -1: the
  // default.
  float insert_fit = -1.0f;
  // The KV rows: "topics" (TopicSource: the routing structure alone) or a
  // synthetic preset name (the realistic generator).
  std::string keys = "topics";
  // >= 0: MdciParams::pq_factor of the mdci sessions (0: the tree only, the
  // core's default); -1: the daemon's default for the shape (the PQ codes
  // written on every insert, as a session created over gRPC has them).
  float mdci_pq = -1.0f;
  std::string json;  // report file; empty: none
};

// Registers the flags of `icecache-bench append` on `app` and holds their
// values. Holds pointers into itself: neither copyable nor movable.
class AppendFlags {
 public:
  explicit AppendFlags(CLI::App* app);
  AppendFlags(const AppendFlags&) = delete;
  AppendFlags& operator=(const AppendFlags&) = delete;
  const AppendBenchOptions& options() const { return o_; }

 private:
  AppendBenchOptions o_;
};

// Runs the benchmark, prints the table (stdout) and writes the JSON report.
// InvalidArgument for an unknown selector or bad shape; RESOURCE_EXHAUSTED
// when the pool cannot be mapped; any status of the session calls.
absl::Status RunAppendBench(const AppendBenchOptions& options);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_APPEND_BENCH_H_
