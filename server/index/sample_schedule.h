// Which selections of one (layer group, KV head) are measured against the
// exact reference (docs/architecture.md §5.1): `warmup` measurements, one
// in `warmup_every` selections from the first (1: all of them), then
// one in an interval chosen from measured costs so that, in steady state,
// reference cost / selection cost stays within `share`:
//   interval = clamp(ceil(mean reference cost / (share x mean selection cost)),
//                    min_every, max_every)
// (the exact reference is a full scan; a selection costs a fraction of it,
// so the interval follows that fraction). max_every is the floor rate: a
// drift is still seen however cheap the selection. Before any reference was
// timed the interval is min_every. A due measurement stays due until
// Taken(), so one the caller could not take now (a busy background budget)
// is retried on the next selection, never skipped.
//
// Costs are whatever clock the caller uses for both (the daemon and
// icecache-bench: thread CPU time), as nanoseconds; a cost <= 0 is ignored.
// Means are moving averages (weight 1/16) so they follow a changing width.
//
// Thread safety: none; the owner serialises calls (WidthCalibrator and
// HeadQualityMonitor hold a mutex around it).
#ifndef ICECACHE_SERVER_INDEX_SAMPLE_SCHEDULE_H_
#define ICECACHE_SERVER_INDEX_SAMPLE_SCHEDULE_H_

#include <cstdint>

#include "absl/status/status.h"

namespace icecache {

struct SampleScheduleOptions {
  int warmup = 16;       // the first measurements (>= 0) ...
  int warmup_every = 1;  // ... one every this many selections (>= 1), the first on the first
  int min_every = 64;    // once warm: at least this many selections apart (>= 1)
  int max_every = 1024;  // once warm: at most this many apart, the floor rate (>= min_every)
  double share = 0.05;   // reference cost / selection cost in steady state, in (0, 1]
};

// InvalidArgument naming the option out of range.
absl::Status ValidateSampleSchedule(const SampleScheduleOptions& o);

// The largest count a restored state may hold (2^53: exact as a double).
inline constexpr int64_t kMaxStateCount = int64_t{1} << 53;

// A schedule's whole state, carried across a warm restart
// (docs/architecture.md §5): counts and the moving means of the costs.
struct SampleScheduleState {
  int64_t steps = 0, since = 0, taken = 0;
  int64_t select_n = 0, reference_n = 0;
  double select_ns = 0.0, reference_ns = 0.0;
  // Warm-up measurements credited without being taken (ShortenWarmup: a
  // head seeded from an earlier session's calibration); 0 in older snapshots.
  int64_t warmup_credit = 0;
};

class SampleSchedule {
 public:
  explicit SampleSchedule(const SampleScheduleOptions& o) : o_(o) {}

  // One selection that cost `cost_ns`; true when a measurement is due.
  bool Step(int64_t cost_ns);
  // The due measurement was taken (the caller copied the probe).
  void Taken();
  // A measurement's reference cost.
  void Reference(int64_t cost_ns);
  // Selections apart once warm, from the costs seen so far.
  int64_t Interval() const;
  // Leaves at most `left` (>= 0) warm-up measurements still to take, the rest
  // credited as taken: a head that starts from a width an earlier session
  // settled on needs a few samples to confirm it, not a full warm-up.
  void ShortenWarmup(int left);
  bool warm() const { return taken_ + warmup_credit_ >= o_.warmup; }
  int64_t steps() const { return steps_; }
  int64_t since() const { return since_; }  // selections since the last measurement taken
  int64_t taken() const { return taken_; }
  double mean_selection_ns() const { return select_ns_; }
  double mean_reference_ns() const { return reference_ns_; }
  SampleScheduleState state() const;
  // Takes `s` over; InvalidArgument naming the field when a count is
  // negative or past the steps (the warm-up credit: past the warm-up), or a
  // mean is negative or not finite (this schedule is then unchanged).
  absl::Status Restore(const SampleScheduleState& s);

 private:
  const SampleScheduleOptions o_;
  int64_t steps_ = 0;
  int64_t since_ = 0;  // selections since the last measurement taken
  int64_t taken_ = 0;
  int64_t select_n_ = 0, reference_n_ = 0;
  double select_ns_ = 0.0, reference_ns_ = 0.0;  // moving means
  int64_t warmup_credit_ = 0;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_SAMPLE_SCHEDULE_H_
