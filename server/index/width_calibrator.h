// Self-calibrating search width for one mdci selector (docs/architecture.md,
// selection quality). On sampled steps the caller measures the selection
// against the exact reference at the same granularity (MeasureSelection) and
// reports the mass ratio; the calibrator adapts the descent's width (field of
// view and candidate factor, SelectParams overrides) toward a target ratio.
//
// Control: one width multiplier w in [min_width, max_width]; field_of_view =
// round(base_fov x w), candidate_factor = base_factor x w (at contexts
// whose descent starts on level 1 the field of view does nothing; the
// candidates always do). The calibrator targets the *mean* ratio at a width,
// not every sample: the steps of real decoding differ in difficulty, and a
// width raised on every hard step ends far wider (slower) than the target
// needs. It keeps the mean of the samples taken at the current width (a plain
// mean, then a moving average over the last `window` samples) and their
// variance. A miss -- that mean below the target once it rests on
// `miss_samples` samples, its lower confidence bound (mean - confidence_z x
// the standard error over min(samples, window)) below the target once it
// rests on `settle_samples`, or one sample more than `far_below` under the
// target -- raises w at once
// (x increase; a miss of the mean by much, up to x max_increase, by its
// shortfall) and sets a floor just above the width that missed. A mean
// >= target + hysteresis over `settle_samples` samples lowers it slowly
// (x decrease), never below the floor. The floor itself is lowered only after
// a long comfortable streak, and the streak needed doubles each time lowering
// it led to a miss, so on data that does not change the width settles and
// stops moving.
// Exact fallback (quality holds, speed varies): on some heads the tree does
// not pay -- the width that reaches the target costs about as much as the
// exact scan, or the widest allowed still misses. The caller reports each
// selection's cost (ShouldSample) and each reference's (QualitySample.
// reference_ns, a full scan: what the exact selection costs). The head then
// selects exactly (SelectParams.exhaustive: exact page scores on the same
// layout, the exact best tokens at token granularity; mass ratio 1 by
// definition) when a miss finds no affordable wider width (at max_width, or
// the tree's mean cost at this width x increase >= exact_cost_ratio x the
// exact cost), or when the tree's mean cost at a width already reaches
// exact_cost_ratio x the exact cost. In exact mode nothing is sampled; after
// reprobe_steps exact selections the tree is tried again at the width it
// left (every selection sampled until settle_samples samples judged it); each
// fallback doubles the wait (up to max_reprobe_steps), so a head whose tree
// never pays settles on exact and re-probes ever more rarely: no oscillation.
// Ranking duel: the descent can rank nodes by the loudest query or by the
// sum of the queries' estimated shares (DescentRanking), and neither is best
// on every head (docs/bench/front7_descent_rankings_131072.md). On every
// sample in tree mode the caller also selects with the other ranking
// (TrialRanking) at the same width and measures it against the same
// reference (QualitySample.trial_mass_ratio): paired samples, the same steps
// and widths. The calibrator keeps the moving mean of the other ranking's
// gain since the last switch (plain, then over the last ranking_window) and
// switches when, over at least ranking_trial_samples paired samples, it
// exceeds ranking_margin x 2^(switches so far): a head whose rankings are
// about equal stops switching (no oscillation; at most ~7 switches with the
// defaults), while one whose early steps misled the first choice switches
// back as soon as the other is clearly better. A switch restarts the width's tally (the sample that
// decided counts as the new ranking's first) and keeps the width and its
// floor. The other ranking's selection is one tree selection per sample
// (QualitySample.trial_ns), charged to the sampling schedule's cost share
// but not to the exact cost.
// Method duel (a selector with product-quantised codes, base_pq_factor > 0,
// and method_duel on): the scan and the tree each reach the target at their
// own width and cost, and which is cheaper depends on the head
// (docs/bench/duel17_methods.md). The head starts with the scan; each method
// keeps its own width, floor and cost (the one not in use is parked). The
// parked method's trial rides on the samples the head takes anyway (a
// shadow trial): from the first sample, and again after each wait, every
// sample also selects with the parked method at its own width
// (ShadowParams) and measures that selection against the same reference
// (QualitySample.method_mass_ratio, its cost method_ns). The parked width
// adapts on those samples as the one in use does on its own. Once judged
// (settle_samples samples at a width that meets the target), the parked
// method wins when its cost is below the incumbent's (the incumbent's cost
// is timed on every selection); it loses when the incumbent is judged and
// costs less, at once when its own cost already reaches the judged
// incumbent's on a sample that would not narrow it, and when it gives up
// (the exact fallback's tests). A trial costs one selection per sample and
// no reference of its own: the first one runs inside the warm-up, whose
// samples are all taken (a trial that took over the selections, every one
// sampled, cost 5-11% of the selection time over the matrix's 800 steps:
// docs/bench/duel17_methods.md). A head whose method gives up tries the
// parked one before exact selection: that method takes over (a full trial,
// every selection sampled, from the shadow's tally when one ran). Every
// trial doubles the wait before the next (method_trial_steps, up to
// max_method_trial_steps): no oscillation, and a head whose data changes
// tries again ever more rarely. One exception: when the method in use has
// been widened since (its queries grew harder) and its mean cost at that
// width exceeds 1.2x the parked method's last known cost, the trial that
// decided is out of date and the parked method is tried again on the next
// sample (CostlierThanParked; at most once in 256 selections). A winner
// measured on easy early steps no longer stays for the doubled wait when it
// has become the costlier method. The costs compared are the means over
// all selections at the width (or, with duel_fresh_costs, the fresh ones':
// DuelCost). A method switch restarts the carry's judgement (it rated the
// other method's candidates). The duel compares costs, so it needs timed
// selections; untimed, no trial starts.
// Sampling (SampleSchedule, sample_schedule.h): warmup_samples samples,
// one in warmup_every tree selections (fast convergence), then one in an
// interval chosen from the measured costs so that reference cost / selection
// cost stays within sample_share, between sample_every and max_sample_every
// (the floor rate). A re-probe samples every selection until it is judged;
// a fresh width whose first sample missed takes the next one confirm_every
// selections on.
//
// Thread safety: every method may be called from any thread (one mutex).
#ifndef ICECACHE_SERVER_INDEX_WIDTH_CALIBRATOR_H_
#define ICECACHE_SERVER_INDEX_WIDTH_CALIBRATOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/index/carry_tally.h"
#include "server/index/mdci_selector.h"
#include "server/index/sample_schedule.h"
#include "server/index/selector.h"

