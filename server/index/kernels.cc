// SIMD dot-product kernels. The AVX2 path (8 lanes) is the baseline the whole
// build targets (x86-64-v3); the AVX-512 path (16 lanes, masked tails) is
// compiled with per-function target attributes and chosen once at run time
// with __builtin_cpu_supports, so the binary still runs on AVX2-only CPUs.
#include "server/index/kernels.h"

#include "server/index/simd_avx2.h"

// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_*
// placeholders (GCC bug 105593); the warning is about the header, not us.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

// Unroll hints: the accumulator arrays stay in registers only when these
// loops are unrolled. The sanitizer trees (ICECACHE_SANITIZER_BUILD) leave
// them out: instrumented and unrolled 16-fold this file alone took 47 CPU
// seconds to compile under ASan+UBSan, 16 without (the same code and checks;
// docs/operations.md, "The budget, measured").
#if defined(ICECACHE_SANITIZER_BUILD)
#define ICECACHE_UNROLL16
#else
#define ICECACHE_UNROLL16 _Pragma("GCC unroll 16")
#endif

namespace icecache {
namespace {

// ---------------------------------------------------------------------------
// Scalar helpers for tails (no dependency on common/dtype.cc so the kernels
// stay self-contained and inlinable).
inline float HalfScalar(uint16_t h) { return _cvtsh_ss(h); }
inline float Bf16Scalar(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Element loaders: 8 consecutive elements of a row as fp32 lanes.
struct F32Avx2 {
  using T = float;
  static __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
  static float Scalar(const float* p) { return *p; }
};
struct F16Avx2 {
  using T = uint16_t;
  static __m256 Load8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static float Scalar(const uint16_t* p) { return HalfScalar(*p); }
};
struct Bf16Avx2 {
  using T = uint16_t;
  static __m256 Load8(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static float Scalar(const uint16_t* p) { return Bf16Scalar(*p); }
};

// int8 codes (the selector's scoring sketch, page_sketch.h) as fp32 lanes:
// each code converts exactly, so a row of codes gives the same lanes as the
// same values stored as fp32.
struct I8Avx2 {
  using T = int8_t;
  static __m256 Load8(const int8_t* p) {
    int64_t v;
    std::memcpy(&v, p, sizeof(v));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(v)));
  }
  static float Scalar(const int8_t* p) { return static_cast<float>(*p); }
};

// Eight horizontal sums at once, each bit for bit HSum256 of its vector
// (((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))): the same additions,
// done on the eight vectors side by side. Lane f of the result is v[f]'s sum.
inline __m256 HSum8x256(const __m256* v) {
  const auto halves = [](__m256 a, __m256 b) {  // [a.lo + a.hi | b.lo + b.hi]
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  };
  const __m256 u04 = halves(v[0], v[4]), u15 = halves(v[1], v[5]);
  const __m256 u26 = halves(v[2], v[6]), u37 = halves(v[3], v[7]);
  const __m256 p = _mm256_add_ps(_mm256_shuffle_ps(u04, u15, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(u04, u15, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 q = _mm256_add_ps(_mm256_shuffle_ps(u26, u37, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(u26, u37, _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm256_add_ps(_mm256_shuffle_ps(p, q, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm256_shuffle_ps(p, q, _MM_SHUFFLE(3, 1, 3, 1)));
}

// One query against one row: 4 independent accumulators of 8 lanes hide the
// FMA latency; then 8-wide steps; then a scalar tail.
template <typename L>
inline float DotAvx2(const float* q, const typename L::T* k, int dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 32 <= dim; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), L::Load8(k + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), L::Load8(k + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 16), L::Load8(k + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 24), L::Load8(k + i + 24), a3);
  }
  for (; i + 8 <= dim; i += 8) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), L::Load8(k + i), a0);
  }
  float s = simd::HSum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < dim; ++i) s += q[i] * L::Scalar(k + i);
  return s;
}

// NQ queries against R consecutive rows. Per 8-lane chunk each query chunk
// is loaded once and reused for the R rows, and each row chunk is loaded
// (and converted) once and reused for the NQ queries: NQ + R loads feed
// NQ x R FMAs, so the kernel is bound by FMAs rather than loads. R x NQ
// accumulators stay in registers (R chosen per NQ in RowsPerBlockAvx2).
// The R x NQ accumulators of DotBlockAvx2 (not yet summed) and the scalar
// dim tail's sums.
template <typename L, int NQ, int R>
inline void DotBlockAccAvx2(const float* queries, int dim, const typename L::T* k,
                            __m256 (&acc)[R][NQ], float (&tail)[R][NQ]) {
  ICECACHE_UNROLL16
  for (int r = 0; r < R; ++r) {
    ICECACHE_UNROLL16
    for (int j = 0; j < NQ; ++j) acc[r][j] = _mm256_setzero_ps();
  }
  int i = 0;
  for (; i + 8 <= dim; i += 8) {
    __m256 qv[NQ];
    ICECACHE_UNROLL16
    for (int j = 0; j < NQ; ++j) qv[j] = _mm256_loadu_ps(queries + j * dim + i);
    ICECACHE_UNROLL16
    for (int r = 0; r < R; ++r) {
      const __m256 kv = L::Load8(k + r * dim + i);
      ICECACHE_UNROLL16
      for (int j = 0; j < NQ; ++j) acc[r][j] = _mm256_fmadd_ps(qv[j], kv, acc[r][j]);
    }
  }
  ICECACHE_UNROLL16
  for (int r = 0; r < R; ++r) {
    ICECACHE_UNROLL16
    for (int j = 0; j < NQ; ++j) tail[r][j] = 0.0f;
  }
  for (; i < dim; ++i) {
    ICECACHE_UNROLL16
    for (int r = 0; r < R; ++r) {
      const float kv = L::Scalar(k + r * dim + i);
      ICECACHE_UNROLL16
      for (int j = 0; j < NQ; ++j) tail[r][j] += queries[j * dim + i] * kv;
    }
  }
}

template <typename L, int NQ, int R>
inline void DotBlockAvx2(const float* queries, int dim, const typename L::T* k, float* out,
                         int64_t out_stride) {
  __m256 acc[R][NQ];
  float tail[R][NQ];
  DotBlockAccAvx2<L, NQ, R>(queries, dim, k, acc, tail);
  if constexpr (R * NQ == 8) {
    // Eight accumulators: their sums in one transposed reduction.
    alignas(32) float sums[8];
    _mm256_store_ps(sums, HSum8x256(&acc[0][0]));
    ICECACHE_UNROLL16
    for (int r = 0; r < R; ++r) {
      ICECACHE_UNROLL16
      for (int j = 0; j < NQ; ++j) out[j * out_stride + r] = sums[r * NQ + j] + tail[r][j];
    }
  } else {
    ICECACHE_UNROLL16
    for (int r = 0; r < R; ++r) {
      ICECACHE_UNROLL16
      for (int j = 0; j < NQ; ++j) out[j * out_stride + r] = simd::HSum256(acc[r][j]) + tail[r][j];
    }
  }
}

// PageQueryLogMass (page_select.cc) of one query's 16 logits, rows 0-7 in
// `lo` and 8-15 in `hi`, bit for bit: the same 8-lane steps in the same
// order, and its running best from -inf (a NaN score gives -inf).
inline float LogMass16(__m256 lo, __m256 hi, float scale, float* max) {
  const __m256 vscale = _mm256_set1_ps(scale);
  __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  vm = _mm256_max_ps(vm, _mm256_mul_ps(lo, vscale));
  vm = _mm256_max_ps(vm, _mm256_mul_ps(hi, vscale));
  const float m = simd::HMax256(vm);
  *max = m;
  const __m256 vmax = _mm256_set1_ps(m);
  __m256 poly, pow2;
  __m256 vs = _mm256_setzero_ps();
  simd::Exp256Factors(_mm256_fmsub_ps(lo, vscale, vmax), &poly, &pow2);
  vs = _mm256_fmadd_ps(poly, pow2, vs);
  simd::Exp256Factors(_mm256_fmsub_ps(hi, vscale, vmax), &poly, &pow2);
  vs = _mm256_fmadd_ps(poly, pow2, vs);
  const float score = m + std::log(simd::HSum256(vs));
  return score > -std::numeric_limits<float>::infinity() ? score
                                                         : -std::numeric_limits<float>::infinity();
}

// Rows 8h..8h+7 of a 16-row page for 4 queries on AVX2: four
// DotBlockAvx2<L, 4, 2> blocks' sums (lane r * 4 + j: row r of the block,
// query j, plus the dim tail as DotBlockAvx2 adds it), transposed to one
// vector of the 8 rows' logits per query, rows in order.
template <typename L>
inline void EightRowsAvx2(const float* queries, int dim, const typename L::T* k, __m256 (&q)[4]) {
  __m256 s[4];
  for (int b = 0; b < 4; ++b) {
    __m256 acc[2][4];
    alignas(32) float tail[2][4];
    DotBlockAccAvx2<L, 4, 2>(queries, dim, k + static_cast<int64_t>(2 * b) * dim, acc, tail);
    s[b] = _mm256_add_ps(HSum8x256(&acc[0][0]), _mm256_load_ps(&tail[0][0]));
  }
  // s[b]: [row 2b: q0..q3 | row 2b+1: q0..q3]. Per 128-bit half, unpack and
  // shuffle give query j's rows in the order 0, 2, 4, 6 | 1, 3, 5, 7.
  const __m256 t0 = _mm256_unpacklo_ps(s[0], s[1]), t1 = _mm256_unpackhi_ps(s[0], s[1]);
  const __m256 t2 = _mm256_unpacklo_ps(s[2], s[3]), t3 = _mm256_unpackhi_ps(s[2], s[3]);
  const __m256i rows_in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  q[0] =
      _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), rows_in_order);
  q[1] =
      _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)), rows_in_order);
  q[2] =
      _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), rows_in_order);
  q[3] =
      _mm256_permutevar8x32_ps(_mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)), rows_in_order);
}

