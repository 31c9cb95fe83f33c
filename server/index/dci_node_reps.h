// The representatives of one DCI-tree level's nodes (docs/architecture.md,
// the index): for each node, statistics of the keys below it from which the
// descent estimates the node's attention mass and routing finds the nearest
// node. One struct per level, shared by the live tree (dci_tree.h) and its
// rebuild (DciTreeRebuild): both compute the representatives with the same
// code (DciRepSums then SetFromSums), and a rebuild commits by swapping a
// level's DciNodeReps.
//
// Attention-mass model: a node's keys are Gaussian around the centroid c with
// covariance S (kept as `lam` in the key subspace plus an isotropic `res`
// outside it), so for query q at scale s its log-mass is estimated as
// log(count) + s q.c + s^2 q'Sq / 2.
//
// Thread safety: none; the owning tree's rules apply.
#ifndef ICECACHE_SERVER_INDEX_DCI_NODE_REPS_H_
#define ICECACHE_SERVER_INDEX_DCI_NODE_REPS_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "server/index/dci_key_subspace.h"

namespace icecache {

struct DciNodeReps;

// Running sums over the keys below one node, in double precision; filled key
// by key (level 1) or child by child (upper levels, weighted by the child's
// count), then turned into the node's representative by SetFromSums.
struct DciRepSums {
  std::vector<double> sum;   // dim: sum of the keys
  std::vector<double> psum;  // rank: sum of the squared projections on the basis
  double aug = 0.0;          // sum of the keys' MIPS coordinates a(k)
  double sq = 0.0;           // sum of the keys' squared norms
  double count = 0.0;        // number of keys

  void Reset(int dim, int rank);
  // One key x with MIPS coordinate a, squared norm sq and projections proj.
  void AddKey(const float* x, int dim, float a, float sq, const float* proj, int rank);
  // Every key below `node` of `reps` (its representative times its count).
  void AddNode(const DciNodeReps& reps, uint32_t node, int dim, int rank);
};

struct DciNodeReps {
  std::vector<uint32_t> count;  // keys below each node
  std::vector<float> centroid;  // size x dim: mean key
  std::vector<float> abar;      // mean MIPS coordinate a(k) of the keys
  std::vector<float> m2;        // mean squared key norm
  std::vector<float> half_sq;   // (|centroid|^2 + abar^2) / 2: augmented routing offset
  std::vector<float> c2;        // |centroid|^2: plain routing offset
  std::vector<float> pm2;       // size x rank: mean squared projection on each basis vector
  std::vector<float> lam;       // size x rank: key variance along each basis vector
  std::vector<float> res;       // key variance per dimension outside the subspace

  uint32_t size() const { return static_cast<uint32_t>(count.size()); }
  // New nodes are zero; existing ones keep their values.
  void Resize(uint32_t size, int dim, int rank);
  // Room for `size` nodes without reallocation (headroom.h).
  void Reserve(uint32_t size, int dim, int rank);
  // Node holding the single key x (MIPS coordinate a, squared norm sq).
  void Init(uint32_t node, const float* x, float a, float sq, const DciKeySubspace& sub);
  // Adds key x to the node's running means (incremental insert); `proj` is
  // x projected on the subspace (sub.Project), computed once per key for
  // every node it updates.
  void Update(uint32_t node, const float* x, float a, float sq, const float* proj,
              const DciKeySubspace& sub);
  // Asks for the cache lines Update(node) reads and writes (a decode
  // insert's path up the tree is cold: its nodes' misses overlap).
  void PrefetchForUpdate(uint32_t node, int dim, int rank) const;
  // The node's representative from the sums of the keys below it.
  void SetFromSums(uint32_t node, const DciRepSums& sums, const DciKeySubspace& sub);
  // Node order[i] becomes node i.
  void Permute(const std::vector<uint32_t>& order, int dim, int rank);
  size_t bytes() const;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_DCI_NODE_REPS_H_
