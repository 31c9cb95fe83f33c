#include "server/index/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "server/index/page_select.h"

namespace icecache {
namespace {

// Independent scalar conversions (bit-level), so the test does not trust the
// code under test for the reference.
float RefHalfToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ff;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    f = man ? NAN : INFINITY;
  } else {
    f = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u |= sign;
  std::memcpy(&f, &u, 4);
  return f;
}
// Truncating fp32 -> fp16 for normal-range values (good enough for data we
// generate in [-4, 4]); the reference only needs to decode exactly what is stored.
uint16_t RefFloatToHalf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int exp = static_cast<int>((u >> 23) & 0xff) - 127 + 15;
  if (exp <= 0) return static_cast<uint16_t>(sign);  // flush tiny values to zero
  return static_cast<uint16_t>(sign | (exp << 10) | ((u >> 13) & 0x3ff));
}
float RefBf16ToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t RefFloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

struct Data {
  std::vector<float> q;    // nq x dim
  std::vector<float> f32;  // n x dim
  std::vector<uint16_t> f16;
  std::vector<uint16_t> bf16;
};

Data MakeData(int64_t n, int dim, int nq, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  Data d;
  d.q.resize(static_cast<size_t>(nq) * dim);
  for (auto& x : d.q) x = u(rng);
  d.f32.resize(static_cast<size_t>(n) * dim);
  d.f16.resize(d.f32.size());
  d.bf16.resize(d.f32.size());
  for (size_t i = 0; i < d.f32.size(); ++i) {
    d.f32[i] = u(rng);
    d.f16[i] = RefFloatToHalf(d.f32[i]);
    d.bf16[i] = RefFloatToBf16(d.f32[i]);
  }
  return d;
}

double RefDot(const float* q, const float* k, int dim) {
  double s = 0;
  for (int i = 0; i < dim; ++i) s += static_cast<double>(q[i]) * k[i];
  return s;
}
double RefDotF16(const float* q, const uint16_t* k, int dim) {
  double s = 0;
  for (int i = 0; i < dim; ++i) s += static_cast<double>(q[i]) * RefHalfToFloat(k[i]);
  return s;
}
double RefDotBf16(const float* q, const uint16_t* k, int dim) {
  double s = 0;
  for (int i = 0; i < dim; ++i) s += static_cast<double>(q[i]) * RefBf16ToFloat(k[i]);
  return s;
}

// fp32 accumulation over `dim` products of magnitude <= 4.
double Tol(int dim) { return 1e-5 * 4.0 * dim + 1e-6; }

// Every dim 1..257 for the single-query kernels (all tail lengths of both
// ISAs, several times over); a subset covering every tail for the
// multi-query sweep, which also iterates over query counts.
const std::vector<int>& AllDims() {
  static const std::vector<int> dims = [] {
    std::vector<int> d;
    for (int i = 1; i <= 257; ++i) d.push_back(i);
    return d;
  }();
  return dims;
}

const std::vector<int>& Dims() {
  static const std::vector<int> dims = [] {
    std::vector<int> d;
    for (int i = 1; i <= 40; ++i) d.push_back(i);
    for (int i : {47, 63, 64, 65, 96, 127, 128, 129, 130, 191, 255, 256, 257}) d.push_back(i);
    return d;
  }();
  return dims;
}

class KernelsTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!ForceKernelIsa(GetParam())) GTEST_SKIP() << "CPU lacks " << GetParam();
    ASSERT_EQ(std::string(KernelIsa()), GetParam());
  }
  void TearDown() override { ForceKernelIsa("auto"); }
};

TEST_P(KernelsTest, SingleDotsMatchScalarReference) {
  for (int dim : AllDims()) {
    const Data d = MakeData(1, dim, 1, 100 + dim);
    EXPECT_NEAR(DotF32(d.q.data(), d.f32.data(), dim), RefDot(d.q.data(), d.f32.data(), dim),
                Tol(dim))
        << "dim " << dim;
    EXPECT_NEAR(DotF16(d.q.data(), d.f16.data(), dim), RefDotF16(d.q.data(), d.f16.data(), dim),
                Tol(dim))
        << "dim " << dim;
    EXPECT_NEAR(DotBf16(d.q.data(), d.bf16.data(), dim), RefDotBf16(d.q.data(), d.bf16.data(), dim),
                Tol(dim))
        << "dim " << dim;
  }
}