// A 16-row page against 4 queries on AVX2: bit for bit DotRowsMultiAvx2<L>
// into a 4 x 16 buffer followed by PageQueryLogMass, the logits kept in
// registers; dims that are a multiple of 8 only (false otherwise).
template <typename L>
bool PageLogMass16x4Avx2(const void* rows, int dim, const float* queries, float scale, float* lse,
                         float* max, float* logits) {
  // A dim tail is summed by a scalar loop that the compiler may contract
  // or vectorise differently here than in DotRowsMulti: not fused.
  if (dim % 8 != 0) return false;
  const auto* k = static_cast<const typename L::T*>(rows);
  __m256 lo[4], hi[4];
  EightRowsAvx2<L>(queries, dim, k, lo);
  EightRowsAvx2<L>(queries, dim, k + static_cast<int64_t>(8) * dim, hi);
  for (int j = 0; j < 4; ++j) lse[j] = LogMass16(lo[j], hi[j], scale, &max[j]);
  if (logits != nullptr) {
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_ps(logits + 16 * j, lo[j]);
      _mm256_storeu_ps(logits + 16 * j + 8, hi[j]);
    }
  }
  return true;
}

// Rows per block for AVX2 (16 ymm registers): R x NQ accumulators, NQ query
// chunks and one row chunk must fit.
constexpr int RowsPerBlockAvx2(int nq) { return nq == 1 ? 8 : nq == 2 ? 4 : nq <= 4 ? 2 : 1; }

