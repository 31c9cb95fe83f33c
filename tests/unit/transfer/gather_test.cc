#include "server/transfer/gather.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(GatherTest, LayoutFollowsTheDocumentedFormula) {
  PageGeometry g{4, 8, DType::kF16};
  EXPECT_EQ(g.frame_bytes(), 2u * 4 * 8 * 2);
  std::vector<std::vector<uint32_t>> pages = {{5, 1}, {}, {7, 7, 0}};
  std::vector<std::vector<uint32_t>> fills = {{4, 2}, {}, {1, 1, 4}};
  auto l = PlanFetchLayout(g, 3, 2, pages, fills, 1000, 1000 + 2 * 5 * 128);
  ASSERT_THAT(l, IsOk());
  EXPECT_EQ(l->frame_bytes, 128u);
  EXPECT_EQ(l->total_slots(), 5u);
  EXPECT_EQ(l->layer_stride_bytes, 5u * 128);
  EXPECT_EQ(l->total_bytes, 2u * 5 * 128);
  EXPECT_EQ(l->first_layer, 3);
  ASSERT_EQ(l->heads.size(), 3u);
  EXPECT_TRUE(l->heads[1].slots.empty());
  const FetchSlot& s = l->heads[2].slots[1];
  EXPECT_EQ(s.page, 7u);
  EXPECT_EQ(s.slot, 3u);
  EXPECT_EQ(s.fill, 1u);
  EXPECT_EQ(s.byte_offset, 1000u + 3 * 128);
  EXPECT_EQ(l->heads[0].slots[1].byte_offset, 1000u + 128);
}

