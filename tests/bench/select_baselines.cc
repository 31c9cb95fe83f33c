// Token-granular and estimator views of the baseline selectors for
// `icecache-bench select` (select_methods.h):
//  - "<kind>@tok": the selector's token ranking (TokenRanker::SelectTokens),
//    the best `budget` tokens without rounding to pages;
//  - "magicpig-est": MagicPIG's importance-sampling estimate of the
//    attention output (AttentionEstimator); its output error is the
//    estimate's, its positions (mass, top-k) are the sampled tokens' best
//    `budget`. The timed call is the whole estimate (hashing, collision
//    counts, sampled dot products and the weighted sum of values).
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/owned_page_keys.h"
#include "server/index/positional_layout.h"
#include "tests/bench/select_methods.h"

namespace icecache::bench {
namespace {

constexpr char kTokSuffix[] = "@tok";
constexpr char kEstimator[] = "magicpig-est";

class BaselineView : public TreeMethod {
 public:
  static absl::StatusOr<std::unique_ptr<TreeMethod>> Create(const SelectorConfig& config,
                                                            const SelectParams& params,
                                                            bool estimate) {
    auto m = std::unique_ptr<BaselineView>(new BaselineView(params, estimate));
    ASSIGN_OR_RETURN(m->keys_, OwnedPageKeys::ForSelector(config));
    ASSIGN_OR_RETURN(m->selector_, Selector::Create(config, m->keys_.get()));
    m->ranker_ = dynamic_cast<const TokenRanker*>(m->selector_.get());
    m->estimator_ = dynamic_cast<const AttentionEstimator*>(m->selector_.get());
    if (m->ranker_ == nullptr || (estimate && m->estimator_ == nullptr)) {
      return absl::InvalidArgumentError(
          absl::StrCat("selector '", std::string(SelectorKindName(config.kind)), "' is not ",
                       estimate ? "an estimator" : "token-level"));
    }
    return std::unique_ptr<TreeMethod>(std::move(m));
  }

  absl::Status Build(const float* keys, int64_t n) override {
    RETURN_IF_ERROR(selector_->Build(keys, n, &placements_));
    return keys_->Apply(placements_, keys);
  }
  absl::Status Insert(const float* keys, int64_t n) override {
    RETURN_IF_ERROR(selector_->Insert(keys, n, &placements_));
    return keys_->Apply(placements_, keys);
  }
  absl::Status Select(const float* queries, int nq, const SweepPoint&, Selection* sel) override {
    sel->Clear();
    if (estimate_) {
      estimate_out_.resize(static_cast<size_t>(nq) * selector_->config().head_dim);
      int64_t read = 0;
      RETURN_IF_ERROR(
          estimator_->EstimateOutput(queries, nq, params_, values_, estimate_out_.data(), &read));
      sel->keys_touched = static_cast<uint64_t>(read);
      // Untimed in spirit but inside the call: the sampled tokens for the
      // mass and top-k columns (a second sampling, same hashes).
      return ranker_->SelectTokens(queries, nq, params_, &sel->positions);
    }
    RETURN_IF_ERROR(ranker_->SelectTokens(queries, nq, params_, &sel->positions));
    sel->keys_touched = 0;
    return absl::OkStatus();
  }
  void Positions(const Selection& sel, std::vector<int32_t>* out) const override {
    *out = sel.positions;
  }
  size_t index_bytes() const override { return selector_->index_bytes(); }
  double layout_fill() const override { return std::numeric_limits<double>::quiet_NaN(); }
  void BindValues(const float* values) override { values_ = values; }
  const std::vector<float>* last_estimate() const override {
    return estimate_ ? &estimate_out_ : nullptr;
  }

 private:
  BaselineView(const SelectParams& params, bool estimate) : params_(params), estimate_(estimate) {}
  SelectParams params_;
  bool estimate_;
  const float* values_ = nullptr;
  std::vector<float> estimate_out_;
  std::unique_ptr<OwnedPageKeys> keys_;
  std::unique_ptr<Selector> selector_;
  const TokenRanker* ranker_ = nullptr;
  const AttentionEstimator* estimator_ = nullptr;
  std::vector<Placement> placements_;
};

}  // namespace

bool IsBaselineView(const std::string& name) {
  return absl::EndsWith(name, kTokSuffix) || name == kEstimator;
}

absl::StatusOr<std::unique_ptr<TreeMethod>> MakeBaselineView(const std::string& name,
                                                             SelectorConfig config,
                                                             const SelectParams& params) {
  const bool estimate = name == kEstimator;
  std::string kind = estimate ? "magicpig" : name;
  if (!estimate) {
    if (!absl::EndsWith(name, kTokSuffix)) {
      return absl::InvalidArgumentError(absl::StrCat("'", name, "' is not a baseline view"));
    }
    kind = name.substr(0, name.size() - (sizeof(kTokSuffix) - 1));
  }
  ASSIGN_OR_RETURN(config.kind, ParseSelectorKind(kind));
  return BaselineView::Create(config, params, estimate);
}

}  // namespace icecache::bench
