// DecodeLanes: the threads that select a decode step's KV heads beside the
// calling thread, kept watching for the next layer's work between calls.
//
// A decode loop calls the daemon once per layer, a few hundred microseconds
// apart (the client's attention for the layer in between). oneTBB's workers
// go to sleep in such a gap, and waking one costs a futex wake-up: on the
// 2-vCPU VM the second lane of a layer's selection started 110-150 us after
// the first, of about 1 ms per layer (docs/bench/lanes42.md). These helpers
// watch for the next job instead, yielding the CPU between looks (so a
// runnable thread on the same CPU, the client's attention or a selection,
// goes first), for up to `spin` after their last job; then they sleep until
// a job wakes them, as oneTBB's would. A job found while watching starts
// within microseconds.
//
// One job at a time: a Run() that finds another in flight (a second
// session's step, an entry of a batched step) runs its tasks on oneTBB
// instead (ParallelForInOrder), so nothing waits for the lanes.
//
// Thread safety: Run() may be called from any thread, concurrently; fn must
// not call Run() of the same DecodeLanes.
#ifndef ICECACHE_SERVER_SESSION_DECODE_LANES_H_
#define ICECACHE_SERVER_SESSION_DECODE_LANES_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/index/parallel_build.h"

namespace icecache {

class DecodeLanes {
 public:
  // `helpers` threads (>= 1) beside each caller, watching for up to `spin`
  // (> 0) after their last job.
  DecodeLanes(int helpers, absl::Duration spin);
  ~DecodeLanes();  // stops and joins the helpers (no Run() may be in flight)
  DecodeLanes(const DecodeLanes&) = delete;
  DecodeLanes& operator=(const DecodeLanes&) = delete;

  // ParallelForInOrder's contract (parallel_build.h): fn(i) for every i in
  // [0, count), the indices started in increasing order by whichever lane
  // is free (the caller is one), and the error of the lowest failing index,
  // prefixed "task <i>: "; indices not yet taken are skipped once one
  // failed. Returns when every started task has returned.
  absl::Status Run(int64_t count, const std::function<absl::Status(int64_t)>& fn);

  // A decode loop is under way (a DecodeStep or a decode append arrived, or
  // was answered): the helpers watch for the next job for up to `spin` from
  // now, as after a job of their own, and sleeping ones wake to do so. A
  // loop's calls need not each run a job here (with layer reuse a group's
  // later layers select nothing, and a prefetched layer is already
  // written), so its jobs can come further apart than `spin` while its
  // calls do not; without this the helpers slept between them and every
  // selecting layer waited for a wake-up (docs/bench/watch58.md). One
  // clock read and two stores; a signal only while a helper sleeps.
  void KeepWatching();
  // Helpers asleep now (tests).
  int sleeping() const { return sleepers_.load(); }

  // Jobs run here, and jobs that found another in flight and ran on oneTBB.
  int64_t jobs() const { return jobs_.load(std::memory_order_relaxed); }
  int64_t fallbacks() const { return fallbacks_.load(std::memory_order_relaxed); }
  // Tasks the helpers ran (the caller ran the others).
  int64_t helper_tasks() const { return helper_tasks_.load(std::memory_order_relaxed); }
  // Jobs run here in which no helper ran a task: the caller ran them all
  // (the helpers were asleep, or another thread held their CPU).
  int64_t jobs_alone() const { return jobs_alone_.load(std::memory_order_relaxed); }

 private:
  struct Job {
    const std::function<absl::Status(int64_t)>* fn = nullptr;
    InOrderQueue queue;
  };

  void Helper();
  // The watch ends `spin_` from now: after a helper's job, and per
  // KeepWatching.
  void ExtendWatch();
  // Takes indices of `job` until none is left.
  void Drain(Job& job, bool helper);

  const absl::Duration spin_;
  std::vector<std::thread> threads_;
  absl::Mutex run_mu_;  // one job at a time (TryLock; held for the whole Run)
  Job job_;             // the job in flight, written under run_mu_ before it opens
  // (generation << 1) | open: a helper joins a job only while it is open,
  // and the caller closes it before it waits for `active_` to fall to 0.
  std::atomic<uint64_t> state_{0};
  std::atomic<int> active_{0};    // helpers inside the open job
  std::atomic<int> sleepers_{0};  // helpers asleep (or about to be) on wake_
  // The helpers watch until this time (steady clock, ns; ExtendWatch);
  // `touches_` counts the KeepWatching calls, so a helper going to sleep
  // sees one that came after it looked (and the call sees the sleeper and
  // signals).
  std::atomic<int64_t> watch_until_ns_{0};
  std::atomic<uint64_t> touches_{0};
  std::atomic<bool> stop_{false};
  absl::Mutex wake_mu_;
  absl::CondVar wake_;
  std::atomic<int64_t> jobs_{0}, fallbacks_{0}, helper_tasks_{0}, jobs_alone_{0};
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_DECODE_LANES_H_
