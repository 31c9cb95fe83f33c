#include "server/session/quality_sampler.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"

namespace icecache {

absl::StatusOr<std::unique_ptr<QualitySampler>> QualitySampler::Create(
    const QualitySamplerOptions& o) {
  if (o.queue_capacity < 1 || o.queue_capacity > 65536) {
    return absl::InvalidArgumentError(
        absl::StrCat("quality sampler: queue_capacity must be 1..65536, got ", o.queue_capacity));
  }
  if (!(o.cpu_share > 0.0 && o.cpu_share <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("quality sampler: cpu_share must be in (0, 1], got ", o.cpu_share));
  }
  if (o.burst < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("quality sampler: burst must be >= 0, got ", absl::FormatDuration(o.burst)));
  }
  std::unique_ptr<QualitySampler> s(new QualitySampler(o));
  s->worker_ = std::thread([raw = s.get()] { raw->WorkerLoop(); });
  return s;
}

QualitySampler::~QualitySampler() {
  std::deque<Job> left;
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
    left.swap(queue_);
  }
  left.clear();  // what queued jobs hold goes now, not after the running job
  if (worker_.joinable()) worker_.join();
}

bool QualitySampler::OverBudget() const {
  const double allowed = options_.cpu_share * static_cast<double>(selection_ns_.load()) +
                         static_cast<double>(absl::ToInt64Nanoseconds(options_.burst));
  return static_cast<double>(cpu_ns_.load()) >= allowed;
}

bool QualitySampler::Admits() {
  if (OverBudget()) {
    refused_budget_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  return depth_.load(std::memory_order_relaxed) < options_.queue_capacity;
}

OfferResult QualitySampler::Offer(Job job) {
  const bool over = OverBudget();
  absl::MutexLock l(&mu_);
  ++offered_;
  if (over) {
    ++dropped_budget_;
    return OfferResult::kOverBudget;
  }
  if (static_cast<int>(queue_.size()) >= options_.queue_capacity) {
    ++dropped_full_;
    return OfferResult::kQueueFull;
  }
  queue_.push_back(std::move(job));
  depth_.store(static_cast<int>(queue_.size()), std::memory_order_relaxed);
  ++queued_;
  return OfferResult::kQueued;
}

void QualitySampler::WorkerLoop() {
  if (options_.low_priority) {
    // Per-thread on Linux: nice 19 for this thread only.
    setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 19);
  }
  while (true) {
    Job job;
    {
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(this, &QualitySampler::HasWork));
      if (stop_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
      depth_.store(static_cast<int>(queue_.size()), std::memory_order_relaxed);
      running_ = true;
    }
    const int64_t t0 = ThreadCpuNanos();
    const SampleOutcome outcome = job();
    job = nullptr;  // what it holds (a session) is released before the next wait
    cpu_ns_.fetch_add(ThreadCpuNanos() - t0, std::memory_order_relaxed);
    absl::MutexLock l(&mu_);
    running_ = false;
    if (outcome == SampleOutcome::kMeasured) {
      ++measured_;
    } else {
      ++stale_;
    }
  }
}

void QualitySampler::WaitIdle() {
  absl::MutexLock l(&mu_);
  mu_.Await(absl::Condition(this, &QualitySampler::Idle));
}

QualitySamplerStats QualitySampler::stats() const {
  QualitySamplerStats st;
  st.cpu_ns = cpu_ns_.load();
  st.selection_ns = selection_ns_.load();
  absl::MutexLock l(&mu_);
  st.offered = offered_;
  st.queued = queued_;
  st.dropped_queue_full = dropped_full_;
  st.dropped_over_budget = dropped_budget_ + refused_budget_.load();
  st.measured = measured_;
  st.stale = stale_;
  st.queue_depth = static_cast<int>(queue_.size());
  return st;
}

}  // namespace icecache
