// ArkVale (Chen et al., "ArkVale: Efficient Generative LLM Inference with
// Recallable Key-Value Eviction", NeurIPS 2024; github.com/pku-liang/ArkVale):
// every page keeps a digest, the bounding cuboid of its keys (elementwise
// min and max, fp32); a query's estimate for a page is the upper bound of
// q.k over the cuboid, sum_i max(q_i min_i, q_i max_i) / sqrt(head_dim).
// ArkVale ranks pages by that estimated score; for a GQA group each query's
// bounds are normalised over the pages (a softmax over page bounds) and the
// group score sums the queries' shares, as GroupPageScore does for exact
// masses (docs/architecture.md §3.9). Unlike quest (max over the group of
// the bounds) a loud query does not decide for the group.
// Cost: 2 key-equivalents per page (the min and max rows).
#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "common/status_macros.h"
#include "server/index/baseline_selectors.h"
#include "server/index/headroom.h"
#include "server/index/page_select.h"
#include "server/index/positional_layout.h"

namespace icecache {
namespace {

class ArkvaleSelector final : public PositionalLayoutSelector {
 public:
  ArkvaleSelector(const SelectorConfig& config, const PageKeys* keys)
      : PositionalLayoutSelector(config, keys) {}

  absl::Status Select(const float* queries, int num_queries, const SelectParams& params,
                      Selection* out) const override {
    RETURN_IF_ERROR(ValidateSelect(*this, queries, num_queries, params, out));
    const uint32_t pages = num_pages();
    thread_local std::vector<float> bounds;  // pages x G
    thread_local std::vector<float> norms;
    thread_local std::vector<std::pair<float, uint32_t>> scored;
    bounds.resize(static_cast<size_t>(pages) * num_queries);
    for (uint32_t p = 0; p < pages; ++p) {
      const float* mn = box_.data() + static_cast<size_t>(p) * 2 * dim_;
      PageBounds(mn, mn + dim_, queries, num_queries,
                 &bounds[static_cast<size_t>(p) * num_queries]);
    }
    norms.resize(num_queries);
    QueryLogNorms(bounds.data(), pages, num_queries, nullptr, norms.data());
    scored.clear();
    for (uint32_t p = 0; p < pages; ++p) {
      scored.emplace_back(
          GroupPageScore(&bounds[static_cast<size_t>(p) * num_queries], norms.data(), num_queries),
          p);
    }
    TakePages(*this, Forced(params), &scored, params, out);
    out->keys_touched = 2ull * pages;
    return absl::OkStatus();
  }

  size_t index_bytes() const override { return layout_bytes() + box_.size() * sizeof(float); }

  // The upper bound of each query's scaled logit over the cuboid [mn, mx].
  void PageBounds(const float* mn, const float* mx, const float* queries, int nq,
                  float* out) const {
    for (int j = 0; j < nq; ++j) {
      const float* q = queries + static_cast<int64_t>(j) * dim_;
      float s = 0.0f;
      for (int d = 0; d < dim_; ++d) s += std::max(q[d] * mn[d], q[d] * mx[d]);
      out[j] = s * scale_;
    }
  }

 private:
  absl::Status OnAppend(const float* keys, int64_t n, bool) override {
    const int64_t first = num_tokens();
    const int64_t pages_after = (first + n + page_tokens_ - 1) / page_tokens_;
    ReserveGeometric(&box_, static_cast<size_t>(pages_after) * 2 * dim_);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t pos = first + i;
      const float* k = keys + i * dim_;
      if (pos % page_tokens_ == 0) {
        box_.insert(box_.end(), k, k + dim_);  // min
        box_.insert(box_.end(), k, k + dim_);  // max
        continue;
      }
      float* mn = box_.data() + static_cast<size_t>(pos / page_tokens_) * 2 * dim_;
      float* mx = mn + dim_;
      for (int d = 0; d < dim_; ++d) {
        mn[d] = std::min(mn[d], k[d]);
        mx[d] = std::max(mx[d], k[d]);
      }
    }
    return absl::OkStatus();
  }

  std::vector<float> box_;  // per page: min row then max row
};

}  // namespace

std::unique_ptr<Selector> NewArkvaleSelector(const SelectorConfig& config, const PageKeys* keys) {
  return std::make_unique<ArkvaleSelector>(config, keys);
}

}  // namespace icecache
