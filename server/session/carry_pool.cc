#include "server/session/carry_pool.h"

#include <algorithm>

namespace icecache {

bool CarryPool::Allows() {
  if (!stopped_.load(std::memory_order_relaxed)) return true;
  absl::MutexLock l(&mu_);
  if (!stopped_.load(std::memory_order_relaxed)) return true;
  if (++run_ < wait_) return false;
  // Try again: the session's data may have changed. The tallies start over.
  wait_ = std::min(2 * wait_, o_.max_retry_selects);
  tally_.Clear();
  stopped_.store(false, std::memory_order_relaxed);
  return true;
}

void CarryPool::Observe(double mass_ratio, bool carried, double target, int carry_steps) {
  absl::MutexLock l(&mu_);
  if (stopped_.load(std::memory_order_relaxed)) return;  // a late sample of before the stop
  tally_.Add(mass_ratio, carried);
  if (tally_.FallsBehind(o_.judge_samples, o_.margin, target, carry_steps, o_.confidence_z)) {
    stopped_.store(true, std::memory_order_relaxed);
    ++stops_;
    run_ = 0;
  }
}

CarryPoolReport CarryPool::report() const {
  absl::MutexLock l(&mu_);
  CarryPoolReport r;
  r.stopped = stopped_.load(std::memory_order_relaxed);
  r.stops = stops_;
  r.carried = tally_.carried;
  r.fresh = tally_.fresh;
  r.carried_mean = tally_.carried_mean();
  r.fresh_mean = tally_.fresh_mean();
  return r;
}

}  // namespace icecache
