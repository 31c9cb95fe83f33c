// The attention `icecache-bench decode` computes on the CPU, as the stand-in
// for the GPU's, with fp32 logits and fp32 accumulation over fp16 K/V rows
// (docs/architecture.md §10), and the quality measures against full
// attention (the definitions of docs/architecture.md §3.5):
//  - mass recall of a token set S: sum over i in S of softmax(q.k_i/sqrt(d))
//    over ALL tokens, averaged over the G query heads of the KV head;
//  - output relative error: |o_S - o| / |o|, o_S the attention over S alone
//    (renormalised), averaged over the G query heads.
// Pure functions over caller buffers; thread-safe; `Scratch` is per thread.
#ifndef ICECACHE_TESTS_BENCH_DECODE_ATTENTION_H_
#define ICECACHE_TESTS_BENCH_DECODE_ATTENTION_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"

namespace icecache::bench {

struct AttentionScratch {
  std::vector<float> logits, row;
};

// Full attention of G queries (G x d) over `n` fp16 rows of keys and values
// (n x d each). Writes the outputs (G x d) and each query's log-sum-exp of
// its scaled logits (G), the reference that MassRecall needs. With
// `top_tokens` > 0, also the exact-token oracle: positions [0, sinks) then
// the tokens of highest max-over-queries probability, `top_tokens` in all,
// ascending, into *oracle.
void FullAttention(const uint16_t* keys, const uint16_t* values, int64_t n, int d,
                   const float* queries, int g, float* out, float* lse, int top_tokens, int sinks,
                   std::vector<int32_t>* oracle, AttentionScratch* scratch);

// Attention of G queries over `rows` (pointers to fp16 K rows and V rows, d
// each): the output (G x d), renormalised over these rows.
void RowsAttention(absl::Span<const uint16_t* const> k_rows,
                   absl::Span<const uint16_t* const> v_rows, int d, const float* queries, int g,
                   float* out, AttentionScratch* scratch);

// Mass recall of `positions` (distinct) against the reference log-sum-exp:
// the mean over the G queries of sum_i exp(q.k_i/sqrt(d) - lse).
double MassRecall(const uint16_t* keys, int d, absl::Span<const int32_t> positions,
                  const float* queries, int g, const float* lse, AttentionScratch* scratch);

// Mean over the G queries of |out - ref| / |ref| (absolute error when |ref|
// is 0).
double OutputRelError(const float* out, const float* ref, int g, int d);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_DECODE_ATTENTION_H_
