#include "server/index/token_select.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <utility>

#include "server/index/page_select.h"
#include "server/index/prefetch_lines.h"

namespace icecache {
namespace {

// A candidate token: `key` orders it (the higher the better), as score
// first, then the lower position: bits 63-32 are its score in an
// order-keeping uint32 (OrderedBits), bits 31-0 are 0x7fffffff - position
// (positions are non-negative int32). Positions are distinct, so are keys:
// one integer comparison is the whole ranking (a score tie no longer takes
// a second comparison and its mispredicted branch).
struct RankedToken {
  uint64_t key;
  Placement placement;
};

// A float's bits as a uint32 that orders as the float does (-0 just under
// +0; a NaN never reaches here: scores are cleaned first).
inline uint32_t OrderedBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}
inline float FromOrderedBits(uint32_t o) {
  const uint32_t u = (o & 0x80000000u) != 0 ? (o & 0x7fffffffu) : ~o;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint64_t TokenKey(float score, int32_t position) {
  return (static_cast<uint64_t>(OrderedBits(score)) << 32) |
         (0x7fffffffu - static_cast<uint32_t>(position));
}
inline float KeyScore(uint64_t key) { return FromOrderedBits(static_cast<uint32_t>(key >> 32)); }
inline int32_t KeyPosition(uint64_t key) {
  return static_cast<int32_t>(0x7fffffffu - static_cast<uint32_t>(key));
}

// Per-thread buffers, sized once and reused. `held` of `scored` are live;
// the vector itself only grows (the appends write past `held`).
struct TokenScratch {
  std::vector<RankedToken> scored;
  size_t held = 0;
  std::vector<RankedToken> sort_tmp;  // RadixSortDescending's other buffer
  std::vector<float> share;           // one page's token scores
  std::vector<uint64_t> order;        // candidates by bound, best first (their keys)
  std::vector<uint64_t> order_tmp;    // RadixSortDescending's other buffer for `order`
};

TokenScratch& ThreadTokenScratch() {
  thread_local TokenScratch scratch;
  return scratch;
}

// Higher key first. A lambda, so the standard algorithms inline it.
constexpr auto RankedBetter = [](const RankedToken& a, const RankedToken& b) {
  return a.key > b.key;
};

// Sorts v[0, n) by key(v[i]) (uint64), highest first, stably: a least
// significant digit radix sort of 8-bit digits, a digit that every key
// shares skipped. No comparisons, so no mispredicted branches: the sorts of
// a few hundred tokens or candidate pages that were a tenth of a token
// selection each (docs/bench/take44.md). `tmp` is resized to n.
template <typename T, typename KeyOf>
void RadixSortDescending(T* v, size_t n, std::vector<T>* tmp, KeyOf key_of) {
  if (n < 2) return;
  uint32_t count[8][256] = {};
  for (size_t i = 0; i < n; ++i) {
    const uint64_t k = key_of(v[i]);
    for (int d = 0; d < 8; ++d) ++count[d][(k >> (8 * d)) & 0xff];
  }
  if (tmp->size() < n) tmp->resize(n);
  T* src = v;
  T* dst = tmp->data();
  for (int d = 0; d < 8; ++d) {
    uint32_t* c = count[d];
    const uint64_t first = (key_of(src[0]) >> (8 * d)) & 0xff;
    if (c[first] == n) continue;  // every key has this digit
    uint32_t at = 0;
    for (int b = 255; b >= 0; --b) {
      const uint32_t k = c[b];
      c[b] = at;
      at += k;
    }
    for (size_t i = 0; i < n; ++i) dst[c[(key_of(src[i]) >> (8 * d)) & 0xff]++] = src[i];
    std::swap(src, dst);
  }
  if (src != v) std::copy(src, src + n, v);
}

// Room for `more` appends past s->held.
inline RankedToken* AppendRoom(TokenScratch* s, size_t more) {
  if (s->scored.size() < s->held + more) s->scored.resize(s->held + more);
  return s->scored.data() + s->held;
}

// For each 8-bit mask, the indices of its set bits in order, one per byte
// (the lanes to keep, moved to the front by a permute).
struct KeepLanes {
  uint64_t lanes[256];
  constexpr KeepLanes() : lanes() {
    for (int m = 0; m < 256; ++m) {
      uint64_t v = 0;
      int at = 0;
      for (int b = 0; b < 8; ++b) {
        if ((m >> b) & 1) v |= static_cast<uint64_t>(b) << (8 * at++);
      }
      lanes[m] = v;
    }
  }
};
constexpr KeepLanes kKeepLanes;

// Eight tokens at once: their scores `share`, positions `pos` and slots
// first_slot.. written as records, the kept ones (not forced, key above
// `floor`) first; returns how many are kept. Writes all 8 records.
inline size_t AppendEight(const float* share, const int32_t* pos, uint32_t page,
                          uint32_t first_slot, int32_t sink_end, int32_t recent_begin,
                          uint64_t floor, RankedToken* out) {
  const __m256 sc = _mm256_loadu_ps(share);
  // A NaN score counts as 0 (as TokenKey's callers clean it).
  const __m256i u = _mm256_castps_si256(_mm256_and_ps(sc, _mm256_cmp_ps(sc, sc, _CMP_ORD_Q)));
  const __m256i sign = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
  // OrderedBits: ~u for a negative score, u | sign otherwise.
  const __m256i hi = _mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi32(u, 31), sign));
  const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos));
  const __m256i lo = _mm256_sub_epi32(_mm256_set1_epi32(0x7fffffff), p);
  // key > floor, in signed 32-bit compares (the high halves with the sign
  // flipped; the low halves are never negative).
  const __m256i hs = _mm256_xor_si256(hi, sign);
  const __m256i fh = _mm256_set1_epi32(static_cast<int32_t>((floor >> 32) ^ 0x80000000u));
  const __m256i fl = _mm256_set1_epi32(static_cast<int32_t>(floor & 0xffffffffu));
  const __m256i above =
      _mm256_or_si256(_mm256_cmpgt_epi32(hs, fh),
                      _mm256_and_si256(_mm256_cmpeq_epi32(hs, fh), _mm256_cmpgt_epi32(lo, fl)));
  const __m256i unforced =
      _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(sink_end), p),
                          _mm256_cmpgt_epi32(_mm256_set1_epi32(recent_begin), p));
  const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_and_si256(above, unforced)));
  const __m256i perm =
      _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(kKeepLanes.lanes[mask])));
  const __m256i slot = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(first_slot)),
                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i klo = _mm256_permutevar8x32_epi32(lo, perm);
  const __m256i khi = _mm256_permutevar8x32_epi32(hi, perm);
  const __m256i ksl = _mm256_permutevar8x32_epi32(slot, perm);
  const __m256i pg = _mm256_set1_epi32(static_cast<int32_t>(page));
  // Records {key lo, key hi, page, slot}: lanes (0, 4), (1, 5), (2, 6), (3, 7).
  const __m256i a0 = _mm256_unpacklo_epi32(klo, khi), a1 = _mm256_unpackhi_epi32(klo, khi);
  const __m256i b0 = _mm256_unpacklo_epi32(pg, ksl), b1 = _mm256_unpackhi_epi32(pg, ksl);
  const __m256i r04 = _mm256_unpacklo_epi64(a0, b0), r15 = _mm256_unpackhi_epi64(a0, b0);
  const __m256i r26 = _mm256_unpacklo_epi64(a1, b1), r37 = _mm256_unpackhi_epi64(a1, b1);
  auto* o = reinterpret_cast<__m256i*>(out);
  static_assert(sizeof(RankedToken) == 16, "records are 16 bytes: two per 256-bit store");
  _mm256_storeu_si256(o, _mm256_permute2x128_si256(r04, r15, 0x20));
  _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(r26, r37, 0x20));
  _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(r04, r15, 0x31));
  _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(r26, r37, 0x31));
  return static_cast<size_t>(__builtin_popcount(static_cast<unsigned>(mask)));
}

