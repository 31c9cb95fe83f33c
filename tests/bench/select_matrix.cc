#include "tests/bench/select_matrix.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "tests/bench/select_bench.h"

namespace icecache::bench {
namespace {

// The policies every family runs, in report order.
const char* const kPolicies[] = {"mdci",        "exact", "exact-mdci",
                                 "exact-token", "quest", "streaming"};

// The layout must win by this fraction of mass to count as paying.
constexpr double kLayoutMargin = 0.02;

struct FamilyResult {
  std::string family;
  std::map<std::string, MethodSummary> policy;  // by selector name
  std::vector<MethodSummary> frontier;          // mdci at each --widths entry
};

double Ratio(double a, double b) {
  return b > 0 ? a / b : std::numeric_limits<double>::quiet_NaN();
}

std::string Fmt(double v, const char* f) {
  return std::isfinite(v) ? absl::StrFormat(f, v) : std::string("-");
}

MdciParams WidthParams(const WidthSpec& w, const MdciParams& base, int64_t context, int budget) {
  MdciParams p = base;
  if (w.exhaustive) {
    p.field_of_view = 1 << 20;
    p.candidate_factor = static_cast<float>(context / std::max(1, budget) + 1);
  } else {
    p.field_of_view = w.field_of_view;
    p.candidate_factor = w.candidate_factor;
  }
  return p;
}

absl::StatusOr<FamilyResult> RunFamily(const SelectBenchOptions& o, const std::string& family,
                                       const std::vector<WidthSpec>& widths) {
  SelectBenchOptions fo = o;
  fo.synthetic = family;
  fo.dump_dir.clear();
  fo.page_oracle = true;
  std::vector<MethodRun> runs;
  for (const char* p : kPolicies) runs.push_back({p, p, o.mdci});
  const int64_t context = (o.tokens > 0 ? o.tokens : 16384) + o.steps + o.chunk_tokens;
  for (const WidthSpec& w : widths) {
    runs.push_back({w.label, "mdci", WidthParams(w, o.mdci, context, o.budget)});
  }
  std::fprintf(stderr, "matrix: family %s\n", family.c_str());
  ASSIGN_OR_RETURN(std::vector<MethodSummary> ms, MeasureRuns(fo, runs));
  FamilyResult r;
  r.family = family;
  const size_t np = sizeof(kPolicies) / sizeof(kPolicies[0]);
  for (size_t i = 0; i < ms.size(); ++i) {
    if (i < np) {
      r.policy[ms[i].selector] = ms[i];
    } else {
      r.frontier.push_back(ms[i]);
    }
  }
  return r;
}

// The figures of one family's row, shared by the table and the JSON.
struct Row {
  double vs_page_oracle, vs_token_oracle, speedup, fill, layout_gain, oracle_layout_gain;
  double emdci, exact, oracle_mdci, oracle_positional;
  bool layout_pays;
};

Row MakeRow(const FamilyResult& f) {
  const MethodSummary& m = f.policy.at("mdci");
  const MethodSummary& ex = f.policy.at("exact");
  const MethodSummary& em = f.policy.at("exact-mdci");
  const MethodSummary& et = f.policy.at("exact-token");
  Row r;
  r.vs_page_oracle = Ratio(m.mass, m.oracle_mass);
  r.vs_token_oracle = Ratio(m.mass, et.mass);
  r.speedup = Ratio(ex.p50_us, m.p50_us);
  r.fill = m.page_fill;
  r.emdci = em.mass;
  r.exact = ex.mass;
  r.oracle_mdci = m.oracle_mass;
  r.oracle_positional = ex.oracle_mass;
  r.layout_gain = Ratio(em.mass, ex.mass) - 1;
  r.oracle_layout_gain = Ratio(m.oracle_mass, ex.oracle_mass) - 1;
  r.layout_pays = r.layout_gain >= kLayoutMargin;
  return r;
}

void PrintMatrix(const std::vector<FamilyResult>& fs) {
  std::printf(
      "\nrobustness matrix (mass: attention-mass recall; page oracle: best whole pages by true "
      "group mass on mdci's layout; speed: exact scan p50 / mdci p50)\n");
  std::printf("%-19s %9s %9s %8s %7s %6s %9s %9s %8s %9s %9s %8s  %s\n", "family", "/page-orc",
              "/tok-orc", "speed", "width", "fill", "ex-mdci", "exact", "gain", "orc-mdci",
              "orc-pos", "orc-gain", "layout");
  for (const FamilyResult& f : fs) {
    const Row r = MakeRow(f);
    std::printf("%-19s %9s %9s %7sx %7s %6s %9s %9s %7s%% %9s %9s %7s%%  %s\n", f.family.c_str(),
                Fmt(r.vs_page_oracle, "%.3f").c_str(), Fmt(r.vs_token_oracle, "%.3f").c_str(),
                Fmt(r.speedup, "%.1f").c_str(), "n/a", Fmt(r.fill, "%.3f").c_str(),
                Fmt(r.emdci, "%.4f").c_str(), Fmt(r.exact, "%.4f").c_str(),
                Fmt(100 * r.layout_gain, "%+.1f").c_str(), Fmt(r.oracle_mdci, "%.4f").c_str(),
                Fmt(r.oracle_positional, "%.4f").c_str(),
                Fmt(100 * r.oracle_layout_gain, "%+.1f").c_str(),
                r.layout_pays ? "pays" : "DOES NOT PAY (< +2%)");
  }
  std::printf("\nmass per policy (and p50 us)\n%-19s", "family");
  for (const char* p : kPolicies) std::printf(" %18s", p);
  std::printf("\n");
  for (const FamilyResult& f : fs) {
    std::printf("%-19s", f.family.c_str());
    for (const char* p : kPolicies) {
      const MethodSummary& m = f.policy.at(p);
      std::printf(" %8s (%7s)", Fmt(m.mass, "%.4f").c_str(), Fmt(m.p50_us, "%.0f").c_str());
    }
    std::printf("\n");
  }
}

void PrintFrontier(const std::vector<FamilyResult>& fs) {
  if (fs.empty() || fs.front().frontier.empty()) return;
  std::printf(
      "\nfrontier: mdci mass / page oracle (p50 us) per width (field_of_view x "
      "candidate_factor); exact scan p50 last\n%-19s",
      "family");
  for (const MethodSummary& m : fs.front().frontier) std::printf(" %17s", m.label.c_str());
  std::printf(" %9s\n", "exact_us");
  for (const FamilyResult& f : fs) {
    std::printf("%-19s", f.family.c_str());
    const double oracle = f.policy.at("mdci").oracle_mass;
    for (const MethodSummary& m : f.frontier) {
      std::printf(" %7s (%7s)", Fmt(Ratio(m.mass, oracle), "%.3f").c_str(),
                  Fmt(m.p50_us, "%.0f").c_str());
    }
    std::printf(" %9s\n", Fmt(f.policy.at("exact").p50_us, "%.0f").c_str());
  }
}

Json SummaryJson(const MethodSummary& m) {
  Json j = Json::object();
  j["selector"] = m.selector;
  j["query_us_p50"] = m.p50_us;
  j["query_us_mean"] = m.mean_us;
  j["mass_recall"] = m.mass;
  j["topk_recall"] = m.topk;
  j["output_rel_error"] = m.output_rel_error;
  j["keys_touched"] = m.keys_touched;
  j["page_fill"] = m.page_fill;
  j["page_oracle_mass"] = m.oracle_mass;
  j["build_s"] = m.build_s;
  if (m.selector == "mdci" || m.selector == "exact-mdci") {
    j["field_of_view"] = m.mdci.field_of_view;
    j["candidate_factor"] = static_cast<double>(m.mdci.candidate_factor);
  }
  return j;
}

Json FamilyJson(const FamilyResult& f) {
  const Row r = MakeRow(f);
  Json j = Json::object();
  j["family"] = f.family;
  j["mdci_vs_page_oracle"] = r.vs_page_oracle;
  j["mdci_vs_token_oracle"] = r.vs_token_oracle;
  j["mdci_speedup_vs_exact"] = r.speedup;
  j["calibrated_width"] = nullptr;  // no self-calibration on this build
  j["page_fill"] = r.fill;
  j["exact_mdci_mass"] = r.emdci;
  j["exact_positional_mass"] = r.exact;
  j["layout_gain"] = r.layout_gain;
  j["page_oracle_mdci_layout"] = r.oracle_mdci;
  j["page_oracle_positional_layout"] = r.oracle_positional;
  j["oracle_layout_gain"] = r.oracle_layout_gain;
  j["layout_pays"] = r.layout_pays;
  Json pol = Json::object();
  for (const auto& [name, m] : f.policy) pol[name] = SummaryJson(m);
  j["policies"] = std::move(pol);
  Json fr = Json::array();
  for (const MethodSummary& m : f.frontier) {
    Json p = SummaryJson(m);
    p["width"] = m.label;
    p["mass_vs_page_oracle"] = Ratio(m.mass, f.policy.at("mdci").oracle_mass);
    fr.push_back(std::move(p));
  }
  j["frontier"] = std::move(fr);
  return j;
}

absl::Status WriteText(const std::string& path, const std::string& text, const char* flag) {
  std::ofstream out(path);
  out << text;
  out.close();
  if (!out) return absl::PermissionDeniedError(absl::StrFormat("cannot write %s %s", flag, path));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<WidthSpec> ParseWidth(const std::string& text) {
  WidthSpec w;
  w.label = text;
  if (text == "exhaustive") {
    w.exhaustive = true;
    return w;
  }
  const std::vector<std::string> parts = absl::StrSplit(text, 'x');
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &w.field_of_view) ||
      !absl::SimpleAtof(parts[1], &w.candidate_factor) || w.field_of_view < 1 ||
      !(w.candidate_factor > 0) || !std::isfinite(w.candidate_factor)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--widths: '%s' is not FOVxCF (field of view >= 1 x candidate factor > 0, e.g. 128x16) "
        "or 'exhaustive'",
        text));
  }
  return w;
}

