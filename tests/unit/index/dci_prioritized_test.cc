#include "server/index/dci_prioritized.h"

#include <vector>

#include "gtest/gtest.h"
#include "server/index/mips.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/mdci_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

uint32_t BruteForceNearest(const std::vector<float>& pts, int n, int d, const float* q) {
  uint32_t best = 0;
  float bd = 1e30f;
  for (int i = 0; i < n; ++i) {
    float s = 0;
    for (int k = 0; k < d; ++k) s += (pts[i * d + k] - q[k]) * (pts[i * d + k] - q[k]);
    if (s < bd) {
      bd = s;
      best = i;
    }
  }
  return best;
}

TEST(PrioritizedDciTest, FindsTheTrueNearestNeighbourWithHighProbability) {
  const int n = 2000, d = 16;
  auto pts = mdci_test::ClusteredKeys(n, d, 40, 0.3f, 3);
  auto dci = PrioritizedDci::Create(pts.data(), n, d, DciParams{2, 7, 99});
  ASSERT_THAT(dci, IsOk());
  auto queries = mdci_test::ClusteredKeys(100, d, 40, 0.3f, 3 /* same centres */);
  // Perturb so that queries are not the points themselves.
  auto noise = mdci_test::GaussianRows(100, d, 0.1f, 5);
  for (size_t i = 0; i < queries.size(); ++i) queries[i] += noise[i];
  int hits = 0;
  int64_t total_visits = 0;
  std::vector<std::pair<float, uint32_t>> out;
  for (int i = 0; i < 100; ++i) {
    int64_t visits = 0;
    ASSERT_THAT((*dci)->Query(&queries[i * d], DciQueryParams{1, 100, 1 << 30}, &out, &visits),
                IsOk());
    ASSERT_EQ(out.size(), 1u);
    total_visits += visits;
    if (out[0].second == BruteForceNearest(pts, n, d, &queries[i * d])) ++hits;
  }
  EXPECT_GE(hits, 90);
  // It must not degenerate into a scan of every projection.
  EXPECT_LT(total_visits / 100, int64_t{2} * 14 * n / 3);
}

TEST(PrioritizedDciTest, MipsAugmentedFindsTheMaxInnerProductKey) {
  const int n = 1000, d = 8;
  auto keys = mdci_test::ClusteredKeys(n, d, 20, 0.5f, 11);
  auto mips = MipsAugmentation::Create(keys.data(), n, d, 1.2f, 0.02f);
  ASSERT_THAT(mips, IsOk());
  std::vector<float> aug(static_cast<size_t>(n) * (d + 1));
  for (int i = 0; i < n; ++i) mips->AugmentKey(&keys[i * d], &aug[i * (d + 1)]);
  auto dci = PrioritizedDci::Create(aug.data(), n, d + 1, DciParams{2, 7, 5});
  ASSERT_THAT(dci, IsOk());
  auto queries = mdci_test::GaussianRows(50, d, 1.0f, 12);
  int hits = 0;
  std::vector<float> qa(d + 1);
  std::vector<std::pair<float, uint32_t>> out;
  for (int j = 0; j < 50; ++j) {
    mips->AugmentQuery(&queries[j * d], qa.data());
    ASSERT_THAT((*dci)->Query(qa.data(), DciQueryParams{1, 300, 1 << 30}, &out), IsOk());
    int best = 0;
    float bd = -1e30f;
    for (int i = 0; i < n; ++i) {
      float s = 0;
      for (int k = 0; k < d; ++k) s += queries[j * d + k] * keys[i * d + k];
      if (s > bd) {
        bd = s;
        best = i;
      }
    }
    if (!out.empty() && static_cast<int>(out[0].second) == best) ++hits;
  }
  EXPECT_GE(hits, 45);
}

TEST(PrioritizedDciTest, DeterministicForTheSeedAndStopsOnBudgets) {
  const int n = 500, d = 8;
  auto pts = mdci_test::GaussianRows(n, d, 1.0f, 1);
  auto a = PrioritizedDci::Create(pts.data(), n, d, DciParams{2, 5, 42});
  auto b = PrioritizedDci::Create(pts.data(), n, d, DciParams{2, 5, 42});
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  std::vector<std::pair<float, uint32_t>> oa, ob;
  int64_t va = 0, vb = 0;
  ASSERT_THAT((*a)->Query(&pts[0], DciQueryParams{5, 20, 1 << 30}, &oa, &va), IsOk());
  ASSERT_THAT((*b)->Query(&pts[0], DciQueryParams{5, 20, 1 << 30}, &ob, &vb), IsOk());
  EXPECT_EQ(oa, ob);
  EXPECT_EQ(va, vb);
  ASSERT_EQ(oa.size(), 5u);
  EXPECT_EQ(oa[0].second, 0u);  // the point itself
  int64_t v = 0;
  ASSERT_THAT((*a)->Query(&pts[0], DciQueryParams{1, 1000, 50}, &oa, &v), IsOk());
  EXPECT_LE(v, 50);
}

TEST(PrioritizedDciTest, RejectsBadInput) {
  std::vector<float> p = {1, 2, 3, 4};
  EXPECT_THAT(PrioritizedDci::Create(p.data(), 0, 2, DciParams{}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(PrioritizedDci::Create(p.data(), 2, 2, DciParams{0, 7, 1}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(PrioritizedDci::Create(p.data(), 2, 2, DciParams{2, 256, 1}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  p[1] = INFINITY;
  EXPECT_THAT(PrioritizedDci::Create(p.data(), 2, 2, DciParams{}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  p[1] = 2;
  auto dci = PrioritizedDci::Create(p.data(), 2, 2, DciParams{});
  ASSERT_THAT(dci, IsOk());
  std::vector<std::pair<float, uint32_t>> out;
  EXPECT_THAT((*dci)->Query(p.data(), DciQueryParams{0, 10, 10}, &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT((*dci)->Query(p.data(), DciQueryParams{5, 2, 10}, &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace icecache
