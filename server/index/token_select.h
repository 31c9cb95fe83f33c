// Token-granular selection (docs/architecture.md §3.6): the common tail of
// every selector at Granularity::kToken. The selector finds candidate pages
// (the descent, a bound, or every page) and their exact logits; the budget is
// then filled with the best candidate tokens by their group score
//   score_i = sum over the G queries of exp(logit_ij * scale - log_norm_j)
// (each query's softmax share of token i, the token-level GroupPageScore),
// after the forced tokens (positions [0, sink) and the last `recent`).
//
// Thread safety: TakeTokens uses per-thread scratch; reentrant.
#ifndef ICECACHE_SERVER_INDEX_TOKEN_SELECT_H_
#define ICECACHE_SERVER_INDEX_TOKEN_SELECT_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "server/index/selector.h"

namespace icecache {

// Candidate pages and their exact logits: page i's G x fill(page) logits
// (row j for query j, row stride fill, unscaled dot products) start at
// logits[offsets[i]]. Owned by the caller (per-thread scratch), reused.
struct TokenCandidates {
  std::vector<uint32_t> pages;
  std::vector<size_t> offsets;
  std::vector<float> logits;
  void Clear() {
    pages.clear();
    offsets.clear();
    logits.clear();
  }
  // Appends room for `page`'s G x fill logits and returns where they go.
  float* Add(uint32_t page, int num_queries, uint32_t fill) {
    pages.push_back(page);
    offsets.push_back(logits.size());
    logits.resize(logits.size() + static_cast<size_t>(num_queries) * fill);
    return logits.data() + offsets.back();
  }
};

// Fills `out` at token granularity (selector.h's Selection): the forced
// tokens, then the best candidate tokens by score (ties to the lower
// position) until min(budget, num_tokens) tokens are taken or the
// candidates run out; candidate tokens that are forced are not taken twice.
// `log_norm` holds each query's log-normaliser (as for GroupPageScore);
// `scale` multiplies the logits. out->keys_touched is left as is.
void TakeTokens(const Selector& selector, const TokenCandidates& candidates, const float* log_norm,
                int num_queries, float scale, const SelectParams& params, Selection* out);

// The same selection as TakeTokens (the same tokens, scores and order) from
// the same candidates, without scoring every candidate's tokens. `bound[i]`
// bounds the score of every token of candidates.pages[i] from above: the sum
// over the queries of exp(its largest scaled logit - log_norm[j]), or looser
// (its group share, exp(GroupPageScore)); a NaN bound is always opened.
// Pages are opened best bound first; once `budget` tokens are held, a token
// under the worst of them is dropped, and a page whose bound (with a 1%
// margin for the exponentials' rounding) is under it is not opened, nor is
// any after it. An exact selection (every page a candidate) opens about one
// page in nine (docs/bench/token11_bound.md).
void TakeTokensBounded(const Selector& selector, const TokenCandidates& candidates,
                       const float* bound, const float* log_norm, int num_queries, float scale,
                       const SelectParams& params, Selection* out);

// Packs `n` tokens into slots of `page_tokens`: fills of ceil(n / page_tokens)
// slots, all full but the last.
void PackedFills(int64_t n, int page_tokens, std::vector<uint32_t>* fills);

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_TOKEN_SELECT_H_
