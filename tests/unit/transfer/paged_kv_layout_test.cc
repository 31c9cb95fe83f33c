#include "server/transfer/paged_kv_layout.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/transfer/paged_kv_reference.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

PagedKvLayout Small(PagedKvFormat format, DType dtype = DType::kF16) {
  PagedKvLayout l;
  l.format = format;
  l.num_layers = 2;
  l.num_blocks = 7;
  l.block_tokens = 8;
  l.kv_heads = 3;
  l.head_dim = 4;
  l.dtype = dtype;
  if (format == PagedKvFormat::kCustom) testing::CustomHeadMajor(&l);
  return l;
}

uint64_t LayerBytes(const PagedKvLayout& l) {
  return 2ull * l.num_blocks * l.block_tokens * l.kv_heads * l.head_dim * DTypeSize(l.dtype);
}

TEST(PagedKvLayoutTest, PresetsSpanExactlyTheTensor) {
  for (PagedKvFormat f : {PagedKvFormat::kVllmFlash, PagedKvFormat::kFlashInferNhd,
                          PagedKvFormat::kFlashInferHnd, PagedKvFormat::kCustom}) {
    PagedKvLayout l = Small(f);
    const uint64_t layer = LayerBytes(l);
    auto r = ResolveKvLayout(l, 2 * layer);
    ASSERT_THAT(r, IsOk()) << PagedKvFormatName(f);
    EXPECT_EQ(r->extent_bytes, layer) << PagedKvFormatName(f);
    EXPECT_EQ(r->layer_base[1], layer);
    EXPECT_THAT(ResolveKvLayout(l, 2 * layer - 1),
                StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("past the buffer size")));
  }
}

TEST(PagedKvLayoutTest, EveryBadFieldIsNamed) {
  PagedKvLayout l = Small(PagedKvFormat::kVllmFlash);
  const uint64_t size = 1 << 20;
  l.head_dim = 0;
  EXPECT_THAT(ResolveKvLayout(l, size),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("paged_kv.head_dim")));
  l = Small(PagedKvFormat::kVllmFlash);
  l.num_blocks = 0;
  EXPECT_THAT(ResolveKvLayout(l, size),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("paged_kv.num_blocks")));
  l = Small(PagedKvFormat::kVllmFlash);
  l.layer_offsets_bytes = {0};
  EXPECT_THAT(ResolveKvLayout(l, size), StatusIs(absl::StatusCode::kInvalidArgument,
                                                 HasSubstr("layer_offsets_bytes must list")));
  l.layer_offsets_bytes = {0, size - 8};
  EXPECT_THAT(ResolveKvLayout(l, size),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("layer_offsets_bytes[1]")));
  l = Small(PagedKvFormat::kCustom);
  l.token_stride = 0;
  EXPECT_THAT(ResolveKvLayout(l, size),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("CUSTOM needs")));
  l = Small(PagedKvFormat::kVllmFlash);
  l.layer_stride = ~uint64_t{0} / 2;  // overflows past any buffer
  EXPECT_THAT(ResolveKvLayout(l, size),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("layer_stride")));
  l = Small(PagedKvFormat::kVllmFlash);
  l.format = static_cast<PagedKvFormat>(9);
  EXPECT_THAT(ResolveKvLayout(l, size),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("paged_kv.format")));
}

// A fetch of `pages[h]` (fills from `fills`) over `layers` layers from
// `first`, its staging filled with random bytes.
struct StagedFetch {
  FetchLayout layout;
  std::vector<uint8_t> staging;
};
StagedFetch Stage(const PagedKvLayout& l, int page_tokens, int first, int layers,
                  const std::vector<std::vector<uint32_t>>& pages,
                  const std::vector<std::vector<uint32_t>>& fills, uint32_t seed) {
  PageGeometry g{page_tokens, l.head_dim, l.dtype};
  auto layout = PlanFetchLayout(g, first, layers, pages, fills, 0, uint64_t{1} << 40);
  EXPECT_THAT(layout, IsOk());
  StagedFetch s{*layout, std::vector<uint8_t>(layout->total_bytes)};
  std::mt19937 rng(seed);
  for (uint8_t& b : s.staging) b = static_cast<uint8_t>(rng() | 1);  // never zero
  return s;
}

void CheckAgainstNaive(const PagedKvLayout& l, uint64_t size, int page_tokens, int first,
                       int layers, const std::vector<std::vector<uint32_t>>& pages,
                       const std::vector<std::vector<uint32_t>>& fills,
                       const std::vector<uint32_t>& blocks) {
  auto r = ResolveKvLayout(l, size);
  ASSERT_THAT(r, IsOk());
  StagedFetch f = Stage(l, page_tokens, first, layers, pages, fills, 7);
  auto plan = PlanScatter(*r, f.layout, blocks);
  ASSERT_THAT(plan, IsOk());
  std::vector<uint8_t> dst(size, 0xAB);  // sentinel: bytes no task may touch
  const std::vector<uint8_t> want =
      testing::NaiveScatter(l, r->layer_base, f.layout, blocks, f.staging.data(), dst);
  ScatterOnHost(plan->geometry, plan->tasks.data(), plan->tasks.size(), f.staging.data(),
                dst.data());
  ASSERT_EQ(dst.size(), want.size());
  size_t first_diff = 0;
  while (first_diff < dst.size() && dst[first_diff] == want[first_diff]) ++first_diff;
  EXPECT_EQ(first_diff, dst.size())
      << PagedKvFormatName(l.format) << " " << DTypeName(l.dtype) << ": first wrong byte";
}

