// IndexBuilder: the session manager's background worker for index builds
// (docs/architecture.md §5, background builds). One thread runs the posted
// jobs in order; each job spreads its own work over oneTBB (build_threads),
// so builds of successive layer ranges never oversubscribe the cores while
// the client sends the next range.
//
// Thread safety: Post may be called from any thread. The destructor runs
// no job that has not started; it waits for the one running.
#ifndef ICECACHE_SERVER_SESSION_INDEX_BUILDER_H_
#define ICECACHE_SERVER_SESSION_INDEX_BUILDER_H_

#include <deque>
#include <functional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace icecache {

class IndexBuilder {
 public:
  IndexBuilder();
  ~IndexBuilder();
  IndexBuilder(const IndexBuilder&) = delete;
  IndexBuilder& operator=(const IndexBuilder&) = delete;

  // Queues `job` behind the ones already posted.
  void Post(std::function<void()> job) ABSL_LOCKS_EXCLUDED(mu_);
  // Jobs posted and not finished (the running one included).
  int pending() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Loop() ABSL_LOCKS_EXCLUDED(mu_);
  static bool HasWork(IndexBuilder* b) ABSL_NO_THREAD_SAFETY_ANALYSIS;

  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_INDEX_BUILDER_H_