// Appends page `page`'s tokens (scores in s->share, positions `pos`) that
// are not forced and whose key is above `floor` (0: all; a key is never
// 0), without a branch per token: eight at a time, kept ones first, then
// one at a time, each written and kept or overwritten.
inline void AppendPageTokens(uint32_t page, uint32_t fill, const int32_t* pos, int64_t sink_end,
                             int64_t recent_begin, uint64_t floor, TokenScratch* s) {
  RankedToken* out = AppendRoom(s, fill);  // k <= t: the eight never pass fill
  const float* share = s->share.data();
  // Positions are int32, so both bounds fit one (they lie in [0, n]).
  const auto sink = static_cast<int32_t>(sink_end);
  const auto recent = static_cast<int32_t>(recent_begin);
  size_t k = 0;
  uint32_t t = 0;
  for (; t + 8 <= fill; t += 8) {
    k += AppendEight(share + t, pos + t, page, t, sink, recent, floor, out + k);
  }
  for (; t < fill; ++t) {
    const float score = std::isnan(share[t]) ? 0.0f : share[t];
    const uint64_t key = TokenKey(score, pos[t]);
    out[k] = RankedToken{key, Placement{page, t}};
    k += static_cast<size_t>((pos[t] >= sink) & (pos[t] < recent) & (key > floor));
  }
  s->held += k;
}

