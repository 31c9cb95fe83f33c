#include "server/session/session_quality.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/mdci_selector.h"
#include "server/session/session.h"

namespace icecache {
namespace {

// Weight of a new sample in HeadQualityMonitor's moving average.
constexpr double kRecentWeight = 1.0 / 8.0;

bool LaidOutByTree(SelectorKind kind) {
  return kind == SelectorKind::kMdci || kind == SelectorKind::kExactMdci;
}

SampleScheduleOptions ScheduleOf(const SessionQualityOptions& o) {
  SampleScheduleOptions so;
  so.warmup = o.warmup_samples;
  so.warmup_every = o.warmup_every;
  so.min_every = o.sample_every;
  so.max_every = o.max_sample_every;
  so.share = o.sampler.cpu_share;
  return so;
}

CalibratorOptions CalibratorOptionsOf(const SessionConfig& config,
                                      const SessionQualityOptions& options) {
  CalibratorOptions co;
  co.target_ratio = config.target_mass_ratio;
  co.sample_every = options.sample_every;
  co.max_sample_every = options.max_sample_every;
  co.sample_share = options.sampler.cpu_share;
  co.warmup_samples = options.warmup_samples;
  co.warmup_every = options.warmup_every;
  co.exact_cost_ratio = options.exact_cost_ratio;
  co.ranking_trial_samples = options.ranking_duel_samples;
  co.method_duel = options.method_duel;
  co.carry_steps = options.carry_steps;
  co.min_width = options.min_width;
  co.start_width = std::max(co.start_width, co.min_width);
  co.base_ranking =
      config.mdci.normalized_descent ? DescentRanking::kNormalized : DescentRanking::kLoudest;
  return co;
}

}  // namespace

absl::Status ValidateQualityOptions(const SessionQualityOptions& o) {
  if (o.seeded_warmup_samples < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "quality sampling: seeded_warmup_samples must be >= 0, got ", o.seeded_warmup_samples));
  }
  if (!(o.min_width > 0.0 && o.min_width <= CalibratorOptions{}.max_width)) {
    return absl::InvalidArgumentError(absl::StrCat("quality sampling: min_width must be in (0, ",
                                                   CalibratorOptions{}.max_width, "], got ",
                                                   o.min_width));
  }
  if (o.remembered_keys < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("quality sampling: remembered_keys must be >= 1, got ", o.remembered_keys));
  }
  return ValidateSampleSchedule(ScheduleOf(o));
}

bool HeadQualityMonitor::ShouldSample(const SelectParams& used, int64_t cost_ns, int carry_age) {
  if (calibrator_ != nullptr) return calibrator_->ShouldSample(used, cost_ns, carry_age);
  absl::MutexLock l(&mu_);
  return schedule_.Step(cost_ns);
}

void HeadQualityMonitor::Taken() {
  if (calibrator_ != nullptr) return calibrator_->Taken();
  absl::MutexLock l(&mu_);
  schedule_.Taken();
}

bool HeadQualityMonitor::MayUseBurst(int heads, int64_t burst_ns, int64_t estimate_ns) const {
  const int64_t taken = calibrator_ != nullptr ? calibrator_->taken() : -1;
  absl::MutexLock l(&mu_);
  const int64_t n = taken >= 0 ? taken : schedule_.taken();
  if (n == 0) return true;
  const int64_t queued = std::max<int64_t>(0, n - samples_);
  const int64_t spent = reference_ns_ + queued * std::max<int64_t>(0, estimate_ns);
  return spent < burst_ns / std::max(1, heads);
}

void HeadQualityMonitor::Record(const QualitySample& sample) {
  if (calibrator_ != nullptr) calibrator_->Observe(sample);
  absl::MutexLock l(&mu_);
  schedule_.Reference(sample.reference_ns);
  recent_ratio_ = samples_ == 0
                      ? sample.mass_ratio
                      : recent_ratio_ + kRecentWeight * (sample.mass_ratio - recent_ratio_);
  ++samples_;
  sum_ratio_ += sample.mass_ratio;
  sum_topk_ += sample.topk_recall;
  last_ratio_ = sample.mass_ratio;
  reference_ns_ += std::max<int64_t>(0, sample.reference_ns) +
                   std::max<int64_t>(0, sample.trial_ns) + std::max<int64_t>(0, sample.method_ns);
}

