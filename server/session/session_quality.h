// Internal to icecache_session: the online quality monitor and the
// self-calibrating width of one session (docs/architecture.md §5 sessions).
//
// Per (layer group, KV head) of a session whose selector lays pages out by
// the DCI tree (mdci, exact-mdci), a HeadQualityMonitor decides which selections
// are measured (SampleSchedule: the first warmup_samples, then one in an
// interval chosen from the measured costs so that the references cost at most
// cpu_share of the selections, between sample_every and max_sample_every; a
// due measurement the sampler cannot take now is retried on the next
// selection), keeps the tally of what was measured and, for mdci with a
// target mass ratio, owns the WidthCalibrator whose width (or exact fallback)
// the selections use; the calibrator then owns the schedule too (it samples
// nothing while the head selects exactly, and every selection of a re-probe).
//
// Flow: Session::Select copies a chosen step's queries, resolved params and
// selected pages into a QualityProbe; the manager offers it to the
// QualitySampler; on the sampler's thread MeasureProbe() computes the exact
// reference (every page's exact group mass on the same layout,
// MeasureSelection) and records the sample here, which moves the width of
// later selections.
//
// Thread safety: HeadQualityMonitor is thread-safe (atomics and one mutex).
#ifndef ICECACHE_SERVER_SESSION_SESSION_QUALITY_H_
#define ICECACHE_SERVER_SESSION_SESSION_QUALITY_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/index/sample_schedule.h"
#include "server/index/selector.h"
#include "server/index/width_calibrator.h"
#include "server/session/quality_sampler.h"
#include "server/session/session_types.h"

namespace icecache {

class Session;

// Daemon-wide sampling policy (SessionManagerOptions.quality).
struct SessionQualityOptions {
  bool enabled = false;         // true: sample and calibrate (icecached turns it on)
  int sample_every = 64;        // once warm: at least this many selections apart per (group, head)
  int max_sample_every = 1024;  // once warm: at most this many apart (the floor rate)
  int warmup_samples = 16;      // the first samples of each (group, head) ...
  int warmup_every = CalibratorOptions{}.warmup_every;  // ... one in this many selections
  // The calibrators' exact fallback threshold (CalibratorOptions): the tree
  // gives way to exact selection when it costs this share of it (0: only
  // when the largest width misses).
  double exact_cost_ratio = CalibratorOptions{}.exact_cost_ratio;
  // The calibrators' ranking duel (CalibratorOptions::ranking_trial_samples;
  // 0: off).
  int ranking_duel_samples = CalibratorOptions{}.ranking_trial_samples;
  // The calibrators' method duel (CalibratorOptions::method_duel; heads with
  // product-quantised codes): false, the scan only.
  bool method_duel = CalibratorOptions{}.method_duel;
  // The calibrators' candidate carry-over (CalibratorOptions::carry_steps;
  // 0: off).
  int carry_steps = CalibratorOptions{}.carry_steps;
  // The narrowest width a head may settle on (CalibratorOptions::min_width;
  // heads start at 1, the selector's own).
  double min_width = CalibratorOptions{}.min_width;
  // Calibration memory (calibration_memory.h): a new session's calibrators
  // start from the widths the last ended session of the same tenant and
  // model settled on, and take only seeded_warmup_samples (>= 0) warm-up
  // samples to confirm them; at most remembered_keys (>= 1) keys are kept.
  bool remember_widths = false;
  int seeded_warmup_samples = 4;
  int remembered_keys = 1024;
  // Pooled widths (docs/architecture.md §5.1): a session-level calibrator
  // learns from every sample taken at its width, whichever head took it,
  // and a head with no sample of its own selects at that width (at model
  // scale the sampling budget reaches a head about once in hundreds of
  // tokens, the session as a whole about once per token). false: such
  // heads keep the default.
  bool pool_widths = false;
  // Fair burst (HeadQualityMonitor::MayUseBurst): a head's measurements
  // after its first spend at most its equal part of the session's burst
  // (sampler.burst / heads), so at model scale the burst buys a first
  // sample on heads of every layer instead of a whole warm-up for the heads
  // that select first. false: the first measurements due take all of it.
  bool fair_burst = false;
  // sampler.cpu_share is also the schedule's share: reference cost /
  // selection cost per head in steady state.
  QualitySamplerOptions sampler;
};

// InvalidArgument naming the option (sample_every >= 1, max_sample_every >=
// sample_every, warmup_samples >= 0, cpu_share in (0, 1],
// seeded_warmup_samples >= 0, remembered_keys >= 1).
absl::Status ValidateQualityOptions(const SessionQualityOptions& options);

// One selection chosen for measurement, copied off the decode path.
struct QualityProbe {
  int group = 0;
  int head = 0;
  int64_t tokens = 0;          // the group's tokens when it was selected
  std::vector<float> queries;  // q_per_kv x head_dim
  SelectParams params;         // resolved, with the width used
  std::vector<uint32_t> pages;
  std::vector<int32_t> positions;  // token granularity: the selected tokens
  bool burst = true;               // may spend the session's burst (QualitySampler::Offer)
  bool carried = false;            // the selection reused a fresh one's candidates
  int carry_age = 0;               // as the how-manieth since (0: fresh)
};

// A head's monitor state, carried across a warm restart in the session
// snapshot (docs/architecture.md §5): the tally of what was measured, the
// schedule (heads without a calibrator) and the calibrator's state.
struct HeadQualityState {
  bool calibrated = false;     // `calibrator` holds the state
  CalibratorState calibrator;  // calibrated heads
  SampleScheduleState schedule;
  int64_t samples = 0;
  double sum_ratio = 0.0, sum_topk = 0.0, recent_ratio = 0.0, last_ratio = 0.0;
};

// A session's monitor state: per (layer group, KV head), then its counters.
struct SessionQualityState {
  std::vector<HeadQualityState> heads;  // [group * kv_heads + head]
  int64_t samples_dropped = 0, samples_stale = 0, samples_reselected = 0;
  int64_t calibration_cpu_ns = 0, selection_ns = 0;
};

class HeadQualityMonitor {
 public:
  // `calibrator` may be null (monitor only: `schedule` decides); with one,
  // the calibrator's own schedule decides.
  HeadQualityMonitor(const SampleScheduleOptions& schedule,
                     std::unique_ptr<WidthCalibrator> calibrator)
      : calibrator_(std::move(calibrator)), schedule_(schedule) {}

