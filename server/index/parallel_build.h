// Parallel bulk build of many selectors (every (layer group, KV head) of a
// session, or of a benchmark) on oneTBB with a configurable thread count.
// TBB stays inside parallel_build.cc; this header includes none of it.
//
// Thread safety: each call is independent. The jobs of one call must not
// share a selector (each Build() needs exclusive access to its selector);
// anything else they touch (frames via on_built) must be distinct per job or
// synchronised by the caller.
#ifndef ICECACHE_SERVER_INDEX_PARALLEL_BUILD_H_
#define ICECACHE_SERVER_INDEX_PARALLEL_BUILD_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "server/index/selector.h"

namespace icecache {

// Runs fn(i) for every i in [0, count). threads == 1 runs serially, in order,
// on the calling thread; threads > 1 uses a task arena of that many threads;
// threads == 0 lets oneTBB choose (all cores). Returns OK, or the error of the
// LOWEST index that failed (deterministic whatever the scheduling), with
// "task <i>: " prefixed to its message; once a task fails, tasks with a higher
// index that have not started are skipped. InvalidArgument for count < 0,
// threads < 0 or an empty fn; Internal (or ResourceExhausted for bad_alloc) if
// the runtime throws.
absl::Status ParallelFor(int64_t count, int threads,
                         const std::function<absl::Status(int64_t)>& fn);

// ParallelFor whose indices START in increasing order: each of up to
// `threads` lanes (0: the current arena's, all cores by default) takes the
// lowest index no lane has taken yet whenever it is free, so with the longest
// tasks first no long one is left to start last (greedy longest-first,
// within 4/3 of the best split; a decode step's KV heads, ordered by their
// last select's time). Same errors as ParallelFor: the lowest failing
// index's, prefixed "task <i>: ", and indices not yet taken are skipped once
// one failed. With one lane (threads == 1, or count == 1) everything runs in
// order on the caller.
absl::Status ParallelForInOrder(int64_t count, int threads,
                                const std::function<absl::Status(int64_t)>& fn);

// The shared queue of ParallelForInOrder's lanes (and of DecodeLanes',
// decode_lanes.h): every lane calls Drain() until it returns; the indices
// start in increasing order, whichever lane is free taking the lowest not
// yet taken, and once one fails the indices past the lowest failure are
// skipped. Reset() between runs, while no lane drains.
class InOrderQueue {
 public:
  void Reset(int64_t count) {
    count_ = count;
    next_.store(0);
    first_failed_.store(kNone);
    results_.assign(static_cast<size_t>(count), absl::OkStatus());
  }

  // Takes indices until none is left: run(i) returns task i's status.
  // Returns how many tasks this lane ran.
  template <typename Run>
  int64_t Drain(Run&& run) {
    int64_t ran = 0;
    for (int64_t i = next_.fetch_add(1); i < count_; i = next_.fetch_add(1)) {
      if (first_failed_.load(std::memory_order_relaxed) < i) break;
      absl::Status s = run(i);
      ++ran;
      if (s.ok()) continue;
      results_[static_cast<size_t>(i)] = std::move(s);
      int64_t seen = first_failed_.load(std::memory_order_relaxed);
      while (i < seen && !first_failed_.compare_exchange_weak(seen, i)) {
      }
    }
    return ran;
  }

  // Once every lane has returned: OK, or the lowest failing index's error,
  // prefixed "task <i>: ".
  absl::Status Result() const;

 private:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  int64_t count_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> first_failed_{kNone};
  std::vector<absl::Status> results_;
};

// One Build() to run.
struct BuildJob {
  Selector* selector = nullptr;  // not owned; distinct per job
  const float* keys = nullptr;   // n x head_dim fp32, not owned
  int64_t n = 0;
  std::vector<Placement>* placements = nullptr;  // out; not owned
  // Optional: runs on the same thread right after a successful Build(), with
  // its placements (e.g. to write the keys and values into the frames).
  std::function<absl::Status(const std::vector<Placement>&)> on_built;
};

// Builds every job with ParallelFor semantics (error of the lowest failing
// job, prefixed "task <i>: "). Checks all jobs before building any:
// InvalidArgument for a null selector/keys/placements or a selector used by
// two jobs. Jobs that failed or were skipped leave their selector as Build()
// leaves it on error (unchanged); jobs that succeeded stay built.
absl::Status ParallelBuild(absl::Span<const BuildJob> jobs, int threads);

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_PARALLEL_BUILD_H_
