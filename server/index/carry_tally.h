// The mass ratios of carried and fresh selections' samples since a start,
// and the judgement on them (docs/architecture.md §5.1, candidate
// carry-over): shared by a head's calibrator (width_calibrator.h) and the
// session's pooled judgement (server/session/carry_pool.h).
//
// Thread safety: none; the owner serialises.
#ifndef ICECACHE_SERVER_INDEX_CARRY_TALLY_H_
#define ICECACHE_SERVER_INDEX_CARRY_TALLY_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace icecache {

struct CarryTally {
  int64_t carried = 0, fresh = 0;  // samples of each kind
  double carried_sum = 0.0, fresh_sum = 0.0;
  double carried_sq = 0.0, fresh_sq = 0.0;  // sums of squares (FallsBehind's z)

  void Add(double mass_ratio, bool was_carried) {
    if (was_carried) {
      ++carried;
      carried_sum += mass_ratio;
      carried_sq += mass_ratio * mass_ratio;
    } else {
      ++fresh;
      fresh_sum += mass_ratio;
      fresh_sq += mass_ratio * mass_ratio;
    }
  }
  void Clear() { *this = CarryTally{}; }
  void Merge(const CarryTally& o) {
    carried += o.carried;
    fresh += o.fresh;
    carried_sum += o.carried_sum;
    fresh_sum += o.fresh_sum;
    carried_sq += o.carried_sq;
    fresh_sq += o.fresh_sq;
  }
  double carried_mean() const { return carried > 0 ? carried_sum / carried : 0.0; }
  double fresh_mean() const { return fresh > 0 ? fresh_sum / fresh : 0.0; }
  // The variance of a kind's mean: the samples' (unbiased) variance / n; 0
  // below two samples.
  static double MeanVariance(int64_t n, double sum, double sq) {
    if (n < 2) return 0.0;
    const double mean = sum / static_cast<double>(n);
    const double var = std::max(0.0, (sq - mean * sum) / static_cast<double>(n - 1));
    return var / static_cast<double>(n);
  }
  // Both kinds have at least `samples` samples.
  bool Judged(int64_t samples) const { return carried >= samples && fresh >= samples; }
  // Judged, the carried mean more than `margin` below the fresh one, and
  // (with a `target` > 0) the mix a carry selects in -- one fresh select,
  // then carry_steps carried ones -- under the target. A carry whose fresh
  // selects have room above the target spends that room (the calibrator
  // targets the mean over both kinds) and stops only where it would cost
  // width: on llama3-8b-like decode the carried samples sat 0.031 under
  // the fresh ones' 0.969, and the margin alone stopped a carry whose mix
  // held 0.953 (docs/bench/stagger38.md).
  //
  // `z` > 0 asks for confidence in both: the gap must exceed the margin by
  // z standard errors of the difference of the means, and the mix must stay
  // under the target by z standard errors of the mix. A judgement that is
  // looked at after every sample stops on noise sooner or later otherwise:
  // the session's pool, at 32 layers x 32768 tokens, stopped the carry
  // within the first steps of a run and held it stopped for the rest of the
  // 200 steps (docs/bench/pool39.md). z = 0: the means alone.
  bool FallsBehind(int64_t samples, double margin, double target, int carry_steps,
                   double z = 0.0) const {
    if (!Judged(samples)) return false;
    const double vc = MeanVariance(carried, carried_sum, carried_sq);
    const double vf = MeanVariance(fresh, fresh_sum, fresh_sq);
    const double zz = z > 0.0 ? z : 0.0;
    if (!(fresh_mean() - carried_mean() > margin + zz * std::sqrt(vc + vf))) return false;
    if (!(target > 0.0)) return true;
    const double c = static_cast<double>(carry_steps > 0 ? carry_steps : 1);
    const double mix = (fresh_mean() + c * carried_mean()) / (c + 1.0);
    const double mix_var = (vf + c * c * vc) / ((c + 1.0) * (c + 1.0));
    return mix + zz * std::sqrt(mix_var) < target;
  }
};

// The samples of a carry by carry age ([0] the fresh ones, [a] the carried
// ones of age a, clamped to 1 .. `oldest`), and the judgement of a carry's
// length on them: a carry of length L is judged on ages 0 .. L, so a carry
// shortened by one is judged at once on the samples of the ages it keeps
// (docs/architecture.md §5.1, "shortened before stopped").
struct CarryAges {
  std::vector<CarryTally> by_age;

  void Add(double mass_ratio, bool was_carried, int carry_age, int oldest) {
    const int last = std::max(oldest, 1);
    if (by_age.size() < static_cast<size_t>(last) + 1) by_age.resize(static_cast<size_t>(last) + 1);
    const int a = was_carried ? std::clamp(carry_age, 1, last) : 0;
    by_age[static_cast<size_t>(a)].Add(mass_ratio, was_carried);
  }
  void Clear() { by_age.clear(); }
  // The samples of ages 0 .. steps.
  CarryTally Upto(int steps) const {
    CarryTally t;
    const size_t ages = std::min(by_age.size(), static_cast<size_t>(std::max(steps, 0)) + 1);
    for (size_t a = 0; a < ages; ++a) t.Merge(by_age[a]);
    return t;
  }
  // The length that holds, from `steps` down: one reuse fewer (the last is
  // the stalest) while the samples of ages 0 .. L fall behind
  // (CarryTally::FallsBehind at L); 0 where even one reuse falls behind.
  int Holding(int steps, int64_t samples, double margin, double target, double z) const {
    int l = steps;
    while (l > 0 && Upto(l).FallsBehind(samples, margin, target, l, z)) --l;
    return l;
  }
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_CARRY_TALLY_H_
