#include "server/index/dci_prioritized.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <queue>
#include <random>

#include "absl/strings/str_cat.h"
#include "server/index/dci_multilevel.h"
#include "server/index/kernels.h"

namespace icecache {

absl::StatusOr<std::unique_ptr<PrioritizedDci>> PrioritizedDci::Create(const float* points,
                                                                       int64_t n, int dim,
                                                                       const DciParams& params) {
  if (points == nullptr || n < 1) {
    return absl::InvalidArgumentError(absl::StrCat("DCI needs >= 1 point, got ", n));
  }
  if (n > static_cast<int64_t>(UINT32_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat("DCI holds at most 2^32-1 points, got ", n));
  }
  if (dim < 1) return absl::InvalidArgumentError(absl::StrCat("DCI dim must be >= 1, got ", dim));
  if (params.num_composite < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI num_composite must be >= 1, got ", params.num_composite));
  }
  if (params.num_simple < 1 || params.num_simple > 255) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI num_simple must be in [1, 255], got ", params.num_simple));
  }
  for (int64_t i = 0; i < n * dim; ++i) {
    if (!std::isfinite(points[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("DCI point ", i / dim, " column ", i % dim, " is not finite"));
    }
  }
  std::unique_ptr<PrioritizedDci> dci(new PrioritizedDci(n, dim, params));
  dci->points_.assign(points, points + n * dim);
  const int num_dirs = params.num_composite * params.num_simple;
  dci->directions_ = RandomUnitDirections(num_dirs, dim, params.seed);
  dci->proj_.resize(static_cast<size_t>(num_dirs) * n);
  dci->ids_.resize(static_cast<size_t>(num_dirs) * n);
  std::vector<float> raw(n);
  std::vector<uint32_t> order(n);
  for (int s = 0; s < num_dirs; ++s) {
    const float* u = &dci->directions_[static_cast<size_t>(s) * dim];
    DotRows(DType::kF32, dci->points_.data(), n, dim, u, raw.data());
    std::iota(order.begin(), order.end(), 0u);
    std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
      return raw[a] < raw[b] || (raw[a] == raw[b] && a < b);
    });
    float* p = &dci->proj_[static_cast<size_t>(s) * n];
    uint32_t* id = &dci->ids_[static_cast<size_t>(s) * n];
    for (int64_t i = 0; i < n; ++i) {
      p[i] = raw[order[i]];
      id[i] = order[i];
    }
  }
  return dci;
}

absl::Status PrioritizedDci::Query(const float* q, const DciQueryParams& params,
                                   std::vector<std::pair<float, uint32_t>>* out,
                                   int64_t* visited) const {
  if (q == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("DCI query and output must not be null");
  }
  if (params.k < 1 || params.max_candidates < params.k) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI query needs 1 <= k <= max_candidates, got k=", params.k,
                     " max_candidates=", params.max_candidates));
  }
  out->clear();
  const int m = params_.num_composite;
  const int L = params_.num_simple;
  const int num_dirs = m * L;
  // Per simple index: the query's projection and the two frontiers.
  std::vector<float> qproj(num_dirs);
  std::vector<int64_t> left(num_dirs), right(num_dirs);
  DotRows(DType::kF32, directions_.data(), num_dirs, dim_, q, qproj.data());
  for (int s = 0; s < num_dirs; ++s) {
    const float* p = &proj_[static_cast<size_t>(s) * n_];
    const int64_t pos = std::lower_bound(p, p + n_, qproj[s]) - p;
    left[s] = pos - 1;
    right[s] = pos;
  }
  // Gap to the next element of a simple index, and which side it is on.
  auto next_gap = [&](int s, bool* go_right) -> float {
    const float* p = &proj_[static_cast<size_t>(s) * n_];
    const float gl = left[s] >= 0 ? qproj[s] - p[left[s]] : INFINITY;
    const float gr = right[s] < n_ ? p[right[s]] - qproj[s] : INFINITY;
    *go_right = gr <= gl;
    return std::min(gl, gr);
  };
  using Entry = std::pair<float, int>;  // (gap, simple index)
  std::vector<std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>>> queues(m);
  for (int j = 0; j < m; ++j) {
    for (int l = 0; l < L; ++l) {
      bool r;
      const float g = next_gap(j * L + l, &r);
      if (std::isfinite(g)) queues[j].push({g, j * L + l});
    }
  }
  std::vector<uint8_t> counts(static_cast<size_t>(m) * n_, 0);
  std::vector<uint8_t> is_candidate(n_, 0);
  int64_t visits = 0;
  int num_candidates = 0;
  bool any = true;
  while (any && num_candidates < params.max_candidates && visits < params.max_visits) {
    any = false;
    for (int j = 0; j < m && num_candidates < params.max_candidates && visits < params.max_visits;
         ++j) {
      if (queues[j].empty()) continue;
      any = true;
      const int s = queues[j].top().second;
      queues[j].pop();
      bool go_right;
      next_gap(s, &go_right);
      const int64_t idx = go_right ? right[s]++ : left[s]--;
      const uint32_t id = ids_[static_cast<size_t>(s) * n_ + idx];
      ++visits;
      bool r;
      const float g = next_gap(s, &r);
      if (std::isfinite(g)) queues[j].push({g, s});
      uint8_t& c = counts[static_cast<size_t>(j) * n_ + id];
      if (++c == L && !is_candidate[id]) {
        is_candidate[id] = 1;
        ++num_candidates;
        const float* p = &points_[static_cast<size_t>(id) * dim_];
        float d2 = 0.0f;
        for (int k = 0; k < dim_; ++k) d2 += (p[k] - q[k]) * (p[k] - q[k]);
        out->push_back({d2, id});
      }
    }
  }
  const size_t k = std::min<size_t>(params.k, out->size());
  std::partial_sort(out->begin(), out->begin() + k, out->end());
  out->resize(k);
  if (visited != nullptr) *visited = visits;
  return absl::OkStatus();
}

size_t PrioritizedDci::bytes() const {
  return points_.size() * sizeof(float) + directions_.size() * sizeof(float) +
         proj_.size() * sizeof(float) + ids_.size() * sizeof(uint32_t);
}

}  // namespace icecache
