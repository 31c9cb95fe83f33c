// The multi-level prioritized DCI as published (IceFormer's MDCI, the index
// the ICE paper queries; Li and Malik, "Fast k-Nearest Neighbour Search via
// Prioritized DCI", ICML 2017, §4; reference code
// github.com/yuzhenmao/IceFormer MDCI/src/dci.c), used by the
// `mdci-published` selector (docs/architecture.md §3.9).
//
// Structure: every point lives on one level; a point is promoted one level
// up with probability 1 / ratio (ratio = ceil(n^(1 / levels)), as the
// reference sizes its levels), at most `levels - 1` times. A point below the
// top has a parent on the level above (its nearest neighbour there; exact
// here, where the reference finds it with a construction query). The top
// level's points are the root's children. Every node holds its children's
// projections on the same m x L random directions, sorted per direction: a
// small single-level prioritized DCI per node ("cell").
//
// Query (dci_query_single_point with cumulative candidates): a single-level
// prioritized DCI query of the root cell for `field_of_view` points that
// together hold >= `cover` finest-level points; on each level below, the
// same query in the cell of every expanded node, the union sorted by
// distance and cut to max(field_of_view, the nodes that hold `cover`
// points); on the last level a query for `k` points in each expanded cell.
// Every point that became a candidate (seen in all L lists of one composite
// index) gets an exact distance; the best `k` of them are returned.
//
// Ownership: copies the points. Thread safety: immutable after Create();
// Query() is const and safe to call concurrently (thread_local scratch).
// Deterministic for the seed.
#ifndef ICECACHE_SERVER_INDEX_DCI_MULTILEVEL_H_
#define ICECACHE_SERVER_INDEX_DCI_MULTILEVEL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace icecache {

// `count` random unit directions of `dim` floats (row-major), Gaussian then
// normalised, from `seed`: the projections of DCI (this file and
// dci_prioritized.h share them).
std::vector<float> RandomUnitDirections(int count, int dim, uint64_t seed);

struct MultiLevelDciParams {
  int num_composite = 2;  // m
  int num_simple = 7;     // L, <= 255
  int num_levels = 3;     // levels of points, 1..16
  uint64_t seed = 1234;
};

struct MultiLevelDciQuery {
  int k = 1;               // nearest points returned, >= 1
  int field_of_view = 10;  // nodes expanded per level, >= 1
  int64_t cover = 1;       // finest-level points the expanded nodes must hold
};

class MultiLevelDci {
 public:
  // Copies `n` points of `dim` floats. InvalidArgument for null points,
  // n < 1 or n >= 2^31, dim < 1, m < 1, L outside [1, 255], levels outside
  // [1, 16] or a non-finite value.
  static absl::StatusOr<std::unique_ptr<MultiLevelDci>> Create(const float* points, int64_t n,
                                                               int dim,
                                                               const MultiLevelDciParams& params);

  // What a build chose that a query needs and the points do not give back
  // cheaply: each point's level and parent (the nearest point one level up,
  // -1 on the top level; the costly part of a build) and the projection
  // directions (drawn from the seed by an implementation-defined
  // distribution). An index image (mdci-published, docs/architecture.md §5)
  // keeps these; the cells and sorted projections are recomputed.
  struct Structure {
    std::vector<uint8_t> levels;    // per point
    std::vector<int32_t> parents;   // per point
    std::vector<float> directions;  // (m x L) x dim, unit vectors
  };
  Structure structure() const;
  // The index a build with this structure made over these points, without
  // the nearest-neighbour search: the same cells, projections and answers.
  // InvalidArgument as Create, or naming what is inconsistent (array sizes,
  // a level >= num_levels, a parent that is not a point exactly one level
  // up, a parent on the top level, a direction not a finite unit vector).
  static absl::StatusOr<std::unique_ptr<MultiLevelDci>> FromStructure(
      const float* points, int64_t n, int dim, const MultiLevelDciParams& params,
      Structure structure);

  // What a query cost.
  struct Stats {
    int64_t projections = 0;  // sorted-list entries visited
    int64_t distances = 0;    // candidates given an exact distance
  };

  // The k nearest candidates found as (squared distance, point id),
  // ascending. `stats` (optional) receives what the query cost.
  // InvalidArgument for null q/out, k < 1, field_of_view < 1 or cover < 0.
  absl::Status Query(const float* q, const MultiLevelDciQuery& params,
                     std::vector<std::pair<float, uint32_t>>* out, Stats* stats = nullptr) const;

  int64_t size() const { return n_; }
  int levels() const { return top_level_ + 1; }
  size_t bytes() const;

 private:
  MultiLevelDci(int64_t n, int dim, const MultiLevelDciParams& params)
      : n_(n), dim_(dim), params_(params) {}
  void AssignLevels();
  void AssignParents(std::vector<int32_t>* parent) const;
  void BuildCells(const std::vector<int32_t>& parent);
  // One single-level query in `cell`: appends (distance, id) of each new
  // candidate to `out` until >= want candidates hold >= cover points (or the
  // cell is exhausted). Returns the projections visited.
  // A cell the walk would exhaust (want >= its size, or cover above what
  // its children hold) is scored directly: the same candidates, no walk.
  int64_t QueryCell(int cell, int want, int64_t cover, const float* q, float q_sq,
                    const float* qproj, std::vector<std::pair<float, uint32_t>>* out) const;

  int64_t n_;
  int dim_;
  MultiLevelDciParams params_;
  int top_level_ = 0;
  std::vector<float> points_;        // n x dim, in cell order (row r is point cell_ids_[r])
  std::vector<float> sq_norms_;      // per row of points_
  std::vector<float> directions_;    // (m*L) x dim, unit vectors
  std::vector<uint8_t> level_;       // per point
  std::vector<int64_t> subtree_;     // per point: points in its subtree, itself included
  std::vector<int32_t> cell_of_;     // per point: its cell (children), -1 when none
  std::vector<int64_t> cell_begin_;  // cells + 1 offsets into cell_ids_ (cell 0 = root)
  std::vector<uint32_t> cell_ids_;   // children of each cell
  std::vector<int64_t> cell_cover_;  // per cell: points in its children's subtrees
  // Per cell, per direction, the children's projections sorted ascending and
  // the child's index within the cell: at cell_begin * mL + s * size + i.
  std::vector<float> cell_proj_;
  std::vector<uint32_t> cell_local_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_DCI_MULTILEVEL_H_