TEST_P(KernelsTest, DotRowsMatchesScalarReferenceForEveryDtype) {
  const int64_t n = 9;
  for (int dim : AllDims()) {
    const Data d = MakeData(n, dim, 1, 200 + dim);
    std::vector<float> out(n, -1.0f);
    DotRows(DType::kF32, d.f32.data(), n, dim, d.q.data(), out.data());
    for (int64_t r = 0; r < n; ++r) {
      EXPECT_NEAR(out[r], RefDot(d.q.data(), &d.f32[r * dim], dim), Tol(dim)) << dim << " " << r;
    }
    DotRows(DType::kF16, d.f16.data(), n, dim, d.q.data(), out.data());
    for (int64_t r = 0; r < n; ++r) {
      EXPECT_NEAR(out[r], RefDotF16(d.q.data(), &d.f16[r * dim], dim), Tol(dim)) << dim << " " << r;
    }
    DotRows(DType::kBF16, d.bf16.data(), n, dim, d.q.data(), out.data());
    for (int64_t r = 0; r < n; ++r) {
      EXPECT_NEAR(out[r], RefDotBf16(d.q.data(), &d.bf16[r * dim], dim), Tol(dim))
          << dim << " " << r;
    }
  }
}

TEST_P(KernelsTest, DotRowsMultiMatchesScalarReferenceForAllQueryCounts) {
  // 37 rows: whole row blocks (up to 8 rows) plus a remainder for every nq.
  const int64_t n = 37;
  for (int dim : Dims()) {
    for (int nq : {1, 2, 3, 4, 5, 6, 7, 8, 9, 13}) {
      const Data d = MakeData(n, dim, nq, 1000 * nq + dim);
      std::vector<float> out(static_cast<size_t>(n) * nq);
      struct Case {
        DType dtype;
        const void* rows;
      };
      for (const Case& c : {Case{DType::kF32, d.f32.data()}, Case{DType::kF16, d.f16.data()},
                            Case{DType::kBF16, d.bf16.data()}}) {
        std::fill(out.begin(), out.end(), NAN);
        DotRowsMulti(c.dtype, c.rows, n, dim, d.q.data(), nq, out.data());
        for (int j = 0; j < nq; ++j) {
          const float* q = &d.q[static_cast<size_t>(j) * dim];
          for (int64_t r = 0; r < n; ++r) {
            double ref = 0;
            if (c.dtype == DType::kF32) ref = RefDot(q, &d.f32[r * dim], dim);
            if (c.dtype == DType::kF16) ref = RefDotF16(q, &d.f16[r * dim], dim);
            if (c.dtype == DType::kBF16) ref = RefDotBf16(q, &d.bf16[r * dim], dim);
            ASSERT_NEAR(out[j * n + r], ref, Tol(dim))
                << "dtype " << static_cast<int>(c.dtype) << " dim " << dim << " nq " << nq
                << " query " << j << " row " << r;
          }
        }
      }
    }
  }
}