template <typename L, int NQ>
void DotRowsMultiAvx2Fixed(const typename L::T* k, int64_t n, int dim, const float* queries,
                           float* out, int64_t out_stride) {
  constexpr int R = RowsPerBlockAvx2(NQ);
  int64_t r = 0;
  for (; r + R <= n; r += R) {
    DotBlockAvx2<L, NQ, R>(queries, dim, k + r * dim, out + r, out_stride);
  }
  for (; r < n; ++r) DotBlockAvx2<L, NQ, 1>(queries, dim, k + r * dim, out + r, out_stride);
}

// Queries are taken in blocks of at most 8 (8 x 8-lane accumulators fill half
// the register file); each block reads every row once.
template <typename L>
void DotRowsMultiAvx2(const void* rows, int64_t n, int dim, const float* queries, int nq,
                      float* out) {
  const auto* k = static_cast<const typename L::T*>(rows);
  for (int j0 = 0; j0 < nq; j0 += 8) {
    const int b = nq - j0 < 8 ? nq - j0 : 8;
    const float* qb = queries + static_cast<int64_t>(j0) * dim;
    float* ob = out + static_cast<int64_t>(j0) * n;
    switch (b) {
      case 1:
        DotRowsMultiAvx2Fixed<L, 1>(k, n, dim, qb, ob, n);
        break;
      case 2:
        DotRowsMultiAvx2Fixed<L, 2>(k, n, dim, qb, ob, n);
        break;
      case 3:
        DotRowsMultiAvx2Fixed<L, 3>(k, n, dim, qb, ob, n);
        break;
      case 4:
        DotRowsMultiAvx2Fixed<L, 4>(k, n, dim, qb, ob, n);
        break;
      case 5:
        DotRowsMultiAvx2Fixed<L, 5>(k, n, dim, qb, ob, n);
        break;
      case 6:
        DotRowsMultiAvx2Fixed<L, 6>(k, n, dim, qb, ob, n);
        break;
      case 7:
        DotRowsMultiAvx2Fixed<L, 7>(k, n, dim, qb, ob, n);
        break;
      default:
        DotRowsMultiAvx2Fixed<L, 8>(k, n, dim, qb, ob, n);
        break;
    }
  }
}

// Row i of DotF32Rows and DotF16Rows: rows + (ids ? ids[i] : i) * dim.
template <typename T>
inline const T* RowOf(const T* rows, const uint32_t* ids, int64_t i, int dim) {
  return rows + static_cast<size_t>(ids != nullptr ? ids[i] : static_cast<uint64_t>(i)) * dim;
}

// Asks for a row's cache lines (a node's centroid is read cold on a decode
// insert: 32 trees per step do not stay in cache).
template <typename T>
inline void PrefetchRow(const T* row, int dim) {
  const char* p = reinterpret_cast<const char*>(row);
  const size_t bytes = static_cast<size_t>(dim) * sizeof(T);
  for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
  __builtin_prefetch(p + bytes - 1);
}

// Rows fetched ahead of the pair being computed.
constexpr int64_t kRowsAhead = 4;

// DotAvx2<F32Avx2> of two rows at once, bit for bit: the same four
// accumulators per row over the same chunks, the same reduction and scalar
// tail; the query chunks are loaded once for both rows, and the two rows'
// FMA chains interleave.
void DotF32RowsAvx2(const float* q, const float* rows, const uint32_t* ids, int64_t n, int dim,
                    float* out) {
  for (int64_t i = 0; i < std::min(n, kRowsAhead); ++i) PrefetchRow(RowOf(rows, ids, i, dim), dim);
  int64_t r = 0;
  for (; r + 2 <= n; r += 2) {
    for (int64_t a = r + kRowsAhead; a < std::min(n, r + kRowsAhead + 2); ++a) {
      PrefetchRow(RowOf(rows, ids, a, dim), dim);
    }
    const float* k0 = RowOf(rows, ids, r, dim);
    const float* k1 = RowOf(rows, ids, r + 1, dim);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    __m256 b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= dim; i += 32) {
      const __m256 q0 = _mm256_loadu_ps(q + i), q1 = _mm256_loadu_ps(q + i + 8);
      const __m256 q2 = _mm256_loadu_ps(q + i + 16), q3 = _mm256_loadu_ps(q + i + 24);
      a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k0 + i), a0);
      b0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k1 + i), b0);
      a1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k0 + i + 8), a1);
      b1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k1 + i + 8), b1);
      a2 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(k0 + i + 16), a2);
      b2 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(k1 + i + 16), b2);
      a3 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(k0 + i + 24), a3);
      b3 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(k1 + i + 24), b3);
    }
    for (; i + 8 <= dim; i += 8) {
      const __m256 q0 = _mm256_loadu_ps(q + i);
      a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k0 + i), a0);
      b0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k1 + i), b0);
    }
    float s0 = simd::HSum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    float s1 = simd::HSum256(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
    for (int t = i; t < dim; ++t) s0 += q[t] * k0[t];
    for (int t = i; t < dim; ++t) s1 += q[t] * k1[t];
    out[r] = s0;
    out[r + 1] = s1;
  }
  if (r < n) out[r] = DotAvx2<F32Avx2>(q, RowOf(rows, ids, r, dim), dim);
}

