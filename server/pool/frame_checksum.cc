#include "server/pool/frame_checksum.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace icecache {

uint64_t FrameChecksum(const void* data, size_t bytes) { return XXH3_64bits(data, bytes); }

bool SampleFrame(uint64_t seed, uint64_t index, double fraction) {
  if (fraction >= 1.0) return true;
  if (fraction <= 0.0) return false;
  // splitmix64 of the pair: uniform enough for sampling, no state.
  uint64_t z = seed + (index + 1) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) < fraction * 9007199254740992.0;  // 2^53
}

}  // namespace icecache