// Scores the tokens of every candidate page that is not forced into `scored`.
void ScoreCandidates(const Selector& selector, const TokenCandidates& c, const float* log_norm,
                     int num_queries, float scale, int64_t sink_end, int64_t recent_begin,
                     TokenScratch* s) {
  s->held = 0;
  for (size_t i = 0; i < c.pages.size(); ++i) {
    const uint32_t page = c.pages[i];
    const uint32_t fill = selector.fill(page);
    if (fill == 0) continue;
    if (s->share.size() < fill) s->share.resize(fill);
    TokenShares(c.logits.data() + c.offsets[i], fill, log_norm, num_queries, scale,
                s->share.data());
    AppendPageTokens(page, fill, selector.positions(page), sink_end, recent_begin, 0, s);
  }
}

// The forced range [0, sink_end) and [recent_begin, n) of `params`, and the
// forced tokens added to `out` (cleared first).
struct Forced {
  int64_t sink_end = 0;
  int64_t recent_begin = 0;
};
Forced AddForced(const Selector& selector, const SelectParams& params, Selection* out) {
  out->pages.clear();
  out->scores.clear();
  out->positions.clear();
  out->token_refs.clear();
  const int64_t n = selector.num_tokens();
  Forced f;
  f.sink_end = std::min<int64_t>(std::max(0, params.sink_tokens), n);
  f.recent_begin = std::max<int64_t>(f.sink_end, n - std::max(0, params.recent_tokens));
  const float inf = std::numeric_limits<float>::infinity();
  // The placements of both ranges at once (placements_of overlaps their
  // lookups), then the positions and the scores.
  const auto sinks = static_cast<int32_t>(f.sink_end);
  const auto recent = static_cast<int32_t>(n - f.recent_begin);
  out->token_refs.resize(static_cast<size_t>(sinks) + recent);
  selector.placements_of(0, sinks, out->token_refs.data());
  selector.placements_of(static_cast<int32_t>(f.recent_begin), recent,
                         out->token_refs.data() + sinks);
  for (int32_t p = 0; p < sinks; ++p) out->positions.push_back(p);
  for (int64_t p = f.recent_begin; p < n; ++p) out->positions.push_back(static_cast<int32_t>(p));
  out->scores.assign(out->token_refs.size(), inf);
  return f;
}

// Budget left after the forced tokens.
size_t Wanted(const Selector& selector, const SelectParams& params, const Selection& out) {
  const int64_t budget = std::min<int64_t>(params.budget_tokens, selector.num_tokens());
  return static_cast<size_t>(
      std::max<int64_t>(0, budget - static_cast<int64_t>(out.token_refs.size())));
}

// Appends the best min(want, held) of s->scored to `out`, best first, and
// packs the fills. Keys are distinct, so the order is total: the best by a
// linear selection, then only they sorted. The same tokens in the same
// order as a partial_sort, whose heap over every candidate
// (candidate_factor x budget of them, more at a calibrated width) cost most
// of a token selection (docs/bench/sel8_decode.md).
void TakeBestTokens(const Selector& selector, size_t want, TokenScratch* s, Selection* out) {
  const size_t take = std::min(want, s->held);
  RankedToken* v = s->scored.data();
  if (take < s->held) std::nth_element(v, v + take, v + s->held, RankedBetter);
  RadixSortDescending(v, take, &s->sort_tmp, [](const RankedToken& r) { return r.key; });
  for (size_t i = 0; i < take; ++i) {
    out->token_refs.push_back(v[i].placement);
    out->positions.push_back(KeyPosition(v[i].key));
    out->scores.push_back(KeyScore(v[i].key));
  }
  PackedFills(static_cast<int64_t>(out->token_refs.size()), selector.config().page_tokens,
              &out->fills);
}

}  // namespace

