#include "tests/bench/select_matrix.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "tests/bench/bench_format.h"
#include "tests/bench/select_bench.h"

namespace icecache::bench {
namespace {

// The policies every family runs, in report order: label, selector (with
// "/token" for token granularity), self-calibrated. "exact/token" is the
// exact-token oracle (the exact selector at token granularity takes the best
// tokens by the group mass: tests/unit/index/token_select_test.cc).
struct Policy {
  const char* label;
  const char* selector;
  bool calibrated;
};
const Policy kPolicies[] = {
    {"mdci", "mdci", false},
    {"mdci-cal", "mdci", true},
    {"mdci/token", "mdci/token", false},
    {"mdci-cal/token", "mdci/token", true},
    {"exact", "exact", false},
    {"exact-mdci", "exact-mdci", false},
    {"exact/token", "exact/token", false},
    {"quest", "quest", false},
    {"streaming", "streaming", false},
};
constexpr double kDefaultTargetMass = 0.95;

// The calibrated policies' targets: page granularity's (--mdci-target-mass),
// and token granularity's (--mdci-token-target-mass, else the page one).
double PageTarget(const SelectBenchOptions& o) {
  return o.mdci_target_mass > 0 ? o.mdci_target_mass : kDefaultTargetMass;
}
double TokenTarget(const SelectBenchOptions& o) {
  return o.mdci_token_target_mass > 0 ? o.mdci_token_target_mass : PageTarget(o);
}

// The layout must win by this fraction of mass to count as paying.
constexpr double kLayoutMargin = 0.02;

struct FamilyResult {
  std::string family;
  std::map<std::string, MethodSummary> policy;  // by policy label
  std::vector<MethodSummary> frontier;          // mdci at each --widths entry
  std::vector<MethodSummary> frontier_token;    // the same at token granularity
};

MdciParams WidthParams(const WidthSpec& w, const MdciParams& base, int64_t context, int budget) {
  MdciParams p = base;
  if (w.exhaustive) {
    p.field_of_view = 1 << 20;
    p.candidate_factor = static_cast<float>(context / std::max(1, budget) + 1);
  } else if (w.pq_factor > 0) {
    p.pq_factor = w.pq_factor;
  } else {
    p.field_of_view = w.field_of_view;
    p.candidate_factor = w.candidate_factor;
    p.pq_factor = 0;  // a tree width, also under --mdci-pq
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
  for (const Policy& p : kPolicies) {
    const double target = absl::EndsWith(p.selector, "/token") ? TokenTarget(o) : PageTarget(o);
    runs.push_back({p.label, p.selector, o.mdci, p.calibrated ? target : 0.0});
  }
  const int64_t context = (o.tokens > 0 ? o.tokens : 16384) + o.steps + o.chunk_tokens;
  for (const WidthSpec& w : widths) {
    runs.push_back({w.label, "mdci", WidthParams(w, o.mdci, context, o.budget)});
  }
  for (const WidthSpec& w : widths) {
    if (!o.frontier_token) break;
    runs.push_back({w.label, "mdci/token", WidthParams(w, o.mdci, context, o.budget)});
  }
  std::fprintf(stderr, "matrix: family %s\n", family.c_str());
  ASSIGN_OR_RETURN(std::vector<MethodSummary> ms, MeasureRuns(fo, runs));
  FamilyResult r;
  r.family = family;
  const size_t np = sizeof(kPolicies) / sizeof(kPolicies[0]);
  for (size_t i = 0; i < ms.size(); ++i) {
    if (i < np) {
      r.policy[ms[i].label] = ms[i];
    } else if (i < np + widths.size()) {
      r.frontier.push_back(ms[i]);
    } else {
      r.frontier_token.push_back(ms[i]);
    }
  }
  return r;
}

// The figures of one family's row, shared by the table and the JSON.
struct Row {
  double vs_page_oracle, vs_token_oracle, speedup, fill, layout_gain, oracle_layout_gain;
  double emdci, exact, oracle_mdci, oracle_positional;
  bool layout_pays;
  // Self-calibrated mdci (page: vs the page oracle; token: vs the token oracle).
  double cal_vs_page_oracle, cal_speedup;
  double tok_vs_token_oracle, tok_speedup, caltok_vs_token_oracle, caltok_speedup;
  CalibrationSummary cal, caltok;
};

Row MakeRow(const FamilyResult& f) {
  const MethodSummary& m = f.policy.at("mdci");
  const MethodSummary& ex = f.policy.at("exact");
  const MethodSummary& em = f.policy.at("exact-mdci");
  const MethodSummary& et = f.policy.at("exact/token");
  const MethodSummary& cal = f.policy.at("mdci-cal");
  const MethodSummary& tok = f.policy.at("mdci/token");
  const MethodSummary& caltok = f.policy.at("mdci-cal/token");
  Row r;
  r.vs_page_oracle = Ratio(m.mass, m.oracle_mass);
  r.vs_token_oracle = Ratio(m.mass, et.mass);
  r.speedup = Ratio(ex.p50_us, m.p50_us);
  r.cal_vs_page_oracle = Ratio(cal.mass, m.oracle_mass);
  r.cal_speedup = Ratio(ex.p50_us, cal.calibration.select_us);
  r.tok_vs_token_oracle = Ratio(tok.mass, et.mass);
  r.tok_speedup = Ratio(ex.p50_us, tok.p50_us);
  r.caltok_vs_token_oracle = Ratio(caltok.mass, et.mass);
  r.caltok_speedup = Ratio(ex.p50_us, caltok.calibration.select_us);
  r.cal = cal.calibration;
  r.caltok = caltok.calibration;
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
      "group mass on mdci's layout; token oracle: best tokens by true group mass; speed: exact "
      "scan p50 / p50 (calibrated: / mean selection time at the widths it chose, the sampled "
      "reference excluded: see overhead); cal: mdci self-calibrated to the "
      "target mass ratio)\n");
  std::printf("%-19s %9s %9s %7s | %9s %7s %22s | %9s %7s | %9s %7s %22s | %6s %8s  %s\n", "family",
              "/page-orc", "/tok-orc", "speed", "cal/page", "speed", "width", "tok/tok", "speed",
              "caltok/tok", "speed", "width", "fill", "ex-mdci", "layout");
  auto width = [](const CalibrationSummary& c) {
    if (!std::isfinite(c.width)) return std::string("-");
    return absl::StrFormat("%.2f(%.0fx%.0f) %d/%dx %dn", c.width, c.field_of_view,
                           c.candidate_factor, c.exact_heads, c.heads, c.normalized_heads);
  };
  for (const FamilyResult& f : fs) {
    const Row r = MakeRow(f);
    std::printf(
        "%-19s %9s %9s %6sx | %9s %6sx %22s | %9s %6sx | %9s %6sx %22s | %6s %+7.1f%%  %s\n",
        f.family.c_str(), Fmt(r.vs_page_oracle, "%.3f").c_str(),
        Fmt(r.vs_token_oracle, "%.3f").c_str(), Fmt(r.speedup, "%.1f").c_str(),
        Fmt(r.cal_vs_page_oracle, "%.3f").c_str(), Fmt(r.cal_speedup, "%.1f").c_str(),
        width(r.cal).c_str(), Fmt(r.tok_vs_token_oracle, "%.3f").c_str(),
        Fmt(r.tok_speedup, "%.1f").c_str(), Fmt(r.caltok_vs_token_oracle, "%.3f").c_str(),
        Fmt(r.caltok_speedup, "%.1f").c_str(), width(r.caltok).c_str(), Fmt(r.fill, "%.3f").c_str(),
        100 * r.layout_gain, r.layout_pays ? "pays" : "DOES NOT PAY (< +2%)");
  }
  std::printf(
      "\nlayout (exact-mdci vs exact on positional pages) and calibration (converged: steps "
      "before the last width or mode change; exact: share of selections made exactly (the exact "
      "fallback); overhead: sampled exact reference / selection time, warm-up included; steady: "
      "the same after the warm-up samples, with the interval chosen (1 in N) and steps per "
      "tree)\n");
  std::printf("%-19s %9s %9s %8s %9s %9s %8s | %9s %6s %9s %7s %11s %6s | %9s %6s %9s %7s %11s\n",
              "family", "ex-mdci", "exact", "gain", "orc-mdci", "orc-pos", "orc-gain", "converged",
              "exact", "overhead", "steady", "1-in/steps", "ratio", "tok-conv", "exact", "tok-ovh",
              "steady", "1-in/steps");
  auto steady = [](const CalibrationSummary& c) {
    return std::isfinite(c.sample_interval)
               ? absl::StrFormat("%.0f/%.0f", c.sample_interval, c.steady_steps)
               : std::string("-");
  };
  for (const FamilyResult& f : fs) {
    const Row r = MakeRow(f);
    std::printf(
        "%-19s %9s %9s %7s%% %9s %9s %7s%% | %9s %5s%% %8s%% %6s%% %11s %6s | %9s %5s%% %8s%% "
        "%6s%% %11s\n",
        f.family.c_str(), Fmt(r.emdci, "%.4f").c_str(), Fmt(r.exact, "%.4f").c_str(),
        Fmt(100 * r.layout_gain, "%+.1f").c_str(), Fmt(r.oracle_mdci, "%.4f").c_str(),
        Fmt(r.oracle_positional, "%.4f").c_str(), Fmt(100 * r.oracle_layout_gain, "%+.1f").c_str(),
        Fmt(r.cal.converge_steps, "%.0f").c_str(), Fmt(100 * r.cal.exact_share, "%.0f").c_str(),
        Fmt(100 * r.cal.overhead, "%.1f").c_str(), Fmt(100 * r.cal.steady_overhead, "%.1f").c_str(),
        steady(r.cal).c_str(), Fmt(r.cal.mean_ratio, "%.3f").c_str(),
        Fmt(r.caltok.converge_steps, "%.0f").c_str(),
        Fmt(100 * r.caltok.exact_share, "%.0f").c_str(),
        Fmt(100 * r.caltok.overhead, "%.1f").c_str(),
        Fmt(100 * r.caltok.steady_overhead, "%.1f").c_str(), steady(r.caltok).c_str());
  }
  std::printf("\nmass per policy (and p50 us)\n%-19s", "family");
  for (const Policy& p : kPolicies) std::printf(" %18s", p.label);
  std::printf("\n");
  for (const FamilyResult& f : fs) {
    std::printf("%-19s", f.family.c_str());
    for (const Policy& p : kPolicies) {
      const MethodSummary& m = f.policy.at(p.label);
      std::printf(" %8s (%7s)", Fmt(m.mass, "%.4f").c_str(), Fmt(m.p50_us, "%.0f").c_str());
    }
    std::printf("\n");
  }
}

// The steady state: the --steady-steps replay after the measured steps
// (CalibrationSummary::replay_*), with speeds from thread CPU time (the
// exact scan's mean over the measured steps against the replay's mean
// selection, without and with the sampled references).
void PrintSteadyState(const std::vector<FamilyResult>& fs) {
  if (fs.empty() || !std::isfinite(fs.front().policy.at("mdci-cal").calibration.replay_steps)) {
    return;
  }
  std::printf(
      "\nsteady state (calibrated mdci over the --steady-steps replay after the measured steps, "
      "the measured steps' queries in order; mass: page granularity / page oracle, token / token "
      "oracle, 'first' over the measured steps, warm-up included; exact: share of the replay's "
      "selections made exactly; cpu: mean thread CPU us per selection; speed: exact scan mean "
      "thread CPU / that, and +ref with the sampled references)\n");
  std::printf("%-19s %9s | %7s %7s %6s %8s %6s %6s | %7s %7s %6s %8s %6s %6s\n", "family",
              "exact_cpu", "first", "steady", "exact", "cpu", "speed", "+ref", "tfirst", "tsteady",
              "exact", "cpu", "speed", "+ref");
  for (const FamilyResult& f : fs) {
    const double exact_cpu = f.policy.at("exact").cpu_mean_us;
    const double oracle = f.policy.at("mdci").oracle_mass;
    const double tok_oracle = f.policy.at("exact/token").mass;
    std::printf("%-19s %9s", f.family.c_str(), Fmt(exact_cpu, "%.0f").c_str());
    for (const char* label : {"mdci-cal", "mdci-cal/token"}) {
      const MethodSummary& m = f.policy.at(label);
      const CalibrationSummary& c = m.calibration;
      const bool page = std::string(label) == "mdci-cal";
      const double first = Ratio(m.mass, page ? oracle : tok_oracle);
      const double steady = Ratio(c.replay_mass, page ? c.replay_oracle_mass : tok_oracle);
      std::printf(
          " | %7s %7s %5s%% %8s %5sx %5sx", Fmt(first, "%.3f").c_str(), Fmt(steady, "%.3f").c_str(),
          Fmt(100 * c.replay_exact_share, "%.0f").c_str(),
          Fmt(c.replay_select_cpu_us, "%.0f").c_str(),
          Fmt(Ratio(exact_cpu, c.replay_select_cpu_us), "%.1f").c_str(),
          Fmt(Ratio(exact_cpu, c.replay_select_cpu_us + c.replay_sample_cpu_us), "%.1f").c_str());
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

// Page against token granularity at each width, both as mass over the
// exact-token oracle's (the same denominator), with p50 times: the two
// frontiers side by side, so equal-time points can be read off.
void PrintGranularityFrontier(const std::vector<FamilyResult>& fs) {
  if (fs.empty() || fs.front().frontier_token.empty()) return;
  std::printf(
      "\ngranularity frontier: mdci mass / token oracle (p50 us) per width, page | token\n%-19s",
      "family");
  for (const MethodSummary& m : fs.front().frontier) {
    std::printf(" %17s %17s", (m.label + " page").c_str(), (m.label + " token").c_str());
  }
  std::printf("\n");
  for (const FamilyResult& f : fs) {
    std::printf("%-19s", f.family.c_str());
    const double oracle = f.policy.at("exact/token").mass;
    for (size_t i = 0; i < f.frontier.size() && i < f.frontier_token.size(); ++i) {
      for (const MethodSummary* m : {&f.frontier[i], &f.frontier_token[i]}) {
        std::printf(" %7s (%7s)", Fmt(Ratio(m->mass, oracle), "%.3f").c_str(),
                    Fmt(m->p50_us, "%.0f").c_str());
      }
    }
    std::printf("\n");
  }
}

Json SummaryJson(const MethodSummary& m) {
  Json j = Json::object();
  j["selector"] = m.selector;
  j["label"] = m.label;
  j["query_us_p50"] = m.p50_us;
  j["query_us_mean"] = m.mean_us;
  j["query_cpu_us_p50"] = m.cpu_p50_us;
  j["query_cpu_us_mean"] = m.cpu_mean_us;
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

Json CalibrationJson(const CalibrationSummary& c) {
  if (!std::isfinite(c.width)) return nullptr;
  Json j = Json::object();
  j["width"] = c.width;
  j["field_of_view"] = c.field_of_view;
  j["candidate_factor"] = c.candidate_factor;
  j["converge_steps"] = c.converge_steps;
  j["overhead"] = c.overhead;
  j["mean_sampled_ratio"] = c.mean_ratio;
  j["select_us_mean"] = c.select_us;
  j["heads"] = c.heads;
  j["exact_heads"] = c.exact_heads;
  j["normalized_heads"] = c.normalized_heads;
  j["exact_share"] = c.exact_share;
  j["steady_steps"] = c.steady_steps;
  j["steady_sample_interval"] = c.sample_interval;
  j["steady_overhead"] = c.steady_overhead;
  j["select_cpu_us_mean"] = c.select_cpu_us;
  j["overhead_cpu"] = c.overhead_cpu;
  if (std::isfinite(c.replay_steps)) {
    j["replay_steps"] = c.replay_steps;
    j["replay_mass"] = c.replay_mass;
    j["replay_page_oracle_mass"] = c.replay_oracle_mass;
    j["replay_exact_share"] = c.replay_exact_share;
    j["replay_select_cpu_us_mean"] = c.replay_select_cpu_us;
    j["replay_sample_cpu_us_mean"] = c.replay_sample_cpu_us;
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
  j["mdci_calibrated_vs_page_oracle"] = r.cal_vs_page_oracle;
  j["mdci_calibrated_speedup_vs_exact"] = r.cal_speedup;
  j["calibrated_width"] = CalibrationJson(r.cal);
  j["mdci_token_vs_token_oracle"] = r.tok_vs_token_oracle;
  j["mdci_token_speedup_vs_exact"] = r.tok_speedup;
  j["mdci_calibrated_token_vs_token_oracle"] = r.caltok_vs_token_oracle;
  j["mdci_calibrated_token_speedup_vs_exact"] = r.caltok_speedup;
  j["calibrated_width_token"] = CalibrationJson(r.caltok);
  j["page_fill"] = r.fill;
  j["exact_mdci_mass"] = r.emdci;
  j["exact_positional_mass"] = r.exact;
  j["layout_gain"] = r.layout_gain;
  j["page_oracle_mdci_layout"] = r.oracle_mdci;
  j["page_oracle_positional_layout"] = r.oracle_positional;
  j["oracle_layout_gain"] = r.oracle_layout_gain;
  j["layout_pays"] = r.layout_pays;
  Json pol = Json::object();
  for (const auto& [label, m] : f.policy) pol[label] = SummaryJson(m);
  j["policies"] = std::move(pol);
  Json fr = Json::array();
  for (const MethodSummary& m : f.frontier) {
    Json p = SummaryJson(m);
    p["width"] = m.label;
    p["mass_vs_page_oracle"] = Ratio(m.mass, f.policy.at("mdci").oracle_mass);
    fr.push_back(std::move(p));
  }
  j["frontier"] = std::move(fr);
  Json ft = Json::array();
  for (const MethodSummary& m : f.frontier_token) {
    Json p = SummaryJson(m);
    p["width"] = m.label;
    p["mass_vs_token_oracle"] = Ratio(m.mass, f.policy.at("exact/token").mass);
    ft.push_back(std::move(p));
  }
  j["frontier_token"] = std::move(ft);
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
  if (absl::StartsWith(text, "pq")) {
    if (!absl::SimpleAtof(text.substr(2), &w.pq_factor) || !(w.pq_factor > 0) ||
        !std::isfinite(w.pq_factor)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "--widths: '%s' is not pqF (the product-quantised scan, factor F > 0, e.g. pq8)", text));
    }
    return w;
  }
  const std::vector<std::string> parts = absl::StrSplit(text, 'x');
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &w.field_of_view) ||
      !absl::SimpleAtof(parts[1], &w.candidate_factor) || w.field_of_view < 1 ||
      !(w.candidate_factor > 0) || !std::isfinite(w.candidate_factor)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--widths: '%s' is not FOVxCF (field of view >= 1 x candidate factor > 0, e.g. 128x16) "
        "or 'exhaustive' or pqF",
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
  std::printf(
      "\ncalibration targets: page %.3f of the page oracle, token %.3f of the token oracle\n",
      PageTarget(o), TokenTarget(o));
  PrintMatrix(results);
  PrintSteadyState(results);
  PrintFrontier(results);
  PrintGranularityFrontier(results);
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
    config["target_mass"] = PageTarget(o);
    config["token_target_mass"] = TokenTarget(o);
    config["calibrate_every"] = o.calibrate_every;
    config["calibrate_warmup"] = o.calibrate_warmup;
    config["calibrate_max_every"] = o.calibrate_max_every;
    config["calibrate_share"] = o.calibrate_share;
    config["calibrate_confidence_z"] = o.calibrate_confidence_z;
    config["calibrate_min_width"] = o.calibrate_min_width;
    config["calibrate_carry_z"] = o.calibrate_carry_z;
    config["calibrate_confirm_every"] = o.calibrate_confirm_every;
    config["calibrate_max_increase"] = o.calibrate_max_increase;
    config["calibrate_duel_fresh"] = o.calibrate_duel_fresh;
    config["calibrate_warmup_every"] = o.calibrate_warmup_every;
    config["calibrate_ranking_trial"] = o.calibrate_ranking_trial;
    config["calibrate_exact_cost_ratio"] = o.calibrate_exact_cost_ratio;
    config["steady_steps"] = o.steady_steps;
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
