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
absl::Status ValidateKeysToAdd(const float* keys, int64_t n, int head_dim, int64_t num_tokens,
                               const std::vector<Placement>* placements);
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
