// The positional page layout shared by the baseline selectors
// (docs/architecture.md §3.9): token t sits in page t / page_tokens, slot
// t % page_tokens, as in positional_selector.h. A subclass adds its own
// per-token or per-page digest in OnAppend() and its scoring in Select().
//
// Token-level baselines (pqcache, snapkv, omnikv, magicpig, mdci-published)
// rank tokens (most through TokenScoringSelector); TakeTokenPages() rounds a token ranking up to
// pages (each page ranked by its best token, the same budget in tokens), so they answer Select()
// with pages like every selector, and TakeTopTokens() gives the token-granular answer
// (TokenRanker::SelectTokens) for evaluation.
//
// Thread safety as in selector.h. Ownership: PageKeys is not owned and must
// outlive the selector.
#ifndef ICECACHE_SERVER_INDEX_POSITIONAL_LAYOUT_H_
#define ICECACHE_SERVER_INDEX_POSITIONAL_LAYOUT_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "server/index/selector.h"

namespace icecache {

// A (score, position) pair of a token ranking; higher scores first.
using ScoredToken = std::pair<float, int32_t>;

// Implemented by selectors that rank tokens: the best `budget_tokens`
// positions (forced sink/recent positions first, then by score), ascending
// positions not guaranteed. Errors as Selector::Select.
class TokenRanker {
 public:
  virtual ~TokenRanker() = default;
  virtual absl::Status SelectTokens(const float* queries, int num_queries,
                                    const SelectParams& params,
                                    std::vector<int32_t>* positions) const = 0;
};

// Implemented by estimators (magicpig): an estimate of each query's
// attention output, out[j * head_dim + d], from `values` (num_tokens() x
// head_dim fp32, by position); `sampled` (optional) receives the keys the
// estimate read, summed over the queries. Errors as Selector::Select, and
// InvalidArgument for null values/out.
class AttentionEstimator {
 public:
  virtual ~AttentionEstimator() = default;
  virtual absl::Status EstimateOutput(const float* queries, int num_queries,
                                      const SelectParams& params, const float* values, float* out,
                                      int64_t* sampled) const = 0;
};

class PositionalLayoutSelector : public Selector {
 public:
  absl::Status Build(const float* keys, int64_t n, std::vector<Placement>* placements) override;
  absl::Status Insert(const float* keys, int64_t n, std::vector<Placement>* placements) override;
  int64_t num_tokens() const override { return num_tokens_; }
  uint32_t num_pages() const override {
    return static_cast<uint32_t>((num_tokens_ + page_tokens_ - 1) / page_tokens_);
  }
  uint32_t fill(uint32_t page) const override;
  const int32_t* positions(uint32_t page) const override;
  SelectorKind kind() const override { return config_.kind; }

  // Index image (Selector::SaveImage; kinds that override has_image()): the
  // token count, then the kind's state (SaveState). LoadImageBody reads
  // that into this empty selector; statuses as Selector::LoadImage.
  // `tokens`: the count the image must hold (else DataLoss).
  absl::Status LoadImageBody(ByteReader* r, int64_t tokens);

 protected:
  PositionalLayoutSelector(const SelectorConfig& config, const PageKeys* keys);
  void SaveImageBody(ByteWriter* w) const final;
  // The kind's state in the image. LoadState reads it for `n` tokens into
  // this empty selector: FailedPrecondition for an image of other
  // parameters or algorithm, DataLoss naming what is inconsistent (`n` is
  // already checked against the count the caller expects).
  virtual void SaveState(ByteWriter* /*w*/) const {}
  virtual absl::Status LoadState(ByteReader* r, int64_t n);
  // Called after the keys are validated, before num_tokens() grows; the new
  // keys take positions [num_tokens(), num_tokens() + n). Must not fail
  // once it has changed anything (validate first, then change).
  virtual absl::Status OnAppend(const float* keys, int64_t n, bool bulk) = 0;

  size_t layout_bytes() const { return positions_.size() * sizeof(int32_t); }
  // Sink and recent pages (page_select.h ForcedPages), ascending.
  std::vector<uint32_t> Forced(const SelectParams& params) const;
  // The key row of `position` (dtype rows behind PageKeys); FailedPrecondition
  // when the frames lack its page.
  absl::StatusOr<const void*> KeyRow(int64_t position) const;
  // Exact logits of `count` positions into logits[j * count + i] (G queries).
  absl::Status TokenLogits(const int32_t* positions, int64_t count, const float* queries, int nq,
                           float* logits) const;
  // Exact logits of every token, logits[j * n + t], page by page.
  absl::Status AllLogits(const float* queries, int nq, float* logits) const;

  // Pages in the order of their best token: page score = max of its tokens'
  // scores, pages without a ranked token after every ranked one (score
  // -inf, ties to the lower page), then TakePages (forced pages first, the
  // budget in tokens).
  void TakeTokenPages(const std::vector<ScoredToken>& tokens, const SelectParams& params,
                      Selection* out) const;
  // Forced positions (sinks, recent), then the best tokens by score until
  // `budget_tokens` positions are taken.
  void TakeTopTokens(std::vector<ScoredToken>* tokens, const SelectParams& params,
                     std::vector<int32_t>* positions) const;

  const PageKeys* keys_;  // not owned
  const int page_tokens_;
  const int dim_;
  const float scale_;  // 1 / sqrt(head_dim)

 private:
  absl::Status Append(const float* keys, int64_t n, std::vector<Placement>* placements, bool bulk);
  int64_t num_tokens_ = 0;
  std::vector<int32_t> positions_;  // positions_[p] = p
};

// A positional-layout selector that answers with a token ranking
// (RankTokens): Select() rounds it up to pages (TakeTokenPages), and
// SelectTokens() takes the best tokens (TakeTopTokens), after the same
// validation.
class TokenScoringSelector : public PositionalLayoutSelector, public TokenRanker {
 public:
  absl::Status Select(const float* queries, int num_queries, const SelectParams& params,
                      Selection* out) const final;
  absl::Status SelectTokens(const float* queries, int num_queries, const SelectParams& params,
                            std::vector<int32_t>* positions) const final;

 protected:
  using PositionalLayoutSelector::PositionalLayoutSelector;
  // Scores tokens (any subset of positions, any order) for the group's
  // `nq` queries; `touched`: the keys it read. Called after validation.
  virtual absl::Status RankTokens(const float* queries, int nq, const SelectParams& params,
                                  std::vector<ScoredToken>* tokens, uint64_t* touched) const = 0;
};

// GQA token scores (the group score of page_select.h, per token): logits is
// G x n (row stride n), each query normalised over the n tokens given:
//   out[i] = log(sum_j exp(scale l_ji - log_norm_j)),
//   log_norm_j = log(sum_i exp(scale l_ji)).
void TokenGroupScores(const float* logits, int nq, int64_t n, float scale, float* out);

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_POSITIONAL_LAYOUT_H_
