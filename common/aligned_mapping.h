// MapAligned: private anonymous memory that starts on a chosen boundary (a
// slab or a transparent huge page: 2 MiB), for the pool's arena, the page
// keys' slabs and the append staging buffers; FaultInForWrite: memory
// faulted in ahead of its use.
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

// Faults `len` bytes at `p` in for writing, changing none of them:
// MADV_POPULATE_WRITE while `*populate` is true (Linux 5.14 and later; on
// EINVAL, a kernel without it, `*populate` turns false), then a read of
// each page (TouchPagesForRead: a shadow-paged guest charges a populated
// page's first touch from user space), else an atomic no-op write to each
// page (safe beside a thread writing the same bytes).
// For the pool's prefault and the append staging reserve.
void FaultInForWrite(uint8_t* p, uint64_t len, bool* populate);

}  // namespace icecache

#endif  // ICECACHE_COMMON_ALIGNED_MAPPING_H_
