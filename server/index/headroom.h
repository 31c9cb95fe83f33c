// Capacity policy of the indexes' growing arrays (docs/architecture.md §3.3):
// a bulk build reserves room for as many tokens again as it laid out (at
// least kMinHeadroomTokens), so the decode appends that follow a prefill
// never reallocate a whole array on their path; past that room, arrays grow
// geometrically. Reserved room is address space: the pages behind it are
// touched only when tokens arrive.
#ifndef ICECACHE_SERVER_INDEX_HEADROOM_H_
#define ICECACHE_SERVER_INDEX_HEADROOM_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace icecache {

inline constexpr int64_t kMinHeadroomTokens = 4096;

// Tokens to reserve for after a bulk build of `n` tokens.
inline int64_t TokensWithHeadroom(int64_t n) {
  return n + std::max<int64_t>(n, kMinHeadroomTokens);
}

// Makes room for `needed` elements, at least doubling the capacity when it
// must grow (std::vector::reserve alone allocates exactly, which makes a
// one-by-one append copy the whole array every time).
template <typename T>
void ReserveGeometric(std::vector<T>* v, size_t needed) {
  if (needed > v->capacity()) v->reserve(std::max(needed, 2 * v->capacity()));
}

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_HEADROOM_H_
