// How much longer the tests may wait in a slow build (sanitizers).
#ifndef ICECACHE_TESTS_SUPPORT_TIME_SCALE_H_
#define ICECACHE_TESTS_SUPPORT_TIME_SCALE_H_

#include <cstdlib>

#include "absl/time/time.h"

namespace icecache::testing {

// How many times slower than a Release build this run is:
// ICECACHE_TEST_TIME_SCALE (deploy/dev.sh sets it for the sanitizer builds),
// else 1. Only waits that bound how long the machine takes (a daemon's start,
// a reaper's next pass, a deadline meant to be generous) are scaled, never
// a duration under test (a TTL, a drain timeout).
inline double TimeScale() {
  static const double scale = [] {
    const char* env = std::getenv("ICECACHE_TEST_TIME_SCALE");
    const double v = env == nullptr ? 1.0 : std::atof(env);
    return v >= 1.0 ? v : 1.0;
  }();
  return scale;
}

inline absl::Duration Scaled(absl::Duration d) { return d * TimeScale(); }

}  // namespace icecache::testing

#endif  // ICECACHE_TESTS_SUPPORT_TIME_SCALE_H_
