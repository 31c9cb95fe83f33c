#include "server/index/query_basis.h"

#include <algorithm>
#include <cmath>

namespace icecache {
namespace {

// Gram-Schmidt on the columns of v (dim x k, column-major); a column that
// vanishes is replaced by the unit vector e_i least covered so far.
void OrthonormaliseColumns(std::vector<double>* v, int dim, int k) {
  for (int c = 0; c < k; ++c) {
    double* x = v->data() + static_cast<size_t>(c) * dim;
    for (int pass = 0; pass < 2; ++pass) {  // twice: stable enough at dim 128
      for (int p = 0; p < c; ++p) {
        const double* y = v->data() + static_cast<size_t>(p) * dim;
        double d = 0.0;
        for (int i = 0; i < dim; ++i) d += x[i] * y[i];
        for (int i = 0; i < dim; ++i) x[i] -= d * y[i];
      }
    }
    double n = 0.0;
    for (int i = 0; i < dim; ++i) n += x[i] * x[i];
    n = std::sqrt(n);
    if (!(n > 1e-12)) {
      // Degenerate: the coordinate axis least in the span so far.
      int best = 0;
      double least = 2.0;
      for (int i = 0; i < dim; ++i) {
        double in = 0.0;
        for (int p = 0; p < c; ++p) {
          const double y = (*v)[static_cast<size_t>(p) * dim + i];
          in += y * y;
        }
        if (in < least) {
          least = in;
          best = i;
        }
      }
      std::fill(x, x + dim, 0.0);
      x[best] = 1.0;
      --c;  // orthonormalise it again
      continue;
    }
    for (int i = 0; i < dim; ++i) x[i] /= n;
  }
}

}  // namespace

QueryBasis::QueryBasis(int dim, int rank)
    : dim_(dim), rank_(rank), ring_(static_cast<size_t>(kRing) * dim, 0.0f) {}

double QueryBasis::CapturedLocked(const float* q) const {
  double len = 0.0, in = 0.0;
  for (int i = 0; i < dim_; ++i) len += static_cast<double>(q[i]) * q[i];
  if (!(len > 0.0)) return 1.0;
  for (int r = 0; r < rank_; ++r) {
    const float* u = basis_.data() + static_cast<size_t>(r) * dim_;
    double d = 0.0;
    for (int i = 0; i < dim_; ++i) d += static_cast<double>(q[i]) * u[i];
    in += d * d;
  }
  return std::min(1.0, in / len);
}

void QueryBasis::Observe(const float* queries, int n) {
  absl::MutexLock lock(&mu_);
  const int64_t call = calls_++;
  if (call == 0 && n > 0) {
    // FNV-1a of the first query's bytes: heads that start together fall
    // due at different selects.
    uint64_t h = 0xcbf29ce484222325ull;
    const auto* b = reinterpret_cast<const unsigned char*>(queries);
    for (size_t i = 0; i < static_cast<size_t>(dim_) * sizeof(float); ++i) {
      h = (h ^ b[i]) * 0x100000001b3ull;
    }
    first_wait_ = kFirstSelects + static_cast<int64_t>((h ^ (h >> 32)) % kFirstSpread);
  }
  // Every select until the first fit; one in kSampleEvery after a fit (or
  // a fit declined).
  if ((fitted_ || fits_ > 0) && call % kSampleEvery != 0) return;
  ++selects_;
  for (int j = 0; j < n; ++j) {
    const float* q = queries + static_cast<size_t>(j) * dim_;
    bool finite = true;
    for (int i = 0; i < dim_; ++i) finite &= std::isfinite(q[i]);
    if (!finite) continue;
    std::copy(q, q + dim_, ring_.begin() + static_cast<size_t>(ring_next_) * dim_);
    ring_next_ = (ring_next_ + 1) % kRing;
    ring_size_ = std::min(ring_size_ + 1, kRing);
    if (fitted_) {
      const double share = CapturedLocked(q);
      captured_ema_ = ema_count_ == 0 ? share : captured_ema_ + (share - captured_ema_) / 16.0;
      ++ema_count_;
    }
  }
  bool due = false;
  if (!fitted_) {
    // The first fit after first_wait_; after a declined one, a backoff
    // that doubles (from kMinRefitSelects, up to 64x it).
    const int64_t wait = fits_ == 0
                             ? first_wait_
                             : (int64_t{kMinRefitSelects} / kSampleEvery) << std::min(fits_ - 1, 6);
    due = selects_ >= wait && ring_size_ > 0;
  } else if (selects_ >= refit_wait_ / kSampleEvery && ema_count_ >= 16) {
    if (captured_fit_ < 0.0) captured_fit_ = captured_ema_;  // adopted: its reference
    due = captured_ema_ < kRefitDrop * captured_fit_;
  }
  if (due) due_.store(true, std::memory_order_relaxed);
}

bool QueryBasis::Fit(std::vector<float>* basis) {
  absl::MutexLock lock(&mu_);
  due_.store(false, std::memory_order_relaxed);
  selects_ = 0;
  const int n = ring_size_;
  if (n == 0) return false;
  // The top rank_ eigenvectors of the second moment Q^T Q (Q: the ring's
  // n queries) from those of the n x n Gram matrix G = Q Q^T: for G a =
  // lambda a, Q^T a is one of Q^T Q's with the same eigenvalue. Subspace
  // iteration on G (n <= kRing), from the ring's longest queries.
  const float* ring = ring_.data();
  std::vector<double> g(static_cast<size_t>(n) * n, 0.0);
  double trace = 0.0;
  for (int a = 0; a < n; ++a) {
    for (int b = a; b < n; ++b) {
      double d = 0.0;
      const float* x = ring + static_cast<size_t>(a) * dim_;
      const float* y = ring + static_cast<size_t>(b) * dim_;
      for (int i = 0; i < dim_; ++i) d += static_cast<double>(x[i]) * y[i];
      g[static_cast<size_t>(a) * n + b] = g[static_cast<size_t>(b) * n + a] = d;
    }
    trace += g[static_cast<size_t>(a) * n + a];
  }
  const int k = std::min(rank_, n);
  std::vector<int> order(n);
  for (int a = 0; a < n; ++a) order[a] = a;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return g[static_cast<size_t>(a) * n + a] > g[static_cast<size_t>(b) * n + b];
  });
  std::vector<double> v(static_cast<size_t>(n) * k, 0.0), w(v.size());
  for (int c = 0; c < k; ++c) v[static_cast<size_t>(c) * n + order[c]] = 1.0;
  for (int it = 0; it < kIterations; ++it) {
    for (int c = 0; c < k; ++c) {
      const double* x = v.data() + static_cast<size_t>(c) * n;
      double* y = w.data() + static_cast<size_t>(c) * n;
      for (int a = 0; a < n; ++a) {
        const double* row = g.data() + static_cast<size_t>(a) * n;
        double s = 0.0;
        for (int b = 0; b < n; ++b) s += row[b] * x[b];
        y[a] = s;
      }
    }
    OrthonormaliseColumns(&w, n, k);
    v.swap(w);
  }
  // Captured: the sum of the Rayleigh quotients over the trace.
  double in = 0.0;
  for (int c = 0; c < k; ++c) {
    const double* x = v.data() + static_cast<size_t>(c) * n;
    for (int a = 0; a < n; ++a) {
      const double* row = g.data() + static_cast<size_t>(a) * n;
      double s = 0.0;
      for (int b = 0; b < n; ++b) s += row[b] * x[b];
      in += x[a] * s;
    }
  }
  const double captured = trace > 0.0 ? in / trace : 0.0;
  ++fits_;
  // Each refit, installed or not, doubles the wait before the next (queries
  // that keep moving would otherwise pay a fit, and a projection pass, every
  // kMinRefitSelects).
  if (fitted_) refit_wait_ = std::min<int64_t>(2 * refit_wait_, kMaxRefitSelects);
  if (!(captured >= kMinCaptured)) return false;
  // The basis in query space: Q^T a per column, orthonormalised (a rank
  // below rank_ is completed with axes).
  std::vector<double> u(static_cast<size_t>(dim_) * rank_, 0.0);
  for (int c = 0; c < k; ++c) {
    const double* x = v.data() + static_cast<size_t>(c) * n;
    double* y = u.data() + static_cast<size_t>(c) * dim_;
    for (int a = 0; a < n; ++a) {
      const float* q = ring + static_cast<size_t>(a) * dim_;
      for (int i = 0; i < dim_; ++i) y[i] += x[a] * q[i];
    }
  }
  OrthonormaliseColumns(&u, dim_, rank_);
  basis_.assign(u.size(), 0.0f);
  for (size_t i = 0; i < basis_.size(); ++i) basis_[i] = static_cast<float>(u[i]);
  basis->assign(basis_.begin(), basis_.end());
  fitted_ = true;
  captured_fit_ = captured;
  captured_ema_ = -1.0;
  ema_count_ = 0;
  return true;
}

void QueryBasis::Adopt(const std::vector<float>& basis) {
  absl::MutexLock lock(&mu_);
  if (basis.size() != static_cast<size_t>(rank_) * dim_) return;
  basis_ = basis;
  fitted_ = true;
  selects_ = 0;
  captured_fit_ = -1.0;
  captured_ema_ = -1.0;
  ema_count_ = 0;
}

int64_t QueryBasis::first_fit_selects() const {
  absl::MutexLock lock(&mu_);
  return first_wait_;
}

int QueryBasis::fits() const {
  absl::MutexLock lock(&mu_);
  return fits_;
}

double QueryBasis::captured_at_fit() const {
  absl::MutexLock lock(&mu_);
  return captured_fit_;
}

std::vector<float> QueryBasis::basis() const {
  absl::MutexLock lock(&mu_);
  return basis_;
}

double QueryBasis::captured_recent() const {
  absl::MutexLock lock(&mu_);
  return ema_count_ > 0 ? captured_ema_ : -1.0;
}

}  // namespace icecache
