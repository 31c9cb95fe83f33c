// Maximum inner product search as Euclidean nearest neighbour (docs/architecture.md §3.2):
// a key k gets one extra coordinate a(k) = sqrt(M^2 - |k|^2), a query q is
// scaled to norm M and gets a zero, so that
//   |q' - k'|^2 = 2 M^2 - 2 (M / |q|) q.k
// and the nearest augmented key is the maximum-inner-product key.
// M = norm_headroom x the largest key norm seen when the bound was fixed.
// A later key with |k| > M gets a(k) = 0 and is counted as over the bound;
// NeedsRebuild() says when those pass `rebuild_fraction` of all keys.
//
// Thread safety: the const methods may run concurrently; Augment() (which
// counts) needs exclusive access. Plain value type, copyable.
#ifndef ICECACHE_SERVER_INDEX_MIPS_H_
#define ICECACHE_SERVER_INDEX_MIPS_H_

#include <cstdint>

#include "absl/status/statusor.h"

namespace icecache {

class MipsAugmentation {
 public:
  // Fixes M from `n` keys (fp32, n x dim). InvalidArgument for n < 1,
  // dim < 1, headroom < 1 or not finite, rebuild_fraction outside [0, 1], or a
  // non-finite key. All-zero keys give M = 1 (any positive bound works).
  static absl::StatusOr<MipsAugmentation> Create(const float* keys, int64_t n, int dim,
                                                 float norm_headroom, float rebuild_fraction);
  // Same, from a known largest key norm (used by rebuilds).
  static absl::StatusOr<MipsAugmentation> FromMaxNorm(float max_norm, int dim, float norm_headroom,
                                                      float rebuild_fraction);

  // Same, from the state of a saved one (an index image): InvalidArgument
  // unless the bound is positive and finite and 0 <= over_bound <= keys_seen.
  static absl::StatusOr<MipsAugmentation> FromState(float bound, int dim, float rebuild_fraction,
                                                    int64_t keys_seen, int64_t over_bound);

  float bound() const { return bound_; }  // M
  int dim() const { return dim_; }

  // The extra coordinate of a key of squared norm `sq_norm` (0 when over
  // the bound). Does not count.
  float AugmentSquaredNorm(float sq_norm) const;
  // Extra coordinate of `key` (dim values); counts it as one more key, and
  // as over the bound when |key| > M. Returns the coordinate.
  float Augment(const float* key);
  // Writes q' = [q * M/|q|, 0] into out (dim + 1 values). A zero query maps
  // to the zero vector (it ranks every key equally).
  void AugmentQuery(const float* q, float* out) const;
  // Writes k' = [k, a(k)] into out (dim + 1 values). Does not count.
  void AugmentKey(const float* k, float* out) const;

  int64_t keys_seen() const { return keys_seen_; }
  int64_t over_bound() const { return over_bound_; }
  // True when over_bound() > rebuild_fraction x keys_seen() (and at least one
  // key is over the bound).
  bool NeedsRebuild() const;
  // Records `n` keys already within the bound (bulk paths that compute the
  // coordinates themselves) and `over` of them above it.
  void Count(int64_t n, int64_t over) {
    keys_seen_ += n;
    over_bound_ += over;
  }

 private:
  MipsAugmentation(float bound, int dim, float rebuild_fraction)
      : bound_(bound), dim_(dim), rebuild_fraction_(rebuild_fraction) {}
  float bound_ = 1.0f;
  int dim_ = 0;
  float rebuild_fraction_ = 0.02f;
  int64_t keys_seen_ = 0;
  int64_t over_bound_ = 0;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_MIPS_H_