namespace icecache {

struct CalibratorOptions {
  double target_ratio = 0.95;  // selection mass / exact reference mass, in (0, 1]
  // The daemon's defaults (config.h kDefaultQuality*, deploy/icecached.textproto).
  int sample_every = 64;        // once warm: at least this many steps apart (>= 1)
  int max_sample_every = 1024;  // once warm: at most this many apart (>= sample_every)
  double sample_share = 0.05;   // steady state: reference cost / selection cost, (0, 1]
  // The warm-up: warmup_samples samples (>= 0), one every warmup_every
  // selections (>= 1), the first on the first. Spaced, because decode
  // steps come in runs of hard and easy queries: 16 consecutive samples
  // rated a run, 16 over 48 steps rate the stretch (at 131072 tokens,
  // mixture's replay went from 0.946 to 0.955-0.958 of the page oracle,
  // and gqa-divergent's from 0.939 to 0.948: docs/bench/confirm48.md).
  int warmup_samples = 16;
  int warmup_every = 3;
  // Bounds of the width multiplier, 0 < min <= max, and where a head starts
  // (in [min, max]). Width 1 is the selector's own field of view, candidate
  // factor and PQ factor. A head starts there and may go narrower, to half,
  // where its samples stay comfortably above the target: drifting-queries at
  // 131072 tokens sat at width 1 with 0.995 of the page oracle when 1 was
  // the floor (docs/bench/topk47.md).
  double min_width = 0.5;
  double max_width = 64.0;
  double start_width = 1.0;
  double increase = 1.5;  // x on a sample below the target (> 1)
  // A miss by much raises further, up to this (>= increase; = increase: a
  // fixed step): x (1 - m) / (1 - target) when the width's mean decided
  // the miss, m its upper confidence bound (mean + confidence_z standard
  // errors; one sample far below takes the fixed step). Where the mass
  // a width misses falls as 1 / width, that is the width that meets the
  // target. One step instead of two or three, each a sampling interval
  // apart (hundreds of selections once warm): docs/bench/calib50.md.
  double max_increase = 2.25;
  double decrease = 0.85;    // x after settle_samples comfortable samples (in (0, 1))
  double hysteresis = 0.02;  // comfortable: mean >= target + hysteresis (>= 0)
  int settle_samples = 4;    // samples at a width before lowering it (>= 1)
  int miss_samples = 2;      // samples at a width before its mean can miss (>= 1)
  double far_below = 0.15;   // one sample this far under the target is a miss (>= 0)
  int window = 16;           // the mean at a width: plain, then over about this many (>= 1)
  // A width whose mean meets the target on few samples may still miss it on
  // the steps not sampled: once settle_samples samples rest on a width, it
  // misses when mean - confidence_z x standard error < target (>= 0; 0: the
  // mean alone). Measured: gqa-divergent at 131072 tokens settled where its
  // samples' mean met 0.95 and the replay's was 0.935
  // (docs/bench/calib_matrix_131072.md).
  double confidence_z = 1.0;
  // A fresh width (raised, lowered or the warm-up's) whose first sample
  // fell under the target takes its next sample confirm_every selections
  // later (>= 0; 0: at the steady interval), so the miss is decided
  // (miss_samples) in a few dozen selections. At 131072 tokens a head's
  // reference costs about 25x its selection and the steady interval is
  // hundreds of selections: a width raised late in the warm-up stood on
  // one sample at 0.867 for 567 selections (docs/bench/confirm48.md).
  // Nothing more: sampling every raised width until judged (at 8, 16 or 32
  // selections apart) chased runs of hard steps and raised baseline's
  // widths to 7.7-11x the exact scan's speed at 0.973-0.981 of the page
  // oracle, against 22x at 0.963.
  int confirm_every = 8;
  // Exact fallback: the tree costing this share of the exact selection (or
  // more) gives way to it (>= 0; 0: cost never decides, only a miss at
  // max_width).
  double exact_cost_ratio = 1.0;
  int reprobe_steps = 256;        // exact selections before re-probing the tree (>= 1)
  int max_reprobe_steps = 65536;  // the doubling wait stops here (>= reprobe_steps)
  // The ranking the head starts with (what DescentRanking::kSelector means
  // for its selector: kLoudest or kNormalized).
  DescentRanking base_ranking = DescentRanking::kLoudest;
  // The ranking duel: paired samples before a switch can be decided (>= 0;
  // 0: off, the base ranking for good), the mean gain in mass ratio the
  // other ranking needs (>= 0; doubled per switch), and the moving mean's
  // window (>= 1). Off by default: measured, a small gain on average and a
  // slower convergence where the first, narrow-width samples favour the
  // ranking that loses at the settled width
  // (docs/bench/rank7_ranking_duel.md); 8 is the value measured.
  int ranking_trial_samples = 0;
  double ranking_margin = 0.01;
  int ranking_window = 16;
  // The method duel (with base_pq_factor > 0): the tree on trial against the
  // scan per head, the cheaper kept. false: the scan only.
  bool method_duel = true;
  // What the duel compares: the mean cost over all selections, carried ones
  // included (false), or the fresh selections' (true; DuelCost). Fresh
  // against fresh is like for like (a shadow's selection is always fresh;
  // with candidate carry-over the mean is about half of it), but measured
  // it lets the tree win on the early, easy steps at a narrow width that
  // later widens: in two whole matrices at 131072 tokens gqa-divergent
  // ended at 0.946-0.948 of the page oracle with it and 0.951-0.954
  // without, temperature-spread 0.973-0.978 at 16-18x against 0.981 at
  // 23-25x. The mean favours the method in use by the carry's saving, the
  // scan at the start, whose cost moves less with the width
  // (docs/bench/calib50.md).
  bool duel_fresh_costs = false;
  // Selections on the method in use between the end of one trial and the
  // next (>= 1), doubled after every trial up to max_method_trial_steps (>=
  // method_trial_steps). Each trial samples every selection until judged
  // (an exact reference each): with 256 (reprobe_steps) the steady-state
  // sampling share over 800 steps at 131072 tokens was 6-13% against the
  // tree's 2-4% (docs/bench/duel17_methods.md).
  int method_trial_steps = 2048;
  int max_method_trial_steps = 65536;
  // Candidate carry-over (SelectParams::carry_steps; 0: off): the selects
  // that may reuse one fresh select's candidates, judged per head. Samples
  // fall on carried and fresh selects in their true proportion (a due
  // sample waits a select when its kind is ahead); during the warm-up the
  // carried samples rate the carry only and the fresh ones the width (so
  // the width is not widened for the carry before it is judged); once both
  // kinds have
  // carry_judge_samples samples, a head whose carried samples' mean ratio
  // is more than carry_margin below its fresh ones' carries one step less
  // and is judged afresh (the last reuse is the stalest), and at one step
  // stops carrying (its queries move too fast from step to step: the width
  // that lifts the carried steps costs more than the scans they skip), and
  // tries again, at carry_steps, after carry_retry_steps selections, doubled
  // each time up to max_carry_retry_steps.
  // The judgement asks for confidence (CarryTally::FallsBehind's z): the gap
  // must exceed the margin by carry_confidence_z standard errors, and the
  // mix must miss the target by as many (>= 0; 0: the means alone). Judged
  // on 4 samples of each kind after every sample, the means alone stopped
  // heads on noise: one head more or less stopped moved a family's steady
  // CPU by 20-30% between runs of the same binary (docs/bench/topk47.md).
  int carry_steps = 0;
  double carry_margin = 0.03;
  int carry_judge_samples = 4;
  int carry_retry_steps = 4096;
  int max_carry_retry_steps = 65536;
  double carry_confidence_z = 1.0;
};

// How a calibrated head selects now.
enum class SelectMode { kTree, kExact };

// One sampled step: the selection against the exact reference.
struct QualitySample {
  double mass_ratio = 0.0;   // group mass of the selection / of the reference
  double topk_recall = 0.0;  // share of the reference's tokens the selection holds
  // The selection's unit, and so the reference's (exact pages or exact tokens).
  Granularity granularity = Granularity::kPage;
  // Cost of the exact reference (the caller's clock, ns; 0 = not timed).
  int64_t reference_ns = 0;
  // With the ranking duel: the mass ratio of the selection made with
  // WidthCalibrator::TrialRanking() against the same reference (< 0: none),
  // and that selection's cost (the caller's clock, ns).
  double trial_mass_ratio = -1.0;
  int64_t trial_ns = 0;
  // With a shadow trial of the method duel: the mass ratio of the selection
  // made with WidthCalibrator::ShadowParams() against the same reference
  // (< 0: none), and that selection's cost (the caller's clock, ns).
  double method_mass_ratio = -1.0;
  int64_t method_ns = 0;
  // The selection reused a fresh one's candidates (Selection::carried), as
  // the how-manieth since (Selection::carry_age; 0: fresh).
  bool carried = false;
  int carry_age = 0;
};

struct CalibratorReport {
  double width = 1.0;  // the multiplier now in use
  int field_of_view = 0;
  float candidate_factor = 0.0f;
  float pq_factor = 0.0f;        // > 0: the scan's factor now (base_pq_factor x width)
  int64_t steps = 0;             // ShouldSample() calls
  int64_t samples = 0;           // Observe() calls
  int64_t changes = 0;           // width changes
  int64_t last_change_step = 0;  // ShouldSample() calls before the last width change (convergence)
  double last_ratio = 0.0, mean_ratio = 0.0, mean_topk_recall = 0.0;
  SelectMode mode = SelectMode::kTree;
  int64_t exact_steps = 0;    // selections made exactly (exact fallback)
  int64_t fallbacks = 0;      // switches from the tree to exact selection
  int64_t reprobes = 0;       // switches back to the tree to try it again
  double tree_cost_ns = 0.0;  // mean selection cost at the current width (tree)
  // The same over its fresh selections only (carry age 0; with no carry,
  // every selection): what the method duel compares with
  // CalibratorOptions::duel_fresh_costs (0: none timed yet).
  double fresh_cost_ns = 0.0;
  double exact_cost_ns = 0.0;   // mean cost of an exact selection / reference
  int64_t sample_interval = 0;  // tree selections between samples once warm, now
  DescentRanking ranking = DescentRanking::kLoudest;  // the descent's ranking now
  int64_t trial_samples = 0;                          // paired samples of the duel so far
  double trial_gain = 0.0;  // moving mean since the last switch: other's ratio - this one's
  int64_t ranking_switches = 0;
  bool seeded = false;  // started from an earlier session's width (Seed)
  // Started from the session's pooled width (AdoptPooled, other than the
  // default) before a sample of its own; not part of CalibratorState (a restored head keeps the
  // width, not the flag).
  bool pooled = false;
  // The method in use (kTree, or kScan with codes), and the method duel:
  // trials so far, those the trial won, whether one runs now (a shadow
  // trial or a full one), and the parked method's width and mean cost (0
  // when it never ran).
  SearchMethod method = SearchMethod::kTree;
  int64_t method_trials = 0;
  int64_t method_switches = 0;
  bool method_trial = false;
  double other_width = 0.0;
  double other_cost_ns = 0.0;
  double other_fresh_cost_ns = 0.0;  // its fresh selections' (0: none timed)
  // Candidate carry-over: the selects each fresh one's candidates may serve
  // now (0: off or stopped), times it stopped, and the samples since it
  // last started, carried and fresh, with their mean ratios.
  int carry_steps = 0;
  int64_t carry_stops = 0;
  int64_t carry_shortened = 0;  // judgements that shortened the carry by one step
  int64_t carry_samples = 0, fresh_samples = 0;
  double carry_mean = 0.0, fresh_mean = 0.0;
};

// Where an earlier session's calibrator of the same head ended
// (WidthCalibrator::SeedOf), for a new session to start from (Seed):
// the width, the descent's ranking, and whether it selected exactly.
struct CalibratorSeed {
  double width = 1.0;
  DescentRanking ranking = DescentRanking::kLoudest;
  bool exact = false;
  SearchMethod method = SearchMethod::kSelector;  // the width's method (kSelector: the start's)
};

// One method's width state in the method duel (the fields of
// WidthCalibrator of the same names; cost_n / cost: tree_cost_n / tree_cost).
struct CalibratorArm {
  double width = 1.0;
  double floor = 1.0;
  int64_t at_width = 0;
  double mean_at_width = 0.0;
  double var_at_width = 0.0;
  int64_t release_streak = 0;
  int64_t release_needed = 1;
  bool released = false;
  int64_t cost_n = 0;
  double cost = 0.0;
  // The fresh selections' share of those costs (fresh_cost_n / fresh_cost;
  // not in snapshots: a restored arm compares its mean cost until it has
  // timed fresh selections again).
  int64_t fresh_cost_n = 0;
  double fresh_cost = 0.0;
  bool tried = false;  // it has selected in this head (parked arm)
};

// A calibrator's whole state (the fields of WidthCalibrator below), carried
// across a warm restart in the session snapshot (docs/architecture.md §5)
// so that a head that had settled, or fallen back to exact selection, goes on
// from where it was.
struct CalibratorState {
  double width = 1.0;
  double floor = 1.0;
  int64_t at_width = 0;
  double mean_at_width = 0.0;
  double var_at_width = 0.0;  // their (moving) variance; 0 in older snapshots
  int64_t release_streak = 0;
  int64_t release_needed = 1;
  bool released = false;
  int64_t steps = 0, samples = 0, changes = 0, last_change_step = 0;
  double last_ratio = 0.0, sum_ratio = 0.0, sum_topk = 0.0;
  SampleScheduleState schedule;
  SelectMode mode = SelectMode::kTree;
  bool probing = false;
  int64_t tree_cost_n = 0;
  double tree_cost = 0.0;
  int64_t exact_cost_n = 0;
  double exact_cost = 0.0;
  int64_t exact_run = 0, reprobe_wait = 0;
  int64_t exact_steps = 0, fallbacks = 0, reprobes = 0;
  // The ranking duel. Absent from older snapshots: kSelector (Restore
  // takes the calibrator's base ranking), no samples, trial_needed 0 (the
  // options' ranking_trial_samples).
  DescentRanking ranking = DescentRanking::kSelector;
  int64_t trial_n = 0, trial_since = 0, trial_needed = 0, ranking_switches = 0;
  double trial_gain = 0.0;
  bool seeded = false;  // absent from older snapshots: false
  // The method duel. Absent from older snapshots: kSelector (Restore takes
  // the calibrator's start method, the other one parked fresh).
  SearchMethod method = SearchMethod::kSelector;
  CalibratorArm parked;
  bool method_trial = false, trial_exact = false;
  bool method_shadow = false;  // absent from older snapshots: false
  double trial_bar = 0.0;
  int64_t method_wait = 0, method_run = 0, method_trials = 0, method_switches = 0;
};

class WidthCalibrator {
 public:
  // InvalidArgument naming the option out of range (see CalibratorOptions),
  // or a base field_of_view < 1 / candidate_factor <= 0 / pq_factor < 0.
  // base_pq_factor > 0 (a selector with MdciParams::pq_factor, which selects
  // by the product-quantised scan): the width multiplies it too
  // (SelectParams::pq_factor), the scan's one knob.
  static absl::StatusOr<std::unique_ptr<WidthCalibrator>> Create(const CalibratorOptions& options,
                                                                 int base_field_of_view,
                                                                 float base_candidate_factor,
                                                                 float base_pq_factor = 0.0f);

