#include "server/index/dci_multilevel.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "server/index/kernels.h"

namespace icecache {
namespace {

using Hit = std::pair<float, uint32_t>;

absl::Status CheckParams(const float* points, int64_t n, int dim, const MultiLevelDciParams& p) {
  if (points == nullptr || n < 1 || n >= (int64_t{1} << 31)) {
    return absl::InvalidArgumentError(
        absl::StrCat("multi-level DCI needs 1 <= points < 2^31, got ", n));
  }
  if (dim < 1) return absl::InvalidArgumentError(absl::StrCat("DCI dim must be >= 1, got ", dim));
  if (p.num_composite < 1 || p.num_simple < 1 || p.num_simple > 255) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI needs num_composite >= 1 and num_simple in ", "[1, 255], got ",
                     p.num_composite, " and ", p.num_simple));
  }
  if (p.num_levels < 1 || p.num_levels > 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI num_levels must be in [1, 16], got ", p.num_levels));
  }
  for (int64_t i = 0; i < n * dim; ++i) {
    if (!std::isfinite(points[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("DCI point ", i / dim, " column ", i % dim, " is not finite"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<float> RandomUnitDirections(int count, int dim, uint64_t seed) {
  std::vector<float> directions(static_cast<size_t>(count) * dim);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int s = 0; s < count; ++s) {
    float* u = &directions[static_cast<size_t>(s) * dim];
    double sq = 0.0;
    do {
      sq = 0.0;
      for (int c = 0; c < dim; ++c) {
        u[c] = normal(rng);
        sq += static_cast<double>(u[c]) * u[c];
      }
    } while (sq == 0.0);
    const float inv = static_cast<float>(1.0 / std::sqrt(sq));
    for (int c = 0; c < dim; ++c) u[c] *= inv;
  }
  return directions;
}

absl::StatusOr<std::unique_ptr<MultiLevelDci>> MultiLevelDci::Create(
    const float* points, int64_t n, int dim, const MultiLevelDciParams& params) {
  if (absl::Status s = CheckParams(points, n, dim, params); !s.ok()) return s;
  std::unique_ptr<MultiLevelDci> dci(new MultiLevelDci(n, dim, params));
  dci->points_.assign(points, points + n * dim);
  dci->directions_ =
      RandomUnitDirections(params.num_composite * params.num_simple, dim, params.seed);
  dci->AssignLevels();
  std::vector<int32_t> parent;
  dci->AssignParents(&parent);
  dci->BuildCells(parent);
  return dci;
}

MultiLevelDci::Structure MultiLevelDci::structure() const {
  Structure st;
  st.levels = level_;
  st.directions = directions_;
  st.parents.assign(n_, -1);
  for (int64_t i = 0; i < n_; ++i) {
    const int32_t cell = cell_of_[i];
    if (cell < 0) continue;
    for (int64_t r = cell_begin_[cell]; r < cell_begin_[cell + 1]; ++r) {
      st.parents[cell_ids_[r]] = static_cast<int32_t>(i);
    }
  }
  return st;
}

namespace {

// Why `st` cannot be the structure of n points of `dim` ("" when it can).
std::string StructureProblem(const MultiLevelDci::Structure& st, int64_t n, int dim,
                             const MultiLevelDciParams& p, int* top) {
  const size_t dirs = static_cast<size_t>(p.num_composite) * p.num_simple;
  if (st.levels.size() != static_cast<size_t>(n) || st.parents.size() != st.levels.size() ||
      st.directions.size() != dirs * dim) {
    return "array sizes disagree with the points and parameters";
  }
  *top = 0;
  for (uint8_t l : st.levels) {
    if (l >= p.num_levels) return absl::StrCat("a point on level ", l);
    *top = std::max<int>(*top, l);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t parent = st.parents[i];
    if (st.levels[i] == *top ? parent != -1
                             : parent < 0 || parent >= n || st.levels[parent] != st.levels[i] + 1) {
      return absl::StrCat("point ", i, " has parent ", parent);
    }
  }
  for (size_t s = 0; s < dirs; ++s) {
    double sq = 0.0;
    for (int c = 0; c < dim; ++c) {
      const float v = st.directions[s * dim + c];
      if (!std::isfinite(v)) return absl::StrCat("direction ", s, " is not finite");
      sq += static_cast<double>(v) * v;
    }
    if (std::abs(sq - 1.0) > 1e-3) return absl::StrCat("direction ", s, " is not a unit vector");
  }
  return "";
}

}  // namespace

absl::StatusOr<std::unique_ptr<MultiLevelDci>> MultiLevelDci::FromStructure(
    const float* points, int64_t n, int dim, const MultiLevelDciParams& params,
    Structure structure) {
  if (absl::Status s = CheckParams(points, n, dim, params); !s.ok()) return s;
  int top = 0;
  if (std::string why = StructureProblem(structure, n, dim, params, &top); !why.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("multi-level DCI structure: ", why));
  }
  std::unique_ptr<MultiLevelDci> dci(new MultiLevelDci(n, dim, params));
  dci->points_.assign(points, points + n * dim);
  dci->directions_ = std::move(structure.directions);
  dci->level_ = std::move(structure.levels);
  dci->top_level_ = top;
  dci->BuildCells(structure.parents);
  return dci;
}

// The reference promotes each point with a fixed probability per level so
// that the levels shrink geometrically to a small top; ratio n^(1/levels)
// gives about one ratio's worth of points on the top level.
void MultiLevelDci::AssignLevels() {
  const double ratio =
      std::max(2.0, std::ceil(std::pow(static_cast<double>(n_), 1.0 / params_.num_levels)));
  std::mt19937_64 rng(params_.seed ^ 0x9e3779b97f4a7c15ULL);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  level_.assign(n_, 0);
  top_level_ = 0;
  for (int64_t i = 0; i < n_; ++i) {
    int l = 0;
    while (l < params_.num_levels - 1 && u(rng) < 1.0 / ratio) ++l;
    level_[i] = static_cast<uint8_t>(l);
    top_level_ = std::max(top_level_, l);
  }
}

// Each point below the top gets its nearest neighbour one level up as its
// parent (exact, by SIMD dot products: |p - u|^2 = |u|^2 - 2 p.u + |p|^2).
void MultiLevelDci::AssignParents(std::vector<int32_t>* parent) const {
  parent->assign(n_, -1);
  std::vector<float> upper, upper_sq, dots;
  std::vector<int32_t> upper_ids;
  for (int l = top_level_ - 1; l >= 0; --l) {
    upper.clear();
    upper_ids.clear();
    upper_sq.clear();
    for (int64_t i = 0; i < n_; ++i) {
      if (level_[i] != l + 1) continue;
      const float* p = &points_[static_cast<size_t>(i) * dim_];
      upper.insert(upper.end(), p, p + dim_);
      upper_ids.push_back(static_cast<int32_t>(i));
      upper_sq.push_back(std::inner_product(p, p + dim_, p, 0.0f));
    }
    const int64_t nu = static_cast<int64_t>(upper_ids.size());
    dots.resize(nu);
    for (int64_t i = 0; i < n_; ++i) {
      if (level_[i] != l) continue;
      DotRows(DType::kF32, upper.data(), nu, dim_, &points_[static_cast<size_t>(i) * dim_],
              dots.data());
      int64_t best = 0;
      for (int64_t j = 1; j < nu; ++j) {
        if (upper_sq[j] - 2 * dots[j] < upper_sq[best] - 2 * dots[best]) best = j;
      }
      (*parent)[i] = upper_ids[best];
    }
  }
}

void MultiLevelDci::BuildCells(const std::vector<int32_t>& parent) {
  subtree_.assign(n_, 1);
  for (int l = 0; l < top_level_; ++l) {
    for (int64_t i = 0; i < n_; ++i) {
      if (level_[i] == l) subtree_[parent[i]] += subtree_[i];
    }
  }
  // Cell 0 is the root (the top level); then one cell per point with children.
  std::vector<int64_t> num_children(n_, 0);
  for (int64_t i = 0; i < n_; ++i) {
    if (parent[i] >= 0) ++num_children[parent[i]];
  }
  cell_of_.assign(n_, -1);
  cell_begin_.assign(1, 0);
  int64_t top_count = 0;
  for (int64_t i = 0; i < n_; ++i) top_count += level_[i] == top_level_;
  cell_begin_.push_back(top_count);
  for (int64_t i = 0; i < n_; ++i) {
    if (num_children[i] == 0) continue;
    cell_of_[i] = static_cast<int32_t>(cell_begin_.size() - 1);
    cell_begin_.push_back(cell_begin_.back() + num_children[i]);
  }
  cell_ids_.resize(cell_begin_.back());
  std::vector<int64_t> fill(cell_begin_.begin(), cell_begin_.end() - 1);
  for (int64_t i = 0; i < n_; ++i) {
    const int cell = parent[i] >= 0 ? cell_of_[parent[i]] : 0;
    cell_ids_[fill[cell]++] = static_cast<uint32_t>(i);
  }
  cell_cover_.assign(cell_begin_.size() - 1, 0);
  for (size_t c = 0; c + 1 < cell_begin_.size(); ++c) {
    for (int64_t r = cell_begin_[c]; r < cell_begin_[c + 1]; ++r) {
      cell_cover_[c] += subtree_[cell_ids_[r]];
    }
  }
  const int num_dirs = params_.num_composite * params_.num_simple;
  std::vector<float> proj(static_cast<size_t>(num_dirs) * n_);
  for (int s = 0; s < num_dirs; ++s) {
    DotRows(DType::kF32, points_.data(), n_, dim_, &directions_[static_cast<size_t>(s) * dim_],
            &proj[static_cast<size_t>(s) * n_]);
  }
  cell_proj_.resize(cell_ids_.size() * num_dirs);
  cell_local_.resize(cell_ids_.size() * num_dirs);
  std::vector<uint32_t> order;
  for (size_t c = 0; c + 1 < cell_begin_.size(); ++c) {
    const int64_t b = cell_begin_[c];
    const int64_t size = cell_begin_[c + 1] - b;
    for (int s = 0; s < num_dirs; ++s) {
      const float* ps = &proj[static_cast<size_t>(s) * n_];
      order.resize(size);
      std::iota(order.begin(), order.end(), 0u);
      std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t z) {
        const float pa = ps[cell_ids_[b + a]], pz = ps[cell_ids_[b + z]];
        return pa < pz || (pa == pz && a < z);
      });
      const size_t at = static_cast<size_t>(b) * num_dirs + static_cast<size_t>(s) * size;
      for (int64_t i = 0; i < size; ++i) {
        cell_proj_[at + i] = ps[cell_ids_[b + order[i]]];
        cell_local_[at + i] = order[i];
      }
    }
  }
  // Rows in cell order: a cell's children are contiguous for the SIMD scan.
  std::vector<float> by_cell(points_.size());
  sq_norms_.resize(n_);
  for (int64_t r = 0; r < n_; ++r) {
    const float* p = &points_[static_cast<size_t>(cell_ids_[r]) * dim_];
    std::copy(p, p + dim_, &by_cell[static_cast<size_t>(r) * dim_]);
    sq_norms_[r] = std::inner_product(p, p + dim_, p, 0.0f);
  }
  points_ = std::move(by_cell);
}

int64_t MultiLevelDci::QueryCell(int cell, int want, int64_t cover, const float* q, float q_sq,
                                 const float* qproj, std::vector<Hit>* out) const {
  const int m = params_.num_composite, L = params_.num_simple, num_dirs = m * L;
  const int64_t b = cell_begin_[cell];
  const int64_t size = cell_begin_[cell + 1] - b;
  if (size == 0) return 0;
  auto distance = [&](int64_t row, float dot) {
    return std::max(0.0f, sq_norms_[row] - 2.0f * dot + q_sq);
  };
  if (want >= size || cover > cell_cover_[cell]) {
    thread_local std::vector<float> dots;
    dots.resize(size);
    DotRows(DType::kF32, &points_[static_cast<size_t>(b) * dim_], size, dim_, q, dots.data());
    for (int64_t i = 0; i < size; ++i) out->push_back({distance(b + i, dots[i]), cell_ids_[b + i]});
    return 0;
  }
  thread_local std::vector<uint8_t> counts, seen;
  thread_local std::vector<int64_t> left, right;
  thread_local std::vector<float> gap;
  counts.assign(static_cast<size_t>(m) * size, 0);
  seen.assign(size, 0);
  left.resize(num_dirs);
  right.resize(num_dirs);
  gap.resize(num_dirs);
  auto row = [&](int s) { return &cell_proj_[static_cast<size_t>(b) * num_dirs + s * size]; };
  auto next_gap = [&](int s) {
    const float* p = row(s);
    const float gl = left[s] >= 0 ? qproj[s] - p[left[s]] : INFINITY;
    const float gr = right[s] < size ? p[right[s]] - qproj[s] : INFINITY;
    return std::min(gl, gr);
  };
  for (int s = 0; s < num_dirs; ++s) {
    const float* p = row(s);
    right[s] = std::lower_bound(p, p + size, qproj[s]) - p;
    left[s] = right[s] - 1;
    gap[s] = next_gap(s);
  }
  int64_t visits = 0, covered = 0;
  int found = 0;
  for (bool progressed = true; progressed;) {
    progressed = false;
    for (int j = 0; j < m; ++j) {
      const int s = static_cast<int>(std::min_element(&gap[j * L], &gap[j * L] + L) - &gap[0]);
      if (!std::isfinite(gap[s])) continue;
      progressed = true;
      const float* p = row(s);
      const bool go_right = right[s] < size && (left[s] < 0 || p[right[s]] - qproj[s] <= gap[s]);
      const int64_t idx = go_right ? right[s]++ : left[s]--;
      gap[s] = next_gap(s);
      ++visits;
      const uint32_t local = cell_local_[static_cast<size_t>(b) * num_dirs + s * size + idx];
      if (++counts[static_cast<size_t>(j) * size + local] != L || seen[local]) continue;
      seen[local] = 1;
      const uint32_t id = cell_ids_[b + local];
      const float* row_p = &points_[static_cast<size_t>(b + local) * dim_];
      out->push_back({distance(b + local, std::inner_product(row_p, row_p + dim_, q, 0.0f)), id});
      covered += subtree_[id];
      if (++found >= want && covered >= cover) return visits;
    }
  }
  return visits;
}

absl::Status MultiLevelDci::Query(const float* q, const MultiLevelDciQuery& params,
                                  std::vector<Hit>* out, Stats* stats) const {
  if (q == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("DCI query and output must not be null");
  }
  if (params.k < 1 || params.field_of_view < 1 || params.cover < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI query needs k >= 1, field_of_view >= 1 and cover >= 0, got ", params.k,
                     ", ", params.field_of_view, ", ", params.cover));
  }
  const int num_dirs = params_.num_composite * params_.num_simple;
  thread_local std::vector<float> qproj;
  thread_local std::vector<Hit> expand, next;
  qproj.resize(num_dirs);
  DotRows(DType::kF32, directions_.data(), num_dirs, dim_, q, qproj.data());
  const float q_sq = std::inner_product(q, q + dim_, q, 0.0f);
  out->clear();
  Stats st;
  // Sorts `hits` and keeps the expanded nodes: the field of view, or more
  // while they hold fewer than `cover` points.
  auto cut = [&](std::vector<Hit>* hits) {
    std::sort(hits->begin(), hits->end());
    size_t keep = std::min<size_t>(params.field_of_view, hits->size());
    int64_t held = 0;
    for (size_t i = 0; i < hits->size(); ++i) {
      held += subtree_[(*hits)[i].second];
      if (held >= params.cover) {
        keep = std::max(keep, i + 1);
        break;
      }
      if (i + 1 == hits->size()) keep = hits->size();
    }
    hits->resize(keep);
  };
  if (top_level_ == 0) {
    st.projections += QueryCell(0, params.k, 0, q, q_sq, qproj.data(), out);
  } else {
    expand.clear();
    st.projections +=
        QueryCell(0, params.field_of_view, params.cover, q, q_sq, qproj.data(), &expand);
    out->insert(out->end(), expand.begin(), expand.end());  // cumulative candidates
    cut(&expand);
    for (int level = top_level_ - 1; level >= 1; --level) {
      next.clear();
      for (const Hit& e : expand) {
        if (cell_of_[e.second] < 0) continue;
        st.projections += QueryCell(cell_of_[e.second], params.field_of_view, params.cover, q, q_sq,
                                    qproj.data(), &next);
      }
      out->insert(out->end(), next.begin(), next.end());
      cut(&next);
      expand.swap(next);
    }
    for (const Hit& e : expand) {
      if (cell_of_[e.second] < 0) continue;
      st.projections += QueryCell(cell_of_[e.second], params.k, 0, q, q_sq, qproj.data(), out);
    }
  }
  st.distances = static_cast<int64_t>(out->size());
  const size_t k = std::min<size_t>(params.k, out->size());
  std::partial_sort(out->begin(), out->begin() + k, out->end());
  out->resize(k);
  if (stats != nullptr) *stats = st;
  return absl::OkStatus();
}

size_t MultiLevelDci::bytes() const {
  return points_.size() * sizeof(float) + directions_.size() * sizeof(float) + level_.size() +
         subtree_.size() * sizeof(int64_t) + cell_of_.size() * sizeof(int32_t) +
         cell_begin_.size() * sizeof(int64_t) + cell_ids_.size() * sizeof(uint32_t) +
         cell_proj_.size() * sizeof(float) + cell_local_.size() * sizeof(uint32_t);
}

}  // namespace icecache
