#include "server/index/mips.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace icecache {
namespace {

absl::Status CheckParams(int dim, float norm_headroom, float rebuild_fraction) {
  if (dim < 1) return absl::InvalidArgumentError(absl::StrCat("MIPS dim must be >= 1, got ", dim));
  if (!(norm_headroom >= 1.0f) || !std::isfinite(norm_headroom)) {
    return absl::InvalidArgumentError(
        absl::StrCat("norm_headroom must be finite and >= 1, got ", norm_headroom));
  }
  if (!(rebuild_fraction >= 0.0f && rebuild_fraction <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("rebuild_fraction must be in [0, 1], got ", rebuild_fraction));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<MipsAugmentation> MipsAugmentation::FromMaxNorm(float max_norm, int dim,
                                                               float norm_headroom,
                                                               float rebuild_fraction) {
  absl::Status s = CheckParams(dim, norm_headroom, rebuild_fraction);
  if (!s.ok()) return s;
  if (!std::isfinite(max_norm) || max_norm < 0.0f) {
    return absl::InvalidArgumentError(absl::StrCat("max key norm must be finite, got ", max_norm));
  }
  float bound = norm_headroom * max_norm;
  if (!(bound > 0.0f) || !std::isfinite(bound)) bound = 1.0f;
  return MipsAugmentation(bound, dim, rebuild_fraction);
}

absl::StatusOr<MipsAugmentation> MipsAugmentation::FromState(float bound, int dim,
                                                             float rebuild_fraction,
                                                             int64_t keys_seen,
                                                             int64_t over_bound) {
  absl::Status s = CheckParams(dim, 1.0f, rebuild_fraction);
  if (!s.ok()) return s;
  if (!(bound > 0.0f) || !std::isfinite(bound) || over_bound < 0 || over_bound > keys_seen) {
    return absl::InvalidArgumentError(absl::StrCat("MIPS state out of range: bound ", bound,
                                                   ", keys seen ", keys_seen, ", over bound ",
                                                   over_bound));
  }
  MipsAugmentation m(bound, dim, rebuild_fraction);
  m.Count(keys_seen, over_bound);
  return m;
}

absl::StatusOr<MipsAugmentation> MipsAugmentation::Create(const float* keys, int64_t n, int dim,
                                                          float norm_headroom,
                                                          float rebuild_fraction) {
  absl::Status s = CheckParams(dim, norm_headroom, rebuild_fraction);
  if (!s.ok()) return s;
  if (keys == nullptr || n < 1) {
    return absl::InvalidArgumentError(absl::StrCat("MIPS bound needs >= 1 key, got ", n));
  }
  // Each key's squared norm is a sequential double sum (its bits fix the
  // bound, and so the trees); eight keys' sums run interleaved, each in its
  // own order, so the additions' latency chains overlap instead of one key
  // waiting on the last (a float squared is exact in double: FMA or not,
  // the same sums).
  constexpr int kKeys = 8;
  double max_sq = 0.0;
  int64_t i = 0;
  for (; i + kKeys <= n; i += kKeys) {
    double sq[kKeys] = {};
    const float* k = keys + i * dim;
    for (int c = 0; c < dim; ++c) {
      for (int j = 0; j < kKeys; ++j) {
        const double x = k[static_cast<int64_t>(j) * dim + c];
        sq[j] += x * x;
      }
    }
    for (int j = 0; j < kKeys; ++j) {
      if (!std::isfinite(sq[j])) {
        return absl::InvalidArgumentError(absl::StrCat("key row ", i + j, " is not finite"));
      }
      max_sq = std::max(max_sq, sq[j]);
    }
  }
  for (; i < n; ++i) {
    double sq = 0.0;
    for (int c = 0; c < dim; ++c) sq += static_cast<double>(keys[i * dim + c]) * keys[i * dim + c];
    if (!std::isfinite(sq)) {
      return absl::InvalidArgumentError(absl::StrCat("key row ", i, " is not finite"));
    }
    max_sq = std::max(max_sq, sq);
  }
  return FromMaxNorm(static_cast<float>(std::sqrt(max_sq)), dim, norm_headroom, rebuild_fraction);
}

float MipsAugmentation::AugmentSquaredNorm(float sq_norm) const {
  const float rest = bound_ * bound_ - sq_norm;
  return rest > 0.0f ? std::sqrt(rest) : 0.0f;
}

float MipsAugmentation::Augment(const float* key) {
  float sq = 0.0f;
  for (int c = 0; c < dim_; ++c) sq += key[c] * key[c];
  ++keys_seen_;
  if (sq > bound_ * bound_) ++over_bound_;
  return AugmentSquaredNorm(sq);
}

void MipsAugmentation::AugmentQuery(const float* q, float* out) const {
  double sq = 0.0;
  for (int c = 0; c < dim_; ++c) sq += static_cast<double>(q[c]) * q[c];
  const float f = sq > 0.0 ? static_cast<float>(bound_ / std::sqrt(sq)) : 0.0f;
  for (int c = 0; c < dim_; ++c) out[c] = q[c] * f;
  out[dim_] = 0.0f;
}

void MipsAugmentation::AugmentKey(const float* k, float* out) const {
  float sq = 0.0f;
  for (int c = 0; c < dim_; ++c) {
    out[c] = k[c];
    sq += k[c] * k[c];
  }
  out[dim_] = AugmentSquaredNorm(sq);
}

bool MipsAugmentation::NeedsRebuild() const {
  return over_bound_ > 0 &&
         static_cast<double>(over_bound_) > rebuild_fraction_ * static_cast<double>(keys_seen_);
}

}  // namespace icecache
