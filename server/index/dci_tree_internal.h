// Helpers shared by the DCI-tree's source files (dci_tree*.cc); not part of
// the index's interface.
#ifndef ICECACHE_SERVER_INDEX_DCI_TREE_INTERNAL_H_
#define ICECACHE_SERVER_INDEX_DCI_TREE_INTERNAL_H_

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "server/index/kernels.h"
#include "server/index/selector.h"

namespace icecache {

struct DciScratch;

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

// Inserts (score, node) into `out`, kept sorted best first (Better) and at
// most `keep` long (keep is small). Nodes must come in ascending order: a
// score equal to the last kept one does not enter.
//
// The place is upper_bound's under Better: with the nodes ascending, an
// equal score kept is a lower node, so the new pair goes after every kept
// score it does not beat. Counted branch-free over the few kept (a binary
// search's compares are coin flips the CPU mispredicts: it was half of a
// bulk build's window scan), then the worse ones shift down by one.
inline void InsertTopK(float score, uint32_t node, size_t keep,
                       std::vector<std::pair<float, uint32_t>>* out) {
  const size_t size = out->size();
  if (size == keep && !(score > out->back().first)) return;
  size_t pos = 0;
  const std::pair<float, uint32_t>* kept = out->data();
  for (size_t k = 0; k < size; ++k) pos += !(score > kept[k].first);
  size_t last = size;  // the slot the shift fills from above
  if (size < keep) {
    out->emplace_back();
  } else {
    last = keep - 1;  // the worst kept one drops out
  }
  std::pair<float, uint32_t>* d = out->data();
  for (size_t k = last; k > pos; --k) d[k] = d[k - 1];
  d[pos] = {score, node};
}

// The best `keep` (score, first_id + k) of scores[0..n), best first, ties to
// the lower id: exactly what InsertTopK over them in order leaves (a superset
// of the best `keep` taken in order gives the same). Only the scores at or
// above a bound of the keep-th best are visited: the keep-th largest of 8
// lane maxima (LaneMax8: keep disjoint lanes reach it), then the last kept
// one; FirstGreater skips the rest eight at a time.
inline void TopOfScores(const float* scores, uint32_t n, uint32_t first_id, size_t keep,
                        std::vector<std::pair<float, uint32_t>>* out) {
  out->clear();
  if (keep == 0) return;
  float bound = -std::numeric_limits<float>::infinity();
  if (keep <= 8 && n >= 16) {
    float lanes[8];
    LaneMax8(scores, n, lanes);
    std::nth_element(lanes, lanes + (keep - 1), lanes + 8, std::greater<float>());
    bound = std::nextafter(lanes[keep - 1], -std::numeric_limits<float>::infinity());
  }
  uint32_t k = 0;
  while (k < n) {
    const float above = out->size() == keep ? out->back().first : bound;
    k += static_cast<uint32_t>(FirstGreater(scores + k, n - k, above));
    if (k >= n) break;
    InsertTopK(scores[k], first_id + k, keep, out);
    ++k;
  }
}

// Sorts records with `score` (finite float) and `item` (uint32) best first:
// score descending (-0 equal to +0), then item ascending; records equal in
// both keep their input order (stable). LSD radix sort on the 64-bit key
// (order-flipped score, item) in 11-bit digits, a digit every record shares
// skipped; `tmp` is scratch. The order of a comparison sort on (score desc,
// item asc, input order) at a fraction of its branches.
template <typename Rec>
void SortBestFirst(std::vector<Rec>* recs, std::vector<Rec>* tmp) {
  constexpr int kBits = 11;
  constexpr uint32_t kMask = (1u << kBits) - 1;
  // The score's 32 bits, ascending as the score descends (-0 as +0).
  const auto score_key = [](const Rec& r) {
    const float s = r.score == 0.0f ? 0.0f : r.score;
    uint32_t u;
    std::memcpy(&u, &s, sizeof(u));
    u = (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);  // ascending with the float
    return ~u;
  };
  const size_t n = recs->size();
  if (n < 2) return;
  bool items_ascending = true;
  for (size_t i = 1; i < n; ++i) items_ascending &= (*recs)[i].item >= (*recs)[i - 1].item;
  // Records already in item order (every build caller pushes them so): a
  // stable sort on the score alone keeps (item, input order) within equal
  // scores, the order of the whole 64-bit key (score, item), in three passes
  // over the score's bits instead of six.
  const int passes = items_ascending ? 3 : 6;
  const auto key = [&](const Rec& r) -> uint64_t {
    const uint64_t k = score_key(r);
    return items_ascending ? k : (k << 32) | r.item;
  };
  std::vector<std::array<uint32_t, 1u << kBits>> count(passes);
  for (auto& c : count) c.fill(0);
  for (const Rec& r : *recs) {
    const uint64_t k = key(r);
    for (int p = 0; p < passes; ++p) ++count[p][(k >> (p * kBits)) & kMask];
  }
  tmp->resize(n);
  for (int p = 0; p < passes; ++p) {
    const int shift = p * kBits;
    std::array<uint32_t, 1u << kBits>& c = count[p];
    if (c[(key((*recs)[0]) >> shift) & kMask] == n) continue;  // one digit for all
    uint32_t sum = 0;
    for (uint32_t& v : c) {
      const uint32_t here = v;
      v = sum;
      sum += here;
    }
    for (const Rec& r : *recs) (*tmp)[c[(key(r) >> shift) & kMask]++] = r;
    recs->swap(*tmp);
  }
}

// The selection descent's ranking (dci_tree_descent.cc, TakeBest): only the
// head is needed, sorted in growing chunks. Puts the best `end - from` of
// scored[from..] in order at `from` and returns how many leading entries are
// now in their final order (>= end). Same order as a partial_sort under
// BetterOrder (score descending, then the lower second; without a NaN the
// ranking is total). `s` lends its head_* buffers.
//
// Comparison sorts of random floats mispredict every other branch (they were
// most of the descent's ranking time), so the head is found and sorted on
// integers: the scores are counted into buckets of equal width between the
// lowest and the highest (a bucket is a monotone function of the score, so
// equal scores share one); the buckets holding the best `end - from` are
// kept (every score at or above the last kept bucket's, ties included) and
// only those are radix-sorted on the score's order key, stably, equal scores
// then ordered by their second. The rest stay behind in their input order.
// A NaN, an infinity or all scores equal take the comparison path
// (nth_element of the threshold, partition, sort of the head).
size_t SortHead(std::vector<std::pair<float, uint32_t>>* scored, DciScratch* s, size_t from,
                size_t end);

// SortHead's first chunk straight from the candidates' scores: s->scored =
// every (score[i], i) of score[0..n), the best k first in ranking order
// (exactly as SortHead(0, k) leaves them, the same count returned), the rest
// behind in index order. The scores are read from a plain array (the
// buckets, the bounds and the order keys in vector loops) and the pairs are
// written once.
size_t RankHead(const float* score, size_t n, size_t k, DciScratch* s);

// Software prefetch of `bytes` bytes from `p` (every 64-byte line). The
// selection descent reads representatives and pages of ids known in advance
// but scattered in memory: asking for all of them at once lets the cache
// misses overlap instead of being taken one after the other.
// InvalidArgument for null pointers, n < 1 or a non-finite key (names the
// row and column).
absl::Status CheckKeys(const float* keys, int64_t n, int dim,
                       const std::vector<Placement>* placements);

}  // namespace dci_internal
}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_DCI_TREE_INTERNAL_H_
