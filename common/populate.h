// Heap memory faulted in ahead of its first write, in one system call
// instead of one page fault per 4 KiB page.
//
// A new index is net-new memory: at 32768 tokens a tree's arrays (its node
// representatives with the decode headroom, the key and page tables) are a
// few MiB that no freed memory can supply, so every build faults them in.
// Where a demand fault is a trip through a hypervisor, about 13 us per page
// on the VMs we measured, MADV_POPULATE_WRITE faults the same pages 16x
// cheaper (docs/operations.md, "What the cost is"). Contents are unchanged,
// so populating memory another thread may be reading is safe.
#ifndef ICECACHE_COMMON_POPULATE_H_
#define ICECACHE_COMMON_POPULATE_H_

#include <cstddef>
#include <vector>

namespace icecache {

// Ranges below this are left to demand faults (the system call costs about
// as much as a few faults).
inline constexpr size_t kPopulateMinBytes = size_t{64} << 10;

// Faults in the whole pages inside [p, p + bytes) for writing
// (MADV_POPULATE_WRITE, Linux 5.14 and later), when bytes >=
// kPopulateMinBytes. A no-op where the kernel lacks it (remembered
// process-wide after the first EINVAL) and for memory that is not a private
// writable mapping. Thread-safe.
void PopulateForWrite(void* p, size_t bytes);

// Writes a zero into every page of [p, p + bytes), which must already hold
// zeros (a fresh file or mapping): its contents are unchanged. For a
// buffer that must be resident before anything is timed, as a pinned host
// buffer (cudaHostAlloc) is when it is made. Not what PopulateForWrite
// does: on a guest with shadow page tables a page faulted in and mapped can
// still cost ~5 us at its first touch through a mapping, a trip through the
// hypervisor no guest fault counter shows (a 512 MiB buffer's first copy
// took 0.65-1.4 s against 35 ms for the second, MAP_POPULATE or not:
// docs/bench/touch49.md). A read or write by the CPU pays it.
void TouchZeroPages(void* p, size_t bytes);

// Reads one byte of every page of [p, p + bytes) and nothing else: what
// makes memory that MADV_POPULATE_WRITE faulted in cheap at its first write
// on a guest with shadow page tables, where the populated page still cost
// ~5 us at its first touch from user space (4 KiB pages; a huge page pays it
// once). Measured on the 2-core VM: 256 frame writes into a populated 2 MiB
// slab of 4 KiB pages took 1.3 ms, and 9 us after this read
// (docs/bench/cpu52.md). Reads only, so it may run while another thread
// writes the same memory (a slab being carved); it is not instrumented by
// ThreadSanitizer for that reason.
void TouchPagesForRead(const void* p, size_t bytes);

// v->resize(n, value), with the elements past the current size faulted in
// ahead of resize's writes. Reserves exactly n when the capacity is short
// (call reserve first for more headroom; the headroom is not populated).
template <typename T>
void ResizePopulated(std::vector<T>* v, size_t n, const T& value = T()) {
  const size_t old = v->size();
  if (n > old) {
    if (n > v->capacity()) v->reserve(n);
    PopulateForWrite(v->data() + old, (n - old) * sizeof(T));
  }
  v->resize(n, value);
}

// v->assign(n, value), populated the same way.
template <typename T>
void AssignPopulated(std::vector<T>* v, size_t n, const T& value = T()) {
  if (n > v->capacity()) {
    v->clear();
    v->shrink_to_fit();
    v->reserve(n);
  }
  PopulateForWrite(v->data(), n * sizeof(T));
  v->assign(n, value);
}

}  // namespace icecache

#endif  // ICECACHE_COMMON_POPULATE_H_
