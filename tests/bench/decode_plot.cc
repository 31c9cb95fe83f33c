// `icecache-bench decode --plot`: two panels in one hand-written SVG (no
// plotting dependency, like frontier_svg.cc): TPOT against context per
// policy (log-log, the picture of the paper's latency figure) and mass
// recall against context per policy.
#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tests/bench/decode_results.h"

namespace icecache::bench {
namespace {

constexpr int kPanelW = 520, kPanelH = 400, kLeft = 70, kTop = 50, kBottom = 50, kLegend = 150;
const char* const kColors[] = {"#000000", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd",
                               "#ff7f0e", "#d62728", "#8c564b", "#e377c2", "#17becf"};

struct Series {
  std::string name;
  std::vector<std::pair<double, double>> points;  // (context tokens, value)
};

struct Panel {
  int x0 = 0;  // left edge in the picture
  bool log_y = false;
  double xmin = 1, xmax = 10, ymin = 0, ymax = 1;
  double X(double t) const {
    const double f =
        xmax > xmin ? (std::log2(t) - std::log2(xmin)) / (std::log2(xmax) - std::log2(xmin)) : 0.5;
    return x0 + kLeft + f * (kPanelW - kLeft - 20);
  }
  double Y(double v) const {
    const double a = log_y ? std::log10(v) : v, lo = log_y ? std::log10(ymin) : ymin,
                 hi = log_y ? std::log10(ymax) : ymax;
    return kTop + (hi - a) / (hi - lo) * (kPanelH - kTop - kBottom);
  }
};

Panel Fit(const std::vector<Series>& series, bool log_y, int x0) {
  Panel p;
  p.x0 = x0;
  p.log_y = log_y;
  double xmn = 1e300, xmx = 0, ymn = 1e300, ymx = -1e300;
  for (const Series& s : series) {
    for (const auto& [x, y] : s.points) {
      xmn = std::min(xmn, x), xmx = std::max(xmx, x);
      ymn = std::min(ymn, y), ymx = std::max(ymx, y);
    }
  }
  if (xmx <= 0) xmn = 1024, xmx = 2048, ymn = 0, ymx = 1;
  p.xmin = xmn == xmx ? xmn / 2 : xmn;
  p.xmax = xmn == xmx ? xmx * 2 : xmx;
  if (log_y) {
    p.ymin = std::pow(10.0, std::floor(std::log10(std::max(1e-3, ymn))));
    p.ymax = std::pow(10.0, std::ceil(std::log10(std::max(ymx, p.ymin * 10))));
  } else {
    p.ymin = std::min(0.5, std::floor(ymn * 10) / 10);
    p.ymax = 1.0;
  }
  return p;
}

std::string Frame(const Panel& p, const std::string& title, const std::string& ylabel) {
  std::string out;
  const int right = p.x0 + kPanelW - 20, bottom = kPanelH - kBottom;
  absl::StrAppendFormat(&out, "<text x='%d' y='30' font-size='14'>%s</text>\n", p.x0 + kLeft,
                        title);
  for (double t = p.xmin; t <= p.xmax * 1.0001; t *= 2) {
    absl::StrAppendFormat(&out,
                          "<line x1='%.1f' y1='%d' x2='%.1f' y2='%d' stroke='#ddd'/><text "
                          "x='%.1f' y='%d' font-size='11' text-anchor='middle'>%gk</text>\n",
                          p.X(t), kTop, p.X(t), bottom, p.X(t), bottom + 16, t / 1024);
  }
  std::vector<double> ticks;
  if (p.log_y) {
    for (double v = p.ymin; v <= p.ymax * 1.0001; v *= 10) ticks.push_back(v);
  } else {
    for (double v = p.ymin; v <= p.ymax + 1e-9; v += 0.1) ticks.push_back(v);
  }
  for (double v : ticks) {
    absl::StrAppendFormat(&out,
                          "<line x1='%d' y1='%.1f' x2='%d' y2='%.1f' stroke='#ddd'/><text x='%d' "
                          "y='%.1f' font-size='11' text-anchor='end'>%g</text>\n",
                          p.x0 + kLeft, p.Y(v), right, p.Y(v), p.x0 + kLeft - 5, p.Y(v) + 4, v);
  }
  absl::StrAppendFormat(&out,
                        "<rect x='%d' y='%d' width='%d' height='%d' fill='none' stroke='#444'/>\n"
                        "<text x='%d' y='%d' font-size='12' text-anchor='middle'>context "
                        "tokens</text>\n<text x='%d' y='%d' font-size='12' text-anchor='middle' "
                        "transform='rotate(-90 %d %d)'>%s</text>\n",
                        p.x0 + kLeft, kTop, kPanelW - kLeft - 20, bottom - kTop, p.x0 + kPanelW / 2,
                        kPanelH - 12, p.x0 + 20, kPanelH / 2, p.x0 + 20, kPanelH / 2, ylabel);
  return out;
}

std::string Lines(const Panel& p, const std::vector<Series>& series) {
  std::string out;
  for (size_t i = 0; i < series.size(); ++i) {
    const char* color = kColors[i % (sizeof(kColors) / sizeof(kColors[0]))];
    std::string pts;
    for (const auto& [x, y] : series[i].points) {
      absl::StrAppendFormat(&pts, "%.1f,%.1f ", p.X(x), p.Y(std::max(y, p.ymin)));
      absl::StrAppendFormat(&out,
                            "<circle cx='%.1f' cy='%.1f' r='3' fill='%s'><title>%s at %g: "
                            "%.4g</title></circle>\n",
                            p.X(x), p.Y(std::max(y, p.ymin)), color, series[i].name, x, y);
    }
    absl::StrAppendFormat(
        &out, "<polyline points='%s' fill='none' stroke='%s' stroke-width='1.5'/>\n", pts, color);
  }
  return out;
}

std::string Legend(const std::vector<Series>& series, int x) {
  std::string out;
  for (size_t i = 0; i < series.size(); ++i) {
    const int y = kTop + 10 + 18 * static_cast<int>(i);
    absl::StrAppendFormat(&out,
                          "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='%s' stroke-width='2'/>"
                          "<text x='%d' y='%d' font-size='12'>%s</text>\n",
                          x, y, x + 20, y, kColors[i % (sizeof(kColors) / sizeof(kColors[0]))],
                          x + 26, y + 4, series[i].name);
  }
  return out;
}

// One series per policy, in the order of the first context.
std::vector<Series> Collect(const std::vector<ContextResult>& contexts, bool tpot) {
  std::vector<Series> out;
  std::map<std::string, size_t> index;
  for (const ContextResult& c : contexts) {
    for (const PolicyResult& p : c.policies) {
      const double v = tpot ? p.cost.tpot : p.mass;
      if (!std::isfinite(v) || (tpot && v <= 0)) continue;
      auto [it, fresh] = index.emplace(p.policy.name, out.size());
      if (fresh) out.push_back(Series{p.policy.name, {}});
      out[it->second].points.emplace_back(static_cast<double>(c.tokens), v);
    }
  }
  return out;
}

}  // namespace

std::string DecodePlotSvg(const DecodeBenchOptions& o, const std::vector<ContextResult>& contexts) {
  const std::vector<Series> tpot = Collect(contexts, true), mass = Collect(contexts, false);
  const Panel left = Fit(tpot, /*log_y=*/true, 0), right = Fit(mass, /*log_y=*/false, kPanelW);
  const int width = 2 * kPanelW + kLegend;
  std::string out = absl::StrFormat(
      "<svg xmlns='http://www.w3.org/2000/svg' width='%d' height='%d' "
      "font-family='sans-serif'>\n<rect width='100%%' height='100%%' fill='white'/>\n",
      width, kPanelH);
  out += Frame(left,
               absl::StrFormat("TPOT per policy (%d layers; attention = CPU stand-in)", o.layers),
               "ms per token (log)");
  out += Lines(left, tpot);
  out +=
      Frame(right, absl::StrFormat("attention-mass recall (budget %d)", o.budget), "mass recall");
  out += Lines(right, mass);
  out += Legend(tpot.size() >= mass.size() ? tpot : mass, 2 * kPanelW + 5);
  out += "</svg>\n";
  return out;
}

}  // namespace icecache::bench
