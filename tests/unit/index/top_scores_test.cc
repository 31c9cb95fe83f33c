#include "server/index/top_scores.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace icecache {
namespace {

using ::testing::ElementsAreArray;
using ::testing::IsEmpty;

// The reference: sort every positive score (larger first, then the lower
// index) and keep the first `want`.
std::vector<uint32_t> Reference(const std::vector<float>& s, size_t want) {
  std::vector<uint32_t> idx;
  for (uint32_t i = 0; i < s.size(); ++i) {
    if (s[i] > 0.0f) idx.push_back(i);
  }
  std::sort(idx.begin(), idx.end(),
            [&](uint32_t a, uint32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
  if (idx.size() > want) idx.resize(want);
  std::sort(idx.begin(), idx.end());
  return idx;
}

std::vector<uint32_t> Top(const std::vector<float>& s, size_t want) {
  TopScoresScratch scratch;
  std::vector<uint32_t> out;
  TopPositiveScores(s.data(), static_cast<uint32_t>(s.size()), want, &scratch, &out);
  std::sort(out.begin(), out.end());
  return out;
}

TEST(TopScoresTest, MatchesAFullSortOnScoresSpanningManyOctaves) {
  std::mt19937 rng(7);
  std::normal_distribution<float> logit(0.0f, 4.0f);
  for (uint32_t n : {1u, 17u, 2048u, 8192u}) {
    std::vector<float> s(n);
    for (float& x : s) x = std::exp(logit(rng));
    for (size_t want : {size_t{1}, size_t{16}, size_t{128}, size_t{n}, size_t{n + 5}}) {
      EXPECT_THAT(Top(s, want), ElementsAreArray(Reference(s, want))) << n << " " << want;
    }
  }
}

TEST(TopScoresTest, ScoresCloseTogetherAndExactTiesGoToTheLowerIndex) {
  // Every score within 1% of the others, in 10 levels: many exact ties at
  // every boundary.
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> level(0, 9);
  std::vector<float> s(3000);
  for (float& x : s) x = 1.0f + 0.001f * static_cast<float>(level(rng));
  for (size_t want : {size_t{1}, size_t{100}, size_t{301}, size_t{2999}}) {
    EXPECT_THAT(Top(s, want), ElementsAreArray(Reference(s, want))) << want;
  }
}

TEST(TopScoresTest, ASampleThatMisleadsFallsBackToEveryPositiveScore) {
  // The sampled positions (every 16th of 8192) hold the only large scores:
  // every threshold the sample offers is cleared by 512 scores only, fewer
  // than the 1000 wanted, so the select falls back to every positive score.
  std::vector<float> s(8192);
  for (uint32_t i = 0; i < s.size(); ++i) {
    s[i] = i % 16 == 0 ? 100.0f : 1.0f / static_cast<float>(1 + i);
  }
  EXPECT_THAT(Top(s, 1000), ElementsAreArray(Reference(s, 1000)));
  EXPECT_THAT(Top(s, 600), ElementsAreArray(Reference(s, 600)));
}

TEST(TopScoresTest, ManyRandomShapesMatchTheFullSort) {
  // Scores correlated along the index (as pages of one topic are), with
  // zeros and ties, at sizes and budgets around the sampled path's bounds.
  std::mt19937 rng(3);
  std::normal_distribution<float> step(0.0f, 1.0f);
  std::uniform_int_distribution<uint32_t> size(1000, 9000);
  for (int trial = 0; trial < 60; ++trial) {
    const uint32_t n = size(rng);
    std::vector<float> s(n);
    float walk = 0.0f;
    for (uint32_t i = 0; i < n; ++i) {
      walk = 0.95f * walk + step(rng);
      s[i] = i % 97 == 5 ? 0.0f : std::exp(std::round(8.0f * walk) / 2.0f);
    }
    for (size_t want : {size_t{1}, size_t{n / 64}, size_t{n / 8}, size_t{n / 3}}) {
      EXPECT_THAT(Top(s, want), ElementsAreArray(Reference(s, want))) << n << " " << want;
    }
  }
}

TEST(TopScoresTest, NeverTakesZeroNegativeOrNanScores) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> s = {0.0f, -1.0f, nan, 3.0f, -0.0f, inf, 1e-30f, -inf, 2.0f};
  EXPECT_THAT(Top(s, 2), ElementsAreArray({3u, 5u}));
  // More wanted than there are positives: all of them, nothing else.
  EXPECT_THAT(Top(s, 100), ElementsAreArray({3u, 5u, 6u, 8u}));
  EXPECT_THAT(Top(std::vector<float>{0.0f, -2.0f, nan}, 3), IsEmpty());
}

TEST(TopScoresTest, WantingNothingOrScoringNothingAppendsNothing) {
  EXPECT_THAT(Top({1.0f, 2.0f}, 0), IsEmpty());
  EXPECT_THAT(Top({}, 4), IsEmpty());
}

TEST(TopScoresTest, AppendsAfterWhatTheOutputHolds) {
  TopScoresScratch scratch;
  std::vector<uint32_t> out = {99};
  const std::vector<float> s = {0.5f, 4.0f, 2.0f, 1.0f};
  TopPositiveScores(s.data(), 4, 2, &scratch, &out);
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0], 99u);
  std::sort(out.begin() + 1, out.end());
  EXPECT_THAT(std::vector<uint32_t>(out.begin() + 1, out.end()), ElementsAreArray({1u, 2u}));
  // The scratch is reused: a second call on other scores is not confused by it.
  std::vector<uint32_t> again;
  const std::vector<float> t = {3.0f, 0.0f, 1.0f};
  TopPositiveScores(t.data(), 3, 1, &scratch, &again);
  EXPECT_THAT(again, ElementsAreArray({0u}));
}

}  // namespace
}  // namespace icecache
