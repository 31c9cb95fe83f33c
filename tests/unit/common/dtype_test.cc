#include "common/dtype.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  for (DType d : {DType::kF16, DType::kBF16, DType::kF32}) {
    auto parsed = ParseDType(DTypeName(d));
    ASSERT_THAT(parsed, IsOk());
    EXPECT_EQ(*parsed, d);
  }
  EXPECT_EQ(*ParseDType("fp16"), DType::kF16);
  EXPECT_EQ(*ParseDType("BF16"), DType::kBF16);
  EXPECT_EQ(*ParseDType("f32"), DType::kF32);
  EXPECT_THAT(ParseDType("int8"),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("int8")));
  EXPECT_THAT(ParseDType(""), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(DTypeTest, HalfScalarKnownValues) {
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65519.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // tie rounds to even -> Inf
  EXPECT_EQ(FloatToHalf(1e10f), 0x7c00);
  EXPECT_EQ(FloatToHalf(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);  // tie -> even (0)
  EXPECT_EQ(FloatToHalf(std::ldexp(3.0f, -25)), 0x0002);  // tie 1.5 ulp -> 2
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  // 1 + 2^-11 is the midpoint of 1 and 1+2^-10: ties to even (1.0).
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  uint16_t nan = FloatToHalf(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7c00, 0x7c00);
  EXPECT_NE(nan & 0x03ff, 0);
  EXPECT_TRUE(std::isnan(HalfToFloat(static_cast<uint16_t>(0x7c01))));
  EXPECT_EQ(HalfToFloat(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(0x3555), 0.333251953125f);
}

// Every one of the 65536 half values: the vector path equals the scalar path
// bit for bit, and half -> float -> half is the identity (NaNs stay NaN).
TEST(DTypeTest, HalfExhaustiveVectorMatchesScalarAndRoundTrips) {
  std::vector<uint16_t> all(65536 + 5);  // odd length exercises the tail
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> vec(all.size());
  HalfToFloat(all.data(), vec.data(), all.size());
  std::vector<uint16_t> back(all.size());
  FloatToHalf(vec.data(), back.data(), vec.size());
  int mismatches = 0;
  for (size_t i = 0; i < all.size(); ++i) {
    const float s = HalfToFloat(all[i]);
    if (Bits(s) != Bits(vec[i])) ++mismatches;
    const bool is_nan = (all[i] & 0x7c00) == 0x7c00 && (all[i] & 0x3ff) != 0;
    if (is_nan) {
      EXPECT_TRUE(std::isnan(s));
      EXPECT_EQ(back[i] & 0x7e00, 0x7e00) << "NaN must stay a quiet NaN";
      EXPECT_EQ(back[i] & 0x8000, all[i] & 0x8000);
    } else {
      EXPECT_EQ(back[i], all[i]) << "index " << i;
    }
    EXPECT_EQ(FloatToHalf(vec[i]), back[i]) << "index " << i;
  }
  EXPECT_EQ(mismatches, 0);
}

// Midpoints between adjacent halves and random float bit patterns: the F16C
// path (round to nearest even) equals the scalar reference.
TEST(DTypeTest, FloatToHalfVectorMatchesScalarOnMidpointsAndRandomBits) {
  std::vector<float> in;
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float a = HalfToFloat(static_cast<uint16_t>(h));
    const float b = HalfToFloat(static_cast<uint16_t>(h + 1));
    const float mid = 0.5f * a + 0.5f * b;  // exact in fp32
    in.push_back(mid);
    in.push_back(-mid);
    in.push_back(std::nextafter(mid, 0.0f));
    in.push_back(std::nextafter(mid, 1e30f));
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 1 << 20; ++i) in.push_back(FromBits(rng()));
  in.push_back(std::numeric_limits<float>::infinity());
  in.push_back(std::numeric_limits<float>::denorm_min());
  in.push_back(FromBits(0x7f800001u));  // signalling NaN
  std::vector<uint16_t> out(in.size());
  FloatToHalf(in.data(), out.data(), in.size());
  int mismatches = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    if (out[i] != FloatToHalf(in[i])) {
      if (++mismatches < 10) {
        ADD_FAILURE() << std::hex << "float bits 0x" << Bits(in[i]) << " vector 0x" << out[i]
                      << " scalar 0x" << FloatToHalf(in[i]);
      }
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(DTypeTest, HalfRoundingErrorIsWithinHalfUlp) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-60000.0f, 60000.0f);
  for (int i = 0; i < 100000; ++i) {
    const float f = u(rng);
    const float r = HalfToFloat(FloatToHalf(f));
    const int e = std::ilogb(std::max(std::fabs(f), std::ldexp(1.0f, -14)));
    const float half_ulp = std::ldexp(1.0f, e - 11);
    EXPECT_LE(std::fabs(r - f), half_ulp) << f;
  }
}

TEST(DTypeTest, Bf16RoundingCases) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  // 1 + 2^-8 is the midpoint of 1 (even) and 1 + 2^-7: ties to even -> 1.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808000u)), 0x3f80);
  // Midpoint above an odd mantissa rounds up to the even one.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f818000u)), 0x3f82);
  // Just above / below the midpoint.
  EXPECT_EQ(FloatToBf16(FromBits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(FloatToBf16(FromBits(0x3f807fffu)), 0x3f80);
  // Largest float rounds to infinity; infinities stay.
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(FloatToBf16(FromBits(0x7f7f7fffu)), 0x7f7f);
  // NaN (even one whose payload sits only in the low bits) stays NaN.
  for (uint32_t bits : {0x7fc00000u, 0x7f800001u, 0xffffffffu, 0x7f80ffffu}) {
    const uint16_t b = FloatToBf16(FromBits(bits));
    EXPECT_TRUE(std::isnan(Bf16ToFloat(b))) << std::hex << bits;
    EXPECT_EQ(b & 0x8000, (bits >> 16) & 0x8000);
  }
}

TEST(DTypeTest, Bf16VectorMatchesScalar) {
  std::vector<float> in;
  std::mt19937 rng(11);
  for (int i = 0; i < 200003; ++i) in.push_back(FromBits(rng()));
  for (uint32_t b = 0; b < 65536; ++b) {
    in.push_back(FromBits((b << 16) | 0x8000u));  // exact ties
    in.push_back(FromBits(b << 16));
  }
  std::vector<uint16_t> out(in.size());
  FloatToBf16(in.data(), out.data(), in.size());
  std::vector<float> back(in.size());
  Bf16ToFloat(out.data(), back.data(), out.size());
  int mismatches = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    if (out[i] != FloatToBf16(in[i])) ++mismatches;
    if (Bits(back[i]) != Bits(Bf16ToFloat(out[i]))) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0);
  // bf16 -> float -> bf16 is the identity for every non-NaN value.
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(b));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToBf16(f), b);
  }
}