// The int8 sketch kernel: its dots are DotRowsMulti's over the codes stored
// as fp32, bit for bit (the same blocks and additions; every code converts
// exactly), times the row's scale; and within fp32 rounding of a double
// scalar reference, for every query count and dim (all tails). The AVX2
// scalar tail (dim % 8 elements) may be contracted into FMAs differently in
// the two instantiations, so there the bits are checked on whole chunks.
TEST_P(KernelsTest, DotRowsMultiI8IsTheF32KernelOverItsCodesTimesTheScale) {
  const int64_t n = 37;
  for (int dim : Dims()) {
    for (int nq : {1, 2, 3, 4, 5, 8, 9}) {
      std::mt19937 rng(77 * nq + dim);
      std::uniform_int_distribution<int> code(-127, 127);
      std::uniform_real_distribution<float> u(-2.0f, 2.0f);
      std::vector<int8_t> codes(static_cast<size_t>(n) * dim);
      std::vector<float> as_f32(codes.size()), scales(n), q(static_cast<size_t>(nq) * dim);
      for (size_t i = 0; i < codes.size(); ++i) {
        codes[i] = static_cast<int8_t>(code(rng));
        as_f32[i] = static_cast<float>(codes[i]);
      }
      for (auto& s : scales) s = std::fabs(u(rng)) / 127.0f;
      for (auto& x : q) x = u(rng);
      std::vector<float> out(static_cast<size_t>(n) * nq, NAN), dots(out.size(), NAN);
      DotRowsMultiI8(codes.data(), scales.data(), n, dim, q.data(), nq, out.data());
      DotRowsMulti(DType::kF32, as_f32.data(), n, dim, q.data(), nq, dots.data());
      for (int j = 0; j < nq; ++j) {
        for (int64_t r = 0; r < n; ++r) {
          const size_t at = static_cast<size_t>(j) * n + r;
          if (GetParam() == "avx512" || dim % 8 == 0) {
            ASSERT_EQ(out[at], dots[at] * scales[r])
                << "dim " << dim << " nq " << nq << " row " << r;
          }
          double ref = 0;
          for (int c = 0; c < dim; ++c) {
            ref += static_cast<double>(q[static_cast<size_t>(j) * dim + c]) * codes[r * dim + c];
          }
          ASSERT_NEAR(out[at], ref * scales[r], Tol(dim) * 127.0 * scales[r])
              << "dim " << dim << " nq " << nq << " row " << r;
        }
      }
    }
  }
}

// Rows(q, rows, ids, n, dim, out) against One(q, row, dim) for every row, bit
// for bit, by index list or contiguous, for odd or even row counts; nothing
// written past n.
template <typename T, typename Rows, typename One>
void ExpectRowsGiveSingleDotsBits(const std::vector<T>& rows, const float* q, int dim, Rows batch,
                                  One one) {
  const std::vector<uint32_t> ids = {7, 0, 10, 3, 3, 9, 1};
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{5}, int64_t{7}}) {
    std::vector<float> out(static_cast<size_t>(n) + 1, NAN);
    batch(q, rows.data(), ids.data(), n, dim, out.data());
    for (int64_t i = 0; i < n; ++i) {
      const float want = one(q, &rows[static_cast<size_t>(ids[i]) * dim], dim);
      ASSERT_EQ(0, std::memcmp(&want, &out[i], sizeof(float)))
          << "dim " << dim << " n " << n << " id " << ids[i];
    }
    EXPECT_TRUE(std::isnan(out[n])) << "wrote past n";
    batch(q, rows.data(), nullptr, n, dim, out.data());
    for (int64_t i = 0; i < n; ++i) {
      const float want = one(q, &rows[static_cast<size_t>(i) * dim], dim);
      ASSERT_EQ(0, std::memcmp(&want, &out[i], sizeof(float))) << "dim " << dim << " row " << i;
    }
  }
}

// The batched single dots of a tree insert must give the single dot's bits
// exactly: DotF32Rows DotF32's (the trees a warm restart replays depend on
// them), DotF16Rows DotF16's (a decode insert routes over the fp16 mirrors),
// for every dim (tails included).
TEST_P(KernelsTest, DotF32RowsGivesDotF32sBitsForEveryRow) {
  for (int dim : AllDims()) {
    const Data d = MakeData(11, dim, 1, 300 + dim);
    ASSERT_NO_FATAL_FAILURE(
        ExpectRowsGiveSingleDotsBits(d.f32, d.q.data(), dim, DotF32Rows, DotF32));
  }
}

TEST_P(KernelsTest, DotF16RowsGivesDotF16sBitsForEveryRow) {
  for (int dim : AllDims()) {
    const Data d = MakeData(11, dim, 1, 400 + dim);
    ASSERT_NO_FATAL_FAILURE(
        ExpectRowsGiveSingleDotsBits(d.f16, d.q.data(), dim, DotF16Rows, DotF16));
  }
}