// ProjectF32 on AVX2: DotF32RowsAvx2 per x (its pairs of rows are already
// DotAvx2's arithmetic with x's chunks loaded once per pair).
void ProjectF32Avx2(const float* xs, int64_t nx, const float* rows, int nrows, int dim,
                    float* out) {
  for (int64_t x = 0; x < nx; ++x) {
    DotF32RowsAvx2(xs + static_cast<size_t>(x) * dim, rows, nullptr, nrows, dim,
                   out + static_cast<size_t>(x) * nrows);
  }
}

// ---------------------------------------------------------------------------
// AVX-512 path. Every function here carries the target attribute; nothing
// from it is called unless the CPU reports avx512f and avx512bw.
#define ICECACHE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

struct F32Avx512 {
  using T = float;
  ICECACHE_AVX512 static __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
  ICECACHE_AVX512 static __m512 LoadMasked(const float* p, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, p);
  }
};
struct F16Avx512 {
  using T = uint16_t;
  ICECACHE_AVX512 static __m512 Load16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  ICECACHE_AVX512 static __m512 LoadMasked(const uint16_t* p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
};
struct Bf16Avx512 {
  using T = uint16_t;
  ICECACHE_AVX512 static __m512 Load16(const uint16_t* p) {
    const __m512i w =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  ICECACHE_AVX512 static __m512 LoadMasked(const uint16_t* p, __mmask16 m) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
};

struct I8Avx512 {
  using T = int8_t;
  ICECACHE_AVX512 static __m512 Load16(const int8_t* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  ICECACHE_AVX512 static __m512 LoadMasked(const int8_t* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
  }
};

ICECACHE_AVX512 inline __mmask16 TailMask(int remaining) {
  return static_cast<__mmask16>((1u << remaining) - 1u);
}

template <typename L>
ICECACHE_AVX512 inline float DotAvx512(const float* q, const typename L::T* k, int dim) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 64 <= dim; i += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), L::Load16(k + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), L::Load16(k + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 32), L::Load16(k + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 48), L::Load16(k + i + 48), a3);
  }
  for (; i + 16 <= dim; i += 16) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), L::Load16(k + i), a0);
  }
  if (i < dim) {
    const __mmask16 m = TailMask(dim - i);
    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i), L::LoadMasked(k + i, m), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// Element i = _mm512_reduce_add_ps(v[i]) for 16 vectors, bit for bit: the