void PackedFills(int64_t n, int page_tokens, std::vector<uint32_t>* fills) {
  fills->clear();
  const int64_t t = std::max(1, page_tokens);
  for (int64_t done = 0; done < n; done += t) {
    fills->push_back(static_cast<uint32_t>(std::min(t, n - done)));
  }
}

void TakeTokens(const Selector& selector, const TokenCandidates& candidates, const float* log_norm,
                int num_queries, float scale, const SelectParams& params, Selection* out) {
  const Forced f = AddForced(selector, params, out);
  TokenScratch& s = ThreadTokenScratch();
  ScoreCandidates(selector, candidates, log_norm, num_queries, scale, f.sink_end, f.recent_begin,
                  &s);
  TakeBestTokens(selector, Wanted(selector, params, *out), &s, out);
}

void TakeTokensBounded(const Selector& selector, const TokenCandidates& candidates,
                       const float* bound, const float* log_norm, int num_queries, float scale,
                       const SelectParams& params, Selection* out) {
  const Forced f = AddForced(selector, params, out);
  TokenScratch& s = ThreadTokenScratch();
  const size_t want = Wanted(selector, params, *out);
  s.held = 0;
  if (want == 0) {  // the forced tokens fill the budget
    TakeBestTokens(selector, want, &s, out);
    return;
  }
  // Best bound first, ties to the earlier candidate; a NaN bound sorts
  // first and is always opened. Key: the bound's ordered bits, then
  // 0xffffffff - the candidate's index.
  const size_t n = candidates.pages.size();
  s.order.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const float b = std::isnan(bound[i]) ? std::numeric_limits<float>::infinity() : bound[i];
    s.order[i] =
        (static_cast<uint64_t>(OrderedBits(b)) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
  }
  RadixSortDescending(s.order.data(), n, &s.order_tmp, [](uint64_t k) { return k; });
  // Each opened page's positions are one cache line that nothing read
  // before (the frames were scored, not the page table): asked for all at
  // once, in the order they are opened, so the misses overlap instead of
  // one per page in turn (60% of this function's time in BM_SelectCold
  // before). Pages the cutoff leaves closed cost one prefetch each.
  for (const uint64_t o : s.order) {
    PrefetchLine(selector.positions(candidates.pages[0xffffffffu - static_cast<uint32_t>(o)]));
  }
  // The candidates' tokens are gathered as TakeTokens gathers them, but a
  // token under `cutoff` (the want-th best held at the last compaction: the
  // final want-th best is at least as good) is dropped, and once a cutoff is
  // known a page whose bound is under its score is not opened, nor is any
  // after it. A tie on score may still win on position: the keys decide.
  uint64_t cutoff = 0;  // no token's key is 0
  float cutoff_score = -std::numeric_limits<float>::infinity();
  for (const uint64_t o : s.order) {
    // Rounding: TokenShares' exponential and the bound's differ by far
    // less than 1%, so a token never outscores 1.01 x its page's bound.
    if (cutoff != 0 && FromOrderedBits(static_cast<uint32_t>(o >> 32)) * 1.01f < cutoff_score) {
      break;
    }
    const uint32_t i = 0xffffffffu - static_cast<uint32_t>(o);
    const uint32_t page = candidates.pages[i];
    const uint32_t fill = selector.fill(page);
    if (fill == 0) continue;
    if (s.share.size() < fill) s.share.resize(fill);
    TokenShares(candidates.logits.data() + candidates.offsets[i], fill, log_norm, num_queries,
                scale, s.share.data());
    AppendPageTokens(page, fill, selector.positions(page), f.sink_end, f.recent_begin, cutoff, &s);
    // Compact to the best `want` when a cutoff is first possible, then each
    // time the held tokens double: linear work in all.
    if (s.held >= (cutoff != 0 ? 2 * want : want)) {
      RankedToken* v = s.scored.data();
      std::nth_element(v, v + (want - 1), v + s.held, RankedBetter);
      s.held = want;
      cutoff = v[want - 1].key;
      cutoff_score = KeyScore(cutoff);
    }
  }
  TakeBestTokens(selector, want, &s, out);
}

}  // namespace icecache
