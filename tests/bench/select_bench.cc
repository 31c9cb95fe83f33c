#include "tests/bench/select_bench.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/json.h"
#include "common/kv_dump.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "common/thread_cpu.h"
#include "server/index/kernels.h"
#include "server/index/owned_page_keys.h"
#include "server/index/pq_sketch.h"
#include "server/index/quality.h"
#include "server/index/selector.h"
#include "server/index/width_calibrator.h"
#include "tests/bench/bench_format.h"
#include "tests/bench/machine_info.h"
#include "tests/bench/peers.h"
#include "tests/bench/select_baselines_table.h"
#include "tests/bench/select_diagnose.h"
#include "tests/bench/select_methods.h"

namespace icecache::bench {

const std::vector<std::string>& AllMethodNames() {
  static const auto* names = new std::vector<std::string>{"mdci",           "exact",
                                                          "exact-mdci",     "exact-token",
                                                          "quest",          "streaming",
                                                          "faiss-flat",     "faiss-hnsw",
                                                          "faiss-ivf",      "faiss-ivfpq",
                                                          "hnswlib",        "arkvale",
                                                          "pqcache",        "snapkv",
                                                          "omnikv",         "magicpig",
                                                          "mdci-published", "pqcache@tok",
                                                          "snapkv@tok",     "omnikv@tok",
                                                          "magicpig@tok",   "mdci-published@tok",
                                                          "magicpig-est"};
  return *names;
}

namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

constexpr int kInsertChunk = 16;
constexpr int kSessionSteps = 1000;
constexpr int64_t kDefaultSyntheticTokens = 16384;

// ---------------------------------------------------------------------------
// The workload: KV data split into prefill, 1-token decode inserts and chunk
// inserts; trees are (layer group, KV head).

struct Tree {
  int group = 0;
  int head = 0;
};

struct Workload {
  KvDump dump;
  int64_t prefill = 0;
  int64_t decode_tokens = 0;
  int64_t chunk_tokens = 0;
  int64_t context = 0;  // prefill + decode + chunk
  int groups = 0;
  int layer_reuse = 1;
  int queries = 1;  // G used per KV head
  int steps = 0;
  std::vector<Tree> trees;
  std::string source;

  int first_layer(int group) const { return group * layer_reuse; }
};

absl::StatusOr<Workload> LoadWorkload(const SelectBenchOptions& o) {
  Workload w;
  w.layer_reuse = o.layer_reuse;
  if (!o.synthetic.empty()) {
    ASSIGN_OR_RETURN(SyntheticConfig cfg, SyntheticPreset(o.synthetic));
    const int group = cfg.kv_heads > 0 ? std::max(1, cfg.q_heads / cfg.kv_heads) : 1;
    const int q = o.queries_per_step > 0 ? o.queries_per_step : group;
    cfg.layers = o.layer_reuse;
    cfg.kv_heads = o.heads;
    cfg.q_heads = o.heads * q;
    cfg.steps = o.steps;
    const int64_t prefill = o.tokens > 0 ? o.tokens : kDefaultSyntheticTokens;
    cfg.tokens = prefill + o.steps + o.chunk_tokens;
    if (o.seed != 0) cfg.seed = o.seed;
    ASSIGN_OR_RETURN(w.dump, GenerateSynthetic(cfg));
    w.prefill = prefill;
    w.decode_tokens = o.steps;
    w.chunk_tokens = o.chunk_tokens;
    w.source = absl::StrCat("synthetic:", o.synthetic);
  } else {
    // The whole dump unless --tokens caps it.
    ASSIGN_OR_RETURN(w.dump, ReadKvDump(o.dump_dir, o.tokens > 0 ? o.tokens : -1));
    const int64_t n = w.dump.tokens;
    // Keep at least 3/4 of the context as prefill.
    w.decode_tokens = std::min<int64_t>(w.dump.steps, n / 8);
    w.chunk_tokens = std::min<int64_t>(o.chunk_tokens, n / 8) / kInsertChunk * kInsertChunk;
    w.prefill = n - w.decode_tokens - w.chunk_tokens;
    w.source = absl::StrCat("dump:", o.dump_dir);
    if (o.queries_per_step > w.dump.group_size()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("--queries-per-step %d exceeds the dump's group size %d",
                          o.queries_per_step, w.dump.group_size()));
    }
  }
  const KvDump& d = w.dump;
  if (d.group_size() < 1) return absl::InvalidArgumentError("data has no query heads per KV head");
  w.queries =
      o.queries_per_step > 0 ? std::min(o.queries_per_step, d.group_size()) : d.group_size();
  if (d.layers % o.layer_reuse != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--layer-reuse %d does not divide the %d layers of the data", o.layer_reuse, d.layers));
  }
  w.groups = d.layers / o.layer_reuse;
  w.steps = d.steps;
  w.context = w.prefill + w.decode_tokens + w.chunk_tokens;
  if (w.context != d.tokens) return absl::InternalError("workload split does not cover the data");
  if (w.steps < 1) return absl::InvalidArgumentError("data has no query steps");
  if (o.budget > w.prefill) {
    return absl::InvalidArgumentError(
        absl::StrFormat("--budget %d exceeds the %d prefill tokens", o.budget, w.prefill));
  }
  for (int g = 0; g < w.groups; ++g) {
    for (int h = 0; h < d.kv_heads; ++h) w.trees.push_back({g, h});
  }
  return w;
}

// ---------------------------------------------------------------------------
// Exact references: for each (step, layer, head) the exact attention of the
// G queries over the full context, computed once and shared by every method.

class ExactRefs {
 public:
  ExactRefs(const Workload& w, int budget) : w_(w), budget_(budget) {}

  // Quality of `positions` for tree t at step s: averaged over the G queries
  // (inside quality.h) and over the layers of the group.
  absl::StatusOr<QualityReport> Evaluate(int step, const Tree& t,
                                         const std::vector<int32_t>& positions) {
    QualityReport sum{};
    for (int l = 0; l < w_.layer_reuse; ++l) {
      const int layer = w_.first_layer(t.group) + l;
      ASSIGN_OR_RETURN(const ExactAttention* ref, Get(step, layer, t.head));
      ASSIGN_OR_RETURN(QualityReport r,
                       EvaluatePositions(*ref, w_.dump.value(layer, t.head), positions, budget_));
      sum.topk_recall += r.topk_recall;
      sum.mass_recall += r.mass_recall;
      sum.output_rel_error += r.output_rel_error;
    }
    sum.topk_recall /= w_.layer_reuse;
    sum.mass_recall /= w_.layer_reuse;
    sum.output_rel_error /= w_.layer_reuse;
    return sum;
  }

  // Attention-mass recall alone of `positions` (as Evaluate's, cheaper).
  absl::StatusOr<double> Mass(int step, const Tree& t, const std::vector<int32_t>& positions) {
    double sum = 0;
    for (int l = 0; l < w_.layer_reuse; ++l) {
      ASSIGN_OR_RETURN(const ExactAttention* ref, Get(step, w_.first_layer(t.group) + l, t.head));
      ASSIGN_OR_RETURN(double m, MassRecall(*ref, positions));
      sum += m;
    }
    return sum / w_.layer_reuse;
  }

  // Relative error of an estimate of the G outputs (G x head_dim) against
  // the exact outputs of the group's first layer, averaged over the queries.
  absl::StatusOr<double> EstimateError(int step, const Tree& t, const std::vector<float>& est) {
    ASSIGN_OR_RETURN(const ExactAttention* ref, Get(step, w_.first_layer(t.group), t.head));
    const int dim = w_.dump.head_dim;
    double sum = 0;
    for (int j = 0; j < ref->num_queries; ++j) {
      double err = 0, norm = 0;
      for (int c = 0; c < dim; ++c) {
        const double o = ref->output[static_cast<size_t>(j) * dim + c];
        err += (est[static_cast<size_t>(j) * dim + c] - o) *
               (est[static_cast<size_t>(j) * dim + c] - o);
        norm += o * o;
      }
      sum += norm > 0 ? std::sqrt(err / norm) : std::sqrt(err);
    }
    return sum / ref->num_queries;
  }

