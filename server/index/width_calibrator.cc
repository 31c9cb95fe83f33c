#include "server/index/width_calibrator.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/page_select.h"

namespace icecache {

absl::StatusOr<std::unique_ptr<WidthCalibrator>> WidthCalibrator::Create(
    const CalibratorOptions& o, int base_field_of_view, float base_candidate_factor,
    float base_pq_factor) {
  auto bad = [](const char* what, double v) {
    return absl::InvalidArgumentError(absl::StrCat("calibrator ", what, ", got ", v));
  };
  if (!(o.target_ratio > 0.0 && o.target_ratio <= 1.0)) {
    return bad("target_ratio must be in (0, 1]", o.target_ratio);
  }
  RETURN_IF_ERROR(ValidateSampleSchedule(ScheduleOf(o)));
  if (!(o.min_width > 0.0)) return bad("min_width must be > 0", o.min_width);
  if (!(o.max_width >= o.min_width) || !std::isfinite(o.max_width)) {
    return bad("max_width must be finite and >= min_width", o.max_width);
  }
  if (!(o.start_width >= o.min_width && o.start_width <= o.max_width)) {
    return bad("start_width must be in [min_width, max_width]", o.start_width);
  }
  if (!(o.increase > 1.0) || !std::isfinite(o.increase)) {
    return bad("increase must be finite and > 1", o.increase);
  }
  if (!(o.max_increase >= o.increase) || !std::isfinite(o.max_increase)) {
    return bad("max_increase must be finite and >= increase", o.max_increase);
  }
  if (!(o.decrease > 0.0 && o.decrease < 1.0)) return bad("decrease must be in (0, 1)", o.decrease);
  if (!(o.hysteresis >= 0.0)) return bad("hysteresis must be >= 0", o.hysteresis);
  if (o.settle_samples < 1) return bad("settle_samples must be >= 1", o.settle_samples);
  if (o.miss_samples < 1) return bad("miss_samples must be >= 1", o.miss_samples);
  if (!(o.far_below >= 0.0)) return bad("far_below must be >= 0", o.far_below);
  if (o.window < 1) return bad("window must be >= 1", o.window);
  if (o.confirm_every < 0) return bad("confirm_every must be >= 0", o.confirm_every);
  if (!(o.confidence_z >= 0.0) || !std::isfinite(o.confidence_z)) {
    return bad("confidence_z must be finite and >= 0", o.confidence_z);
  }
  if (!(o.exact_cost_ratio >= 0.0) || !std::isfinite(o.exact_cost_ratio)) {
    return bad("exact_cost_ratio must be finite and >= 0", o.exact_cost_ratio);
  }
  if (o.reprobe_steps < 1) return bad("reprobe_steps must be >= 1", o.reprobe_steps);
  if (o.max_reprobe_steps < o.reprobe_steps) {
    return bad("max_reprobe_steps must be >= reprobe_steps", o.max_reprobe_steps);
  }
  if (o.method_trial_steps < 1) return bad("method_trial_steps must be >= 1", o.method_trial_steps);
  if (o.max_method_trial_steps < o.method_trial_steps) {
    return bad("max_method_trial_steps must be >= method_trial_steps", o.max_method_trial_steps);
  }
  if (o.base_ranking != DescentRanking::kLoudest && o.base_ranking != DescentRanking::kNormalized) {
    return bad("base_ranking must be loudest (1) or normalized (2)",
               static_cast<int>(o.base_ranking));
  }
  if (o.ranking_trial_samples < 0) {
    return bad("ranking_trial_samples must be >= 0", o.ranking_trial_samples);
  }
  if (!(o.ranking_margin >= 0.0) || !std::isfinite(o.ranking_margin)) {
    return bad("ranking_margin must be finite and >= 0", o.ranking_margin);
  }
  if (o.ranking_window < 1) return bad("ranking_window must be >= 1", o.ranking_window);
  if (o.carry_steps < 0) return bad("carry_steps must be >= 0", o.carry_steps);
  if (!(o.carry_margin >= 0.0) || !std::isfinite(o.carry_margin)) {
    return bad("carry_margin must be finite and >= 0", o.carry_margin);
  }
  if (!(o.carry_confidence_z >= 0.0) || !std::isfinite(o.carry_confidence_z)) {
    return bad("carry_confidence_z must be finite and >= 0", o.carry_confidence_z);
  }
  if (o.carry_judge_samples < 1) {
    return bad("carry_judge_samples must be >= 1", o.carry_judge_samples);
  }
  if (o.carry_retry_steps < 1) return bad("carry_retry_steps must be >= 1", o.carry_retry_steps);
  if (o.max_carry_retry_steps < o.carry_retry_steps) {
    return bad("max_carry_retry_steps must be >= carry_retry_steps", o.max_carry_retry_steps);
  }
  if (base_field_of_view < 1) return bad("base field_of_view must be >= 1", base_field_of_view);
  if (!(base_candidate_factor > 0.0f)) {
    return bad("base candidate_factor must be > 0", base_candidate_factor);
  }
  if (!(base_pq_factor >= 0.0f) || !std::isfinite(base_pq_factor)) {
    return bad("base pq_factor must be finite and >= 0", base_pq_factor);
  }
  auto c = std::unique_ptr<WidthCalibrator>(
      new WidthCalibrator(o, base_field_of_view, base_candidate_factor, base_pq_factor));
  absl::MutexLock lock(&c->mu_);
  c->release_needed_ = 4LL * o.settle_samples;
  c->trial_needed_ = o.ranking_trial_samples;
  // The scan when the selector keeps codes; the duel parks the tree fresh.
  c->method_ = base_pq_factor > 0.0f ? SearchMethod::kScan : SearchMethod::kTree;
  c->parked_ = c->FreshArm();
  c->carry_on_ = o.carry_steps > 0;
  c->carry_level_ = o.carry_steps;
  c->carry_wait_ = o.carry_retry_steps;
  return c;
}

namespace {

// Weight of a new cost in the calibrator's moving means (after a plain mean
// over the first kCostWindow).
constexpr int64_t kCostWindow = 8;
// A timed cost weighs at most this many times the mean: thread CPU time
// takes in what the selection did not choose to do (a first touch of fresh
// memory: 6-50 ms on this VM, docs/bench/build_append.md), and one such
// spike in a mean over 8 made a head whose scan costs 0.75 ms look as
// costly as the exact scan and fall back to it
// (docs/bench/shadow18_trials.md).
constexpr double kCostSpike = 3.0;

void AddCost(int64_t ns, int64_t* n, double* mean) {
  if (ns <= 0) return;
  double x = static_cast<double>(ns);
  if (*n == 1 && (x > kCostSpike * *mean || *mean > kCostSpike * x)) {
    *mean = std::min(*mean, x);  // of the first two, one is a spike: the other
    *n = 2;
    return;
  }
  if (*n >= 2) x = std::min(x, kCostSpike * *mean);
  *n += 1;
  *mean += (x - *mean) / static_cast<double>(std::min(*n, kCostWindow));
}

}  // namespace

bool WidthCalibrator::ShouldSample(const SelectParams& used, int64_t cost_ns, int carry_age) {
  absl::MutexLock lock(&mu_);
  ++steps_;
  if (!carry_on_ && o_.carry_steps > 0 && ++carry_run_ >= carry_wait_) {
    // Try carrying again, as far as configured: the data may have changed.
    carry_on_ = true;
    carry_level_ = o_.carry_steps;
    carry_wait_ = std::min<int64_t>(2 * carry_wait_, o_.max_carry_retry_steps);
    RestartCarry();
  }
  if (used.exhaustive) {
    CountExactStep(cost_ns);
    return false;  // the selection is the reference
  }
  // Not one made before a width (or method) change.
  const bool method_now =
      used.method == method_ || (used.method == SearchMethod::kSelector && !DuelOn());
  if (method_now && used.field_of_view == static_cast<int>(std::lround(base_fov_ * width_))) {
    AddCost(cost_ns, &tree_cost_n_, &tree_cost_);
    if (carry_age == 0) AddCost(cost_ns, &fresh_cost_n_, &fresh_cost_);
  }
  if (!method_trial_) ++method_run_;
  const bool due = schedule_.Step(cost_ns);
  // The tree on trial: judge it quickly. A due sample whose carry age (0:
  // fresh) is ahead of its share waits for the next selection (it stays
  // due), so a sampling interval in step with the carry's period cannot
  // measure one age only (at carry 2, waiting by kind alone took the first
  // carried select after a fresh one twice as often as the second).
  const bool sample =
      probing_ || ((due || ConfirmDue()) && !CarrySkewed(used.carry_steps, carry_age));
  if (sample && ShadowDue(cost_ns)) StartShadow();
  return sample;
}

bool WidthCalibrator::ConfirmDue() const {
  if (o_.confirm_every <= 0 || mode_ != SelectMode::kTree || !schedule_.warm()) return false;
  // One sample under the target at a fresh width: its next sample decides
  // the miss (miss_samples).
  return schedule_.since() >= o_.confirm_every && at_width_ > 0 && at_width_ < o_.miss_samples &&
         mean_at_width_ < o_.target_ratio;
}

bool WidthCalibrator::CarrySkewed(int carry_steps, int carry_age) {
  // A selection made without the carry (it stopped, or the caller selected
  // afresh: the session's pooled judgement, a concurrent select) has no
  // share to keep.
  if (!carry_on_ || carry_steps <= 0) return false;
  const size_t ages = static_cast<size_t>(carry_steps) + 1;
  if (carry_ages_.size() != ages) carry_ages_.assign(ages, 0);
  const size_t age = static_cast<size_t>(std::clamp(carry_age, 0, carry_steps));
  int64_t total = 0;
  for (int64_t n : carry_ages_) total += n;
  if (static_cast<double>(carry_ages_[age] + 1) >
      static_cast<double>(total + 1) / static_cast<double>(ages) + 1.0) {
    return true;
  }
  ++carry_ages_[age];  // the sample is decided (a dropped one is dropped at any age alike)
  return false;
}

bool WidthCalibrator::CarryJudged() const {
  absl::MutexLock lock(&mu_);
  return carry_samples_.Upto(carry_level_).Judged(o_.carry_judge_samples);
}

void WidthCalibrator::RestartCarry() {
  carry_samples_.Clear();
  carry_ages_.clear();
  carry_run_ = 0;
}

void WidthCalibrator::ObserveCarry(double ratio, bool carried, int carry_age) {
  if (!carry_on_) return;
  carry_samples_.Add(ratio, carried, carry_age, o_.carry_steps);
  // Where the carry falls behind, one reuse fewer, judged at once on the
  // ages it keeps; where even one does, it stops.
  const int holding = carry_samples_.Holding(carry_level_, o_.carry_judge_samples, o_.carry_margin,
                                             o_.target_ratio, o_.carry_confidence_z);
  if (holding == carry_level_) return;
  carry_shortened_ += carry_level_ - std::max(holding, 1);
  if (holding > 0) {
    carry_level_ = holding;
    return;
  }
  carry_level_ = 1;
  carry_on_ = false;
  ++carry_stops_;
  RestartCarry();
}

void WidthCalibrator::Taken() {
  absl::MutexLock lock(&mu_);
  schedule_.Taken();
}

SampleScheduleOptions WidthCalibrator::ScheduleOf(const CalibratorOptions& o) {
  SampleScheduleOptions so;
  so.warmup = o.warmup_samples;
  so.warmup_every = o.warmup_every;
  so.min_every = o.sample_every;
  so.max_every = o.max_sample_every;
  so.share = o.sample_share;
  return so;
}

void WidthCalibrator::CountExactStep(int64_t cost_ns) {
  ++exact_steps_;
  AddCost(cost_ns, &exact_cost_n_, &exact_cost_);
  if (mode_ != SelectMode::kExact || ++exact_run_ < reprobe_wait_) return;
  // Try the tree again at the width it left: the data may have changed.
  mode_ = SelectMode::kTree;
  probing_ = true;
  ++reprobes_;
  last_change_step_ = steps_;
  RestartTally();
}

void WidthCalibrator::RestartTally() {
  at_width_ = 0;
  mean_at_width_ = 0.0;
  var_at_width_ = 0.0;
  tree_cost_n_ = 0;
  tree_cost_ = 0.0;
  fresh_cost_n_ = 0;
  fresh_cost_ = 0.0;
}

void WidthCalibrator::SetWidth(double w) {
  w = std::clamp(w, o_.min_width, o_.max_width);
  if (w != width_) {
    ++changes_;
    last_change_step_ = steps_;
    RestartTally();  // the mean and the cost start over at the new width
  }
  width_ = w;
}

bool WidthCalibrator::TreeDoesNotPay(bool miss) const {
  if (miss && width_ >= o_.max_width) return true;  // nothing wider to try
  if (o_.exact_cost_ratio <= 0.0 || tree_cost_n_ == 0 || exact_cost_n_ == 0) return false;
  const double limit = o_.exact_cost_ratio * exact_cost_;
  // A miss needs a wider (costlier) width; a width that costs the exact
  // selection's price already buys less than it.
  return miss ? tree_cost_ * o_.increase >= limit
              : at_width_ >= o_.miss_samples && tree_cost_ >= limit;
}

void WidthCalibrator::FallBack() {
  mode_ = SelectMode::kExact;
  // The first wait is reprobe_steps; every fallback after it doubles it.
  reprobe_wait_ = fallbacks_ == 0 ? o_.reprobe_steps
                                  : std::min<int64_t>(o_.max_reprobe_steps, 2 * reprobe_wait_);
  ++fallbacks_;
  probing_ = false;
  exact_run_ = 0;
  last_change_step_ = steps_;
}

void WidthCalibrator::Observe(const QualitySample& sample) {
  absl::MutexLock lock(&mu_);
  ++samples_;
  last_ratio_ = sample.mass_ratio;
  sum_ratio_ += sample.mass_ratio;
  sum_topk_ += sample.topk_recall;
  AddCost(sample.reference_ns, &exact_cost_n_, &exact_cost_);
  // The duels' selections are part of what sampling costs.
  schedule_.Reference(sample.reference_ns > 0
                          ? sample.reference_ns + std::max<int64_t>(0, sample.trial_ns) +
                                std::max<int64_t>(0, sample.method_ns)
                          : 0);
  if (mode_ == SelectMode::kExact) return;  // a late sample of the tree: moot now
  // The warm-up's carried samples rate the carry, not the width: a head
  // whose queries move fast would otherwise widen for its carried steps
  // before the judgement could stop them (docs/bench/carry36.md).
  const bool rate_carry_only = carry_on_ && sample.carried && samples_ <= o_.warmup_samples;
  ObserveCarry(sample.mass_ratio, sample.carried, sample.carry_age);
  if (rate_carry_only) {
    // (no width step)
  } else if (sample.trial_mass_ratio >= 0.0 && TrialRunning() &&
             ObserveTrial(sample.mass_ratio, sample.trial_mass_ratio)) {
    AdaptWidth(sample.trial_mass_ratio);  // the new ranking's first sample
  } else {
    AdaptWidth(sample.mass_ratio);
  }
  // The shadow trial's selection of the same step (moot when the step ended
  // the shadow: a give-up hands the parked method the selections).
  if (sample.method_mass_ratio >= 0.0 && shadow_ && mode_ == SelectMode::kTree && !method_trial_) {
    ObserveShadow(sample.method_mass_ratio, sample.method_ns);
  }
}

bool WidthCalibrator::TrialRunning() const {
  // The duel ranks the descent's nodes: nothing to rank for the scan.
  return o_.ranking_trial_samples > 0 && mode_ == SelectMode::kTree &&
         method_ == SearchMethod::kTree;
}

namespace {

DescentRanking OtherRanking(DescentRanking r) {
  return r == DescentRanking::kNormalized ? DescentRanking::kLoudest : DescentRanking::kNormalized;
}

}  // namespace

std::optional<DescentRanking> WidthCalibrator::TrialRanking() const {
  absl::MutexLock lock(&mu_);
  if (!TrialRunning()) return std::nullopt;
  return OtherRanking(ranking_);
}

void WidthCalibrator::SetWidthParams(double width, SearchMethod method,
                                     SelectParams* params) const {
  params->field_of_view = static_cast<int>(std::lround(base_fov_ * width));
  params->candidate_factor = base_factor_ * static_cast<float>(width);
  params->pq_factor = method == SearchMethod::kScan ? base_pq_ * static_cast<float>(width) : 0.0f;
  params->method = method;
}

bool WidthCalibrator::ShadowParams(SelectParams* params) const {
  absl::MutexLock lock(&mu_);
  if (!shadow_) return false;
  // The parked method is the other one.
  SetWidthParams(parked_.width,
                 method_ == SearchMethod::kTree ? SearchMethod::kScan : SearchMethod::kTree,
                 params);
  params->exhaustive = false;
  params->ranking = ranking_;
  return true;
}

bool WidthCalibrator::ObserveTrial(double ratio, double trial_ratio) {
  ++trial_n_;
  ++trial_since_;
  const double a = 1.0 / static_cast<double>(std::min<int64_t>(trial_since_, o_.ranking_window));
  trial_gain_ += a * ((trial_ratio - ratio) - trial_gain_);
  // Each switch doubles the margin the next one needs: a head whose
  // rankings are about equal stops switching (no oscillation; past a
  // margin of 1 nothing switches), while a clearly worse choice -- the
  // first steps can mislead -- is undone after as few samples as the first.
  const double margin = o_.ranking_margin *
                        std::ldexp(1.0, static_cast<int>(std::min<int64_t>(ranking_switches_, 60)));
  if (trial_since_ < trial_needed_ || trial_gain_ <= margin) return false;
  ranking_ = OtherRanking(ranking_);
  ++ranking_switches_;
  trial_since_ = 0;
  trial_gain_ = 0.0;
  // The tally at this width says nothing about the new ranking. The floor
  // stays: the new ranking did better at these widths, and a floor that is
  // too high is released after a comfortable streak.
  ++changes_;
  last_change_step_ = steps_;
  RestartTally();
  release_streak_ = 0;
  return true;
}

bool WidthCalibrator::MeanMisses() const {
  if (at_width_ < o_.miss_samples) return false;
  if (mean_at_width_ < o_.target_ratio) return true;
  if (o_.confidence_z <= 0.0 || at_width_ < std::max(2, o_.settle_samples)) return false;
  return mean_at_width_ - o_.confidence_z * MeanError() < o_.target_ratio;
}

double WidthCalibrator::MeanError() const {
  if (at_width_ < 2) return 0.0;
  // The standard error of the mean over the samples it rests on (the moving
  // mean weighs about `window` of them).
  const double n = static_cast<double>(std::min<int64_t>(at_width_, std::max(2, o_.window)));
  return std::sqrt(std::max(0.0, var_at_width_) / (n - 1.0));
}

void WidthCalibrator::AdaptWidth(double ratio) {
  // A trial whose selections already cost what the incumbent's do, on a
  // sample that would not narrow it: more samples can only widen it
  // (costlier). The incumbent resumes; this sample was the trial's.
  if (DuelOn() && method_trial_ && tree_cost_n_ >= 2 && tree_cost_ >= trial_bar_ &&
      ratio < o_.target_ratio + o_.hysteresis) {
    EndTrial(/*won=*/false);
    return;
  }
  // The trial is judged at the width it had when its probe ends: a
  // comfortable mean may narrow it in the same step, restarting its tally.
  const bool trial_open = DuelOn() && method_trial_ && probing_;
  const int64_t cost_n = tree_cost_n_;
  const double cost = tree_cost_;
  StepWidth(ratio);
  if (!DuelOn() || mode_ != SelectMode::kTree) return;
  if (trial_open && method_trial_ && !probing_) {
    EndTrial(/*won=*/cost_n == 0 || cost < trial_bar_);
    return;
  }
  Duel();
}

CalibratorArm WidthCalibrator::FreshArm() const {
  CalibratorArm a;
  a.width = o_.start_width;
  a.floor = o_.min_width;
  a.release_needed = 4LL * o_.settle_samples;
  return a;
}

CalibratorArm WidthCalibrator::CurrentArm() const {
  CalibratorArm a;
  a.width = width_;
  a.floor = floor_;
  a.at_width = at_width_;
  a.mean_at_width = mean_at_width_;
  a.var_at_width = var_at_width_;
  a.release_streak = release_streak_;
  a.release_needed = release_needed_;
  a.released = released_;
  a.cost_n = tree_cost_n_;
  a.cost = tree_cost_;
  a.fresh_cost_n = fresh_cost_n_;
  a.fresh_cost = fresh_cost_;
  a.tried = true;
  return a;
}

void WidthCalibrator::LoadArm(const CalibratorArm& a) {
  width_ = a.width;
  floor_ = a.floor;
  at_width_ = a.at_width;
  mean_at_width_ = a.mean_at_width;
  var_at_width_ = a.var_at_width;
  release_streak_ = a.release_streak;
  release_needed_ = a.release_needed;
  released_ = a.released;
  tree_cost_n_ = a.cost_n;
  tree_cost_ = a.cost;
  fresh_cost_n_ = a.fresh_cost_n;
  fresh_cost_ = a.fresh_cost;
}

void WidthCalibrator::SwapMethod() {
  const CalibratorArm now = CurrentArm();
  LoadArm(parked_);
  parked_ = now;
  method_ = method_ == SearchMethod::kScan ? SearchMethod::kTree : SearchMethod::kScan;
  ++changes_;
  last_change_step_ = steps_;
  // The carry's judgement rated the other method's candidates (the tree's
  // narrow descent goes stale faster on drifting queries than the scan's):
  // the carry starts over with this method, on again if it had stopped
  // (its retry wait keeps doubling).
  if (o_.carry_steps > 0) {
    carry_on_ = true;
    carry_level_ = o_.carry_steps;
    RestartCarry();
  }
}

bool WidthCalibrator::Judged() const {
  return mode_ == SelectMode::kTree && !probing_ && at_width_ >= o_.settle_samples &&
         !MeanMisses() && mean_at_width_ >= o_.target_ratio;
}

namespace {

// The bar of a trial against exact selection whose cost was never timed.
constexpr double kNoBar = 1e30;

}  // namespace

void WidthCalibrator::GiveUp() {
  if (method_trial_) {
    EndTrial(/*won=*/false);  // back to the incumbent (or to exact, if it had given up)
    return;
  }
  if (DuelOn() && (shadow_ || !parked_.tried || method_run_ >= method_wait_)) {
    // What exact selection would cost (the fallback's own threshold).
    const double ratio = o_.exact_cost_ratio > 0.0 ? o_.exact_cost_ratio : 1.0;
    const bool from_shadow = shadow_;
    shadow_ = false;
    StartTrial(exact_cost_n_ > 0 ? ratio * exact_cost_ : kNoBar, /*exact=*/true, from_shadow);
    return;
  }
  FallBack();
}

void WidthCalibrator::StartTrial(double bar, bool exact, bool from_shadow) {
  trial_bar_ = bar;
  trial_exact_ = exact;
  method_trial_ = true;
  if (!from_shadow) ++method_trials_;
  SwapMethod();
  // The parked tally may be old: the data has moved on since (not a
  // shadow's: it was taken on the latest samples). Its width and floor
  // stay.
  if (!from_shadow) {
    RestartTally();
    release_streak_ = 0;
  }
  probing_ = true;  // every selection sampled until judged
}

bool WidthCalibrator::ShadowDue(int64_t cost_ns) const {
  // The duel compares costs: only timed selections start one.
  return DuelOn() && cost_ns > 0 && mode_ == SelectMode::kTree && !probing_ && !method_trial_ &&
         !shadow_ && (!parked_.tried || method_run_ >= method_wait_ || CostlierThanParked());
}

bool WidthCalibrator::CostlierThanParked() const {
  // The last trial was decided on the costs of that time. The method in use
  // now costs clearly more than the parked one did (most often because
  // harder queries widened it; a machine that slowed since can do it too,
  // and the trial then measures both again for a few selections' cost):
  // the decision's ground is gone, so the parked method is tried again
  // now, not a doubled wait later. At most once in kRetrialSpacing
  // selections, and only on a cost measured over kRetrialCostSamples
  // selections at the current width.
  return parked_.tried && parked_.cost_n > 0 && DuelCostSamples() >= kRetrialCostSamples &&
         method_run_ >= kRetrialSpacing && DuelCost() > kRetrialMargin * ArmDuelCost(parked_);
}

double WidthCalibrator::DuelCost() const {
  return o_.duel_fresh_costs && fresh_cost_n_ > 0 ? fresh_cost_ : tree_cost_;
}

double WidthCalibrator::ArmDuelCost(const CalibratorArm& a) const {
  return o_.duel_fresh_costs && a.fresh_cost_n > 0 ? a.fresh_cost : a.cost;
}

int64_t WidthCalibrator::DuelCostSamples() const {
  return o_.duel_fresh_costs && fresh_cost_n_ > 0 ? fresh_cost_n_ : tree_cost_n_;
}

void WidthCalibrator::StartShadow() {
  shadow_ = true;
  ++method_trials_;
  // The parked tally may be old; its width and floor stay.
  parked_.tried = true;
  parked_.at_width = 0;
  parked_.mean_at_width = 0.0;
  parked_.var_at_width = 0.0;
  parked_.cost_n = 0;
  parked_.cost = 0.0;
  parked_.fresh_cost_n = 0;
  parked_.fresh_cost = 0.0;
  parked_.release_streak = 0;
}

void WidthCalibrator::ObserveShadow(double ratio, int64_t cost_ns) {
  // The incumbent's cost: timed on every selection at its width; final once
  // the incumbent is judged.
  const bool incumbent_known = tree_cost_n_ > 0;
  const bool incumbent_judged = incumbent_known && Judged();
  // The incumbent's mean cost, or its fresh selections' (DuelCost).
  const double bar = DuelCost();
  // Step the parked arm as the one in use would be stepped (StepWidth), with
  // the head's own state (probing, change counts) kept as it is.
  const CalibratorArm incumbent = CurrentArm();
  const bool probing = probing_;
  const int64_t changes = changes_, last_change = last_change_step_;
  LoadArm(parked_);
  probing_ = false;
  AddCost(cost_ns, &tree_cost_n_, &tree_cost_);
  AddCost(cost_ns, &fresh_cost_n_, &fresh_cost_);  // a shadow selection is fresh
  const int64_t cost_n = tree_cost_n_;
  const double cost = tree_cost_;
  const double width = width_;
  bool lost = false, judged = false;
  if (incumbent_judged && cost_n >= 2 && cost >= bar && ratio < o_.target_ratio + o_.hysteresis) {
    lost = true;  // more samples can only widen it (costlier): as a full trial's abort
  } else {
    shadow_step_ = true;
    shadow_gave_up_ = false;
    StepWidth(ratio);
    shadow_step_ = false;
    lost = shadow_gave_up_;
    // Judged at the width the sample rated: a comfortable mean may narrow
    // it in the same step, restarting its tally (as a full trial's probe).
    judged = !lost && (width_ < width || Judged());
  }
  parked_ = CurrentArm();
  LoadArm(incumbent);
  probing_ = probing;
  changes_ = changes;
  last_change_step_ = last_change;
  if (lost) {
    EndShadow(/*won=*/false);
  } else if (judged && incumbent_known && cost_n > 0 && cost < bar) {
    EndShadow(/*won=*/true);
  } else if (judged && incumbent_judged) {
    EndShadow(/*won=*/false);
  }
}

void WidthCalibrator::WaitForNextTrial() {
  method_run_ = 0;
  method_wait_ = method_wait_ == 0 ? o_.method_trial_steps
                                   : std::min<int64_t>(o_.max_method_trial_steps, 2 * method_wait_);
}

void WidthCalibrator::EndShadow(bool won) {
  shadow_ = false;
  WaitForNextTrial();
  if (won) {
    ++method_switches_;
    SwapMethod();  // the parked method, with its tally; the incumbent parked with its own
  }
}

void WidthCalibrator::EndTrial(bool won) {
  method_trial_ = false;
  WaitForNextTrial();
  if (won) {
    ++method_switches_;
  } else {
    SwapMethod();  // the incumbent, with its tally
    probing_ = false;
    if (trial_exact_) FallBack();
  }
  trial_exact_ = false;
}

void WidthCalibrator::Duel() {
  // Trials start as shadows (ShouldSample); a full one runs after a give-up.
  if (method_trial_ && Judged()) EndTrial(/*won=*/tree_cost_ < trial_bar_);
}

void WidthCalibrator::StepWidth(double ratio) {
  ++at_width_;
  // Moving mean and variance (West's weighted update: with weight 1 / n the
  // plain population variance, then an exponentially weighted one).
  const double a = 1.0 / static_cast<double>(std::min<int64_t>(at_width_, o_.window));
  const double d = ratio - mean_at_width_;
  mean_at_width_ += a * d;
  var_at_width_ = (1.0 - a) * (var_at_width_ + a * d * d);
  const bool mean_misses = MeanMisses();
  const bool miss = mean_misses || ratio < o_.target_ratio - o_.far_below;
  if (TreeDoesNotPay(miss)) {
    if (miss) floor_ = std::min(o_.max_width, width_ * std::sqrt(o_.increase));
    if (shadow_step_) {
      shadow_gave_up_ = true;  // the shadow trial is lost; the head goes on as it was
      return;
    }
    GiveUp();
    return;
  }
  if (probing_ && !miss && at_width_ >= o_.settle_samples) probing_ = false;  // the tree pays again
  if (miss) {
    // Up at once, and never come back down to the width that missed.
    floor_ = std::min(o_.max_width, width_ * std::sqrt(o_.increase));
    // By the mean's shortfall, the part of it the samples are sure of (the
    // mean + confidence_z standard errors: a step sized on noise overshoots,
    // and coming back down takes many samples); a single sample far below
    // is too noisy to size it at all: the fixed step.
    SetWidth(width_ * (mean_misses ? RaiseFactor(mean_at_width_ + o_.confidence_z * MeanError())
                                   : o_.increase));
    release_streak_ = 0;
    if (released_) release_needed_ *= 2;  // lowering the floor did not pay
    released_ = false;
    return;
  }
  if (at_width_ < o_.settle_samples || mean_at_width_ < o_.target_ratio + o_.hysteresis) {
    release_streak_ = 0;  // too few samples here yet, or on target: hold
    return;
  }
  if (width_ > floor_) {
    SetWidth(std::max(floor_, width_ * o_.decrease));
    return;
  }
  // At the floor and comfortable for a long time: the data may have become
  // easier; let the width go lower again.
  if (++release_streak_ >= release_needed_ && floor_ > o_.min_width) {
    floor_ = std::max(o_.min_width, floor_ * o_.decrease);
    SetWidth(floor_);
    release_streak_ = 0;
    released_ = true;
  }
}

double WidthCalibrator::RaiseFactor(double ratio) const {
  // The mass a width misses, 1 - ratio, falls about as 1 / width (the
  // descent's candidates and the scan's scored pages grow with it): the
  // width that meets the target is width x (1 - ratio) / (1 - target). A
  // miss on the confidence bound alone (its mean on target) takes the
  // fixed step.
  if (!(ratio < o_.target_ratio) || o_.target_ratio >= 1.0) return o_.increase;
  return std::clamp((1.0 - ratio) / (1.0 - o_.target_ratio), o_.increase, o_.max_increase);
}

void WidthCalibrator::Apply(SelectParams* params) const {
  absl::MutexLock lock(&mu_);
  SetWidthParams(width_, method_, params);
  params->exhaustive = mode_ == SelectMode::kExact;
  params->ranking = ranking_;
  params->carry_steps = carry_on_ && mode_ != SelectMode::kExact ? carry_level_ : 0;
}

CalibratorReport WidthCalibrator::report() const {
  absl::MutexLock lock(&mu_);
  CalibratorReport r;
  r.width = width_;
  SelectParams now;
  SetWidthParams(width_, method_, &now);
  r.field_of_view = now.field_of_view;
  r.candidate_factor = now.candidate_factor;
  r.pq_factor = now.pq_factor;
  r.steps = steps_;
  r.samples = samples_;
  r.changes = changes_;
  r.last_change_step = last_change_step_;
  r.last_ratio = last_ratio_;
  if (samples_ > 0) {
    r.mean_ratio = sum_ratio_ / samples_;
    r.mean_topk_recall = sum_topk_ / samples_;
  }
  r.mode = mode_;
  r.exact_steps = exact_steps_;
  r.fallbacks = fallbacks_;
  r.reprobes = reprobes_;
  r.tree_cost_ns = tree_cost_;
  r.fresh_cost_ns = fresh_cost_;
  r.exact_cost_ns = exact_cost_;
  r.sample_interval = schedule_.Interval();
  r.ranking = ranking_;
  r.trial_samples = trial_n_;
  r.trial_gain = trial_gain_;
  r.ranking_switches = ranking_switches_;
  r.seeded = seeded_;
  r.pooled = pooled_;
  r.method = method_;
  r.method_trials = method_trials_;
  r.method_switches = method_switches_;
  r.carry_steps = carry_on_ ? carry_level_ : 0;
  r.carry_stops = carry_stops_;
  r.carry_shortened = carry_shortened_;
  const CarryTally carry = carry_samples_.Upto(carry_level_);
  r.carry_samples = carry.carried;
  r.fresh_samples = carry.fresh;
  r.carry_mean = carry.carried_mean();
  r.fresh_mean = carry.fresh_mean();
  r.method_trial = method_trial_ || shadow_;
  if (DuelOn()) {
    r.other_width = parked_.width;
    r.other_cost_ns = parked_.cost;
    r.other_fresh_cost_ns = parked_.fresh_cost;
  }
  return r;
}

std::optional<CalibratorSeed> WidthCalibrator::SeedOf(int64_t min_samples) const {
  absl::MutexLock lock(&mu_);
  const bool exact = mode_ == SelectMode::kExact;
  // A seeded head passes its seed on (corrected by whatever it measured):
  // what several short sessions learn adds up.
  if (!exact && !seeded_ && samples_ < std::max<int64_t>(1, min_samples)) return std::nullopt;
  return CalibratorSeed{width_, ranking_, exact, method_};
}

absl::Status WidthCalibrator::Seed(const CalibratorSeed& seed, int warmup_left) {
  if (!(seed.width >= o_.min_width && seed.width <= o_.max_width)) {
    return absl::InvalidArgumentError(absl::StrCat("calibrator seed: width must be in [",
                                                   o_.min_width, ", ", o_.max_width, "], got ",
                                                   seed.width));
  }
  if (seed.ranking != DescentRanking::kLoudest && seed.ranking != DescentRanking::kNormalized) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibrator seed: ranking must be loudest (1) or normalized (2), got ",
                     static_cast<int>(seed.ranking)));
  }
  if (seed.method != SearchMethod::kSelector && seed.method != SearchMethod::kTree &&
      seed.method != SearchMethod::kScan) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibrator seed: method must be selector (0), tree (1) or scan (2), got ",
                     static_cast<int>(seed.method)));
  }
  absl::MutexLock lock(&mu_);
  if (steps_ != 0 || samples_ != 0) {
    return absl::FailedPreconditionError(absl::StrCat("calibrator seed: the head has counted ",
                                                      steps_,
                                                      " selections; only a fresh one is seeded"));
  }
  // The seed's width is its method's; a head without the duel keeps its
  // only method.
  if (DuelOn() && seed.method != SearchMethod::kSelector && seed.method != method_) {
    SwapMethod();
    changes_ = 0;
    last_change_step_ = 0;
  }
  // A seed with its method is what an earlier session's duel decided: the
  // other method waits a whole trial interval instead of going on trial at
  // once (the first trial, every selection sampled, is most of what the
  // duel costs over a short session: docs/bench/duel17_methods.md).
  if (DuelOn() && seed.method != SearchMethod::kSelector) {
    parked_.tried = true;
    method_wait_ = o_.method_trial_steps;
    method_run_ = 0;
  }
  width_ = seed.width;
  ranking_ = seed.ranking;
  if (seed.exact) {
    mode_ = SelectMode::kExact;
    reprobe_wait_ = o_.reprobe_steps;
    exact_run_ = 0;
  }
  schedule_.ShortenWarmup(warmup_left);
  seeded_ = true;
  return absl::OkStatus();
}

