// `icecache-bench select --baselines`: the comparison table of the paper's
// baselines (docs/architecture.md §3.9) against mdci (ICE) on the synthetic
// families. Every method of `selectors` (default: BaselineTableMethods())
// at budgets 256, 1024 and 25% of the context, on every family of
// `families`, through MeasureRuns (the protocol of select_bench.h): mass
// recall, mass against the exact-token oracle, output relative error,
// p50 select time, build (prefill) seconds per tree, index bytes per token,
// keys touched. Then the mean over the families per method and budget, the
// method with the best mass per family and budget among the non-exhaustive
// ones, a JSON report (--json) and an SVG (--plot, BaselinesBarSvg): per
// method a bar per budget, mean mass / exact-token mass and mean output
// error. With --layer-reuse > 1 every figure is measured across the
// group's layers (OmniKV and ICE(r): the first layer's selection reused).
#ifndef ICECACHE_TESTS_BENCH_SELECT_BASELINES_TABLE_H_
#define ICECACHE_TESTS_BENCH_SELECT_BASELINES_TABLE_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tests/bench/select_bench.h"

namespace icecache::bench {

// One method's bars of the --plot figure (select_baselines_svg.cc): per
// budget label, the mean mass / exact-token oracle and the mean output
// relative error over the families (NaN: not run).
struct BaselineBar {
  std::string method;
  std::vector<std::string> budgets;
  std::vector<double> mass_ratio;
  std::vector<double> error;
};
// The SVG: one group of bars per method, a bar per budget; mass ratio on
// top, output error below.
std::string BaselinesBarSvg(const std::vector<BaselineBar>& bars,
                            const std::vector<std::string>& budgets, const std::string& title);

// The methods the table runs by default.
const std::vector<std::string>& BaselineTableMethods();

// Errors of MeasureRuns (naming the family and budget), PermissionDenied
// when --json or --plot cannot be written.
absl::Status RunBaselinesTable(const SelectBenchOptions& options);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_SELECT_BASELINES_TABLE_H_
