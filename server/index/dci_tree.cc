#include "server/index/dci_tree.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/kernels.h"

namespace icecache {

namespace {

float SquaredNorm(const float* x, int dim) { return DotF32(x, x, dim); }

// Software prefetch of `bytes` bytes from `p` (every 64-byte line). The
// selection descent reads representatives and pages of ids known in
// advance but scattered in memory: asking for all of them at once lets the
// cache misses overlap instead of being taken one after the other.
inline void PrefetchBytes(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  const char* end = c + bytes;
  for (c = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(c) & ~uintptr_t{63}); c < end;
       c += 64) {
    __builtin_prefetch(c);
  }
}

// Variance along each basis vector and the per-dimension residual variance
// of a node from its centroid c, mean squared norm m2 and mean squared
// projections pm2.
void DeriveSpreadOf(const float* basis, int rank, int dim, const float* c, float m2,
                    const float* pm2, float* lam, float* res) {
  float captured = 0.0f;
  for (int k = 0; k < rank; ++k) {
    const float cu = DotF32(c, basis + static_cast<size_t>(k) * dim, dim);
    lam[k] = std::max(0.0f, pm2[k] - cu * cu);
    captured += lam[k];
  }
  const float total = std::max(0.0f, m2 - SquaredNorm(c, dim));
  *res = std::max(0.0f, total - captured) / static_cast<float>(std::max(1, dim - rank));
}

absl::Status CheckKeys(const float* keys, int64_t n, int dim,
                       const std::vector<Placement>* placements) {
  if (keys == nullptr || placements == nullptr) {
    return absl::InvalidArgumentError("keys and placements must not be null");
  }
  if (n < 1) return absl::InvalidArgumentError(absl::StrCat("key count must be > 0, got ", n));
  for (int64_t i = 0; i < n; ++i) {
    for (int c = 0; c < dim; ++c) {
      if (!std::isfinite(keys[i * dim + c])) {
        return absl::InvalidArgumentError(
            absl::StrCat("key row ", i, " column ", c, " is not finite"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

size_t DciTree::Level::bytes(int dim) const {
  size_t b =
      (key.capacity() + parent.capacity() + count.capacity()) * sizeof(uint32_t) +
      (centroid.capacity() + abar.capacity() + m2.capacity() + half_sq.capacity() + pm2.capacity() +
       lam.capacity() + res.capacity() + outlier.capacity() + out_dev.capacity()) *
          sizeof(float) +
      centroid16.capacity() * sizeof(uint16_t) +
      children.capacity() * sizeof(std::vector<uint32_t>);
  for (const auto& c : children) b += c.capacity() * sizeof(uint32_t);
  return b;
}

absl::StatusOr<std::unique_ptr<DciTree>> DciTree::Create(const DciTreeParams& params) {
  if (params.dim < 1 || params.dim > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI-tree dim must be in [1, 1024], got ", params.dim));
  }
  if (params.page_tokens < 1 || params.page_tokens > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI-tree page_tokens must be in [1, 256], got ", params.page_tokens));
  }
  if (params.ratio < 0 || params.ratio == 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI-tree promotion ratio must be 0 (auto) or >= 2, got ", params.ratio));
  }
  if (params.locality_window < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI-tree locality_window must be >= 0, got ", params.locality_window));
  }
  if (params.spread_rank < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DCI-tree spread_rank must be >= 0, got ", params.spread_rank));
  }
  if (params.route_fov < 1 || params.build_candidates < 1 || params.refine_iters < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DCI-tree route_fov and build_candidates must be >= 1 and refine_iters >= 0, got ",
        params.route_fov, ", ", params.build_candidates, ", ", params.refine_iters));
  }
  ASSIGN_OR_RETURN(MipsAugmentation mips,
                   MipsAugmentation::FromMaxNorm(1.0f, params.dim, params.norm_headroom,
                                                 params.rebuild_fraction));
  const int ratio = params.ratio > 0 ? params.ratio : std::max(2, params.page_tokens);
  std::unique_ptr<DciTree> tree(new DciTree(params, ratio, mips));
  tree->rank_ = std::min(params.spread_rank, params.dim);
  return tree;
}

void DciTree::FitBasis(const float* keys, int64_t n) {
  const int d = params_.dim;
  const int r = rank_;
  basis_.assign(static_cast<size_t>(r) * d, 0.0f);
  if (r == 0) return;
  // Covariance of an evenly strided sample of at most 4096 keys.
  const int64_t stride = std::max<int64_t>(1, n / 4096);
  std::vector<double> mean(d, 0.0);
  int64_t m = 0;
  for (int64_t i = 0; i < n; i += stride, ++m) {
    for (int k = 0; k < d; ++k) mean[k] += keys[i * d + k];
  }
  for (int k = 0; k < d; ++k) mean[k] /= static_cast<double>(m);
  std::vector<float> cov(static_cast<size_t>(d) * d, 0.0f);
  std::vector<float> row(d);
  for (int64_t i = 0; i < n; i += stride) {
    for (int k = 0; k < d; ++k) row[k] = static_cast<float>(keys[i * d + k] - mean[k]);
    for (int a = 0; a < d; ++a) {
      const float ra = row[a];
      float* ca = &cov[static_cast<size_t>(a) * d];
      for (int b = 0; b < d; ++b) ca[b] += ra * row[b];
    }
  }
  // Subspace iteration from a deterministic start, Gram-Schmidt each round.
  std::vector<float> q(static_cast<size_t>(r) * d), z(static_cast<size_t>(r) * d);
  uint64_t state = params_.seed * 6364136223846793005ULL + 1442695040888963407ULL;
  for (auto& v : q) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    v = static_cast<float>(static_cast<int64_t>(state >> 33) % 2001 - 1000) / 1000.0f;
  }
  auto orthonormalize = [&](std::vector<float>& v) {
    for (int k = 0; k < r; ++k) {
      float* vk = &v[static_cast<size_t>(k) * d];
      for (int j = 0; j < k; ++j) {
        const float* vj = &v[static_cast<size_t>(j) * d];
        const float p = DotF32(vk, vj, d);
        for (int c = 0; c < d; ++c) vk[c] -= p * vj[c];
      }
      float nrm = std::sqrt(SquaredNorm(vk, d));
      if (!(nrm > 1e-12f)) {  // degenerate: fall back to a unit axis
        std::fill(vk, vk + d, 0.0f);
        vk[k % d] = 1.0f;
        nrm = 1.0f;
      }
      for (int c = 0; c < d; ++c) vk[c] /= nrm;
    }
  };
  orthonormalize(q);
  for (int it = 0; it < 12; ++it) {
    for (int k = 0; k < r; ++k) {
      DotRows(DType::kF32, cov.data(), d, d, &q[static_cast<size_t>(k) * d],
              &z[static_cast<size_t>(k) * d]);
    }
    orthonormalize(z);
    q.swap(z);
  }
  basis_ = std::move(q);
}

void DciTree::Project(const float* x, float* out) const {
  for (int k = 0; k < rank_; ++k) {
    out[k] = DotF32(x, &basis_[static_cast<size_t>(k) * params_.dim], params_.dim);
  }
}

void DciTree::DeriveSpread(int level, uint32_t node) {
  Level& L = levels_[level];
  const int d = params_.dim;
  DeriveSpreadOf(basis_.data(), rank_, d, &L.centroid[static_cast<size_t>(node) * d], L.m2[node],
                 &L.pm2[static_cast<size_t>(node) * rank_],
                 &L.lam[static_cast<size_t>(node) * rank_], &L.res[node]);
}

void DciTree::ResizeLevel(int level, uint32_t size) {
  Level& L = levels_[level];
  L.count.resize(size, 0);
  L.centroid.resize(static_cast<size_t>(size) * params_.dim, 0.0f);
  L.abar.resize(size, 0.0f);
  L.m2.resize(size, 0.0f);
  L.half_sq.resize(size, 0.0f);
  L.pm2.resize(static_cast<size_t>(size) * rank_, 0.0f);
  L.lam.resize(static_cast<size_t>(size) * rank_, 0.0f);
  L.res.resize(size, 0.0f);
  if (params_.outlier_reps) {
    L.outlier.resize(static_cast<size_t>(size) * params_.dim, 0.0f);
    L.out_dev.resize(size, 0.0f);
  }
}

DciTree::~DciTree() = default;

uint32_t DciTree::level_size(int level) const {
  if (level == 0) return static_cast<uint32_t>(key_top_.size());
  if (level < 1 || level > top_level()) return 0;
  return levels_[level].size();
}

int DciTree::PromotionLevel(std::vector<uint32_t>* counts) const {
  auto& c = *counts;
  ++c[0];
  int l = 0;
  for (;;) {
    const uint64_t above = l + 1 < static_cast<int>(c.size()) ? c[l + 1] : 0;
    const bool bootstrap = l == 0 && above == 0;  // the first key opens level 1
    if (!bootstrap && c[l] < static_cast<uint64_t>(ratio_) * (above + 1)) break;
    if (l + 1 == static_cast<int>(c.size())) c.push_back(0);
    ++c[l + 1];
    ++l;
  }
  return l;
}

float DciTree::RouteScore(int level, uint32_t node, const float* x, float a) const {
  const Level& L = levels_[level];
  if (!params_.augmented_routing) {
    const float* c = &L.centroid[static_cast<size_t>(node) * params_.dim];
    return DotF32(x, c, params_.dim) - 0.5f * SquaredNorm(c, params_.dim);
  }
  return DotF32(x, &L.centroid[static_cast<size_t>(node) * params_.dim], params_.dim) +
         a * L.abar[node] - L.half_sq[node];
}

void DciTree::Route(const float* x, float a, int target, int keep,
                    const std::vector<std::vector<int32_t>>* free, RouteScratch* s,
                    std::vector<std::pair<float, uint32_t>>* out) const {
  out->clear();
  const int top = top_level();
  s->cand.resize(levels_[top].size());
  std::iota(s->cand.begin(), s->cand.end(), 0u);
  auto better = [](const std::pair<float, uint32_t>& p, const std::pair<float, uint32_t>& q) {
    return p.first > q.first || (p.first == q.first && p.second < q.second);
  };
  for (int j = top;; --j) {
    s->scored.clear();
    for (uint32_t node : s->cand) {
      if (free != nullptr && (*free)[j][node] <= 0) continue;
      s->scored.push_back({RouteScore(j, node, x, a), node});
    }
    if (j == target) {
      const size_t k = std::min<size_t>(keep, s->scored.size());
      std::partial_sort(s->scored.begin(), s->scored.begin() + k, s->scored.end(), better);
      out->assign(s->scored.begin(), s->scored.begin() + k);
      return;
    }
    const size_t k = std::min<size_t>(params_.route_fov, s->scored.size());
    std::partial_sort(s->scored.begin(), s->scored.begin() + k, s->scored.end(), better);
    s->next.clear();
    for (size_t i = 0; i < k; ++i) {
      const auto& ch = levels_[j].children[s->scored[i].second];
      s->next.insert(s->next.end(), ch.begin(), ch.end());
    }
    s->cand.swap(s->next);
  }
}

void DciTree::InitNodeRep(int level, uint32_t node, const float* x, float a, float sq) {
  Level& L = levels_[level];
  const int d = params_.dim;
  std::copy(x, x + d, &L.centroid[static_cast<size_t>(node) * d]);
  L.abar[node] = a;
  L.m2[node] = sq;
  L.count[node] = 1;
  L.half_sq[node] = 0.5f * (sq + a * a);
  float* pm2 = &L.pm2[static_cast<size_t>(node) * rank_];
  Project(x, pm2);
  for (int k = 0; k < rank_; ++k) pm2[k] *= pm2[k];
  std::fill(&L.lam[static_cast<size_t>(node) * rank_],
            &L.lam[static_cast<size_t>(node) * rank_] + rank_, 0.0f);
  L.res[node] = 0.0f;
  if (params_.outlier_reps) {
    std::copy(x, x + d, &L.outlier[static_cast<size_t>(node) * d]);
    L.out_dev[node] = 0.0f;
  }
}

void DciTree::UpdateNodeRep(int level, uint32_t node, const float* x, float a, float sq) {
  Level& L = levels_[level];
  const int d = params_.dim;
  float* c = &L.centroid[static_cast<size_t>(node) * d];
  const uint32_t cnt = ++L.count[node];
  const float w = 1.0f / static_cast<float>(cnt);
  for (int k = 0; k < d; ++k) c[k] += (x[k] - c[k]) * w;
  L.abar[node] += (a - L.abar[node]) * w;
  L.m2[node] += (sq - L.m2[node]) * w;
  L.half_sq[node] = 0.5f * (SquaredNorm(c, d) + L.abar[node] * L.abar[node]);
  float proj[1024];
  Project(x, proj);
  float* pm2 = &L.pm2[static_cast<size_t>(node) * rank_];
  for (int k = 0; k < rank_; ++k) pm2[k] += (proj[k] * proj[k] - pm2[k]) * w;
  DeriveSpread(level, node);
  if (!params_.outlier_reps) return;
  float* o = &L.outlier[static_cast<size_t>(node) * d];
  float dx = 0.0f, dof = 0.0f;
  for (int k = 0; k < d; ++k) {
    dx += (x[k] - c[k]) * (x[k] - c[k]);
    dof += (o[k] - c[k]) * (o[k] - c[k]);
  }
  if (dx > dof) {
    std::copy(x, x + d, o);
    dof = dx;
  }
  L.out_dev[node] = dof;
}

void DciTree::SetRepsFromKeys(int level, const float* keys, const float* aug,
                              const std::vector<std::vector<uint32_t>>* members) {
  Level& L = levels_[level];
  const int d = params_.dim;
  std::vector<double> acc(d), pacc(rank_);
  std::vector<float> proj(rank_);
  for (uint32_t node = 0; node < L.size(); ++node) {
    float* c = &L.centroid[static_cast<size_t>(node) * d];
    if (members == nullptr) {
      const float* x = keys + static_cast<size_t>(L.key[node]) * d;
      InitNodeRep(level, node, x, aug[L.key[node]], SquaredNorm(x, d));
      continue;
    }
    const auto& mem = (*members)[node];
    std::fill(acc.begin(), acc.end(), 0.0);
    std::fill(pacc.begin(), pacc.end(), 0.0);
    double sa = 0.0, sm2 = 0.0;
    for (uint32_t key : mem) {
      const float* x = keys + static_cast<size_t>(key) * d;
      for (int k = 0; k < d; ++k) acc[k] += x[k];
      sa += aug[key];
      sm2 += SquaredNorm(x, d);
      Project(x, proj.data());
      for (int k = 0; k < rank_; ++k) pacc[k] += static_cast<double>(proj[k]) * proj[k];
    }
    const double inv = mem.empty() ? 0.0 : 1.0 / static_cast<double>(mem.size());
    for (int k = 0; k < d; ++k) c[k] = static_cast<float>(acc[k] * inv);
    L.abar[node] = static_cast<float>(sa * inv);
    L.m2[node] = static_cast<float>(sm2 * inv);
    L.count[node] = static_cast<uint32_t>(mem.size());
    L.half_sq[node] = 0.5f * (SquaredNorm(c, d) + L.abar[node] * L.abar[node]);
    for (int k = 0; k < rank_; ++k) {
      L.pm2[static_cast<size_t>(node) * rank_ + k] = static_cast<float>(pacc[k] * inv);
    }
    DeriveSpread(level, node);
    if (!params_.outlier_reps) continue;
    float best = -1.0f;
    for (uint32_t key : mem) {
      const float* x = keys + static_cast<size_t>(key) * d;
      float dx = 0.0f;
      for (int k = 0; k < d; ++k) dx += (x[k] - c[k]) * (x[k] - c[k]);
      if (dx > best) {
        best = dx;
        std::copy(x, x + d, &L.outlier[static_cast<size_t>(node) * d]);
      }
    }
    L.out_dev[node] = std::max(0.0f, best);
  }
}

void DciTree::AggregateUp(int from_level) {
  const int d = params_.dim;
  std::vector<double> acc(d), pacc(rank_);
  for (int j = std::max(2, from_level); j <= top_level(); ++j) {
    Level& L = levels_[j];
    const Level& B = levels_[j - 1];
    for (uint32_t node = 0; node < L.size(); ++node) {
      std::fill(acc.begin(), acc.end(), 0.0);
      std::fill(pacc.begin(), pacc.end(), 0.0);
      double sa = 0.0, sm2 = 0.0, cnt = 0.0;
      for (uint32_t ch : L.children[node]) {
        const double w = B.count[ch];
        const float* c = &B.centroid[static_cast<size_t>(ch) * d];
        for (int k = 0; k < d; ++k) acc[k] += w * c[k];
        for (int k = 0; k < rank_; ++k) pacc[k] += w * B.pm2[static_cast<size_t>(ch) * rank_ + k];
        sa += w * B.abar[ch];
        sm2 += w * B.m2[ch];
        cnt += w;
      }
      const double inv = cnt > 0 ? 1.0 / cnt : 0.0;
      float* c = &L.centroid[static_cast<size_t>(node) * d];
      for (int k = 0; k < d; ++k) c[k] = static_cast<float>(acc[k] * inv);
      L.abar[node] = static_cast<float>(sa * inv);
      L.m2[node] = static_cast<float>(sm2 * inv);
      L.count[node] = static_cast<uint32_t>(cnt);
      L.half_sq[node] = 0.5f * (SquaredNorm(c, d) + L.abar[node] * L.abar[node]);
      for (int k = 0; k < rank_; ++k) {
        L.pm2[static_cast<size_t>(node) * rank_ + k] = static_cast<float>(pacc[k] * inv);
      }
      DeriveSpread(j, node);
      if (!params_.outlier_reps) continue;
      float best = -1.0f;
      for (uint32_t ch : L.children[node]) {
        const float* o = &B.outlier[static_cast<size_t>(ch) * d];
        float dx = 0.0f;
        for (int k = 0; k < d; ++k) dx += (o[k] - c[k]) * (o[k] - c[k]);
        if (dx > best) {
          best = dx;
          std::copy(o, o + d, &L.outlier[static_cast<size_t>(node) * d]);
        }
      }
      L.out_dev[node] = std::max(0.0f, best);
    }
  }
}

void DciTree::AssignWithCapacity(int level, const std::vector<uint32_t>& items, const float* keys,
                                 const float* aug, int capacity, std::vector<uint32_t>* parent_of,
                                 const float* item_vecs, const float* item_augs) {
  const int d = params_.dim;
  const int C = params_.build_candidates;
  struct Pair {
    float score;
    uint32_t item;
    uint32_t node;
  };
  std::vector<Pair> pairs;
  pairs.reserve(items.size() * C);
  RouteScratch rs;
  std::vector<std::pair<float, uint32_t>> out;
  std::vector<uint32_t> best(items.size(), kNone);
  const int64_t window = params_.locality_window;
  const std::vector<uint32_t>& level_keys = levels_[level].key;  // ascending positions
  auto better = [](const std::pair<float, uint32_t>& a, const std::pair<float, uint32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  if (level == 1 && window > 0 && item_vecs == nullptr &&
      std::is_sorted(level_keys.begin(), level_keys.end())) {
    // Candidates of an item: the level-1 nodes of its position window (a
    // contiguous id range here), scored 8 items at a time with one kernel call.
    const Level& L = levels_[level];
    std::vector<float> aux(L.size());
    for (uint32_t node = 0; node < L.size(); ++node) {
      aux[node] = params_.augmented_routing
                      ? -L.half_sq[node]
                      : -0.5f * SquaredNorm(&L.centroid[static_cast<size_t>(node) * d], d);
    }
    std::vector<float> batch(static_cast<size_t>(8) * d), dots;
    for (size_t b = 0; b < items.size();) {
      const int64_t w0 = items[b] / window * window;
      size_t e = b;
      while (e < items.size() && e - b < 8 && items[e] / window * window == w0) ++e;
      const uint32_t lo = static_cast<uint32_t>(
          std::lower_bound(level_keys.begin(), level_keys.end(), static_cast<uint32_t>(w0)) -
          level_keys.begin());
      const uint32_t hi = static_cast<uint32_t>(
          std::lower_bound(level_keys.begin(), level_keys.end(),
                           static_cast<uint32_t>(std::min<int64_t>(w0 + window, UINT32_MAX))) -
          level_keys.begin());
      const int nb = static_cast<int>(e - b);
      for (int t = 0; t < nb; ++t) {
        std::copy(keys + static_cast<size_t>(items[b + t]) * d,
                  keys + static_cast<size_t>(items[b + t] + 1) * d,
                  &batch[static_cast<size_t>(t) * d]);
      }
      const uint32_t nn = hi - lo;
      if (nn > 0) {
        dots.resize(static_cast<size_t>(nn) * nb);
        DotRowsMulti(DType::kF32, &L.centroid[static_cast<size_t>(lo) * d], nn, d, batch.data(), nb,
                     dots.data());
      }
      for (int t = 0; t < nb; ++t) {
        const size_t idx = b + t;
        const float a = aug[items[idx]];
        // Top C by insertion into a small sorted array (C is small).
        out.clear();
        const float* row = &dots[static_cast<size_t>(t) * nn];
        for (uint32_t k = 0; k < nn; ++k) {
          const uint32_t node = lo + k;
          float sc = row[k] + aux[node];
          if (params_.augmented_routing) sc += a * L.abar[node];
          if (out.size() == static_cast<size_t>(C) && !(sc > out.back().first)) continue;
          std::pair<float, uint32_t> v{sc, node};
          auto pos = std::upper_bound(out.begin(), out.end(), v, better);
          out.insert(pos, v);
          if (out.size() > static_cast<size_t>(C)) out.pop_back();
        }
        if (out.empty()) {
          Route(keys + static_cast<size_t>(items[idx]) * d, a, level, C, nullptr, &rs, &out);
        }
        if (!out.empty()) best[idx] = out[0].second;
        for (const auto& o : out) pairs.push_back({o.first, static_cast<uint32_t>(idx), o.second});
      }
      b = e;
    }
  } else {
    for (size_t i = 0; i < items.size(); ++i) {
      const float* x =
          item_vecs != nullptr ? item_vecs + i * d : keys + static_cast<size_t>(items[i]) * d;
      const float a = item_vecs != nullptr ? item_augs[i] : aug[items[i]];
      Route(x, a, level, C, nullptr, &rs, &out);
      if (!out.empty()) best[i] = out[0].second;
      for (const auto& o : out) pairs.push_back({o.first, static_cast<uint32_t>(i), o.second});
    }
  }
  std::sort(pairs.begin(), pairs.end(), [](const Pair& a, const Pair& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.item != b.item) return a.item < b.item;
    return a.node < b.node;
  });
  const uint32_t num_nodes = levels_[level].size();
  std::vector<int32_t> load(num_nodes, 0);
  parent_of->assign(items.size(), kNone);
  std::vector<uint32_t> leftover_order;
  std::vector<uint8_t> seen(items.size(), 0);
  for (const Pair& p : pairs) {
    if ((*parent_of)[p.item] != kNone) continue;
    if (load[p.node] < capacity) {
      (*parent_of)[p.item] = p.node;
      ++load[p.node];
    } else if (!seen[p.item]) {
      // Best-first order of the keys that may end up without a candidate.
      seen[p.item] = 1;
      leftover_order.push_back(p.item);
    }
  }
  // Keys whose candidates all filled up: descend again, only through nodes
  // with room left, so pages stay full.
  std::vector<std::vector<int32_t>> free(levels_.size());
  free[level].resize(num_nodes);
  for (uint32_t i = 0; i < num_nodes; ++i) free[level][i] = capacity - load[i];
  for (int j = level + 1; j <= top_level(); ++j) {
    free[j].assign(levels_[j].size(), 0);
    for (uint32_t node = 0; node < levels_[j].size(); ++node) {
      int64_t f = 0;
      for (uint32_t ch : levels_[j].children[node]) f += std::max(0, free[j - 1][ch]);
      free[j][node] = static_cast<int32_t>(std::min<int64_t>(f, INT32_MAX));
    }
  }
  for (uint32_t i : leftover_order) {
    if ((*parent_of)[i] != kNone) continue;
    const float* x = item_vecs != nullptr ? item_vecs + static_cast<size_t>(i) * d
                                          : keys + static_cast<size_t>(items[i]) * d;
    Route(x, item_vecs != nullptr ? item_augs[i] : aug[items[i]], level, 1, &free, &rs, &out);
    uint32_t node = out.empty() ? best[i] : out[0].second;
    if (node == kNone) node = 0;
    (*parent_of)[i] = node;
    if (!out.empty()) {
      uint32_t n = node;
      for (int j = level; j <= top_level() && n != kNone; ++j) {
        --free[j][n];
        n = levels_[j].parent[n];
      }
    }
  }
  // Items never paired (cannot happen with a non-empty level; kept safe).
  for (size_t i = 0; i < items.size(); ++i) {
    if ((*parent_of)[i] == kNone) (*parent_of)[i] = best[i] != kNone ? best[i] : 0;
  }
}

bool DciTree::NodeHasRoom(uint32_t node) const {
  const uint32_t tokens = pages_.node_tokens(node);
  return tokens == 0 || tokens % static_cast<uint32_t>(params_.page_tokens) != 0;
}

uint32_t DciTree::NearestRecentNodeWithRoom(const float* x, float a, int64_t pos,
                                            float* score) const {
  // Decode keys join the nearest logical node of the last locality_window
  // positions that still has room in its last page, as the bulk build fills
  // whole pages per window; every r-th key opens a new node, so room is
  // replenished at the rate keys arrive.
  const Level& L = levels_[1];
  const int64_t from = pos - params_.locality_window;
  auto it = std::lower_bound(nodes_by_key_.begin(), nodes_by_key_.end(), from,
                             [&](uint32_t node, int64_t p) { return L.key[node] < p; });
  uint32_t best = kNone;
  float best_score = -std::numeric_limits<float>::infinity();
  for (; it != nodes_by_key_.end(); ++it) {
    const uint32_t node = *it;
    if (!NodeHasRoom(node)) continue;
    const float sc = RouteScore(1, node, x, a);
    if (sc > best_score) {
      best_score = sc;
      best = node;
    }
  }
  *score = best_score;
  return best;
}

uint32_t DciTree::Level1NodeOfUpperKey(int64_t key) const {
  // Walk the own-child chain down from the key's top node.
  uint32_t node = key_node_[key];
  for (int l = key_top_[key]; l > 1; --l) {
    uint32_t own = kNone;
    for (uint32_t c : levels_[l].children[node]) {
      if (levels_[l - 1].key[c] == static_cast<uint32_t>(key)) {
        own = c;
        break;
      }
    }
    node = own;
  }
  return node;
}

void DciTree::RegroupUpperLevels(const float* keys, const float* aug) {
  const int d = params_.dim;
  for (int l = 1; l < top_level(); ++l) {
    Level& L = levels_[l];
    Level& U = levels_[l + 1];
    // Movable nodes: those that are not the own child of their parent.
    std::vector<uint32_t> items, nodes;
    std::vector<float> vecs, augs;
    for (uint32_t node = 0; node < L.size(); ++node) {
      if (key_top_[L.key[node]] != l) continue;
      items.push_back(L.key[node]);
      nodes.push_back(node);
      vecs.insert(vecs.end(), &L.centroid[static_cast<size_t>(node) * d],
                  &L.centroid[static_cast<size_t>(node) * d] + d);
      augs.push_back(L.abar[node]);
    }
    if (items.empty()) continue;
    for (auto& ch : U.children) ch.clear();
    for (uint32_t node = 0; node < L.size(); ++node) {
      if (key_top_[L.key[node]] != l) {
        // Own child: stays with the node of the same key one level up.
        const uint32_t up = L.parent[node];
        U.children[up].push_back(node);
      }
    }
    // Parents are scored by their own subtree centroids of the previous
    // grouping (a k-means-like step with capacity r).
    std::vector<uint32_t> parent_of;
    AssignWithCapacity(l + 1, items, keys, aug, ratio_ - 1, &parent_of, vecs.data(), augs.data());
    for (size_t i = 0; i < nodes.size(); ++i) {
      L.parent[nodes[i]] = parent_of[i];
      U.children[parent_of[i]].push_back(nodes[i]);
    }
    AggregateUp(l + 1);
  }
}

void DciTree::SyncMirror(int level, uint32_t node) {
  Level& L = levels_[level];
  const size_t d = params_.dim;
  if (L.centroid16.size() < L.centroid.size()) L.centroid16.resize(L.centroid.size());
  FloatToHalf(&L.centroid[node * d], &L.centroid16[node * d], d);
}

void DciTree::SyncAllMirrors() {
  for (int l = 1; l <= top_level(); ++l) {
    Level& L = levels_[l];
    L.centroid16.resize(L.centroid.size());
    FloatToHalf(L.centroid.data(), L.centroid16.data(), L.centroid.size());
  }
}

void DciTree::RenumberDepthFirst() {
  const int top = top_level();
  const int d = params_.dim;
  std::vector<uint32_t> new_above;  // new id of each old node one level up
  for (int l = top; l >= 1; --l) {
    Level& L = levels_[l];
    const uint32_t sz = L.size();
    std::vector<uint32_t> order(sz);
    std::iota(order.begin(), order.end(), 0u);
    if (l < top) {
      std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
        return new_above[L.parent[a]] < new_above[L.parent[b]];
      });
    }
    std::vector<uint32_t> new_of_old(sz);
    for (uint32_t i = 0; i < sz; ++i) new_of_old[order[i]] = i;
    auto permute = [&](auto& v, size_t width) {
      if (v.empty()) return;
      auto old = v;
      for (uint32_t i = 0; i < sz; ++i) {
        std::copy(old.begin() + static_cast<size_t>(order[i]) * width,
                  old.begin() + static_cast<size_t>(order[i] + 1) * width,
                  v.begin() + static_cast<size_t>(i) * width);
      }
    };
    permute(L.key, 1);
    permute(L.parent, 1);
    permute(L.count, 1);
    permute(L.centroid, d);
    permute(L.abar, 1);
    permute(L.m2, 1);
    permute(L.half_sq, 1);
    permute(L.pm2, rank_);
    permute(L.lam, rank_);
    permute(L.res, 1);
    permute(L.outlier, d);
    permute(L.out_dev, 1);
    if (!L.children.empty()) {
      std::vector<std::vector<uint32_t>> old = std::move(L.children);
      L.children.resize(sz);
      for (uint32_t i = 0; i < sz; ++i) L.children[i] = std::move(old[order[i]]);
    }
    if (l < top) {
      for (auto& p : L.parent) p = new_above[p];
    }
    if (l + 1 <= top) {
      for (auto& ch : levels_[l + 1].children) {
        for (auto& c : ch) c = new_of_old[c];
        std::sort(ch.begin(), ch.end());
      }
    }
    for (int64_t i = 0; i < num_tokens(); ++i) {
      if (key_top_[i] == l || (l == 1 && key_top_[i] == 0)) key_node_[i] = new_of_old[key_node_[i]];
    }
    new_above = std::move(new_of_old);
  }
}

absl::Status DciTree::BulkBuild(const float* keys, int64_t n, std::vector<Placement>* placements) {
  RETURN_IF_ERROR(CheckKeys(keys, n, params_.dim, placements));
  if (num_tokens() != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("bulk build needs an empty tree; it holds ", num_tokens(), " tokens"));
  }
  if (n > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("too many keys for one tree: ", n));
  }
  const int d = params_.dim;
  ASSIGN_OR_RETURN(
      MipsAugmentation mips,
      MipsAugmentation::Create(keys, n, d, params_.norm_headroom, params_.rebuild_fraction));
  mips_ = mips;
  mips_.Count(n, 0);
  FitBasis(keys, n);
  std::vector<float> aug(n);
  for (int64_t i = 0; i < n; ++i) {
    aug[i] = mips_.AugmentSquaredNorm(SquaredNorm(keys + i * d, d));
  }

