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
  ages_.Clear();
  oldest_ = 0;
  steps_.store(0, std::memory_order_relaxed);
  stopped_.store(false, std::memory_order_relaxed);
  return carry_steps;
}

void CarryPool::Observe(double mass_ratio, bool carried, double target, int carry_steps,
                        int carry_age) {
  if (carry_steps <= 0) return;
  absl::MutexLock l(&mu_);
  if (stopped_.load(std::memory_order_relaxed)) return;  // a late sample of before the stop
  if (oldest_ == 0 ||
      (carry_steps > oldest_ && steps_.load(std::memory_order_relaxed) == oldest_)) {
    // The longest carry asked for, until a judgement shortens it (a head
    // judged by itself may ask for less).
    oldest_ = carry_steps;
    steps_.store(carry_steps, std::memory_order_relaxed);
  }
  ages_.Add(mass_ratio, carried, carry_age, oldest_);
  // Where the carry falls behind, one reuse fewer, judged at once on the
  // ages it keeps; where even one does, it stops.
  const int now = steps_.load(std::memory_order_relaxed);
  const int holding = ages_.Holding(now, o_.judge_samples, o_.margin, target, o_.confidence_z);
  if (holding == now) return;
  shortened_ += now - std::max(holding, 1);
  if (holding > 0) {
    steps_.store(holding, std::memory_order_relaxed);
    return;
  }
  steps_.store(1, std::memory_order_relaxed);
  stopped_.store(true, std::memory_order_relaxed);
  ++stops_;
  run_ = 0;
}

CarryPoolReport CarryPool::report() const {
  absl::MutexLock l(&mu_);
  CarryPoolReport r;
  r.stopped = stopped_.load(std::memory_order_relaxed);
  r.stops = stops_;
  r.steps = steps_.load(std::memory_order_relaxed);
  r.shortened = shortened_;
  const CarryTally now = ages_.Upto(steps_.load(std::memory_order_relaxed));
  r.carried = now.carried;
  r.fresh = now.fresh;
  r.carried_mean = now.carried_mean();
  r.fresh_mean = now.fresh_mean();
  return r;
}

}  // namespace icecache
