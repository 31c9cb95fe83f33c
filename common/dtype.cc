#include "common/dtype.h"

#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace icecache {
namespace {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kF32:
      return 4;
  }
  return 0;
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return "float16";
    case DType::kBF16:
      return "bfloat16";
    case DType::kF32:
      return "float32";
  }
  return "unknown";
}

absl::StatusOr<DType> ParseDType(std::string_view name) {
  const std::string n = absl::AsciiStrToLower(std::string(name));
  if (n == "float16" || n == "fp16" || n == "f16" || n == "half") return DType::kF16;
  if (n == "bfloat16" || n == "bf16") return DType::kBF16;
  if (n == "float32" || n == "fp32" || n == "f32" || n == "float") return DType::kF32;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype '", std::string(name),
                   "'; expected one of float16 (fp16, f16), bfloat16 (bf16), float32 (fp32, f32)"));
}

// The scalar conversions are written in portable integer arithmetic on
// purpose: they are the reference the F16C/AVX2 paths are tested against, and
// they match the hardware bit for bit (NaNs are quieted, payload truncated).
uint16_t FloatToHalf(float f) {
  uint32_t x = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) {  // Inf or NaN
    if (x == 0x7f800000u) return sign | 0x7c00u;
    return static_cast<uint16_t>(sign | 0x7e00u | ((x & 0x007fffffu) >> 13));
  }
  // 65520 is the midpoint between the largest half (65504, odd mantissa) and
  // 65536, so ties-to-even and everything above overflow to Inf.
  if (x >= 0x477ff000u) return sign | 0x7c00u;
  if (x < 0x38800000u) {
    // Result is subnormal or zero. Adding 0.5f puts the value's bits at the
    // half subnormal ulp (2^-24) and lets the FPU round to nearest even.
    const float r = BitsFloat(x) + 0.5f;
    return static_cast<uint16_t>(sign | (FloatBits(r) - 0x3f000000u));
  }
  const uint32_t mant_odd = (x >> 13) & 1u;
  x += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd;
  return static_cast<uint16_t>(sign | (x >> 13));
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return BitsFloat(sign);
    // Subnormal: normalise.
    uint32_t e = 127 - 15 + 1;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    mant &= 0x3ffu;
    return BitsFloat(sign | (e << 23) | (mant << 13));
  }
  if (exp == 31) {
    if (mant == 0) return BitsFloat(sign | 0x7f800000u);
    return BitsFloat(sign | 0x7fc00000u | (mant << 13));  // quiet NaN
  }
  return BitsFloat(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

uint16_t FloatToBf16(float f) {
  const uint32_t x = FloatBits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep sign and top payload, quiet
    return static_cast<uint16_t>((x >> 16) | 0x0040u);
  }
  const uint32_t lsb = (x >> 16) & 1u;
  return static_cast<uint16_t>((x + 0x7fffu + lsb) >> 16);
}

float Bf16ToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

void HalfToFloat(const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 16 <= n; i += 16) {
    __m128i h0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    __m128i h1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i + 8));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h0));
    _mm256_storeu_ps(out + i + 8, _mm256_cvtph_ps(h1));
  }
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) out[i] = HalfToFloat(in[i]);
}

void FloatToHalf(const float* in, uint16_t* out, size_t n) {
  size_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 16 <= n; i += 16) {
    __m128i h0 =
        _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m128i h1 =
        _mm256_cvtps_ph(_mm256_loadu_ps(in + i + 8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 8), h1);
  }
  for (; i + 8 <= n; i += 8) {
    __m128i h =
        _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
#endif
  for (; i < n; ++i) out[i] = FloatToHalf(in[i]);
}

void Bf16ToFloat(const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16);
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(w));
  }
#endif
  for (; i < n; ++i) out[i] = Bf16ToFloat(in[i]);
}

void FloatToBf16(const float* in, uint16_t* out, size_t n) {
  size_t i = 0;
#if defined(__AVX2__)
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_set1_epi32(0x7fff);
  const __m256i quiet = _mm256_set1_epi32(0x0040);
  for (; i + 8 <= n; i += 8) {
    const __m256 f = _mm256_loadu_ps(in + i);
    const __m256i x = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), one);
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(bias, lsb)), 16);
    const __m256i nan_bits = _mm256_or_si256(_mm256_srli_epi32(x, 16), quiet);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    const __m256i r = _mm256_blendv_epi8(rounded, nan_bits, is_nan);
    // Every lane is in [0, 0xffff], so unsigned saturation packs losslessly.
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), packed);
  }
#endif
  for (; i < n; ++i) out[i] = FloatToBf16(in[i]);
}

void ToFloat(DType dtype, const void* in, float* out, size_t n) {
  switch (dtype) {
    case DType::kF16:
      HalfToFloat(static_cast<const uint16_t*>(in), out, n);
      return;
    case DType::kBF16:
      Bf16ToFloat(static_cast<const uint16_t*>(in), out, n);
      return;
    case DType::kF32:
      if (n > 0) std::memmove(out, in, n * sizeof(float));
      return;
  }
}

void FromFloat(DType dtype, const float* in, void* out, size_t n) {
  switch (dtype) {
    case DType::kF16:
      FloatToHalf(in, static_cast<uint16_t*>(out), n);
      return;
    case DType::kBF16:
      FloatToBf16(in, static_cast<uint16_t*>(out), n);
      return;
    case DType::kF32:
      if (n > 0) std::memmove(out, in, n * sizeof(float));
      return;
  }
}

const float* RoundThrough(DType dtype, const float* in, void* raw, float* out, size_t n) {
  if (dtype == DType::kF32) return in;
  FromFloat(dtype, in, raw, n);
  ToFloat(dtype, raw, out, n);
  return out;
}

}  // namespace icecache
