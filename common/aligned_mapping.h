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

// MADV_POPULATE_WRITE over `len` bytes at `p` (Linux 5.14 and later), then
// a read of each page (TouchPagesForRead: on a guest with shadow page tables
// a populated page still costs ~5 us at its first touch from user space,
// paid here rather than by whoever writes it next; docs/bench/cpu52.md).
// Changes no byte and only reads, so it may run while another thread writes
// the same memory (a slab being carved). False, with nothing done, where
// the kernel cannot populate.
bool PopulateWritable(uint8_t* p, uint64_t len);

// Faults `len` bytes at `p` in for writing, changing none of them:
// PopulateWritable while `*populate` is true (on failure, a kernel without
// MADV_POPULATE_WRITE, `*populate` turns false), else an atomic no-op write
// to each page (safe beside a thread writing the same bytes).
// For the pool's prefault and the append staging reserve.
void FaultInForWrite(uint8_t* p, uint64_t len, bool* populate);

}  // namespace icecache

#endif  // ICECACHE_COMMON_ALIGNED_MAPPING_H_
