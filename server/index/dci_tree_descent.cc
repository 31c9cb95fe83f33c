// DciTree::CollectCandidates: the selection descent. From the entry level
// down to level 1, every candidate node's attention mass for the G queries
// is estimated from its representative (dci_node_reps.h), the best are kept
// (field_of_view at least, more until they cover enough tokens) and their
// children become the next level's candidates.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>

#include "server/index/dci_tree.h"
#include "server/index/dci_tree_internal.h"
#include "server/index/kernels.h"
#include "server/index/page_select.h"
#include "server/index/prefetch_lines.h"

namespace icecache {

namespace {

// v->data() with room for n elements. The per-level arrays only grow: they
// are indexed up to the level's count, and shrinking them on one level to
// grow them again on the next zero-filled them on every descent.
template <typename T>
T* AtLeast(std::vector<T>* v, size_t n) {
  if (v->size() < n) v->resize(n);
  return v->data();
}

// Dots of the nq queries `qs` (nq x qdim) with the rows (`width` apart) of
// `arr` for every candidate, out[j * nc + i]; runs of consecutive ids
// (siblings) go through one multi-query kernel call.
template <typename T>
void DotsOfCandidates(const std::vector<T>& arr, int width, const float* qs, int nq, int qdim,
                      DciScratch* s, std::vector<float>* out) {
  const DType dt = sizeof(T) == 2 ? DType::kF16 : DType::kF32;
  const size_t nc = s->cand.size();
  float* o = AtLeast(out, nc * nq);
  for (size_t b = 0; b < nc;) {
    size_t e = b + 1;
    while (e < nc && s->cand[e] == s->cand[e - 1] + 1) ++e;
    const size_t run = e - b;
    const T* rows = &arr[static_cast<size_t>(s->cand[b]) * width];
    if (run == nc) {
      DotRowsMulti(dt, rows, run, qdim, qs, nq, o);
    } else {
      float* rd = AtLeast(&s->run_dots, run * nq);
      DotRowsMulti(dt, rows, run, qdim, qs, nq, rd);
      for (int j = 0; j < nq; ++j) std::copy(rd + j * run, rd + (j + 1) * run, o + j * nc + b);
    }
    b = e;
  }
}

// Order key of a rank score: ascending as the score descends, -0 as +0
// (Better holds them equal).
uint32_t DescendingKey(float v) {
  const float x = v + 0.0f;  // -0 + 0 = +0; every other score unchanged
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  // Ascending with the float: negatives' bits flipped, positives' sign set
  // (branch-free: the sign of the scores of a level is a coin flip).
  u ^= static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u;
  return ~u;
}

// SortHead's general path (a NaN, an infinity, or all scores equal): the
// threshold score of the head found on a plain float copy (nth_element), the
// entries at or above it moved to the front and only those sorted.
size_t SortHeadBySelect(std::vector<std::pair<float, uint32_t>>* scored,
                        std::vector<float>* head_keys, size_t from, size_t end) {
  const size_t n = scored->size(), k = end - from;
  auto first = scored->begin() + from;
  head_keys->resize(n - from);
  bool nan = false;
  for (size_t i = from; i < n; ++i) {
    const float v = (*scored)[i].first;
    (*head_keys)[i - from] = v;
    nan |= v != v;
  }
  if (nan) {
    std::partial_sort(first, scored->begin() + end, scored->end(), dci_internal::BetterOrder());
    return end;
  }
  std::nth_element(head_keys->begin(), head_keys->begin() + (k - 1), head_keys->end(),
                   std::greater<float>());
  const float t = (*head_keys)[k - 1];
  auto mid = std::partition(first, scored->end(),
                            [t](const std::pair<float, uint32_t>& p) { return p.first >= t; });
  std::sort(first, mid, dci_internal::BetterOrder());
  return static_cast<size_t>(mid - scored->begin());
}

// Stable LSD radix sort of recs[0..n) by their upper 32 bits in 8-bit
// digits (a digit every record shares is skipped); returns the buffer that
// holds the result (recs or tmp, both at least n long).
uint64_t* RadixSortUpper32(uint64_t* recs, size_t n, uint64_t* tmp) {
  uint32_t count[4][256] = {};
  for (size_t i = 0; i < n; ++i) {
    const uint32_t key = static_cast<uint32_t>(recs[i] >> 32);
    ++count[0][key & 255u];
    ++count[1][(key >> 8) & 255u];
    ++count[2][(key >> 16) & 255u];
    ++count[3][key >> 24];
  }
  uint64_t* src = recs;
  uint64_t* dst = tmp;
  for (int p = 0; p < 4; ++p) {
    const int shift = 32 + 8 * p;
    uint32_t* c = count[p];
    if (c[(src[0] >> shift) & 255u] == n) continue;
    uint32_t sum = 0;
    for (int b = 0; b < 256; ++b) {
      const uint32_t here = c[b];
      c[b] = sum;
      sum += here;
    }
    for (size_t i = 0; i < n; ++i) dst[c[(src[i] >> shift) & 255u]++] = src[i];
    std::swap(src, dst);
  }
  return src;
}

}  // namespace

size_t dci_internal::SortHead(std::vector<std::pair<float, uint32_t>>* scored, DciScratch* s,
                              size_t from, size_t end) {
  const size_t n = scored->size(), k = end - from;
  if (k == 0 || n - from < 48) {
    std::partial_sort(scored->begin() + from, scored->begin() + end, scored->end(),
                      dci_internal::BetterOrder());
    return end;
  }
  const size_t m = n - from;
  std::pair<float, uint32_t>* in = scored->data() + from;
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  bool nan = false;
  for (size_t i = 0; i < m; ++i) {
    const float v = in[i].first;
    nan |= v != v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const float span = hi - lo;
  // About four scores a bucket.
  const uint32_t buckets = m <= 128 ? 32 : m <= 512 ? 128 : m <= 2048 ? 512 : 1024;
  const float inv = static_cast<float>(buckets - 1) / span;
  if (nan || !(span > 0.0f) || !std::isfinite(span) || !std::isfinite(inv)) {
    return SortHeadBySelect(scored, &s->head_keys, from, end);
  }
  const auto bucket = [hi, inv, buckets](float v) {
    return std::min(buckets - 1, static_cast<uint32_t>((hi - v) * inv));
  };
  uint32_t count[1024];
  std::fill(count, count + buckets, 0u);
  for (size_t i = 0; i < m; ++i) ++count[bucket(in[i].first)];
  size_t kept = 0;
  uint32_t last = 0;
  for (;; ++last) {
    kept += count[last];
    if (kept >= k) break;
  }
  uint64_t* recs = AtLeast(&s->head_recs, 2 * m);
  uint32_t* rest = AtLeast(&s->head_rest, m);
  size_t nk = 0, nr = 0;
  for (size_t i = 0; i < m; ++i) {  // branch-free: both slots written, one counted
    const float v = in[i].first;
    const bool in_head = bucket(v) <= last;
    recs[nk] = (static_cast<uint64_t>(DescendingKey(v)) << 32) | i;
    rest[nr] = static_cast<uint32_t>(i);
    nk += in_head;
    nr += !in_head;
  }
  const uint64_t* head = RadixSortUpper32(recs, nk, recs + m);
  std::pair<float, uint32_t>* out = AtLeast(&s->head_out, m);
  for (size_t t = 0; t < nk; ++t) out[t] = in[static_cast<uint32_t>(head[t])];
  for (size_t t = 0; t < nr; ++t) out[nk + t] = in[rest[t]];
  // Equal scores are in input order: put them in index order (a no-op when
  // the input was, as ScoreCandidates writes it).
  for (size_t a = 0; a + 1 < nk;) {
    size_t b = a + 1;
    while (b < nk && (head[b] >> 32) == (head[a] >> 32)) ++b;
    if (b - a > 1) {
      std::sort(out + a, out + b,
                [](const std::pair<float, uint32_t>& p, const std::pair<float, uint32_t>& q) {
                  return p.second < q.second;
                });
    }
    a = b;
  }
  std::copy(out, out + m, in);
  return from + nk;
}

size_t dci_internal::RankHead(const float* score, size_t n, size_t k, DciScratch* s) {
  auto& scored = s->scored;
  scored.resize(n);
  if (k == 0 || n < 48) {
    for (size_t i = 0; i < n; ++i) scored[i] = {score[i], static_cast<uint32_t>(i)};
    return SortHead(&scored, s, 0, k);
  }
  // The bounds (the same as SortHead's scalar ones: a min or max is exact
  // in any order, and -0 against +0 changes no bucket) and a NaN flag.
  __m256 vlo = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 vhi = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 vnan = _mm256_setzero_ps();
  size_t i0 = 0;
  for (; i0 + 8 <= n; i0 += 8) {
    const __m256 v = _mm256_loadu_ps(score + i0);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  alignas(32) float lanes_lo[8], lanes_hi[8];
  _mm256_store_ps(lanes_lo, vlo);
  _mm256_store_ps(lanes_hi, vhi);
  bool nan = _mm256_movemask_ps(vnan) != 0;
  float lo = lanes_lo[0], hi = lanes_hi[0];
  for (int l = 1; l < 8; ++l) {
    lo = std::min(lo, lanes_lo[l]);
    hi = std::max(hi, lanes_hi[l]);
  }
  for (; i0 < n; ++i0) {
    const float v = score[i0];
    nan |= v != v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const float span = hi - lo;
  const uint32_t buckets = n <= 128 ? 32 : n <= 512 ? 128 : n <= 2048 ? 512 : 1024;
  const float inv = static_cast<float>(buckets - 1) / span;
  if (nan || !(span > 0.0f) || !std::isfinite(span) || !std::isfinite(inv)) {
    for (size_t i = 0; i < n; ++i) scored[i] = {score[i], static_cast<uint32_t>(i)};
    return SortHead(&scored, s, 0, k);
  }
  // The same buckets as SortHead's; counted in four interleaved histograms
  // so that equal neighbours do not wait on each other's increment.
  uint16_t* bk = AtLeast(&s->head_bucket, n);
  for (size_t i = 0; i < n; ++i) {  // vectorized
    bk[i] =
        static_cast<uint16_t>(std::min(buckets - 1, static_cast<uint32_t>((hi - score[i]) * inv)));
  }
  uint32_t count[4][1024];
  for (auto& c : count) std::fill(c, c + buckets, 0u);
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++count[0][bk[i]];
    ++count[1][bk[i + 1]];
    ++count[2][bk[i + 2]];
    ++count[3][bk[i + 3]];
  }
  for (; i < n; ++i) ++count[0][bk[i]];
  size_t kept = 0;
  uint32_t last = 0;
  for (;; ++last) {
    kept += count[0][last] + count[1][last] + count[2][last] + count[3][last];
    if (kept >= k) break;
  }
  uint64_t* recs = AtLeast(&s->head_recs, 2 * n);
  uint32_t* keys = AtLeast(&s->head_rest, n);
  for (size_t j = 0; j < n; ++j) keys[j] = DescendingKey(score[j]);  // vectorized
  size_t nk = 0, nr = 0;
  for (size_t j = 0; j < n; ++j) {  // branch-free: both slots written, one counted
    const bool in_head = bk[j] <= last;
    const float v = score[j];
    recs[nk] = (static_cast<uint64_t>(keys[j]) << 32) | j;
    scored[nr] = {v, static_cast<uint32_t>(j)};  // the rest, behind the head below
    nk += in_head;
    nr += !in_head;
  }
  // The rest moves behind the head (from the back: it never overtakes).
  for (size_t t = nr; t-- > 0;) scored[nk + t] = scored[t];
  const uint64_t* head = RadixSortUpper32(recs, nk, recs + n);
  for (size_t t = 0; t < nk; ++t) {
    const uint32_t j = static_cast<uint32_t>(head[t]);
    scored[t] = {score[j], j};
  }
  // Equal scores are in index order already (a stable sort of records in
  // index order): the order of BetterOrder.
  return nk;
}

int DciTree::EntryLevel(int entry_nodes) const {
  for (int l = 1; l <= top_level(); ++l) {
    if (levels_[l].size() <= static_cast<uint32_t>(entry_nodes)) return l;
  }
  return top_level();
}

void DciTree::PrepareQueries(const float* queries, int nq, DciScratch* s) const {
  const int d = params_.dim, rank = subspace_.rank();
  s->qnorm2.resize(nq);
  s->qproj.resize(static_cast<size_t>(nq) * std::max(1, rank));
  s->qres.resize(nq);
  for (int j = 0; j < nq; ++j) {
    const float* q = queries + static_cast<size_t>(j) * d;
    s->qnorm2[j] = dci_internal::SquaredNorm(q, d);
    float* qp = &s->qproj[static_cast<size_t>(j) * rank];
    subspace_.Project(q, qp);
    float captured = 0.0f;
    for (int k = 0; k < rank; ++k) {
      qp[k] *= qp[k];
      captured += qp[k];
    }
    s->qres[j] = std::max(0.0f, s->qnorm2[j] - captured);
  }
}

void DciTree::ScoreCandidates(int level, bool entry, const float* queries, int nq, float scale,
                              float half_s2, bool normalized, DciScratch* s) const {
  const Level& L = levels_[level];
  const size_t nc = s->cand.size();
  const int rank = subspace_.rank();
  const bool spread = half_s2 > 0.0f && rank > 0;
  DotsOfCandidates(L.centroid16, params_.dim, queries, nq, params_.dim, s, &s->dots);
  if (spread) DotsOfCandidates(L.reps.lam, rank, s->qproj.data(), nq, rank, s, &s->vars);
  // Laid out query-major so the loops vectorize.
  float* node_logc = AtLeast(&s->node_logc, nc);
  float* node_res = AtLeast(&s->node_res, nc);
  uint32_t last_cnt = 0;
  float logc = 0.0f;
  for (size_t i = 0; i < nc; ++i) {
    const uint32_t node = s->cand[i];
    const uint32_t cnt = std::max<uint32_t>(1, L.reps.count[node]);
    if (cnt != last_cnt) {  // most nodes of a level hold the same count
      last_cnt = cnt;
      logc = std::log(static_cast<float>(cnt));
    }
    node_logc[i] = logc;
    node_res[i] = spread ? L.reps.res[node] : 0.0f;
  }
  const float* lc = node_logc;
  const float* rs = node_res;
  AtLeast(&s->est, nc * nq);
  for (int j = 0; j < nq; ++j) {
    // Gaussian mass: log(count) + s q.c + s^2 v / 2 for the logit variance v = q'Sq.
    const float* dj = &s->dots[static_cast<size_t>(j) * nc];
    float* ej = &s->est[static_cast<size_t>(j) * nc];
    if (spread) {
      const float* vj = &s->vars[static_cast<size_t>(j) * nc];
      const float qr = s->qres[j];
      for (size_t i = 0; i < nc; ++i) {
        float e = dj[i] * scale + lc[i];
        const float var = vj[i] + qr * rs[i];
        e += half_s2 * var;
        ej[i] = e;
      }
    } else {
      for (size_t i = 0; i < nc; ++i) ej[i] = dj[i] * scale + lc[i];
    }
  }
  if (entry && normalized) {  // the normalised ranking's denominators (its only reader)
    s->qlog_norm.resize(nq);
    for (int j = 0; j < nq; ++j) s->qlog_norm[j] = LogSumExp(&s->est[j * nc], nc);
  }
  float* best = AtLeast(&s->best, nc);
  if (normalized) {
    // Sum over the queries of the estimated share of each one's mass.
    std::fill(best, best + nc, 0.0f);
    for (int j = 0; j < nq; ++j) AddExp(&s->est[j * nc], s->qlog_norm[j], nc, best);
  } else {
    // The max from -inf (a NaN estimate leaves -inf), the first query's
    // pass writing the start instead of a fill before it.
    const float ninf = -std::numeric_limits<float>::infinity();
    if (nq == 0) std::fill(best, best + nc, ninf);
    for (int j = 0; j < nq; ++j) {
      const float* ej = &s->est[static_cast<size_t>(j) * nc];
      if (j == 0) {
        for (size_t i = 0; i < nc; ++i) best[i] = ninf < ej[i] ? ej[i] : ninf;
      } else {
        for (size_t i = 0; i < nc; ++i) best[i] = best[i] < ej[i] ? ej[i] : best[i];
      }
    }
  }
}

size_t DciTree::TakeBest(int level, const DciDescentParams& params, DciScratch* s,
                         std::vector<uint32_t>* nodes) const {
  const Level& L = levels_[level];
  const bool leaf = level == 1;
  const int64_t want_tokens =
      leaf ? params.min_tokens : static_cast<int64_t>(params.cover_factor * params.min_tokens);
  const size_t want_nodes = leaf ? 0 : static_cast<size_t>(params.field_of_view);
  const double mean_count = static_cast<double>(num_tokens()) / std::max<uint32_t>(1, L.size());
  size_t chunk = std::max<size_t>(
      {want_nodes, static_cast<size_t>(1.25 * want_tokens / std::max(1.0, mean_count)) + 8});
  const size_t nc = s->cand.size();
  size_t sorted = 0, taken = 0;
  int64_t tokens = 0;
  s->next.clear();
  while (taken < nc && (taken < want_nodes || tokens < want_tokens)) {
    if (taken == sorted) {
      const size_t end = std::min(nc, sorted + chunk);
      // The first chunk straight from the scores (it lays out s->scored).
      const size_t next_sorted = sorted == 0 ? dci_internal::RankHead(s->best.data(), nc, end, s)
                                             : dci_internal::SortHead(&s->scored, s, sorted, end);
      if (leaf) {  // their token counts are read next, scattered
        for (size_t i = sorted; i < next_sorted; ++i) {
          __builtin_prefetch(&pages_.node_tokens_ref(s->cand[s->scored[i].second]));
        }
      }
      sorted = next_sorted;
      chunk *= 2;
    }
    const uint32_t node = s->cand[s->scored[taken++].second];
    if (leaf) {
      nodes->push_back(node);
      tokens += pages_.node_tokens(node);
    } else {
      tokens += L.reps.count[node];
      s->next.push_back(node);
    }
  }
  return taken;
}

namespace {

// The next candidate (index into cand) of query j's ranking not yet taken,
// sorting its head in growing chunks; nc when the ranking is exhausted.
uint32_t NextOfQuery(int j, DciScratch* s) {
  auto& v = s->qscored[j];
  while (true) {
    if (s->qcursor[j] == v.size()) return static_cast<uint32_t>(v.size());
    if (s->qcursor[j] == s->qsorted[j]) {
      const size_t end = std::min(v.size(), s->qsorted[j] + s->qchunk[j]);
      s->qsorted[j] = dci_internal::SortHead(&v, s, s->qsorted[j], end);
      s->qchunk[j] *= 2;
    }
    const uint32_t idx = v[s->qcursor[j]++].second;
    if (!s->taken_flag[idx]) return idx;
  }
}

}  // namespace

size_t DciTree::TakeBestPerQuery(int level, const DciDescentParams& params, int nq, DciScratch* s,
                                 std::vector<uint32_t>* nodes) const {
  const Level& L = levels_[level];
  const bool leaf = level == 1;
  const int64_t want_tokens =
      leaf ? params.min_tokens : static_cast<int64_t>(params.cover_factor * params.min_tokens);
  const size_t want_nodes = leaf ? 0 : static_cast<size_t>(params.field_of_view);
  const size_t nc = s->cand.size();
  const double mean_count = static_cast<double>(num_tokens()) / std::max<uint32_t>(1, L.size());
  const size_t chunk = std::max<size_t>(
      {want_nodes / std::max(1, nq) + 1,
       static_cast<size_t>(1.25 * want_tokens / std::max(1.0, mean_count) / std::max(1, nq)) + 8});
  s->qscored.resize(nq);
  s->qsorted.assign(nq, 0);
  s->qcursor.assign(nq, 0);
  s->qchunk.assign(nq, chunk);
  for (int j = 0; j < nq; ++j) {
    const float* ej = &s->est[static_cast<size_t>(j) * nc];
    auto& v = s->qscored[j];
    v.resize(nc);
    for (size_t i = 0; i < nc; ++i) v[i] = {ej[i], static_cast<uint32_t>(i)};
  }
  // The candidate's index, not its node id: cand is ascending, so ties rank
  // the same, and the taken ones are found without a search (AccumulateRest).
  s->scored.resize(nc);
  for (size_t i = 0; i < nc; ++i) s->scored[i] = {s->best[i], static_cast<uint32_t>(i)};
  s->taken_flag.assign(nc, 0);
  s->next.clear();
  size_t taken = 0;
  int64_t tokens = 0;
  int exhausted = 0;
  while (taken < nc && (taken < want_nodes || tokens < want_tokens) && exhausted < nq) {
    exhausted = 0;
    for (int j = 0; j < nq && (taken < want_nodes || tokens < want_tokens); ++j) {
      const uint32_t idx = NextOfQuery(j, s);
      if (idx == nc) {
        ++exhausted;
        continue;
      }
      s->taken_flag[idx] = 1;
      const uint32_t node = s->cand[idx];
      ++taken;
      if (leaf) {
        nodes->push_back(node);
        tokens += pages_.node_tokens(node);
      } else {
        tokens += L.reps.count[node];
        s->next.push_back(node);
      }
    }
  }
  // AccumulateRest reads the taken nodes from the head of s->scored.
  std::stable_partition(
      s->scored.begin(), s->scored.end(),
      [s](const std::pair<float, uint32_t>& e) { return s->taken_flag[e.second] != 0; });
  return taken;
}

void DciTree::AccumulateRest(int nq, size_t taken, DciScratch* s) const {
  const size_t nc = s->cand.size();
  if (taken >= nc) return;
  s->taken_mask.assign(nc, 0.0f);
  for (size_t k = 0; k < taken; ++k) {  // scored holds candidate indices
    s->taken_mask[s->scored[k].second] = -std::numeric_limits<float>::infinity();
  }
  float* row = AtLeast(&s->row, nc);
  for (int j = 0; j < nq; ++j) {
    // The same estimate that ranked the nodes (ScoreCandidates).
    const float* ej = &s->est[static_cast<size_t>(j) * nc];
    for (size_t i = 0; i < nc; ++i) row[i] = ej[i] + s->taken_mask[i];
    const float add = LogSumExp(row, nc);
    const float m = std::max(s->rest[j], add);
    if (m == -std::numeric_limits<float>::infinity()) continue;
    s->rest[j] = m + std::log(std::exp(s->rest[j] - m) + std::exp(add - m));
  }
}

void DciTree::EstimateTaken(int nq, size_t taken, DciScratch* s) const {
  const size_t nc = s->cand.size();
  s->taken_est.assign(nq, -std::numeric_limits<float>::infinity());
  float* row = AtLeast(&s->row, taken);
  for (int j = 0; j < nq; ++j) {
    const float* ej = &s->est[static_cast<size_t>(j) * nc];
    for (size_t k = 0; k < taken; ++k) row[k] = ej[s->scored[k].second];
    s->taken_est[j] = LogSumExp(row, taken);
  }
}

void DciTree::ExpandChildren(int level, DciScratch* s) const {
  const Level& L = levels_[level];
  // Depth-first numbering gives a node's children consecutive ids, above the
  // children of every lower-numbered node: concatenating the kept nodes'
  // children in node id order is then sorted already. Bulk-built nodes hold
  // their children as one run (Level::child_runs, a flat array read in
  // order); only nodes whose children decode inserts scattered need their
  // children lists (separate heap blocks: fetch them all first). Those can
  // break the order; the whole list is sorted only then.
  // The kept nodes (s->next, in rank order) are the candidates at the head
  // of s->scored; flagged by candidate index, cand (ascending) gives them in
  // node id order without a comparison sort.
  const size_t nc = s->cand.size(), taken = s->next.size();
  uint8_t* flag = AtLeast(&s->taken_flag, nc);
  std::fill(flag, flag + nc, uint8_t{0});
  for (size_t t = 0; t < taken; ++t) flag[s->scored[t].second] = 1;
  uint32_t* kept = AtLeast(&s->kept, taken + 1);
  size_t nk = 0;
  for (size_t i = 0; i < nc; ++i) {  // branch-free: written always, counted when kept
    kept[nk] = s->cand[i];
    nk += flag[i];
  }
  size_t total = 0;
  for (size_t k = 0; k < nk; ++k) {
    const uint32_t node = kept[k];
    const uint32_t count = L.child_runs[node].count;
    if (count == 0) {
      const auto& ch = L.children[node];
      PrefetchBytes(ch.data(), ch.size() * sizeof(uint32_t));
      total += ch.size();
    }
    total += count;
  }
  s->next.resize(total);
  uint32_t* out = s->next.data();
  for (size_t k = 0; k < nk; ++k) {
    const uint32_t node = kept[k];
    const ChildRun run = L.child_runs[node];
    if (run.count > 0) {
      for (uint32_t i = 0; i < run.count; ++i) out[i] = run.first + i;
      out += run.count;
    } else {
      const auto& ch = L.children[node];
      out = std::copy(ch.begin(), ch.end(), out);
    }
  }
  if (!std::is_sorted(s->next.begin(), s->next.end())) std::sort(s->next.begin(), s->next.end());
  s->cand.swap(s->next);
}

void DciTree::CollectCandidates(const float* queries, int nq, float scale,
                                const DciDescentParams& params, DciScratch* s,
                                std::vector<uint32_t>* nodes, uint64_t* touched) const {
  nodes->clear();
  s->taken_est.assign(nq, -std::numeric_limits<float>::infinity());
  if (top_level() < 1) return;
  const int d = params_.dim, rank = subspace_.rank();
  const int entry = EntryLevel(params.entry_nodes);
  PrepareQueries(queries, nq, s);
  *touched += rank > 0 ? (static_cast<uint64_t>(rank) * nq + d - 1) / d : 0;
  s->cand.resize(levels_[entry].size());
  std::iota(s->cand.begin(), s->cand.end(), 0u);
  const float half_s2 = params.spread_weight * 0.5f * scale * scale;
  s->rest.assign(nq, -std::numeric_limits<float>::infinity());
  for (int l = entry; l >= 1; --l) {
    ScoreCandidates(l, l == entry, queries, nq, scale, half_s2, params.normalized, s);
    *touched += s->cand.size();
    const size_t taken = params.query_quotas && nq > 1 ? TakeBestPerQuery(l, params, nq, s, nodes)
                                                       : TakeBest(l, params, s, nodes);
    AccumulateRest(nq, taken, s);
    if (l == 1) {
      EstimateTaken(nq, taken, s);
      return;
    }
    ExpandChildren(l, s);
  }
}

}  // namespace icecache