// The AVX-512 register blocks against a scalar emulation of their exact
// arithmetic: 16 lanes, one fused multiply-add per lane and 16-element
// chunk, the tail a zero-masked chunk, then GCC's _mm512_reduce_add_ps tree
// (upper 8 + lower 8, upper 4 + lower 4, [0] + [2] and [1] + [3], then the
// two). Every query count (so every block, the 16-sum transposed reduction
// of nq = 2, 4 and 8 included) must give these bits, fp32 and fp16 rows.
float EmulatedDotAvx512(const float* q, const float* k, int dim) {
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= dim; i += 16) {
    for (int l = 0; l < 16; ++l) acc[l] = std::fma(q[i + l], k[i + l], acc[l]);
  }
  if (i < dim) {
    for (int l = 0; l < 16; ++l) {
      acc[l] = i + l < dim ? std::fma(q[i + l], k[i + l], acc[l]) : std::fma(0.0f, 0.0f, acc[l]);
    }
  }
  float t3[8], t6[4];
  for (int l = 0; l < 8; ++l) t3[l] = acc[8 + l] + acc[l];
  for (int l = 0; l < 4; ++l) t6[l] = t3[4 + l] + t3[l];
  return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}

TEST_P(KernelsTest, DotRowsMultiAvx512BlocksGiveTheirExactArithmetic) {
  if (GetParam() != "avx512") GTEST_SKIP() << "the AVX-512 blocks only";
  const int64_t n = 21;
  for (int dim : {16, 37, 128, 130}) {
    const Data d = MakeData(n, dim, 8, 900 + dim);
    std::vector<float> f16_rows(d.f16.size());
    for (size_t i = 0; i < d.f16.size(); ++i) f16_rows[i] = RefHalfToFloat(d.f16[i]);
    for (int nq = 1; nq <= 8; ++nq) {
      std::vector<float> out32(static_cast<size_t>(n) * nq), out16(out32.size());
      DotRowsMulti(DType::kF32, d.f32.data(), n, dim, d.q.data(), nq, out32.data());
      DotRowsMulti(DType::kF16, d.f16.data(), n, dim, d.q.data(), nq, out16.data());
      for (int j = 0; j < nq; ++j) {
        for (int64_t r = 0; r < n; ++r) {
          const float* q = &d.q[static_cast<size_t>(j) * dim];
          const float want32 = EmulatedDotAvx512(q, &d.f32[static_cast<size_t>(r) * dim], dim);
          const float want16 = EmulatedDotAvx512(q, &f16_rows[static_cast<size_t>(r) * dim], dim);
          ASSERT_EQ(0, std::memcmp(&want32, &out32[j * n + r], sizeof(float)))
              << "f32 dim " << dim << " nq " << nq << " query " << j << " row " << r;
          ASSERT_EQ(0, std::memcmp(&want16, &out16[j * n + r], sizeof(float)))
              << "f16 dim " << dim << " nq " << nq << " query " << j << " row " << r;
        }
      }
    }
  }
}

// A bulk build projects every key at once (ProjectF32): each output must be
// DotF32's bits (the trees a warm restart replays depend on them), for
// every dim (tails included), row counts around the 4-row block and several
// vectors, and nothing written past nx x nrows.
TEST_P(KernelsTest, ProjectF32GivesDotF32sBitsForEveryVectorAndRow) {
  for (int dim : AllDims()) {
    for (int nrows : {1, 3, 4, 5, 16, 17}) {
      const int64_t nx = 6;
      const Data d = MakeData(nrows, dim, static_cast<int>(nx), 700 + dim + nrows);
      std::vector<float> out(static_cast<size_t>(nx) * nrows + 1, NAN);
      ProjectF32(d.q.data(), nx, d.f32.data(), nrows, dim, out.data());
      for (int64_t x = 0; x < nx; ++x) {
        for (int r = 0; r < nrows; ++r) {
          const float one =
              DotF32(&d.q[static_cast<size_t>(x) * dim], &d.f32[static_cast<size_t>(r) * dim], dim);
          ASSERT_EQ(0, std::memcmp(&one, &out[static_cast<size_t>(x) * nrows + r], sizeof(float)))
              << "dim " << dim << " rows " << nrows << " x " << x << " row " << r;
        }
      }
      EXPECT_TRUE(std::isnan(out.back())) << "wrote past nx x nrows";
    }
  }
}