int64_t WidthCalibrator::taken() const {
  absl::MutexLock lock(&mu_);
  return schedule_.taken();
}

bool WidthCalibrator::AtCurrentWidth(const SelectParams& used) const {
  absl::MutexLock lock(&mu_);
  if (used.exhaustive) return false;
  SelectParams now;
  SetWidthParams(width_, method_, &now);
  return used.field_of_view == now.field_of_view && used.candidate_factor == now.candidate_factor &&
         used.pq_factor == now.pq_factor;
}

bool WidthCalibrator::AdoptPooled(double width) {
  if (!(width >= o_.min_width && width <= o_.max_width)) return false;
  absl::MutexLock lock(&mu_);
  if (samples_ != 0 || seeded_ || mode_ != SelectMode::kTree || probing_ || DuelOn()) return false;
  if (width != width_) {
    width_ = width;
    last_change_step_ = steps_;
    RestartTally();  // the cost is measured anew at the pooled width
  }
  pooled_ = width_ != o_.start_width;  // where heads start: nothing taken from the pool
  return true;
}

CalibratorState WidthCalibrator::state() const {
  absl::MutexLock lock(&mu_);
  CalibratorState s;
  s.width = width_;
  s.floor = floor_;
  s.at_width = at_width_;
  s.mean_at_width = mean_at_width_;
  s.var_at_width = var_at_width_;
  s.release_streak = release_streak_;
  s.release_needed = release_needed_;
  s.released = released_;
  s.steps = steps_;
  s.samples = samples_;
  s.changes = changes_;
  s.last_change_step = last_change_step_;
  s.last_ratio = last_ratio_;
  s.sum_ratio = sum_ratio_;
  s.sum_topk = sum_topk_;
  s.schedule = schedule_.state();
  s.mode = mode_;
  s.probing = probing_;
  s.tree_cost_n = tree_cost_n_;
  s.tree_cost = tree_cost_;
  s.exact_cost_n = exact_cost_n_;
  s.exact_cost = exact_cost_;
  s.exact_run = exact_run_;
  s.reprobe_wait = reprobe_wait_;
  s.exact_steps = exact_steps_;
  s.fallbacks = fallbacks_;
  s.reprobes = reprobes_;
  s.ranking = ranking_;
  s.trial_n = trial_n_;
  s.trial_since = trial_since_;
  s.trial_needed = trial_needed_;
  s.trial_gain = trial_gain_;
  s.ranking_switches = ranking_switches_;
  s.seeded = seeded_;
  s.method = method_;
  s.parked = parked_;
  s.method_trial = method_trial_;
  s.trial_exact = trial_exact_;
  s.method_shadow = shadow_;
  s.trial_bar = trial_bar_;
  s.method_wait = method_wait_;
  s.method_run = method_run_;
  s.method_trials = method_trials_;
  s.method_switches = method_switches_;
  return s;
}