HeadQualityInfo HeadQualityMonitor::Report(int group, int head) const {
  HeadQualityInfo info;
  info.group = group;
  info.kv_head = head;
  if (calibrator_ != nullptr) {
    const CalibratorReport r = calibrator_->report();
    info.calibrated = true;
    info.width = r.width;
    info.field_of_view = r.field_of_view;
    info.candidate_factor = r.candidate_factor;
    info.width_changes = r.changes;
    info.exact = r.mode == SelectMode::kExact;
    info.exact_selections = r.exact_steps;
    info.fallbacks = r.fallbacks;
    info.sample_interval = r.sample_interval;
    info.ranking = std::string(DescentRankingName(r.ranking));
    info.ranking_trial_samples = r.trial_samples;
    info.ranking_trial_gain = r.trial_gain;
    info.ranking_switches = r.ranking_switches;
    info.seeded = r.seeded;
    info.pooled = r.pooled;
    info.method = std::string(SearchMethodName(r.method));
    info.method_trials = r.method_trials;
    info.method_switches = r.method_switches;
    info.carry_steps = r.carry_steps;
    info.carry_stops = r.carry_stops;
  }
  absl::MutexLock l(&mu_);
  if (calibrator_ == nullptr) info.sample_interval = schedule_.Interval();
  info.samples = samples_;
  if (samples_ > 0) {
    info.mean_mass_ratio = sum_ratio_ / samples_;
    info.mean_topk_recall = sum_topk_ / samples_;
    info.recent_mass_ratio = recent_ratio_;
    info.last_mass_ratio = last_ratio_;
  }
  return info;
}

HeadQualityState HeadQualityMonitor::state() const {
  HeadQualityState st;
  if (calibrator_ != nullptr) {
    st.calibrated = true;
    st.calibrator = calibrator_->state();
  }
  absl::MutexLock l(&mu_);
  st.schedule = schedule_.state();
  st.samples = samples_;
  st.sum_ratio = sum_ratio_;
  st.sum_topk = sum_topk_;
  st.recent_ratio = recent_ratio_;
  st.last_ratio = last_ratio_;
  return st;
}

absl::Status HeadQualityMonitor::Restore(const HeadQualityState& s) {
  if (s.calibrated != (calibrator_ != nullptr)) {
    return absl::InvalidArgumentError(
        s.calibrated ? "it holds a calibrator state, but the session's width is not calibrated"
                     : "it holds no calibrator state, but the session's width is calibrated");
  }
  for (double v : {s.sum_ratio, s.sum_topk, s.recent_ratio, s.last_ratio}) {
    if (!(v >= 0.0) || !std::isfinite(v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("a mass ratio or recall sum must be finite and >= 0, got ", v));
    }
  }
  if (s.samples < 0 || s.samples > kMaxStateCount) {
    return absl::InvalidArgumentError(absl::StrCat("samples out of range, got ", s.samples));
  }
  if (calibrator_ != nullptr) RETURN_IF_ERROR(calibrator_->Restore(s.calibrator));
  absl::MutexLock l(&mu_);
  RETURN_IF_ERROR(schedule_.Restore(s.schedule));
  samples_ = s.samples;
  sum_ratio_ = s.sum_ratio;
  sum_topk_ = s.sum_topk;
  recent_ratio_ = s.recent_ratio;
  last_ratio_ = s.last_ratio;
  return absl::OkStatus();
}

SessionQualityState QualityStateOf(const Session& s) {
  SessionQualityState q;
  for (const auto& head : s.quality) q.heads.push_back(head->state());
  q.samples_dropped = s.samples_dropped.load();
  q.samples_stale = s.samples_stale.load();
  q.samples_reselected = s.samples_reselected.load();
  q.calibration_cpu_ns = s.calibration_cpu_ns.load();
  q.selection_ns = s.selection_ns.load();
  return q;
}

