// SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before
// Generation", NeurIPS 2024; github.com/FasterDecoding/SnapKV): at the end of
// the prefill the queries of an observation window vote for the prefix
// tokens: each window query's softmax over the keys, summed over the window
// (here also over the G query heads of the KV head), pooled along positions
// (kernel 7, max pooling, the paper's LongBench setting; average pooling
// optional) so neighbours of a voted token come with it; the top tokens by
// pooled vote plus the window itself are kept, and every later token is
// kept too. The kept set is fixed at prefill.
//
// The daemon has no prefill queries: the observation window's voters are the
// queries of the FIRST Select() (the step right after the prefill, which is
// what the window's last queries are closest to), the window tokens are the
// last `snapkv_window` tokens held at that moment, and the votes are fixed
// from then on. Select() then ranks, without reading any key: pages holding
// window or later tokens first (newest first), then prefix pages by their
// best pooled vote, until the budget in tokens.
// Thread safety: the first Select() fixes the votes under mu_; later
// Select() calls read them under a reader lock.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/status_macros.h"
#include "server/index/baseline_selectors.h"
#include "server/index/byte_image.h"
#include "server/index/page_select.h"
#include "server/index/positional_layout.h"

namespace icecache {
namespace {

class SnapkvSelector final : public PositionalLayoutSelector, public TokenRanker {
 public:
  SnapkvSelector(const SelectorConfig& config, const PageKeys* keys)
      : PositionalLayoutSelector(config, keys) {}

  absl::Status Select(const float* queries, int num_queries, const SelectParams& params,
                      Selection* out) const override {
    RETURN_IF_ERROR(ValidateSelect(*this, queries, num_queries, params, out));
    RETURN_IF_ERROR(FixOnce(queries, num_queries));
    absl::ReaderMutexLock lock(&mu_);
    thread_local std::vector<std::pair<float, uint32_t>> scored;
    const uint32_t pages = num_pages();
    scored.resize(pages);
    for (uint32_t p = 0; p < pages; ++p) {
      const int64_t last = static_cast<int64_t>(p) * page_tokens_ + fill(p) - 1;
      scored[p] = {last >= prefix_ ? RecentScore(last) : page_vote_[p], p};
    }
    TakePages(*this, Forced(params), &scored, params, out);
    out->keys_touched = 0;
    return absl::OkStatus();
  }

  absl::Status SelectTokens(const float* queries, int num_queries, const SelectParams& params,
                            std::vector<int32_t>* positions) const override {
    Selection probe;
    RETURN_IF_ERROR(ValidateSelect(*this, queries, num_queries, params, &probe));
    RETURN_IF_ERROR(FixOnce(queries, num_queries));
    absl::ReaderMutexLock lock(&mu_);
    std::vector<ScoredToken> tokens(num_tokens());
    for (int64_t i = 0; i < num_tokens(); ++i) {
      tokens[i] = {i >= prefix_ ? RecentScore(i) : vote_[i], static_cast<int32_t>(i)};
    }
    TakeTopTokens(&tokens, params, positions);
    return absl::OkStatus();
  }

  // Image: whether the votes were fixed, and the votes (a recovered session
  // keeps the votes its first Select fixed; a replay would fix new ones).
  bool has_image() const override { return true; }

  size_t index_bytes() const override {
    absl::ReaderMutexLock lock(&mu_);
    return layout_bytes() + (vote_.size() + page_vote_.size()) * sizeof(float);
  }

 private:
  absl::Status OnAppend(const float*, int64_t, bool) override { return absl::OkStatus(); }

  // Window and later tokens rank above every vote (a vote is at most G x
  // window), newer first.
  float RecentScore(int64_t pos) const {
    return 1e6f + static_cast<float>(pos) / static_cast<float>(num_tokens());
  }

  absl::Status FixOnce(const float* queries, int nq) const ABSL_LOCKS_EXCLUDED(mu_);
  void SaveState(ByteWriter* w) const override ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status LoadState(ByteReader* r, int64_t n) override ABSL_LOCKS_EXCLUDED(mu_);

