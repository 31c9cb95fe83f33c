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
  if (o.defer_max < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("quality sampler: defer_max must be >= 0, got ",
                                                   absl::FormatDuration(o.defer_max)));
  }
  std::unique_ptr<QualitySampler> s(new QualitySampler(o));
  s->worker_ = std::thread([raw = s.get()] { raw->WorkerLoop(); });
  return s;
}

QualitySampler::~QualitySampler() {
  std::deque<Entry> left;
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
    left.swap(queue_);
  }
  left.clear();  // what queued jobs hold goes now, not after the running job
  if (worker_.joinable()) worker_.join();
}

std::shared_ptr<QualityAccount> QualitySampler::NewAccount(int64_t selection_ns,
                                                           int64_t cpu_ns) const {
  auto a = std::make_shared<QualityAccount>();
  a->selection_ns.store(selection_ns);
  a->cpu_ns.store(cpu_ns);
  return a;
}

bool QualitySampler::OverBudget(const QualityAccount& account, bool burst) const {
  const double allowed =
      options_.cpu_share * static_cast<double>(account.selection_ns.load()) +
      (burst ? static_cast<double>(absl::ToInt64Nanoseconds(options_.burst)) : 0.0);
  return static_cast<double>(account.cpu_ns.load()) >= allowed;
}

bool QualitySampler::Admits(const QualityAccount& account, bool burst) {
  if (OverBudget(account, burst)) {
    refused_budget_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  return HasRoom(account, depth_.load(std::memory_order_relaxed));
}

bool QualitySampler::HasRoom(const QualityAccount& account, int depth) const {
  const int limit = account_queue_limit();
  return depth < options_.queue_capacity &&
         (account.queued.load(std::memory_order_relaxed) < limit ||
          depth < options_.queue_capacity - limit);
}

OfferResult QualitySampler::Offer(Job job, std::shared_ptr<QualityAccount> account, bool burst) {
  const bool over = OverBudget(*account, burst);
  absl::MutexLock l(&mu_);
  ++offered_;
  if (over) {
    ++dropped_budget_;
    return OfferResult::kOverBudget;
  }
  if (!HasRoom(*account, static_cast<int>(queue_.size()))) {
    ++dropped_full_;
    return OfferResult::kQueueFull;
  }
  account->queued.fetch_add(1, std::memory_order_relaxed);
  queue_.push_back(Entry{std::move(job), std::move(account)});
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
    Entry e;
    {
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(this, &QualitySampler::HasWork));
      if (stop_) return;
      e = std::move(queue_.front());
      queue_.pop_front();
      e.account->queued.fetch_sub(1, std::memory_order_relaxed);
      depth_.store(static_cast<int>(queue_.size()), std::memory_order_relaxed);
      running_ = true;
    }
    Defer();  // the job starts in a gap between decode calls
    const int64_t t0 = ThreadCpuNanos();
    const SampleOutcome outcome = e.job();
    e.job = nullptr;  // what it holds (a session) is released before the next wait
    const int64_t spent = ThreadCpuNanos() - t0;
    cpu_ns_.fetch_add(spent, std::memory_order_relaxed);
    e.account->cpu_ns.fetch_add(spent, std::memory_order_relaxed);
    e.account = nullptr;
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
  if (options_.defer_to != nullptr) {
    st.deferred = options_.defer_to->waits();
    st.defer_timeouts = options_.defer_to->timeouts();
  }
  st.dropped_over_budget = dropped_budget_ + refused_budget_.load();
  st.measured = measured_;
  st.stale = stale_;
  st.queue_depth = static_cast<int>(queue_.size());
  return st;
}

}  // namespace icecache