TEST(DTypeTest, GenericToAndFromFloat) {
  std::vector<float> in = {0.5f, -1.25f, 3.0f, 1024.0f, -0.0f, 7.75f, 1e-3f, 2.0f, 100.5f};
  for (DType d : {DType::kF16, DType::kBF16, DType::kF32}) {
    std::vector<uint8_t> buf(in.size() * DTypeSize(d));
    FromFloat(d, in.data(), buf.data(), in.size());
    std::vector<float> out(in.size());
    ToFloat(d, buf.data(), out.data(), in.size());
    for (size_t i = 0; i < in.size(); ++i) {
      const float tol =
          d == DType::kF32 ? 0.0f : std::fabs(in[i]) * (d == DType::kF16 ? 1e-3f : 8e-3f);
      EXPECT_NEAR(out[i], in[i], tol) << DTypeName(d) << " " << i;
    }
  }
  // n = 0 touches nothing.
  ToFloat(DType::kF32, nullptr, nullptr, 0);
  FromFloat(DType::kF16, nullptr, nullptr, 0);
}

// RoundThrough gives the values a buffer of the dtype holds: fp32 as it is
// (the same pointer), fp16 and bf16 rounded as their conversions round.
TEST(DTypeTest, RoundThroughGivesWhatABufferOfTheDTypeHolds) {
  const float in[4] = {1.0f, 1.0001f, -3.14159f, 65504.0f};
  uint8_t raw[4 * sizeof(float)];
  float out[4] = {0, 0, 0, 0};
  EXPECT_EQ(RoundThrough(DType::kF32, in, raw, out, 4), in);
  for (DType t : {DType::kF16, DType::kBF16}) {
    const float* got = RoundThrough(t, in, raw, out, 4);
    EXPECT_EQ(got, out);
    uint8_t stored[4 * sizeof(float)];
    float back[4];
    FromFloat(t, in, stored, 4);
    ToFloat(t, stored, back, 4);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(got[i], back[i]) << i;
    EXPECT_NE(got[1], in[1]) << "1.0001 is not exact in 16 bits";
  }
}

}  // namespace
}  // namespace icecache
