#include "common/populate.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>

namespace icecache {
namespace {

std::atomic<bool> populate_supported{true};

uintptr_t PageBytes() {
  static const uintptr_t page = [] {
    const long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? static_cast<uintptr_t>(p) : uintptr_t{4096};
  }();
  return page;
}

}  // namespace

void PopulateForWrite(void* p, size_t bytes) {
#ifdef MADV_POPULATE_WRITE
  if (bytes < kPopulateMinBytes || !populate_supported.load(std::memory_order_relaxed)) return;
  const uintptr_t page = PageBytes();
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(page - 1);
  if (end <= begin) return;
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE) != 0 &&
      errno == EINVAL) {
    populate_supported.store(false, std::memory_order_relaxed);
  }
#else
  (void)p;
  (void)bytes;
#endif
}

__attribute__((no_sanitize("thread"))) void TouchPagesForRead(const void* p, size_t bytes) {
  const uintptr_t page = PageBytes();
  const auto* bytes_at = static_cast<const volatile uint8_t*>(p);
  for (size_t at = 0; at < bytes; at += page) (void)bytes_at[at];
}

void TouchZeroPages(void* p, size_t bytes) {
  const uintptr_t page = PageBytes();
  auto* bytes_at = static_cast<volatile uint8_t*>(p);
  for (size_t at = 0; at < bytes; at += page) bytes_at[at] = 0;
}

}  // namespace icecache