  mutable absl::Mutex mu_;
  mutable bool fixed_ ABSL_GUARDED_BY(mu_) = false;
  mutable int64_t prefix_ ABSL_GUARDED_BY(mu_) = 0;            // tokens that were voted on
  mutable std::vector<float> vote_ ABSL_GUARDED_BY(mu_);       // pooled vote per prefix token
  mutable std::vector<float> page_vote_ ABSL_GUARDED_BY(mu_);  // best vote per prefix page
};

constexpr uint32_t kSnapkvImageAlgorithm = 1;  // bump when the voting changes

void SnapkvSelector::SaveState(ByteWriter* w) const {
  const BaselineParams& bp = config_.baseline;
  absl::ReaderMutexLock lock(&mu_);
  w->Put<uint32_t>(kSnapkvImageAlgorithm);
  w->Put<int32_t>(bp.snapkv_window);
  w->Put<int32_t>(bp.snapkv_kernel);
  w->Put<uint8_t>(bp.snapkv_avg_pool ? 1 : 0);
  w->Put<uint8_t>(fixed_ ? 1 : 0);
  w->Put<int64_t>(prefix_);
  w->PutArray(vote_);
}

absl::Status SnapkvSelector::LoadState(ByteReader* r, int64_t n) {
  const BaselineParams& bp = config_.baseline;
  uint32_t algorithm = 0;
  int32_t window = 0, kernel = 0;
  uint8_t avg = 0, fixed = 0;
  int64_t prefix = 0;
  if (!r->Get(&algorithm) || !r->Get(&window) || !r->Get(&kernel) || !r->Get(&avg) ||
      !r->Get(&fixed) || !r->Get(&prefix)) {
    return absl::DataLossError("snapkv image: truncated header");
  }
  if (algorithm != kSnapkvImageAlgorithm || window != bp.snapkv_window ||
      kernel != bp.snapkv_kernel || avg != (bp.snapkv_avg_pool ? 1 : 0)) {
    return absl::FailedPreconditionError(
        "snapkv image of another algorithm or other parameters (window, kernel, pooling)");
  }
  if (fixed > 1 || prefix < 0 || prefix > n || (fixed == 0 && prefix != 0)) {
    return absl::DataLossError("snapkv image: bad vote state");
  }
  std::vector<float> vote;
  if (!r->GetArray(&vote, static_cast<uint64_t>(prefix))) {
    return absl::DataLossError("snapkv image: truncated votes");
  }
  for (float v : vote) {
    if (!(v >= 0.0f) || !std::isfinite(v)) return absl::DataLossError("snapkv image: a bad vote");
  }
  absl::MutexLock lock(&mu_);
  page_vote_.assign((prefix + page_tokens_ - 1) / page_tokens_,
                    -std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < prefix; ++i) {
    float& v = page_vote_[i / page_tokens_];
    v = std::max(v, vote[i]);
  }
  vote_ = std::move(vote);
  prefix_ = prefix;
  fixed_ = fixed == 1;
  return absl::OkStatus();
}

absl::Status SnapkvSelector::FixOnce(const float* queries, int nq) const {
  absl::MutexLock lock(&mu_);
  if (fixed_) return absl::OkStatus();
  const BaselineParams& bp = config_.baseline;
  const int64_t n = num_tokens();
  const int64_t prefix = std::max<int64_t>(0, n - bp.snapkv_window);
  // Votes: each voter's softmax over all n keys, summed over the voters.
  std::vector<float> logits(static_cast<size_t>(nq) * n);
  RETURN_IF_ERROR(AllLogits(queries, nq, logits.data()));
  std::vector<float> raw(prefix, 0.0f);
  std::vector<float> row(n);
  for (int j = 0; j < nq; ++j) {
    for (int64_t i = 0; i < n; ++i) row[i] = logits[static_cast<size_t>(j) * n + i] * scale_;
    const float lse = LogSumExp(row.data(), n);
    for (int64_t i = 0; i < prefix; ++i) raw[i] += std::exp(row[i] - lse);
  }
  // Pooling along positions, kernel k, stride 1, padding k / 2 (max pooling
  // ignores the padding; average pooling counts it, as avg_pool1d does).
  const int half = bp.snapkv_kernel / 2;
  vote_.assign(prefix, 0.0f);
  for (int64_t i = 0; i < prefix; ++i) {
    const int64_t lo = std::max<int64_t>(0, i - half);
    const int64_t hi = std::min<int64_t>(prefix - 1, i + half);
    float acc = bp.snapkv_avg_pool ? 0.0f : -std::numeric_limits<float>::infinity();
    for (int64_t t = lo; t <= hi; ++t)
      acc = bp.snapkv_avg_pool ? acc + raw[t] : std::max(acc, raw[t]);
    vote_[i] = bp.snapkv_avg_pool ? acc / static_cast<float>(bp.snapkv_kernel) : acc;
  }
  const int64_t prefix_pages = (prefix + page_tokens_ - 1) / page_tokens_;
  page_vote_.assign(prefix_pages, -std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < prefix; ++i) {
    float& v = page_vote_[i / page_tokens_];
    v = std::max(v, vote_[i]);
  }
  prefix_ = prefix;
  fixed_ = true;
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<Selector> NewSnapkvSelector(const SelectorConfig& config, const PageKeys* keys) {
  return std::make_unique<SnapkvSelector>(config, keys);
}

}  // namespace icecache
