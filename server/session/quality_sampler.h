// QualitySampler: the background worker of the online quality monitor and
// the self-calibrating width (docs/architecture.md §5 sessions, §9
// threading). A decode thread that decided to measure a step (the exact
// reference of a selection is a full scan, ten times a selection or more)
// copies what the measurement needs into a job and Offer()s it; one
// dedicated low-priority thread runs the jobs in order.
//
// Never delays the decode path: Offer() takes one short lock, never waits,
// and drops the job when the queue is full or the CPU budget is spent (both
// counted). Budget: the worker's CPU time (measured per job with
// CLOCK_THREAD_CPUTIME_ID) may not exceed cpu_share x the selection time
// reported through AddSelectionTime(), plus a fixed burst allowance that
// lets the first samples of a new session run at once. On average the
// calibration therefore costs at most cpu_share of the selection time.
//
// A job returns its outcome (measured, or stale: the index moved or the
// session went away before it ran; both counted). The destructor stops the
// worker after the job it is running; jobs still queued are discarded
// (destroyed on the destroying thread).
//
// Thread safety: every method is thread-safe.
#ifndef ICECACHE_SERVER_SESSION_QUALITY_SAMPLER_H_
#define ICECACHE_SERVER_SESSION_QUALITY_SAMPLER_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/thread_cpu.h"  // ThreadCpuNanos

namespace icecache {

struct QualitySamplerOptions {
  int queue_capacity = 64;  // jobs waiting at most (1..65536); beyond, Offer drops
  // Worker CPU time / selection time, in (0, 1].
  double cpu_share = 0.05;
  // CPU time the worker may spend ahead of the share (>= 0): the first
  // samples of a session run before much selection time has accrued.
  absl::Duration burst = absl::Milliseconds(250);
  // Lower the worker thread's scheduling priority (nice 19). Off in tests
  // that must not depend on the scheduler.
  bool low_priority = true;
};

enum class SampleOutcome { kMeasured, kStale };
enum class OfferResult { kQueued, kQueueFull, kOverBudget };

struct QualitySamplerStats {
  uint64_t offered = 0;
  uint64_t queued = 0;
  uint64_t dropped_queue_full = 0;
  uint64_t dropped_over_budget = 0;
  uint64_t measured = 0;
  uint64_t stale = 0;
  int64_t cpu_ns = 0;        // worker CPU time spent on jobs
  int64_t selection_ns = 0;  // selection time reported
  int queue_depth = 0;       // jobs waiting now
};

class QualitySampler {
 public:
  using Job = std::function<SampleOutcome()>;

  // InvalidArgument naming the option out of range. Starts the worker.
  static absl::StatusOr<std::unique_ptr<QualitySampler>> Create(
      const QualitySamplerOptions& options);
  ~QualitySampler();
  QualitySampler(const QualitySampler&) = delete;
  QualitySampler& operator=(const QualitySampler&) = delete;

  // Counts selection time, the base of the CPU budget. Lock-free.
  void AddSelectionTime(int64_t ns) { selection_ns_.fetch_add(ns, std::memory_order_relaxed); }
  // Queues `job` unless the queue is full or the budget is spent; never
  // blocks on the worker.
  OfferResult Offer(Job job) ABSL_LOCKS_EXCLUDED(mu_);
  // Whether Offer() would queue a job now (budget left, room in the queue):
  // lets the caller skip copying a probe that would be dropped. Counts a
  // refusal by the budget as dropped_over_budget. Lock-free.
  bool Admits();
  // Blocks until no job is queued or running (tests, benchmarks).
  void WaitIdle() ABSL_LOCKS_EXCLUDED(mu_);
  QualitySamplerStats stats() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  explicit QualitySampler(const QualitySamplerOptions& options) : options_(options) {}
  void WorkerLoop() ABSL_LOCKS_EXCLUDED(mu_);
  bool OverBudget() const;
  bool HasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); }
  bool Idle() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stop_ || (queue_.empty() && !running_);
  }

  const QualitySamplerOptions options_;
  std::atomic<int64_t> selection_ns_{0};
  std::atomic<int64_t> cpu_ns_{0};
  std::atomic<int> depth_{0};                // queue_.size(), readable without mu_
  std::atomic<uint64_t> refused_budget_{0};  // Admits() refusals
  mutable absl::Mutex mu_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  bool running_ ABSL_GUARDED_BY(mu_) = false;  // the worker is inside a job
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t offered_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t queued_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t dropped_full_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t dropped_budget_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t measured_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t stale_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread worker_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_QUALITY_SAMPLER_H_