namespace {

// The checks of WidthCalibrator::Restore ("" when `s` is in range).
std::string ArmProblem(const CalibratorOptions& o, const CalibratorArm& a) {
  if (!(a.width >= o.min_width && a.width <= o.max_width) ||
      !(a.floor >= o.min_width && a.floor <= o.max_width)) {
    return absl::StrCat("parked width and floor must be in [", o.min_width, ", ", o.max_width,
                        "], got ", a.width, " and ", a.floor);
  }
  if (a.at_width < 0 || a.at_width > kMaxStateCount || a.release_streak < 0 ||
      a.release_streak > kMaxStateCount || a.release_needed < 1 ||
      a.release_needed > kMaxStateCount || a.cost_n < 0 || a.cost_n > kMaxStateCount) {
    return "parked counts out of range";
  }
  for (double v : {a.mean_at_width, a.var_at_width, a.cost}) {
    if (!(v >= 0.0 && std::isfinite(v))) {
      return absl::StrCat("parked means must be finite and >= 0, got ", v);
    }
  }
  return "";
}

std::string StateProblem(const CalibratorOptions& o, const CalibratorState& s, bool duel,
                         bool scan) {
  const auto count = [](int64_t v, int64_t hi = kMaxStateCount) { return v >= 0 && v <= hi; };
  const auto mean = [](double v) { return v >= 0.0 && std::isfinite(v); };
  if (!(s.width >= o.min_width && s.width <= o.max_width)) {
    return absl::StrCat("width must be in [", o.min_width, ", ", o.max_width, "], got ", s.width);
  }
  if (!(s.floor >= o.min_width && s.floor <= o.max_width)) {
    return absl::StrCat("floor must be in [", o.min_width, ", ", o.max_width, "], got ", s.floor);
  }
  if (!count(s.steps)) return absl::StrCat("steps out of range, got ", s.steps);
  const std::pair<const char*, int64_t> counts[] = {
      {"at_width", s.at_width},       {"release_streak", s.release_streak},
      {"samples", s.samples},         {"changes", s.changes},
      {"tree_cost_n", s.tree_cost_n}, {"exact_cost_n", s.exact_cost_n},
      {"exact_run", s.exact_run},     {"fallbacks", s.fallbacks},
      {"reprobes", s.reprobes},       {"exact_steps", s.exact_steps}};
  for (const auto& [name, v] : counts) {
    if (!count(v)) return absl::StrCat(name, " out of range, got ", v);
  }
  if (!count(s.last_change_step, s.steps) || s.exact_steps > s.steps) {
    return absl::StrCat("last_change_step and exact_steps must be in 0..steps (", s.steps, ")");
  }
  if (s.release_needed < 1 || s.release_needed > kMaxStateCount) {
    return absl::StrCat("release_needed out of range, got ", s.release_needed);
  }
  if (!count(s.reprobe_wait, o.max_reprobe_steps) ||
      (s.mode == SelectMode::kExact && s.reprobe_wait < 1)) {
    return absl::StrCat("reprobe_wait must be in ", s.mode == SelectMode::kExact ? 1 : 0, "..",
                        o.max_reprobe_steps, ", got ", s.reprobe_wait);
  }
  const std::pair<const char*, double> means[] = {
      {"mean_at_width", s.mean_at_width}, {"var_at_width", s.var_at_width},
      {"last_ratio", s.last_ratio},       {"sum_ratio", s.sum_ratio},
      {"sum_topk", s.sum_topk},           {"tree_cost", s.tree_cost},
      {"exact_cost", s.exact_cost}};
  for (const auto& [name, v] : means) {
    if (!mean(v)) return absl::StrCat(name, " must be finite and >= 0, got ", v);
  }
  if (s.ranking != DescentRanking::kSelector && s.ranking != DescentRanking::kLoudest &&
      s.ranking != DescentRanking::kNormalized) {
    return absl::StrCat("ranking must be selector (0), loudest (1) or normalized (2), got ",
                        static_cast<int>(s.ranking));
  }
  if (!count(s.trial_n)) return absl::StrCat("trial_n out of range, got ", s.trial_n);
  if (!count(s.trial_since, s.trial_n)) {
    return absl::StrCat("trial_since must be in 0..trial_n, got ", s.trial_since);
  }
  if (!count(s.trial_needed, kMaxStateCount / 2)) {
    return absl::StrCat("trial_needed out of range, got ", s.trial_needed);
  }
  if (!count(s.ranking_switches, s.trial_n)) {
    return absl::StrCat("ranking_switches must be in 0..trial_n, got ", s.ranking_switches);
  }
  if (!(std::abs(s.trial_gain) <= 2.0)) {
    return absl::StrCat("trial_gain must be finite and in [-2, 2], got ", s.trial_gain);
  }
  if (s.method != SearchMethod::kSelector && s.method != SearchMethod::kTree &&
      s.method != SearchMethod::kScan) {
    return absl::StrCat("method must be selector (0), tree (1) or scan (2), got ",
                        static_cast<int>(s.method));
  }
  if (s.method == SearchMethod::kSelector) return "";  // an older snapshot: no duel state
  if (s.method == SearchMethod::kScan && !scan) {
    return "method scan, but the selector keeps no product-quantised codes";
  }
  if ((s.method == SearchMethod::kScan) != scan && !duel) {  // codes, duel off: the scan only
    return absl::StrCat("method ", std::string(SearchMethodName(s.method)), " is not this head's (",
                        scan ? "scan" : "tree", ")");
  }
  if ((s.method_trial || s.method_shadow) && !duel) {
    return "a method trial, but this head has no method duel";
  }
  if (s.method_shadow && (s.method_trial || s.mode == SelectMode::kExact || s.probing)) {
    return "a shadow trial, but the head is on a full trial, in exact mode or probing";
  }
  if (std::string why = ArmProblem(o, s.parked); !why.empty()) return why;
  if (!(s.trial_bar >= 0.0 && s.trial_bar <= kNoBar)) {
    return absl::StrCat("trial_bar must be in [0, 1e30], got ", s.trial_bar);
  }
  if (!count(s.method_wait, o.max_method_trial_steps) || !count(s.method_run) ||
      !count(s.method_trials) || !count(s.method_switches, s.method_trials)) {
    return absl::StrCat("method_wait (<= ", o.max_method_trial_steps,
                        "), method_run, method_trials or method_switches (<= method_trials) out of "
                        "range");
  }
  return "";
}

}  // namespace

