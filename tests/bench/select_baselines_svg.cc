// The figure of `icecache-bench select --baselines --plot` (hand-written SVG,
// no plotting dependency, like frontier_svg.cc): in the spirit of the ICE
// paper's comparison figure, one group of bars per method, one bar per
// budget; the top panel the mean attention-mass recall against the
// exact-token oracle, the bottom panel the mean output relative error; full
// KV is the line at 1 (top) and 0 (bottom).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "tests/bench/select_baselines_table.h"

namespace icecache::bench {
namespace {

constexpr int kLeft = 70, kRight = 20, kTop = 50, kPanel = 230, kGap = 70, kBottom = 120;
constexpr const char* kBudgetColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"};

struct Panel {
  int y0;       // top of the plot area
  double vmax;  // value at the top of the axis
  std::string label;
};

std::string Axis(const Panel& p, int width) {
  std::string out;
  for (int t = 0; t <= 4; ++t) {
    const double v = p.vmax * t / 4;
    const int y = p.y0 + kPanel - static_cast<int>(kPanel * t / 4.0);
    absl::StrAppendFormat(&out,
                          "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='#ddd'/>\n"
                          "<text x='%d' y='%d' font-size='11' text-anchor='end'>%.2f</text>\n",
                          kLeft, y, width - kRight, y, kLeft - 6, y + 4, v);
  }
  absl::StrAppendFormat(&out,
                        "<text x='16' y='%d' font-size='13' transform='rotate(-90 16 %d)' "
                        "text-anchor='middle'>%s</text>\n",
                        p.y0 + kPanel / 2, p.y0 + kPanel / 2, p.label);
  return out;
}

std::string Bars(const Panel& p, const std::vector<BaselineBar>& bars, size_t num_budgets,
                 double group_w, bool error_panel) {
  std::string out;
  const double bar_w = group_w * 0.8 / static_cast<double>(std::max<size_t>(1, num_budgets));
  for (size_t i = 0; i < bars.size(); ++i) {
    const std::vector<double>& values = error_panel ? bars[i].error : bars[i].mass_ratio;
    for (size_t b = 0; b < values.size() && b < num_budgets; ++b) {
      if (!std::isfinite(values[b])) continue;
      const double v = std::clamp(values[b], 0.0, p.vmax);
      const int h = static_cast<int>(kPanel * v / p.vmax);
      const double x = kLeft + group_w * static_cast<double>(i) + group_w * 0.1 + bar_w * b;
      absl::StrAppendFormat(&out,
                            "<rect x='%.1f' y='%d' width='%.1f' height='%d' fill='%s'><title>%s "
                            "%s: %.3f</title></rect>\n",
                            x, p.y0 + kPanel - h, bar_w, h, kBudgetColors[b % 5], bars[i].method,
                            b < bars[i].budgets.size() ? bars[i].budgets[b] : "", values[b]);
    }
  }
  return out;
}

}  // namespace

std::string BaselinesBarSvg(const std::vector<BaselineBar>& bars,
                            const std::vector<std::string>& budgets, const std::string& title) {
  const int group_px = 56;
  const int width = kLeft + kRight + group_px * static_cast<int>(std::max<size_t>(1, bars.size()));
  const int height = kTop + 2 * kPanel + kGap + kBottom;
  double max_err = 0.0;
  for (const BaselineBar& b : bars) {
    for (double e : b.error) {
      if (std::isfinite(e)) max_err = std::max(max_err, e);
    }
  }
  const Panel mass{kTop, 1.05, "mass / exact-token oracle"};
  const Panel err{kTop + kPanel + kGap, std::max(0.25, std::ceil(max_err * 4) / 4),
                  "output relative error"};
  std::string out = absl::StrFormat(
      "<svg xmlns='http://www.w3.org/2000/svg' width='%d' height='%d' "
      "font-family='sans-serif'>\n<rect width='100%%' height='100%%' fill='white'/>\n",
      width, height);
  absl::StrAppendFormat(&out, "<text x='%d' y='22' font-size='15'>%s</text>\n", kLeft, title);
  out += Axis(mass, width) + Axis(err, width);
  // Full KV: mass ratio 1 / exact-token is above 1; its error 0 is the axis.
  const int full_y = mass.y0 + kPanel - static_cast<int>(kPanel / mass.vmax);
  absl::StrAppendFormat(&out,
                        "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='black' "
                        "stroke-dasharray='5,4'/>\n<text x='%d' y='%d' font-size='11' "
                        "text-anchor='end'>exact-token oracle = 1</text>\n",
                        kLeft, full_y, width - kRight, full_y, width - kRight, full_y - 4);
  out += Bars(mass, bars, budgets.size(), group_px, false);
  out += Bars(err, bars, budgets.size(), group_px, true);
  for (size_t i = 0; i < bars.size(); ++i) {
    const int x = kLeft + group_px * static_cast<int>(i) + group_px / 2;
    const int y = err.y0 + kPanel + 10;
    absl::StrAppendFormat(&out,
                          "<text x='%d' y='%d' font-size='11' text-anchor='end' "
                          "transform='rotate(-50 %d %d)'>%s</text>\n",
                          x, y, x, y, bars[i].method);
  }
  for (size_t b = 0; b < budgets.size(); ++b) {
    absl::StrAppendFormat(&out,
                          "<rect x='%d' y='32' width='12' height='12' fill='%s'/>"
                          "<text x='%d' y='43' font-size='12'>budget %s</text>\n",
                          kLeft + 120 * static_cast<int>(b), kBudgetColors[b % 5],
                          kLeft + 120 * static_cast<int>(b) + 16, budgets[b]);
  }
  out += "</svg>\n";
  return out;
}

}  // namespace icecache::bench