  // Counts one selection made with `used` (the params Apply set) that cost
  // `cost_ns` (the caller's clock; <= 0: not timed); true when it should be
  // measured (never in exact mode: the selection is the reference). A due
  // measurement stays due until Taken().
  // `carry_age`: the selection reused a fresh one's candidates, as the
  // how-manieth since it (Selection::carry_age; 0: fresh).
  bool ShouldSample(const SelectParams& used, int64_t cost_ns, int carry_age = 0)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The due measurement was taken (the caller will Observe it).
  void Taken() ABSL_LOCKS_EXCLUDED(mu_);
  // One measured step; adapts the width.
  void Observe(const QualitySample& sample) ABSL_LOCKS_EXCLUDED(mu_);
  // The width to select with: sets params->field_of_view / candidate_factor
  // / pq_factor, params->exhaustive (exact mode) and params->ranking.
  void Apply(SelectParams* params) const ABSL_LOCKS_EXCLUDED(mu_);
  // With the ranking duel on, in tree mode: the other ranking, to select
  // with as well on the sample being taken (its ratio goes in QualitySample.
  // trial_mass_ratio); else nullopt.
  std::optional<DescentRanking> TrialRanking() const ABSL_LOCKS_EXCLUDED(mu_);
  // During a shadow trial of the method duel: true, and `params` (a copy of
  // the params Apply set) set to the parked method at its own width, to
  // select with as well on the sample being taken (its ratio goes in
  // QualitySample.method_mass_ratio, its cost in method_ns); else false and
  // `params` unchanged.
  bool ShadowParams(SelectParams* params) const ABSL_LOCKS_EXCLUDED(mu_);
  CalibratorReport report() const ABSL_LOCKS_EXCLUDED(mu_);
  // The head has judged its candidate carry-over on samples of its own
  // (carry_judge_samples of each kind since it last started carrying).
  bool CarryJudged() const ABSL_LOCKS_EXCLUDED(mu_);