  // Levels by the promotion rule, exactly as n Inserts would assign them.
  std::vector<uint32_t> counts{0};
  key_top_.resize(n);
  key_node_.assign(n, kNone);
  levels_.clear();
  levels_.resize(1);
  for (int64_t i = 0; i < n; ++i) {
    const int t = PromotionLevel(&counts);
    key_top_[i] = static_cast<uint8_t>(t);
    if (static_cast<int>(levels_.size()) <= t) levels_.resize(t + 1);
    uint32_t below = kNone;
    for (int l = 1; l <= t; ++l) {
      Level& L = levels_[l];
      const uint32_t idx = L.size();
      L.key.push_back(static_cast<uint32_t>(i));
      L.parent.push_back(kNone);
      if (l >= 2) {
        L.children.emplace_back();
        L.children.back().push_back(below);  // its own child
        levels_[l - 1].parent[below] = idx;
      }
      below = idx;
    }
    if (t >= 1) key_node_[i] = below;
  }
  const int top = top_level();
  for (int l = 1; l <= top; ++l) {
    ResizeLevel(l, levels_[l].size());
    if (l == 1) levels_[l].children.clear();
  }

  // Parents level by level from the top, with a capacity of r children.
  std::vector<uint32_t> parent_of;
  std::vector<std::vector<uint32_t>> members(levels_[1].size());
  for (int l = top - 1; l >= 0; --l) {
    SetRepsFromKeys(l + 1, keys, aug.data(), nullptr);
    AggregateUp(l + 2);
    std::vector<uint32_t> items;
    for (int64_t i = 0; i < n; ++i) {
      if (key_top_[i] == l) items.push_back(static_cast<uint32_t>(i));
    }
    if (items.empty()) continue;
    AssignWithCapacity(l + 1, items, keys, aug.data(), ratio_ - 1, &parent_of);
    for (size_t i = 0; i < items.size(); ++i) {
      const uint32_t p = parent_of[i];
      if (l >= 1) {
        const uint32_t idx = key_node_[items[i]];
        levels_[l].parent[idx] = p;
        levels_[l + 1].children[p].push_back(idx);
      } else {
        key_node_[items[i]] = p;
        members[p].push_back(items[i]);
      }
    }
  }
  for (uint32_t node = 0; node < levels_[1].size(); ++node) {
    members[node].push_back(levels_[1].key[node]);
  }
  SetRepsFromKeys(1, keys, aug.data(), &members);
  AggregateUp(2);