absl::Status WidthCalibrator::Restore(const CalibratorState& s) {
  if (std::string why = StateProblem(o_, s, DuelOn(), base_pq_ > 0.0f); !why.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("calibrator state: ", why));
  }
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(schedule_.Restore(s.schedule));  // unchanged when it fails
  width_ = s.width;
  floor_ = s.floor;
  at_width_ = s.at_width;
  mean_at_width_ = s.mean_at_width;
  var_at_width_ = s.var_at_width;
  release_streak_ = s.release_streak;
  release_needed_ = s.release_needed;
  released_ = s.released;
  steps_ = s.steps;
  samples_ = s.samples;
  changes_ = s.changes;
  last_change_step_ = s.last_change_step;
  last_ratio_ = s.last_ratio;
  sum_ratio_ = s.sum_ratio;
  sum_topk_ = s.sum_topk;
  mode_ = s.mode;
  probing_ = s.probing;
  tree_cost_n_ = s.tree_cost_n;
  tree_cost_ = s.tree_cost;
  exact_cost_n_ = s.exact_cost_n;
  exact_cost_ = s.exact_cost;
  exact_run_ = s.exact_run;
  reprobe_wait_ = s.reprobe_wait;
  exact_steps_ = s.exact_steps;
  fallbacks_ = s.fallbacks;
  reprobes_ = s.reprobes;
  ranking_ = s.ranking == DescentRanking::kSelector ? o_.base_ranking : s.ranking;
  trial_n_ = s.trial_n;
  trial_since_ = s.trial_since;
  trial_needed_ =
      s.ranking == DescentRanking::kSelector ? o_.ranking_trial_samples : s.trial_needed;
  trial_gain_ = s.trial_gain;
  ranking_switches_ = s.ranking_switches;
  seeded_ = s.seeded;
  if (s.method == SearchMethod::kSelector) {  // an older snapshot
    method_ = base_pq_ > 0.0f ? SearchMethod::kScan : SearchMethod::kTree;
    parked_ = FreshArm();
    method_trial_ = trial_exact_ = shadow_ = false;
    trial_bar_ = 0.0;
    method_wait_ = method_run_ = method_trials_ = method_switches_ = 0;
  } else {
    method_ = s.method;
    parked_ = s.parked;
    method_trial_ = s.method_trial;
    trial_exact_ = s.trial_exact;
    shadow_ = s.method_shadow;
    trial_bar_ = s.trial_bar;
    method_wait_ = s.method_wait;
    method_run_ = s.method_run;
    method_trials_ = s.method_trials;
    method_switches_ = s.method_switches;
  }
  return absl::OkStatus();
}

