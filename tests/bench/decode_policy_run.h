// One policy of `icecache-bench decode` on one context: the prefill, the
// decode steps with their split, the quality per layer (decode_bench.h
// describes the method). Internal to the benchmark.
#ifndef ICECACHE_TESTS_BENCH_DECODE_POLICY_RUN_H_
#define ICECACHE_TESTS_BENCH_DECODE_POLICY_RUN_H_

#include <string>

#include "absl/status/statusor.h"
#include "tests/bench/decode_backend.h"
#include "tests/bench/decode_model.h"
#include "tests/bench/decode_reference.h"
#include "tests/bench/decode_results.h"

namespace icecache::bench {

// What every policy of a context shares.
struct DecodeContext {
  const DecodeBenchOptions* options = nullptr;
  const DecodeModel* model = nullptr;
  const DecodeReference* reference = nullptr;
  DecodeBackend* main = nullptr;       // the measured daemon (socket or in-process)
  DecodeBackend* companion = nullptr;  // in-process, the first reference_layers layers
  int reference_layers = 0;
  double scale = 1.0;  // options.layers / model layers
  // Bytes of one layer's pages in an output buffer (every head's worst case).
  size_t layer_output_bytes = 0;
  // "+ip" policies: each layer's own region (a token selection's rows of
  // every head; budget + sink + recent tokens per head).
  size_t in_place_region_bytes = 0;
};

// "full" and "exact-token": attention on the CPU only, from the reference.
PolicyResult RunCpuPolicy(const DecodeContext& ctx, const DecodePolicy& policy);
// A selector policy through the daemon.
absl::StatusOr<PolicyResult> RunSelectorPolicy(const DecodeContext& ctx,
                                               const DecodePolicy& policy);
// Batched decode of `options.batch_policy` for each batch size.
absl::StatusOr<std::vector<BatchResult>> RunBatches(const DecodeContext& ctx, int layers);

// A progress line on stderr ("\r<label> [#####     ] done/total extra").
class ProgressLine {
 public:
  ProgressLine(bool on, std::string label, int total);
  ~ProgressLine();
  void Set(int done, const std::string& extra = "");

 private:
  bool on_;
  std::string label_;
  int total_;
};

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_DECODE_POLICY_RUN_H_
