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

// Per-thread buffers, sized once and reused.
struct TokenScratch {
  std::vector<RankedToken> scored;
  std::vector<float> shifted;  // one query's logits of a page, scaled and normalised
  std::vector<float> share;    // the page's token scores
};

TokenScratch& ThreadTokenScratch() {
  thread_local TokenScratch scratch;
  return scratch;
}

// Higher score first; ties to the lower position (deterministic).
bool RankedBetter(const RankedToken& a, const RankedToken& b) {
  return a.score > b.score || (a.score == b.score && a.position < b.position);
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
    const float* logits = c.logits.data() + c.offsets[i];
    s->share.assign(fill, 0.0f);
    s->shifted.resize(fill);
    for (int j = 0; j < num_queries; ++j) {
      // AddExp computes exp(x - shift): pass the scaled logits and the norm.
      const float* row = logits + static_cast<size_t>(j) * fill;
      for (uint32_t t = 0; t < fill; ++t) s->shifted[t] = row[t] * scale;
      AddExp(s->shifted.data(), log_norm[j], fill, s->share.data());
    }
    const int32_t* pos = selector.positions(page);
    for (uint32_t t = 0; t < fill; ++t) {
      if (pos[t] < sink_end || pos[t] >= recent_begin) continue;  // forced
      const float score = std::isnan(s->share[t]) ? 0.0f : s->share[t];
      s->scored.push_back({score, pos[t], Placement{page, t}});
    }
  }
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
  out->pages.clear();
  out->scores.clear();
  out->positions.clear();
  out->token_refs.clear();
  const int64_t n = selector.num_tokens();
  const int64_t sink_end = std::min<int64_t>(std::max(0, params.sink_tokens), n);
  const int64_t recent_begin = std::max<int64_t>(sink_end, n - std::max(0, params.recent_tokens));
  auto add = [&](int32_t position, Placement placement, float score) {
    out->token_refs.push_back(placement);
    out->positions.push_back(position);
    out->scores.push_back(score);
  };
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t p = 0; p < sink_end; ++p) {
    add(static_cast<int32_t>(p), selector.placement_of(static_cast<int32_t>(p)), inf);
  }
  for (int64_t p = recent_begin; p < n; ++p) {
    add(static_cast<int32_t>(p), selector.placement_of(static_cast<int32_t>(p)), inf);
  }
  TokenScratch& s = ThreadTokenScratch();
  ScoreCandidates(selector, candidates, log_norm, num_queries, scale, sink_end, recent_begin, &s);
  const int64_t budget = std::min<int64_t>(params.budget_tokens, n);
  const size_t want = static_cast<size_t>(
      std::min<int64_t>(std::max<int64_t>(0, budget - static_cast<int64_t>(out->token_refs.size())),
                        static_cast<int64_t>(s.scored.size())));
  // Candidate pages are distinct, so their tokens are too, and RankedBetter is a
  // strict total order: the best `want` by a linear selection, then only
  // they sorted. The same tokens in the same order as a partial_sort, whose
  // heap over every candidate (candidate_factor x budget of them, more at a
  // calibrated width) cost most of a token selection (docs/bench/sel8_decode.md).
  const auto better = [](const RankedToken& a, const RankedToken& b) { return RankedBetter(a, b); };
  const auto head = s.scored.begin() + static_cast<std::ptrdiff_t>(want);
  if (want < s.scored.size()) std::nth_element(s.scored.begin(), head, s.scored.end(), better);
  std::sort(s.scored.begin(), head, better);
  for (size_t i = 0; i < want; ++i)
    add(s.scored[i].position, s.scored[i].placement, s.scored[i].score);
  PackedFills(static_cast<int64_t>(out->token_refs.size()), selector.config().page_tokens,
              &out->fills);
}

}  // namespace icecache