TEST(GatherTest, RegionMustFitTheBuffer) {
  PageGeometry g{16, 128, DType::kBF16};
  std::vector<std::vector<uint32_t>> pages = {{0, 1}};
  std::vector<std::vector<uint32_t>> fills = {{16, 16}};
  const uint64_t need = 2 * g.frame_bytes();
  EXPECT_THAT(PlanFetchLayout(g, 0, 1, pages, fills, 0, need), IsOk());
  EXPECT_THAT(PlanFetchLayout(g, 0, 1, pages, fills, 1, need),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("exceeds buffer size")));
  EXPECT_THAT(PlanFetchLayout(g, 0, 1, pages, fills, need + 1, need),
              StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(PlanFetchLayout(g, 0, 1 << 30, pages, fills, 0, ~uint64_t{0}), IsOk());
  EXPECT_THAT(PlanFetchLayout(g, 0, 2'000'000'000, pages, fills, ~uint64_t{0} - 5, ~uint64_t{0}),
              StatusIs(absl::StatusCode::kOutOfRange));
}

TEST(GatherTest, RejectsMalformedRequests) {
  PageGeometry g{16, 64, DType::kF32};
  EXPECT_THAT(PlanFetchLayout(g, 0, 0, {{}}, {{}}, 0, 1 << 20),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_layers")));
  EXPECT_THAT(PlanFetchLayout(g, 0, 1, {{1}}, {}, 0, 1 << 20),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(PlanFetchLayout(g, 0, 1, {{1}}, {{17}}, 0, 1 << 20),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("fill")));
  EXPECT_THAT(PlanFetchLayout(PageGeometry{0, 64, DType::kF32}, 0, 1, {{}}, {{}}, 0, 1 << 20),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(GatherTest, GatherFramesCopiesInOrder) {
  std::vector<uint8_t> a(64, 1), b(64, 2), c(64, 3);
  const uint8_t* frames[] = {c.data(), a.data(), b.data(), c.data()};
  std::vector<uint8_t> dst(4 * 64, 0);
  GatherFrames(frames, 4, 64, dst.data());
  EXPECT_EQ(dst[0], 3);
  EXPECT_EQ(dst[64], 1);
  EXPECT_EQ(dst[128 + 63], 2);
  EXPECT_EQ(dst[255], 3);
}

// A 64-byte aligned buffer of `n` bytes filled with `fill`.
std::unique_ptr<uint8_t, decltype(&std::free)> Aligned(size_t n, uint8_t fill) {
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(64, (n + 63) / 64 * 64));
  std::memset(p, fill, n);
  return {p, &std::free};
}

// Any destination alignment and any frame or row size: the bytes land where
// the layout says, and nothing outside the destination is written.
TEST(GatherTest, GatherFramesGivesTheSameBytesAlignedOrNot) {
  for (const uint64_t frame : {uint64_t{8192}, uint64_t{192}, uint64_t{100}, uint64_t{64}}) {
    std::vector<std::vector<uint8_t>> src(5, std::vector<uint8_t>(frame));
    for (size_t f = 0; f < src.size(); ++f) {
      std::iota(src[f].begin(), src[f].end(), static_cast<uint8_t>(17 * f + 1));
    }
    const uint8_t* frames[] = {src[3].data(), src[0].data(), src[4].data(), src[1].data()};
    for (const size_t shift : {size_t{0}, size_t{8}, size_t{32}, size_t{64}}) {
      const size_t n = shift + 4 * frame + 64;
      auto buf = Aligned(n, 0xEE);
      GatherFrames(frames, 4, frame, buf.get() + shift);
      for (size_t i = 0; i < 4; ++i) {
        ASSERT_EQ(std::memcmp(buf.get() + shift + i * frame, frames[i], frame), 0)
            << "frame " << i << " of " << frame << " bytes at shift " << shift;
      }
      for (size_t b = 0; b < shift; ++b) ASSERT_EQ(buf.get()[b], 0xEE);
      for (size_t b = shift + 4 * frame; b < n; ++b) ASSERT_EQ(buf.get()[b], 0xEE);
    }
  }
}

TEST(GatherTest, GatherRowsPacksTokensAndZeroesTheRestAlignedOrNot) {
  const int page_tokens = 4;
  for (const uint64_t row : {uint64_t{256}, uint64_t{128}, uint64_t{160}, uint64_t{64}}) {
    const uint64_t block = page_tokens * row;
    // Three source frames (K block, then V block), bytes numbered.
    std::vector<std::vector<uint8_t>> frames(3, std::vector<uint8_t>(2 * block));
    for (size_t f = 0; f < frames.size(); ++f) {
      std::iota(frames[f].begin(), frames[f].end(), static_cast<uint8_t>(31 * f + 5));
    }
    const RowSource rows[] = {{frames[2].data(), 1}, {frames[0].data(), 3}, {frames[1].data(), 0},
                              {frames[0].data(), 0}, {frames[2].data(), 2}, {frames[1].data(), 3},
                              {frames[0].data(), 1}};
    const size_t count = sizeof(rows) / sizeof(rows[0]);  // two slots, the second one short
    for (const size_t shift : {size_t{0}, size_t{8}, size_t{64}}) {
      for (const int ahead : {0, 8}) {
        const size_t bytes = 2 * 2 * block;
        auto buf = Aligned(shift + bytes + 64, 0xEE);
        uint8_t* dst = buf.get() + shift;
        GatherRows(rows, count, page_tokens, row, dst, ahead);
        for (size_t i = 0; i < 2 * page_tokens; ++i) {
          const uint8_t* k = dst + (i / page_tokens) * 2 * block + (i % page_tokens) * row;
          if (i < count) {
            const uint8_t* sk = rows[i].frame + rows[i].slot * row;
            ASSERT_EQ(std::memcmp(k, sk, row), 0) << "K of token " << i << ", row " << row;
            ASSERT_EQ(std::memcmp(k + block, sk + block, row), 0) << "V of token " << i;
          } else {
            for (uint64_t b = 0; b < row; ++b) ASSERT_EQ(k[b] | k[block + b], 0) << "token " << i;
          }
        }
        for (size_t b = 0; b < shift; ++b) ASSERT_EQ(buf.get()[b], 0xEE);
        for (size_t b = shift + bytes; b < shift + bytes + 64; ++b) ASSERT_EQ(buf.get()[b], 0xEE);
      }
    }
  }
}

// The in-place form: only the listed tokens are written, each to its packed
// row; every other row is left as it was, but the rows past `total` in the
// last slot are zeroed.
TEST(GatherTest, GatherRowsToWritesOnlyItsRowsAndZeroesPastTheTotal) {
  const int page_tokens = 4;
  const uint64_t row = 128, block = page_tokens * row;
  std::vector<std::vector<uint8_t>> frames(2, std::vector<uint8_t>(2 * block));
  for (size_t f = 0; f < frames.size(); ++f) {
    std::iota(frames[f].begin(), frames[f].end(), static_cast<uint8_t>(17 * f + 3));
  }
  const RowSource rows[] = {{frames[1].data(), 2}, {frames[0].data(), 0}, {frames[1].data(), 3}};
  const uint32_t to[] = {5, 0, 2};
  const size_t total = 6;  // two slots, the second holding rows 4 and 5
  for (const int ahead : {0, 8}) {
    const size_t bytes = 2 * 2 * block;
    auto buf = Aligned(bytes, 0xEE);
    GatherRowsTo(rows, to, 3, total, page_tokens, row, buf.get(), ahead);
    for (uint32_t r = 0; r < 2 * page_tokens; ++r) {
      const uint8_t* k = buf.get() + (r / page_tokens) * 2 * block + (r % page_tokens) * row;
      const auto it = std::find(std::begin(to), std::end(to), r);
      if (it != std::end(to)) {
        const RowSource& src = rows[it - std::begin(to)];
        const uint8_t* sk = src.frame + src.slot * row;
        ASSERT_EQ(std::memcmp(k, sk, row), 0) << "K of row " << r;
        ASSERT_EQ(std::memcmp(k + block, sk + block, row), 0) << "V of row " << r;
      } else {
        const uint8_t want = r >= total ? 0 : 0xEE;
        for (uint64_t b = 0; b < row; ++b) {
          ASSERT_EQ(k[b], want) << "K of row " << r;
          ASSERT_EQ(k[block + b], want) << "V of row " << r;
        }
      }
    }
  }
}

}  // namespace
}  // namespace icecache
