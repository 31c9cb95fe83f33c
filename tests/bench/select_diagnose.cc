#include "tests/bench/select_diagnose.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "server/index/mdci_selector.h"
#include "server/index/owned_page_keys.h"
#include "server/index/page_select.h"
#include "tests/bench/select_matrix.h"

namespace icecache::bench {
namespace {

constexpr double kNeedShare = 0.95;  // the share of the reference the "need" columns reach

// One KV head's tree over the whole context.
struct HeadIndex {
  std::unique_ptr<OwnedPageKeys> keys;
  std::unique_ptr<MdciSelector> selector;
};

absl::StatusOr<HeadIndex> BuildHead(const SelectorConfig& config, const float* keys, int64_t n) {
  HeadIndex h;
  ASSIGN_OR_RETURN(h.keys, OwnedPageKeys::ForSelector(config));
  ASSIGN_OR_RETURN(h.selector, MdciSelector::Create(config, h.keys.get()));
  std::vector<Placement> placements;
  RETURN_IF_ERROR(h.selector->Build(keys, n, &placements));
  RETURN_IF_ERROR(h.keys->Apply(placements, keys));
  return h;
}

// The descent's parameters as MdciSelector::CollectCandidatePages sets them.
DciDescentParams DescentOf(const SelectorConfig& c, int budget, int fov, float factor) {
  DciDescentParams dp;
  dp.field_of_view = fov;
  dp.min_tokens =
      std::max<int64_t>(static_cast<int64_t>(c.mdci.min_candidate_pages) * c.page_tokens,
                        static_cast<int64_t>(std::ceil(factor * double(budget))));
  dp.cover_factor = c.mdci.cover_factor;
  dp.entry_nodes = c.mdci.entry_nodes;
  dp.spread_weight = c.mdci.spread_weight;
  dp.normalized = c.mdci.normalized_descent;
  dp.query_quotas = c.mdci.query_quotas;
  return dp;
}

// The reference of one step: per query its pages' softmax shares, the
// group's (their mean), the reference pages and the forced ones.
struct StepRef {
  std::vector<std::vector<float>> per_query;  // [j][page]
  std::vector<float> group;                   // [page]
  std::vector<uint8_t> in_ref, forced;        // [page]
  double mass = 0, free_mass = 0;             // the reference's, and without forced pages
  std::vector<double> log_norm;               // [j]: exact log-normaliser (fp32 keys)
};

// Each query's exact log-sum-exp of its scaled logits over the n keys.
std::vector<double> ExactLogNorms(const float* keys, int64_t n, const float* q, int nq, int dim) {
  std::vector<double> out(nq);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  std::vector<double> l(n);
  for (int j = 0; j < nq; ++j) {
    double m = -1e300;
    for (int64_t t = 0; t < n; ++t) {
      double dot = 0;
      for (int c = 0; c < dim; ++c) dot += double(keys[t * dim + c]) * q[j * dim + c];
      l[t] = dot * scale;
      m = std::max(m, l[t]);
    }
    double sum = 0;
    for (int64_t t = 0; t < n; ++t) sum += std::exp(l[t] - m);
    out[j] = m + std::log(sum);
  }
  return out;
}

absl::StatusOr<StepRef> Reference(const MdciSelector& sel, const float* q, int nq, int dim,
                                  const SelectParams& params) {
  StepRef r;
  r.per_query.resize(nq);
  for (int j = 0; j < nq; ++j)
    RETURN_IF_ERROR(sel.ExactPageMasses(q + j * dim, 1, &r.per_query[j]));
  const uint32_t pages = sel.num_pages();
  r.group.assign(pages, 0.0f);
  for (int j = 0; j < nq; ++j) {
    for (uint32_t p = 0; p < pages; ++p) r.group[p] += r.per_query[j][p] / nq;
  }
  const DciPageTable& pt = sel.tree().page_table();
  const std::vector<uint32_t> forced =
      ForcedPages(sel.num_tokens(), params, [&](int64_t pos) { return pt.page_of_position(pos); });
  std::vector<std::pair<float, uint32_t>> scored(pages);
  for (uint32_t p = 0; p < pages; ++p) scored[p] = {r.group[p], p};
  Selection ref;
  TakePages(sel, forced, &scored, params, &ref);
  r.in_ref.assign(pages, 0);
  r.forced.assign(pages, 0);
  for (uint32_t p : forced) r.forced[p] = 1;
  for (uint32_t p : ref.pages) {
    r.in_ref[p] = 1;
    r.mass += r.group[p];
    if (!r.forced[p]) r.free_mass += r.group[p];
  }
  return r;
}

// Mean figures of one width over heads and steps.
struct WidthTally {
  double n = 0, ratio = 0, unreached = 0, cut = 0, ranked = 0, subst = 0, worst_q = 0, best_q = 0;
  // The descent's estimate of each query's mass outside its candidates
  // against the truth (natural log): mean error and mean absolute error.
  double rest_err = 0, rest_abs = 0, rest_n = 0;
};

int EntryLevel(const DciTree& t, int entry_nodes) {
  for (int l = 1; l <= t.top_level(); ++l) {
    if (t.level_size(l) <= static_cast<uint32_t>(entry_nodes)) return l;
  }
  return t.top_level();
}

// The selection at one width against the reference, its loss split by
// where the descent dropped each missing reference page.
absl::Status TallyWidth(const MdciSelector& sel, const SelectorConfig& c, const float* q, int nq,
                        const SelectParams& params, const StepRef& r, WidthTally* w) {
  Selection out;
  RETURN_IF_ERROR(sel.Select(q, nq, params, &out));
  const DciTree& tree = sel.tree();
  const DciPageTable& pt = tree.page_table();
  DciScratch s;
  std::vector<uint32_t> nodes;
  uint64_t touched = 0;
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  tree.CollectCandidates(
      q, nq, scale,
      DescentOf(c, params.budget_tokens, params.field_of_view, params.candidate_factor), &s, &nodes,
      &touched);
  const bool two_levels = EntryLevel(tree, c.mdci.entry_nodes) >= 2;
  std::vector<uint8_t> kept2(two_levels ? tree.level_size(2) : 0, 0);
  if (two_levels) {
    for (uint32_t n : s.kept) kept2[n] = 1;
  }
  std::vector<uint8_t> taken1(tree.level_size(1), 0), chosen(sel.num_pages(), 0);
  for (uint32_t n : nodes) taken1[n] = 1;
  for (uint32_t p : out.pages) chosen[p] = 1;
  double got = 0, unreached = 0, cut = 0, ranked = 0, subst = 0;
  for (uint32_t p = 0; p < sel.num_pages(); ++p) {
    if (chosen[p]) got += r.group[p];
    if (chosen[p] && !r.in_ref[p]) subst += r.group[p];
    if (!r.in_ref[p] || chosen[p]) continue;
    const uint32_t node = pt.node_of_page(p);
    if (two_levels && !kept2[tree.node_parent(1, node)]) {
      unreached += r.group[p];
    } else if (!taken1[node]) {
      cut += r.group[p];
    } else {
      ranked += r.group[p];
    }
  }
  std::vector<uint8_t> cand(sel.num_pages(), 0);
  for (uint32_t n : nodes) {
    for (uint32_t p = pt.first_page(n); p != DciPageTable::kNone; p = pt.next_page(p)) cand[p] = 1;
  }
  for (int j = 0; j < nq && !r.log_norm.empty(); ++j) {
    double in_cand = 0;
    for (uint32_t p = 0; p < sel.num_pages(); ++p) in_cand += cand[p] ? r.per_query[j][p] : 0.0;
    const double out_share = std::max(1e-12, 1.0 - in_cand);
    double rest = s.rest[j];
    if (c.mdci.calibrated_rest && in_cand > 0 && std::isfinite(s.taken_est[j])) {
      rest += r.log_norm[j] + std::log(in_cand) - s.taken_est[j];  // as MdciSelector::CalibrateRest
    }
    const double e = rest - (r.log_norm[j] + std::log(out_share));
    w->rest_err += e;
    w->rest_abs += std::fabs(e);
    w->rest_n += 1;
  }
  double worst = 1e9, best = -1e9;
  for (int j = 0; j < nq; ++j) {
    double a = 0, b = 0;
    for (uint32_t p = 0; p < sel.num_pages(); ++p) {
      if (chosen[p]) a += r.per_query[j][p];
      if (r.in_ref[p]) b += r.per_query[j][p];
    }
    const double ratio = b > 0 ? a / b : 1.0;
    worst = std::min(worst, ratio);
    best = std::max(best, ratio);
  }
  const double m = r.mass > 0 ? r.mass : 1.0;
  w->n += 1;
  w->ratio += got / m;
  w->unreached += unreached / m;
  w->cut += cut / m;
  w->ranked += ranked / m;
  w->subst += subst / m;
  w->worst_q += worst;
  w->best_q += best;
  return absl::OkStatus();
}

// Reference mass (forced pages left out) under each level-1 node.
std::vector<double> NodeRefMass(const MdciSelector& sel, const StepRef& r) {
  const DciPageTable& pt = sel.tree().page_table();
  std::vector<double> m(sel.tree().level_size(1), 0.0);
  for (uint32_t p = 0; p < sel.num_pages(); ++p) {
    if (r.in_ref[p] && !r.forced[p]) m[pt.node_of_page(p)] += r.group[p];
  }
  return m;
}

// The width the tree's ranking needs for kNeedShare of the reference (forced
// pages aside): level-2 nodes kept in its order (level 2 being the last
// upper level), and level-1 tokens in its order over every node.
void Need(const MdciSelector& sel, const SelectorConfig& c, const float* q, int nq, int budget,
          const StepRef& r, double* need_l2, double* need_cf) {
  const DciTree& tree = sel.tree();
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  const std::vector<double> node_mass = NodeRefMass(sel, r);
  const double want = kNeedShare * r.free_mass;
  DciScratch s;
  std::vector<uint32_t> nodes;
  uint64_t touched = 0;
  // Level 1 over every node: all upper nodes kept, every token wanted.
  DciDescentParams all = DescentOf(c, budget, 1 << 30, 1.0f);
  all.min_tokens = tree.num_tokens();
  tree.CollectCandidates(q, nq, scale, all, &s, &nodes, &touched);
  double mass = 0, tokens = 0;
  for (uint32_t n : nodes) {
    if (mass >= want) break;
    mass += node_mass[n];
    tokens += tree.page_table().node_tokens(n);
  }
  *need_cf = tokens / budget;
  *need_l2 = std::numeric_limits<double>::quiet_NaN();
  if (EntryLevel(tree, c.mdci.entry_nodes) < 2) return;
  std::vector<double> l2_mass(tree.level_size(2), 0.0);
  for (uint32_t n = 0; n < tree.level_size(1); ++n) l2_mass[tree.node_parent(1, n)] += node_mass[n];
  // The kept set at field of view k is the head of one ranking: search k.
  uint32_t lo = 1, hi = tree.level_size(2);
  while (lo < hi) {
    const uint32_t k = (lo + hi) / 2;
    DciDescentParams dp = DescentOf(c, budget, static_cast<int>(k), 1.0f);
    dp.min_tokens = 1;
    tree.CollectCandidates(q, nq, scale, dp, &s, &nodes, &touched);
    double m = 0;
    for (uint32_t n : s.kept) m += l2_mass[n];
    if (m >= want) {
      hi = k;
    } else {
      lo = k + 1;
    }
  }
  *need_l2 = lo;
}

absl::Status DiagnoseFamily(const SelectBenchOptions& o, const std::string& family,
                            const std::vector<WidthSpec>& widths) {
  ASSIGN_OR_RETURN(SyntheticConfig cfg, SyntheticPreset(family));
  const int group = cfg.kv_heads > 0 ? std::max(1, cfg.q_heads / cfg.kv_heads) : 1;
  const int nq = o.queries_per_step > 0 ? o.queries_per_step : group;
  cfg.layers = 1;
  cfg.kv_heads = o.heads;
  cfg.q_heads = o.heads * nq;
  cfg.steps = o.steps;
  cfg.tokens = (o.tokens > 0 ? o.tokens : 16384) + o.steps + o.chunk_tokens;
  if (o.seed != 0) cfg.seed = o.seed;
  ASSIGN_OR_RETURN(KvDump d, GenerateSynthetic(cfg));
  SelectorConfig c;
  c.kind = SelectorKind::kMdci;
  c.head_dim = d.head_dim;
  c.dtype = o.kv_dtype;
  c.page_tokens = o.page_tokens.front();
  c.num_query_heads = nq;
  c.mdci = o.mdci;
  SelectParams base;
  base.budget_tokens = o.budget;
  base.sink_tokens = o.sink_tokens;
  std::vector<WidthTally> tally(widths.size());
  for (int h = 0; h < d.kv_heads; ++h) {
    ASSIGN_OR_RETURN(HeadIndex idx, BuildHead(c, d.key(0, h), d.tokens));
    double l2 = 0, l2_max = 0, cf = 0, cf_max = 0;
    for (int step = 0; step < d.steps; ++step) {
      const float* q = d.query(step, 0, h);
      ASSIGN_OR_RETURN(StepRef r, Reference(*idx.selector, q, nq, d.head_dim, base));
      r.log_norm = ExactLogNorms(d.key(0, h), d.tokens, q, nq, d.head_dim);
      for (size_t i = 0; i < widths.size(); ++i) {
        SelectParams p = base;
        p.field_of_view = widths[i].field_of_view;
        p.candidate_factor = widths[i].candidate_factor;
        RETURN_IF_ERROR(TallyWidth(*idx.selector, c, q, nq, p, r, &tally[i]));
      }
      double need_l2 = 0, need_cf = 0;
      Need(*idx.selector, c, q, nq, o.budget, r, &need_l2, &need_cf);
      l2 += need_l2;
      l2_max = std::max(l2_max, need_l2);
      cf += need_cf;
      cf_max = std::max(cf_max, need_cf);
    }
    std::printf(
        "%-19s head %d need (%.2f of the reference): level-2 nodes %.0f (max %.0f) of %u, "
        "level-1 candidates %.1f x budget (max %.1f)\n",
        family.c_str(), h, kNeedShare, l2 / d.steps, l2_max, idx.selector->tree().level_size(2),
        cf / d.steps, cf_max);
  }
  for (size_t i = 0; i < widths.size(); ++i) {
    const WidthTally& t = tally[i];
    std::printf(
        "%-19s %9s  ratio %.3f  missing: unreached %.3f cut %.3f ranked %.3f  "
        "substituted %.3f  query ratio worst %.3f best %.3f  rest log-error mean %+.2f "
        "abs %.2f\n",
        family.c_str(), widths[i].label.c_str(), t.ratio / t.n, t.unreached / t.n, t.cut / t.n,
        t.ranked / t.n, t.subst / t.n, t.worst_q / t.n, t.best_q / t.n, t.rest_err / t.rest_n,
        t.rest_abs / t.rest_n);
  }
  std::fflush(stdout);
  return absl::OkStatus();
}

}  // namespace

absl::Status RunSelectDiagnose(const SelectBenchOptions& o) {
  std::vector<std::string> families = o.families.empty() ? SyntheticFamilyNames() : o.families;
  std::vector<WidthSpec> widths;
  for (const std::string& s : o.widths) {
    ASSIGN_OR_RETURN(WidthSpec w, ParseWidth(s));
    if (w.exhaustive) continue;  // nothing to diagnose: the reference itself
    widths.push_back(w);
  }
  if (widths.empty()) {
    WidthSpec w;
    w.label = absl::StrFormat("%dx%g", o.mdci.field_of_view, o.mdci.candidate_factor);
    w.field_of_view = o.mdci.field_of_view;
    w.candidate_factor = o.mdci.candidate_factor;
    widths.push_back(w);
  }
  for (const std::string& f : families) RETURN_IF_ERROR(DiagnoseFamily(o, f, widths));
  return absl::OkStatus();
}

}  // namespace icecache::bench
