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

// The structure of a build (levels, parents, directions) gives back the
// same index over the same points: the same answers and costs.
TEST(MultiLevelDciTest, FromStructureAnswersLikeTheBuild) {
  const int n = 4000, d = 16;
  auto pts = mdci_test::ClusteredKeys(n, d, 40, 0.3f, 3);
  const MultiLevelDciParams params{2, 7, 3, 99};
  auto built = MultiLevelDci::Create(pts.data(), n, d, params);
  ASSERT_THAT(built, IsOk());
  auto again = MultiLevelDci::FromStructure(pts.data(), n, d, params, (*built)->structure());
  ASSERT_THAT(again, IsOk());
  EXPECT_EQ((*again)->levels(), (*built)->levels());
  EXPECT_EQ((*again)->bytes(), (*built)->bytes());
  auto queries = mdci_test::GaussianRows(30, d, 1.0f, 8);
  Hits a, b;
  for (int i = 0; i < 30; ++i) {
    MultiLevelDci::Stats sa, sb;
    const MultiLevelDciQuery q{10, 4, 200};
    ASSERT_THAT((*built)->Query(&queries[i * d], q, &a, &sa), IsOk());
    ASSERT_THAT((*again)->Query(&queries[i * d], q, &b, &sb), IsOk());
    EXPECT_EQ(a, b) << "query " << i;
    EXPECT_EQ(sa.projections, sb.projections);
    EXPECT_EQ(sa.distances, sb.distances);
  }
}

TEST(MultiLevelDciTest, FromStructureRefusesAnInconsistentStructure) {
  const int n = 500, d = 8;
  auto pts = mdci_test::ClusteredKeys(n, d, 10, 0.3f, 3);
  const MultiLevelDciParams params{2, 7, 3, 5};
  auto built = MultiLevelDci::Create(pts.data(), n, d, params);
  ASSERT_THAT(built, IsOk());
  const MultiLevelDci::Structure good = (*built)->structure();
  int top_point = -1, low_point = -1;
  for (int i = 0; i < n; ++i) {
    if (good.parents[i] < 0) top_point = i;
    if (good.levels[i] == 0) low_point = i;
  }
  ASSERT_GE(top_point, 0);
  ASSERT_GE(low_point, 0);
  std::vector<std::pair<const char*, MultiLevelDci::Structure>> bad(7, {"", good});
  bad[0].first = "level";
  bad[0].second.levels[low_point] = 3;
  bad[1].first = "parent";
  bad[1].second.parents[low_point] = n;
  bad[2].first = "parent";
  bad[2].second.parents[low_point] = low_point;  // not one level up
  bad[3].first = "parent";
  bad[3].second.parents[top_point] = 0;  // the top has none
  bad[4].first = "unit";
  bad[4].second.directions[3] *= 2.0f;
  bad[5].first = "finite";
  bad[5].second.directions[0] = NAN;
  bad[6].first = "sizes";
  bad[6].second.parents.pop_back();
  for (const auto& [what, st] : bad) {
    EXPECT_THAT(MultiLevelDci::FromStructure(pts.data(), n, d, params, st),
                StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr(what)));
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