  // Mass of the page oracle (quality.h's OraclePages: the best whole pages
  // by their true mass for the group) on `selector`'s layout, averaged over
  // the layers of the group.
  absl::StatusOr<double> OracleMass(int step, const Tree& t, const Selector& selector,
                                    const SelectParams& params) {
    double sum = 0;
    for (int l = 0; l < w_.layer_reuse; ++l) {
      const int layer = w_.first_layer(t.group) + l;
      ASSIGN_OR_RETURN(const ExactAttention* ref, Get(step, layer, t.head));
      ASSIGN_OR_RETURN(Selection sel, OraclePages(*ref, selector, params));
      ASSIGN_OR_RETURN(std::vector<int32_t> pos, SelectionPositions(selector, sel));
      ASSIGN_OR_RETURN(double m, MassRecall(*ref, pos));
      sum += m;
    }
    return sum / w_.layer_reuse;
  }

 private:
  absl::StatusOr<const ExactAttention*> Get(int step, int layer, int head) {
    const int64_t key =
        (static_cast<int64_t>(step) * w_.dump.layers + layer) * w_.dump.kv_heads + head;
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second.get();
    const KvDump& d = w_.dump;
    ASSIGN_OR_RETURN(ExactAttention ref,
                     ComputeExactAttention(d.key(layer, head), d.value(layer, head), w_.context,
                                           d.head_dim, d.query(step, layer, head), w_.queries));
    auto [pos, inserted] = cache_.emplace(key, std::make_unique<ExactAttention>(std::move(ref)));
    return pos->second.get();
  }

  const Workload& w_;
  int budget_;
  std::map<int64_t, std::unique_ptr<ExactAttention>> cache_;
};

// ---------------------------------------------------------------------------
// Methods: one instance indexes one tree.

// A library selector over frames held by OwnedPageKeys.
class SelectorMethod : public TreeMethod {
 public:
  static absl::StatusOr<std::unique_ptr<TreeMethod>> Create(const SelectorConfig& config,
                                                            const SelectParams& params) {
    auto m = std::unique_ptr<SelectorMethod>(new SelectorMethod(params));
    ASSIGN_OR_RETURN(m->keys_, OwnedPageKeys::ForSelector(config));
    ASSIGN_OR_RETURN(m->selector_, Selector::Create(config, m->keys_.get()));
    return std::unique_ptr<TreeMethod>(std::move(m));
  }
  absl::Status Build(const float* keys, int64_t n) override {
    RETURN_IF_ERROR(selector_->Build(keys, n, &placements_));
    return keys_->Apply(placements_, keys);
  }
  absl::Status Insert(const float* keys, int64_t n) override {
    RETURN_IF_ERROR(selector_->Insert(keys, n, &placements_));
    return keys_->Apply(placements_, keys);
  }
  absl::Status Select(const float* queries, int nq, const SweepPoint&, Selection* sel) override {
    if (calibrator_ == nullptr) {
      SelectParams params = params_;
      if (params.carry_steps > 0) params.carry = &carry_;
      return selector_->Select(queries, nq, params, sel);
    }
    return CalibratedSelect(queries, nq, sel);
  }
  bool Calibration(CalibratorReport* report, CalibrationTimes* times) const override {
    if (calibrator_ == nullptr) return false;
    *report = calibrator_->report();
    *times = times_;
    return true;
  }
  absl::Status Calibrate(const CalibratorOptions& o) {
    ASSIGN_OR_RETURN(calibrator_, WidthCalibrator::Create(o, selector_->config().mdci.field_of_view,
                                                          selector_->config().mdci.candidate_factor,
                                                          selector_->config().mdci.pq_factor));
    warmup_samples_ = o.warmup_samples;
    return absl::OkStatus();
  }
  std::string Summary() const override {
    if (calibrator_ == nullptr) return "";
    const CalibratorReport r = calibrator_->report();
    const double steady =
        times_.steady_select_s > 0 ? times_.steady_sample_s / times_.steady_select_s : 0.0;
    return absl::StrFormat(
        "calibrated: %s, %s ranking (%lld switches, gain of the other %+.4f), width %.2f (%s), "
        "%s%lld changes, %lld "
        "fallbacks, %lld of %lld selections exact, sampled mass ratio %.4f (last %.4f), page "
        "recall %.3f, %lld sampled, %.2f s sampling; steady: 1 in %lld, %.1f%% over %lld steps; "
        "thread CPU: tree %.0f us at this width (fresh %.0f), exact %.0f us%s",
        r.mode == SelectMode::kExact ? "EXACT" : std::string(SearchMethodName(r.method)).c_str(),
        std::string(DescentRankingName(r.ranking)).c_str(),
        static_cast<long long>(r.ranking_switches), r.trial_gain, r.width,
        r.pq_factor > 0
            ? absl::StrFormat("pq factor %.1f", r.pq_factor)
            : absl::StrFormat("fov %d, candidate factor %.1f", r.field_of_view, r.candidate_factor),
        r.other_width > 0
            ? absl::StrFormat("method duel %lld trials, %lld won%s, other width %.2f at %.0f us "
                              "(fresh %.0f), ",
                              static_cast<long long>(r.method_trials),
                              static_cast<long long>(r.method_switches),
                              r.method_trial ? " (on trial now)" : "", r.other_width,
                              r.other_cost_ns / 1e3, r.other_fresh_cost_ns / 1e3)
            : std::string(),
        static_cast<long long>(r.changes), static_cast<long long>(r.fallbacks),
        static_cast<long long>(r.exact_steps), static_cast<long long>(r.steps), r.mean_ratio,
        r.last_ratio, r.mean_topk_recall, static_cast<long long>(r.samples), times_.sample_s,
        static_cast<long long>(r.sample_interval), 100 * steady,
        static_cast<long long>(times_.steady_steps), r.tree_cost_ns / 1e3, r.fresh_cost_ns / 1e3,
        r.exact_cost_ns / 1e3,
        params_.carry_steps > 0
            ? absl::StrFormat(
                  "; carry %d (%lld shortened, %lld stops; carried %.3f over %lld, fresh %.3f "
                  "over %lld)",
                  r.carry_steps, static_cast<long long>(r.carry_shortened),
                  static_cast<long long>(r.carry_stops), r.carry_mean,
                  static_cast<long long>(r.carry_samples), r.fresh_mean,
                  static_cast<long long>(r.fresh_samples))
            : std::string());
  }
  void Positions(const Selection& sel, std::vector<int32_t>* out) const override {
    out->clear();
    if (!sel.token_refs.empty()) {  // token granularity: the tokens themselves
      out->assign(sel.positions.begin(), sel.positions.end());
      return;
    }
    for (uint32_t page : sel.pages) {
      const int32_t* p = selector_->positions(page);
      out->insert(out->end(), p, p + selector_->fill(page));
    }
  }
  size_t index_bytes() const override { return selector_->index_bytes(); }
  const Selector* selector() const override { return selector_.get(); }
  double layout_fill() const override {
    const uint32_t pages = selector_->num_pages();
    return pages == 0 ? 0.0
                      : static_cast<double>(selector_->num_tokens()) /
                            (static_cast<double>(pages) * selector_->config().page_tokens);
  }

 private:
  explicit SelectorMethod(const SelectParams& params) : params_(params) {}
  // Self-calibrated mdci, as the daemon does it (Session::SelectHead): the
  // calibrated width or exact fallback, the selection's thread CPU time to
  // the calibrator, and on a due step the exact reference, timed the same
  // way. The reference is part of the timed call (its average cost is the
  // calibration's overhead).
  absl::Status CalibratedSelect(const float* queries, int nq, Selection* sel) {
    const bool warm = calibrator_->report().samples >= warmup_samples_;
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t cpu0 = ThreadCpuNanos();
    SelectParams params = params_;
    calibrator_->Apply(&params);
    if (params.carry_steps > 0) params.carry = &carry_;
    RETURN_IF_ERROR(selector_->Select(queries, nq, params, sel));
    const int64_t cpu1 = ThreadCpuNanos();
    const auto t1 = std::chrono::steady_clock::now();
    const double select_s = std::chrono::duration<double>(t1 - t0).count();
    times_.select_s += select_s;
    times_.select_cpu_s += static_cast<double>(cpu1 - cpu0) * 1e-9;
    if (warm) {
      times_.steady_select_s += select_s;
      ++times_.steady_steps;
    }
    // Upkeep (a query basis installed) is the index's, not this width's cost.
    const int64_t cost = std::max<int64_t>(0, cpu1 - cpu0 - sel->upkeep_cpu_ns);
    if (!calibrator_->ShouldSample(params, cost, sel->carry_age)) return absl::OkStatus();
    calibrator_->Taken();
    // The ranking trial's selection (as MeasureProbe): untimed, not part of
    // the reference's cost.
    Selection trial;
    const std::optional<DescentRanking> trial_ranking = calibrator_->TrialRanking();
    if (trial_ranking.has_value()) {
      SelectParams tp = params;
      tp.carry = nullptr;  // the trial selects afresh
      tp.ranking = *trial_ranking;
      RETURN_IF_ERROR(selector_->Select(queries, nq, tp, &trial));
    }
    const int64_t cpu2 = ThreadCpuNanos();
    // The method duel's shadow trial (as MeasureProbe): timed as a
    // selection, part of the sampling cost.
    Selection shadow;
    SelectParams sp = params;
    sp.carry = nullptr;
    const bool shadowed = calibrator_->ShadowParams(&sp);
    if (shadowed) RETURN_IF_ERROR(selector_->Select(queries, nq, sp, &shadow));
    const int64_t cpu3 = ThreadCpuNanos();
    times_.sample_cpu_s += static_cast<double>(cpu3 - cpu1) * 1e-9;
    ASSIGN_OR_RETURN(
        QualitySample q,
        MeasureSelectionPair(static_cast<const MdciSelector&>(*selector_), queries, nq, params,
                             *sel, trial_ranking.has_value() ? &trial : nullptr,
                             shadowed ? &shadow : nullptr));
    q.reference_ns = ThreadCpuNanos() - cpu3;
    q.carried = sel->carried;
    q.carry_age = sel->carry_age;
    q.trial_ns = cpu2 - cpu1;
    q.method_ns = shadowed ? cpu3 - cpu2 : 0;
    times_.sample_cpu_s += static_cast<double>(q.reference_ns) * 1e-9;
    calibrator_->Observe(q);
    const double sample_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
    times_.sample_s += sample_s;
    if (warm) times_.steady_sample_s += sample_s;
    return absl::OkStatus();
  }