absl::Status RestoreQualityState(const SessionQualityState& state, int kv_heads,
                                 const std::vector<std::unique_ptr<HeadQualityMonitor>>& heads) {
  if (state.heads.size() != heads.size()) {
    return absl::InvalidArgumentError(absl::StrCat("its quality state lists ", state.heads.size(),
                                                   " heads for ", heads.size(), " indexes"));
  }
  for (int64_t v : {state.samples_dropped, state.samples_stale, state.samples_reselected,
                    state.calibration_cpu_ns, state.selection_ns}) {
    if (v < 0) {
      return absl::InvalidArgumentError(absl::StrCat("its quality counters must be >= 0, got ", v));
    }
  }
  for (size_t i = 0; i < heads.size(); ++i) {
    if (absl::Status st = heads[i]->Restore(state.heads[i]); !st.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("the quality state of layer group ",
                                                     i / kv_heads, " kv head ", i % kv_heads, ": ",
                                                     st.message()));
    }
  }
  return absl::OkStatus();
}

void RestoreQualityCounters(const SessionQualityState& state, Session& s) {
  s.samples_dropped.store(state.samples_dropped);
  s.samples_stale.store(state.samples_stale);
  s.samples_reselected.store(state.samples_reselected);
  s.calibration_cpu_ns.store(state.calibration_cpu_ns);
  s.selection_ns.store(state.selection_ns);
}

absl::StatusOr<std::vector<std::unique_ptr<HeadQualityMonitor>>> MakeHeadQuality(
    const SessionConfig& config, int groups, const SessionQualityOptions& options) {
  std::vector<std::unique_ptr<HeadQualityMonitor>> heads;
  if (!options.enabled || !LaidOutByTree(config.selector)) return heads;
  const bool calibrate = config.selector == SelectorKind::kMdci && config.target_mass_ratio > 0.0;
  const CalibratorOptions co = CalibratorOptionsOf(config, options);
  const int total = groups * config.kv_heads;
  heads.reserve(total);
  for (int i = 0; i < total; ++i) {
    std::unique_ptr<WidthCalibrator> calibrator;
    if (calibrate) {
      absl::StatusOr<std::unique_ptr<WidthCalibrator>> made = WidthCalibrator::Create(
          co, config.mdci.field_of_view, config.mdci.candidate_factor, config.mdci.pq_factor);
      if (!made.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("session config: ", made.status().message()));
      }
      calibrator = std::move(made).value();
    }
    heads.push_back(
        std::make_unique<HeadQualityMonitor>(ScheduleOf(options), std::move(calibrator)));
  }
  return heads;
}

int64_t StaleAfterTokens(const Session& s, int64_t tokens) {
  return std::max<int64_t>(4 * int64_t{s.config.page_tokens}, tokens / 1024);
}

std::unique_ptr<WidthCalibrator> MakeWidthPool(const SessionConfig& config,
                                               const SessionQualityOptions& options) {
  if (!options.enabled || !options.pool_widths || config.selector != SelectorKind::kMdci ||
      !(config.target_mass_ratio > 0.0) || config.mdci.pq_factor > 0.0f) {
    return nullptr;
  }
  CalibratorOptions co = CalibratorOptionsOf(config, options);
  co.ranking_trial_samples = 0;  // the pool rates one ranking: the heads' own
  co.method_duel = false;
  co.carry_steps = 0;         // the pool never selects
  co.exact_cost_ratio = 0.0;  // no costs: the pool never selects
  absl::StatusOr<std::unique_ptr<WidthCalibrator>> made = WidthCalibrator::Create(
      co, config.mdci.field_of_view, config.mdci.candidate_factor, config.mdci.pq_factor);
  return made.ok() ? std::move(made).value() : nullptr;
}

int PoolWidths(const Session& s) {
  if (s.width_pool == nullptr) return 0;
  const CalibratorReport pool = s.width_pool->report();
  if (pool.samples == 0) return 0;  // nothing learnt (a restored session's new pool)
  // Missed even at max_width: no width to give; the heads' own samples
  // decide (their exact fallback).
  if (pool.mode == SelectMode::kExact) return 0;
  int took = 0;
  for (const auto& h : s.quality) took += h->AdoptPooled(pool.width) ? 1 : 0;
  return took;
}

