#include "server/index/sample_schedule.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace icecache {
namespace {

// A moving mean: plain over the first `kWindow` values, then weight 1/kWindow,
// so it settles fast and then follows a changing width.
constexpr int64_t kWindow = 16;

void AddToMean(int64_t value, int64_t* n, double* mean) {
  if (value <= 0) return;
  *n += 1;
  *mean += (static_cast<double>(value) - *mean) / static_cast<double>(std::min(*n, kWindow));
}

}  // namespace

absl::Status ValidateSampleSchedule(const SampleScheduleOptions& o) {
  auto bad = [](const char* what, double v) {
    return absl::InvalidArgumentError(absl::StrCat("quality sampling: ", what, ", got ", v));
  };
  if (o.warmup < 0) return bad("warmup_samples must be >= 0", o.warmup);
  if (o.warmup_every < 1) return bad("warmup_every must be >= 1", o.warmup_every);
  if (o.min_every < 1) return bad("sample_every must be >= 1", o.min_every);
  if (o.max_every < o.min_every) {
    return bad(absl::StrCat("max_sample_every must be >= sample_every (", o.min_every, ")").c_str(),
               o.max_every);
  }
  if (!(o.share > 0.0 && o.share <= 1.0)) return bad("cpu_share must be in (0, 1]", o.share);
  return absl::OkStatus();
}

bool SampleSchedule::Step(int64_t cost_ns) {
  ++steps_;
  ++since_;
  AddToMean(cost_ns, &select_n_, &select_ns_);
  if (!warm()) return taken_ == 0 || since_ >= o_.warmup_every;
  return since_ >= Interval();
}

void SampleSchedule::Taken() {
  since_ = 0;
  ++taken_;
}

void SampleSchedule::ShortenWarmup(int left) {
  const int64_t to_take = std::max<int64_t>(0, o_.warmup - taken_ - warmup_credit_);
  warmup_credit_ += std::max<int64_t>(0, to_take - std::max(0, left));
}

void SampleSchedule::Reference(int64_t cost_ns) {
  AddToMean(cost_ns, &reference_n_, &reference_ns_);
}

int64_t SampleSchedule::Interval() const {
  if (reference_n_ == 0 || select_n_ == 0) return o_.min_every;
  const double want = std::ceil(reference_ns_ / (o_.share * select_ns_));
  if (!(want < static_cast<double>(o_.max_every))) return o_.max_every;  // NaN too
  return std::max<int64_t>(o_.min_every, static_cast<int64_t>(want));
}

SampleScheduleState SampleSchedule::state() const {
  SampleScheduleState s;
  s.steps = steps_;
  s.since = since_;
  s.taken = taken_;
  s.select_n = select_n_;
  s.reference_n = reference_n_;
  s.select_ns = select_ns_;
  s.reference_ns = reference_ns_;
  s.warmup_credit = warmup_credit_;
  return s;
}

absl::Status SampleSchedule::Restore(const SampleScheduleState& s) {
  auto bad = [](const char* what, double v) {
    return absl::InvalidArgumentError(absl::StrCat("sample schedule ", what, ", got ", v));
  };
  if (s.steps < 0 || s.steps > kMaxStateCount) return bad("steps out of range", s.steps);
  if (s.since < 0 || s.since > s.steps) return bad("since must be in 0..steps", s.since);
  if (s.taken < 0 || s.taken > s.steps) return bad("taken must be in 0..steps", s.taken);
  if (s.select_n < 0 || s.select_n > s.steps)
    return bad("select_n must be in 0..steps", s.select_n);
  // Not bounded by the steps: a monitor's references may come from a
  // calibrator's selections (session_quality.h).
  if (s.reference_n < 0 || s.reference_n > kMaxStateCount) {
    return bad("reference_n out of range", s.reference_n);
  }
  if (!(s.select_ns >= 0.0) || !std::isfinite(s.select_ns)) {
    return bad("select_ns must be finite and >= 0", s.select_ns);
  }
  if (!(s.reference_ns >= 0.0) || !std::isfinite(s.reference_ns)) {
    return bad("reference_ns must be finite and >= 0", s.reference_ns);
  }
  if (s.warmup_credit < 0 || s.warmup_credit > o_.warmup) {
    return bad("warmup_credit must be in 0..warmup", s.warmup_credit);
  }
  steps_ = s.steps;
  since_ = s.since;
  taken_ = s.taken;
  select_n_ = s.select_n;
  reference_n_ = s.reference_n;
  select_ns_ = s.select_ns;
  reference_ns_ = s.reference_ns;
  warmup_credit_ = s.warmup_credit;
  return absl::OkStatus();
}

}  // namespace icecache