  SelectParams params_;
  CandidateCarry carry_;  // params_.carry_steps > 0: this tree's carried candidates
  std::unique_ptr<WidthCalibrator> calibrator_;
  int warmup_samples_ = 0;
  CalibrationTimes times_;
  std::unique_ptr<OwnedPageKeys> keys_;
  std::unique_ptr<Selector> selector_;
  std::vector<Placement> placements_;
};

// The exact-token oracle (quality.h's OracleTokens), token-level: its query
// time is the reference computation (fp32 logits, double softmax over all
// keys), not an optimised scan.
class ExactTokenMethod : public TreeMethod {
 public:
  ExactTokenMethod(int dim, const SelectParams& params) : dim_(dim), params_(params) {}
  // The keys stay in the workload (fp32, positional); the method only counts.
  absl::Status Build(const float* keys, int64_t n) override {
    keys_ = keys;
    n_ = n;
    return absl::OkStatus();
  }
  absl::Status Insert(const float* keys, int64_t n) override {
    if (keys != keys_ + n_ * dim_) {
      return absl::InternalError("exact-token: inserts must continue the built keys");
    }
    n_ += n;
    return absl::OkStatus();
  }
  absl::Status Select(const float* queries, int nq, const SweepPoint&, Selection* sel) override {
    sel->Clear();
    ASSIGN_OR_RETURN(ExactAttention ex,
                     ComputeExactAttention(keys_, nullptr, n_, dim_, queries, nq));
    ASSIGN_OR_RETURN(sel->positions, OracleTokens(ex, params_.budget_tokens, params_.sink_tokens));
    sel->keys_touched = static_cast<uint64_t>(n_);
    return absl::OkStatus();
  }
  void Positions(const Selection& sel, std::vector<int32_t>* out) const override {
    *out = sel.positions;
  }
  size_t index_bytes() const override { return 0; }
  double layout_fill() const override { return std::numeric_limits<double>::quiet_NaN(); }

 private:
  int dim_;
  SelectParams params_;
  const float* keys_ = nullptr;
  int64_t n_ = 0;
};

// A token-level peer whose hits are rounded up to positional pages.
class PeerMethod : public TreeMethod {
 public:
  PeerMethod(std::unique_ptr<TokenIndex> index, const SelectParams& params)
      : index_(std::move(index)), params_(params) {}
  void set_page_tokens(int p) { page_tokens_ = p; }
  const TokenIndex& index() const { return *index_; }

  absl::Status Build(const float* keys, int64_t n) override { return index_->Build(keys, n); }
  absl::Status Insert(const float* keys, int64_t n) override { return index_->Add(keys, n); }

  absl::Status Select(const float* queries, int nq, const SweepPoint& sp, Selection* sel) override {
    sel->Clear();
    const int64_t n = index_->size();
    hits_.resize(nq);
    uint64_t touched = 0;
    size_t longest = 0;
    for (int j = 0; j < nq; ++j) {
      RETURN_IF_ERROR(index_->Search(queries + static_cast<size_t>(j) * dim_, sp.k, sp.knob,
                                     &hits_[j], &touched));
      longest = std::max(longest, hits_[j].size());
    }
    const int64_t num_pages = (n + page_tokens_ - 1) / page_tokens_;
    if (static_cast<int64_t>(seen_.size()) < num_pages) seen_.resize(num_pages, 0);
    int64_t taken = 0;
    auto take = [&](int64_t page) {
      if (seen_[page]) return;
      seen_[page] = 1;
      const int64_t fill = std::min<int64_t>(page_tokens_, n - page * page_tokens_);
      sel->pages.push_back(static_cast<uint32_t>(page));
      sel->fills.push_back(static_cast<uint32_t>(fill));
      taken += fill;
    };
    // Sinks first, always.
    for (int64_t p = 0; p < std::min<int64_t>(params_.sink_tokens, n); ++p) take(p / page_tokens_);
    // Then pages in the order of their best hit (rank-major over the G
    // queries), until the budget is filled.
    for (size_t r = 0; r < longest && taken < params_.budget_tokens; ++r) {
      for (int j = 0; j < nq && taken < params_.budget_tokens; ++j) {
        if (r < hits_[j].size()) take(hits_[j][r] / page_tokens_);
      }
    }
    for (uint32_t p : sel->pages) seen_[p] = 0;
    sel->keys_touched = touched;
    return absl::OkStatus();
  }
  void Positions(const Selection& sel, std::vector<int32_t>* out) const override {
    out->clear();
    for (size_t i = 0; i < sel.pages.size(); ++i) {
      const int32_t base = static_cast<int32_t>(sel.pages[i]) * page_tokens_;
      for (uint32_t s = 0; s < sel.fills[i]; ++s) out->push_back(base + static_cast<int32_t>(s));
    }
  }
  size_t index_bytes() const override { return index_->index_bytes(); }
  double layout_fill() const override {
    const int64_t n = index_->size();
    const int64_t pages = (n + page_tokens_ - 1) / page_tokens_;
    return pages == 0 ? 0.0 : static_cast<double>(n) / (static_cast<double>(pages) * page_tokens_);
  }
  void set_dim(int d) { dim_ = d; }

 private:
  std::unique_ptr<TokenIndex> index_;
  SelectParams params_;
  int page_tokens_ = 16;
  int dim_ = 0;
  std::vector<std::vector<int64_t>> hits_;
  std::vector<uint8_t> seen_;
};

bool IsPeer(const std::string& name) { return name.rfind("faiss-", 0) == 0 || name == "hnswlib"; }
// "mdci/token": a page selector at token granularity (--granularity token).
constexpr std::string_view kTokenSuffix = "/token";
bool IsTokenGranular(const std::string& name) {
  return name.size() > kTokenSuffix.size() &&
         name.compare(name.size() - kTokenSuffix.size(), kTokenSuffix.size(), kTokenSuffix) == 0;
}

bool IsTokenLevel(const std::string& name) {
  return IsPeer(name) || name == "exact-token" || IsBaselineView(name);
}

absl::StatusOr<PeerKind> PeerKindOf(const std::string& name) {
  for (PeerKind k : {PeerKind::kFaissFlat, PeerKind::kFaissHnsw, PeerKind::kFaissIvf,
                     PeerKind::kFaissIvfPq, PeerKind::kHnswlib}) {
    if (PeerName(k) == name) return k;
  }
  return absl::InvalidArgumentError(absl::StrFormat("'%s' is not a peer", name));
}

