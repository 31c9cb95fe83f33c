#include "server/index/parallel_build.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <limits>
#include <new>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "tbb/blocked_range.h"
#include "tbb/parallel_for.h"
#include "tbb/task_arena.h"

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ICECACHE_TSAN_FORK_JOIN 1
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif
#endif

namespace icecache {
namespace {

// TSan builds only (deploy/dev.sh sanitize tsan): Debian's oneTBB is not
// instrumented, so TSan cannot see that tbb::parallel_for orders what the
// caller wrote before it before every task, and every task before the
// caller's return. These two edges are exactly that guarantee, made visible;
// without them a task's read of its inputs is a (suppressed) race report,
// millions per tree build, and the report path is what the run spends its
// time in. No-ops in every other build.
void ForkJoinRelease(void* edge) {
#ifdef ICECACHE_TSAN_FORK_JOIN
  __tsan_release(edge);
#else
  (void)edge;
#endif
}

void ForkJoinAcquire(void* edge) {
#ifdef ICECACHE_TSAN_FORK_JOIN
  __tsan_acquire(edge);
#else
  (void)edge;
#endif
}

absl::Status CheckArguments(int64_t count, int threads,
                            const std::function<absl::Status(int64_t)>& fn) {
  if (count < 0) return absl::InvalidArgumentError(absl::StrCat("count must be >= 0, got ", count));
  if (threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("threads must be >= 0, got ", threads));
  }
  if (!fn) return absl::InvalidArgumentError("fn must not be empty");
  return absl::OkStatus();
}

absl::Status Prefixed(int64_t i, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat("task ", i, ": ", s.message()));
}

}  // namespace

absl::Status InOrderQueue::Result() const {
  const int64_t failed = first_failed_.load();
  if (failed == kNone) return absl::OkStatus();
  return Prefixed(failed, results_[static_cast<size_t>(failed)]);
}

absl::Status ParallelFor(int64_t count, int threads,
                         const std::function<absl::Status(int64_t)>& fn) {
  RETURN_IF_ERROR(CheckArguments(count, threads, fn));
  if (count == 0) return absl::OkStatus();

  if (threads == 1) {
    for (int64_t i = 0; i < count; ++i) {
      absl::Status s = fn(i);
      if (!s.ok()) return Prefixed(i, s);
    }
    return absl::OkStatus();
  }

  // Every index below the lowest failure runs, so the lowest failing index
  // found is the lowest of all: the answer does not depend on scheduling.
  std::vector<absl::Status> results(static_cast<size_t>(count));
  std::atomic<int64_t> first_failed{std::numeric_limits<int64_t>::max()};
  int fork = 0, join = 0;  // addresses only: the TSan edges (ForkJoinRelease)
  auto body = [&](const tbb::blocked_range<int64_t>& range) {
    ForkJoinAcquire(&fork);
    for (int64_t i = range.begin(); i != range.end(); ++i) {
      if (i > first_failed.load(std::memory_order_relaxed)) continue;
      absl::Status s = fn(i);
      if (s.ok()) continue;
      results[i] = std::move(s);
      int64_t seen = first_failed.load(std::memory_order_relaxed);
      while (i < seen && !first_failed.compare_exchange_weak(seen, i)) {
      }
    }
    ForkJoinRelease(&join);
  };
  ForkJoinRelease(&fork);
  try {
    if (threads == 0) {
      tbb::parallel_for(tbb::blocked_range<int64_t>(0, count, 1), body);
    } else {
      tbb::task_arena arena(threads);
      arena.execute([&] { tbb::parallel_for(tbb::blocked_range<int64_t>(0, count, 1), body); });
    }
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory while running parallel tasks");
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("parallel task runtime failed: ", e.what()));
  }
  ForkJoinAcquire(&join);
  const int64_t failed = first_failed.load();
  if (failed == std::numeric_limits<int64_t>::max()) return absl::OkStatus();
  return Prefixed(failed, results[failed]);
}

absl::Status ParallelForInOrder(int64_t count, int threads,
                                const std::function<absl::Status(int64_t)>& fn) {
  RETURN_IF_ERROR(CheckArguments(count, threads, fn));
  if (count == 0) return absl::OkStatus();
  int lanes = threads;
  if (lanes == 0) {
    try {
      lanes = tbb::this_task_arena::max_concurrency();
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("parallel task runtime failed: ", e.what()));
    }
  }
  lanes = static_cast<int>(std::min<int64_t>(std::max(lanes, 1), count));
  InOrderQueue queue;
  queue.Reset(count);
  // Each lane drains the shared queue; a lane oneTBB starts late finds it
  // empty and returns at once.
  auto lane = [&](int64_t) {
    queue.Drain(fn);
    return absl::OkStatus();
  };
  // One lane: the caller, in order (ParallelFor with one thread runs there).
  RETURN_IF_ERROR(ParallelFor(lanes, lanes == 1 ? 1 : threads, lane));
  return queue.Result();
}

absl::Status ParallelBuild(absl::Span<const BuildJob> jobs, int threads) {
  std::unordered_set<const Selector*> seen;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const BuildJob& j = jobs[i];
    if (j.selector == nullptr || j.keys == nullptr || j.placements == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("build job ", i, " has a null selector, keys or placements"));
    }
    if (!seen.insert(j.selector).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("build job ", i, " uses a selector already used by another job"));
    }
  }
  return ParallelFor(static_cast<int64_t>(jobs.size()), threads, [&jobs](int64_t i) {
    const BuildJob& j = jobs[i];
    absl::Status s = j.selector->Build(j.keys, j.n, j.placements);
    if (s.ok() && j.on_built) s = j.on_built(*j.placements);
    return s;
  });
}

}  // namespace icecache
