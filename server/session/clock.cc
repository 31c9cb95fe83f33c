#include "server/session/clock.h"

namespace icecache {
namespace {
class RealClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
};
}  // namespace

Clock* Clock::Real() {
  static Clock* const kClock = new RealClock();
  return kClock;
}

}  // namespace icecache
