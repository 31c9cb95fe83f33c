#include "server/index/positional_selector.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/headroom.h"
#include "server/index/kernels.h"
#include "server/index/page_select.h"
#include "server/index/token_select.h"

namespace icecache {
namespace {

// Quest bound of one page for NQ queries: max over queries of
// sum_i max(q_i * min_i, q_i * max_i). Each 8-lane chunk of the min and max
// rows is loaded once for the NQ queries (one accumulator per query).
template <int NQ>
float QuestBoundBlock(const float* mn, const float* mx, const float* queries, int dim) {
  __m256 acc[NQ];
#pragma GCC unroll 8
  for (int j = 0; j < NQ; ++j) acc[j] = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= dim; i += 8) {
    const __m256 lo = _mm256_loadu_ps(mn + i);
    const __m256 hi = _mm256_loadu_ps(mx + i);
#pragma GCC unroll 8
    for (int j = 0; j < NQ; ++j) {
      const __m256 q = _mm256_loadu_ps(queries + j * dim + i);
      acc[j] = _mm256_add_ps(acc[j], _mm256_max_ps(_mm256_mul_ps(q, lo), _mm256_mul_ps(q, hi)));
    }
  }
  float best = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < NQ; ++j) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[j]);
    float s = 0.0f;
    for (float l : lanes) s += l;
    const float* q = queries + j * dim;
    for (int t = i; t < dim; ++t) s += std::max(q[t] * mn[t], q[t] * mx[t]);
    best = std::max(best, s);
  }
  return best;
}

float QuestBound(const float* mn, const float* mx, const float* queries, int nq, int dim) {
  float best = -std::numeric_limits<float>::infinity();
  for (int j0 = 0; j0 < nq; j0 += 4) {
    const float* qb = queries + static_cast<int64_t>(j0) * dim;
    float b;
    switch (std::min(4, nq - j0)) {
      case 1:
        b = QuestBoundBlock<1>(mn, mx, qb, dim);
        break;
      case 2:
        b = QuestBoundBlock<2>(mn, mx, qb, dim);
        break;
      case 3:
        b = QuestBoundBlock<3>(mn, mx, qb, dim);
        break;
      default:
        b = QuestBoundBlock<4>(mn, mx, qb, dim);
        break;
    }
    best = std::max(best, b);
  }
  return best;
}

// Per-thread scratch reused across Select() calls, so a selection allocates
// nothing once a thread has served one of the same size (Select() is const
// and runs concurrently; each thread has its own buffers).
struct Scratch {
  std::vector<std::pair<float, uint32_t>> scored;
  std::vector<std::pair<float, uint32_t>> ranked;
  std::vector<float> logits;
  std::vector<float> lse;       // G per page: the page's log-mass per query (kExact)
  std::vector<float> log_norm;  // G: each query's log-normaliser (kExact)
  TokenCandidates tokens;       // token granularity: candidate pages' logits
};
Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

class PositionalSelector final : public Selector {
 public:
  PositionalSelector(const SelectorConfig& config, const PageKeys* keys)
      : Selector(config),
        keys_(keys),
        page_tokens_(config.page_tokens),
        dim_(config.head_dim),
        scale_(1.0f / std::sqrt(static_cast<float>(config.head_dim))) {}

  SelectorKind kind() const override { return config_.kind; }

  absl::Status Build(const float* keys, int64_t n, std::vector<Placement>* placements) override {
    if (num_tokens_ != 0) {
      return absl::FailedPreconditionError(absl::StrCat("Build() on an index that already holds ",
                                                        num_tokens_,
                                                        " tokens; use Insert() for more keys"));
    }
    RETURN_IF_ERROR(Append(keys, n, placements));
    // Room for the decode tokens that follow (headroom.h).
    positions_.reserve(TokensWithHeadroom(n));
    if (config_.kind == SelectorKind::kQuest) {
      minmax_.reserve((TokensWithHeadroom(n) + page_tokens_ - 1) / page_tokens_ * 2 * dim_);
    }
    return absl::OkStatus();
  }

