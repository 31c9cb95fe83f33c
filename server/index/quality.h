// Quality of a selection against exact attention (docs/architecture.md §3.5), for one KV
// head and its G query heads. One implementation shared by the unit tests,
// the benchmarks and the daemon's self-checks.
//
//   ExactAttention ex = ComputeExactAttention(keys, values, n, d, queries, G);
//   QualityReport r = EvaluateSelection(ex, values, selector, selection, budget);
//
// Definitions (each averaged over the G queries):
//  - logits l_ij = q_j . k_i / sqrt(d); p_ij = softmax over i of l_ij;
//  - top-k recall: |S intersect top-k(q_j)| / k, k = min(budget, n); the exact
//    top-k breaks ties towards the lower position;
//  - mass recall: sum over i in S of p_ij (1.0 = all attention mass);
//  - output relative error: |o_S - o| / |o| with o = sum_i p_ij v_i and
//    o_S = sum_{i in S} p_ij v_i / sum_{i in S} p_ij (attention renormalised
//    over S); o_S = 0 for an empty S; when |o| == 0 the absolute error is used.
// S is a set: duplicate positions count once.
//
// Logits use the SIMD fp32 kernels (DotRowsMulti); softmax, sums and outputs
// accumulate in double. All functions are pure and thread-safe.
#ifndef ICECACHE_SERVER_INDEX_QUALITY_H_
#define ICECACHE_SERVER_INDEX_QUALITY_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "server/index/selector.h"

namespace icecache {

struct ExactAttention {
  int64_t n = 0;
  int head_dim = 0;
  int num_queries = 0;
  std::vector<float> logits;   // G x n, scaled by 1/sqrt(head_dim)
  std::vector<double> probs;   // G x n, softmax of each row
  std::vector<double> output;  // G x head_dim exact outputs; empty without values
};

struct QualityReport {
  double topk_recall = 0.0;
  double mass_recall = 0.0;
  double output_rel_error = 0.0;  // NaN when no values were given
  int64_t selected_tokens = 0;    // distinct positions in S
};

// keys, values: n x head_dim fp32 (values may be null); queries: G x head_dim.
// InvalidArgument for null keys/queries, n < 1, head_dim < 1, G < 1, or a
// non-finite key, value or query (the message names the row).
absl::StatusOr<ExactAttention> ComputeExactAttention(const float* keys, const float* values,
                                                     int64_t n, int head_dim, const float* queries,
                                                     int num_queries);

// InvalidArgument for a position outside [0, n) or k < 1.
absl::StatusOr<double> TopKRecall(const ExactAttention& exact, absl::Span<const int32_t> selected,
                                  int64_t k);
// InvalidArgument for a position outside [0, n).
absl::StatusOr<double> MassRecall(const ExactAttention& exact, absl::Span<const int32_t> selected);
// `values` are the same n x head_dim values the exact outputs came from.
// FailedPrecondition when `exact` was computed without values; InvalidArgument
// for null values or a position outside [0, n).
absl::StatusOr<double> OutputRelError(const ExactAttention& exact, const float* values,
                                      absl::Span<const int32_t> selected);

// The exact-token oracle ("TOP-k" of the paper, kExactToken): positions
// [0, min(sink_tokens, budget, n)) first, then the other tokens by descending
// sum over queries of p_ij (ties to the lower position) until `budget` tokens
// are taken: the set of `budget` tokens (sinks given) with the most mass
// recall, the measure above (the max over queries would let one query
// decide for the group). Returned ascending. InvalidArgument for budget outside [1, n] or
// sink_tokens < 0.
absl::StatusOr<std::vector<int32_t>> OracleTokens(const ExactAttention& exact, int64_t budget,
                                                  int sink_tokens);

// The page oracle on `selector`'s layout: the best whole pages by their true
// attention mass (sum over the page's tokens of p_ij, averaged over the
// queries), forced sink/recent pages first, then pages until
// params.budget_tokens is filled (TakePages). The upper bound of what any
// selector can reach on that layout at that budget (docs/architecture.md §3.5). Scores
// are the page masses; keys_touched is 0. `exact` must cover every token of
// the selector. InvalidArgument for bad params (as Selector::Select) or a
// token count mismatch.
absl::StatusOr<Selection> OraclePages(const ExactAttention& exact, const Selector& selector,
                                      const SelectParams& params);

// All three measures of a position set; k is the top-k recall's k (normally
// the budget). output_rel_error is NaN when `values` is null.
absl::StatusOr<QualityReport> EvaluatePositions(const ExactAttention& exact, const float* values,
                                                absl::Span<const int32_t> selected, int64_t k);
// Same for a Selection: its positions when it carries them, else the
// positions of its pages read from `selector` (which must be the selector that
// produced it, unchanged since). InvalidArgument for a page the selector does
// not have or a Selection whose positions do not match its fills.
absl::StatusOr<QualityReport> EvaluateSelection(const ExactAttention& exact, const float* values,
                                                const Selector& selector,
                                                const Selection& selection, int64_t k);

// Positions of a Selection (as EvaluateSelection reads them).
absl::StatusOr<std::vector<int32_t>> SelectionPositions(const Selector& selector,
                                                        const Selection& selection);

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_QUALITY_H_
