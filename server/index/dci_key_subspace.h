// The key subspace of one DCI-tree (docs/architecture.md, the index): an
// orthonormal basis of the `rank` leading principal directions of a sample
// of keys (the first batch), in which every node keeps the variance of its
// keys for its attention-mass estimate (dci_node_reps.h).
//
// Thread safety: immutable after Fit(); const methods may run concurrently.
#ifndef ICECACHE_SERVER_INDEX_DCI_KEY_SUBSPACE_H_
#define ICECACHE_SERVER_INDEX_DCI_KEY_SUBSPACE_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace icecache {

class DciKeySubspace {
 public:
  DciKeySubspace() = default;
  // rank is clamped to [0, dim].
  DciKeySubspace(int dim, int rank, uint64_t seed);

  // Fixes the basis from an evenly strided sample of at most 4096 of the
  // `n` keys (n x dim, fp32): PCA by subspace iteration from a
  // deterministic start.
  void Fit(const float* keys, int64_t n);
  // out[k] = x . basis_k, k < rank.
  void Project(const float* x, float* out) const;
  // The spread of a node from its centroid c, mean squared norm m2 and mean
  // squared projections pm2 (rank values): the variance along each basis
  // vector (lam, rank values) and the per-dimension residual variance
  // outside the subspace (*res).
  void DeriveSpread(const float* c, float m2, const float* pm2, float* lam, float* res) const;

  // The basis (rank x dim, empty before Fit), and a saved one put back (an
  // index image): false, changing nothing, unless it is rank x dim finite values.
  const std::vector<float>& basis() const { return basis_; }
  bool SetBasis(std::vector<float> basis);

  int dim() const { return dim_; }
  int rank() const { return rank_; }
  size_t bytes() const { return basis_.capacity() * sizeof(float); }

 private:
  int dim_ = 0;
  int rank_ = 0;
  uint64_t seed_ = 0;
  std::vector<float> basis_;  // rank x dim, orthonormal rows
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_DCI_KEY_SUBSPACE_H_