// Each (row, query) sum is accumulated the same way whatever the register
// block, so the query count must not change a single bit: nq = 3 reduces
// each accumulator on its own, nq = 4 and 8 eight at once (transposed).
TEST_P(KernelsTest, DotRowsMultiGivesTheSameBitsForEveryQueryCount) {
  if (GetParam() != "avx2") GTEST_SKIP() << "checked on the avx2 blocks";
  const int64_t n = 29;
  const int dim = 128;
  const Data d = MakeData(n, dim, 8, 4242);
  std::vector<float> one(n), many(n * 8);
  for (int nq : {1, 2, 3, 4, 8}) {
    DotRowsMulti(DType::kF32, d.f32.data(), n, dim, d.q.data(), nq, many.data());
    for (int j = 0; j < nq; ++j) {
      DotRowsMulti(DType::kF32, d.f32.data(), n, dim, &d.q[static_cast<size_t>(j) * dim], 1,
                   one.data());
      for (int64_t r = 0; r < n; ++r) {
        ASSERT_EQ(0, std::memcmp(&one[r], &many[j * n + r], sizeof(float)))
            << "nq " << nq << " query " << j << " row " << r;
      }
    }
  }
}

// The fused page pass (a 16-row page, 4 queries) must give the bits of the
// two steps it replaces, DotRowsMulti then PageQueryLogMass, for every dtype,
// dims with and without a tail, and scales from gentle to ones whose
// exponentials reach the -87 clamp, on both paths (AVX2: eight 2-row blocks,
// no fused pass for a dim with a scalar tail; AVX-512: four 4-row blocks, a
// masked dim tail).
TEST_P(KernelsTest, PageLogMass16x4IsDotRowsMultiThenPageQueryLogMass) {
  const int64_t n = 16;
  const int nq = 4;
  for (int dim : {1, 8, 16, 37, 128, 130}) {
    for (uint32_t seed = 0; seed < 24; ++seed) {
      const Data d = MakeData(n, dim, nq, 1300 + dim * 31 + seed);
      const struct {
        DType dtype;
        const void* rows;
      } cases[] = {
          {DType::kF16, d.f16.data()}, {DType::kBF16, d.bf16.data()}, {DType::kF32, d.f32.data()}};
      for (const auto& c : cases) {
        for (float scale : {0.0883883f, 1.0f, 40.0f}) {
          float fused[nq] = {NAN, NAN, NAN, NAN};
          float fused_max[nq] = {NAN, NAN, NAN, NAN};
          std::vector<float> fused_logits(static_cast<size_t>(nq) * n, NAN);
          const bool done = PageLogMass16x4(c.dtype, c.rows, dim, d.q.data(), scale, fused,
                                            fused_max, fused_logits.data());
          if (GetParam() == "avx2" && dim % 8 != 0) {
            EXPECT_FALSE(done) << "dim " << dim;
            for (float x : fused) EXPECT_TRUE(std::isnan(x)) << "wrote without a fused pass";
            for (float x : fused_logits) EXPECT_TRUE(std::isnan(x)) << "wrote without a fused pass";
            continue;
          }
          ASSERT_TRUE(done);
          std::vector<float> logits(static_cast<size_t>(nq) * n);
          float two_steps[nq];
          DotRowsMulti(c.dtype, c.rows, n, dim, d.q.data(), nq, logits.data());
          PageQueryLogMass(logits.data(), nq, static_cast<int>(n), static_cast<int>(n), scale,
                           two_steps);
          for (int j = 0; j < nq; ++j) {
            ASSERT_EQ(0, std::memcmp(&fused[j], &two_steps[j], sizeof(float)))
                << "dtype " << static_cast<int>(c.dtype) << " dim " << dim << " scale " << scale
                << " seed " << seed << " query " << j << ": " << fused[j] << " vs " << two_steps[j];
            // The largest scaled logit, and the logits themselves, as DotRowsMulti's.
            float want_max = -INFINITY;
            for (int64_t r = 0; r < n; ++r)
              want_max = std::max(want_max, logits[j * n + r] * scale);
            ASSERT_EQ(0, std::memcmp(&fused_max[j], &want_max, sizeof(float)))
                << "dim " << dim << " seed " << seed << " query " << j;
          }
          ASSERT_EQ(0,
                    std::memcmp(fused_logits.data(), logits.data(), logits.size() * sizeof(float)))
              << "dtype " << static_cast<int>(c.dtype) << " dim " << dim << " seed " << seed;
        }
      }
    }
  }
}

