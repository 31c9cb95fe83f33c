#include "tests/bench/select_baselines_table.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "tests/bench/bench_format.h"

namespace icecache::bench {
namespace {

// The exhaustive methods: references, not contenders for "best mass".
bool Exhaustive(const std::string& name) {
  return name == "exact" || name == "exact-mdci" || name == "exact-token" || name == "omnikv" ||
         name == "omnikv@tok";
}

struct Cell {  // one (family, budget) run of every method
  std::string family;
  std::string budget_label;
  int budget = 0;
  std::vector<MethodSummary> methods;
};

const MethodSummary* Find(const Cell& c, const std::string& name) {
  for (const MethodSummary& m : c.methods) {
    if (m.label == name) return &m;
  }
  return nullptr;
}

void PrintCell(const Cell& c) {
  const MethodSummary* tok = Find(c, "exact-token");
  std::printf("\n%s, budget %s (%d tokens)\n", c.family.c_str(), c.budget_label.c_str(), c.budget);
  std::printf("%-19s %7s %8s %8s %10s %9s %8s %10s\n", "method", "mass", "/ex-tok", "err", "p50_us",
              "build_s", "B/tok", "touched");
  for (const MethodSummary& m : c.methods) {
    std::printf("%-19s %7s %8s %8s %10s %9s %8s %10s\n", m.label.c_str(),
                Fmt(m.mass, "%.4f").c_str(),
                Fmt(tok ? Ratio(m.mass, tok->mass) : NAN, "%.3f").c_str(),
                Fmt(m.output_rel_error, "%.4f").c_str(), Fmt(m.p50_us, "%.1f").c_str(),
                Fmt(m.build_s, "%.3f").c_str(), Fmt(m.index_bytes_per_token, "%.1f").c_str(),
                Fmt(m.keys_touched, "%.0f").c_str());
  }
}

// Mean over families of one method's figures at one budget label.
struct Mean {
  double mass = 0, vs_tok = 0, err = 0, p50 = 0, build = 0, bytes = 0;
  int n = 0;
};

std::map<std::string, std::map<std::string, Mean>> Means(const std::vector<Cell>& cells) {
  std::map<std::string, std::map<std::string, Mean>> out;  // method -> budget label -> mean
  for (const Cell& c : cells) {
    const MethodSummary* tok = Find(c, "exact-token");
    for (const MethodSummary& m : c.methods) {
      Mean& e = out[m.label][c.budget_label];
      e.mass += m.mass;
      e.vs_tok += tok ? Ratio(m.mass, tok->mass) : NAN;
      e.err += m.output_rel_error;
      e.p50 += m.p50_us;
      e.build += m.build_s;
      e.bytes += m.index_bytes_per_token;
      ++e.n;
    }
  }
  for (auto& [name, by_budget] : out) {
    for (auto& [label, e] : by_budget) {
      e.mass /= e.n, e.vs_tok /= e.n, e.err /= e.n, e.p50 /= e.n, e.build /= e.n, e.bytes /= e.n;
    }
  }
  return out;
}

std::vector<std::string> BestLines(const std::vector<Cell>& cells) {
  std::vector<std::string> lines;
  for (const Cell& c : cells) {
    const MethodSummary* best = nullptr;
    const MethodSummary* mdci = Find(c, "mdci");
    for (const MethodSummary& m : c.methods) {
      if (Exhaustive(m.label) || m.label == "magicpig-est") continue;
      if (best == nullptr || m.mass > best->mass) best = &m;
    }
    if (best == nullptr) continue;
    lines.push_back(
        absl::StrFormat("%-19s budget %-5s best mass (non-exhaustive): %-19s %.4f at %.1f us%s",
                        c.family, c.budget_label, best->label, best->mass, best->p50_us,
                        mdci != nullptr && best != mdci
                            ? absl::StrFormat("  (mdci %.4f at %.1f us)", mdci->mass, mdci->p50_us)
                            : ""));
  }
  return lines;
}

Json CellJson(const Cell& c) {
  Json j = Json::object();
  j["family"] = c.family;
  j["budget_label"] = c.budget_label;
  j["budget_tokens"] = c.budget;
  Json ms = Json::array();
  for (const MethodSummary& m : c.methods) {
    Json e = Json::object();
    e["method"] = m.label;
    e["mass_recall"] = m.mass;
    e["topk_recall"] = m.topk;
    e["output_rel_error"] = m.output_rel_error;
    e["query_us_p50"] = m.p50_us;
    e["query_us_mean"] = m.mean_us;
    e["build_s"] = m.build_s;
    e["index_bytes_per_token"] = m.index_bytes_per_token;
    e["keys_touched"] = m.keys_touched;
    ms.push_back(std::move(e));
  }
  j["methods"] = std::move(ms);
  return j;
}

absl::Status WriteFile(const std::string& path, const std::string& text, const char* flag) {
  std::ofstream out(path);
  out << text;
  out.close();
  if (!out) return absl::PermissionDeniedError(absl::StrFormat("cannot write %s %s", flag, path));
  return absl::OkStatus();
}

std::string Svg(const std::map<std::string, std::map<std::string, Mean>>& means,
                const std::vector<std::string>& methods, const std::vector<std::string>& labels,
                const SelectBenchOptions& o, int64_t context) {
  std::vector<BaselineBar> bars;
  for (const std::string& name : methods) {
    if (name == "exact-token" || !means.count(name)) continue;
    BaselineBar bar;
    bar.method = name;
    for (const std::string& label : labels) {
      const auto it = means.at(name).find(label);
      const bool run = it != means.at(name).end();
      bar.budgets.push_back(label);
      bar.mass_ratio.push_back(run ? it->second.vs_tok : NAN);
      bar.error.push_back(run ? it->second.err : NAN);
    }
    bars.push_back(std::move(bar));
  }
  return BaselinesBarSvg(
      bars, labels,
      absl::StrFormat("KV selection methods, mean over %zu families: %lld-token context, page %d, "
                      "layer reuse %d",
                      o.families.empty() ? SyntheticFamilyNames().size() : o.families.size(),
                      static_cast<long long>(context), o.page_tokens.front(), o.layer_reuse));
}

}  // namespace

const std::vector<std::string>& BaselineTableMethods() {
  static const auto* names =
      new std::vector<std::string>{"mdci",         "mdci/token",     "exact",
                                   "exact-token",  "quest",          "streaming",
                                   "arkvale",      "pqcache",        "pqcache@tok",
                                   "snapkv",       "snapkv@tok",     "omnikv",
                                   "omnikv@tok",   "magicpig",       "magicpig@tok",
                                   "magicpig-est", "mdci-published", "mdci-published@tok"};
  return *names;
}

absl::Status RunBaselinesTable(const SelectBenchOptions& o) {
  const std::vector<std::string> families =
      o.families.empty() ? SyntheticFamilyNames() : o.families;
  const int64_t prefill = o.tokens > 0 ? o.tokens : 16384;
  const int64_t context = prefill + o.steps + o.chunk_tokens;
  const std::vector<std::pair<std::string, int>> budgets = {
      {"256", 256}, {"1024", 1024}, {"25%", static_cast<int>(context / 4)}};
  std::vector<MethodRun> runs;
  for (const std::string& name : o.selectors) runs.push_back({name, name, o.mdci});
  std::vector<Cell> cells;
  for (const std::string& family : families) {
    for (const auto& [label, budget] : budgets) {
      if (budget > prefill) continue;
      SelectBenchOptions fo = o;
      fo.synthetic = family;
      fo.dump_dir.clear();
      fo.budget = budget;
      std::fprintf(stderr, "baselines: family %s, budget %s (%d)\n", family.c_str(), label.c_str(),
                   budget);
      absl::StatusOr<std::vector<MethodSummary>> ms = MeasureRuns(fo, runs);
      if (!ms.ok()) {
        return absl::Status(ms.status().code(), absl::StrCat("family ", family, ", budget ", label,
                                                             ": ", ms.status().message()));
      }
      cells.push_back({family, label, budget, std::move(*ms)});
      PrintCell(cells.back());
      std::fflush(stdout);
    }
  }
  const auto means = Means(cells);
  std::vector<std::string> labels;
  for (const auto& b : budgets) labels.push_back(b.first);
  std::printf(
      "\nmean over %zu families (mass, mass / exact-token, output error, p50 us, build s)\n",
      families.size());
  std::printf("%-19s", "method");
  for (const auto& l : labels) std::printf(" | %-38s", absl::StrCat("budget ", l).c_str());
  std::printf("\n");
  for (const std::string& name : o.selectors) {
    if (!means.count(name)) continue;
    std::printf("%-19s", name.c_str());
    for (const auto& l : labels) {
      const auto it = means.at(name).find(l);
      if (it == means.at(name).end()) {
        std::printf(" | %-38s", "-");
        continue;
      }
      const Mean& e = it->second;
      std::printf(" | %.4f %.3f %.4f %8.1f %6.3f", e.mass, e.vs_tok, e.err, e.p50, e.build);
    }
    std::printf("\n");
  }
  std::printf("\n");
  for (const std::string& line : BestLines(cells)) std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  if (!o.json_path.empty()) {
    Json root = Json::object();
    Json config = Json::object();
    config["prefill_tokens"] = prefill;
    config["context_tokens"] = context;
    config["heads"] = o.heads;
    config["steps"] = o.steps;
    config["page_tokens"] = o.page_tokens.front();
    config["layer_reuse"] = o.layer_reuse;
    config["sink_tokens"] = o.sink_tokens;
    config["kv_dtype"] = std::string(DTypeName(o.kv_dtype));
    root["config"] = std::move(config);
    Json cs = Json::array();
    for (const Cell& c : cells) cs.push_back(CellJson(c));
    root["cells"] = std::move(cs);
    RETURN_IF_ERROR(WriteFile(o.json_path, DumpJson(root, 2) + "\n", "--json"));
  }
  if (!o.plot_path.empty()) {
    RETURN_IF_ERROR(WriteFile(o.plot_path, Svg(means, o.selectors, labels, o, context), "--plot"));
  }
  return absl::OkStatus();
}

}  // namespace icecache::bench