// same additions in the same association as GCC's reduction (T3 = upper 8
// + lower 8, T6 = upper 4 + lower 4 of T3, T8 = T6[0..1] + T6[2..3], then
// T8[0] + T8[1]), done for all sixteen at once on transposed halves: 31
// shuffles and 15 vector adds instead of 16 x (3 shuffles + 4 adds), the
// adds no longer competing with the block's FMAs one lane at a time.
ICECACHE_AVX512 inline __m512 HSum16x512(const __m512* v) {
  __m512 u[8], w[4], z[2];
  ICECACHE_UNROLL16
  for (int p = 0; p < 8; ++p) {  // [T3 of v[2p] | T3 of v[2p+1]]
    const __m512 a = v[2 * p], b = v[2 * p + 1];
    u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)));
  }
  ICECACHE_UNROLL16
  for (int q = 0; q < 4; ++q) {  // 128-bit lane l: T6 of v[4q + l]
    const __m512 a = u[2 * q], b = u[2 * q + 1];
    w[q] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
  }
  ICECACHE_UNROLL16
  for (int t = 0; t < 2; ++t) {  // lane l: T8 of v[8t + l], then of v[8t + 4 + l]
    const __m512 a = w[2 * t], b = w[2 * t + 1];
    z[t] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // Lane l: the sums of v[l], v[4 + l], v[8 + l], v[12 + l].
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

// As DotBlockAvx2 with 16 lanes and 32 registers; the dim tail is one
// masked step instead of a scalar loop.
// The R x NQ accumulators of DotBlockAvx512 (their 16 lanes not yet summed).
template <typename L, int NQ, int R>
ICECACHE_AVX512 inline void DotBlockAccAvx512(const float* queries, int dim, const typename L::T* k,
                                              __m512 (&acc)[R][NQ]) {
  ICECACHE_UNROLL16
  for (int r = 0; r < R; ++r) {
    ICECACHE_UNROLL16
    for (int j = 0; j < NQ; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  int i = 0;
  for (; i + 16 <= dim; i += 16) {
    __m512 qv[NQ];
    ICECACHE_UNROLL16
    for (int j = 0; j < NQ; ++j) qv[j] = _mm512_loadu_ps(queries + j * dim + i);
    ICECACHE_UNROLL16
    for (int r = 0; r < R; ++r) {
      const __m512 kv = L::Load16(k + r * dim + i);
      ICECACHE_UNROLL16
      for (int j = 0; j < NQ; ++j) acc[r][j] = _mm512_fmadd_ps(qv[j], kv, acc[r][j]);
    }
  }
  if (i < dim) {
    const __mmask16 m = TailMask(dim - i);
    __m512 qv[NQ];
    ICECACHE_UNROLL16
    for (int j = 0; j < NQ; ++j) qv[j] = _mm512_maskz_loadu_ps(m, queries + j * dim + i);
    ICECACHE_UNROLL16
    for (int r = 0; r < R; ++r) {
      const __m512 kv = L::LoadMasked(k + r * dim + i, m);
      ICECACHE_UNROLL16
      for (int j = 0; j < NQ; ++j) acc[r][j] = _mm512_fmadd_ps(qv[j], kv, acc[r][j]);
    }
  }
}

template <typename L, int NQ, int R>
ICECACHE_AVX512 inline void DotBlockAvx512(const float* queries, int dim, const typename L::T* k,
                                           float* out, int64_t out_stride) {
  __m512 acc[R][NQ];
  DotBlockAccAvx512<L, NQ, R>(queries, dim, k, acc);
  if constexpr (R * NQ == 16) {
    // Sixteen sums reduced at once, each bit for bit _mm512_reduce_add_ps.
    alignas(64) float sums[16];
    _mm512_store_ps(sums, HSum16x512(&acc[0][0]));
    ICECACHE_UNROLL16
    for (int r = 0; r < R; ++r) {
      ICECACHE_UNROLL16
      for (int j = 0; j < NQ; ++j) out[j * out_stride + r] = sums[r * NQ + j];
    }
  } else {
    ICECACHE_UNROLL16
    for (int r = 0; r < R; ++r) {
      ICECACHE_UNROLL16
      for (int j = 0; j < NQ; ++j) out[j * out_stride + r] = _mm512_reduce_add_ps(acc[r][j]);
    }
  }
}

constexpr int RowsPerBlockAvx512(int nq) {
  return nq == 1 ? 8 : nq == 2 ? 8 : nq <= 4 ? 4 : nq <= 6 ? 3 : 2;
}

template <typename L, int NQ>
ICECACHE_AVX512 void DotRowsMultiAvx512Fixed(const typename L::T* k, int64_t n, int dim,
                                             const float* queries, float* out, int64_t out_stride) {
  constexpr int R = RowsPerBlockAvx512(NQ);
  int64_t r = 0;
  for (; r + R <= n; r += R) {
    DotBlockAvx512<L, NQ, R>(queries, dim, k + r * dim, out + r, out_stride);
  }
  for (; r < n; ++r) DotBlockAvx512<L, NQ, 1>(queries, dim, k + r * dim, out + r, out_stride);
}

template <typename L>
ICECACHE_AVX512 void DotRowsMultiAvx512(const void* rows, int64_t n, int dim, const float* queries,
                                        int nq, float* out) {
  const auto* k = static_cast<const typename L::T*>(rows);
  for (int j0 = 0; j0 < nq; j0 += 8) {
    const int b = nq - j0 < 8 ? nq - j0 : 8;
    const float* qb = queries + static_cast<int64_t>(j0) * dim;
    float* ob = out + static_cast<int64_t>(j0) * n;
    switch (b) {
      case 1:
        DotRowsMultiAvx512Fixed<L, 1>(k, n, dim, qb, ob, n);
        break;
      case 2:
        DotRowsMultiAvx512Fixed<L, 2>(k, n, dim, qb, ob, n);
        break;
      case 3:
        DotRowsMultiAvx512Fixed<L, 3>(k, n, dim, qb, ob, n);
        break;
      case 4:
        DotRowsMultiAvx512Fixed<L, 4>(k, n, dim, qb, ob, n);
        break;
      case 5:
        DotRowsMultiAvx512Fixed<L, 5>(k, n, dim, qb, ob, n);
        break;
      case 6:
        DotRowsMultiAvx512Fixed<L, 6>(k, n, dim, qb, ob, n);
        break;
      case 7:
        DotRowsMultiAvx512Fixed<L, 7>(k, n, dim, qb, ob, n);
        break;
      default:
        DotRowsMultiAvx512Fixed<L, 8>(k, n, dim, qb, ob, n);
        break;
    }
  }
}

// Exp256Factors of page_select.cc on 16 lanes: the same operations lane by
// lane (range reduction, polynomial, exponent bits).
ICECACHE_AVX512 inline void Exp512Factors(__m512 x, __m512* poly, __m512* pow2) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
  const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  *poly = p;
  *pow2 = _mm512_castsi512_ps(e);
}

// PageQueryLogMass (page_select.cc) of one query's 16 logits in `x`, bit
// for bit: its two 8-lane steps for the max and for the sum of the
// exponentials, on the two halves of one 16-lane vector; its running best
// from -inf (a NaN score gives -inf).
ICECACHE_AVX512 inline float LogMass16Avx512(__m512 x, __m512 vscale, float* max) {
  const __m512 xs = _mm512_mul_ps(x, vscale);
  const __m256 lo = _mm256_max_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                                  _mm512_castps512_ps256(xs));
  const float m = simd::HMax256(_mm256_max_ps(lo, _mm512_extractf32x8_ps(xs, 1)));
  *max = m;
  __m512 poly, pow2;
  Exp512Factors(_mm512_fmsub_ps(x, vscale, _mm512_set1_ps(m)), &poly, &pow2);
  // PageQueryLogMass's sum: rows 0-7, then rows 8-15, each in one FMA.
  __m256 vs = _mm256_fmadd_ps(_mm512_castps512_ps256(poly), _mm512_castps512_ps256(pow2),
                              _mm256_setzero_ps());
  vs = _mm256_fmadd_ps(_mm512_extractf32x8_ps(poly, 1), _mm512_extractf32x8_ps(pow2, 1), vs);
  const float score = m + std::log(simd::HSum256(vs));
  // PageMassScore's running best, from -inf: a NaN score gives -inf.
  return score > -std::numeric_limits<float>::infinity() ? score
                                                         : -std::numeric_limits<float>::infinity();
}

// A 16-row page against 4 queries: the four DotBlockAvx512<L, 4, 4> blocks'
// sums, kept in registers and transposed to one vector of 16 logits per
// query, then LogMass16 per query. Bit for bit DotRowsMultiAvx512<L> into a
// 4 x 16 buffer followed by PageQueryLogMass.
template <typename L>
ICECACHE_AVX512 bool PageLogMass16x4Avx512(const void* rows, int dim, const float* queries,
                                           float scale, float* lse, float* max, float* logits) {
  const auto* k = static_cast<const typename L::T*>(rows);
  // HSum16x512's lane r * 4 + j (row r, query j) to lane j * 4 + r.
  const __m512i query_major =
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512 p[4];  // p[b]'s 128-bit lane j: query j's logits of rows 4b..4b+3
  ICECACHE_UNROLL16
  for (int b = 0; b < 4; ++b) {
    __m512 acc[4][4];
    DotBlockAccAvx512<L, 4, 4>(queries, dim, k + static_cast<int64_t>(4 * b) * dim, acc);
    p[b] = _mm512_permutexvar_ps(query_major, HSum16x512(&acc[0][0]));
  }
  const __m512 t0 = _mm512_shuffle_f32x4(p[0], p[1], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 t1 = _mm512_shuffle_f32x4(p[0], p[1], _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 t2 = _mm512_shuffle_f32x4(p[2], p[3], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 t3 = _mm512_shuffle_f32x4(p[2], p[3], _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 x[4] = {_mm512_shuffle_f32x4(t0, t2, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(t0, t2, _MM_SHUFFLE(3, 1, 3, 1)),
                       _mm512_shuffle_f32x4(t1, t3, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(t1, t3, _MM_SHUFFLE(3, 1, 3, 1))};
  ICECACHE_UNROLL16
  for (int j = 0; j < 4; ++j) {
    lse[j] = LogMass16Avx512(x[j], vscale, &max[j]);
    if (logits != nullptr) _mm512_storeu_ps(logits + 16 * j, x[j]);
  }
  return true;
}

ICECACHE_AVX512 float DotF32Avx512(const float* a, const float* b, int dim) {
  return DotAvx512<F32Avx512>(a, b, dim);
}
// DotF32Rows and DotF16Rows on AVX-512: one DotAvx512<L> per row (the
// single dot's bits by construction), the rows fetched ahead.
template <typename L>
ICECACHE_AVX512 void DotRowsAheadAvx512(const float* q, const typename L::T* rows,
                                        const uint32_t* ids, int64_t n, int dim, float* out) {
  for (int64_t i = 0; i < std::min(n, kRowsAhead); ++i) PrefetchRow(RowOf(rows, ids, i, dim), dim);
  for (int64_t r = 0; r < n; ++r) {
    if (r + kRowsAhead < n) PrefetchRow(RowOf(rows, ids, r + kRowsAhead, dim), dim);
    out[r] = DotAvx512<L>(q, RowOf(rows, ids, r, dim), dim);
  }
}
// ProjectF32 on AVX-512: DotAvx512<F32Avx512> of each x against R rows at
// once, bit for bit: per (x, row) the same four accumulators over the same
// chunks, the same tail and reduction; x's chunks are loaded once for the R
// rows, and there is no prefetch (the rows are a small basis kept in L1).
template <int R>
ICECACHE_AVX512 inline void ProjectBlockAvx512(const float* q, const float* rows, int dim,
                                               float* out) {
  __m512 a[R][4];
  ICECACHE_UNROLL16
  for (int r = 0; r < R; ++r) {
    ICECACHE_UNROLL16
    for (int c = 0; c < 4; ++c) a[r][c] = _mm512_setzero_ps();
  }
  int i = 0;
  for (; i + 64 <= dim; i += 64) {
    const __m512 q0 = _mm512_loadu_ps(q + i), q1 = _mm512_loadu_ps(q + i + 16);
    const __m512 q2 = _mm512_loadu_ps(q + i + 32), q3 = _mm512_loadu_ps(q + i + 48);
    ICECACHE_UNROLL16
    for (int r = 0; r < R; ++r) {
      const float* k = rows + static_cast<size_t>(r) * dim + i;
      a[r][0] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(k), a[r][0]);
      a[r][1] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(k + 16), a[r][1]);
      a[r][2] = _mm512_fmadd_ps(q2, _mm512_loadu_ps(k + 32), a[r][2]);
      a[r][3] = _mm512_fmadd_ps(q3, _mm512_loadu_ps(k + 48), a[r][3]);
    }
  }
  for (; i + 16 <= dim; i += 16) {
    const __m512 q0 = _mm512_loadu_ps(q + i);
    ICECACHE_UNROLL16
    for (int r = 0; r < R; ++r) {
      a[r][0] =
          _mm512_fmadd_ps(q0, _mm512_loadu_ps(rows + static_cast<size_t>(r) * dim + i), a[r][0]);
    }
  }
  if (i < dim) {
    const __mmask16 m = TailMask(dim - i);
    const __m512 q0 = _mm512_maskz_loadu_ps(m, q + i);
    ICECACHE_UNROLL16
    for (int r = 0; r < R; ++r) {
      a[r][1] = _mm512_fmadd_ps(
          q0, _mm512_maskz_loadu_ps(m, rows + static_cast<size_t>(r) * dim + i), a[r][1]);
    }
  }
  ICECACHE_UNROLL16
  for (int r = 0; r < R; ++r) {
    out[r] = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3])));
  }
}

ICECACHE_AVX512 void ProjectF32Avx512(const float* xs, int64_t nx, const float* rows, int nrows,
                                      int dim, float* out) {
  for (int64_t x = 0; x < nx; ++x) {
    const float* q = xs + static_cast<size_t>(x) * dim;
    float* o = out + static_cast<size_t>(x) * nrows;
    int r = 0;
    for (; r + 4 <= nrows; r += 4) {
      ProjectBlockAvx512<4>(q, rows + static_cast<size_t>(r) * dim, dim, o + r);
    }
    for (; r < nrows; ++r)
      ProjectBlockAvx512<1>(q, rows + static_cast<size_t>(r) * dim, dim, o + r);
  }
}

ICECACHE_AVX512 float DotF16Avx512(const float* q, const uint16_t* k, int dim) {
  return DotAvx512<F16Avx512>(q, k, dim);
}
ICECACHE_AVX512 float DotBf16Avx512(const float* q, const uint16_t* k, int dim) {
  return DotAvx512<Bf16Avx512>(q, k, dim);
}

float DotF32Avx2(const float* a, const float* b, int dim) { return DotAvx2<F32Avx2>(a, b, dim); }
float DotF16Avx2(const float* q, const uint16_t* k, int dim) { return DotAvx2<F16Avx2>(q, k, dim); }
// DotF16Rows on AVX2: one DotAvx2<F16Avx2> per row, the rows fetched ahead.
void DotF16RowsAvx2(const float* q, const uint16_t* rows, const uint32_t* ids, int64_t n, int dim,
                    float* out) {
  for (int64_t i = 0; i < std::min(n, kRowsAhead); ++i) PrefetchRow(RowOf(rows, ids, i, dim), dim);
  for (int64_t r = 0; r < n; ++r) {
    if (r + kRowsAhead < n) PrefetchRow(RowOf(rows, ids, r + kRowsAhead, dim), dim);
    out[r] = DotAvx2<F16Avx2>(q, RowOf(rows, ids, r, dim), dim);
  }
}
float DotBf16Avx2(const float* q, const uint16_t* k, int dim) {
  return DotAvx2<Bf16Avx2>(q, k, dim);
}

// ---------------------------------------------------------------------------
// Dispatch table, chosen once (or forced by tests/benchmarks).
using DotF32Fn = float (*)(const float*, const float*, int);
using DotU16Fn = float (*)(const float*, const uint16_t*, int);
using MultiFn = void (*)(const void*, int64_t, int, const float*, int, float*);
using RowsF32Fn = void (*)(const float*, const float*, const uint32_t*, int64_t, int, float*);
using RowsF16Fn = void (*)(const float*, const uint16_t*, const uint32_t*, int64_t, int, float*);
using ProjectFn = void (*)(const float*, int64_t, const float*, int, int, float*);
using PageMassFn = bool (*)(const void*, int, const float*, float, float*, float*, float*);

struct KernelTable {
  const char* name;
  DotF32Fn dot_f32;
  DotU16Fn dot_f16;
  DotU16Fn dot_bf16;
  MultiFn multi[3];  // indexed by DTypeIndex; DotRows is the nq == 1 case
  RowsF32Fn rows_f32;
  RowsF16Fn rows_f16;
  ProjectFn project_f32;
  MultiFn multi_i8;              // DotRowsMultiI8's dots, before the row scales
  PageMassFn page_mass_16x4[3];  // PageLogMass16x4, by DTypeIndex
};

const KernelTable kAvx2Table = {
    "avx2",
    DotF32Avx2,
    DotF16Avx2,
    DotBf16Avx2,
    {DotRowsMultiAvx2<F16Avx2>, DotRowsMultiAvx2<Bf16Avx2>, DotRowsMultiAvx2<F32Avx2>},
    DotF32RowsAvx2,
    DotF16RowsAvx2,
    ProjectF32Avx2,
    DotRowsMultiAvx2<I8Avx2>,
    {PageLogMass16x4Avx2<F16Avx2>, PageLogMass16x4Avx2<Bf16Avx2>, PageLogMass16x4Avx2<F32Avx2>},
};

const KernelTable kAvx512Table = {
    "avx512",
    DotF32Avx512,
    DotF16Avx512,
    DotBf16Avx512,
    {DotRowsMultiAvx512<F16Avx512>, DotRowsMultiAvx512<Bf16Avx512>, DotRowsMultiAvx512<F32Avx512>},
    DotRowsAheadAvx512<F32Avx512>,
    DotRowsAheadAvx512<F16Avx512>,
    ProjectF32Avx512,
    DotRowsMultiAvx512<I8Avx512>,
    {PageLogMass16x4Avx512<F16Avx512>, PageLogMass16x4Avx512<Bf16Avx512>,
     PageLogMass16x4Avx512<F32Avx512>},
};

bool CpuHasAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

std::atomic<const KernelTable*>& ActiveTable() {
  static std::atomic<const KernelTable*> table{CpuHasAvx512() ? &kAvx512Table : &kAvx2Table};
  return table;
}

inline const KernelTable& Table() { return *ActiveTable().load(std::memory_order_relaxed); }

// kF16 = 1, kBF16 = 2, kF32 = 3. An out-of-range value (never produced by a
// validated config) is treated as fp32 rather than indexing out of bounds.
inline int DTypeIndex(DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return 0;
    case DType::kBF16:
      return 1;
    default:
      return 2;
  }
}

}  // namespace

