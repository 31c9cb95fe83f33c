#include "server/transfer/gather.h"

#include <cstring>
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

}  // namespace
}  // namespace icecache