  absl::Status Insert(const float* keys, int64_t n, std::vector<Placement>* placements) override {
    return Append(keys, n, placements);
  }

  absl::Status Select(const float* queries, int num_queries, const SelectParams& params,
                      Selection* out) const override;

  int64_t num_tokens() const override { return num_tokens_; }
  uint32_t num_pages() const override {
    return static_cast<uint32_t>((num_tokens_ + page_tokens_ - 1) / page_tokens_);
  }
  uint32_t fill(uint32_t page) const override {
    const int64_t begin = static_cast<int64_t>(page) * page_tokens_;
    if (begin >= num_tokens_) return 0;
    return static_cast<uint32_t>(std::min<int64_t>(page_tokens_, num_tokens_ - begin));
  }
  const int32_t* positions(uint32_t page) const override {
    const int64_t begin = static_cast<int64_t>(page) * page_tokens_;
    if (begin >= num_tokens_) return nullptr;
    return positions_.data() + begin;
  }
  Placement placement_of(int32_t position) const override {
    return Placement{static_cast<uint32_t>(position / page_tokens_),
                     static_cast<uint32_t>(position % page_tokens_)};
  }
  size_t index_bytes() const override {
    // Held, not reserved: the headroom (headroom.h) is untouched address space.
    return positions_.size() * sizeof(int32_t) + minmax_.size() * sizeof(float);
  }

 private:
  absl::Status Append(const float* keys, int64_t n, std::vector<Placement>* placements);
  // Exact logits of `page` into `logits` (G x page_tokens); FailedPrecondition
  // when the frames lack the page.
  absl::Status PageLogits(uint32_t page, const float* queries, int nq, float* logits) const;
  absl::Status SelectExact(const float* queries, int nq, const SelectParams& params,
                           const std::vector<uint32_t>& forced, Selection* out) const;
  absl::Status SelectQuest(const float* queries, int nq, const SelectParams& params,
                           const std::vector<uint32_t>& forced, Selection* out) const;
  absl::Status SelectQuestTokens(const float* queries, int nq, const SelectParams& params,
                                 Selection* out) const;
  void SelectStreaming(const SelectParams& params, const std::vector<uint32_t>& forced,
                       Selection* out) const;

  const PageKeys* keys_;  // not owned
  const int page_tokens_;
  const int dim_;
  const float scale_;
  int64_t num_tokens_ = 0;
  // positions_[p] = p: page `page` reads its slots' positions from
  // positions_.data() + page * page_tokens_.
  std::vector<int32_t> positions_;
  // kQuest: per page, min row then max row (2 x dim_ floats).
  std::vector<float> minmax_;
};

absl::Status PositionalSelector::Append(const float* keys, int64_t n,
                                        std::vector<Placement>* placements) {
  RETURN_IF_ERROR(ValidateKeysToAdd(keys, n, dim_, num_tokens_, placements, !keys_prechecked()));
  // Everything is validated; from here on nothing can fail.
  placements->resize(n);
  ReserveGeometric(&positions_, num_tokens_ + n);
  const bool quest = config_.kind == SelectorKind::kQuest;
  if (quest) {
    const int64_t pages_after = (num_tokens_ + n + page_tokens_ - 1) / page_tokens_;
    ReserveGeometric(&minmax_, pages_after * 2 * dim_);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = num_tokens_ + i;
    const uint32_t page = static_cast<uint32_t>(pos / page_tokens_);
    const uint32_t slot = static_cast<uint32_t>(pos % page_tokens_);
    (*placements)[i] = Placement{page, slot};
    positions_.push_back(static_cast<int32_t>(pos));
    if (!quest) continue;
    const float* k = keys + i * dim_;
    if (slot == 0) {
      minmax_.insert(minmax_.end(), k, k + dim_);  // min
      minmax_.insert(minmax_.end(), k, k + dim_);  // max
      continue;
    }
    float* mn = minmax_.data() + static_cast<size_t>(page) * 2 * dim_;
    float* mx = mn + dim_;
    for (int d = 0; d < dim_; ++d) {
      mn[d] = std::min(mn[d], k[d]);
      mx[d] = std::max(mx[d], k[d]);
    }
  }
  num_tokens_ += n;
  return absl::OkStatus();
}