TEST(PagedKvScatterTest, MatchesNaiveReferenceOnEveryLayout) {
  // Head 1 has fewer pages than blocks (its last block is zero), fills are
  // partial, page_tokens 6 < block_tokens 8 (rows 6, 7 zero).
  const std::vector<std::vector<uint32_t>> pages = {{3, 0, 5}, {1, 2}, {4, 4, 0}};
  const std::vector<std::vector<uint32_t>> fills = {{6, 2, 6}, {1, 6}, {6, 6, 0}};
  const std::vector<uint32_t> blocks = {5, 0, 3};
  for (DType dt : {DType::kF16, DType::kBF16, DType::kF32}) {
    for (PagedKvFormat f : {PagedKvFormat::kVllmFlash, PagedKvFormat::kFlashInferNhd,
                            PagedKvFormat::kFlashInferHnd, PagedKvFormat::kCustom}) {
      // All-layer tensor with a gap between layers and a base offset.
      PagedKvLayout l = Small(f, dt);
      l.first_layer = 4;
      l.base_offset_bytes = 256;
      l.layer_stride = LayerBytes(l) / DTypeSize(dt) + 64;
      const uint64_t size = 256 + 2 * (LayerBytes(l) + 64 * DTypeSize(dt));
      CheckAgainstNaive(l, size, 6, 4, 2, pages, fills, blocks);
      // Per-layer tensors, out of order in the allocation.
      PagedKvLayout p = Small(f, dt);
      p.layer_offsets_bytes = {LayerBytes(p) + 512, 128};
      CheckAgainstNaive(p, 2 * LayerBytes(p) + 512, 8, 1, 1, pages, {{8, 8, 3}, {8, 5}, {8, 8, 8}},
                        blocks);
    }
  }
}

TEST(PagedKvScatterTest, CopyWordFollowsAlignment) {
  PagedKvLayout l = Small(PagedKvFormat::kVllmFlash, DType::kF32);  // rows of 16 bytes
  auto r = ResolveKvLayout(l, 2 * LayerBytes(l));
  ASSERT_THAT(r, IsOk());
  StagedFetch f = Stage(l, 8, 0, 1, {{0}, {1}, {2}}, {{8}, {8}, {8}}, 1);
  auto plan = PlanScatter(*r, f.layout, {2});
  ASSERT_THAT(plan, IsOk());
  EXPECT_EQ(plan->geometry.word_bytes, 16u);
  l.dtype = DType::kF16;  // rows of 8 bytes
  r = ResolveKvLayout(l, 2 * LayerBytes(l));
  f = Stage(l, 8, 0, 1, {{0}, {1}, {2}}, {{8}, {8}, {8}}, 1);
  plan = PlanScatter(*r, f.layout, {2});
  ASSERT_THAT(plan, IsOk());
  EXPECT_EQ(plan->geometry.word_bytes, 8u);
}

TEST(PagedKvScatterTest, BadBlockTablesAreRefusedNamingTheEntry) {
  PagedKvLayout l = Small(PagedKvFormat::kVllmFlash);
  auto r = ResolveKvLayout(l, 2 * LayerBytes(l));
  ASSERT_THAT(r, IsOk());
  StagedFetch f = Stage(l, 8, 0, 1, {{0, 1}, {1, 2}, {2, 3}}, {{8, 8}, {8, 8}, {8, 8}}, 1);
  EXPECT_THAT(PlanScatter(*r, f.layout, {1, 7}),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("block_ids[1] = 7")));
  EXPECT_THAT(PlanScatter(*r, f.layout, {2, 2}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("block_ids[1] = 2 repeats")));
  EXPECT_THAT(PlanScatter(*r, f.layout, {2}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("kv head 0 has 2 pages")));
  EXPECT_THAT(PlanScatter(*r, f.layout, {}), StatusIs(absl::StatusCode::kInvalidArgument));
  StagedFetch far = Stage(l, 8, 2, 1, {{0}, {1}, {2}}, {{8}, {8}, {8}}, 1);
  EXPECT_THAT(PlanScatter(*r, far.layout, {0}),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("layers 0..1")));
  PagedKvLayout wide = l;
  wide.head_dim = 8;
  auto rw = ResolveKvLayout(wide, 4 * LayerBytes(l));
  ASSERT_THAT(rw, IsOk());
  EXPECT_THAT(PlanScatter(*rw, f.layout, {0, 1}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("head_dim 8")));
  StagedFetch big = Stage(wide, 16, 0, 1, {{0}, {1}, {2}}, {{8}, {8}, {8}}, 1);
  EXPECT_THAT(PlanScatter(*rw, big.layout, {0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("block_tokens 8")));
}

}  // namespace
}  // namespace icecache