  // Counts one selection made with `used` (the params after Apply) that cost
  // `cost_ns` (thread CPU time); true when a measurement is due (see
  // SampleSchedule). A due measurement the sampler could not take stays due
  // on the next selection (none is lost to a busy budget).
  // carry_age: Selection::carry_age (0: fresh).
  bool ShouldSample(const SelectParams& used, int64_t cost_ns, int carry_age = 0)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The sampler took this head's measurement.
  void Taken() ABSL_LOCKS_EXCLUDED(mu_);
  // Fair burst (SessionQualityOptions::fair_burst): whether this head's
  // next measurement may spend its session's burst: its first always; a
  // later one while the reference CPU of its recorded measurements, plus
  // `estimate_ns` for each one taken but not recorded yet (queued), is
  // under `burst_ns` / `heads` (its equal part of the burst). Else it
  // waits for the session's share of selection time.
  bool MayUseBurst(int heads, int64_t burst_ns, int64_t estimate_ns) const ABSL_LOCKS_EXCLUDED(mu_);
  // The calibrated width (or exact fallback) into params (no-op without a
  // calibrator).
  void Apply(SelectParams* params) const {
    if (calibrator_ != nullptr) calibrator_->Apply(params);
  }
  // The calibrator judged its carry-over on samples of its own.
  bool CarryJudged() const { return calibrator_ != nullptr && calibrator_->CarryJudged(); }
  // The calibrator's ranking trial: the other descent ranking to measure as
  // well on this sample (WidthCalibrator::TrialRanking), else nullopt.
  std::optional<DescentRanking> TrialRanking() const {
    return calibrator_ != nullptr ? calibrator_->TrialRanking() : std::nullopt;
  }
  // With the method duel's shadow trial running: the parked method's params
  // to select with as well on this sample (WidthCalibrator::ShadowParams).
  bool ShadowParams(SelectParams* params) const {
    return calibrator_ != nullptr && calibrator_->ShadowParams(params);
  }
  void Record(const QualitySample& sample) ABSL_LOCKS_EXCLUDED(mu_);
  // Calibration memory (calibration_memory.h): what this head's calibrator
  // learnt (WidthCalibrator::SeedOf; nullopt without a calibrator), and
  // starting a fresh one from an earlier session's (WidthCalibrator::Seed;
  // false when there is no calibrator or it would not take the seed).
  std::optional<CalibratorSeed> SeedOf(int64_t min_samples) const {
    return calibrator_ != nullptr ? calibrator_->SeedOf(min_samples) : std::nullopt;
  }
  bool Seed(const CalibratorSeed& seed, int warmup_left) {
    return calibrator_ != nullptr && calibrator_->Seed(seed, warmup_left).ok();
  }
  // Pooled widths: WidthCalibrator::AdoptPooled (false without a
  // calibrator), and the calibrator's report (nullopt without one).
  bool AdoptPooled(double width) {
    return calibrator_ != nullptr && calibrator_->AdoptPooled(width);
  }
  std::optional<CalibratorReport> CalibratorReportOf() const {
    if (calibrator_ == nullptr) return std::nullopt;
    return calibrator_->report();
  }
  HeadQualityInfo Report(int group, int head) const ABSL_LOCKS_EXCLUDED(mu_);

