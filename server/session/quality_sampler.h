// QualitySampler: the background worker of the online quality monitor and
// the self-calibrating width (docs/architecture.md §5 sessions, §9
// threading). A decode thread that decided to measure a step (the exact
// reference of a selection is a full scan, ten times a selection or more)
// copies what the measurement needs into a job and Offer()s it; one
// dedicated low-priority thread runs the jobs in order.
//
// Never delays the decode path: Offer() takes one short lock, never waits,
// and drops the job when the queue is full or the CPU budget is spent (both
// counted).
//
// Budget, per session: each monitored session holds a QualityAccount
// (NewAccount()). The worker's CPU time for a job (measured with
// CLOCK_THREAD_CPUTIME_ID) is charged to the job's account; a session's job
// is admitted while its account's CPU time is under cpu_share x the
// selection time it reported through AddSelectionTime(), plus a burst
// allowance of its own that lets the first samples (the calibrators'
// warm-up) of every new session run at once. One session's warm-up
// therefore never spends another's budget (docs/bench/fair9_sampler.txt: a
// session created after another's warm-up was measured 0 times when the
// budget was global). Queue fairness: the last quarter of the queue
// (limit = max(1, queue_capacity / 4) slots) is kept for accounts holding
// fewer than `limit` queued jobs: an account at its limit queues more only
// while more than `limit` slots are free (kQueueFull beyond). A session
// whose heads are all due at once (a warm-up offers kv_heads probes per
// layer call, faster than the worker measures them) thus never fills the
// whole queue while other sessions' due heads are refused, and a session
// alone still keeps up to three quarters of it queued (the worker stays
// busy across the gaps between its decode steps).
//
// The resulting bound: the worker's CPU time is at most cpu_share x the
// total selection time + (accounts created) x burst + the overshoot of
// admission at offer time (a job admitted under budget runs even if its
// account crossed the budget meanwhile: at most the jobs the account had
// queued, below queue_capacity, as under the old global budget). No global cap on top: the burst is
// a one-time warm-up per session, never refilled; live sessions are bounded (max_sessions) and each
// one's jobs come only from its own selections, over KV it appended; the worker is one nice-19
// thread, so its rate never exceeds one core whatever the accounts allow. A global cap scaled by
// the live accounts would count the bursts of sessions gone away against the new ones: the
// starvation this design removes.
//
// A job returns its outcome (measured, or stale: the index moved or the
// session went away before it ran; both counted). The destructor stops the
// worker after the job it is running; jobs still queued are discarded
// (destroyed on the destroying thread).
//
// Thread safety: every method is thread-safe.
#ifndef ICECACHE_SERVER_SESSION_QUALITY_SAMPLER_H_
#define ICECACHE_SERVER_SESSION_QUALITY_SAMPLER_H_

#include <algorithm>
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
#include "server/session/decode_activity.h"

namespace icecache {

struct QualitySamplerOptions {
  int queue_capacity = 64;  // jobs waiting at most (1..65536); beyond, Offer drops
  // Worker CPU time / selection time, in (0, 1].
  double cpu_share = 0.05;
  // CPU time each account (session) may spend ahead of its share (>= 0):
  // the first samples of a session run before much selection time has
  // accrued. Once per account, never refilled.
  absl::Duration burst = absl::Milliseconds(250);
  // Lower the worker thread's scheduling priority (nice 19). Off in tests
  // that must not depend on the scheduler.
  bool low_priority = true;
  // Decode calls the worker gives way to (decode_activity.h): it waits while
  // one is in flight, before each job and at each of the job's yields
  // (Defer), for at most `defer_max` at a time. Null: never waits. Must
  // outlive the sampler.
  DecodeActivity* defer_to = nullptr;
  absl::Duration defer_max = absl::Milliseconds(2);
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
  // Waits for a decode call in flight (QualitySamplerOptions::defer_to),
  // and those of them that gave up at defer_max.
  int64_t deferred = 0;
  int64_t defer_timeouts = 0;
};

// One session's share of the sampler's budget (QualitySampler::NewAccount).
// The counters are the sampler's to write; readable from any thread.
struct QualityAccount {
  std::atomic<int64_t> selection_ns{0};  // selection time reported for it
  std::atomic<int64_t> cpu_ns{0};        // worker CPU time charged to it
  std::atomic<int> queued{0};            // its jobs waiting (written under the sampler's lock)
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

  // A new session's account, with its own burst. `selection_ns` and
  // `cpu_ns` start it where a restored session's counters were (so a
  // session restored with its calibrators gets no second warm-up burst).
  std::shared_ptr<QualityAccount> NewAccount(int64_t selection_ns = 0, int64_t cpu_ns = 0) const;
  // Counts selection time of `account`'s session, the base of its CPU
  // budget (and of the global counter). Lock-free.
  void AddSelectionTime(int64_t ns, QualityAccount& account) {
    selection_ns_.fetch_add(ns, std::memory_order_relaxed);
    account.selection_ns.fetch_add(ns, std::memory_order_relaxed);
  }
  // Queues `job`, charged to `account` (non-null), unless the queue or the
  // account's share of it is full or the account's budget is spent (its
  // share, plus its burst when `burst`: the caller may keep a job to the
  // share alone, SessionQualityOptions::fair_burst); never blocks on the
  // worker.
  OfferResult Offer(Job job, std::shared_ptr<QualityAccount> account, bool burst = true)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Whether Offer() would queue a job of `account` now (budget left, room
  // in the queue for it): lets the caller skip copying a probe that would
  // be dropped. Counts a refusal by the budget as dropped_over_budget.
  // Lock-free.
  bool Admits(const QualityAccount& account, bool burst = true);
  absl::Duration burst() const { return options_.burst; }
  // max(1, queue_capacity / 4): the queued jobs an account may always hold,
  // and the slots kept free for accounts holding fewer.
  int account_queue_limit() const { return std::max(1, options_.queue_capacity / 4); }
  // Whether a decode call is in flight that the worker should give way to
  // (lock-free), and the wait for it (Defer: the job's locks released).
  bool ShouldDefer() const { return options_.defer_to != nullptr && options_.defer_to->busy(); }
  void Defer() {
    if (options_.defer_to != nullptr) options_.defer_to->WaitQuiet(options_.defer_max);
  }
  // Blocks until no job is queued or running (tests, benchmarks).
  void WaitIdle() ABSL_LOCKS_EXCLUDED(mu_);
  QualitySamplerStats stats() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  explicit QualitySampler(const QualitySamplerOptions& options) : options_(options) {}
  void WorkerLoop() ABSL_LOCKS_EXCLUDED(mu_);
  struct Entry {
    Job job;
    std::shared_ptr<QualityAccount> account;
  };
  bool OverBudget(const QualityAccount& account, bool burst) const;
  // Room in a queue of `depth` jobs for one more of `account`'s.
  bool HasRoom(const QualityAccount& account, int depth) const;
  bool HasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !queue_.empty(); }
  bool Idle() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stop_ || (queue_.empty() && !running_);
  }

  const QualitySamplerOptions options_;
  std::atomic<int64_t> selection_ns_{0};     // every account's, summed (stats)
  std::atomic<int64_t> cpu_ns_{0};           // every job's, summed (stats)
  std::atomic<int> depth_{0};                // queue_.size(), readable without mu_
  std::atomic<uint64_t> refused_budget_{0};  // Admits() refusals
  mutable absl::Mutex mu_;
  std::deque<Entry> queue_ ABSL_GUARDED_BY(mu_);
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
