// SessionManager's side of the online quality monitor (session_quality.h):
// probes go to the sampler, and run there only while their session is
// still held by the manager.
#include <utility>

#include "server/session/session.h"
#include "server/session/session_manager.h"

namespace icecache {

void SessionManager::OfferProbes(const std::shared_ptr<Session>& s,
                                 std::vector<QualityProbe> probes) {
  if (sampler_ == nullptr) return;
  for (QualityProbe& probe : probes) {
    HeadQualityMonitor& head = *s->quality[s->SelectorIndex(probe.group, probe.head)];
    const bool burst = probe.burst;
    std::weak_ptr<Session> weak = s;
    auto job = [this, weak = std::move(weak), probe = std::move(probe)] {
      return RunProbe(weak, probe);
    };
    if (sampler_->Offer(std::move(job), s->quality_account, burst) == OfferResult::kQueued) {
      head.Taken();
    } else {
      s->samples_dropped.fetch_add(1, std::memory_order_relaxed);
    }
  }
}

SampleOutcome SessionManager::RunProbe(const std::weak_ptr<Session>& weak,
                                       const QualityProbe& probe) {
  std::shared_ptr<Session> s = weak.lock();
  if (s == nullptr) return SampleOutcome::kStale;
  {
    // Marked in flight under mu_, as requests are: eviction and expiry skip
    // it while its keys are read, so its frames never outlive its removal.
    absl::ReaderMutexLock l(&mu_);
    auto it = sessions_.find(s->id);
    if (it == sessions_.end() || it->second != s) return SampleOutcome::kStale;
    s->in_flight.fetch_add(1);
  }
  const int64_t t0 = ThreadCpuNanos();
  QualitySample sample;
  const SampleOutcome outcome = MeasureProbe(*s, probe, &sample);
  s->calibration_cpu_ns.fetch_add(ThreadCpuNanos() - t0, std::memory_order_relaxed);
  s->probes_run.fetch_add(1, std::memory_order_relaxed);
  s->in_flight.fetch_sub(1);
  if (outcome != SampleOutcome::kMeasured) {
    s->samples_stale.fetch_add(1, std::memory_order_relaxed);
  } else if (options_.on_quality_sample) {
    options_.on_quality_sample(s->config.selector, sample);
  }
  return outcome;
}

QualitySamplerStats SessionManager::QualityStats() const {
  return sampler_ != nullptr ? sampler_->stats() : QualitySamplerStats{};
}

void SessionManager::WaitForQualitySamples() {
  if (sampler_ != nullptr) sampler_->WaitIdle();
}

}  // namespace icecache
