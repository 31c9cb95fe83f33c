// Helpers shared by the DCI-tree's source files (dci_tree*.cc); not part of
// the index's interface.
#ifndef ICECACHE_SERVER_INDEX_DCI_TREE_INTERNAL_H_
#define ICECACHE_SERVER_INDEX_DCI_TREE_INTERNAL_H_

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "server/index/kernels.h"
#include "server/index/selector.h"

namespace icecache {
namespace dci_internal {

inline float SquaredNorm(const float* x, int dim) { return DotF32(x, x, dim); }

// Ranking of (score, node) pairs: higher score first, then lower node id.
inline bool Better(const std::pair<float, uint32_t>& p, const std::pair<float, uint32_t>& q) {
  return p.first > q.first || (p.first == q.first && p.second < q.second);
}
// Better as a function object for the std algorithms: they inline it, where
// a function pointer costs an indirect call per comparison (a sort of a few
// thousand candidates spent most of the descent's ranking time in them).
struct BetterOrder {
  bool operator()(const std::pair<float, uint32_t>& p, const std::pair<float, uint32_t>& q) const {
    return Better(p, q);
  }
};

// Software prefetch of `bytes` bytes from `p` (every 64-byte line). The
// selection descent reads representatives and pages of ids known in advance
// but scattered in memory: asking for all of them at once lets the cache
// misses overlap instead of being taken one after the other.
inline void PrefetchBytes(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  const char* end = c + bytes;
  for (c = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(c) & ~uintptr_t{63}); c < end;
       c += 64) {
    __builtin_prefetch(c);
  }
}

// InvalidArgument for null pointers, n < 1 or a non-finite key (names the
// row and column).
absl::Status CheckKeys(const float* keys, int64_t n, int dim,
                       const std::vector<Placement>* placements);

}  // namespace dci_internal
}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_DCI_TREE_INTERNAL_H_
