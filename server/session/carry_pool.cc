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
  carried_n_ = fresh_n_ = 0;
  carried_sum_ = fresh_sum_ = 0.0;
  stopped_.store(false, std::memory_order_relaxed);
  return true;
}

void CarryPool::Observe(double mass_ratio, bool carried) {
  absl::MutexLock l(&mu_);
  if (stopped_.load(std::memory_order_relaxed)) return;  // a late sample of before the stop
  if (carried) {
    ++carried_n_;
    carried_sum_ += mass_ratio;
  } else {
    ++fresh_n_;
    fresh_sum_ += mass_ratio;
  }
  if (carried_n_ < o_.judge_samples || fresh_n_ < o_.judge_samples) return;
  if (fresh_sum_ / fresh_n_ - carried_sum_ / carried_n_ > o_.margin) {
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
  r.carried = carried_n_;
  r.fresh = fresh_n_;
  if (carried_n_ > 0) r.carried_mean = carried_sum_ / carried_n_;
  if (fresh_n_ > 0) r.fresh_mean = fresh_sum_ / fresh_n_;
  return r;
}

}  // namespace icecache