namespace {

// The sample of `selection`, and of `trial` when given (its mass ratio
// only), from `rate`: a selection's (mass ratio, top-k recall) against the
// reference, or the status of a selection it cannot rate.
template <typename Rate>
absl::StatusOr<QualitySample> SampleOf(Granularity granularity, Rate& rate,
                                       const Selection& selection, const Selection* trial,
                                       const Selection* method_trial) {
  QualitySample s;
  s.granularity = granularity;
  ASSIGN_OR_RETURN(auto main_rate, rate(selection));
  s.mass_ratio = main_rate.first;
  s.topk_recall = main_rate.second;
  if (trial != nullptr) {
    ASSIGN_OR_RETURN(auto trial_rate, rate(*trial));
    s.trial_mass_ratio = trial_rate.first;
  }
  if (method_trial != nullptr) {
    ASSIGN_OR_RETURN(auto method_rate, rate(*method_trial));
    s.method_mass_ratio = method_rate.first;
  }
  return s;
}

// Token granularity: the reference is the exact best tokens (forced ones,
// then by group share) at the same budget.
absl::StatusOr<QualitySample> MeasureTokenSelections(
    const MdciSelector& selector, const float* queries, int num_queries, const SelectParams& params,
    const Selection& selection, const Selection* trial, const Selection* method_trial,
    const std::function<bool()>& yield) {
  std::vector<float> share;  // per position
  RETURN_IF_ERROR(selector.ExactTokenShares(queries, num_queries, &share, yield));
  const int64_t n = static_cast<int64_t>(share.size());
  const int64_t sink_end = std::min<int64_t>(std::max(0, params.sink_tokens), n);
  const int64_t recent_begin = std::max<int64_t>(sink_end, n - std::max(0, params.recent_tokens));
  std::vector<int32_t> reference;  // positions
  for (int64_t p = 0; p < sink_end; ++p) reference.push_back(static_cast<int32_t>(p));
  for (int64_t p = recent_begin; p < n; ++p) reference.push_back(static_cast<int32_t>(p));
  std::vector<std::pair<float, int32_t>> rest;
  rest.reserve(recent_begin - sink_end);
  for (int64_t p = sink_end; p < recent_begin; ++p) rest.push_back({share[p], p});
  const int64_t want =
      std::min<int64_t>(std::max<int64_t>(0, std::min<int64_t>(params.budget_tokens, n) -
                                                 static_cast<int64_t>(reference.size())),
                        rest.size());
  // Only the set counts (sums), not its order: a linear selection of the
  // best `want` (a strict total order, so the same set a sort would take).
  if (want < static_cast<int64_t>(rest.size())) {
    std::nth_element(rest.begin(), rest.begin() + want, rest.end(),
                     [](const auto& a, const auto& b) {
                       return a.first > b.first || (a.first == b.first && a.second < b.second);
                     });
  }
  for (int64_t i = 0; i < want; ++i) reference.push_back(rest[i].second);
  double ref_mass = 0.0;
  for (int32_t pos : reference) ref_mass += share[pos];
  std::vector<uint8_t> in_sel(n, 0);
  // (mass ratio, top-k recall) of one selection against the reference.
  auto rate = [&](const Selection& sel) -> absl::StatusOr<std::pair<double, double>> {
    std::fill(in_sel.begin(), in_sel.end(), 0);
    double sel_mass = 0.0;
    for (int32_t pos : sel.positions) {
      if (pos < 0 || pos >= n) {
        return absl::InvalidArgumentError(absl::StrCat("selection position ", pos, " unknown"));
      }
      if (!in_sel[pos]) sel_mass += share[pos];
      in_sel[pos] = 1;
    }
    int64_t shared = 0;
    for (int32_t pos : reference) shared += in_sel[pos];
    return std::make_pair(ref_mass > 0.0 ? sel_mass / ref_mass : 1.0,
                          reference.empty() ? 1.0 : static_cast<double>(shared) / reference.size());
  };
  return SampleOf(Granularity::kToken, rate, selection, trial, method_trial);
}

}  // namespace

