// Page checksums (docs/architecture.md §4, §5): XXH3-64 over the bytes of one
// page frame (K rows then V rows, zeros past the fill). The session computes
// them when it writes rows and checks them before a page leaves the daemon;
// a warm restart checks every recovered frame against its snapshot.
//
// xxhash is compiled in (XXH_INLINE_ALL, header from libxxhash-dev), so the
// daemon has no run-time dependency on libxxhash. Pure functions; thread-safe.
#ifndef ICECACHE_SERVER_POOL_FRAME_CHECKSUM_H_
#define ICECACHE_SERVER_POOL_FRAME_CHECKSUM_H_

#include <cstddef>
#include <cstdint>

namespace icecache {

// XXH3_64bits of [data, data + bytes).
uint64_t FrameChecksum(const void* data, size_t bytes);

// Should fetched page `index` of a request seeded with `seed` be checked
// when a `fraction` of pages is sampled? A stateless hash of (seed, index),
// so concurrent fetches need no shared random state. fraction >= 1 is every
// page, <= 0 none.
bool SampleFrame(uint64_t seed, uint64_t index, double fraction);

}  // namespace icecache

#endif  // ICECACHE_SERVER_POOL_FRAME_CHECKSUM_H_
