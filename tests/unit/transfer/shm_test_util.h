// Helpers for tests that need real files under /dev/shm.
#ifndef ICECACHE_TESTS_UNIT_TRANSFER_SHM_TEST_UTIL_H_
#define ICECACHE_TESTS_UNIT_TRANSFER_SHM_TEST_UTIL_H_

#include <unistd.h>

#include <atomic>
#include <string>

namespace icecache::testing {

// A name unique to this process and call, e.g. "icecache-test-1234-7-label".
inline std::string UniqueShmName(const std::string& label) {
  static std::atomic<int> counter{0};
  return "icecache-test-" + std::to_string(getpid()) + "-" + std::to_string(counter++) + "-" +
         label;
}

}  // namespace icecache::testing

#endif  // ICECACHE_TESTS_UNIT_TRANSFER_SHM_TEST_UTIL_H_