float DotF32(const float* a, const float* b, int dim) { return Table().dot_f32(a, b, dim); }
float DotF16(const float* q, const uint16_t* k, int dim) { return Table().dot_f16(q, k, dim); }
float DotBf16(const float* q, const uint16_t* k, int dim) { return Table().dot_bf16(q, k, dim); }

void DotF32Rows(const float* q, const float* rows, const uint32_t* ids, int64_t n, int dim,
                float* out) {
  if (n > 0 && dim > 0) Table().rows_f32(q, rows, ids, n, dim, out);
  if (dim <= 0) {
    for (int64_t i = 0; i < n; ++i) out[i] = 0.0f;
  }
}

void DotF16Rows(const float* q, const uint16_t* rows, const uint32_t* ids, int64_t n, int dim,
                float* out) {
  if (n > 0 && dim > 0) Table().rows_f16(q, rows, ids, n, dim, out);
  if (dim <= 0) {
    for (int64_t i = 0; i < n; ++i) out[i] = 0.0f;
  }
}

void ProjectF32(const float* xs, int64_t nx, const float* rows, int nrows, int dim, float* out) {
  if (nx <= 0 || nrows <= 0) return;
  if (dim <= 0) {
    std::fill(out, out + static_cast<size_t>(nx) * nrows, 0.0f);
    return;
  }
  Table().project_f32(xs, nx, rows, nrows, dim, out);
}

