#include "server/rpc/quality_options.h"

#include <cstdint>

#include "absl/time/time.h"
#include "server/rpc/config.h"

namespace icecache::rpc {

SessionQualityOptions QualityOptionsFromConfig(const v1::QualityConfig& q) {
  SessionQualityOptions o;
  o.enabled = q.enabled();
  o.sample_every = static_cast<int>(q.sample_every());
  o.max_sample_every = static_cast<int>(q.max_sample_every());
  o.exact_cost_ratio = q.exact_cost_ratio();
  o.ranking_duel_samples = static_cast<int>(q.ranking_duel_samples());
  o.method_duel = q.method_duel();
  o.carry_steps = static_cast<int>(q.carry_steps());
  o.pool_widths = q.pool_widths();
  o.warmup_samples = static_cast<int>(q.warmup_samples());
  o.warmup_every = static_cast<int>(q.warmup_every());
  o.remember_widths = q.remember_widths();
  o.seeded_warmup_samples = static_cast<int>(q.seeded_warmup_samples());
  o.sampler.cpu_share = q.cpu_share();
  o.sampler.queue_capacity = static_cast<int>(q.queue_capacity());
  o.sampler.burst = absl::Milliseconds(static_cast<int64_t>(q.burst_ms()));
  o.fair_burst = q.fair_burst();
  return o;
}

SessionQualityOptions DaemonDefaultQualityOptions() {
  v1::IcecachedConfig c;
  ApplyDefaults(&c);
  return QualityOptionsFromConfig(c.quality());
}

}  // namespace icecache::rpc
