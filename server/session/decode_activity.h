// DecodeActivity: whether a decode call is in flight, for the background
// work that gives way to it (the quality sampler's measurements).
//
// On a machine with few cores the decode lanes' helper watches for the next
// layer's job by yielding its CPU between looks (decode_lanes.h). A
// background thread that takes that CPU in a gap holds it for a whole
// scheduler slice, at any priority: the helper then joins the next layer's
// selection late or not at all, and the caller selects every KV head alone.
// On the 2-vCPU VM, with the quality sampler at nice 19, the helper took no
// head at all in 6-8% of the layers and started a selection 48 us late on
// average; with the monitor off, in 1 of 1600 (docs/bench/defer61.md). So
// the sampler waits, between its steps and between chunks of its reference
// scan, while a decode call is in flight (at most `max` at a time: under
// back-to-back calls from many sessions it still gets a chunk in), and its
// measurements run in the gaps between calls.
//
// Thread safety: every method is thread-safe.
#ifndef ICECACHE_SERVER_SESSION_DECODE_ACTIVITY_H_
#define ICECACHE_SERVER_SESSION_DECODE_ACTIVITY_H_

#include <atomic>
#include <cstdint>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace icecache {

class DecodeActivity {
 public:
  // A decode call in flight while it lives (a null activity: nothing).
  class Call {
   public:
    explicit Call(DecodeActivity* activity) : activity_(activity) {
      if (activity_ != nullptr) activity_->Enter();
    }
    ~Call() {
      if (activity_ != nullptr) activity_->Exit();
    }
    Call(const Call&) = delete;
    Call& operator=(const Call&) = delete;

   private:
    DecodeActivity* activity_;
  };

  void Enter();
  void Exit();
  bool busy() const { return in_flight_.load() > 0; }

  // Blocks while a decode call is in flight, for at most `max`; at once when
  // none is. Whether it waited.
  bool WaitQuiet(absl::Duration max);

  // Waits that found a call in flight, and those that gave up at `max`.
  int64_t waits() const { return waits_.load(std::memory_order_relaxed); }
  int64_t timeouts() const { return timeouts_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int> in_flight_{0};
  std::atomic<int> waiters_{0};
  absl::Mutex mu_;
  absl::CondVar quiet_;
  std::atomic<int64_t> waits_{0}, timeouts_{0};
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_DECODE_ACTIVITY_H_
