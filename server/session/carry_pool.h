// The session's pooled judgement of the candidate carry-over
// (docs/architecture.md §5.1, "Candidate carry-over, judged per head").
//
// Each calibrated head judges its own carry once it has carry_judge_samples
// carried and as many fresh samples (WidthCalibrator). At model scale the
// sampling budget reaches a head a few times in hundreds of steps (32 layers
// x 8 KV heads: 1-3 samples per head in 200 steps, docs/bench/carry36.md),
// so the heads would carry unjudged for thousands of steps. The pool sees
// every sample of every carrying head, carried or fresh, and judges the
// session as a whole within its first tens of steps: when the carried
// samples' mean falls more than `margin` below the fresh ones' (over at
// least `judge_samples` of each, with `confidence_z` standard errors to
// spare, and the mix under the target likewise) at a carry length above 1,
// the pool shortens the carry of the heads that have no judgement of their
// own by one reuse and judges the shorter carry at once on the samples of
// the ages it keeps (a carry of 2 whose second reuse falls behind may hold
// at 1); at 1 those heads select afresh at every step. After
// `retry_selects` selections it lets them carry again, at the length they
// ask for, and judges afresh; each stop doubles the wait (up to
// max_retry_selects), so a session whose queries keep moving fast retries
// ever more rarely.
//
// Thread safety: every method may be called from any thread.
#ifndef ICECACHE_SERVER_SESSION_CARRY_POOL_H_
#define ICECACHE_SERVER_SESSION_CARRY_POOL_H_

#include <atomic>
#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/index/carry_tally.h"

namespace icecache {

struct CarryPoolOptions {
  double margin = 0.03;                      // carried mean below fresh mean by more: stop (>= 0)
  int judge_samples = 16;                    // of each kind before a judgement (>= 1)
  int64_t retry_selects = int64_t{1} << 16;  // selections before the first retry (>= 1)
  int64_t max_retry_selects = int64_t{1} << 22;  // the doubling stops here (>= retry_selects)
  // Confidence of a stop, in standard errors (CarryTally::FallsBehind's z;
  // >= 0, 0: the means alone). The pool's judgement is looked at after each
  // of hundreds of samples, so the means alone stop on noise.
  double confidence_z = 1.0;
};

struct CarryPoolReport {
  bool stopped = false;  // heads without their own judgement select afresh now
  // The carry length those heads may use now (0: no judgement yet, the
  // length they ask for); shortened by one at each judgement against it.
  int steps = 0;
  int64_t shortened = 0;  // judgements that shortened the carry
  int64_t stops = 0;
  int64_t carried = 0, fresh = 0;  // samples since the last (re)start
  double carried_mean = 0.0, fresh_mean = 0.0;
};

class CarryPool {
 public:
  explicit CarryPool(const CarryPoolOptions& o = {}) : o_(o), wait_(o.retry_selects) {}

  // One selection of a carrying head that asks for `carry_steps` (> 0): the
  // length it may use, 0 while the pool has stopped the carry (the caller
  // then selects afresh unless the head judged itself).
  int Steps(int carry_steps) ABSL_LOCKS_EXCLUDED(mu_);
  // One measured sample of a head that selected with the carry on, at
  // `carry_steps`, calibrated to `target` (CarryTally::FallsBehind; 0: the
  // margin alone judges), `carry_age` its reuse (Selection::carry_age; a
  // carried sample counts as 1 .. the first sample's carry_steps). The
  // first sample sets the length the heads ask for.
  void Observe(double mass_ratio, bool carried, double target, int carry_steps, int carry_age = 1)
      ABSL_LOCKS_EXCLUDED(mu_);
  CarryPoolReport report() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const CarryPoolOptions o_;
  std::atomic<bool> stopped_{false};  // read without the lock on every selection
  std::atomic<int> steps_{0};         // the length judged (0: none yet); likewise
  mutable absl::Mutex mu_;
  int64_t run_ ABSL_GUARDED_BY(mu_) = 0;  // selections since the stop
  int64_t wait_ ABSL_GUARDED_BY(mu_);
  int64_t stops_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t shortened_ ABSL_GUARDED_BY(mu_) = 0;
  // Samples since the last (re)start, by carry age (carry_tally.h), up to
  // the longest carry asked for.
  CarryAges ages_ ABSL_GUARDED_BY(mu_);
  int oldest_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_CARRY_POOL_H_