absl::StatusOr<QualitySample> MeasureSelection(const MdciSelector& selector, const float* queries,
                                               int num_queries, const SelectParams& params,
                                               const Selection& selection) {
  return MeasureSelectionPair(selector, queries, num_queries, params, selection, nullptr);
}

absl::StatusOr<QualitySample> MeasureSelectionPair(
    const MdciSelector& selector, const float* queries, int num_queries, const SelectParams& params,
    const Selection& selection, const Selection* trial, const Selection* method_trial,
    const std::function<bool()>& yield) {
  if (params.granularity == Granularity::kToken) {
    return MeasureTokenSelections(selector, queries, num_queries, params, selection, trial,
                                  method_trial, yield);
  }
  // The tokens and pages the scan covers (a yield may let appends add more).
  const int64_t tokens = selector.num_tokens();
  std::vector<float> mass;  // per page: exact group mass (sum of the queries' shares)
  RETURN_IF_ERROR(selector.ExactPageMasses(queries, num_queries, &mass, yield));
  const uint32_t pages = static_cast<uint32_t>(mass.size());
  std::vector<std::pair<float, uint32_t>> scored(pages);
  for (uint32_t p = 0; p < pages; ++p) scored[p] = {mass[p], p};
  const std::vector<uint32_t> forced = ForcedPages(tokens, params, [&](int64_t pos) {
    return selector.tree().page_table().page_of_position(pos);
  });
  Selection reference;
  SelectParams ref_params = params;
  ref_params.want_positions = false;
  TakePages(selector, forced, &scored, ref_params, &reference);
  double ref_mass = 0.0;
  int64_t ref_tokens = 0;
  for (uint32_t p : reference.pages) {
    ref_mass += mass[p];
    ref_tokens += selector.fill(p);
  }
  std::vector<uint8_t> in_sel(pages, 0);
  // (mass ratio, top-k recall) of one selection against the reference.
  auto rate = [&](const Selection& sel) -> absl::StatusOr<std::pair<double, double>> {
    std::fill(in_sel.begin(), in_sel.end(), 0);
    double sel_mass = 0.0;
    for (uint32_t p : sel.pages) {
      if (p >= pages) {
        return absl::InvalidArgumentError(absl::StrCat("selection page ", p, " unknown"));
      }
      if (!in_sel[p]) sel_mass += mass[p];
      in_sel[p] = 1;
    }
    int64_t shared_tokens = 0;
    for (uint32_t p : reference.pages) {
      if (in_sel[p]) shared_tokens += selector.fill(p);
    }
    return std::make_pair(ref_mass > 0.0 ? sel_mass / ref_mass : 1.0,
                          ref_tokens > 0 ? static_cast<double>(shared_tokens) / ref_tokens : 1.0);
  };
  return SampleOf(Granularity::kPage, rate, selection, trial, method_trial);
}

}  // namespace icecache
