#include "server/session/decode_activity.h"

namespace icecache {

void DecodeActivity::Enter() { in_flight_.fetch_add(1); }

void DecodeActivity::Exit() {
  // Both sequentially consistent, as WaitQuiet's: either this sees the
  // waiter, or the waiter sees no call in flight.
  if (in_flight_.fetch_sub(1) == 1 && waiters_.load() > 0) {
    absl::MutexLock l(&mu_);
    quiet_.SignalAll();
  }
}

bool DecodeActivity::WaitQuiet(absl::Duration max) {
  if (in_flight_.load() == 0) return false;
  waits_.fetch_add(1, std::memory_order_relaxed);
  waiters_.fetch_add(1);
  const absl::Time deadline = absl::Now() + max;
  bool timed_out = false;
  {
    absl::MutexLock l(&mu_);
    while (in_flight_.load() > 0 && !timed_out) timed_out = quiet_.WaitWithDeadline(&mu_, deadline);
  }
  waiters_.fetch_sub(1);
  if (timed_out && in_flight_.load() > 0) timeouts_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace icecache
