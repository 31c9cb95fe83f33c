#include "server/index/token_select.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <utility>

#include "server/index/page_select.h"

namespace icecache {
namespace {

struct RankedToken {
  float score;
  int32_t position;
  Placement placement;
};

// An `asm` prefetch, not __builtin_prefetch: GCC 12 may take a function
// whose only effect is that builtin for one without effects and delete its
// calls (docs/architecture.md §3.4).
inline void PrefetchLine(const void* p) {
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
}

// Per-thread buffers, sized once and reused.
struct TokenScratch {
  std::vector<RankedToken> scored;
  std::vector<float> shifted;  // one query's logits of a page, scaled and normalised
  std::vector<float> share;    // the page's token scores
  std::vector<std::pair<float, uint32_t>> order;  // (bound, candidate) best first
};

TokenScratch& ThreadTokenScratch() {
  thread_local TokenScratch scratch;
  return scratch;
}

// Higher score first; ties to the lower position (deterministic). A lambda,
// so the standard algorithms inline it (a function's pointer they call).
constexpr auto RankedBetter = [](const RankedToken& a, const RankedToken& b) {
  return a.score > b.score || (a.score == b.score && a.position < b.position);
};

// One page's token scores into s->share[0, fill) from its G x fill logits.
void PageShares(const float* logits, uint32_t fill, const float* log_norm, int num_queries,
                float scale, TokenScratch* s) {
  s->share.assign(fill, 0.0f);
  s->shifted.resize(fill);
  for (int j = 0; j < num_queries; ++j) {
    // AddExp computes exp(x - shift): pass the scaled logits and the norm.
    const float* row = logits + static_cast<size_t>(j) * fill;
    for (uint32_t t = 0; t < fill; ++t) s->shifted[t] = row[t] * scale;
    AddExp(s->shifted.data(), log_norm[j], fill, s->share.data());
  }
}

// Scores the tokens of every candidate page that is not forced into `scored`.
void ScoreCandidates(const Selector& selector, const TokenCandidates& c, const float* log_norm,
                     int num_queries, float scale, int64_t sink_end, int64_t recent_begin,
                     TokenScratch* s) {
  s->scored.clear();
  for (size_t i = 0; i < c.pages.size(); ++i) {
    const uint32_t page = c.pages[i];
    const uint32_t fill = selector.fill(page);
    if (fill == 0) continue;
    PageShares(c.logits.data() + c.offsets[i], fill, log_norm, num_queries, scale, s);
    const int32_t* pos = selector.positions(page);
    for (uint32_t t = 0; t < fill; ++t) {
      if (pos[t] < sink_end || pos[t] >= recent_begin) continue;  // forced
      const float score = std::isnan(s->share[t]) ? 0.0f : s->share[t];
      s->scored.push_back({score, pos[t], Placement{page, t}});
    }
  }
}

// The forced range [0, sink_end) and [recent_begin, n) of `params`, and the
// forced tokens added to `out` (cleared first).
struct Forced {
  int64_t sink_end = 0;
  int64_t recent_begin = 0;
};
Forced AddForced(const Selector& selector, const SelectParams& params, Selection* out) {
  out->pages.clear();
  out->scores.clear();
  out->positions.clear();
  out->token_refs.clear();
  const int64_t n = selector.num_tokens();
  Forced f;
  f.sink_end = std::min<int64_t>(std::max(0, params.sink_tokens), n);
  f.recent_begin = std::max<int64_t>(f.sink_end, n - std::max(0, params.recent_tokens));
  const float inf = std::numeric_limits<float>::infinity();
  auto add = [&](int64_t p) {
    out->token_refs.push_back(selector.placement_of(static_cast<int32_t>(p)));
    out->positions.push_back(static_cast<int32_t>(p));
    out->scores.push_back(inf);
  };
  for (int64_t p = 0; p < f.sink_end; ++p) add(p);
  for (int64_t p = f.recent_begin; p < n; ++p) add(p);
  return f;
}

// Budget left after the forced tokens.
size_t Wanted(const Selector& selector, const SelectParams& params, const Selection& out) {
  const int64_t budget = std::min<int64_t>(params.budget_tokens, selector.num_tokens());
  return static_cast<size_t>(
      std::max<int64_t>(0, budget - static_cast<int64_t>(out.token_refs.size())));
}

// Appends the best min(want, held) of s->scored to `out`, best first, and
// packs the fills. Candidate pages are distinct, so their tokens are too, and
// RankedBetter is a strict total order: the best by a linear selection, then
// only they sorted. The same tokens in the same order as a partial_sort,
// whose heap over every candidate (candidate_factor x budget of them, more
// at a calibrated width) cost most of a token selection
// (docs/bench/sel8_decode.md).
void TakeBestTokens(const Selector& selector, size_t want, TokenScratch* s, Selection* out) {
  const size_t take = std::min(want, s->scored.size());
  const auto head = s->scored.begin() + static_cast<std::ptrdiff_t>(take);
  if (take < s->scored.size())
    std::nth_element(s->scored.begin(), head, s->scored.end(), RankedBetter);
  std::sort(s->scored.begin(), head, RankedBetter);
  for (size_t i = 0; i < take; ++i) {
    out->token_refs.push_back(s->scored[i].placement);
    out->positions.push_back(s->scored[i].position);
    out->scores.push_back(s->scored[i].score);
  }
  PackedFills(static_cast<int64_t>(out->token_refs.size()), selector.config().page_tokens,
              &out->fills);
}

}  // namespace

void PackedFills(int64_t n, int page_tokens, std::vector<uint32_t>* fills) {
  fills->clear();
  const int64_t t = std::max(1, page_tokens);
  for (int64_t done = 0; done < n; done += t) {
    fills->push_back(static_cast<uint32_t>(std::min(t, n - done)));
  }
}

void TakeTokens(const Selector& selector, const TokenCandidates& candidates, const float* log_norm,
                int num_queries, float scale, const SelectParams& params, Selection* out) {
  const Forced f = AddForced(selector, params, out);
  TokenScratch& s = ThreadTokenScratch();
  ScoreCandidates(selector, candidates, log_norm, num_queries, scale, f.sink_end, f.recent_begin,
                  &s);
  TakeBestTokens(selector, Wanted(selector, params, *out), &s, out);
}

void TakeTokensBounded(const Selector& selector, const TokenCandidates& candidates,
                       const float* bound, const float* log_norm, int num_queries, float scale,
                       const SelectParams& params, Selection* out) {
  const Forced f = AddForced(selector, params, out);
  TokenScratch& s = ThreadTokenScratch();
  const size_t want = Wanted(selector, params, *out);
  // Best bound first; a NaN bound sorts first and is always opened.
  s.order.clear();
  for (size_t i = 0; i < candidates.pages.size(); ++i) {
    const float b = std::isnan(bound[i]) ? std::numeric_limits<float>::infinity() : bound[i];
    s.order.push_back({b, static_cast<uint32_t>(i)});
  }
  std::sort(s.order.begin(), s.order.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  // Each opened page's positions are one cache line that nothing read
  // before (the frames were scored, not the page table): asked for all at
  // once, in the order they are opened, so the misses overlap instead of
  // one per page in turn (60% of this function's time in BM_SelectCold
  // before). Pages the cutoff leaves closed cost one prefetch each.
  for (const auto& o : s.order) {
    if (want == 0) break;
    PrefetchLine(selector.positions(candidates.pages[o.second]));
  }
  // The candidates' tokens are gathered as TakeTokens gathers them, but a
  // token under `cutoff` (the want-th best held at the last compaction: the
  // final want-th best is at least as good) is dropped, and once a cutoff is
  // known a page whose bound is under it is not opened, nor is any after it.
  // Strictly under: a tie may still win on position.
  s.scored.clear();
  bool have_cutoff = false;
  float cutoff = -std::numeric_limits<float>::infinity();
  for (const auto& [page_bound, i] : s.order) {
    if (want == 0) break;  // the forced tokens fill the budget
    // Rounding: AddExp's exponential and the bound's differ by far less
    // than 1%, so a token never outscores 1.01 x its page's bound.
    if (have_cutoff && page_bound * 1.01f < cutoff) break;
    const uint32_t page = candidates.pages[i];
    const uint32_t fill = selector.fill(page);
    if (fill == 0) continue;
    PageShares(candidates.logits.data() + candidates.offsets[i], fill, log_norm, num_queries, scale,
               &s);
    const int32_t* pos = selector.positions(page);
    for (uint32_t t = 0; t < fill; ++t) {
      if (pos[t] < f.sink_end || pos[t] >= f.recent_begin) continue;  // forced
      const float score = std::isnan(s.share[t]) ? 0.0f : s.share[t];
      if (score < cutoff) continue;
      s.scored.push_back({score, pos[t], Placement{page, t}});
    }
    // Compact to the best `want` when a cutoff is first possible, then each
    // time the held tokens double: linear work in all.
    if (s.scored.size() >= (have_cutoff ? 2 * want : want)) {
      const auto last = s.scored.begin() + static_cast<std::ptrdiff_t>(want - 1);
      std::nth_element(s.scored.begin(), last, s.scored.end(), RankedBetter);
      s.scored.resize(want);
      cutoff = last->score;
      have_cutoff = true;
    }
  }
  TakeBestTokens(selector, want, &s, out);
}

}  // namespace icecache