namespace {

// absl::Condition: no append is waiting for append_mu. Its count falls
// only while that append holds append_mu, and the condition is evaluated
// again when it lets go, so no wake-up is lost.
bool NoAppendWaiting(const Session* s) { return s->appends_waiting.load() == 0; }

// The sampler's hold on a session: append_mu, taken only while no append
// waits for it (an append never queues behind a line of probes), then mu
// shared (selects and fetches go on). Yield() lets a waiting append through
// and takes both again.
class ABSL_SCOPED_LOCKABLE ProbeLocks {
 public:
  explicit ProbeLocks(Session& s) ABSL_SHARED_LOCK_FUNCTION(s.mu) : s_(s) { Take(); }
  ~ProbeLocks() ABSL_UNLOCK_FUNCTION() { Release(); }
  ProbeLocks(const ProbeLocks&) = delete;
  ProbeLocks& operator=(const ProbeLocks&) = delete;
  // Lets the appends waiting now go first, and waits (its locks released)
  // while a decode call is in flight (QualitySampler::Defer); whether it
  // did either.
  bool Yield() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    const bool append = s_.appends_waiting.load() != 0;
    const bool decode = s_.sampler != nullptr && s_.sampler->ShouldDefer();
    if (!append && !decode) return false;
    Release();
    if (decode) s_.sampler->Defer();
    Take();
    if (append) s_.probe_yields.fetch_add(1, std::memory_order_relaxed);
    return true;
  }

 private:
  void Take() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    s_.append_mu.LockWhen(absl::Condition(&NoAppendWaiting, static_cast<const Session*>(&s_)));
    s_.mu.ReaderLock();
  }
  void Release() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    s_.mu.ReaderUnlock();
    s_.append_mu.Unlock();
  }
  Session& s_;
};

}  // namespace

SampleOutcome MeasureProbe(Session& s, const QualityProbe& probe, QualitySample* out) {
  // Runs on the sampler's background thread. Between its steps, and between
  // chunks of the reference scan, it lets a waiting append through
  // (ProbeLocks::Yield), so an append waits for at most one step or chunk
  // of one head's measurement, not for the whole of it (with the sampler at
  // nice 19 on busy cores, a whole measurement held an append for up to 60
  // ms: docs/bench/yield53.md); selects and fetches go on meanwhile (mu is
  // only shared).
  absl::StatusOr<QualitySample> measured = absl::UnavailableError("stale");
  {
    ProbeLocks locks(s);
    const size_t index = s.SelectorIndex(probe.group, probe.head);
    const int64_t now = s.group_tokens[probe.group];
    // What the measurement needs still holds (after a yield too): the
    // session works, the group is not being built, the index exists.
    auto usable = [&]() ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
      return !s.broken && !s.group_building[probe.group] && s.selectors[index] != nullptr;
    };
    // Yields to a waiting append; whether the measurement can go on.
    auto yield = [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return !locks.Yield() || usable(); };
    if (now >= probe.tokens && usable()) {
      const auto& selector = static_cast<const MdciSelector&>(*s.selectors[index]);
      Selection selection;
      absl::Status selected = absl::OkStatus();
      if (now - probe.tokens <= StaleAfterTokens(s, probe.tokens)) {
        // The selection's pages still exist (ids are never reused) and the
        // few tokens appended since barely move the masses.
        selection.pages = probe.pages;
        selection.positions = probe.positions;
      } else {
        selected = selector.Select(probe.queries.data(), s.q_per_kv, probe.params, &selection);
        s.samples_reselected.fetch_add(1, std::memory_order_relaxed);
      }
      const absl::Status stopped = absl::AbortedError("the session changed during a yield");
      if (selected.ok() && !yield()) selected = stopped;
      // The ranking duel: the same step selected with the other ranking,
      // measured against the same reference (its cost apart).
      Selection trial;
      const std::optional<DescentRanking> trial_ranking = s.quality[index]->TrialRanking();
      int64_t trial_ns = 0;
      if (selected.ok() && trial_ranking.has_value()) {
        SelectParams tp = probe.params;
        tp.ranking = *trial_ranking;
        const int64_t t0 = ThreadCpuNanos();
        selected = selector.Select(probe.queries.data(), s.q_per_kv, tp, &trial);
        trial_ns = ThreadCpuNanos() - t0;
        if (selected.ok() && !yield()) selected = stopped;
      }
      // The method duel's shadow trial: the same step selected with the
      // parked method at its own width, timed as the selection is.
      Selection shadow;
      SelectParams sp = probe.params;
      const bool shadowed = selected.ok() && s.quality[index]->ShadowParams(&sp);
      int64_t shadow_ns = 0;
      if (shadowed) {
        const int64_t t0 = ThreadCpuNanos();
        selected = selector.Select(probe.queries.data(), s.q_per_kv, sp, &shadow);
        shadow_ns = ThreadCpuNanos() - t0;
        if (selected.ok() && !yield()) selected = stopped;
      }
      if (selected.ok()) {
        // Thread CPU time, as the selection's cost (Session::SelectHead).
        const int64_t t0 = ThreadCpuNanos();
        measured = MeasureSelectionPair(selector, probe.queries.data(), s.q_per_kv, probe.params,
                                        selection, trial_ranking.has_value() ? &trial : nullptr,
                                        shadowed ? &shadow : nullptr, yield);
        if (measured.ok()) {
          measured->reference_ns = ThreadCpuNanos() - t0;
          measured->trial_ns = trial_ns;
          measured->method_ns = shadow_ns;
          measured->carried = probe.carried;
          measured->carry_age = probe.carry_age;
        }
      }
    }
  }
  if (!measured.ok()) return SampleOutcome::kStale;
  s.quality[s.SelectorIndex(probe.group, probe.head)]->Record(*measured);
  if (probe.params.carry_steps > 0) {
    s.carry_pool.Observe(measured->mass_ratio, probe.carried, s.config.target_mass_ratio,
                         probe.params.carry_steps, probe.carry_age);
  }
  if (s.width_pool != nullptr) {
    // Pooled widths: every sample taken at the pool's width is one of its
    // (whichever head), then the heads with none of their own follow it.
    if (s.width_pool->AtCurrentWidth(probe.params)) {
      QualitySample pooled = *measured;
      pooled.trial_mass_ratio = -1.0;  // the duels are the heads' own
      pooled.method_mass_ratio = -1.0;
      s.width_pool->Observe(pooled);
    }
    PoolWidths(s);
  }
  *out = *measured;
  return SampleOutcome::kMeasured;
}