TEST(FirstGreaterTest, FindsTheFirstStrictlyGreaterOrN) {
  std::vector<float> x(41, 1.0f);
  EXPECT_EQ(FirstGreater(x.data(), 41, 1.0f), 41);  // equal is not greater
  for (int64_t at : {0, 7, 8, 15, 16, 31, 40}) {
    std::vector<float> y = x;
    y[at] = 2.0f;
    if (at + 3 < 41) y[at + 3] = 3.0f;
    EXPECT_EQ(FirstGreater(y.data(), 41, 1.5f), at);
    EXPECT_EQ(FirstGreater(y.data() + at + 1, 40 - at, 1.5f), at + 3 < 41 ? 2 : 40 - at);
  }
  EXPECT_EQ(FirstGreater(x.data(), 0, 0.0f), 0);
  x[20] = NAN;
  EXPECT_EQ(FirstGreater(x.data(), 41, 1.0f), 41);  // NaN is never greater
}

TEST(LaneMax8Test, EachLaneIsTheMaxOfItsResidues) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  for (int64_t n : {0, 3, 8, 15, 16, 17, 100, 257}) {
    std::vector<float> x(n);
    for (float& v : x) v = nd(rng);
    float lanes[8];
    LaneMax8(x.data(), n, lanes);
    for (int j = 0; j < 8; ++j) {
      float want = -INFINITY;
      for (int64_t i = j; i < n; i += 8) want = std::max(want, x[i]);
      EXPECT_EQ(lanes[j], want) << "n " << n << " lane " << j;
    }
  }
}

TEST_P(KernelsTest, EmptyInputsWriteNothingOrZeros) {
  float out[4] = {7, 7, 7, 7};
  const float q[1] = {1.0f};
  DotRows(DType::kF32, nullptr, 0, 16, q, out);
  DotRowsMulti(DType::kF16, nullptr, 0, 16, q, 1, out);
  EXPECT_EQ(out[0], 7.0f);
  EXPECT_EQ(DotF32(q, q, 0), 0.0f);
}

TEST_P(KernelsTest, UnalignedPointersAreFine) {
  const int dim = 37;
  const int64_t n = 5;
  const Data d = MakeData(n + 1, dim + 1, 3, 77);
  // Shift by one element so nothing is 16- or 32-byte aligned.
  std::vector<float> out(n * 3);
  DotRowsMulti(DType::kF16, d.f16.data() + 1, n, dim, d.q.data() + 1, 3, out.data());
  for (int j = 0; j < 3; ++j) {
    for (int64_t r = 0; r < n; ++r) {
      EXPECT_NEAR(out[j * n + r],
                  RefDotF16(d.q.data() + 1 + j * dim, d.f16.data() + 1 + r * dim, dim), Tol(dim));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, KernelsTest, ::testing::Values("avx2", "avx512"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

TEST(KernelIsaTest, UnknownNameIsRejectedAndChangesNothing) {
  const std::string before = KernelIsa();
  EXPECT_FALSE(ForceKernelIsa("sse2"));
  EXPECT_EQ(std::string(KernelIsa()), before);
}

}  // namespace
}  // namespace icecache
