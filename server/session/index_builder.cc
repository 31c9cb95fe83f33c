#include "server/session/index_builder.h"

#include <utility>

namespace icecache {

IndexBuilder::IndexBuilder() : thread_([this] { Loop(); }) {}

IndexBuilder::~IndexBuilder() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  thread_.join();
}

void IndexBuilder::Post(std::function<void()> job) {
  absl::MutexLock l(&mu_);
  queue_.push_back(std::move(job));
}

int IndexBuilder::pending() const {
  absl::MutexLock l(&mu_);
  return static_cast<int>(queue_.size()) + running_;
}

bool IndexBuilder::HasWork(IndexBuilder* b) {
  // Called by Await with mu_ held.
  return b->stop_ || !b->queue_.empty();
}

void IndexBuilder::Loop() {
  while (true) {
    std::function<void()> job;
    {
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(&IndexBuilder::HasWork, this));
      if (stop_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
      running_ = 1;
    }
    job();
    absl::MutexLock l(&mu_);
    running_ = 0;
  }
}

}  // namespace icecache
