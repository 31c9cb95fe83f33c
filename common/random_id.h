// Random identifiers from absl::BitGen (seeded from the OS): unguessable ids
// for sessions, buffers and shm files, and the daemon's epoch.
// Thread-safe (one generator per thread).
#ifndef ICECACHE_COMMON_RANDOM_ID_H_
#define ICECACHE_COMMON_RANDOM_ID_H_

#include <cstdint>
#include <string>

namespace icecache {

// 128 random bits as 32 lowercase hex digits.
std::string RandomHexId();

// A random 64-bit value other than 0.
uint64_t RandomNonZero64();

}  // namespace icecache

#endif  // ICECACHE_COMMON_RANDOM_ID_H_
