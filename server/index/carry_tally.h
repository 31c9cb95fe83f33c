// The mass ratios of carried and fresh selections' samples since a start,
// and the judgement on them (docs/architecture.md §5.1, candidate
// carry-over): shared by a head's calibrator (width_calibrator.h) and the
// session's pooled judgement (server/session/carry_pool.h).
//
// Thread safety: none; the owner serialises.
#ifndef ICECACHE_SERVER_INDEX_CARRY_TALLY_H_
#define ICECACHE_SERVER_INDEX_CARRY_TALLY_H_

#include <cstdint>

namespace icecache {

struct CarryTally {
  int64_t carried = 0, fresh = 0;  // samples of each kind
  double carried_sum = 0.0, fresh_sum = 0.0;

  void Add(double mass_ratio, bool was_carried) {
    if (was_carried) {
      ++carried;
      carried_sum += mass_ratio;
    } else {
      ++fresh;
      fresh_sum += mass_ratio;
    }
  }
  void Clear() { *this = CarryTally{}; }
  double carried_mean() const { return carried > 0 ? carried_sum / carried : 0.0; }
  double fresh_mean() const { return fresh > 0 ? fresh_sum / fresh : 0.0; }
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
  bool FallsBehind(int64_t samples, double margin, double target, int carry_steps) const {
    if (!Judged(samples) || !(fresh_mean() - carried_mean() > margin)) return false;
    if (!(target > 0.0)) return true;
    const double c = static_cast<double>(carry_steps > 0 ? carry_steps : 1);
    return (fresh_mean() + c * carried_mean()) / (c + 1.0) < target;
  }
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_CARRY_TALLY_H_
