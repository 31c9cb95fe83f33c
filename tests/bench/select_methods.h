// The method interface of `icecache-bench select` (select_bench.h): one
// instance indexes one tree (layer group, KV head). Implemented in
// select_bench.cc (library selectors, the exact-token oracle, ANN peers) and
// select_baselines.cc (token-granular and estimator views of the baselines).
#ifndef ICECACHE_TESTS_BENCH_SELECT_METHODS_H_
#define ICECACHE_TESTS_BENCH_SELECT_METHODS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/index/selector.h"
#include "server/index/width_calibrator.h"

namespace icecache::bench {

struct SweepPoint {
  int k = 0;     // hits retrieved per query (peers)
  int knob = 0;  // efSearch / nprobe (peers)
};

// Wall time of a self-calibrated method's selections and of its sampled
// steps' exact reference (seconds), in all and once warm (after the
// calibrator's warm-up samples: the steady state); and their thread CPU
// time in all (seconds; what a loaded machine inflates least).
struct CalibrationTimes {
  double select_s = 0, sample_s = 0;
  double steady_select_s = 0, steady_sample_s = 0;
  int64_t steady_steps = 0;
  double select_cpu_s = 0, sample_cpu_s = 0;
};

class TreeMethod {
 public:
  virtual ~TreeMethod() = default;
  virtual absl::Status Build(const float* keys, int64_t n) = 0;
  virtual absl::Status Insert(const float* keys, int64_t n) = 0;
  // The timed selection for G queries; fills `sel` (pages and fills, or
  // positions for token-level results) and sel->keys_touched.
  virtual absl::Status Select(const float* queries, int nq, const SweepPoint& sp,
                              Selection* sel) = 0;
  // Untimed: the token positions `sel` stands for.
  virtual void Positions(const Selection& sel, std::vector<int32_t>* out) const = 0;
  virtual size_t index_bytes() const = 0;
  // Mean fill of the layout's pages (NaN for token-level results).
  virtual double layout_fill() const = 0;
  // The library selector behind the method (null for token-level methods).
  virtual const Selector* selector() const { return nullptr; }
  // One line about the method after its run (the calibrated width); "" = none.
  virtual std::string Summary() const { return ""; }
  // Self-calibrated methods: the calibrator's report and the times of its
  // selections and sampled references.
  virtual bool Calibration(CalibratorReport* report, CalibrationTimes* times) const {
    (void)report;
    (void)times;
    return false;
  }
  // Estimators (magicpig-est): the tree's values (fp32, by position, the
  // group's first layer), given before Build(); and the estimate of the last
  // Select()'s queries' attention outputs (G x head_dim), or null when the
  // method is not an estimator (its output error comes from its positions).
  virtual void BindValues(const float* values) { (void)values; }
  virtual const std::vector<float>* last_estimate() const { return nullptr; }
};

// `name` with a suffix: "<kind>@tok" (the token-granular answer of a
// token-level baseline, TokenRanker) or "magicpig-est" (the estimator).
bool IsBaselineView(const std::string& name);
// Creates a baseline view for `config` (its kind named by `name` without the
// suffix). InvalidArgument for an unknown name or a kind that is not token-level.
absl::StatusOr<std::unique_ptr<TreeMethod>> MakeBaselineView(const std::string& name,
                                                             SelectorConfig config,
                                                             const SelectParams& params);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_SELECT_METHODS_H_
