// MapAligned: private anonymous memory that starts on a chosen boundary (a
// slab or a transparent huge page: 2 MiB), for the pool's arena, the page
// keys' slabs and the append staging buffers.
#ifndef ICECACHE_COMMON_ALIGNED_MAPPING_H_
#define ICECACHE_COMMON_ALIGNED_MAPPING_H_

#include <cstdint>

namespace icecache {

// `bytes` (> 0, a multiple of `align`) readable and writable bytes starting
// on an `align` boundary (a power of two, a multiple of the page size):
// maps bytes + align and unmaps the slack on either side, so
// munmap(p, bytes) frees all of it. `extra_flags` are OR-ed into the mmap
// flags (e.g. MAP_NORESERVE). Null, with errno from mmap, when it fails.
uint8_t* MapAligned(uint64_t bytes, uint64_t align, int extra_flags = 0);

}  // namespace icecache

#endif  // ICECACHE_COMMON_ALIGNED_MAPPING_H_