void DotRows(DType dtype, const void* rows, int64_t n, int dim, const float* q, float* out) {
  if (n <= 0 || dim <= 0) {
    for (int64_t i = 0; i < n; ++i) out[i] = 0.0f;
    return;
  }
  // One query is the nq == 1 block kernel: 8 rows per block keep 8
  // independent FMA chains busy.
  Table().multi[DTypeIndex(dtype)](rows, n, dim, q, 1, out);
}

void DotRowsMulti(DType dtype, const void* rows, int64_t n, int dim, const float* queries, int nq,
                  float* out) {
  if (n <= 0 || nq <= 0) return;
  if (dim <= 0) {
    for (int64_t i = 0; i < n * nq; ++i) out[i] = 0.0f;
    return;
  }
  Table().multi[DTypeIndex(dtype)](rows, n, dim, queries, nq, out);
}

void DotRowsMultiI8(const int8_t* codes, const float* row_scales, int64_t n, int dim,
                    const float* queries, int nq, float* out) {
  if (n <= 0 || nq <= 0) return;
  if (dim <= 0) {
    for (int64_t i = 0; i < n * nq; ++i) out[i] = 0.0f;
    return;
  }
  Table().multi_i8(codes, n, dim, queries, nq, out);
  for (int j = 0; j < nq; ++j) {
    float* o = out + static_cast<int64_t>(j) * n;
    for (int64_t i = 0; i < n; ++i) o[i] *= row_scales[i];
  }
}