  HeadQualityState state() const ABSL_LOCKS_EXCLUDED(mu_);
  // Takes `s` over (a warm restart). InvalidArgument saying what is wrong
  // (WidthCalibrator::Restore, SampleSchedule::Restore, a calibrator state
  // for a head without a calibrator or the reverse, a tally out of range);
  // this monitor may then be partly changed: drop it.
  absl::Status Restore(const HeadQualityState& s) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const std::unique_ptr<WidthCalibrator> calibrator_;
  mutable absl::Mutex mu_;
  SampleSchedule schedule_ ABSL_GUARDED_BY(mu_);  // without a calibrator
  int64_t samples_ ABSL_GUARDED_BY(mu_) = 0;
  double sum_ratio_ ABSL_GUARDED_BY(mu_) = 0.0;
  double sum_topk_ ABSL_GUARDED_BY(mu_) = 0.0;
  double recent_ratio_ ABSL_GUARDED_BY(mu_) = 0.0;  // moving average
  double last_ratio_ ABSL_GUARDED_BY(mu_) = 0.0;
  // Reference CPU of the samples recorded (with the duels' selections), for
  // MayUseBurst; not in the snapshot (a restored session has no burst left).
  int64_t reference_ns_ ABSL_GUARDED_BY(mu_) = 0;
};

// Per-(group, head) quality state for a session of `config`, or an empty
// vector when nothing is monitored (options off, or a positional selector:
// its reference scan is not built yet). The calibrator's base width is the
// session's mdci field_of_view / candidate_factor.
absl::StatusOr<std::vector<std::unique_ptr<HeadQualityMonitor>>> MakeHeadQuality(
    const SessionConfig& config, int groups, const SessionQualityOptions& options);

// The monitor state of session `s` (its heads and counters) for a snapshot.
SessionQualityState QualityStateOf(const Session& s);

// Restores `state` into `heads` (made by MakeHeadQuality for the session)
// and the counters into `s`. InvalidArgument naming the (layer group, KV
// head) and what is wrong, or a head count other than heads.size().
absl::Status RestoreQualityState(const SessionQualityState& state, int kv_heads,
                                 const std::vector<std::unique_ptr<HeadQualityMonitor>>& heads);
// The session counters of `state` into `s`.
void RestoreQualityCounters(const SessionQualityState& state, Session& s);

// Tokens a group may gain between a selection and its measurement before
// the probe is stale: max(4 pages, tokens / 1024).
int64_t StaleAfterTokens(const Session& s, int64_t tokens);

// Pooled widths (SessionQualityOptions::pool_widths): the session's own
// calibrator, with the heads' options (no duels, no exact fallback), fed
// every sample taken at its width whichever head took it; null when pooling
// is off or the session is not a calibrated mdci session (or has
// product-quantised codes: their heads' widths are per method).
std::unique_ptr<WidthCalibrator> MakeWidthPool(const SessionConfig& config,
                                               const SessionQualityOptions& options);

// Sets every calibrated head of `s` with no sample of its own to the pool's
// width (WidthCalibrator::AdoptPooled) once the pool has a sample (and is not at its exact
// fallback); returns the heads that took it. Runs on the sampler's thread after each sample.
int PoolWidths(const Session& s);

// Measures `probe` against the exact reference on the session's current
// index. While the group gained at most StaleAfterTokens since the
// selection, the probe's own selection is measured; past that (the sampler
// ran late: a loaded machine, a nice-19 worker) the selector selects again
// now with the probe's queries and params (the same width) and that
// selection is measured, so a late sample still measures this width on
// this data (counted in samples_reselected). kStale only while the group's
// index is being built, or when the session broke. Records the sample into
// the head's HeadQualityMonitor and into *out. Takes s.append_mu (waiting
// for an append in progress: this runs on the sampler's thread) and then
// s.mu shared, so selects go on meanwhile and an append waits at most for
// this one head's reference scan.
SampleOutcome MeasureProbe(Session& s, const QualityProbe& probe, QualitySample* out);

// The session's quality view for SessionInfo.
SessionQualityInfo QualityInfoOf(const Session& s);

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_SESSION_QUALITY_H_