  // Refinement: re-assign level-0 keys against the full centroids.
  std::vector<uint32_t> items;
  for (int64_t i = 0; i < n; ++i) {
    if (key_top_[i] == 0) items.push_back(static_cast<uint32_t>(i));
  }
  for (int it = 0; it < params_.refine_iters && !items.empty(); ++it) {
    AssignWithCapacity(1, items, keys, aug.data(), ratio_ - 1, &parent_of);
    for (auto& m : members) m.clear();
    for (uint32_t node = 0; node < levels_[1].size(); ++node) {
      members[node].push_back(levels_[1].key[node]);
    }
    for (size_t i = 0; i < items.size(); ++i) {
      key_node_[items[i]] = parent_of[i];
      members[parent_of[i]].push_back(items[i]);
    }
    SetRepsFromKeys(1, keys, aug.data(), &members);
    AggregateUp(2);
  }

  // The upper levels were grouped from single keys (the nodes' own keys);
  // regroup each level's nodes under the level above by their full
  // centroids, bottom-up, so upper representatives describe coherent groups.
  for (int it = 0; it < params_.regroup_iters; ++it) RegroupUpperLevels(keys, aug.data());

  // Siblings get consecutive ids (their representatives are scored as one
  // block); then the members again under the new ids.
  RenumberDepthFirst();
  for (auto& m : members) m.clear();
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t node = key_top_[i] == 0 ? key_node_[i] : Level1NodeOfUpperKey(i);
    members[node].push_back(static_cast<uint32_t>(i));
  }

  SyncAllMirrors();
  nodes_by_key_.resize(levels_[1].size());
  std::iota(nodes_by_key_.begin(), nodes_by_key_.end(), 0u);
  std::sort(nodes_by_key_.begin(), nodes_by_key_.end(),
            [&](uint32_t a, uint32_t b) { return levels_[1].key[a] < levels_[1].key[b]; });

  // Pages: each logical node's keys in position order.
  pages_ = DciPageTable(params_.page_tokens);
  for (uint32_t node = 0; node < levels_[1].size(); ++node) {
    auto& m = members[node];
    std::sort(m.begin(), m.end());
    pages_.AddNode();
    std::vector<int32_t> pos(m.begin(), m.end());
    pages_.AppendBulk(node, pos.data(), static_cast<int>(pos.size()));
  }
  if (!pages_.FinishBulk(n, placements)) {
    return absl::InternalError("DCI-tree bulk build lost or duplicated a token");
  }
  return absl::OkStatus();
}

