#include "server/index/page_select.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace icecache {
namespace {

using ::testing::ElementsAre;

double RefMassScore(const std::vector<std::vector<double>>& logits, double scale) {
  double best = -INFINITY;
  for (const auto& row : logits) {
    double s = 0;
    for (double l : row) s += std::exp(l * scale);
    best = std::max(best, std::log(s));
  }
  return best;
}

TEST(PageMassScoreTest, MatchesLogSumExpMaxOverQueries) {
  std::mt19937 rng(5);
  std::normal_distribution<float> g(0.0f, 3.0f);
  for (int nq : {1, 2, 4, 8}) {
    for (int fill : {1, 2, 7, 16, 64}) {
      const int stride = fill + 3;  // rows need not be packed
      std::vector<float> logits(static_cast<size_t>(nq) * stride, 1e30f);
      std::vector<std::vector<double>> ref(nq);
      for (int j = 0; j < nq; ++j) {
        for (int i = 0; i < fill; ++i) {
          logits[j * stride + i] = g(rng);
          ref[j].push_back(logits[j * stride + i]);
        }
      }
      const float scale = 0.125f;
      EXPECT_NEAR(PageMassScore(logits.data(), nq, fill, stride, scale), RefMassScore(ref, scale),
                  1e-4)
          << nq << " " << fill;
    }
  }
}

TEST(PageMassScoreTest, AccurateOverWideLogitRangesAndOddFills) {
  // The vectorised exp must hold its accuracy across the whole range of
  // exponents, not only near zero.
  std::mt19937 rng(8);
  std::uniform_real_distribution<float> u(-150.0f, 150.0f);
  for (int fill = 1; fill <= 41; ++fill) {
    std::vector<float> logits(2 * fill);
    std::vector<std::vector<double>> ref(2);
    for (int j = 0; j < 2; ++j) {
      for (int i = 0; i < fill; ++i) {
        logits[j * fill + i] = u(rng);
        ref[j].push_back(logits[j * fill + i]);
      }
    }
    // Reference in double with its own max subtraction.
    double best = -INFINITY;
    for (const auto& row : ref) {
      const double m = *std::max_element(row.begin(), row.end());
      double s = 0;
      for (double l : row) s += std::exp(l - m);
      best = std::max(best, m + std::log(s));
    }
    EXPECT_NEAR(PageMassScore(logits.data(), 2, fill, fill, 1.0f), best,
                1e-5 * std::abs(best) + 1e-5)
        << "fill " << fill;
  }
  // Many equal logits: the sum must be exactly countable.
  std::vector<float> flat(37, 0.5f);
  EXPECT_NEAR(PageMassScore(flat.data(), 1, 37, 37, 2.0f), 1.0 + std::log(37.0), 1e-5);
}

TEST(PageMassScoreTest, StableForHugeLogits) {
  // exp(1000) overflows; the stable form must still give 1000 + log(2).
  const float logits[2] = {1000.0f, 1000.0f};
  EXPECT_NEAR(PageMassScore(logits, 1, 2, 2, 1.0f), 1000.0f + std::log(2.0f), 1e-3);
  const float low[2] = {-1000.0f, -1000.0f};
  EXPECT_NEAR(PageMassScore(low, 1, 2, 2, 1.0f), -1000.0f + std::log(2.0f), 1e-3);
}

TEST(PageMassScoreTest, EmptyPageScoresMinusInfinity) {
  const float logits[1] = {0.0f};
  EXPECT_EQ(PageMassScore(logits, 1, 0, 1, 1.0f), -std::numeric_limits<float>::infinity());
}

// A selector with a fixed page table, for TakePages.
class FakeSelector : public Selector {
 public:
  FakeSelector(int page_tokens, std::vector<uint32_t> fills)
      : Selector(MakeConfig(page_tokens)), fills_(std::move(fills)) {
    int32_t next = 0;
    for (uint32_t f : fills_) {
      offsets_.push_back(positions_.size());
      for (uint32_t i = 0; i < f; ++i) positions_.push_back(next++);
    }
  }
  static SelectorConfig MakeConfig(int page_tokens) {
    SelectorConfig c;
    c.kind = SelectorKind::kExact;
    c.page_tokens = page_tokens;
    return c;
  }
  SelectorKind kind() const override { return SelectorKind::kExact; }
  absl::Status Build(const float*, int64_t, std::vector<Placement>*) override {
    return absl::UnimplementedError("fake");
  }
  absl::Status Insert(const float*, int64_t, std::vector<Placement>*) override {
    return absl::UnimplementedError("fake");
  }
  absl::Status Select(const float*, int, const SelectParams&, Selection*) const override {
    return absl::UnimplementedError("fake");
  }
  int64_t num_tokens() const override { return static_cast<int64_t>(positions_.size()); }
  uint32_t num_pages() const override { return static_cast<uint32_t>(fills_.size()); }
  uint32_t fill(uint32_t page) const override { return fills_[page]; }
  const int32_t* positions(uint32_t page) const override {
    return positions_.data() + offsets_[page];
  }
  size_t index_bytes() const override { return 0; }