absl::Status PositionalSelector::PageLogits(uint32_t page, const float* queries, int nq,
                                            float* logits) const {
  const void* rows = keys_->page_keys(page);
  if (rows == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("PageKeys has no keys for page ", page, " of ", num_pages(),
                     "; were the placements of every Build()/Insert() applied to the frames?"));
  }
  DotRowsMulti(config_.dtype, rows, fill(page), dim_, queries, nq, logits);
  return absl::OkStatus();
}

absl::Status PositionalSelector::Select(const float* queries, int num_queries,
                                        const SelectParams& params, Selection* out) const {
  RETURN_IF_ERROR(ValidateSelect(*this, queries, num_queries, params, out));
  const int64_t t = page_tokens_;
  const std::vector<uint32_t> forced =
      ForcedPages(num_tokens_, params, [t](int64_t pos) { return static_cast<uint32_t>(pos / t); });
  switch (config_.kind) {
    case SelectorKind::kExact:
      return SelectExact(queries, num_queries, params, forced, out);
    case SelectorKind::kQuest:
      if (params.granularity == Granularity::kToken) {
        return SelectQuestTokens(queries, num_queries, params, out);
      }
      return SelectQuest(queries, num_queries, params, forced, out);
    default:
      SelectStreaming(params, forced, out);
      return absl::OkStatus();
  }
}

absl::Status PositionalSelector::SelectExact(const float* queries, int nq,
                                             const SelectParams& params,
                                             const std::vector<uint32_t>& forced,
                                             Selection* out) const {
  const uint32_t pages = num_pages();
  Scratch& scratch = ThreadScratch();
  std::vector<float>& logits = scratch.logits;
  logits.resize(static_cast<size_t>(nq) * page_tokens_);
  const bool by_token = params.granularity == Granularity::kToken;
  scratch.tokens.Clear();
  // Every page's log-mass per query, then each query's exact normaliser, then
  // the group score of every page (GroupPageScore) or of every token.
  scratch.lse.resize(static_cast<size_t>(pages) * nq);
  for (uint32_t p = 0; p < pages; ++p) {
    float* l = by_token ? scratch.tokens.Add(p, nq, fill(p)) : logits.data();
    RETURN_IF_ERROR(PageLogits(p, queries, nq, l));
    const int f = static_cast<int>(fill(p));
    PageQueryLogMass(l, nq, f, f, scale_, &scratch.lse[static_cast<size_t>(p) * nq]);
  }
  scratch.log_norm.resize(nq);
  QueryLogNorms(scratch.lse.data(), pages, nq, nullptr, scratch.log_norm.data());
  out->keys_touched = static_cast<uint64_t>(num_tokens_);
  if (by_token) {
    TakeTokens(*this, scratch.tokens, scratch.log_norm.data(), nq, scale_, params, out);
    return absl::OkStatus();
  }
  std::vector<std::pair<float, uint32_t>>& scored = scratch.scored;
  scored.clear();
  scored.reserve(pages);
  for (uint32_t p = 0; p < pages; ++p) {
    scored.emplace_back(
        GroupPageScore(&scratch.lse[static_cast<size_t>(p) * nq], scratch.log_norm.data(), nq), p);
  }
  TakePages(*this, forced, &scored, params, out);
  return absl::OkStatus();
}

