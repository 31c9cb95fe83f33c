// The frontier plot of `icecache-bench select --matrix --plot` as a small
// hand-written SVG: no plotting dependency.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tests/bench/select_matrix.h"

namespace icecache::bench {
namespace {

constexpr int kWidth = 960, kHeight = 560;
constexpr int kLeft = 70, kRight = 230, kTop = 40, kBottom = 60;
const char* const kColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                               "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#aec7e8"};

// Maps data to pixels: log10 time on x, mass ratio on y.
struct Axes {
  double x0, x1, y0, y1;
  double X(double us) const {
    return kLeft + (std::log10(us) - x0) / (x1 - x0) * (kWidth - kLeft - kRight);
  }
  double Y(double r) const { return kTop + (y1 - r) / (y1 - y0) * (kHeight - kTop - kBottom); }
};

Axes FitAxes(const std::vector<FrontierSeries>& series) {
  double tmin = 1e300, tmax = 0, rmin = 1.0;
  for (const FrontierSeries& s : series) {
    for (size_t i = 0; i < s.time_us.size(); ++i) {
      if (!(s.time_us[i] > 0) || !std::isfinite(s.mass_ratio[i])) continue;
      tmin = std::min(tmin, s.time_us[i]);
      tmax = std::max(tmax, s.time_us[i]);
      rmin = std::min(rmin, s.mass_ratio[i]);
    }
    if (s.exact_us > 0) tmax = std::max(tmax, s.exact_us);
  }
  if (tmax <= 0) tmin = 1, tmax = 10;
  Axes a;
  a.x0 = std::floor(std::log10(tmin));
  a.x1 = std::ceil(std::log10(tmax));
  if (a.x1 <= a.x0) a.x1 = a.x0 + 1;
  a.y0 = std::min(0.5, std::floor(rmin * 10) / 10);
  a.y1 = 1.0;
  return a;
}

std::string Grid(const Axes& a) {
  std::string out;
  const double right = kWidth - kRight, bottom = kHeight - kBottom;
  for (double r = a.y0; r <= a.y1 + 1e-9; r += 0.1) {
    absl::StrAppendFormat(&out,
                          "<line x1='%d' y1='%.1f' x2='%.1f' y2='%.1f' stroke='#ddd'/>"
                          "<text x='%d' y='%.1f' font-size='12' text-anchor='end'>%.1f</text>\n",
                          kLeft, a.Y(r), right, a.Y(r), kLeft - 6, a.Y(r) + 4, r);
  }
  for (double e = a.x0; e <= a.x1 + 1e-9; e += 1) {
    const double x = a.X(std::pow(10.0, e));
    absl::StrAppendFormat(
        &out,
        "<line x1='%.1f' y1='%d' x2='%.1f' y2='%.1f' stroke='#ddd'/>"
        "<text x='%.1f' y='%.1f' font-size='12' text-anchor='middle'>%g us</text>\n",
        x, kTop, x, bottom, x, bottom + 18, std::pow(10.0, e));
  }
  absl::StrAppendFormat(&out,
                        "<rect x='%d' y='%d' width='%d' height='%d' fill='none' stroke='#444'/>\n",
                        kLeft, kTop, kWidth - kLeft - kRight, kHeight - kTop - kBottom);
  return out;
}

std::string Series(const Axes& a, const FrontierSeries& s, const char* color, int index) {
  std::string out, points;
  for (size_t i = 0; i < s.time_us.size(); ++i) {
    if (!(s.time_us[i] > 0) || !std::isfinite(s.mass_ratio[i])) continue;
    const double x = a.X(s.time_us[i]), y = a.Y(std::max(a.y0, s.mass_ratio[i]));
    absl::StrAppendFormat(&points, "%.1f,%.1f ", x, y);
    absl::StrAppendFormat(&out,
                          "<circle cx='%.1f' cy='%.1f' r='3' fill='%s'><title>%s %s: %.3f at %.0f "
                          "us</title></circle>\n",
                          x, y, color, s.family, s.labels[i], s.mass_ratio[i], s.time_us[i]);
  }
  out = absl::StrFormat("<polyline points='%s' fill='none' stroke='%s' stroke-width='1.5'/>\n",
                        points, color) +
        out;
  if (s.exact_us > 0) {
    const double x = a.X(s.exact_us);
    absl::StrAppendFormat(&out,
                          "<line x1='%.1f' y1='%d' x2='%.1f' y2='%d' stroke='%s' "
                          "stroke-dasharray='4,3'/>\n",
                          x, kTop, x, kTop + 12, color);
  }
  const int ly = kTop + 10 + 18 * index;
  absl::StrAppendFormat(&out,
                        "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='%s' stroke-width='2'/>"
                        "<text x='%d' y='%d' font-size='12'>%s</text>\n",
                        kWidth - kRight + 12, ly, kWidth - kRight + 32, ly, color,
                        kWidth - kRight + 38, ly + 4, s.family);
  return out;
}

}  // namespace

std::string FrontierSvg(const std::vector<FrontierSeries>& series, int budget, int page_tokens) {
  return PlotSvg(series,
                 absl::StrFormat("mdci frontier per family: mass / page oracle vs select time "
                                 "(budget %d, page %d; dashes at the top: the exact scan)",
                                 budget, page_tokens),
                 "mass / page oracle");
}

std::string PlotSvg(const std::vector<FrontierSeries>& series, const std::string& title,
                    const std::string& y_label) {
  const Axes a = FitAxes(series);
  std::string out = absl::StrFormat(
      "<svg xmlns='http://www.w3.org/2000/svg' width='%d' height='%d' "
      "font-family='sans-serif'>\n<rect width='100%%' height='100%%' fill='white'/>\n",
      kWidth, kHeight);
  absl::StrAppendFormat(&out, "<text x='%d' y='22' font-size='15'>%s</text>\n", kLeft, title);
  out += Grid(a);
  for (size_t i = 0; i < series.size(); ++i) {
    out += Series(a, series[i], kColors[i % (sizeof(kColors) / sizeof(kColors[0]))],
                  static_cast<int>(i));
  }
  absl::StrAppendFormat(&out,
                        "<text x='%d' y='%d' font-size='13' text-anchor='middle'>p50 select time "
                        "per KV head and step (log)</text>\n",
                        (kWidth - kRight + kLeft) / 2, kHeight - 16);
  absl::StrAppendFormat(&out,
                        "<text x='16' y='%d' font-size='13' transform='rotate(-90 16 %d)' "
                        "text-anchor='middle'>%s</text>\n",
                        (kHeight) / 2, (kHeight) / 2, y_label);
  out += "</svg>\n";
  return out;
}

}  // namespace icecache::bench
