#include "server/index/owned_page_keys.h"

#include <vector>

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

TEST(OwnedPageKeysTest, AppliesPlacementsInAnyOrderAndReadsBack) {
  auto f = OwnedPageKeys::Create(3, DType::kF32, 2, /*with_values=*/true);
  ASSERT_THAT(f, IsOk());
  OwnedPageKeys& frames = **f;
  const float keys[] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  const float values[] = {-1, -2, -3, -4, -5, -6, -7, -8, -9};
  // Out of order, page 1 before page 0, one page left half full.
  ASSERT_THAT(frames.Apply({{1, 1}, {0, 0}, {1, 0}}, keys, values), IsOk());
  EXPECT_EQ(frames.num_pages(), 2u);
  const float* page1 = static_cast<const float*>(frames.page_keys(1));
  EXPECT_EQ(page1[0], 7.0f);  // slot 0 <- row 2
  EXPECT_EQ(page1[3], 1.0f);  // slot 1 <- row 0
  float out[3];
  ASSERT_THAT(frames.ReadKey({0, 0}, out), IsOk());
  EXPECT_EQ(out[0], 4.0f);
  ASSERT_THAT(frames.ReadValue({1, 1}, out), IsOk());
  EXPECT_EQ(out[2], -3.0f);
  EXPECT_EQ(frames.bytes(), 2u * 2 * (2 * 3 * 4));
  EXPECT_EQ(frames.page_keys(2), nullptr);
}

TEST(OwnedPageKeysTest, StoresTheConfiguredDtype) {
  auto f = OwnedPageKeys::Create(2, DType::kF16, 4);
  ASSERT_THAT(f, IsOk());
  const float keys[] = {1.0f, -2.5f};
  ASSERT_THAT((*f)->Apply({{0, 3}}, keys), IsOk());
  const uint16_t* raw = static_cast<const uint16_t*>((*f)->page_keys(0));
  EXPECT_EQ(raw[6], 0x3c00);  // 1.0 in fp16
  EXPECT_EQ(raw[7], 0xc100);  // -2.5 in fp16
  EXPECT_EQ(raw[0], 0);       // untouched slots are zero
}

TEST(OwnedPageKeysTest, PagePointersStayValidAsPagesAreAdded) {
  auto f = OwnedPageKeys::Create(4, DType::kBF16, 1);
  ASSERT_THAT(f, IsOk());
  const float k[] = {1, 2, 3, 4};
  ASSERT_THAT((*f)->Apply({{0, 0}}, k), IsOk());
  const void* first = (*f)->page_keys(0);
  for (uint32_t p = 1; p < 100; ++p) ASSERT_THAT((*f)->Apply({{p, 0}}, k), IsOk());
  EXPECT_EQ((*f)->page_keys(0), first);
}

TEST(OwnedPageKeysTest, PagesSitInIdOrderAcrossSlabsAndKeepTheirKeys) {
  // 4 KiB pages: 512 to a 2 MiB slab; 1100 pages span three slabs.
  const int d = 128, P = 16;
  auto f = OwnedPageKeys::Create(d, DType::kF16, P);
  ASSERT_THAT(f, IsOk());
  const uint32_t pages = 1100;
  std::vector<float> keys(static_cast<size_t>(pages) * d);
  std::vector<Placement> at(pages);
  for (uint32_t p = 0; p < pages; ++p) {
    keys[static_cast<size_t>(p) * d] = static_cast<float>(p);
    at[p] = {p, static_cast<uint32_t>(p % P)};
  }
  ASSERT_THAT((*f)->Apply(at, keys.data()), IsOk());
  const size_t page_bytes = static_cast<size_t>(P) * d * 2;
  size_t adjacent = 0;
  for (uint32_t p = 0; p < pages; ++p) {
    float out[d];
    ASSERT_THAT((*f)->ReadKey(at[p], out), IsOk());
    EXPECT_EQ(out[0], static_cast<float>(p));
    if (p + 1 < pages) {
      const auto* a = static_cast<const char*>((*f)->page_keys(p));
      const auto* b = static_cast<const char*>((*f)->page_keys(p + 1));
      adjacent += b == a + page_bytes;
    }
  }
  EXPECT_EQ(adjacent, pages - 3u);  // all but the two slab boundaries (and the last page)

  // 1 MiB pages (the largest: 256 x 1024 fp32), two to a slab.
  auto big = OwnedPageKeys::Create(1024, DType::kF32, 256);
  ASSERT_THAT(big, IsOk());
  std::vector<float> row(1024, 2.0f);
  for (uint32_t p = 0; p < 5; ++p) ASSERT_THAT((*big)->Apply({{p, 255}}, row.data()), IsOk());
  for (uint32_t p = 0; p < 5; ++p) {
    const float* k = static_cast<const float*>((*big)->page_keys(p));
    EXPECT_EQ(k[0], 0.0f);                  // a new page starts zeroed
    EXPECT_EQ(k[255 * 1024 + 1023], 2.0f);  // its last slot was written
  }
}

TEST(OwnedPageKeysTest, BadInputsChangeNothing) {
  EXPECT_THAT(OwnedPageKeys::Create(0, DType::kF16, 16),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(OwnedPageKeys::Create(8, DType::kF16, 257),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(OwnedPageKeys::Create(8, static_cast<DType>(0), 16),
              StatusIs(absl::StatusCode::kInvalidArgument));
  auto f = OwnedPageKeys::Create(2, DType::kF32, 2, /*with_values=*/true);
  ASSERT_THAT(f, IsOk());
  const float k[] = {1, 2, 3, 4};
  EXPECT_THAT((*f)->Apply({{0, 0}}, k, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT((*f)->Apply({{0, 0}, {0, 2}}, k, k), StatusIs(absl::StatusCode::kInvalidArgument));
  // A batch of 2 may open pages 0 and 1, not 2.
  EXPECT_THAT((*f)->Apply({{0, 0}, {2, 0}}, k, k), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ((*f)->num_pages(), 0u);
  float out[2];
  EXPECT_THAT((*f)->ReadKey({0, 0}, out), StatusIs(absl::StatusCode::kOutOfRange));
  auto no_values = OwnedPageKeys::Create(2, DType::kF32, 2);
  ASSERT_THAT((*no_values)->Apply({{0, 0}}, k), IsOk());
  EXPECT_THAT((*no_values)->ReadValue({0, 0}, out),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ((*no_values)->page_values(0), nullptr);
}

}  // namespace
}  // namespace icecache
