// Software prefetches the index's cold paths share.
#ifndef ICECACHE_SERVER_INDEX_PREFETCH_LINES_H_
#define ICECACHE_SERVER_INDEX_PREFETCH_LINES_H_

#include <cstddef>
#include <cstdint>

namespace icecache {

// One cache line asked for. An `asm` prefetch, not __builtin_prefetch:
// GCC 12's pure-const analysis takes a function whose only effect is that
// builtin for one without effects and deletes its calls. It deleted
// DciTree::PrefetchCandidates in every build (docs/bench/warm15_descent.md),
// ScorePages' page prefetches (docs/bench/page11_scoring.md) and a first
// version of DciTree::PrefetchInsertPath.
inline void PrefetchLine(const void* p) {
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
}

// Every cache line of [p, p + bytes) asked for.
inline void PrefetchBytes(const void* p, size_t bytes) {
  if (bytes == 0) return;
  const char* c = static_cast<const char*>(p);
  const char* end = c + bytes;
  for (c = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(c) & ~uintptr_t{63}); c < end;
       c += 64) {
    PrefetchLine(c);
  }
}

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_PREFETCH_LINES_H_