absl::Status DciTree::Insert(const float* keys, int64_t n, std::vector<Placement>* placements) {
  RETURN_IF_ERROR(CheckKeys(keys, n, params_.dim, placements));
  if (n > std::numeric_limits<int32_t>::max() - num_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("too many keys for one tree: ", n));
  }
  const int d = params_.dim;
  if (num_tokens() == 0) {
    ASSIGN_OR_RETURN(
        MipsAugmentation mips,
        MipsAugmentation::Create(keys, n, d, params_.norm_headroom, params_.rebuild_fraction));
    mips_ = mips;
    levels_.resize(1);
    FitBasis(keys, n);
  }
  placements->clear();
  placements->reserve(n);
  std::vector<uint32_t> counts(levels_.size());
  counts[0] = static_cast<uint32_t>(num_tokens());
  for (size_t l = 1; l < levels_.size(); ++l) counts[l] = levels_[l].size();
  RouteScratch rs;
  std::vector<std::pair<float, uint32_t>> out;
  std::vector<std::pair<int, uint32_t>> dirty;  // nodes whose centroid changed
  bool all_dirty = false;
  for (int64_t i = 0; i < n; ++i) {
    const float* x = keys + i * d;
    const int32_t pos = static_cast<int32_t>(num_tokens());
    const float sq = SquaredNorm(x, d);
    const float a = mips_.Augment(x);
    const int old_top = top_level();
    const int t = PromotionLevel(&counts);
    if (static_cast<int>(levels_.size()) <= t) levels_.resize(t + 1);
    // New nodes of this key on levels 1..t, each its own child below.
    uint32_t below = kNone;
    for (int l = 1; l <= t; ++l) {
      Level& L = levels_[l];
      const uint32_t idx = L.size();
      L.key.push_back(static_cast<uint32_t>(pos));
      L.parent.push_back(kNone);
      ResizeLevel(l, idx + 1);
      if (l >= 2) {
        L.children.emplace_back();
        L.children.back().push_back(below);
        levels_[l - 1].parent[below] = idx;
      }
      InitNodeRep(l, idx, x, a, sq);
      dirty.push_back({l, idx});
      below = idx;
    }
    uint32_t level1_node = kNone;
    if (t >= 1) {
      level1_node = pages_.AddNode();
      nodes_by_key_.push_back(level1_node);  // keys arrive in position order
    }
    if (t > old_top && old_top >= 1) {
      // A new top level: the old top nodes become children of this key.
      Level& T = levels_[t];
      for (uint32_t node = 0; node < levels_[old_top].size(); ++node) {
        if (node == levels_[old_top].size() - 1) continue;  // this key's own node
        levels_[old_top].parent[node] = below;
        T.children[below].push_back(node);
      }
      AggregateUp(t);
      all_dirty = true;
    } else if (t < top_level()) {
      Route(x, a, t + 1, 1, nullptr, &rs, &out);
      uint32_t p = out[0].second;
      if (t == 0 && params_.locality_window > 0 && !NodeHasRoom(p)) {
        // The nearest node's last page is full: a recent node with room
        // takes the key instead when it is nearly as near (squared distance
        // within decode_slack of the nearest), so decode pages stay full
        // without mixing unrelated keys.
        float score_w = 0.0f;
        const uint32_t w = NearestRecentNodeWithRoom(x, a, pos, &score_w);
        const float base = params_.augmented_routing ? 0.5f * (sq + a * a) : 0.5f * sq;
        const float dist_g = base - out[0].first,
                    dist_w = base - score_w;  // half squared distances
        if (w != kNone && dist_w <= params_.decode_slack * dist_g) p = w;
      }
      if (t >= 1) {
        levels_[t].parent[below] = p;
        levels_[t + 1].children[p].push_back(below);
      } else {
        level1_node = p;
      }
      uint32_t node = p;
      for (int j = t + 1; j <= top_level() && node != kNone; ++j) {
        UpdateNodeRep(j, node, x, a, sq);
        dirty.push_back({j, node});
        node = levels_[j].parent[node];
      }
    }
    if (t == 0 && t >= top_level()) level1_node = 0;  // unreachable: level 1 always exists
    placements->push_back(pages_.Append(level1_node, pos));
    key_top_.push_back(static_cast<uint8_t>(t));
    key_node_.push_back(t >= 1 ? below : level1_node);
  }
  if (all_dirty) {
    SyncAllMirrors();
  } else {
    for (const auto& [level, node] : dirty) SyncMirror(level, node);
  }
  return absl::OkStatus();
}

