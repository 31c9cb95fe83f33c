#include "server/index/baseline_selectors.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "server/index/baseline_params.h"

namespace icecache {

namespace {

absl::Status Bad(const char* field, const std::string& rule, const std::string& got) {
  return absl::InvalidArgumentError(
      absl::StrCat("SelectorConfig.baseline.", field, " must be ", rule, ", got ", got));
}

bool FiniteAtLeast(float v, float lo) { return std::isfinite(v) && v >= lo; }

absl::Status ValidatePq(const BaselineParams& p, int head_dim) {
  if (p.pq_subspaces < 1 || p.pq_subspaces > head_dim || head_dim % p.pq_subspaces != 0) {
    return Bad("pq_subspaces",
               absl::StrCat("in [1, ", head_dim, "] and divide head_dim ", head_dim),
               absl::StrCat(p.pq_subspaces));
  }
  if (p.pq_bits < 1 || p.pq_bits > 8) return Bad("pq_bits", "in [1, 8]", absl::StrCat(p.pq_bits));
  if (p.pq_kmeans_iters < 1) {
    return Bad("pq_kmeans_iters", ">= 1", absl::StrCat(p.pq_kmeans_iters));
  }
  if (!FiniteAtLeast(p.pq_rescore_factor, 1.0f)) {
    return Bad("pq_rescore_factor", "finite and >= 1", absl::StrCat(p.pq_rescore_factor));
  }
  return absl::OkStatus();
}

absl::Status ValidateSnap(const BaselineParams& p) {
  if (p.snapkv_window < 1) return Bad("snapkv_window", ">= 1", absl::StrCat(p.snapkv_window));
  if (p.snapkv_kernel < 1 || p.snapkv_kernel > 255 || p.snapkv_kernel % 2 == 0) {
    return Bad("snapkv_kernel", "odd and in [1, 255]", absl::StrCat(p.snapkv_kernel));
  }
  return absl::OkStatus();
}

absl::Status ValidatePig(const BaselineParams& p) {
  if (p.magicpig_bits < 1 || p.magicpig_bits > 16) {
    return Bad("magicpig_bits", "in [1, 16]", absl::StrCat(p.magicpig_bits));
  }
  if (p.magicpig_tables < 1 || p.magicpig_tables > 1024) {
    return Bad("magicpig_tables", "in [1, 1024]", absl::StrCat(p.magicpig_tables));
  }
  if (p.magicpig_min_collisions < 1 || p.magicpig_min_collisions > p.magicpig_tables) {
    return Bad("magicpig_min_collisions",
               absl::StrCat("in [1, magicpig_tables = ", p.magicpig_tables, "]"),
               absl::StrCat(p.magicpig_min_collisions));
  }
  return absl::OkStatus();
}

absl::Status ValidateDci(const BaselineParams& p) {
  if (p.dci_num_composite < 1 || p.dci_num_composite > 64) {
    return Bad("dci_num_composite", "in [1, 64]", absl::StrCat(p.dci_num_composite));
  }
  if (p.dci_num_simple < 1 || p.dci_num_simple > 255) {
    return Bad("dci_num_simple", "in [1, 255]", absl::StrCat(p.dci_num_simple));
  }
  if (p.dci_num_levels < 1 || p.dci_num_levels > 16) {
    return Bad("dci_num_levels", "in [1, 16]", absl::StrCat(p.dci_num_levels));
  }
  if (p.dci_field_of_view < 1 || p.dci_field_of_view > 1 << 20) {
    return Bad("dci_field_of_view", "in [1, 1048576]", absl::StrCat(p.dci_field_of_view));
  }
  if (!FiniteAtLeast(p.dci_candidate_factor, 1.0f)) {
    return Bad("dci_candidate_factor", "finite and >= 1", absl::StrCat(p.dci_candidate_factor));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateBaselineParams(const BaselineParams& p, const char* kind_name, int head_dim) {
  const std::string kind = kind_name;
  if (kind == "pqcache") return ValidatePq(p, head_dim);
  if (kind == "snapkv") return ValidateSnap(p);
  if (kind == "magicpig") return ValidatePig(p);
  if (kind == "mdci-published") return ValidateDci(p);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Selector>> NewBaselineSelector(const SelectorConfig& config,
                                                              const PageKeys* keys) {
  switch (config.kind) {
    case SelectorKind::kArkvale:
      return NewArkvaleSelector(config, keys);
    case SelectorKind::kPqcache:
      return NewPqcacheSelector(config, keys);
    case SelectorKind::kSnapkv:
      return NewSnapkvSelector(config, keys);
    case SelectorKind::kOmnikv:
      return NewOmnikvSelector(config, keys);
    case SelectorKind::kMagicpig:
      return NewMagicpigSelector(config, keys);
    case SelectorKind::kMdciPublished:
      return NewMdciPublishedSelector(config, keys);
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "selector kind '", std::string(SelectorKindName(config.kind)), "' is not a baseline"));
  }
}

}  // namespace icecache
