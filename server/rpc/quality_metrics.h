// /metrics families of the online quality monitor (docs/operations.md
// "Selection quality"): per-selector and granularity histograms of the
// sampled mass ratio and top-k recall, fed on the sampler's thread, and the sampler's counters
// (samples by outcome, measurement CPU, the selection time its budget is a
// share of, queue depth), replaced at scrape time.
//
// Thread safety: Observe and Collect may run concurrently (metrics.h).
#ifndef ICECACHE_SERVER_RPC_QUALITY_METRICS_H_
#define ICECACHE_SERVER_RPC_QUALITY_METRICS_H_

#include <vector>

#include "server/index/selector.h"
#include "server/index/width_calibrator.h"
#include "server/rpc/metrics.h"
#include "server/session/quality_sampler.h"

namespace icecache::rpc {

// Bucket bounds of the ratio histograms: fine near the usual 0.95 target.
const std::vector<double>& RatioBuckets();

class QualityMetrics {
 public:
  explicit QualityMetrics(Registry* registry);
  // One measured selection of a session with this selector.
  void Observe(SelectorKind selector, const QualitySample& sample);
  // The sampler's counters, at scrape time.
  void Collect(const QualitySamplerStats& stats);

 private:
  Family<Histogram>* mass_ratio_;
  Family<Histogram>* topk_recall_;
  SnapshotFamily* samples_;
  SnapshotFamily* cpu_seconds_;
  SnapshotFamily* selection_seconds_;
  SnapshotFamily* queue_depth_;
  SnapshotFamily* defers_;
};

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_QUALITY_METRICS_H_