void DciTree::CollectCandidates(const float* queries, int nq, float scale,
                                const DciDescentParams& params, DciScratch* s,
                                std::vector<uint32_t>* nodes, uint64_t* touched) const {
  nodes->clear();
  const int top = top_level();
  if (top < 1) return;
  const int d = params_.dim;
  int entry = top;
  for (int l = 1; l <= top; ++l) {
    if (levels_[l].size() <= static_cast<uint32_t>(params.entry_nodes)) {
      entry = l;
      break;
    }
  }
  s->qnorm2.resize(nq);
  s->qproj.resize(static_cast<size_t>(nq) * std::max(1, rank_));
  s->qres.resize(nq);
  for (int j = 0; j < nq; ++j) {
    const float* q = queries + static_cast<size_t>(j) * d;
    s->qnorm2[j] = SquaredNorm(q, d);
    float* qp = &s->qproj[static_cast<size_t>(j) * rank_];
    Project(q, qp);
    float captured = 0.0f;
    for (int k = 0; k < rank_; ++k) {
      qp[k] *= qp[k];
      captured += qp[k];
    }
    s->qres[j] = std::max(0.0f, s->qnorm2[j] - captured);
  }
  *touched += rank_ > 0 ? (static_cast<uint64_t>(rank_) * nq + d - 1) / d : 0;
  s->cand.resize(levels_[entry].size());
  std::iota(s->cand.begin(), s->cand.end(), 0u);
  const float half_s2 = params.spread_weight * 0.5f * scale * scale;
  const bool outliers = params_.outlier_reps;
  auto better = [](const std::pair<float, uint32_t>& p, const std::pair<float, uint32_t>& q) {
    return p.first > q.first || (p.first == q.first && p.second < q.second);
  };
  // Prefetches the representatives of level `l` that the candidates will read.
  auto prefetch_level = [&](int l) {
    const Level& L = levels_[l];
    const size_t nc = s->cand.size();
    const bool spread = half_s2 > 0.0f && rank_ > 0;
    for (size_t b = 0; b < nc;) {
      size_t e = b + 1;
      while (e < nc && s->cand[e] == s->cand[e - 1] + 1) ++e;
      const size_t first = s->cand[b], run = e - b;
      PrefetchBytes(&L.centroid16[first * d], run * d * sizeof(uint16_t));
      if (spread) PrefetchBytes(&L.lam[first * rank_], run * rank_ * sizeof(float));
      PrefetchBytes(&L.count[first], run * sizeof(uint32_t));
      if (spread) PrefetchBytes(&L.res[first], run * sizeof(float));
      if (outliers) PrefetchBytes(&L.outlier[first * d], run * d * sizeof(float));
      b = e;
    }
  };
  prefetch_level(entry);
  for (int l = entry; l >= 1; --l) {
    const Level& L = levels_[l];
    const size_t nc = s->cand.size();
    // Dots of the queries with rows [width] of `arr` for every candidate,
    // out[j * nc + i]; runs of consecutive ids (siblings) go through one
    // multi-query kernel call.
    auto dots_of = [&](const auto& arr, int width, const float* qs, int qdim,
                       std::vector<float>* out) {
      const DType dt = sizeof(arr[0]) == 2 ? DType::kF16 : DType::kF32;
      out->resize(nc * nq);
      for (size_t b = 0; b < nc;) {
        size_t e = b + 1;
        while (e < nc && s->cand[e] == s->cand[e - 1] + 1) ++e;
        const size_t run = e - b;
        const auto* rows = &arr[static_cast<size_t>(s->cand[b]) * width];
        if (run == nc) {
          DotRowsMulti(dt, rows, run, qdim, qs, nq, out->data());
        } else {
          s->run_dots.resize(run * nq);
          DotRowsMulti(dt, rows, run, qdim, qs, nq, s->run_dots.data());
          for (int j = 0; j < nq; ++j) {
            std::copy(&s->run_dots[j * run], &s->run_dots[j * run] + run, &(*out)[j * nc + b]);
          }
        }
        b = e;
      }
    };
    dots_of(L.centroid16, d, queries, d, &s->dots);
    if (outliers) dots_of(L.outlier, d, queries, d, &s->odots);
    const bool spread = half_s2 > 0.0f && rank_ > 0;
    if (spread) dots_of(L.lam, rank_, s->qproj.data(), rank_, &s->vars);
    *touched += outliers ? 2 * nc : nc;
    s->scored.resize(nc);
    uint32_t last_cnt = 0;
    float logc = 0.0f, z = 0.0f, vcap = std::numeric_limits<float>::infinity();
    if (!outliers && !params.spread_cap) {
      // The common case, laid out query-major so the loops vectorize; the
      // same arithmetic, in the same order, as the general loop below.
      s->node_logc.resize(nc);
      s->node_res.resize(nc);
      s->best.assign(nc, -std::numeric_limits<float>::infinity());
      for (size_t i = 0; i < nc; ++i) {
        const uint32_t node = s->cand[i];
        const uint32_t cnt = std::max<uint32_t>(1, L.count[node]);
        if (cnt != last_cnt) {
          last_cnt = cnt;
          logc = std::log(static_cast<float>(cnt));
        }
        s->node_logc[i] = logc;
        s->node_res[i] = spread ? L.res[node] : 0.0f;
      }
      const float* lc = s->node_logc.data();
      const float* rs = s->node_res.data();
      float* best = s->best.data();
      for (int j = 0; j < nq; ++j) {
        const float* dj = &s->dots[static_cast<size_t>(j) * nc];
        if (spread) {
          const float* vj = &s->vars[static_cast<size_t>(j) * nc];
          const float qr = s->qres[j];
          for (size_t i = 0; i < nc; ++i) {
            float e = dj[i] * scale + lc[i];
            const float var = vj[i] + qr * rs[i];
            e += half_s2 * var;
            best[i] = best[i] < e ? e : best[i];
          }
        } else {
          for (size_t i = 0; i < nc; ++i) {
            const float e = dj[i] * scale + lc[i];
            best[i] = best[i] < e ? e : best[i];
          }
        }
      }
      for (size_t i = 0; i < nc; ++i) s->scored[i] = {best[i], s->cand[i]};
    }
    for (size_t i = 0; i < nc && (outliers || params.spread_cap); ++i) {
      const uint32_t node = s->cand[i];
      const uint32_t cnt = std::max<uint32_t>(1, L.count[node]);
      if (cnt != last_cnt) {  // most nodes of a level hold the same count
        last_cnt = cnt;
        logc = std::log(static_cast<float>(cnt));
        z = std::sqrt(2.0f * std::max(logc, 0.5f));
        if (params.spread_cap) vcap = 4.0f * z * z / (scale * scale);  // where the two meet
      }
      float best = -std::numeric_limits<float>::infinity();
      if (!outliers) {
        // Gaussian mass: + s^2 v / 2 for the logit variance v = q'Sq;
        // optionally capped by the expected max of `cnt` Gaussians,
        // z s sqrt(v) with z = sqrt(2 ln cnt), so very large queries are not
        // ranked by spread alone.
        for (int j = 0; j < nq; ++j) {
          float e = s->dots[j * nc + i] * scale + logc;
          if (spread) {
            const float var = s->vars[j * nc + i] + s->qres[j] * L.res[node];
            e += var <= vcap ? half_s2 * var : params.spread_weight * z * scale * std::sqrt(var);
          }
          best = std::max(best, e);
        }
        s->scored[i] = {best, node};
        continue;
      }
      const float rest = static_cast<float>(cnt - 1);
      const float log_rest = cnt > 1 ? std::log(rest) : 0.0f;
      const float* lam = &L.lam[static_cast<size_t>(node) * rank_];
      for (int j = 0; j < nq; ++j) {
        const float eo = s->odots[j * nc + i] * scale;
        float e = eo;
        if (cnt > 1) {
          float er = (cnt * s->dots[j * nc + i] - s->odots[j * nc + i]) / rest * scale + log_rest;
          if (half_s2 > 0.0f) {
            const float* qp = &s->qproj[static_cast<size_t>(j) * rank_];
            float var = s->qres[j] * L.res[node];
            for (int k = 0; k < rank_; ++k) var += qp[k] * lam[k];
            er += half_s2 * var;
          }
          const float hi = std::max(eo, er);
          e = hi + std::log1p(std::exp(std::min(eo, er) - hi));
        }
        best = std::max(best, e);
      }
      s->scored[i] = {best, node};
    }
    // Only the head of the ranking is needed: sort it in growing chunks.
    // SortHead(from, end) puts the best `end - from` of scored[from..] in
    // order at `from` and returns how many leading entries are now in their
    // final order (>= end): the threshold score of the head is found on a
    // plain float copy (cheap selection), the entries at or above it are
    // moved to the front and only those are sorted. Same order as a
    // partial_sort (the ranking is total: score, then node id).
    auto SortHead = [&](size_t from, size_t end) -> size_t {
      const size_t n = s->scored.size(), k = end - from;
      auto first = s->scored.begin() + from;
      if (k == 0 || n - from < 256 || k * 4 > n - from) {
        std::partial_sort(first, s->scored.begin() + end, s->scored.end(), better);
        return end;
      }
      s->head_keys.resize(n - from);
      bool nan = false;
      for (size_t i = from; i < n; ++i) {
        const float v = s->scored[i].first;
        s->head_keys[i - from] = v;
        nan |= v != v;
      }
      if (nan) {
        std::partial_sort(first, s->scored.begin() + end, s->scored.end(), better);
        return end;
      }
      std::nth_element(s->head_keys.begin(), s->head_keys.begin() + (k - 1), s->head_keys.end(),
                       std::greater<float>());
      const float t = s->head_keys[k - 1];
      auto mid = std::partition(first, s->scored.end(),
                                [t](const std::pair<float, uint32_t>& p) { return p.first >= t; });
      std::sort(first, mid, better);
      return static_cast<size_t>(mid - s->scored.begin());
    };
    const int64_t want_tokens =
        l == 1 ? params.min_tokens : static_cast<int64_t>(params.cover_factor * params.min_tokens);
    const size_t want_nodes = l == 1 ? 0 : static_cast<size_t>(params.field_of_view);
    const double mean_count = static_cast<double>(num_tokens()) / std::max<uint32_t>(1, L.size());
    size_t chunk = std::max<size_t>(
        {want_nodes, static_cast<size_t>(1.25 * want_tokens / std::max(1.0, mean_count)) + 8});
    size_t sorted = 0;
    int64_t tokens = 0;
    size_t taken = 0;
    s->next.clear();
    while (taken < s->scored.size() && (taken < want_nodes || tokens < want_tokens)) {
      if (taken == sorted) {
        const size_t end = std::min(s->scored.size(), sorted + chunk);
        const size_t next_sorted = SortHead(sorted, end);
        if (l == 1) {  // their token counts are read next, scattered
          for (size_t i = sorted; i < next_sorted; ++i) {
            __builtin_prefetch(&pages_.node_tokens_ref(s->scored[i].second));
          }
        }
        sorted = next_sorted;
        chunk *= 2;
      }
      const uint32_t node = s->scored[taken++].second;
      if (l == 1) {
        nodes->push_back(node);
        tokens += pages_.node_tokens(node);
      } else {
        tokens += L.count[node];
        s->next.push_back(node);
      }
    }
    if (l == 1) return;
    // The kept nodes' children lists are scattered heap blocks: fetch all
    // their headers, then all their data, then gather.
    for (uint32_t node : s->next) __builtin_prefetch(&L.children[node]);
    for (uint32_t node : s->next) {
      const auto& ch = L.children[node];
      PrefetchBytes(ch.data(), ch.size() * sizeof(uint32_t));
    }
    // Siblings have consecutive ids (depth-first numbering): ordering the
    // kept nodes by their first child usually makes the concatenation
    // sorted already; sort the whole list only when it is not.
    s->kept.swap(s->next);
    std::sort(s->kept.begin(), s->kept.end(), [&L](uint32_t a, uint32_t b) {
      const auto& ca = L.children[a];
      const auto& cb = L.children[b];
      const uint32_t fa = ca.empty() ? 0 : ca.front(), fb = cb.empty() ? 0 : cb.front();
      return fa < fb || (fa == fb && a < b);
    });
    s->next.clear();
    for (uint32_t node : s->kept) {
      const auto& ch = L.children[node];
      s->next.insert(s->next.end(), ch.begin(), ch.end());
    }
    if (!std::is_sorted(s->next.begin(), s->next.end())) std::sort(s->next.begin(), s->next.end());
    s->cand.swap(s->next);
    prefetch_level(l - 1);
  }
}

