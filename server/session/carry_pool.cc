#include "server/session/carry_pool.h"

#include <algorithm>

namespace icecache {

int CarryPool::Steps(int carry_steps) {
  const auto allowed = [&] {
    const int cap = steps_.load(std::memory_order_relaxed);
    return cap > 0 ? std::min(carry_steps, cap) : carry_steps;
  };
  if (!stopped_.load(std::memory_order_relaxed)) return allowed();
  absl::MutexLock l(&mu_);
  if (!stopped_.load(std::memory_order_relaxed)) return allowed();
  if (++run_ < wait_) return 0;
  // Try again, at the length the heads ask for: the session's data may have
  // changed. The tallies start over.
  wait_ = std::min(2 * wait_, o_.max_retry_selects);
  by_age_.clear();
  steps_.store(0, std::memory_order_relaxed);
  stopped_.store(false, std::memory_order_relaxed);
  return carry_steps;
}

CarryTally CarryPool::Now() const {
  CarryTally t;
  const size_t ages =
      std::min(by_age_.size(), static_cast<size_t>(steps_.load(std::memory_order_relaxed)) + 1);
  for (size_t a = 0; a < ages; ++a) t.Merge(by_age_[a]);
  return t;
}

void CarryPool::Observe(double mass_ratio, bool carried, double target, int carry_steps,
                        int carry_age) {
  if (carry_steps <= 0) return;
  absl::MutexLock l(&mu_);
  if (stopped_.load(std::memory_order_relaxed)) return;  // a late sample of before the stop
  if (by_age_.empty() ||
      (static_cast<size_t>(carry_steps) >= by_age_.size() &&
       static_cast<size_t>(steps_.load(std::memory_order_relaxed)) + 1 == by_age_.size())) {
    // The longest carry asked for, until a judgement shortens it (a head
    // judged by itself may ask for less).
    steps_.store(carry_steps, std::memory_order_relaxed);
    by_age_.resize(static_cast<size_t>(carry_steps) + 1);
  }
  const int oldest = static_cast<int>(by_age_.size()) - 1;
  by_age_[carried ? std::clamp(carry_age, 1, oldest) : 0].Add(mass_ratio, carried);
  // Judged at the length allowed now; where that falls behind, one reuse
  // fewer (the last is the stalest), judged at once on the ages it keeps.
  for (int steps = steps_.load(std::memory_order_relaxed);
       Now().FallsBehind(o_.judge_samples, o_.margin, target, steps, o_.confidence_z);
       steps = steps_.load(std::memory_order_relaxed)) {
    if (steps <= 1) {
      stopped_.store(true, std::memory_order_relaxed);
      ++stops_;
      run_ = 0;
      return;
    }
    steps_.store(steps - 1, std::memory_order_relaxed);
    ++shortened_;
  }
}

CarryPoolReport CarryPool::report() const {
  absl::MutexLock l(&mu_);
  CarryPoolReport r;
  r.stopped = stopped_.load(std::memory_order_relaxed);
  r.stops = stops_;
  r.steps = steps_.load(std::memory_order_relaxed);
  r.shortened = shortened_;
  const CarryTally now = Now();
  r.carried = now.carried;
  r.fresh = now.fresh;
  r.carried_mean = now.carried_mean();
  r.fresh_mean = now.fresh_mean();
  return r;
}

}  // namespace icecache
