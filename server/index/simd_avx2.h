// Internal to icecache_index: the 8-lane (AVX2, the build's x86-64-v3
// baseline) helpers shared by the page scores (page_select.cc) and the fused
// page pass of the kernels (kernels.cc), which must give the page scores'
// bits: one definition, so the two cannot drift apart.
#ifndef ICECACHE_SERVER_INDEX_SIMD_AVX2_H_
#define ICECACHE_SERVER_INDEX_SIMD_AVX2_H_

#include <immintrin.h>

namespace icecache::simd {

// exp(x) for 8 lanes of x <= 0 (log-sum-exp arguments): Cephes-style range
// reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for exp(r),
// 2^n through the exponent bits; exp(x) = poly * pow2. Relative error ~2e-7;
// arguments below -87 are clamped (exp(-87) ~ 1.6e-38, negligible next to
// the max term, 1).
inline void Exp256Factors(__m256 x, __m256* poly, __m256* pow2) {
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
  const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
  r = _mm256_fnmadd_ps(n, ln2_lo, r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  *poly = p;
  *pow2 = _mm256_castsi256_ps(e);
}

inline __m256 Exp256(__m256 x) {
  __m256 p, e;
  Exp256Factors(x, &p, &e);
  return _mm256_mul_ps(p, e);
}

inline float HMax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 0x55));
  return _mm_cvtss_f32(m);
}

inline float HMin256(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 0x55));
  return _mm_cvtss_f32(m);
}

// (lo + hi), then pairs, then the last two: the order every caller's bits
// depend on.
inline float HSum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

}  // namespace icecache::simd

#endif  // ICECACHE_SERVER_INDEX_SIMD_AVX2_H_