absl::StatusOr<std::unique_ptr<DciTreeRebuild>> DciTree::PrepareRebuild(const PageKeys& keys,
                                                                        DType dtype) const {
  const int d = params_.dim;
  const int P = params_.page_tokens;
  const int r = rank_;
  const int64_t n = num_tokens();
  if (n == 0) return absl::FailedPreconditionError("rebuild of an empty DCI-tree");
  std::vector<float> rows(static_cast<size_t>(P) * d);
  float max_sq = 0.0f;
  for (uint32_t page = 0; page < pages_.num_pages(); ++page) {
    const void* src = keys.page_keys(page);
    if (src == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("no key bytes for page ", page));
    }
    const uint32_t fill = pages_.fill(page);
    ToFloat(dtype, src, rows.data(), static_cast<size_t>(fill) * d);
    for (uint32_t s = 0; s < fill; ++s) max_sq = std::max(max_sq, SquaredNorm(&rows[s * d], d));
  }
  ASSIGN_OR_RETURN(MipsAugmentation mips,
                   MipsAugmentation::FromMaxNorm(std::sqrt(max_sq), d, params_.norm_headroom,
                                                 params_.rebuild_fraction));
  auto rb = std::make_unique<DciTreeRebuild>(
      DciTreeRebuild{mips, n, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}});
  const int top = top_level();
  rb->count.resize(top + 1);
  rb->centroid.resize(top + 1);
  rb->abar.resize(top + 1);
  rb->m2.resize(top + 1);
  rb->half_sq.resize(top + 1);
  rb->pm2.resize(top + 1);
  rb->lam.resize(top + 1);
  rb->res.resize(top + 1);
  rb->outlier.resize(top + 1);
  rb->out_dev.resize(top + 1);
  for (int l = 1; l <= top; ++l) {
    const uint32_t sz = levels_[l].size();
    rb->count[l].assign(sz, 0);
    rb->centroid[l].assign(static_cast<size_t>(sz) * d, 0.0f);
    rb->abar[l].assign(sz, 0.0f);
    rb->m2[l].assign(sz, 0.0f);
    rb->half_sq[l].assign(sz, 0.0f);
    rb->pm2[l].assign(static_cast<size_t>(sz) * r, 0.0f);
    rb->lam[l].assign(static_cast<size_t>(sz) * r, 0.0f);
    rb->res[l].assign(sz, 0.0f);
    if (params_.outlier_reps) {
      rb->outlier[l].assign(static_cast<size_t>(sz) * d, 0.0f);
      rb->out_dev[l].assign(sz, -1.0f);
    }
  }
  // Level 1 from the keys (sums first), then every level above from its children.
  const uint32_t n1 = levels_[1].size();
  std::vector<double> sum(static_cast<size_t>(n1) * d, 0.0), psum(static_cast<size_t>(n1) * r, 0.0);
  std::vector<double> sa(n1, 0.0), sm2(n1, 0.0);
  std::vector<float> proj(r);
  for (uint32_t page = 0; page < pages_.num_pages(); ++page) {
    const uint32_t fill = pages_.fill(page);
    const uint32_t node = pages_.node_of_page(page);
    ToFloat(dtype, keys.page_keys(page), rows.data(), static_cast<size_t>(fill) * d);
    for (uint32_t s = 0; s < fill; ++s) {
      const float* x = &rows[s * d];
      const float sq = SquaredNorm(x, d);
      for (int k = 0; k < d; ++k) sum[static_cast<size_t>(node) * d + k] += x[k];
      Project(x, proj.data());
      for (int k = 0; k < r; ++k) psum[static_cast<size_t>(node) * r + k] += proj[k] * proj[k];
      sa[node] += mips.AugmentSquaredNorm(sq);
      sm2[node] += sq;
      ++rb->count[1][node];
    }
  }
  auto finish = [&](int l, uint32_t node) {
    float* c = &rb->centroid[l][static_cast<size_t>(node) * d];
    rb->half_sq[l][node] = 0.5f * (SquaredNorm(c, d) + rb->abar[l][node] * rb->abar[l][node]);
    DeriveSpreadOf(basis_.data(), r, d, c, rb->m2[l][node],
                   &rb->pm2[l][static_cast<size_t>(node) * r],
                   &rb->lam[l][static_cast<size_t>(node) * r], &rb->res[l][node]);
  };
  for (uint32_t node = 0; node < n1; ++node) {
    const double inv = rb->count[1][node] ? 1.0 / rb->count[1][node] : 0.0;
    for (int k = 0; k < d; ++k) {
      rb->centroid[1][static_cast<size_t>(node) * d + k] =
          static_cast<float>(sum[static_cast<size_t>(node) * d + k] * inv);
    }
    for (int k = 0; k < r; ++k) {
      rb->pm2[1][static_cast<size_t>(node) * r + k] =
          static_cast<float>(psum[static_cast<size_t>(node) * r + k] * inv);
    }
    rb->abar[1][node] = static_cast<float>(sa[node] * inv);
    rb->m2[1][node] = static_cast<float>(sm2[node] * inv);
    finish(1, node);
  }
  // Outliers need the centroids: a second pass over the keys.
  for (uint32_t page = 0; page < pages_.num_pages() && params_.outlier_reps; ++page) {
    const uint32_t fill = pages_.fill(page);
    const uint32_t node = pages_.node_of_page(page);
    const float* c = &rb->centroid[1][static_cast<size_t>(node) * d];
    ToFloat(dtype, keys.page_keys(page), rows.data(), static_cast<size_t>(fill) * d);
    for (uint32_t s = 0; s < fill; ++s) {
      const float* x = &rows[s * d];
      float dx = 0.0f;
      for (int k = 0; k < d; ++k) dx += (x[k] - c[k]) * (x[k] - c[k]);
      if (dx > rb->out_dev[1][node]) {
        rb->out_dev[1][node] = dx;
        std::copy(x, x + d, &rb->outlier[1][static_cast<size_t>(node) * d]);
      }
    }
  }
  std::vector<double> acc(d), pacc(r);
  for (int l = 2; l <= top; ++l) {
    for (uint32_t node = 0; node < levels_[l].size(); ++node) {
      std::fill(acc.begin(), acc.end(), 0.0);
      std::fill(pacc.begin(), pacc.end(), 0.0);
      double a = 0.0, m = 0.0, w = 0.0;
      for (uint32_t ch : levels_[l].children[node]) {
        const double cw = rb->count[l - 1][ch];
        const float* c = &rb->centroid[l - 1][static_cast<size_t>(ch) * d];
        for (int k = 0; k < d; ++k) acc[k] += cw * c[k];
        for (int k = 0; k < r; ++k) pacc[k] += cw * rb->pm2[l - 1][static_cast<size_t>(ch) * r + k];
        a += cw * rb->abar[l - 1][ch];
        m += cw * rb->m2[l - 1][ch];
        w += cw;
      }
      const double inv = w > 0 ? 1.0 / w : 0.0;
      for (int k = 0; k < d; ++k) {
        rb->centroid[l][static_cast<size_t>(node) * d + k] = static_cast<float>(acc[k] * inv);
      }
      for (int k = 0; k < r; ++k) {
        rb->pm2[l][static_cast<size_t>(node) * r + k] = static_cast<float>(pacc[k] * inv);
      }
      rb->count[l][node] = static_cast<uint32_t>(w);
      rb->abar[l][node] = static_cast<float>(a * inv);
      rb->m2[l][node] = static_cast<float>(m * inv);
      finish(l, node);
      const float* c = &rb->centroid[l][static_cast<size_t>(node) * d];
      for (uint32_t ch : levels_[l].children[node]) {
        if (!params_.outlier_reps) break;
        const float* o = &rb->outlier[l - 1][static_cast<size_t>(ch) * d];
        float dx = 0.0f;
        for (int k = 0; k < d; ++k) dx += (o[k] - c[k]) * (o[k] - c[k]);
        if (dx > rb->out_dev[l][node]) {
          rb->out_dev[l][node] = dx;
          std::copy(o, o + d, &rb->outlier[l][static_cast<size_t>(node) * d]);
        }
      }
    }
  }
  return rb;
}

