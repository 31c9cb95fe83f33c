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
  return !warm() || since_ >= Interval();
}

void SampleSchedule::Taken() {
  since_ = 0;
  ++taken_;
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

}  // namespace icecache
