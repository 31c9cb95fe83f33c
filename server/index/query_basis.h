// QueryBasis: the few directions where a KV head's queries live, learnt from
// the queries its selector serves, for PqSketch::SetBasis (docs/
// architecture.md §3.4).
//
// Real queries are not spread like the keys: a mean the keys lack (the
// query/key shift), the sink direction and a handful of others carry most
// of their length. The product quantiser's 4-dimension codebooks quantise
// the keys' component along such a direction as coarsely as any other, and
// a large query component multiplies that error. Scored exactly on a basis
// of those directions (one fp16 projection per key and basis vector), the
// estimates need fewer candidate pages for the same mass: on the
// shifted-queries family at 131072 tokens, 80 instead of 260 for 0.95 of
// the page oracle (docs/bench/basis46.md).
//
// The basis is the top PqSketch::kBasis eigenvectors of the queries' second
// moment (not centred: the shift is what matters most) over a ring of the
// last kRing queries observed. Every select is observed until the first
// fit; then one in kSampleEvery, which also
// tracks the share of the observed queries' squared length that the basis
// captures. The first fit falls due after kFirstSelects plus a stagger in
// [0, kFirstSpread) selects, a hash of the first query observed: a daemon's
// heads start decoding together, and a first fit on all of them at the same
// select (a pass over every key's frame each) was one step 14x the median
// (a 32k context, 64 heads: docs/bench/append55.md). The stagger is the
// same for the same queries. A refit is due when that share falls below kRefitDrop of what
// it was at the fit (queries that drifted), at most once per
// kMinRefitSelects selects after the first fit, a wait that doubles with
// each refit up to kMaxRefitSelects (each costs a pass over every key's
// frame: a few ms at 131072 tokens). A fit whose basis captures less than
// kMinCaptured of the ring's length is not installed (queries with no
// dominant directions gain nothing, and the projections cost scan time).
//
// Thread safety: Observe() may run concurrently with itself and with the
// rest (Select() is concurrent); Fit() is called by the selector's writer.
#ifndef ICECACHE_SERVER_INDEX_QUERY_BASIS_H_
#define ICECACHE_SERVER_INDEX_QUERY_BASIS_H_

#include <atomic>
#include <cstdint>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace icecache {

class QueryBasis {
 public:
  static constexpr int kRing = 64;
  static constexpr int kFirstSelects = 8;
  static constexpr int kFirstSpread = 32;
  static constexpr int kSampleEvery = 8;
  static constexpr int kMinRefitSelects = 256;
  static constexpr int kMaxRefitSelects = 4096;
  static constexpr double kRefitDrop = 0.8;
  static constexpr double kMinCaptured = 0.4;
  static constexpr int kIterations = 60;  // subspace iterations per fit

  // `dim` > 0, `rank` in [1, dim].
  QueryBasis(int dim, int rank);

  // The queries of one select (n x dim fp32). Non-finite queries are left
  // out.
  void Observe(const float* queries, int n);

  // Whether a fit is due (cheap: an atomic).
  bool due() const { return due_.load(std::memory_order_relaxed); }

  // Fits the basis on the ring: `basis` gets rank x dim orthonormal rows and
  // true when it should be installed; false (and no fit due until
  // kMinRefitSelects more selects) when the ring is empty or the basis
  // captures less than kMinCaptured.
  bool Fit(std::vector<float>* basis);

  // A basis installed from elsewhere (an index image): tracked as if fitted
  // here, its reference share taken from the next queries observed.
  void Adopt(const std::vector<float>& basis);

  // Figures for tests and reports.
  // The selects after which the first fit falls due: kFirstSelects until a
  // query was observed, then plus its stagger.
  int64_t first_fit_selects() const;
  int fits() const;
  double captured_at_fit() const;    // -1 before a fit
  double captured_recent() const;    // -1 before a fit
  std::vector<float> basis() const;  // the last installed (empty before)

 private:
  // Share of q's squared length in the basis (mu_ held).
  double CapturedLocked(const float* q) const;

  const int dim_;
  const int rank_;
  mutable absl::Mutex mu_;
  std::vector<float> ring_;  // kRing x dim, the oldest overwritten
  int ring_size_ = 0;
  int ring_next_ = 0;
  int64_t selects_ = 0;         // observed calls since the last fit
  int64_t calls_ = 0;           // every call
  bool fitted_ = false;         // a basis in use (fitted or adopted)
  std::vector<float> basis_;    // rank x dim (the writer's; read by Observe under mu_)
  double captured_fit_ = -1.0;  // the ring's share at the fit
  double captured_ema_ = -1.0;  // observed queries' share since
  int ema_count_ = 0;
  int fits_ = 0;
  int64_t refit_wait_ = kMinRefitSelects;  // selects before a refit may be due
  int64_t first_wait_ = kFirstSelects;     // set by the first Observe (its stagger)
  std::atomic<bool> due_{false};
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_QUERY_BASIS_H_