absl::Status DciTree::CommitRebuild(std::unique_ptr<DciTreeRebuild> rb) {
  if (rb == nullptr) return absl::InvalidArgumentError("rebuild must not be null");
  if (rb->num_tokens != num_tokens() || static_cast<int>(rb->count.size()) != top_level() + 1) {
    return absl::FailedPreconditionError(absl::StrCat("rebuild was prepared for ", rb->num_tokens,
                                                      " tokens but the tree now holds ",
                                                      num_tokens(), "; prepare it again"));
  }
  for (int l = 1; l <= top_level(); ++l) {
    if (rb->count[l].size() != levels_[l].size()) {
      return absl::FailedPreconditionError("tree changed since PrepareRebuild; prepare it again");
    }
  }
  for (int l = 1; l <= top_level(); ++l) {
    Level& L = levels_[l];
    L.count.swap(rb->count[l]);
    L.centroid.swap(rb->centroid[l]);
    L.abar.swap(rb->abar[l]);
    L.m2.swap(rb->m2[l]);
    L.half_sq.swap(rb->half_sq[l]);
    L.pm2.swap(rb->pm2[l]);
    L.lam.swap(rb->lam[l]);
    L.res.swap(rb->res[l]);
    L.outlier.swap(rb->outlier[l]);
    L.out_dev.swap(rb->out_dev[l]);
  }
  mips_ = rb->mips;
  mips_.Count(num_tokens(), 0);
  SyncAllMirrors();
  return absl::OkStatus();
}

size_t DciTree::bytes() const {
  size_t b = key_top_.capacity() +
             (key_node_.capacity() + nodes_by_key_.capacity()) * sizeof(uint32_t) + pages_.bytes();
  for (const Level& L : levels_) b += L.bytes(params_.dim);
  return b;
}

}  // namespace icecache