absl::StatusOr<std::unique_ptr<TreeMethod>> MakeMethod(const std::string& name, int page_tokens,
                                                       const Workload& w,
                                                       const SelectBenchOptions& o) {
  SelectParams params;
  params.budget_tokens = o.budget;
  params.sink_tokens = o.sink_tokens;
  const int dim = w.dump.head_dim;
  if (name == "exact-token") {
    return std::unique_ptr<TreeMethod>(new ExactTokenMethod(dim, params));
  }
  if (IsPeer(name)) {
    ASSIGN_OR_RETURN(PeerKind kind, PeerKindOf(name));
    ASSIGN_OR_RETURN(auto index, TokenIndex::Create(kind, dim, w.context, o.peer));
    auto m = std::make_unique<PeerMethod>(std::move(index), params);
    m->set_page_tokens(page_tokens);
    m->set_dim(dim);
    return std::unique_ptr<TreeMethod>(std::move(m));
  }
  SelectorConfig config;
  config.baseline = o.baseline;
  std::string kind_name = name;
  if (IsTokenGranular(name)) {
    kind_name = name.substr(0, name.size() - kTokenSuffix.size());
    params.granularity = Granularity::kToken;
    params.want_positions = true;
  }
  if (!IsBaselineView(name)) {
    ASSIGN_OR_RETURN(config.kind, ParseSelectorKind(kind_name));
  }
  config.head_dim = dim;
  config.dtype = o.kv_dtype;
  config.page_tokens = page_tokens;
  config.num_query_heads = w.queries;
  config.mdci = o.mdci;
  config.quest_rescore_factor = o.quest_rescore_factor;
  if (IsBaselineView(name)) return MakeBaselineView(name, config, params);
  if (config.kind == SelectorKind::kMdci) params.carry_steps = o.mdci_carry;
  ASSIGN_OR_RETURN(auto method, SelectorMethod::Create(config, params));
  if (config.kind == SelectorKind::kMdci && o.mdci_target_mass > 0) {
    CalibratorOptions co;
    co.target_ratio = o.mdci_target_mass;
    co.sample_every = o.calibrate_every;
    co.warmup_samples = o.calibrate_warmup;
    co.max_sample_every = o.calibrate_max_every;
    co.sample_share = o.calibrate_share;
    co.confidence_z = o.calibrate_confidence_z;
    co.min_width = o.calibrate_min_width;
    co.carry_confidence_z = o.calibrate_carry_z;
    co.confirm_every = o.calibrate_confirm_every;
    co.max_increase = std::max(co.increase, o.calibrate_max_increase);
    co.warmup_every = o.calibrate_warmup_every;
    co.start_width = std::max(co.start_width, co.min_width);
    co.ranking_trial_samples = o.calibrate_ranking_trial;
    co.method_duel = o.calibrate_method_duel;
    co.duel_fresh_costs = o.calibrate_duel_fresh;
    co.exact_cost_ratio = o.calibrate_exact_cost_ratio;
    co.carry_steps = o.mdci_carry;  // judged per head (Apply sets params.carry_steps)
    co.base_ranking =
        o.mdci.normalized_descent ? DescentRanking::kNormalized : DescentRanking::kLoudest;
    RETURN_IF_ERROR(static_cast<SelectorMethod*>(method.get())->Calibrate(co));
  }
  return method;
}

// ---------------------------------------------------------------------------
// Measurement.

struct PointStats {
  SweepPoint point;
  std::vector<double> query_us;  // wall time per select call
  std::vector<double> cpu_us;    // the same calls' thread CPU time
  double topk = 0, mass = 0, err = 0, touched = 0, selected_fill = 0;
  double oracle_mass = std::numeric_limits<double>::quiet_NaN();  // page oracle on the layout
  // Per (step, tree), step-major: the page oracle's mass (for the replay).
  std::vector<double> oracle_by_step;
  int64_t count = 0;

  static double Quantile(const std::vector<double>& x, double q) {
    if (x.empty()) return std::numeric_limits<double>::quiet_NaN();
    std::vector<double> v = x;
    const size_t idx = std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5));
    std::nth_element(v.begin(), v.begin() + idx, v.end());
    return v[idx];
  }
  static double Mean(const std::vector<double>& x) {
    double s = 0;
    for (double v : x) s += v;
    return x.empty() ? 0 : s / x.size();
  }
  double p(double q) const { return Quantile(query_us, q); }
  double mean_us() const { return Mean(query_us); }
};

struct MethodResult {
  std::string name;
  CalibrationSummary calibration;
  int page_tokens = 0;
  double build_s = 0;       // mean per tree
  double build_wall_s = 0;  // all trees, with --threads
  double insert1_tps = 0;   // 1-token inserts
  double insert16_tps = 0;  // 16-token chunks
  double index_bytes_per_token = 0;
  double page_fill = 0;
  std::vector<PointStats> sweep;
  size_t chosen = 0;
  std::string knob_name;

  const PointStats& best() const { return sweep[chosen]; }
  double SessionCost(const PointStats& pt) const {
    const double insert_s = std::isfinite(insert1_tps) && insert1_tps > 0 ? 1.0 / insert1_tps : 0;
    return build_s + kSessionSteps * (insert_s + pt.mean_us() * 1e-6);
  }
};