  // What a later session of the same model may start this head from: the
  // width (and ranking, and exact fallback) once the head has taken at least
  // `min_samples` samples (>= 1), is in exact mode, or was itself seeded (so
  // what a chain of short sessions learns adds up); else nullopt (nothing
  // learnt yet).
  std::optional<CalibratorSeed> SeedOf(int64_t min_samples) const ABSL_LOCKS_EXCLUDED(mu_);
  // Starts a fresh calibrator (no selection counted yet) from `seed`: its
  // width (the floor stays min_width: a seed is a guess, not a measured
  // floor), its ranking, in exact mode when it was exact (re-probing the
  // tree after reprobe_steps as after a fallback), with at most
  // `warmup_left` (>= 0) warm-up samples still to take. FailedPrecondition
  // once the calibrator has counted a selection (a restored or running
  // head: its own state wins); InvalidArgument for a width outside
  // [min_width, max_width] or a ranking other than loudest / normalized
  // (the calibrator is then unchanged).
  absl::Status Seed(const CalibratorSeed& seed, int warmup_left) ABSL_LOCKS_EXCLUDED(mu_);

  // Within-session pooling (docs/architecture.md §5.1, "Pooled widths"):
  // a head that has no sample of its own yet (nor a seed) selects at
  // `width`, the session's pooled width (session_quality.h, MakeWidthPool), instead of
  // the default; its own samples then judge that width as any other (the
  // floor stays min_width: the pool is a guess). Called again as the pool
  // moves, until the head's first sample. false, unchanged, once the head
  // has a sample, was seeded, selects exactly or re-probes, has the method
  // duel (a width is per method there), or `width` is outside
  // [min_width, max_width]. Not a width change of the head's own
  // (report().changes).
  bool AdoptPooled(double width) ABSL_LOCKS_EXCLUDED(mu_);
  // Measurements taken so far (Taken() calls).
  int64_t taken() const ABSL_LOCKS_EXCLUDED(mu_);
  // Whether `used` (a selection's resolved params) is this calibrator's
  // current width and method, not exhaustive: its sample rates this width.
  bool AtCurrentWidth(const SelectParams& used) const ABSL_LOCKS_EXCLUDED(mu_);