absl::Status RunSelectMatrix(const SelectBenchOptions& o) {
  std::vector<std::string> families = o.families.empty() ? SyntheticFamilyNames() : o.families;
  std::vector<WidthSpec> widths;
  for (const std::string& s : o.widths) {
    ASSIGN_OR_RETURN(WidthSpec w, ParseWidth(s));
    widths.push_back(w);
  }
  std::vector<FamilyResult> results;
  for (const std::string& f : families) {
    ASSIGN_OR_RETURN(FamilyResult r, RunFamily(o, f, widths));
    results.push_back(std::move(r));
  }
  PrintMatrix(results);
  PrintFrontier(results);
  std::fflush(stdout);
  if (!o.json_path.empty()) {
    Json root = Json::object();
    Json config = Json::object();
    config["tokens"] = o.tokens > 0 ? o.tokens : 16384;
    config["kv_heads"] = o.heads;
    config["steps"] = o.steps;
    config["budget"] = o.budget;
    config["page_tokens"] = o.page_tokens.front();
    config["sink_tokens"] = o.sink_tokens;
    config["seed"] = o.seed;
    config["field_of_view"] = o.mdci.field_of_view;
    config["candidate_factor"] = static_cast<double>(o.mdci.candidate_factor);
    config["layout_margin"] = kLayoutMargin;
    root["config"] = std::move(config);
    Json fams = Json::array();
    for (const FamilyResult& f : results) fams.push_back(FamilyJson(f));
    root["families"] = std::move(fams);
    RETURN_IF_ERROR(WriteText(o.json_path, DumpJson(root, 2) + "\n", "--json"));
  }
  if (!o.plot_path.empty()) {
    std::vector<FrontierSeries> series;
    for (const FamilyResult& f : results) {
      FrontierSeries s;
      s.family = f.family;
      s.exact_us = f.policy.at("exact").p50_us;
      const double oracle = f.policy.at("mdci").oracle_mass;
      for (const MethodSummary& m : f.frontier) {
        s.labels.push_back(m.label);
        s.time_us.push_back(m.p50_us);
        s.mass_ratio.push_back(Ratio(m.mass, oracle));
      }
      series.push_back(std::move(s));
    }
    RETURN_IF_ERROR(
        WriteText(o.plot_path, FrontierSvg(series, o.budget, o.page_tokens.front()), "--plot"));
  }
  return absl::OkStatus();
}

}  // namespace icecache::bench
