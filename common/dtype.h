// Element types of KV data and conversions to and from fp32.
// fp16 <-> fp32 uses F16C (part of x86-64-v3); bf16 is a shift with
// round-to-nearest-even. All functions are thread-safe and allocate nothing.
#ifndef ICECACHE_COMMON_DTYPE_H_
#define ICECACHE_COMMON_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/status/statusor.h"

namespace icecache {

enum class DType : uint8_t { kF16 = 1, kBF16 = 2, kF32 = 3 };

// Bytes per element: 2, 2, 4.
size_t DTypeSize(DType dtype);
std::string_view DTypeName(DType dtype);  // "float16", "bfloat16", "float32"
// Accepts "float16"/"fp16"/"f16", "bfloat16"/"bf16", "float32"/"fp32"/"f32".
absl::StatusOr<DType> ParseDType(std::string_view name);

uint16_t FloatToHalf(float f);
float HalfToFloat(uint16_t h);
uint16_t FloatToBf16(float f);
float Bf16ToFloat(uint16_t b);

// Vectorised bulk conversions; `n` elements.
void HalfToFloat(const uint16_t* in, float* out, size_t n);
void FloatToHalf(const float* in, uint16_t* out, size_t n);
void Bf16ToFloat(const uint16_t* in, float* out, size_t n);
void FloatToBf16(const float* in, uint16_t* out, size_t n);
// Converts `n` elements of `dtype` at `in` to fp32 / from fp32.
void ToFloat(DType dtype, const void* in, float* out, size_t n);
void FromFloat(DType dtype, const float* in, void* out, size_t n);
// The fp32 values a buffer of `dtype` gives back for `in` (n values): `in`
// itself for fp32; else `in` stored into `raw` (n x DTypeSize(dtype) bytes)
// and read back into `out` (n floats), and `out` is returned. What an index
// that keeps its own copy of the keys encodes, so that it sees what the
// frames hold.
const float* RoundThrough(DType dtype, const float* in, void* raw, float* out, size_t n);

}  // namespace icecache

#endif  // ICECACHE_COMMON_DTYPE_H_