  CalibratorState state() const ABSL_LOCKS_EXCLUDED(mu_);
  // Takes `s` over (a warm restart). InvalidArgument naming the field when
  // a value is out of range for this calibrator's options: a width or floor
  // outside [min_width, max_width], a negative or impossible count, a mean
  // or cost negative or not finite, a re-probe wait past max_reprobe_steps
  // (the calibrator is then unchanged).
  absl::Status Restore(const CalibratorState& s) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  WidthCalibrator(const CalibratorOptions& o, int fov, float factor, float pq)
      : o_(o),
        base_fov_(fov),
        base_factor_(factor),
        base_pq_(pq),
        width_(o.start_width),
        floor_(o.min_width),
        schedule_(ScheduleOf(o)),
        ranking_(o.base_ranking) {}
  static SampleScheduleOptions ScheduleOf(const CalibratorOptions& o);
  // The field of view, candidate factor and PQ factor of `width` for
  // `method`, and the method (Apply, ShadowParams, report).
  void SetWidthParams(double width, SearchMethod method, SelectParams* params) const;
  void SetWidth(double w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The samples and costs at the current width start over (a new width,
  // ranking or re-probe).
  void RestartTally() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether a miss or a costly width hands this head to exact selection.
  bool TreeDoesNotPay(bool miss) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FallBack() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CountExactStep(int64_t cost_ns) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AdaptWidth(double ratio) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether the samples at the current width say it misses the target.
  bool MeanMisses() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The standard error of that mean (0 on fewer than 2 samples).
  double MeanError() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool TrialRunning() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One paired trial sample; true when it switched the ranking.
  bool ObserveTrial(double ratio, double trial_ratio) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The method duel.
  bool DuelOn() const { return o_.method_duel && base_pq_ > 0.0f; }
  CalibratorArm FreshArm() const;
  CalibratorArm CurrentArm() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LoadArm(const CalibratorArm& a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The parked method in use, the one in use parked.
  void SwapMethod() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The method in use meets the target at its width (settle_samples samples).
  bool Judged() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The method in use gives up (TreeDoesNotPay): the parked one on trial,
  // or exact selection.
  void GiveUp() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The parked method on trial; it must cost less than `bar` (ns); `exact`:
  // a loss falls back to exact selection. `from_shadow`: it goes on from
  // the tally of the shadow trial that was running (counted already).
  void StartTrial(double bar, bool exact, bool from_shadow = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EndTrial(bool won) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A trial ended: the next waits twice as long as the last (the first
  // method_trial_steps), counted from now.
  void WaitForNextTrial() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Shadow trials: whether one starts on this sample, its start, one of
  // its samples (the parked arm stepped as the one in use would be), and
  // its end (`won`: the parked method takes over).
  bool ShadowDue(int64_t cost_ns) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The method in use costs more than kRetrialMargin x the parked method's
  // last known cost, most often because it was widened since the last
  // trial (ShadowDue starts a trial at once; docs/bench/retrial49.md).
  bool CostlierThanParked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What the duel compares of the method in use, and of an arm: the mean
  // cost of all selections at the width, or with duel_fresh_costs that of
  // the fresh ones once any is timed.
  double DuelCost() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  double ArmDuelCost(const CalibratorArm& a) const;
  int64_t DuelCostSamples() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static constexpr double kRetrialMargin = 1.2;
  static constexpr int64_t kRetrialCostSamples = 16;
  static constexpr int64_t kRetrialSpacing = 256;
  void StartShadow() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ObserveShadow(double ratio, int64_t cost_ns) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EndShadow(bool won) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // After a sample: starts, judges or ends a trial.
  void Duel() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StepWidth(double ratio) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The width's factor on a miss decided by `ratio` (CalibratorOptions::
  // max_increase).
  double RaiseFactor(double ratio) const;
  // Candidate carry-over: whether a due sample waits because its kind is
  // ahead of its share, one sample's tally and judgement, and the retry.
  // Samples are spread evenly over the ages 0 (fresh) .. carry_steps, so a
  // sampling interval in step with the carry's period measures every age.
  bool CarrySkewed(int carry_steps, int carry_age) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A confirmation sample is due (CalibratorOptions::confirm_every).
  bool ConfirmDue() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ObserveCarry(double ratio, bool carried, int carry_age) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RestartCarry() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const CalibratorOptions o_;
  const int base_fov_;
  const float base_factor_;
  const float base_pq_;  // 0: the tree's descent
  mutable absl::Mutex mu_;
  double width_ ABSL_GUARDED_BY(mu_);
  double floor_ ABSL_GUARDED_BY(mu_);                // decreases stop here
  int64_t at_width_ ABSL_GUARDED_BY(mu_) = 0;        // samples since the width changed
  double mean_at_width_ ABSL_GUARDED_BY(mu_) = 0.0;  // their (moving) mean ratio
  double var_at_width_ ABSL_GUARDED_BY(mu_) = 0.0;   // and (moving) variance
  int64_t release_streak_ ABSL_GUARDED_BY(mu_) = 0;  // comfortable samples at the floor
  int64_t release_needed_ ABSL_GUARDED_BY(mu_) = 0;  // to lower the floor
  bool released_ ABSL_GUARDED_BY(mu_) = false;       // the floor was lowered since the last miss
  int64_t steps_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t samples_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t changes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t last_change_step_ ABSL_GUARDED_BY(mu_) = 0;
  double last_ratio_ ABSL_GUARDED_BY(mu_) = 0.0;
  double sum_ratio_ ABSL_GUARDED_BY(mu_) = 0.0;
  double sum_topk_ ABSL_GUARDED_BY(mu_) = 0.0;
  SampleSchedule schedule_ ABSL_GUARDED_BY(mu_);  // of the tree's selections
  SelectMode mode_ ABSL_GUARDED_BY(mu_) = SelectMode::kTree;
  bool probing_ ABSL_GUARDED_BY(mu_) = false;     // the tree is on trial after exact
  int64_t tree_cost_n_ ABSL_GUARDED_BY(mu_) = 0;  // costs at the current width
  double tree_cost_ ABSL_GUARDED_BY(mu_) = 0.0;   // their (moving) mean
  // Of those, the fresh selections' (carry age 0; a shadow trial's
  // selection is always fresh): what the duel compares with
  // CalibratorOptions::duel_fresh_costs. Not in CalibratorState (a
  // restored head times them again; until then DuelCost is the mean).
  int64_t fresh_cost_n_ ABSL_GUARDED_BY(mu_) = 0;
  double fresh_cost_ ABSL_GUARDED_BY(mu_) = 0.0;
  int64_t exact_cost_n_ ABSL_GUARDED_BY(mu_) = 0;  // exact selections and references timed
  double exact_cost_ ABSL_GUARDED_BY(mu_) = 0.0;   // their (moving) mean
  int64_t exact_run_ ABSL_GUARDED_BY(mu_) = 0;     // exact selections since the fallback
  int64_t reprobe_wait_ ABSL_GUARDED_BY(mu_) = 0;  // exact selections before the next probe
  int64_t exact_steps_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t fallbacks_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t reprobes_ ABSL_GUARDED_BY(mu_) = 0;
  DescentRanking ranking_ ABSL_GUARDED_BY(mu_);
  int64_t trial_n_ ABSL_GUARDED_BY(mu_) = 0;       // paired samples, all
  int64_t trial_since_ ABSL_GUARDED_BY(mu_) = 0;   // since the last switch
  int64_t trial_needed_ ABSL_GUARDED_BY(mu_) = 0;  // before a switch can be decided
  double trial_gain_ ABSL_GUARDED_BY(mu_) = 0.0;   // moving mean gain since the last switch
  int64_t ranking_switches_ ABSL_GUARDED_BY(mu_) = 0;
  bool seeded_ ABSL_GUARDED_BY(mu_) = false;
  bool pooled_ ABSL_GUARDED_BY(mu_) = false;  // AdoptPooled took a width
  SearchMethod method_ ABSL_GUARDED_BY(mu_) = SearchMethod::kTree;
  CalibratorArm parked_ ABSL_GUARDED_BY(mu_);       // the method not in use
  bool method_trial_ ABSL_GUARDED_BY(mu_) = false;  // the method in use is on trial
  bool trial_exact_ ABSL_GUARDED_BY(mu_) = false;   // a loss falls back to exact
  bool shadow_ ABSL_GUARDED_BY(mu_) = false;        // the parked method is on a shadow trial
  // Within ObserveShadow only: the parked arm is loaded, and whether its
  // step gave up (StepWidth's test, which must not act on the head).
  bool shadow_step_ ABSL_GUARDED_BY(mu_) = false;
  bool shadow_gave_up_ ABSL_GUARDED_BY(mu_) = false;
  double trial_bar_ ABSL_GUARDED_BY(mu_) = 0.0;  // the cost the trial must beat (ns)
  // Candidate carry-over (not in CalibratorState: a restored head starts it
  // afresh).
  bool carry_on_ ABSL_GUARDED_BY(mu_) = false;
  int carry_level_ ABSL_GUARDED_BY(mu_) = 0;  // the carry length now (<= carry_steps)
  // Samples since the carry last started, by carry age (carry_tally.h).
  CarryAges carry_samples_ ABSL_GUARDED_BY(mu_);
  // Samples decided per carry age (0: fresh) since the carry last started.
  std::vector<int64_t> carry_ages_ ABSL_GUARDED_BY(mu_);
  int64_t carry_stops_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t carry_shortened_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t carry_run_ ABSL_GUARDED_BY(mu_) = 0;    // selections since it stopped
  int64_t carry_wait_ ABSL_GUARDED_BY(mu_) = 0;   // before it tries again
  int64_t method_wait_ ABSL_GUARDED_BY(mu_) = 0;  // selections between trials
  int64_t method_run_ ABSL_GUARDED_BY(mu_) = 0;   // tree/scan selections since the last
  int64_t method_trials_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t method_switches_ ABSL_GUARDED_BY(mu_) = 0;
};

// Measures `selection` (made by `selector` for these queries and params)
// against the exact reference at page granularity on the selector's own
// layout: every page's exact group mass (a full scan), the reference takes
// the best pages as exact-mdci would; at token granularity
// (params.granularity) against the exact best tokens (ExactTokenShares; the
// selection's positions are read). Costs one exact scan.
// InvalidArgument for bad input (as Select).
absl::StatusOr<QualitySample> MeasureSelection(const MdciSelector& selector, const float* queries,
                                               int num_queries, const SelectParams& params,
                                               const Selection& selection);
// As MeasureSelection, for one selection and, when `trial` is not null, a
// second one (the ranking trial's) against the same reference (one exact
// scan): its ratio goes in trial_mass_ratio.
// `method_trial`, when not null (a shadow trial's selection), likewise: its
// ratio goes in method_mass_ratio. `yield`: the exact scan's
// (MdciSelector::ExactPageMasses; Aborted when it says stop); the
// reference then covers the tokens there were when the scan started.
absl::StatusOr<QualitySample> MeasureSelectionPair(
    const MdciSelector& selector, const float* queries, int num_queries, const SelectParams& params,
    const Selection& selection, const Selection* trial, const Selection* method_trial = nullptr,
    const std::function<bool()>& yield = {});

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_WIDTH_CALIBRATOR_H_