 private:
  std::vector<uint32_t> fills_;
  std::vector<size_t> offsets_;
  std::vector<int32_t> positions_;
};

TEST(TakePagesTest, ForcedFirstThenDescendingScoreUntilBudget) {
  FakeSelector sel(4, {4, 4, 4, 4, 4, 2});
  std::vector<std::pair<float, uint32_t>> scored = {{1.0f, 0}, {5.0f, 1}, {3.0f, 2},
                                                    {4.0f, 3}, {2.0f, 4}, {9.0f, 5}};
  SelectParams p;
  p.budget_tokens = 9;
  p.want_positions = true;
  Selection out;
  out.keys_touched = 42;
  TakePages(sel, {0}, &scored, p, &out);
  // Page 0 forced (4 tokens), then 5 (2 tokens, score 9), then 1 (4 tokens): 10 >= 9.
  EXPECT_THAT(out.pages, ElementsAre(0u, 5u, 1u));
  EXPECT_THAT(out.fills, ElementsAre(4u, 2u, 4u));
  EXPECT_EQ(out.scores[0], std::numeric_limits<float>::infinity());
  EXPECT_EQ(out.scores[1], 9.0f);
  EXPECT_EQ(out.scores[2], 5.0f);
  EXPECT_THAT(out.positions, ElementsAre(0, 1, 2, 3, 20, 21, 4, 5, 6, 7));
  EXPECT_EQ(out.tokens(), 10);
  EXPECT_EQ(out.keys_touched, 42u) << "TakePages must leave the caller's cost alone";
}

TEST(TakePagesTest, ForcedPagesAreNotTakenTwiceAndPositionsOff) {
  FakeSelector sel(2, {2, 2, 2, 2});
  std::vector<std::pair<float, uint32_t>> scored = {{9.0f, 3}, {1.0f, 0}, {2.0f, 1}, {0.5f, 2}};
  SelectParams p;
  p.budget_tokens = 6;
  Selection out;
  out.positions = {99};  // stale content must be cleared
  TakePages(sel, {0, 3}, &scored, p, &out);
  EXPECT_THAT(out.pages, ElementsAre(0u, 3u, 1u));
  EXPECT_TRUE(out.positions.empty());
}

TEST(TakePagesTest, TiesGoToLowerPageAndNanRanksLast) {
  FakeSelector sel(1, {1, 1, 1, 1});
  std::vector<std::pair<float, uint32_t>> scored = {{NAN, 0}, {1.0f, 3}, {1.0f, 1}, {1.0f, 2}};
  SelectParams p;
  p.budget_tokens = 4;
  Selection out;
  TakePages(sel, {}, &scored, p, &out);
  EXPECT_THAT(out.pages, ElementsAre(1u, 2u, 3u, 0u));
}

TEST(TakePagesTest, StopsWhenPagesRunOutAndHandlesLongRankings) {
  // 1000 pages of one token: the chunked partial sort must walk past its
  // first chunk and still produce a fully descending order.
  std::vector<uint32_t> fills(1000, 1);
  FakeSelector sel(1, fills);
  std::vector<std::pair<float, uint32_t>> scored;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (uint32_t i = 0; i < 1000; ++i) scored.push_back({u(rng), i});
  SelectParams p;
  p.budget_tokens = 5000;  // more than exists
  Selection out;
  TakePages(sel, {}, &scored, p, &out);
  ASSERT_EQ(out.pages.size(), 1000u);
  for (size_t i = 1; i < out.scores.size(); ++i) EXPECT_GE(out.scores[i - 1], out.scores[i]);
}

TEST(ForcedPagesTest, SinksAndRecentDeduplicatedAscending) {
  SelectParams p;
  p.sink_tokens = 5;
  p.recent_tokens = 3;
  auto pages = ForcedPages(20, p, [](int64_t pos) { return static_cast<uint32_t>(pos / 4); });
  EXPECT_THAT(pages, ElementsAre(0u, 1u, 4u));
  p.sink_tokens = 0;
  p.recent_tokens = 0;
  EXPECT_TRUE(ForcedPages(20, p, [](int64_t pos) { return static_cast<uint32_t>(pos); }).empty());
}

// The SIMD exp behind AddExp (and LogSumExp, PageMassScore, TakeTokens,
// ExactTokenShares): relative error against std::exp within 1e-6 over the
// arguments those paths pass (x - shift <= 80; below about -87 the result
// is clamped to exp(-87), negligible next to the max term), lanes and the
// scalar tail alike.
TEST(AddExpTest, SimdExpIsWithinItsErrorBoundOfStdExp) {
  std::vector<float> x;
  for (float v = -87.0f; v <= 80.0f; v += 0.0137f) x.push_back(v);
  x.push_back(0.0f);
  x.push_back(-1e-8f);
  std::vector<float> acc(x.size(), 0.0f);
  AddExp(x.data(), 0.0f, x.size(), acc.data());
  double worst = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp(static_cast<double>(x[i]));
    worst = std::max(worst, std::abs(acc[i] - want) / want);
  }
  EXPECT_LE(worst, 1e-6);
  // The shift is subtracted first; the cap keeps the result finite.
  std::vector<float> big = {100.0f, 200.0f, 300.0f, 400.0f, 500.0f, 600.0f, 700.0f, 800.0f, 900.0f};
  std::vector<float> sum(big.size(), 1.0f);
  AddExp(big.data(), 100.0f, big.size(), sum.data());
  EXPECT_NEAR(sum[0], 2.0f, 1e-6f);
  for (float v : sum) EXPECT_TRUE(std::isfinite(v));
}

}  // namespace
}  // namespace icecache
