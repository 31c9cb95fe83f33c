// `icecache-bench select --matrix`: the robustness matrix. Runs mdci (at the
// default width and self-calibrated to --mdci-target-mass, default 0.95, at
// page and at token granularity), the exact scans (exact/token is the
// exact-token oracle), Quest and StreamingLLM on every synthetic family
// (common/synthetic.h SyntheticFamilyNames()) at the same shape and budget,
// and reports per family, in one table and as JSON:
//  - mdci's mass against the page oracle on its own layout (OraclePages: the
//    best whole pages by their true mass for the group) and against the
//    exact-token oracle, and its speed against the SIMD exact scan (p50);
//  - the same for self-calibrated mdci (speed from its mean time, the sampled
//    steps' exact reference included), the width it settled on, the steps
//    it took to converge and the calibration's overhead;
//  - token granularity: mdci and calibrated mdci against the token oracle;
//  - the page fill of mdci's layout;
//  - exact-mdci against exact on positional pages, and the page oracles of
//    both layouts: does the semantic layout pay? A family where exact-mdci
//    does not beat exact by at least 2% of mass is flagged.
// Then the mass per policy (every method's mass per family), and with
// --widths the frontier: mdci's mass ratio against time at each width, as a
// table and, with --plot, an SVG (hand-written; no dependency); and the same
// widths at token granularity beside page granularity, both against the
// exact-token oracle (the granularity frontier).
#ifndef ICECACHE_TESTS_BENCH_SELECT_MATRIX_H_
#define ICECACHE_TESTS_BENCH_SELECT_MATRIX_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/index/selector.h"

namespace icecache::bench {

// A point of the frontier: "FOVxCF" (field of view x candidate factor), or
// "exhaustive" (every page scored exactly).
struct WidthSpec {
  std::string label;
  int field_of_view = 0;
  float candidate_factor = 0;
  bool exhaustive = false;
  float pq_factor = 0;  // "pqF": the product-quantised scan (MdciParams::pq_factor)
};

// InvalidArgument naming the bad entry (for --widths).
absl::StatusOr<WidthSpec> ParseWidth(const std::string& text);

// One family's line of the frontier, for the plot.
struct FrontierSeries {
  std::string family;
  std::vector<std::string> labels;
  std::vector<double> time_us;     // p50 per select call
  std::vector<double> mass_ratio;  // mdci mass / page oracle mass
  double exact_us = 0;             // the SIMD exact scan's p50 (a reference line)
};

// The SVG: mass ratio (y) against time on a log axis (x), one line per
// family, the exact scan's time as a dashed line per family.
std::string FrontierSvg(const std::vector<FrontierSeries>& series, int budget, int page_tokens);
// The same plot with any title and y label: one line per series (its
// `family` names it in the legend), points at (time_us, mass_ratio).
std::string PlotSvg(const std::vector<FrontierSeries>& series, const std::string& title,
                    const std::string& y_label);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_SELECT_MATRIX_H_
