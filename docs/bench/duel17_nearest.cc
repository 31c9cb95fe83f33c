// The nearest-centroid step of PqSketch::Train and Encode, three ways, on
// the same 1M random 4-dimensional points and 16 centroids, interleaved in one
// process (docs/bench/duel17_methods.md):
//   old:  a loop over the centroids, one squared distance at a time (the
//         code before d074fbd);
//   loop: the distances side by side from dimension-major centroids, plain
//         C++ (d074fbd: slower, the argmin loop is a dependency chain);
//   simd: the same with two 8-lane vectors, a vector minimum and the first
//         lane that holds it (pq_sketch.cc PqNearest now).
// Build and run: g++ -O3 -march=x86-64-v3 -o /tmp/nearest docs/bench/duel17_nearest.cc &&
// /tmp/nearest
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

constexpr int kC = 16, kD = 4;

__attribute__((noinline)) int OldNearest(const float* x, const float* cent) {
  auto dist = [&](const float* b) {
    float s = 0;
    for (int d = 0; d < kD; ++d) {
      const float t = x[d] - b[d];
      s += t * t;
    }
    return s;
  };
  int best = 0;
  float bd = dist(cent);
  for (int c = 1; c < kC; ++c) {
    const float dd = dist(cent + c * kD);
    if (dd < bd) {
      bd = dd;
      best = c;
    }
  }
  return best;
}

__attribute__((noinline)) int LoopNearest(const float* x, const float* ct) {
  float dist[kC];
  for (int c = 0; c < kC; ++c) {
    const float t = x[0] - ct[c];
    dist[c] = t * t;
  }
  for (int d = 1; d < kD; ++d) {
    for (int c = 0; c < kC; ++c) {
      const float t = x[d] - ct[d * kC + c];
      dist[c] += t * t;
    }
  }
  int best = 0;
  for (int c = 1; c < kC; ++c) best = dist[c] < dist[best] ? c : best;
  return best;
}

__attribute__((noinline)) int SimdNearest(const float* x, const float* ct) {
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (int d = 0; d < kD; ++d) {
    const __m256 xd = _mm256_set1_ps(x[d]);
    const __m256 tl = _mm256_sub_ps(xd, _mm256_loadu_ps(ct + d * kC));
    const __m256 th = _mm256_sub_ps(xd, _mm256_loadu_ps(ct + d * kC + 8));
    lo = _mm256_add_ps(lo, _mm256_mul_ps(tl, tl));
    hi = _mm256_add_ps(hi, _mm256_mul_ps(th, th));
  }
  __m256 m = _mm256_min_ps(lo, hi);
  m = _mm256_min_ps(m, _mm256_permute2f128_ps(m, m, 1));
  m = _mm256_min_ps(m, _mm256_permute_ps(m, 0x4e));
  m = _mm256_min_ps(m, _mm256_permute_ps(m, 0xb1));
  const unsigned mask =
      static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(lo, m, _CMP_EQ_OQ))) |
      (static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(hi, m, _CMP_EQ_OQ))) << 8);
  return mask == 0 ? 0 : __builtin_ctz(mask);
}

int main() {
  std::mt19937 rng(1);
  std::normal_distribution<float> n;
  const int N = 32768 * 32;  // one 32768-token tree's Encode at head_dim 128
  std::vector<float> x(static_cast<size_t>(N) * kD), cent(kC * kD), ct(kC * kD);
  for (auto& v : x) v = n(rng);
  for (auto& v : cent) v = n(rng);
  for (int c = 0; c < kC; ++c) {
    for (int d = 0; d < kD; ++d) ct[d * kC + c] = cent[c * kD + d];
  }
  long differ = 0;
  for (int i = 0; i < N; ++i) {
    const int old = OldNearest(&x[i * kD], cent.data());
    differ += old != SimdNearest(&x[i * kD], ct.data());
    differ += old != LoopNearest(&x[i * kD], ct.data());
  }
  std::printf("points whose nearest centroid differs from old: %ld\n", differ);
  for (int rep = 0; rep < 7; ++rep) {
    long s[3] = {0, 0, 0};
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < N; ++i) s[0] += OldNearest(&x[i * kD], cent.data());
    const auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < N; ++i) s[1] += LoopNearest(&x[i * kD], ct.data());
    const auto t2 = std::chrono::steady_clock::now();
    for (int i = 0; i < N; ++i) s[2] += SimdNearest(&x[i * kD], ct.data());
    const auto t3 = std::chrono::steady_clock::now();
    auto ms = [](auto a, auto b) {
      return std::chrono::duration<double, std::milli>(b - a).count();
    };
    std::printf("old %6.1f ms  loop %6.1f ms  simd %6.1f ms  (checksums %ld %ld %ld)\n", ms(t0, t1),
                ms(t1, t2), ms(t2, t3), s[0], s[1], s[2]);
  }
}
