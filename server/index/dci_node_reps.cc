#include "server/index/dci_node_reps.h"

#include <algorithm>

#include "common/populate.h"
#include "server/index/kernels.h"
#include "server/index/prefetch_lines.h"

namespace icecache {
namespace {

// v[i * width .. (i + 1) * width) = old v[order[i] * width ..).
template <typename T>
void PermuteRows(std::vector<T>* v, const std::vector<uint32_t>& order, size_t width) {
  if (v->empty() || width == 0) return;
  // The rows permuted in place through a per-thread copy kept between calls
  // (a fresh copy per call took a page fault per 4 KiB, 1 MiB of centroids
  // per bulk build at 32768 tokens).
  thread_local std::vector<T> old;
  old.assign(v->begin(), v->end());
  for (size_t i = 0; i < order.size(); ++i) {
    std::copy(old.begin() + order[i] * width, old.begin() + (order[i] + 1) * width,
              v->begin() + i * width);
  }
  if (old.capacity() * sizeof(T) > (size_t{32} << 20)) std::vector<T>().swap(old);
}

}  // namespace

void DciRepSums::Reset(int dim, int rank) {
  sum.assign(dim, 0.0);
  psum.assign(rank, 0.0);
  aug = sq = count = 0.0;
}

void DciRepSums::AddKey(const float* x, int dim, float a, float key_sq, const float* proj,
                        int rank) {
  for (int k = 0; k < dim; ++k) sum[k] += x[k];
  for (int k = 0; k < rank; ++k) psum[k] += static_cast<double>(proj[k]) * proj[k];
  aug += a;
  sq += key_sq;
  count += 1.0;
}

void DciRepSums::AddNode(const DciNodeReps& reps, uint32_t node, int dim, int rank) {
  const double w = reps.count[node];
  const float* c = &reps.centroid[static_cast<size_t>(node) * dim];
  for (int k = 0; k < dim; ++k) sum[k] += w * c[k];
  for (int k = 0; k < rank; ++k) psum[k] += w * reps.pm2[static_cast<size_t>(node) * rank + k];
  aug += w * reps.abar[node];
  sq += w * reps.m2[node];
  count += w;
}

void DciNodeReps::Reserve(uint32_t size, int dim, int rank) {
  count.reserve(size);
  centroid.reserve(static_cast<size_t>(size) * dim);
  for (auto* v : {&abar, &m2, &half_sq, &c2, &res}) v->reserve(size);
  pm2.reserve(static_cast<size_t>(size) * rank);
  lam.reserve(static_cast<size_t>(size) * rank);
}

void DciNodeReps::Resize(uint32_t size, int dim, int rank) {
  if (size > count.capacity()) {
    Reserve(static_cast<uint32_t>(std::max<size_t>(size, 2 * count.capacity())), dim, rank);
  }
  // Populated ahead of the zero fill: a new tree's representatives are
  // fresh memory, a page fault per 4 KiB otherwise (common/populate.h).
  ResizePopulated(&count, size, 0u);
  ResizePopulated(&centroid, static_cast<size_t>(size) * dim, 0.0f);
  for (auto* v : {&abar, &m2, &half_sq, &c2, &res}) ResizePopulated(v, size, 0.0f);
  ResizePopulated(&pm2, static_cast<size_t>(size) * rank, 0.0f);
  ResizePopulated(&lam, static_cast<size_t>(size) * rank, 0.0f);
}

void DciNodeReps::Init(uint32_t node, const float* x, float a, float sq,
                       const DciKeySubspace& sub) {
  const int d = sub.dim(), r = sub.rank();
  std::copy(x, x + d, &centroid[static_cast<size_t>(node) * d]);
  abar[node] = a;
  m2[node] = sq;
  count[node] = 1;
  half_sq[node] = 0.5f * (sq + a * a);
  c2[node] = sq;
  float* p = &pm2[static_cast<size_t>(node) * r];
  sub.Project(x, p);
  for (int k = 0; k < r; ++k) p[k] *= p[k];
  std::fill(&lam[static_cast<size_t>(node) * r], &lam[static_cast<size_t>(node) * r] + r, 0.0f);
  res[node] = 0.0f;
}

void DciNodeReps::Update(uint32_t node, const float* x, float a, float sq, const float* proj,
                         const DciKeySubspace& sub) {
  const int d = sub.dim(), r = sub.rank();
  float* c = &centroid[static_cast<size_t>(node) * d];
  const uint32_t cnt = ++count[node];
  const float w = 1.0f / static_cast<float>(cnt);
  for (int k = 0; k < d; ++k) c[k] += (x[k] - c[k]) * w;
  abar[node] += (a - abar[node]) * w;
  m2[node] += (sq - m2[node]) * w;
  c2[node] = DotF32(c, c, d);
  half_sq[node] = 0.5f * (c2[node] + abar[node] * abar[node]);
  float* p = &pm2[static_cast<size_t>(node) * r];
  for (int k = 0; k < r; ++k) p[k] += (proj[k] * proj[k] - p[k]) * w;
  sub.DeriveSpread(c, m2[node], p, &lam[static_cast<size_t>(node) * r], &res[node]);
}

void DciNodeReps::PrefetchForUpdate(uint32_t node, int dim, int rank) const {
  const size_t row = static_cast<size_t>(dim) * sizeof(float);
  const size_t rrow = static_cast<size_t>(rank) * sizeof(float);  // 0 without a subspace
  PrefetchBytes(centroid.data() + static_cast<size_t>(node) * dim, row);
  PrefetchBytes(pm2.data() + static_cast<size_t>(node) * rank, rrow);
  PrefetchBytes(lam.data() + static_cast<size_t>(node) * rank, rrow);
  for (const void* p :
       {static_cast<const void*>(&count[node]), static_cast<const void*>(&abar[node]),
        static_cast<const void*>(&m2[node]), static_cast<const void*>(&c2[node]),
        static_cast<const void*>(&half_sq[node]), static_cast<const void*>(&res[node])}) {
    PrefetchLine(p);
  }
}

void DciNodeReps::SetFromSums(uint32_t node, const DciRepSums& sums, const DciKeySubspace& sub) {
  const int d = sub.dim(), r = sub.rank();
  const double inv = sums.count > 0 ? 1.0 / sums.count : 0.0;
  float* c = &centroid[static_cast<size_t>(node) * d];
  for (int k = 0; k < d; ++k) c[k] = static_cast<float>(sums.sum[k] * inv);
  abar[node] = static_cast<float>(sums.aug * inv);
  m2[node] = static_cast<float>(sums.sq * inv);
  count[node] = static_cast<uint32_t>(sums.count);
  c2[node] = DotF32(c, c, d);
  half_sq[node] = 0.5f * (c2[node] + abar[node] * abar[node]);
  float* p = &pm2[static_cast<size_t>(node) * r];
  for (int k = 0; k < r; ++k) p[k] = static_cast<float>(sums.psum[k] * inv);
  sub.DeriveSpread(c, m2[node], p, &lam[static_cast<size_t>(node) * r], &res[node]);
}

void DciNodeReps::Permute(const std::vector<uint32_t>& order, int dim, int rank) {
  PermuteRows(&count, order, 1);
  PermuteRows(&centroid, order, dim);
  PermuteRows(&abar, order, 1);
  PermuteRows(&m2, order, 1);
  PermuteRows(&half_sq, order, 1);
  PermuteRows(&c2, order, 1);
  PermuteRows(&pm2, order, rank);
  PermuteRows(&lam, order, rank);
  PermuteRows(&res, order, 1);
}

size_t DciNodeReps::bytes() const {
  return count.size() * sizeof(uint32_t) +
         (centroid.size() + abar.size() + m2.size() + half_sq.size() + c2.size() + pm2.size() +
          lam.size() + res.size()) *
             sizeof(float);
}

}  // namespace icecache