// Runs `fn(i)` for i in [0, n) on `threads` threads; returns the first error.
absl::Status ParallelFor(int64_t n, int threads, const std::function<absl::Status(int64_t)>& fn) {
  std::atomic<int64_t> next{0};
  std::vector<absl::Status> errors(std::max(1, threads));
  auto worker = [&](int id) {
    for (int64_t i = next++; i < n; i = next++) {
      absl::Status s = fn(i);
      if (!s.ok()) {
        errors[id] = s;
        next = n;
        return;
      }
    }
  };
  if (threads <= 1) {
    worker(0);
  } else {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(worker, t);
    for (auto& th : pool) th.join();
  }
  for (auto& s : errors) RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

std::vector<SweepPoint> SweepPoints(const std::string& name, const TreeMethod& m, int budget,
                                    int page_tokens) {
  if (!IsPeer(name)) return {SweepPoint{}};
  const auto& peer = static_cast<const PeerMethod&>(m).index();
  std::vector<int> ks = {budget};
  // Fewer hits than the budget can already fill it once rounded to pages.
  if (page_tokens > 1 && peer.kind() != PeerKind::kFaissFlat)
    ks.insert(ks.begin(), std::max(1, budget / 4));
  std::vector<SweepPoint> points;
  for (int knob : peer.KnobValues()) {
    for (int k : ks) {
      if (peer.knob_name() == "efSearch" && knob < k) continue;
      points.push_back({k, knob});
    }
  }
  if (points.empty()) points.push_back({budget, budget});
  return points;
}

// Means over the trees of their calibrations (NaN fields when uncalibrated).
CalibrationSummary SummarizeCalibration(const std::vector<std::unique_ptr<TreeMethod>>& trees) {
  CalibrationSummary c;
  double width = 0, fov = 0, cf = 0, ratio = 0, sample_s = 0, select_s = 0, converge = 0;
  double calls = 0, exact_calls = 0, steady_sample_s = 0, steady_select_s = 0, interval = 0;
  double select_cpu_s = 0, sample_cpu_s = 0;
  int n = 0, exact = 0, normalized = 0, steady_steps = 0;
  for (const auto& t : trees) {
    CalibratorReport r;
    CalibrationTimes times;
    if (!t->Calibration(&r, &times)) continue;
    ++n;
    width += r.width;
    fov += r.field_of_view;
    cf += r.candidate_factor;
    ratio += r.mean_ratio;
    sample_s += times.sample_s;
    select_s += times.select_s;
    steady_sample_s += times.steady_sample_s;
    steady_select_s += times.steady_select_s;
    select_cpu_s += times.select_cpu_s;
    sample_cpu_s += times.sample_cpu_s;
    steady_steps += static_cast<int>(times.steady_steps);
    calls += static_cast<double>(r.steps);
    exact_calls += static_cast<double>(r.exact_steps);
    exact += r.mode == SelectMode::kExact;
    normalized += r.ranking == DescentRanking::kNormalized;
    interval += static_cast<double>(r.sample_interval);
    converge = std::max(converge, static_cast<double>(r.last_change_step));
  }
  if (n == 0) return c;
  c.width = width / n;
  c.field_of_view = fov / n;
  c.candidate_factor = cf / n;
  c.mean_ratio = ratio / n;
  c.converge_steps = converge;
  c.select_us = calls > 0 ? 1e6 * select_s / calls : std::numeric_limits<double>::quiet_NaN();
  c.overhead = select_s > 0 ? sample_s / select_s : std::numeric_limits<double>::quiet_NaN();
  c.select_cpu_us =
      calls > 0 ? 1e6 * select_cpu_s / calls : std::numeric_limits<double>::quiet_NaN();
  c.overhead_cpu =
      select_cpu_s > 0 ? sample_cpu_s / select_cpu_s : std::numeric_limits<double>::quiet_NaN();
  c.heads = n;
  c.exact_heads = exact;
  c.normalized_heads = normalized;
  c.exact_share = calls > 0 ? exact_calls / calls : 0.0;
  c.sample_interval = interval / n;
  c.steady_steps = static_cast<double>(steady_steps) / n;
  c.steady_overhead = steady_select_s > 0 ? steady_sample_s / steady_select_s
                                          : std::numeric_limits<double>::quiet_NaN();
  return c;
}

// Self-calibrated trees: `steps` more selections each, the workload's steps'
// queries replayed in order, for the steady state after the measured steps:
// the sampling overhead, and the mass, the exact share and the thread CPU
// time of these selections (the calibrator has seen the measured steps by
// then; it keeps adapting during the replay, as in a long decode). Mass is
// averaged per (step, tree) over its replays, then over those, so it weighs
// the steps as the measured pass does; `st` holds the measured pass's page
// oracle per (step, tree). Fills the replay_* fields of `c`.
absl::Status RunSteadySteps(const Workload& w, int steps, int budget,
                            const std::vector<std::unique_ptr<TreeMethod>>& trees, ExactRefs* refs,
                            const PointStats& st, CalibrationSummary* c) {
  Selection sel;
  std::vector<int32_t> positions;
  const size_t ntrees = trees.size();
  double mass = 0, oracle = 0, calls = 0, exact_calls = 0, select_cpu = 0, sample_cpu = 0;
  int cells = 0, calibrated = 0;
  for (size_t t = 0; t < ntrees; ++t) {
    CalibratorReport r0, r1;
    CalibrationTimes t0, t1;
    if (!trees[t]->Calibration(&r0, &t0)) continue;
    ++calibrated;
    const Tree& tr = w.trees[t];
    std::vector<double> mass_of(w.steps, 0.0);
    std::vector<int> visits(w.steps, 0);
    for (int i = 0; i < steps; ++i) {
      const int s = i % w.steps;
      const float* q = w.dump.query(s, w.first_layer(tr.group), tr.head);
      RETURN_IF_ERROR(trees[t]->Select(q, w.queries, SweepPoint{budget, budget}, &sel));
      trees[t]->Positions(sel, &positions);
      ASSIGN_OR_RETURN(double m, refs->Mass(s, tr, positions));
      mass_of[s] += m;
      ++visits[s];
    }
    for (int s = 0; s < w.steps; ++s) {
      if (visits[s] == 0) continue;
      mass += mass_of[s] / visits[s];
      const size_t cell = static_cast<size_t>(s) * ntrees + t;
      oracle += cell < st.oracle_by_step.size() ? st.oracle_by_step[cell]
                                                : std::numeric_limits<double>::quiet_NaN();
      ++cells;
    }
    trees[t]->Calibration(&r1, &t1);
    calls += static_cast<double>(r1.steps - r0.steps);
    exact_calls += static_cast<double>(r1.exact_steps - r0.exact_steps);
    select_cpu += t1.select_cpu_s - t0.select_cpu_s;
    sample_cpu += t1.sample_cpu_s - t0.sample_cpu_s;
  }
  if (calibrated == 0 || cells == 0) return absl::OkStatus();
  c->replay_steps = static_cast<double>(steps);
  c->replay_mass = mass / cells;
  c->replay_oracle_mass = oracle / cells;
  c->replay_exact_share = calls > 0 ? exact_calls / calls : 0.0;
  c->replay_select_cpu_us = calls > 0 ? 1e6 * select_cpu / calls : 0.0;
  c->replay_sample_cpu_us = calls > 0 ? 1e6 * sample_cpu / calls : 0.0;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<MethodResult>> RunMethod(const std::string& name, const Workload& w,
                                                    const SelectBenchOptions& o, ExactRefs* refs) {
  std::vector<MethodResult> results;
  const KvDump& d = w.dump;
  const int dim = d.head_dim;
  // Token-level methods are built once and evaluated for every page size.
  const std::vector<int> build_sizes =
      IsTokenLevel(name) ? std::vector<int>{o.page_tokens.front()} : o.page_tokens;
  for (int build_p : build_sizes) {
    const size_t ntrees = w.trees.size();
    std::vector<std::unique_ptr<TreeMethod>> trees(ntrees);
    std::vector<double> build_s(ntrees, 0), ins1_s(ntrees, 0), ins16_s(ntrees, 0);
    for (size_t t = 0; t < ntrees; ++t) {
      ASSIGN_OR_RETURN(trees[t], MakeMethod(name, build_p, w, o));
      trees[t]->BindValues(d.value(w.first_layer(w.trees[t].group), w.trees[t].head));
    }
    const auto wall0 = Clock::now();
    RETURN_IF_ERROR(
        ParallelFor(static_cast<int64_t>(ntrees), o.threads, [&](int64_t t) -> absl::Status {
          const Tree& tr = w.trees[t];
          const float* keys = d.key(w.first_layer(tr.group), tr.head);
          const auto t0 = Clock::now();
          absl::Status s = trees[t]->Build(keys, w.prefill);
          build_s[t] = Seconds(t0, Clock::now());
          if (!s.ok()) {
            return absl::Status(s.code(), absl::StrFormat("%s build (group %d, head %d): %s", name,
                                                          tr.group, tr.head, s.message()));
          }
          return absl::OkStatus();
        }));
    const double build_wall = Seconds(wall0, Clock::now());
    // Inserts: decode tokens one at a time, then 16-token chunks. Timed on
    // one thread per tree in turn.
    for (size_t t = 0; t < ntrees; ++t) {
      const Tree& tr = w.trees[t];
      const float* keys = d.key(w.first_layer(tr.group), tr.head);
      int64_t pos = w.prefill;
      const auto t0 = Clock::now();
      for (int64_t i = 0; i < w.decode_tokens; ++i, ++pos) {
        RETURN_IF_ERROR(trees[t]->Insert(keys + pos * dim, 1));
      }
      const auto t1 = Clock::now();
      for (int64_t i = 0; i < w.chunk_tokens; i += kInsertChunk) {
        const int64_t c = std::min<int64_t>(kInsertChunk, w.chunk_tokens - i);
        RETURN_IF_ERROR(trees[t]->Insert(keys + pos * dim, c));
        pos += c;
      }
      ins1_s[t] = Seconds(t0, t1);
      ins16_s[t] = Seconds(t1, Clock::now());
    }
    double sum_build = 0, sum1 = 0, sum16 = 0, bytes = 0;
    for (size_t t = 0; t < ntrees; ++t) {
      sum_build += build_s[t];
      sum1 += ins1_s[t];
      sum16 += ins16_s[t];
      bytes += static_cast<double>(trees[t]->index_bytes());
    }
    const std::vector<int> eval_sizes =
        IsTokenLevel(name) ? o.page_tokens : std::vector<int>{build_p};
    for (int p : eval_sizes) {
      MethodResult r;
      r.name = name;
      r.page_tokens = p;
      r.build_s = sum_build / ntrees;
      r.build_wall_s = build_wall;
      // The oracle keeps no index: it has nothing to insert into.
      const double none = std::numeric_limits<double>::quiet_NaN();
      r.insert1_tps = name == "exact-token" ? none
                      : sum1 > 0            ? static_cast<double>(w.decode_tokens * ntrees) / sum1
                                            : 0;
      r.insert16_tps = name == "exact-token" ? none
                       : sum16 > 0           ? static_cast<double>(w.chunk_tokens * ntrees) / sum16
                                             : 0;
      r.index_bytes_per_token = bytes / (static_cast<double>(ntrees) * w.context);
      double fill = 0;
      for (size_t t = 0; t < ntrees; ++t) {
        if (IsPeer(name)) static_cast<PeerMethod*>(trees[t].get())->set_page_tokens(p);
        fill += trees[t]->layout_fill();
      }
      r.page_fill = fill / ntrees;
      if (IsPeer(name)) {
        r.knob_name = std::string(static_cast<PeerMethod*>(trees[0].get())->index().knob_name());
      }
      Selection sel;
      std::vector<int32_t> positions;
      for (const SweepPoint& sp : SweepPoints(name, *trees[0], o.budget, p)) {
        PointStats st;
        st.point = sp;
        double oracle_sum = 0;
        st.query_us.reserve(static_cast<size_t>(w.steps) * ntrees);
        for (int s = 0; s < w.steps; ++s) {
          for (size_t t = 0; t < ntrees; ++t) {
            const Tree& tr = w.trees[t];
            const float* q = d.query(s, w.first_layer(tr.group), tr.head);
            const auto t0 = Clock::now();
            const int64_t cpu0 = ThreadCpuNanos();
            absl::Status status = trees[t]->Select(q, w.queries, sp, &sel);
            const int64_t cpu1 = ThreadCpuNanos();
            const auto t1 = Clock::now();
            if (!status.ok()) {
              return absl::Status(
                  status.code(),
                  absl::StrFormat("%s select (page %d, step %d, group %d, head %d): %s", name, p, s,
                                  tr.group, tr.head, status.message()));
            }
            st.query_us.push_back(Seconds(t0, t1) * 1e6);
            st.cpu_us.push_back(static_cast<double>(cpu1 - cpu0) * 1e-3);
            trees[t]->Positions(sel, &positions);
            ASSIGN_OR_RETURN(QualityReport q_r, refs->Evaluate(s, tr, positions));
            if (const std::vector<float>* est = trees[t]->last_estimate()) {
              ASSIGN_OR_RETURN(q_r.output_rel_error, refs->EstimateError(s, tr, *est));
            }
            st.topk += q_r.topk_recall;
            st.mass += q_r.mass_recall;
            st.err += q_r.output_rel_error;
            if (o.page_oracle && trees[t]->selector() != nullptr) {
              SelectParams params;
              params.budget_tokens = o.budget;
              params.sink_tokens = o.sink_tokens;
              ASSIGN_OR_RETURN(double om, refs->OracleMass(s, tr, *trees[t]->selector(), params));
              oracle_sum += om;
              st.oracle_by_step.push_back(om);
            }
            st.touched += static_cast<double>(sel.keys_touched);
            if (!sel.pages.empty()) {
              st.selected_fill += static_cast<double>(positions.size()) /
                                  (static_cast<double>(sel.pages.size()) * p);
            } else {
              st.selected_fill += std::numeric_limits<double>::quiet_NaN();
            }
            ++st.count;
          }
        }
        st.topk /= st.count;
        st.mass /= st.count;
        st.err /= st.count;
        st.touched /= st.count;
        st.selected_fill /= st.count;
        if (o.page_oracle && trees[0]->selector() != nullptr)
          st.oracle_mass = oracle_sum / st.count;
        r.sweep.push_back(std::move(st));
      }
      CalibrationSummary replay;
      if (o.steady_steps > 0) {
        RETURN_IF_ERROR(
            RunSteadySteps(w, o.steady_steps, o.budget, trees, refs, r.sweep.front(), &replay));
      }
      // The cheapest point within 0.01 of the best mass recall.
      double best_mass = -1;
      for (const auto& st : r.sweep) best_mass = std::max(best_mass, st.mass);
      double best_time = std::numeric_limits<double>::infinity();
      for (size_t i = 0; i < r.sweep.size(); ++i) {
        if (r.sweep[i].mass >= best_mass - 0.01 && r.sweep[i].p(0.5) < best_time) {
          best_time = r.sweep[i].p(0.5);
          r.chosen = i;
        }
      }
      if (o.verbose && r.sweep.size() > 1) {
        std::printf("  %s page %d sweep (%s, k'):\n", name.c_str(), p, r.knob_name.c_str());
        for (size_t i = 0; i < r.sweep.size(); ++i) {
          const auto& st = r.sweep[i];
          std::printf(
              "    %s=%-5d k'=%-5d p50 %9.1f us  p99 %9.1f us  topk %.3f  mass %.4f  err %.4f  "
              "touched %.0f%s\n",
              r.knob_name.c_str(), st.point.knob, st.point.k, st.p(0.5), st.p(0.99), st.topk,
              st.mass, st.err, st.touched, i == r.chosen ? "  <- chosen" : "");
        }
      }
      std::fprintf(stderr, "  %-11s page %3d: build %.3f s/tree, p50 %.1f us, mass %.4f\n",
                   name.c_str(), p, r.build_s, r.best().p(0.5), r.best().mass);
      for (size_t t = 0; t < ntrees; ++t) {
        const std::string line = trees[t]->Summary();
        if (!line.empty())
          std::printf("  %s page %d tree %zu %s\n", name.c_str(), p, t, line.c_str());
      }
      r.calibration = SummarizeCalibration(trees);
      r.calibration.replay_steps = replay.replay_steps;
      r.calibration.replay_mass = replay.replay_mass;
      r.calibration.replay_oracle_mass = replay.replay_oracle_mass;
      r.calibration.replay_exact_share = replay.replay_exact_share;
      r.calibration.replay_select_cpu_us = replay.replay_select_cpu_us;
      r.calibration.replay_sample_cpu_us = replay.replay_sample_cpu_us;
      results.push_back(std::move(r));
    }
  }
  return results;
}

// ---------------------------------------------------------------------------
// Report.

const MethodResult* FindResult(const std::vector<MethodResult>& rs, const std::string& name,
                               int p) {
  for (const auto& r : rs) {
    if (r.name == name && r.page_tokens == p) return &r;
  }
  return nullptr;
}

Json PointJson(const MethodResult& r, const PointStats& st) {
  Json j = Json::object();
  j["k"] = st.point.k;
  if (!r.knob_name.empty()) j[r.knob_name] = st.point.knob;
  j["query_us_p50"] = st.p(0.5);
  j["query_us_p99"] = st.p(0.99);
  j["topk_recall"] = st.topk;
  j["mass_recall"] = st.mass;
  j["output_rel_error"] = st.err;
  j["keys_touched"] = st.touched;
  j["session_cost_s"] = r.SessionCost(st);
  return j;
}

Json ResultJson(const MethodResult& r) {
  const PointStats& st = r.best();
  Json j = Json::object();
  j["selector"] = r.name;
  j["page_tokens"] = r.page_tokens;
  j["build_s"] = r.build_s;
  j["build_wall_s"] = r.build_wall_s;
  j["insert_tokens_per_s"] = r.insert1_tps;
  j["insert_chunk16_tokens_per_s"] = r.insert16_tps;
  j["query_us_p50"] = st.p(0.5);
  j["query_us_p99"] = st.p(0.99);
  j["query_us_mean"] = st.mean_us();
  j["topk_recall"] = st.topk;
  j["mass_recall"] = st.mass;
  j["output_rel_error"] = st.err;
  j["keys_touched"] = st.touched;
  j["index_bytes_per_token"] = r.index_bytes_per_token;
  j["page_fill"] = r.page_fill;
  j["selected_page_fill"] = st.selected_fill;
  j["session_cost_s"] = r.SessionCost(st);
  if (IsPeer(r.name)) {
    j["param"] = PointJson(r, st);
    Json sweep = Json::array();
    for (const auto& pt : r.sweep) sweep.push_back(PointJson(r, pt));
    j["sweep"] = std::move(sweep);
  }
  return j;
}

// The targets of the issue, evaluated for one page size.
Json TargetsJson(const std::vector<MethodResult>& rs, int p, double kv_bytes_per_token,
                 std::vector<std::string>* lines) {
  Json t = Json::object();
  const MethodResult* mdci = FindResult(rs, "mdci", p);
  const MethodResult* exact = FindResult(rs, "exact", p);
  const MethodResult* emdci = FindResult(rs, "exact-mdci", p);
  const MethodResult* etok = FindResult(rs, "exact-token", p);
  const MethodResult* quest = FindResult(rs, "quest", p);
  auto add = [&](const std::string& key, bool reached, const std::string& detail) {
    Json e = Json::object();
    e["reached"] = reached;
    e["detail"] = detail;
    t[key] = std::move(e);
    lines->push_back(absl::StrFormat("  [%s] %s: %s", reached ? "yes" : " no", key, detail));
  };
  if (mdci && exact && emdci && etok) {
    const double tr = exact->best().p(0.5) / mdci->best().p(0.5);
    const double m1 = mdci->best().mass / emdci->best().mass;
    const double m2 = mdci->best().mass / etok->best().mass;
    add("mdci_10x_faster_than_exact_at_quality", tr >= 10 && m1 >= 0.95 && m2 >= 0.90,
        absl::StrFormat("exact/mdci time %.2fx (>= 10), mass vs exact-mdci %.3f (>= 0.95), vs "
                        "exact-token %.3f (>= 0.90)",
                        tr, m1, m2));
  }
  if (exact && emdci) {
    add("exact_mdci_mass_above_exact_with_fill",
        emdci->best().mass > exact->best().mass && emdci->page_fill >= 0.8,
        absl::StrFormat("exact-mdci mass %.4f vs exact %.4f, mdci layout fill %.3f (>= 0.8)",
                        emdci->best().mass, exact->best().mass, emdci->page_fill));
  }
  if (mdci && quest) {
    add("mdci_faster_than_quest_at_higher_mass",
        mdci->best().p(0.5) < quest->best().p(0.5) && mdci->best().mass > quest->best().mass,
        absl::StrFormat("p50 %.1f vs %.1f us, mass %.4f vs %.4f", mdci->best().p(0.5),
                        quest->best().p(0.5), mdci->best().mass, quest->best().mass));
  }
  if (mdci) {
    const double target_mass = mdci->best().mass;
    if (const MethodResult* h = FindResult(rs, "hnswlib", p)) {
      const PointStats* cheapest = nullptr;
      for (const auto& pt : h->sweep) {
        if (pt.mass >= target_mass && (!cheapest || pt.p(0.5) < cheapest->p(0.5))) cheapest = &pt;
      }
      if (cheapest) {
        add("mdci_faster_than_hnswlib_at_same_mass", mdci->best().p(0.5) < cheapest->p(0.5),
            absl::StrFormat(
                "mdci p50 %.1f us vs hnswlib %.1f us (efSearch %d, k' %d) at mass >= %.4f",
                mdci->best().p(0.5), cheapest->p(0.5), cheapest->point.knob, cheapest->point.k,
                target_mass));
      } else {
        add("mdci_faster_than_hnswlib_at_same_mass", true,
            absl::StrFormat("no hnswlib point reaches mass %.4f (its best %.4f)", target_mass,
                            h->best().mass));
      }
    }
    // Session cost vs every peer configuration reaching mdci's mass.
    const double mdci_cost = mdci->SessionCost(mdci->best());
    bool any_peer = false, cheaper_than_all = true;
    std::string worst;
    for (const auto& r : rs) {
      if (r.page_tokens != p || !IsPeer(r.name)) continue;
      any_peer = true;
      for (const auto& pt : r.sweep) {
        if (pt.mass < target_mass) continue;
        const double c = r.SessionCost(pt);
        if (c <= mdci_cost) {
          cheaper_than_all = false;
          worst = absl::StrFormat("%s %s=%d k'=%d costs %.3f s", r.name, r.knob_name, pt.point.knob,
                                  pt.point.k, c);
        }
      }
    }
    if (any_peer) {
      add("mdci_session_cost_below_peers_at_mass", cheaper_than_all,
          absl::StrFormat("mdci %.3f s per head (build + %d x (insert + select), extrapolated)%s",
                          mdci_cost, kSessionSteps,
                          cheaper_than_all ? "" : "; beaten by " + worst));
    }
    const double frac = mdci->index_bytes_per_token / kv_bytes_per_token;
    add("mdci_index_memory_at_most_30pct_of_kv", frac <= 0.30,
        absl::StrFormat("%.1f B/token = %.1f%% of %.0f KV B/token", mdci->index_bytes_per_token,
                        100 * frac, kv_bytes_per_token));
  }
  return t;
}

void PrintTable(const std::vector<MethodResult>& rs, int p) {
  const MethodResult* exact = FindResult(rs, "exact", p);
  const MethodResult* emdci = FindResult(rs, "exact-mdci", p);
  const MethodResult* etok = FindResult(rs, "exact-token", p);
  std::printf("\npage_tokens %d\n", p);
  std::printf("%-11s %-13s %9s %10s %10s %9s %9s %8s %6s %7s %7s %7s %7s %9s %7s %6s %9s\n",
              "selector", "param", "build_s", "ins1_tok/s", "ins16_tok/s", "p50_us", "p99_us",
              "exact/x", "topk", "mass", "/ex-md", "/ex-tok", "err", "touched", "B/tok", "fill",
              "session_s");
  for (const auto& r : rs) {
    if (r.page_tokens != p) continue;
    const PointStats& st = r.best();
    std::string param = "-";
    if (!r.knob_name.empty()) {
      param = absl::StrFormat("%s=%d,k=%d", r.knob_name == "efSearch" ? "ef" : "np", st.point.knob,
                              st.point.k);
    } else if (IsPeer(r.name)) {
      param = absl::StrFormat("k=%d", st.point.k);
    }
    const double ratio = exact ? exact->best().p(0.5) / st.p(0.5) : NAN;
    const double vs_em = emdci ? st.mass / emdci->best().mass : NAN;
    const double vs_et = etok ? st.mass / etok->best().mass : NAN;
    std::printf("%-11s %-13s %9s %10s %10s %9s %9s %8s %6s %7s %7s %7s %7s %9s %7s %6s %9s\n",
                r.name.c_str(), param.c_str(), Fmt(r.build_s, "%.3f").c_str(),
                Fmt(r.insert1_tps, "%.0f").c_str(), Fmt(r.insert16_tps, "%.0f").c_str(),
                Fmt(st.p(0.5), "%.1f").c_str(), Fmt(st.p(0.99), "%.1f").c_str(),
                Fmt(ratio, "%.2f").c_str(), Fmt(st.topk, "%.3f").c_str(),
                Fmt(st.mass, "%.4f").c_str(), Fmt(vs_em, "%.3f").c_str(),
                Fmt(vs_et, "%.3f").c_str(), Fmt(st.err, "%.4f").c_str(),
                Fmt(st.touched, "%.0f").c_str(), Fmt(r.index_bytes_per_token, "%.1f").c_str(),
                Fmt(r.page_fill, "%.3f").c_str(), Fmt(r.SessionCost(st), "%.3f").c_str());
  }
}

}  // namespace

absl::Status CheckReport(const std::string& json_text, const std::vector<std::string>& selectors,
                         const std::vector<int>& page_tokens) {
  ASSIGN_OR_RETURN(Json root, ParseJson(json_text));
  if (!root.is_object()) return absl::InvalidArgumentError("report is not a JSON object");
  for (const char* key : {"machine", "config"}) {
    if (!root.contains(key) || !root[key].is_object()) {
      return absl::InvalidArgumentError(absl::StrFormat("report has no '%s' object", key));
    }
  }
  if (!root.contains("results") || !root["results"].is_array()) {
    return absl::InvalidArgumentError("report has no 'results' array");
  }
  const Json& results = root["results"];
  static const char* kMetrics[] = {
      "build_s",          "insert_tokens_per_s", "query_us_p50",
      "query_us_p99",     "topk_recall",         "mass_recall",
      "output_rel_error", "keys_touched",        "index_bytes_per_token",
      "page_fill",        "session_cost_s"};
  for (int p : page_tokens) {
    for (const std::string& name : selectors) {
      const Json* found = nullptr;
      for (const Json& r : results) {
        if (!r.is_object()) continue;
        const auto s = r.find("selector");
        const auto pt = r.find("page_tokens");
        if (s != r.end() && s->is_string() && *s == name && pt != r.end() && pt->is_number() &&
            pt->get<double>() == p) {
          found = &r;
        }
      }
      if (found == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrFormat("no result for selector '%s' at page_tokens %d", name, p));
      }
      for (const char* m : kMetrics) {
        const auto v = found->find(m);
        if (v == found->end()) {
          return absl::InvalidArgumentError(absl::StrFormat("%s (page %d) lacks '%s'", name, p, m));
        }
        // page_fill and the insert rate are null for the token-level oracle
        // (no pages, no index); everything else is a number.
        const bool may_be_null =
            (name == "exact-token" &&
             (std::string(m) == "page_fill" || std::string(m) == "insert_tokens_per_s")) ||
            (IsBaselineView(name) && std::string(m) == "page_fill");
        if (!v->is_number() && !(may_be_null && v->is_null())) {
          return absl::InvalidArgumentError(
              absl::StrFormat("%s (page %d): '%s' is not a number", name, p, m));
        }
      }
      for (const char* m : {"topk_recall", "mass_recall"}) {
        const double v = (*found)[m].get<double>();
        if (!(v >= 0 && v <= 1 + 1e-6)) {
          return absl::InvalidArgumentError(
              absl::StrFormat("%s (page %d): %s = %g outside [0, 1]", name, p, m, v));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<MethodSummary>> MeasureRuns(const SelectBenchOptions& o,
                                                       const std::vector<MethodRun>& runs) {
  omp_set_num_threads(1);
  ASSIGN_OR_RETURN(Workload w, LoadWorkload(o));
  ExactRefs refs(w, o.budget);
  std::vector<MethodSummary> out;
  for (const MethodRun& run : runs) {
    SelectBenchOptions ro = o;
    ro.mdci = run.mdci;
    ro.mdci_target_mass = run.target_mass;
    ro.page_tokens = {o.page_tokens.front()};
    ASSIGN_OR_RETURN(std::vector<MethodResult> rs, RunMethod(run.selector, w, ro, &refs));
    const MethodResult& r = rs.front();
    MethodSummary m;
    m.label = run.label;
    m.selector = run.selector;
    m.mdci = run.mdci;
    m.p50_us = r.best().p(0.5);
    m.mean_us = r.best().mean_us();
    m.cpu_p50_us = PointStats::Quantile(r.best().cpu_us, 0.5);
    m.cpu_mean_us = PointStats::Mean(r.best().cpu_us);
    m.mass = r.best().mass;
    m.topk = r.best().topk;
    m.output_rel_error = r.best().err;
    m.keys_touched = r.best().touched;
    m.page_fill = r.page_fill;
    m.oracle_mass = r.best().oracle_mass;
    m.build_s = r.build_s;
    m.calibration = r.calibration;
    m.index_bytes_per_token = r.index_bytes_per_token;
    out.push_back(std::move(m));
  }
  return out;
}

absl::Status RunSelectBench(const SelectBenchOptions& o) {
  if (!ForceKernelIsa(o.isa)) {
    return absl::FailedPreconditionError(
        absl::StrCat("--isa ", o.isa, ": this CPU does not have it (kernels: ", KernelIsa(), ")"));
  }
  if (o.matrix) return RunSelectMatrix(o);
  if (o.diagnose) return RunSelectDiagnose(o);
  if (o.baselines) return RunBaselinesTable(o);
  // Peers' own OpenMP threads would distort single-threaded query times and
  // oversubscribe the parallel builds.
  omp_set_num_threads(1);
  const std::string load_start = ReadFirstLine("/proc/loadavg");
  const auto t_load = Clock::now();
  ASSIGN_OR_RETURN(Workload w, LoadWorkload(o));
  const KvDump& d = w.dump;
  std::fprintf(stderr,
               "icecache-bench select: %s, %d trees (%d groups x %d heads), prefill %lld + %lld "
               "decode + %lld chunk tokens, %d steps, G=%d, dim %d (data ready in %.1f s)\n",
               w.source.c_str(), static_cast<int>(w.trees.size()), w.groups, d.kv_heads,
               static_cast<long long>(w.prefill), static_cast<long long>(w.decode_tokens),
               static_cast<long long>(w.chunk_tokens), w.steps, w.queries, d.head_dim,
               Seconds(t_load, Clock::now()));
  ExactRefs refs(w, o.budget);
  std::vector<MethodResult> results;
  for (const std::string& name : AllMethodNames()) {
    if (std::find(o.selectors.begin(), o.selectors.end(), name) == o.selectors.end()) continue;
    for (Granularity g : o.granularities) {
      // Token-level methods have no page granularity; page selectors run at each.
      if (IsTokenLevel(name) && g == Granularity::kToken) continue;
      const std::string run = g == Granularity::kToken ? name + std::string(kTokenSuffix) : name;
      ASSIGN_OR_RETURN(std::vector<MethodResult> rs, RunMethod(run, w, o, &refs));
      for (auto& r : rs) results.push_back(std::move(r));
    }
  }
  // Report order: page size, then method order.
  std::stable_sort(
      results.begin(), results.end(),
      [](const MethodResult& a, const MethodResult& b) { return a.page_tokens < b.page_tokens; });

  const double kv_bytes_per_token = 2.0 * d.head_dim * DTypeSize(o.kv_dtype);
  Json root = Json::object();
  Json machine = Json::object();
  machine["cpu_model"] = CpuModel();
  machine["cores"] = static_cast<int>(std::thread::hardware_concurrency());
  machine["kernel_isa"] = KernelIsa();
  machine["pq_scan_kernel"] = PqSketch::ScanKernel();
  machine["l2_size"] = L2Size();
  machine["l3_size"] = L3Size();
  const std::string build_commit = BuildCommit();
  const std::string head_commit = HeadCommitNow();
  machine["git_commit"] = build_commit.empty() ? "unknown" : build_commit;
  if (!head_commit.empty() && head_commit != build_commit) {
    machine["git_head_at_run"] = head_commit;
  }
  // Other processes share the cores; the load tells how much timings suffered.
  machine["loadavg_start"] = load_start;
  machine["loadavg_end"] = ReadFirstLine("/proc/loadavg");
  root["machine"] = std::move(machine);
  Json config = Json::object();
  config["source"] = w.source;
  config["prefill_tokens"] = w.prefill;
  config["decode_tokens"] = w.decode_tokens;
  config["chunk_tokens"] = w.chunk_tokens;
  config["context_tokens"] = w.context;
  config["budget"] = o.budget;
  Json pts = Json::array();
  for (int p : o.page_tokens) pts.push_back(p);
  config["page_tokens"] = std::move(pts);
  config["layers"] = d.layers;
  config["kv_heads"] = d.kv_heads;
  config["trees"] = static_cast<int64_t>(w.trees.size());
  config["head_dim"] = d.head_dim;
  config["queries_per_step"] = w.queries;
  config["steps"] = w.steps;
  config["layer_reuse"] = o.layer_reuse;
  config["sink_tokens"] = o.sink_tokens;
  config["threads"] = o.threads;
  config["kv_dtype"] = std::string(DTypeName(o.kv_dtype));
  config["kv_bytes_per_token_per_head"] = kv_bytes_per_token;
  Json sel = Json::array();
  for (const auto& s : o.selectors) sel.push_back(s);
  config["selectors"] = std::move(sel);
  Json peer = Json::object();
  peer["hnsw_m"] = o.peer.hnsw_m;
  peer["hnsw_ef_construction"] = o.peer.hnsw_ef_construction;
  peer["ivf_nlist"] = o.peer.ivf_nlist > 0
                          ? o.peer.ivf_nlist
                          : static_cast<int>(std::lround(std::sqrt(double(w.prefill))));
  peer["pq_m"] = o.peer.pq_m;
  peer["pq_nbits"] = o.peer.pq_nbits;
  config["peers"] = std::move(peer);
  Json mdci = Json::object();
  mdci["num_composite"] = o.mdci.num_composite;
  mdci["num_simple"] = o.mdci.num_simple;
  mdci["field_of_view"] = o.mdci.field_of_view;
  mdci["candidate_factor"] = static_cast<double>(o.mdci.candidate_factor);
  config["mdci"] = std::move(mdci);
  config["quest_rescore_factor"] = static_cast<double>(o.quest_rescore_factor);
  config["notes"] =
      "query times: one KV head's G queries at one step, single-threaded, step-major over "
      "trees; build_s: mean seconds per tree (builds parallel over trees with --threads); "
      "session_cost_s: per tree, build_s + 1000 x (1-token insert + mean select), "
      "extrapolated from the measured steps; peers: hits rounded up to positional pages, "
      "cheapest sweep point within 0.01 of their best mass recall; every method gets the "
      "sink tokens; keys_touched per select call (G queries)";
  root["config"] = std::move(config);
  Json res = Json::array();
  for (const auto& r : results) res.push_back(ResultJson(r));
  root["results"] = std::move(res);
  Json targets = Json::object();
  std::vector<std::string> target_lines;
  for (int p : o.page_tokens) {
    target_lines.push_back(absl::StrFormat("targets at page_tokens %d:", p));
    targets[absl::StrCat(p)] = TargetsJson(results, p, kv_bytes_per_token, &target_lines);
  }
  root["targets"] = std::move(targets);

  for (int p : o.page_tokens) PrintTable(results, p);
  std::printf("\n");
  for (const auto& line : target_lines) std::printf("%s\n", line.c_str());
  std::fflush(stdout);

  if (!o.json_path.empty()) {
    std::ofstream out(o.json_path);
    out << DumpJson(root, 2) << "\n";
    out.close();
    if (!out) {
      return absl::PermissionDeniedError(absl::StrFormat("cannot write --json %s", o.json_path));
    }
    if (o.check) {
      std::ifstream in(o.json_path);
      std::stringstream ss;
      ss << in.rdbuf();
      absl::Status s = CheckReport(ss.str(), o.selectors, o.page_tokens);
      if (!s.ok()) {
        return absl::FailedPreconditionError(absl::StrCat("--check failed: ", s.message()));
      }
      std::printf("check: %s is valid (%zu results)\n", o.json_path.c_str(), results.size());
    }
  } else if (o.check) {
    absl::Status s = CheckReport(DumpJson(root), o.selectors, o.page_tokens);
    if (!s.ok())
      return absl::FailedPreconditionError(absl::StrCat("--check failed: ", s.message()));
    std::printf("check: report is valid (%zu results)\n", results.size());
  }
  return absl::OkStatus();
}

}  // namespace icecache::bench
