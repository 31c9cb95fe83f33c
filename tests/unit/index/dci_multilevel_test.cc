#include "server/index/dci_multilevel.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/mdci_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using Hits = std::vector<std::pair<float, uint32_t>>;

// Naive reference: the k nearest points by squared distance.
std::vector<uint32_t> BruteForceKnn(const std::vector<float>& pts, int n, int d, const float* q,
                                    int k) {
  std::vector<std::pair<float, uint32_t>> all;
  for (int i = 0; i < n; ++i) {
    float s = 0;
    for (int c = 0; c < d; ++c) s += (pts[i * d + c] - q[c]) * (pts[i * d + c] - q[c]);
    all.push_back({s, static_cast<uint32_t>(i)});
  }
  std::sort(all.begin(), all.end());
  std::vector<uint32_t> ids;
  for (int i = 0; i < k; ++i) ids.push_back(all[i].second);
  return ids;
}

TEST(MultiLevelDciTest, ExpandingEveryNodeIsExactKnn) {
  const int n = 3000, d = 16, k = 10;
  auto pts = mdci_test::ClusteredKeys(n, d, 40, 0.3f, 3);
  auto dci = MultiLevelDci::Create(pts.data(), n, d, MultiLevelDciParams{2, 7, 3, 99});
  ASSERT_THAT(dci, IsOk());
  EXPECT_EQ((*dci)->levels(), 3);
  auto queries = mdci_test::GaussianRows(20, d, 1.0f, 5);
  Hits out;
  for (int i = 0; i < 20; ++i) {
    MultiLevelDci::Stats st;
    // cover = n: every node is expanded; k above any cell's size: every
    // point of every expanded cell becomes a candidate.
    ASSERT_THAT((*dci)->Query(&queries[i * d], MultiLevelDciQuery{n, 10, n}, &out, &st), IsOk());
    EXPECT_EQ(st.distances, n);
    ASSERT_EQ(out.size(), static_cast<size_t>(n));
    const std::vector<uint32_t> want = BruteForceKnn(pts, n, d, &queries[i * d], k);
    for (int j = 0; j < k; ++j) EXPECT_EQ(out[j].second, want[j]) << "query " << i << " rank " << j;
  }
}

TEST(MultiLevelDciTest, DescentFindsMostNearestNeighboursAndTouchesFewPoints) {
  const int n = 8000, d = 16, k = 10;
  auto pts = mdci_test::ClusteredKeys(n, d, 40, 0.3f, 3);
  auto dci = MultiLevelDci::Create(pts.data(), n, d, MultiLevelDciParams{2, 7, 3, 7});
  ASSERT_THAT(dci, IsOk());
  auto queries = mdci_test::ClusteredKeys(50, d, 40, 0.3f, 3 /* same centres */);
  auto noise = mdci_test::GaussianRows(50, d, 0.1f, 5);
  for (size_t i = 0; i < queries.size(); ++i) queries[i] += noise[i];
  int found = 0;
  int64_t distances = 0;
  Hits out;
  for (int i = 0; i < 50; ++i) {
    MultiLevelDci::Stats st;
    ASSERT_THAT((*dci)->Query(&queries[i * d], MultiLevelDciQuery{k, 10, 4 * k}, &out, &st),
                IsOk());
    distances += st.distances;
    const std::vector<uint32_t> want = BruteForceKnn(pts, n, d, &queries[i * d], k);
    const std::set<uint32_t> got_ids = [&] {
      std::set<uint32_t> s;
      for (const auto& h : out) s.insert(h.second);
      return s;
    }();
    for (uint32_t w : want) found += got_ids.count(w);
  }
  EXPECT_GE(found, 50 * k * 6 / 10);
  // The descent must not degenerate into scoring every point.
  EXPECT_LT(distances / 50, n / 4);
}

TEST(MultiLevelDciTest, OneLevelIsAFlatPrioritizedDci) {
  const int n = 200, d = 8;
  auto pts = mdci_test::GaussianRows(n, d, 1.0f, 11);
  auto dci = MultiLevelDci::Create(pts.data(), n, d, MultiLevelDciParams{2, 7, 1, 3});
  ASSERT_THAT(dci, IsOk());
  EXPECT_EQ((*dci)->levels(), 1);
  Hits out;
  // k = n: the walk exhausts the lists, every point is a candidate.
  ASSERT_THAT((*dci)->Query(pts.data(), MultiLevelDciQuery{n, 1, 0}, &out), IsOk());
  EXPECT_EQ(out.size(), static_cast<size_t>(n));
  EXPECT_EQ(out[0].second, 0u);
  // |p|^2 - 2 q.p + |q|^2 of a point with itself: zero up to the rounding of
  // the SIMD dot against the norms (not exactly zero for every compiler and
  // flag set: the test's points come out of code built at the tests' -O).
  EXPECT_NEAR(out[0].first, 0.0f, 1e-5f);
}

TEST(MultiLevelDciTest, BadInputsNameTheField) {
  const int d = 4;
  std::vector<float> pts(10 * d, 1.0f);
  EXPECT_THAT(
      MultiLevelDci::Create(pts.data(), 10, d, MultiLevelDciParams{2, 7, 0, 1}).status(),
      StatusIs(absl::StatusCode::kInvalidArgument, "DCI num_levels must be in [1, 16], got 0"));
  EXPECT_THAT(MultiLevelDci::Create(pts.data(), 0, d, MultiLevelDciParams{}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "multi-level DCI needs 1 <= points < 2^31, got 0"));
  pts[5] = NAN;
  EXPECT_THAT(MultiLevelDci::Create(pts.data(), 10, d, MultiLevelDciParams{}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "DCI point 1 column 1 is not finite"));
  pts[5] = 1.0f;
  auto dci = MultiLevelDci::Create(pts.data(), 10, d, MultiLevelDciParams{});
  ASSERT_THAT(dci, IsOk());
  Hits out;
  EXPECT_THAT((*dci)->Query(pts.data(), MultiLevelDciQuery{0, 10, 1}, &out),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       "DCI query needs k >= 1, field_of_view >= 1 and cover >= 0, got 0, 10, 1"));
}

}  // namespace
}  // namespace icecache
