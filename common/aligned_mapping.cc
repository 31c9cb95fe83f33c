#include "common/aligned_mapping.h"

#include <sys/mman.h>
#include <unistd.h>

#include "common/populate.h"

namespace icecache {

uint8_t* MapAligned(uint64_t bytes, uint64_t align, int extra_flags) {
  void* raw = mmap(nullptr, bytes + align, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | extra_flags, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + align - 1) & ~(align - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t tail = start + align - aligned;  // slack after the aligned range
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + bytes), tail);
  return reinterpret_cast<uint8_t*>(aligned);
}

bool PopulateWritable(uint8_t* p, uint64_t len) {
#ifdef MADV_POPULATE_WRITE
  if (madvise(p, len, MADV_POPULATE_WRITE) != 0) return false;
  TouchPagesForRead(p, len);
  return true;
#else
  (void)p;
  (void)len;
  return false;
#endif
}

void FaultInForWrite(uint8_t* p, uint64_t len, bool* populate) {
  if (*populate && PopulateWritable(p, len)) return;
  *populate = false;
  const long page = sysconf(_SC_PAGESIZE) > 0 ? sysconf(_SC_PAGESIZE) : 4096;
  for (uint64_t off = 0; off < len; off += static_cast<uint64_t>(page)) {
    __atomic_fetch_or(p + off, uint8_t{0}, __ATOMIC_RELAXED);
  }
}

}  // namespace icecache
