// `icecache-bench decode --rpc-overhead`: the cost of carrying one DecodeStep
// layer message to the daemon and back, over the in-process cost of the
// same work (docs/architecture.md §8.1, §10.1).
//
// Like for like: three sessions with the same KV (the model's prefill, fully
// indexed, nothing appended afterwards) and the same selector: one in a
// daemon reached through the shared-memory ring, one in the same daemon
// reached through the gRPC DecodeStep stream (a second client with
// ClientOptions.decode_ring off), one in an in-process SessionManager (the
// core call the daemon's handler makes, no RPC). Every (step, layer)
// message goes to all three, one after another, in an order that rotates
// message by message, so load and cache state are shared alike. Reported per
// transport: p50/p99 of the message latency and of the paired difference
// against in-process (same step and layer); the load average at start and
// end.
#ifndef ICECACHE_TESTS_BENCH_DECODE_RPC_OVERHEAD_H_
#define ICECACHE_TESTS_BENCH_DECODE_RPC_OVERHEAD_H_

#include "absl/status/status.h"
#include "tests/bench/decode_bench.h"

namespace icecache::bench {

// Socket mode only (InvalidArgument otherwise). Every selector policy of
// `options` in turn ("full" and "exact-token" are skipped); layer reuse is
// ignored (every layer selects). Errors of the backends and of --json.
absl::Status RunRpcOverhead(const DecodeBenchOptions& options);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_DECODE_RPC_OVERHEAD_H_
