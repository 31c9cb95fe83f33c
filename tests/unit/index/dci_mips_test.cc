#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/index/mips.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/mdci_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

TEST(MipsAugmentationTest, DistanceIdentityRanksByInnerProduct) {
  const int d = 16;
  auto keys = mdci_test::GaussianRows(50, d, 1.0f, 7);
  auto q = mdci_test::GaussianRows(1, d, 2.0f, 8);
  auto mips = MipsAugmentation::Create(keys.data(), 50, d, 1.5f, 0.02f);
  ASSERT_THAT(mips, IsOk());
  const float M = mips->bound();
  std::vector<float> qa(d + 1), ka(d + 1);
  mips->AugmentQuery(q.data(), qa.data());
  double qn = 0.0;
  for (int k = 0; k < d; ++k) qn += q[k] * q[k];
  qn = std::sqrt(qn);
  for (int i = 0; i < 50; ++i) {
    mips->AugmentKey(&keys[i * d], ka.data());
    double dist2 = 0.0, dot = 0.0, kn2 = 0.0;
    for (int k = 0; k <= d; ++k) dist2 += (qa[k] - ka[k]) * (qa[k] - ka[k]);
    for (int k = 0; k < d; ++k) dot += q[k] * keys[i * d + k];
    for (int k = 0; k <= d; ++k) kn2 += ka[k] * ka[k];
    EXPECT_NEAR(kn2, static_cast<double>(M) * M, 1e-3 * M * M);  // on the sphere of radius M
    EXPECT_NEAR(dist2, 2.0 * M * M - 2.0 * (M / qn) * dot, 1e-3 * M * M) << i;
  }
}

TEST(MipsAugmentationTest, BoundIsHeadroomTimesMaxNorm) {
  std::vector<float> keys = {3, 4, 0, 1};  // norms 5 and 1
  auto mips = MipsAugmentation::Create(keys.data(), 2, 2, 1.5f, 0.1f);
  ASSERT_THAT(mips, IsOk());
  EXPECT_FLOAT_EQ(mips->bound(), 7.5f);
}

TEST(MipsAugmentationTest, CountsKeysOverTheBoundAndAsksForRebuild) {
  std::vector<float> prefill = {1, 0};
  auto mips = MipsAugmentation::Create(prefill.data(), 1, 2, 1.0f, 0.25f);
  ASSERT_THAT(mips, IsOk());
  std::vector<float> small = {0.5f, 0.5f}, big = {3.0f, 0.0f};
  for (int i = 0; i < 7; ++i) EXPECT_GT(mips->Augment(small.data()), 0.0f);
  EXPECT_FALSE(mips->NeedsRebuild());
  EXPECT_EQ(mips->Augment(big.data()), 0.0f);  // over the bound: coordinate 0
  EXPECT_EQ(mips->over_bound(), 1);
  EXPECT_EQ(mips->keys_seen(), 8);
  EXPECT_FALSE(mips->NeedsRebuild());  // 1/8 <= 0.25
  EXPECT_EQ(mips->Augment(big.data()), 0.0f);
  EXPECT_EQ(mips->Augment(big.data()), 0.0f);
  EXPECT_EQ(mips->over_bound(), 3);
  EXPECT_TRUE(mips->NeedsRebuild());  // 3/10 > 0.25
}

TEST(MipsAugmentationTest, RejectsBadParameters) {
  std::vector<float> k = {1, 2};
  EXPECT_THAT(MipsAugmentation::Create(k.data(), 0, 2, 1.5f, 0.02f),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(MipsAugmentation::Create(k.data(), 1, 2, 0.5f, 0.02f),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(MipsAugmentation::Create(k.data(), 1, 2, 1.5f, 1.5f),
              StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<float> bad = {NAN, 1};
  EXPECT_THAT(MipsAugmentation::Create(bad.data(), 1, 2, 1.5f, 0.02f),
              StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<float> zero = {0, 0};
  auto z = MipsAugmentation::Create(zero.data(), 1, 2, 1.5f, 0.02f);
  ASSERT_THAT(z, IsOk());
  EXPECT_GT(z->bound(), 0.0f);
}

// Create sums eight keys' squared norms interleaved: the bound must be the
// one of the plain sequential double sum key by key (bit for bit: the trees
// depend on it), for counts around the block of eight, and a non-finite key
// is named by its row wherever it sits in a block.
TEST(MipsAugmentationTest, BoundEqualsTheSequentialSumKeyByKey) {
  const int d = 37;
  for (int64_t n : {1, 7, 8, 9, 23, 64}) {
    auto keys = mdci_test::GaussianRows(static_cast<int>(n), d, 1.0f, static_cast<int>(n));
    keys[(n / 2) * d + 3] *= 40.0f;  // one long key anywhere
    double max_sq = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      double sq = 0.0;
      for (int c = 0; c < d; ++c) sq += static_cast<double>(keys[i * d + c]) * keys[i * d + c];
      max_sq = std::max(max_sq, sq);
    }
    auto want =
        MipsAugmentation::FromMaxNorm(static_cast<float>(std::sqrt(max_sq)), d, 1.5f, 0.02f);
    auto got = MipsAugmentation::Create(keys.data(), n, d, 1.5f, 0.02f);
    ASSERT_THAT(want, IsOk());
    ASSERT_THAT(got, IsOk());
    EXPECT_EQ(got->bound(), want->bound()) << "n " << n;
    for (int64_t bad : {int64_t{0}, n / 2, n - 1}) {
      std::vector<float> k = keys;
      k[bad * d + d - 1] = INFINITY;
      auto refused = MipsAugmentation::Create(k.data(), n, d, 1.5f, 0.02f);
      EXPECT_THAT(refused, StatusIs(absl::StatusCode::kInvalidArgument));
      EXPECT_NE(refused.status().message().find(absl::StrCat("key row ", bad, " ")),
                std::string::npos)
          << refused.status().message();
    }
  }
}

}  // namespace
}  // namespace icecache
