// DciTree rebuild: the MIPS bound and every node representative recomputed
// from the stored keys (tokens never move), with the same math as the build
// (DciRepSums, DciNodeReps::SetFromSums); CommitRebuild swaps the result in.
#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/dci_tree.h"
#include "server/index/dci_tree_internal.h"
#include "server/index/kernels.h"

namespace icecache {

using dci_internal::SquaredNorm;

absl::StatusOr<std::unique_ptr<DciTreeRebuild>> DciTree::PrepareRebuild(const PageKeys& keys,
                                                                        DType dtype) const {
  const int d = params_.dim, r = subspace_.rank();
  const int64_t n = num_tokens();
  if (n == 0) return absl::FailedPreconditionError("rebuild of an empty DCI-tree");
  std::vector<float> rows(static_cast<size_t>(params_.page_tokens) * d);
  float max_sq = 0.0f;
  for (uint32_t page = 0; page < pages_.num_pages(); ++page) {
    const void* src = keys.page_keys(page);
    if (src == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("no key bytes for page ", page));
    }
    const uint32_t fill = pages_.fill(page);
    ToFloat(dtype, src, rows.data(), static_cast<size_t>(fill) * d);
    for (uint32_t s = 0; s < fill; ++s) max_sq = std::max(max_sq, SquaredNorm(&rows[s * d], d));
  }
  ASSIGN_OR_RETURN(MipsAugmentation mips,
                   MipsAugmentation::FromMaxNorm(std::sqrt(max_sq), d, params_.norm_headroom,
                                                 params_.rebuild_fraction));
  auto rb = std::make_unique<DciTreeRebuild>(DciTreeRebuild{mips, n, {}});
  const int top = top_level();
  rb->levels.resize(top + 1);
  for (int l = 1; l <= top; ++l) rb->levels[l].Resize(levels_[l].size(), d, r);
  // Level 1 from its keys, page by page in each node's page order.
  DciRepSums sums;
  std::vector<float> proj(r);
  for (uint32_t node = 0; node < levels_[1].size(); ++node) {
    sums.Reset(d, r);
    for (uint32_t page = pages_.first_page(node); page != DciPageTable::kNone;
         page = pages_.next_page(page)) {
      const uint32_t fill = pages_.fill(page);
      ToFloat(dtype, keys.page_keys(page), rows.data(), static_cast<size_t>(fill) * d);
      for (uint32_t s = 0; s < fill; ++s) {
        const float* x = &rows[s * d];
        const float sq = SquaredNorm(x, d);
        subspace_.Project(x, proj.data());
        sums.AddKey(x, d, mips.AugmentSquaredNorm(sq), sq, proj.data(), r);
      }
    }
    rb->levels[1].SetFromSums(node, sums, subspace_);
  }
  // Every level above from its children.
  for (int l = 2; l <= top; ++l) {
    for (uint32_t node = 0; node < levels_[l].size(); ++node) {
      sums.Reset(d, r);
      for (uint32_t ch : levels_[l].children[node]) sums.AddNode(rb->levels[l - 1], ch, d, r);
      rb->levels[l].SetFromSums(node, sums, subspace_);
    }
  }
  return rb;
}

absl::Status DciTree::CommitRebuild(std::unique_ptr<DciTreeRebuild> rb) {
  if (rb == nullptr) return absl::InvalidArgumentError("rebuild must not be null");
  if (rb->num_tokens != num_tokens() || static_cast<int>(rb->levels.size()) != top_level() + 1) {
    return absl::FailedPreconditionError(absl::StrCat("rebuild was prepared for ", rb->num_tokens,
                                                      " tokens but the tree now holds ",
                                                      num_tokens(), "; prepare it again"));
  }
  for (int l = 1; l <= top_level(); ++l) {
    if (rb->levels[l].size() != levels_[l].size()) {
      return absl::FailedPreconditionError("tree changed since PrepareRebuild; prepare it again");
    }
  }
  for (int l = 1; l <= top_level(); ++l) std::swap(levels_[l].reps, rb->levels[l]);
  mips_ = rb->mips;
  mips_.Count(num_tokens(), 0);
  SyncAllMirrors();
  return absl::OkStatus();
}

}  // namespace icecache
