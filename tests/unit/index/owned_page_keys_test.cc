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
