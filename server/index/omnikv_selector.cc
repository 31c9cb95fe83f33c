// OmniKV (Hao et al., "OmniKV: Dynamic Context Selection for Efficient
// Long-Context LLMs", ICLR 2025; github.com/antgroup/OmniKV): a few "filter"
// layers run full attention over every token and pick the top-k tokens; the
// layers after a filter layer reuse that token set until the next filter
// layer. Here a filter layer is the first layer of a layer group: this
// selector scores every token exactly (the GQA group score of each token,
// normalised over all tokens) and the session's layer reuse
// (SessionConfig.layer_reuse, reuse_group_selection) hands the selection to
// the group's other layers. OmniKV shares one token set across all heads of
// a layer; here each KV head keeps its own (the daemon selects per KV head).
// Cost: every key once (an exact scan) on the filter layer, nothing on the
// layers that reuse it.
#include <memory>
#include <vector>

#include "common/status_macros.h"
#include "server/index/baseline_selectors.h"
#include "server/index/page_select.h"
#include "server/index/positional_layout.h"

namespace icecache {
namespace {

class OmnikvSelector final : public TokenScoringSelector {
 public:
  OmnikvSelector(const SelectorConfig& config, const PageKeys* keys)
      : TokenScoringSelector(config, keys) {}

  size_t index_bytes() const override { return layout_bytes(); }

 private:
  absl::Status OnAppend(const float*, int64_t, bool) override { return absl::OkStatus(); }

  absl::Status RankTokens(const float* queries, int nq, const SelectParams& params,
                          std::vector<ScoredToken>* tokens, uint64_t* touched) const override {
    *touched = static_cast<uint64_t>(num_tokens());
    const int64_t n = num_tokens();
    thread_local std::vector<float> logits;
    thread_local std::vector<float> scores;
    logits.resize(static_cast<size_t>(nq) * n);
    scores.resize(n);
    RETURN_IF_ERROR(AllLogits(queries, nq, logits.data()));
    TokenGroupScores(logits.data(), nq, n, scale_, scores.data());
    tokens->resize(n);
    for (int64_t i = 0; i < n; ++i) (*tokens)[i] = {scores[i], static_cast<int32_t>(i)};
    return absl::OkStatus();
  }
};

}  // namespace

std::unique_ptr<Selector> NewOmnikvSelector(const SelectorConfig& config, const PageKeys* keys) {
  return std::make_unique<OmnikvSelector>(config, keys);
}

}  // namespace icecache
