#include "server/rpc/quality_metrics.h"

#include <string>

namespace icecache::rpc {

const std::vector<double>& RatioBuckets() {
  static const std::vector<double> kBuckets = {0.5,  0.6,  0.7,   0.8,  0.85, 0.9,
                                               0.93, 0.95, 0.965, 0.98, 0.99, 1.0};
  return kBuckets;
}

QualityMetrics::QualityMetrics(Registry* r)
    : mass_ratio_(r->AddHistogram(
          "icecache_selection_mass_ratio",
          "Sampled selections: attention mass captured / the exact reference's (exact pages on the "
          "same layout, or exact tokens, by granularity)",
          {"selector", "granularity"}, RatioBuckets())),
      topk_recall_(r->AddHistogram(
          "icecache_selection_topk_recall",
          "Sampled selections: share of the exact reference's tokens that were selected",
          {"selector", "granularity"}, RatioBuckets())),
      samples_(r->AddSnapshot("icecache_quality_samples_total",
                              "Selections chosen for measurement, by outcome", MetricType::kCounter,
                              {"outcome"})),
      cpu_seconds_(r->AddSnapshot("icecache_quality_cpu_seconds_total",
                                  "CPU time of the quality measurements (exact reference scans)",
                                  MetricType::kCounter, {})),
      selection_seconds_(r->AddSnapshot(
          "icecache_quality_selection_seconds_total",
          "Selection time (per KV head, summed) that the measurement budget is a share of",
          MetricType::kCounter, {})),
      queue_depth_(r->AddSnapshot("icecache_quality_queue_depth",
                                  "Selections waiting to be measured", MetricType::kGauge, {})),
      defers_(r->AddSnapshot("icecache_quality_defers_total",
                             "Times the measurements waited for a decode call in flight, by how "
                             "the wait ended (calls_ended, or timed_out: calls went on past the "
                             "wait's limit, 2 ms)",
                             MetricType::kCounter, {"outcome"})) {}

void QualityMetrics::Observe(SelectorKind selector, const QualitySample& sample) {
  const std::string name(SelectorKindName(selector));
  const std::string unit(GranularityName(sample.granularity));
  mass_ratio_->WithLabels({name, unit})->Observe(sample.mass_ratio);
  topk_recall_->WithLabels({name, unit})->Observe(sample.topk_recall);
}

void QualityMetrics::Collect(const QualitySamplerStats& st) {
  samples_->Replace({{{"measured"}, double(st.measured)},
                     {{"stale"}, double(st.stale)},
                     {{"dropped_queue_full"}, double(st.dropped_queue_full)},
                     {{"dropped_over_budget"}, double(st.dropped_over_budget)}});
  cpu_seconds_->Replace({{{}, double(st.cpu_ns) / 1e9}});
  selection_seconds_->Replace({{{}, double(st.selection_ns) / 1e9}});
  queue_depth_->Replace({{{}, double(st.queue_depth)}});
  defers_->Replace({{{"calls_ended"}, double(st.deferred - st.defer_timeouts)},
                    {{"timed_out"}, double(st.defer_timeouts)}});
}

}  // namespace icecache::rpc
