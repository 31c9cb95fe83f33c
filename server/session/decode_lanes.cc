#include "server/session/decode_lanes.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/index/parallel_build.h"

namespace icecache {
namespace {

bool OpenAndNew(uint64_t state, uint64_t seen_generation) {
  return (state & 1) != 0 && (state >> 1) != seen_generation;
}

// Monotonic nanoseconds: a wall-clock step back would stretch a watch.
int64_t SteadyNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

DecodeLanes::DecodeLanes(int helpers, absl::Duration spin) : spin_(spin) {
  ExtendWatch();  // the helpers watch for `spin` after they start
  threads_.reserve(static_cast<size_t>(std::max(helpers, 0)));
  for (int i = 0; i < helpers; ++i) threads_.emplace_back([this] { Helper(); });
}

DecodeLanes::~DecodeLanes() {
  stop_.store(true);
  {
    absl::MutexLock l(&wake_mu_);
    wake_.SignalAll();
  }
  for (std::thread& t : threads_) t.join();
}

void DecodeLanes::Drain(Job& job, bool helper) {
  const int64_t ran = job.queue.Drain([&job](int64_t i) {
    try {
      return (*job.fn)(i);
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError("out of memory while running parallel tasks");
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("parallel task failed: ", e.what()));
    }
  });
  if (helper) helper_tasks_.fetch_add(ran, std::memory_order_relaxed);
}

void DecodeLanes::Helper() {
  // Generation 0 is no job: a helper that starts after the first job
  // opened still joins it.
  uint64_t seen = 0;
  while (!stop_.load(std::memory_order_relaxed)) {
    const uint64_t s = state_.load();
    if (OpenAndNew(s, seen)) {
      seen = s >> 1;
      // Joined only while the job is still the open one: the caller closes
      // it before it waits for active_ to fall to 0 (both sequentially
      // consistent), so a helper either runs inside that wait or leaves the
      // job alone.
      active_.fetch_add(1);
      if (state_.load() == s) Drain(job_, /*helper=*/true);
      active_.fetch_sub(1);
      ExtendWatch();
      continue;
    }
    // Read before the watch's end: a KeepWatching after this either moved
    // the end (seen below) or changed the count (seen under the mutex).
    const uint64_t touched = touches_.load();
    if (SteadyNanos() < watch_until_ns_.load()) {
      // Another runnable thread on this CPU (the client, a selection) goes
      // first; on an idle CPU this returns at once.
      ::sched_yield();
      continue;
    }
    // Asleep until a job opens or a decode call comes: counted first, so a
    // Run() or KeepWatching() after this sees the count and signals (and
    // one before is seen by the check under the mutex).
    sleepers_.fetch_add(1);
    {
      absl::MutexLock l(&wake_mu_);
      while (!stop_.load() && !OpenAndNew(state_.load(), seen) && touches_.load() == touched) {
        wake_.Wait(&wake_mu_);
      }
    }
    sleepers_.fetch_sub(1);
  }
}

void DecodeLanes::ExtendWatch() {
  watch_until_ns_.store(SteadyNanos() + absl::ToInt64Nanoseconds(spin_));
}

void DecodeLanes::KeepWatching() {
  if (threads_.empty()) return;
  ExtendWatch();
  touches_.fetch_add(1);
  if (sleepers_.load() > 0) {
    absl::MutexLock l(&wake_mu_);
    wake_.SignalAll();
  }
}

absl::Status DecodeLanes::Run(int64_t count, const std::function<absl::Status(int64_t)>& fn) {
  // Bad arguments, one task, and a job in flight: oneTBB's path (the same
  // contract and errors).
  if (count <= 1 || !fn || threads_.empty()) return ParallelForInOrder(count, 1, fn);
  if (!run_mu_.TryLock()) {
    fallbacks_.fetch_add(1, std::memory_order_relaxed);
    return ParallelForInOrder(count, 0, fn);
  }
  // Only this job's helpers add to the count until it returns (one job at
  // a time, and every helper's Drain has returned once active_ is 0).
  const int64_t helped_before = helper_tasks_.load(std::memory_order_relaxed);
  job_.fn = &fn;
  job_.queue.Reset(count);
  const uint64_t open = (((state_.load() >> 1) + 1) << 1) | 1;
  state_.store(open);
  if (sleepers_.load() > 0) {
    absl::MutexLock l(&wake_mu_);
    wake_.SignalAll();
  }
  Drain(job_, /*helper=*/false);
  state_.store(open & ~uint64_t{1});
  // The helpers' last tasks: yield to them if they share this CPU.
  while (active_.load() != 0) ::sched_yield();
  jobs_.fetch_add(1, std::memory_order_relaxed);
  if (helper_tasks_.load(std::memory_order_relaxed) == helped_before) {
    jobs_alone_.fetch_add(1, std::memory_order_relaxed);
  }
  absl::Status out = job_.queue.Result();
  job_.fn = nullptr;
  run_mu_.Unlock();
  return out;
}

}  // namespace icecache
