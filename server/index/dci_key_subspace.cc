#include "server/index/dci_key_subspace.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "server/index/kernels.h"

namespace icecache {
namespace {

// Gram-Schmidt on the `r` rows of v (r x d); a degenerate row falls back to
// a unit axis.
void Orthonormalize(std::vector<float>* v, int r, int d) {
  for (int k = 0; k < r; ++k) {
    float* vk = &(*v)[static_cast<size_t>(k) * d];
    for (int j = 0; j < k; ++j) {
      const float* vj = &(*v)[static_cast<size_t>(j) * d];
      const float p = DotF32(vk, vj, d);
      for (int c = 0; c < d; ++c) vk[c] -= p * vj[c];
    }
    float nrm = std::sqrt(DotF32(vk, vk, d));
    if (!(nrm > 1e-12f)) {
      std::fill(vk, vk + d, 0.0f);
      vk[k % d] = 1.0f;
      nrm = 1.0f;
    }
    for (int c = 0; c < d; ++c) vk[c] /= nrm;
  }
}

// Covariance (d x d) of an evenly strided sample of at most 4096 keys. Each
// entry is the sum of its products in sample order; the upper triangle is
// summed (four samples per pass over a row, so the row stays in registers)
// and mirrored, products being symmetric.
std::vector<float> SampleCovariance(const float* keys, int64_t n, int d) {
  const int64_t stride = std::max<int64_t>(1, n / 4096);
  std::vector<double> mean(d, 0.0);
  int64_t m = 0;
  for (int64_t i = 0; i < n; i += stride, ++m) {
    for (int k = 0; k < d; ++k) mean[k] += keys[i * d + k];
  }
  for (int k = 0; k < d; ++k) mean[k] /= static_cast<double>(m);
  // Per thread, kept between builds (2 MiB at 4096 samples of dim 128): a
  // fresh one costs a page fault per 4 KiB every build (see AssignScratch in
  // dci_tree_build.cc). Every element is written below.
  thread_local std::vector<float> centered;
  if (centered.size() < static_cast<size_t>(m) * d) centered.resize(static_cast<size_t>(m) * d);
  for (int64_t s = 0; s < m; ++s) {
    for (int k = 0; k < d; ++k) {
      centered[s * d + k] = static_cast<float>(keys[s * stride * d + k] - mean[k]);
    }
  }
  std::vector<float> cov(static_cast<size_t>(d) * d, 0.0f);
  int64_t s = 0;
  for (; s + 4 <= m; s += 4) {
    const float* __restrict r0 = &centered[s * d];
    const float* __restrict r1 = r0 + d;
    const float* __restrict r2 = r1 + d;
    const float* __restrict r3 = r2 + d;
    for (int a = 0; a < d; ++a) {
      float* __restrict ca = &cov[static_cast<size_t>(a) * d];
      const float a0 = r0[a], a1 = r1[a], a2 = r2[a], a3 = r3[a];
      for (int b = a; b < d; ++b) {
        float c = ca[b];
        c += a0 * r0[b];
        c += a1 * r1[b];
        c += a2 * r2[b];
        c += a3 * r3[b];
        ca[b] = c;
      }
    }
  }
  for (; s < m; ++s) {
    const float* row = &centered[s * d];
    for (int a = 0; a < d; ++a) {
      const float ra = row[a];
      float* ca = &cov[static_cast<size_t>(a) * d];
      for (int b = a; b < d; ++b) ca[b] += ra * row[b];
    }
  }
  for (int a = 0; a < d; ++a) {
    for (int b = 0; b < a; ++b)
      cov[static_cast<size_t>(a) * d + b] = cov[static_cast<size_t>(b) * d + a];
  }
  return cov;
}

}  // namespace

DciKeySubspace::DciKeySubspace(int dim, int rank, uint64_t seed)
    : dim_(dim), rank_(std::max(0, std::min(rank, dim))), seed_(seed) {}

void DciKeySubspace::Fit(const float* keys, int64_t n) {
  const int d = dim_;
  const int r = rank_;
  basis_.assign(static_cast<size_t>(r) * d, 0.0f);
  if (r == 0) return;
  const std::vector<float> cov = SampleCovariance(keys, n, d);
  std::vector<float> q(static_cast<size_t>(r) * d), z(static_cast<size_t>(r) * d);
  uint64_t state = seed_ * 6364136223846793005ULL + 1442695040888963407ULL;
  for (auto& v : q) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    v = static_cast<float>(static_cast<int64_t>(state >> 33) % 2001 - 1000) / 1000.0f;
  }
  Orthonormalize(&q, r, d);
  for (int it = 0; it < 12; ++it) {
    for (int k = 0; k < r; ++k) {
      DotRows(DType::kF32, cov.data(), d, d, &q[static_cast<size_t>(k) * d],
              &z[static_cast<size_t>(k) * d]);
    }
    Orthonormalize(&z, r, d);
    q.swap(z);
  }
  basis_ = std::move(q);
}

bool DciKeySubspace::SetBasis(std::vector<float> basis) {
  if (basis.size() != static_cast<size_t>(rank_) * dim_) return false;
  for (float v : basis) {
    if (!std::isfinite(v)) return false;
  }
  basis_ = std::move(basis);
  return true;
}

void DciKeySubspace::Project(const float* x, float* out) const {
  DotF32Rows(x, basis_.data(), nullptr, rank_, dim_, out);
}

void DciKeySubspace::DeriveSpread(const float* c, float m2, const float* pm2, float* lam,
                                  float* res) const {
  const int d = dim_;
  // The projections of c, batched (DotF32's bits); lam holds them first.
  DotF32Rows(c, basis_.data(), nullptr, rank_, d, lam);
  float captured = 0.0f;
  for (int k = 0; k < rank_; ++k) {
    const float cu = lam[k];
    lam[k] = std::max(0.0f, pm2[k] - cu * cu);
    captured += lam[k];
  }
  const float total = std::max(0.0f, m2 - DotF32(c, c, d));
  *res = std::max(0.0f, total - captured) / static_cast<float>(std::max(1, d - rank_));
}

}  // namespace icecache