absl::Status PositionalSelector::SelectQuest(const float* queries, int nq,
                                             const SelectParams& params,
                                             const std::vector<uint32_t>& forced,
                                             Selection* out) const {
  const uint32_t pages = num_pages();
  Scratch& scratch = ThreadScratch();
  std::vector<std::pair<float, uint32_t>>& scored = scratch.scored;
  scored.clear();
  scored.reserve(pages);
  for (uint32_t p = 0; p < pages; ++p) {
    const float* mn = minmax_.data() + static_cast<size_t>(p) * 2 * dim_;
    scored.emplace_back(QuestBound(mn, mn + dim_, queries, nq, dim_) * scale_, p);
  }
  uint64_t touched = 2ull * pages;
  const float factor = config_.quest_rescore_factor;
  if (factor > 0.0f) {
    // Rank non-forced pages by bound; rescore the best `candidates` exactly.
    const double want =
        std::ceil(static_cast<double>(factor) * params.budget_tokens / page_tokens_);
    const size_t candidates = static_cast<size_t>(std::max(1.0, std::min<double>(want, pages)));
    std::vector<std::pair<float, uint32_t>>& ranked = scratch.ranked;
    ranked.clear();
    ranked.reserve(pages);
    for (const auto& e : scored) {
      if (!std::binary_search(forced.begin(), forced.end(), e.second)) ranked.push_back(e);
    }
    const size_t take = std::min(candidates, ranked.size());
    auto better = [](const std::pair<float, uint32_t>& a, const std::pair<float, uint32_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    // The candidate set only (its order is TakePages' job): linear time.
    if (take < ranked.size()) {
      std::nth_element(ranked.begin(), ranked.begin() + take, ranked.end(), better);
    }
    ranked.resize(take);
    // The candidates' exact group scores (GroupPageScore), each query
    // normalised over the pages rescored.
    std::vector<float>& logits = scratch.logits;
    logits.resize(static_cast<size_t>(nq) * page_tokens_);
    // (The forced pages count in the normalisers too: they are selected.)
    scratch.lse.resize((ranked.size() + forced.size()) * nq);
    for (size_t i = 0; i < ranked.size() + forced.size(); ++i) {
      const uint32_t page = i < ranked.size() ? ranked[i].second : forced[i - ranked.size()];
      RETURN_IF_ERROR(PageLogits(page, queries, nq, logits.data()));
      const int f = static_cast<int>(fill(page));
      PageQueryLogMass(logits.data(), nq, f, f, scale_, &scratch.lse[i * nq]);
      touched += f;
    }
    scratch.log_norm.resize(nq);
    QueryLogNorms(scratch.lse.data(), ranked.size() + forced.size(), nq, nullptr,
                  scratch.log_norm.data());
    for (size_t i = 0; i < ranked.size(); ++i) {
      ranked[i].first = GroupPageScore(&scratch.lse[i * nq], scratch.log_norm.data(), nq);
    }
    TakePages(*this, forced, &ranked, params, out);
  } else {
    TakePages(*this, forced, &scored, params, out);
  }
  out->keys_touched = touched;
  return absl::OkStatus();
}

absl::Status PositionalSelector::SelectQuestTokens(const float* queries, int nq,
                                                   const SelectParams& params,
                                                   Selection* out) const {
  // Candidates: the best pages by bound, F x budget tokens' worth (F =
  // quest_rescore_factor, at least 4: the best budget tokens mostly lie in
  // the best 4 x budget of pages, docs/architecture.md §3.6), scored exactly.
  const uint32_t pages = num_pages();
  Scratch& scratch = ThreadScratch();
  std::vector<std::pair<float, uint32_t>>& ranked = scratch.ranked;
  ranked.clear();
  ranked.reserve(pages);
  for (uint32_t p = 0; p < pages; ++p) {
    const float* mn = minmax_.data() + static_cast<size_t>(p) * 2 * dim_;
    ranked.emplace_back(QuestBound(mn, mn + dim_, queries, nq, dim_), p);
  }
  const double factor = std::max(4.0f, config_.quest_rescore_factor);
  const size_t take = static_cast<size_t>(std::min<double>(
      pages, std::max(1.0, std::ceil(factor * params.budget_tokens / page_tokens_))));
  auto better = [](const std::pair<float, uint32_t>& a, const std::pair<float, uint32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  if (take < ranked.size()) {
    std::nth_element(ranked.begin(), ranked.begin() + take, ranked.end(), better);
  }
  ranked.resize(take);
  // The forced tokens' pages are candidates too (their other tokens).
  const int64_t t = page_tokens_;
  for (uint32_t page : ForcedPages(num_tokens_, params,
                                   [t](int64_t pos) { return static_cast<uint32_t>(pos / t); })) {
    if (std::find_if(ranked.begin(), ranked.end(), [page](const std::pair<float, uint32_t>& e) {
          return e.second == page;
        }) == ranked.end()) {
      ranked.emplace_back(0.0f, page);
    }
  }
  const size_t take_all = ranked.size();
  scratch.tokens.Clear();
  scratch.lse.resize(take_all * nq);
  uint64_t touched = 2ull * pages;
  for (size_t i = 0; i < take_all; ++i) {
    const uint32_t page = ranked[i].second;
    float* l = scratch.tokens.Add(page, nq, fill(page));
    RETURN_IF_ERROR(PageLogits(page, queries, nq, l));
    const int f = static_cast<int>(fill(page));
    PageQueryLogMass(l, nq, f, f, scale_, &scratch.lse[i * nq]);
    touched += f;
  }
  scratch.log_norm.resize(nq);
  QueryLogNorms(scratch.lse.data(), take_all, nq, nullptr, scratch.log_norm.data());
  TakeTokens(*this, scratch.tokens, scratch.log_norm.data(), nq, scale_, params, out);
  out->keys_touched = touched;
  return absl::OkStatus();
}

void PositionalSelector::SelectStreaming(const SelectParams& params,
                                         const std::vector<uint32_t>& forced,
                                         Selection* out) const {
  if (params.granularity == Granularity::kToken) {
    // The sinks and the most recent tokens, exactly the budget.
    SelectParams p = params;
    const int sink = static_cast<int>(std::min<int64_t>(params.sink_tokens, num_tokens_));
    p.recent_tokens = std::max(params.recent_tokens, params.budget_tokens - sink);
    static const TokenCandidates kNone;
    TakeTokens(*this, kNone, nullptr, 0, scale_, p, out);
    out->keys_touched = 0;
    return;
  }
  const uint32_t pages = num_pages();
  std::vector<std::pair<float, uint32_t>>& scored = ThreadScratch().scored;
  scored.clear();
  // Only the most recent pages can be taken: budget pages plus the forced ones.
  const uint32_t window = static_cast<uint32_t>(
      std::min<int64_t>(pages, params.budget_tokens / page_tokens_ + 2 + forced.size()));
  scored.reserve(window);
  for (uint32_t p = pages - window; p < pages; ++p) {
    // Recency rank: 0 for the newest page, -1 for the one before, ...
    scored.emplace_back(-static_cast<float>(pages - 1 - p), p);
  }
  TakePages(*this, forced, &scored, params, out);
  out->keys_touched = 0;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Selector>> NewPositionalSelector(const SelectorConfig& config,
                                                                const PageKeys* keys) {
  if (config.kind != SelectorKind::kExact && config.kind != SelectorKind::kQuest &&
      config.kind != SelectorKind::kStreaming) {
    return absl::InvalidArgumentError(absl::StrCat("selector kind '",
                                                   std::string(SelectorKindName(config.kind)),
                                                   "' does not use the positional layout"));
  }
  return std::unique_ptr<Selector>(new PositionalSelector(config, keys));
}

}  // namespace icecache
