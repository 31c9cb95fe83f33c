// Prioritized Dynamic Continuous Indexing (Li and Malik, ICML 2016/2017;
// docs/architecture.md §3.7): `m` composite indices of `L` simple indices each. A simple
// index is a random unit direction u and the points' projections u.p kept
// sorted. A query finds its place in every sorted list and walks outward; per
// round, each composite index advances the simple index whose next element is
// closest in projection (a priority queue of size L). A point seen in all L
// simple indices of one composite index becomes a candidate and gets an exact
// Euclidean distance. The walk stops when enough candidates were retrieved or
// enough projections visited.
//
// For maximum inner product search, build it over MIPS-augmented points and
// query with augmented queries (mips.h).
//
// Ownership: keeps its own copy of the points and the sorted projections
// (projections as fp32; meant for the small upper levels of the DCI-tree and
// for tests, not for every key of a long sequence).
// Thread safety: immutable after Create(); Query() is const and safe to call
// concurrently. Deterministic for the seed.
#ifndef ICECACHE_SERVER_INDEX_DCI_PRIORITIZED_H_
#define ICECACHE_SERVER_INDEX_DCI_PRIORITIZED_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace icecache {

struct DciParams {
  int num_composite = 2;  // m
  int num_simple = 7;     // L, <= 255
  uint64_t seed = 1234;
};

struct DciQueryParams {
  int k = 1;                     // nearest neighbours returned, >= 1
  int max_candidates = 64;       // stop after this many candidates (>= k)
  int64_t max_visits = 1 << 30;  // stop after this many projections visited
};

class PrioritizedDci {
 public:
  // Copies `n` points of `dim` floats. InvalidArgument for null points,
  // n < 1, dim < 1, m < 1, L outside [1, 255] or a non-finite value.
  static absl::StatusOr<std::unique_ptr<PrioritizedDci>> Create(const float* points, int64_t n,
                                                                int dim, const DciParams& params);

  // Up to k nearest candidates as (squared distance, point id), ascending.
  // `visited` (optional) receives the projections visited. InvalidArgument
  // for null q/out, k < 1 or max_candidates < k.
  absl::Status Query(const float* q, const DciQueryParams& params,
                     std::vector<std::pair<float, uint32_t>>* out,
                     int64_t* visited = nullptr) const;

  int64_t size() const { return n_; }
  int dim() const { return dim_; }
  size_t bytes() const;

 private:
  PrioritizedDci(int64_t n, int dim, const DciParams& params) : n_(n), dim_(dim), params_(params) {}

  int64_t n_;
  int dim_;
  DciParams params_;
  std::vector<float> points_;      // n x dim
  std::vector<float> directions_;  // (m*L) x dim, unit vectors
  std::vector<float> proj_;        // (m*L) x n, sorted ascending per simple index
  std::vector<uint32_t> ids_;      // (m*L) x n, point id of each sorted projection
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_DCI_PRIORITIZED_H_
