// Common tail of every selector: forced pages (sinks, recent), then pages in
// descending score until the token budget is filled; and the page score of a
// block of exact logits. Shared so every selector fills the budget the same way.
#ifndef ICECACHE_SERVER_INDEX_PAGE_SELECT_H_
#define ICECACHE_SERVER_INDEX_PAGE_SELECT_H_

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "server/index/selector.h"

namespace icecache {

// Page score from exact logits of one page for G queries: logits is G x fill,
// row j for query j. Score = max over queries of log(sum_i exp(logit_ij *
// scale)) (log of the page's unnormalised attention mass), computed stably.
float PageMassScore(const float* logits, int num_queries, int fill, int stride, float scale);

// Per-query log-mass of one page: out[j] = log(sum_i exp(logit_ij * scale)),
// logits G x fill with row stride `stride`; -inf for an empty page.
void PageQueryLogMass(const float* logits, int num_queries, int fill, int stride, float scale,
                      float* out);

// acc[i] += exp(min(x[i] - shift, 80)) for i < n (vectorised; terms below
// exp(-87) count as ~1e-38).
void AddExp(const float* x, float shift, size_t n, float* acc);

// Each token's group share of one page, share[t] for t < fill: the sum over
// the G queries of exp(min(logits[j x fill + t] x scale - log_norm[j], 80)),
// from the page's G x fill unscaled logits (row j for query j). The bits of
// AddExp over the scaled rows, query after query, from a zeroed `share`; in
// registers, one pass over the logits.
void TokenShares(const float* logits, uint32_t fill, const float* log_norm, int num_queries,
                 float scale, float* share);

// log(sum_i exp(x[i])) over n values, computed stably; -inf for n == 0.
float LogSumExp(const float* x, size_t n);

// GQA page scores (docs/architecture.md, selection). A page's score is what
// the group gains from it: the sum over the G queries of each query's softmax
// share of the page, kept as a log so it orders like a mass:
//   score = log(sum_j exp(page_lse[j] - log_norm[j]))
// with page_lse[j] the page's log-mass for query j (PageQueryLogMass) and
// log_norm[j] query j's log-normaliser (the log of its mass over all keys).
// Unlike the max over queries of the unnormalised log-mass, a query with
// large logits does not decide for the whole group.
float GroupPageScore(const float* page_lse, const float* log_norm, int num_queries);

// log_norm[j] = log(sum_p exp(page_lse[p * G + j]) + exp(rest[j])) over
// `num_pages` rows of G log-masses: each query's log-normaliser from the
// pages scored plus `rest` (the log of the mass outside them; null = none).
void QueryLogNorms(const float* page_lse, size_t num_pages, int num_queries, const float* rest,
                   float* log_norm);

// Pages that hold positions [0, sink_tokens) and the last `recent_tokens`
// positions (num_tokens known to the selector), deduplicated, ascending.
// `page_of_position` maps a position to its page.
template <typename PageOf>
std::vector<uint32_t> ForcedPages(int64_t num_tokens, const SelectParams& params,
                                  PageOf page_of_position);

// Fills `out`: forced pages first (score +inf), then `scored` (score, page)
// in descending score order, skipping forced pages, until the selected
// fills sum to >= budget_tokens or no page is left (the last page may cross
// the budget by fewer than page_tokens tokens). Positions are appended when
// params.want_positions. `forced` must be sorted ascending (as ForcedPages
// returns it); `scored` is reordered (its head gets sorted). out->pages,
// fills, scores and positions are replaced; out->keys_touched is left as is
// (it is the caller's cost count). Ties in score go to the lower page id.
void TakePages(const Selector& selector, const std::vector<uint32_t>& forced,
               std::vector<std::pair<float, uint32_t>>* scored, const SelectParams& params,
               Selection* out);

// Argument checks shared by every selector, so they all answer bad input with
// the same codes (selector.h):
// InvalidArgument for null keys/placements, n <= 0, a non-finite value (the
// message names the row and column), or more than 2^31-1 tokens in total.
// `scan` false skips the NaN/Inf scan (Selector::keys_prechecked).
absl::Status ValidateKeysToAdd(const float* keys, int64_t n, int head_dim, int64_t num_tokens,
                               const std::vector<Placement>* placements, bool scan = true);
// InvalidArgument for null queries/out, num_queries < 1, budget <= 0,
// negative sink/recent, budget > num_tokens, non-finite queries (names the
// row); FailedPrecondition when the index is empty.
absl::Status ValidateSelect(const Selector& selector, const float* queries, int num_queries,
                            const SelectParams& params, const Selection* out);
// InvalidArgument naming `what`, the row and the column of the first NaN/Inf
// among `rows` x `dim` values.
absl::Status CheckFinite(const float* data, int64_t rows, int dim, const char* what);

// --- implementation of the template ---
template <typename PageOf>
std::vector<uint32_t> ForcedPages(int64_t num_tokens, const SelectParams& params,
                                  PageOf page_of_position) {
  std::vector<uint32_t> pages;
  const int64_t sink_end = params.sink_tokens < num_tokens ? params.sink_tokens : num_tokens;
  for (int64_t p = 0; p < sink_end; ++p) pages.push_back(page_of_position(p));
  int64_t recent_begin = num_tokens - params.recent_tokens;
  if (recent_begin < 0) recent_begin = 0;
  for (int64_t p = recent_begin; p < num_tokens && params.recent_tokens > 0; ++p) {
    pages.push_back(page_of_position(p));
  }
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  return pages;
}

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_PAGE_SELECT_H_
