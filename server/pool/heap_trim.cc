#include "server/pool/heap_trim.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <atomic>
#include <chrono>

namespace icecache {
namespace {

std::atomic<uint64_t> freed_since_trim{0};
std::atomic<int64_t> last_trim_ms{0};

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

void NoteFramesFreed(uint64_t bytes) {
  freed_since_trim.fetch_add(bytes, std::memory_order_relaxed);
}

bool MaybeTrimHeap() {
#if defined(__GLIBC__)
  if (freed_since_trim.load(std::memory_order_relaxed) < kHeapTrimAfterFreedBytes) return false;
  const int64_t now = NowMs();
  if (now - last_trim_ms.load(std::memory_order_relaxed) < kHeapTrimMinIntervalMs) return false;
  last_trim_ms.store(now, std::memory_order_relaxed);
  freed_since_trim.store(0, std::memory_order_relaxed);
  malloc_trim(0);
  return true;
#else
  return false;
#endif
}

}  // namespace icecache