bool PageLogMass16x4(DType dtype, const void* rows, int dim, const float* queries, float scale,
                     float* lse, float* max, float* logits) {
  if (dim <= 0) return false;
  float unused[4];
  return Table().page_mass_16x4[DTypeIndex(dtype)](rows, dim, queries, scale, lse,
                                                   max != nullptr ? max : unused, logits);
}

int64_t FirstGreater(const float* x, int64_t n, float threshold) {
  const __m256 t = _mm256_set1_ps(threshold);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const int lo = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), t, _CMP_GT_OQ));
    const int hi = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i + 8), t, _CMP_GT_OQ));
    if ((lo | hi) == 0) continue;
    return i + __builtin_ctz(static_cast<unsigned>(lo | hi << 8));
  }
  for (; i < n; ++i) {
    if (x[i] > threshold) return i;
  }
  return n;
}

void LaneMax8(const float* x, int64_t n, float* out) {
  __m256 m0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
  }
  _mm256_storeu_ps(out, _mm256_max_ps(m0, m1));
  for (int j = 0; i < n; ++i, j = (j + 1) % 8) out[j] = std::max(out[j], x[i]);
}

const char* KernelIsa() { return Table().name; }

bool ForceKernelIsa(std::string_view isa) {
  if (isa == "avx2") {
    ActiveTable().store(&kAvx2Table, std::memory_order_relaxed);
    return true;
  }
  if (isa == "avx512") {
    if (!CpuHasAvx512()) return false;
    ActiveTable().store(&kAvx512Table, std::memory_order_relaxed);
    return true;
  }
  if (isa == "auto") {
    ActiveTable().store(CpuHasAvx512() ? &kAvx512Table : &kAvx2Table, std::memory_order_relaxed);
    return true;
  }
  return false;
}

}  // namespace icecache
