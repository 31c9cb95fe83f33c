// Returning the malloc heap's free pages to the kernel after sessions drop
// (docs/architecture.md §4).
//
// glibc keeps memory freed by the request and builder threads in its
// per-thread arenas: after a load of 64 sessions (icecache-load, 8 tenants x
// 2 workers x 4 sessions) every session was dropped and the heap held 0.85 MB
// in use and 65 MB free in 16 arenas, all of it resident; malloc_trim(0)
// returned 55 MiB of RSS (docs/bench/load.md). A session's heap (its
// indexes, selection buffers) is freed with its frames, so frames freed in
// the pool are the signal that a trim is worth its cost.
//
// Process-wide, as the heap is. Thread safety: NoteFramesFreed from any
// thread (an atomic add); MaybeTrimHeap from one background thread at a time
// (icecached's reaper).
#ifndef ICECACHE_SERVER_POOL_HEAP_TRIM_H_
#define ICECACHE_SERVER_POOL_HEAP_TRIM_H_

#include <cstdint>

namespace icecache {

// Pool bytes freed since the last trim that make the next one worth it.
inline constexpr uint64_t kHeapTrimAfterFreedBytes = uint64_t{64} << 20;
// At most one trim per this many milliseconds (malloc_trim walks every
// arena under its lock: a few milliseconds on a busy daemon).
inline constexpr int64_t kHeapTrimMinIntervalMs = 5000;

// Called by PagePool::Free with the bytes of the frames it took back.
void NoteFramesFreed(uint64_t bytes);

// malloc_trim(0) when at least kHeapTrimAfterFreedBytes of frames were freed
// since the last trim and kHeapTrimMinIntervalMs passed. Returns whether it
// trimmed. A no-op returning false where the C library has no malloc_trim.
bool MaybeTrimHeap();

}  // namespace icecache

#endif  // ICECACHE_SERVER_POOL_HEAP_TRIM_H_