SessionQualityInfo QualityInfoOf(const Session& s) {
  SessionQualityInfo q;
  q.monitored = !s.quality.empty();
  q.target_mass_ratio =
      s.config.selector == SelectorKind::kMdci && q.monitored ? s.config.target_mass_ratio : 0.0;
  if (s.width_pool != nullptr) {
    const CalibratorReport pool = s.width_pool->report();
    q.pool_width = pool.width;
    q.pool_samples = pool.samples;
  }
  q.samples_dropped = s.samples_dropped.load();
  q.samples_stale = s.samples_stale.load();
  q.samples_reselected = s.samples_reselected.load();
  q.probe_yields = s.probe_yields.load(std::memory_order_relaxed);
  q.calibration_cpu_ns = s.calibration_cpu_ns.load();
  q.selection_ns = s.selection_ns.load();
  q.carried_selections = s.selects_carried.load(std::memory_order_relaxed);
  const CarryPoolReport carry = s.carry_pool.report();
  q.carry_stopped = carry.stopped;
  q.carry_pool_steps = carry.steps;
  q.carry_shortened = carry.shortened;
  double sum_ratio = 0.0, sum_topk = 0.0, sum_recent = 0.0;
  int heads_sampled = 0;
  for (size_t i = 0; i < s.quality.size(); ++i) {
    const int group = static_cast<int>(i / s.config.kv_heads);
    const int head = static_cast<int>(i % s.config.kv_heads);
    HeadQualityInfo h = s.quality[i]->Report(group, head);
    q.samples += h.samples;
    sum_ratio += h.mean_mass_ratio * h.samples;
    sum_topk += h.mean_topk_recall * h.samples;
    if (h.samples > 0) {
      sum_recent += h.recent_mass_ratio;
      ++heads_sampled;
    }
    if (h.seeded) ++q.seeded_heads;
    if (h.pooled) ++q.pooled_heads;
    q.heads.push_back(h);
  }
  if (q.samples > 0) {
    q.mean_mass_ratio = sum_ratio / q.samples;
    q.mean_topk_recall = sum_topk / q.samples;
    q.recent_mass_ratio = sum_recent / heads_sampled;
  }
  return q;
}

}  // namespace icecache
