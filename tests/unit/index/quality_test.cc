#include "server/index/quality.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/index/owned_page_keys.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::ElementsAre;

// Four 2-dim keys whose first coordinate is log(1..4); the query [sqrt 2, 0]
// cancels the 1/sqrt(2) scale, so the logits are log(1), log(2), log(3),
// log(4) and the softmax is exactly 0.1, 0.2, 0.3, 0.4.
// The second query [-sqrt 2, 0] gives 1, 1/2, 1/3, 1/4 normalised by 25/12:
// 0.48, 0.24, 0.16, 0.12.
const float kKeys[] = {0.0f,           5.0f, std::log(2.0f), -3.0f,
                       std::log(3.0f), 0.0f, std::log(4.0f), 1.0f};
const float kValues[] = {1.0f, 0.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0.0f, 0.0f};
const float kQueries[] = {std::sqrt(2.0f), 0.0f, -std::sqrt(2.0f), 0.0f};

ExactAttention Tiny(int num_queries) {
  auto ex = ComputeExactAttention(kKeys, kValues, 4, 2, kQueries, num_queries);
  EXPECT_THAT(ex, IsOk());
  return *std::move(ex);
}

TEST(QualityTest, ExactScoresAreTheSoftmax) {
  const ExactAttention ex = Tiny(2);
  const double p0[] = {0.1, 0.2, 0.3, 0.4};
  const double p1[] = {0.48, 0.24, 0.16, 0.12};
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(ex.probs[i], p0[i], 1e-6);
    EXPECT_NEAR(ex.probs[4 + i], p1[i], 1e-6);
  }
  EXPECT_NEAR(ex.logits[1], std::log(2.0), 1e-6);
  // o = sum p_i v_i = [p_0, p_1].
  EXPECT_NEAR(ex.output[0], 0.1, 1e-6);
  EXPECT_NEAR(ex.output[1], 0.2, 1e-6);
}

TEST(QualityTest, MassRecallSumsSelectedProbabilitiesOnce) {
  const ExactAttention one = Tiny(1);
  EXPECT_NEAR(*MassRecall(one, std::vector<int32_t>{1, 3}), 0.6, 1e-6);
  EXPECT_NEAR(*MassRecall(one, std::vector<int32_t>{3, 3, 3}), 0.4, 1e-6);
  EXPECT_NEAR(*MassRecall(one, std::vector<int32_t>{}), 0.0, 1e-12);
  EXPECT_NEAR(*MassRecall(one, std::vector<int32_t>{0, 1, 2, 3}), 1.0, 1e-9);
  // Averaged over both queries: (0.1 + 0.48) / 2.
  EXPECT_NEAR(*MassRecall(Tiny(2), std::vector<int32_t>{0}), 0.29, 1e-6);
}

TEST(QualityTest, TopKRecallAgainstExactTopK) {
  const ExactAttention one = Tiny(1);
  // Exact top-2 of query 0 is {3, 2}.
  EXPECT_NEAR(*TopKRecall(one, std::vector<int32_t>{1, 3}, 2), 0.5, 1e-12);
  EXPECT_NEAR(*TopKRecall(one, std::vector<int32_t>{2, 3}, 2), 1.0, 1e-12);
  EXPECT_NEAR(*TopKRecall(one, std::vector<int32_t>{3, 3}, 2), 0.5, 1e-12);
  // k larger than n is clamped to n.
  EXPECT_NEAR(*TopKRecall(one, std::vector<int32_t>{0, 1}, 10), 0.5, 1e-12);
  // Query 1's top-2 is {0, 1}: selecting {0, 3} scores 0.5 and 0.5.
  EXPECT_NEAR(*TopKRecall(Tiny(2), std::vector<int32_t>{0, 3}, 2), 0.5, 1e-12);
  EXPECT_NEAR(*TopKRecall(Tiny(2), std::vector<int32_t>{2, 3}, 2), 0.5, 1e-12);
}

TEST(QualityTest, OutputRelErrorRenormalisesOverTheSelection) {
  const ExactAttention one = Tiny(1);
  // S = {0, 1}: mass 0.3, o_S = [0.1, 0.2] / 0.3; o = [0.1, 0.2].
  const double expected =
      std::sqrt(std::pow(1.0 / 3 - 0.1, 2) + std::pow(2.0 / 3 - 0.2, 2)) / std::sqrt(0.01 + 0.04);
  EXPECT_NEAR(*OutputRelError(one, kValues, std::vector<int32_t>{0, 1}), expected, 1e-6);
  // S = {2, 3}: both values are zero, o_S = 0, error exactly 1.
  EXPECT_NEAR(*OutputRelError(one, kValues, std::vector<int32_t>{2, 3}), 1.0, 1e-9);
  EXPECT_NEAR(*OutputRelError(one, kValues, std::vector<int32_t>{}), 1.0, 1e-9);
  // Everything selected: no error.
  EXPECT_NEAR(*OutputRelError(one, kValues, std::vector<int32_t>{0, 1, 2, 3}), 0.0, 1e-9);
}

TEST(QualityTest, OracleTakesSinksThenMostMassTokens) {
  // Sum over the two queries: 0.58, 0.44, 0.46, 0.52.
  const ExactAttention two = Tiny(2);
  EXPECT_THAT(*OracleTokens(two, 2, 0), ElementsAre(0, 3));
  EXPECT_THAT(*OracleTokens(two, 3, 0), ElementsAre(0, 2, 3));
  EXPECT_THAT(*OracleTokens(two, 2, 2), ElementsAre(0, 1));
  EXPECT_THAT(*OracleTokens(two, 3, 2), ElementsAre(0, 1, 3));
  EXPECT_THAT(*OracleTokens(Tiny(1), 1, 0), ElementsAre(3));
  EXPECT_THAT(*OracleTokens(Tiny(1), 2, 1), ElementsAre(0, 3));
}

TEST(QualityTest, OracleMaximisesTheGroupMassNotTheLoudestQuery) {
  // Token 2 has the largest single probability (0.54), token 1 the largest
  // mass over the group (0.3 + 0.46): the oracle takes token 1.
  ExactAttention ex;
  ex.n = 3;
  ex.num_queries = 2;
  ex.probs = {0.5, 0.3, 0.2, 0.0, 0.46, 0.54};
  EXPECT_THAT(*OracleTokens(ex, 1, 0), ElementsAre(1));
  EXPECT_NEAR(*MassRecall(ex, *OracleTokens(ex, 1, 0)), 0.38, 1e-12);
  EXPECT_NEAR(*MassRecall(ex, std::vector<int32_t>{2}), 0.37, 1e-12);
}

TEST(QualityTest, EvaluateSelectionReadsPagesThroughTheSelector) {
  SelectorConfig c;
  c.kind = SelectorKind::kExact;
  c.head_dim = 2;
  c.page_tokens = 2;
  c.num_query_heads = 1;
  c.dtype = DType::kF32;
  auto frames = OwnedPageKeys::ForSelector(c);
  ASSERT_THAT(frames, IsOk());
  auto sel = Selector::Create(c, frames->get());
  ASSERT_THAT(sel, IsOk());
  std::vector<Placement> pl;
  ASSERT_THAT((*sel)->Build(kKeys, 4, &pl), IsOk());
  ASSERT_THAT((*frames)->Apply(pl, kKeys), IsOk());
  SelectParams p;
  p.budget_tokens = 2;
  p.sink_tokens = 0;
  Selection s;
  ASSERT_THAT((*sel)->Select(kQueries, 1, p, &s), IsOk());
  ASSERT_THAT(s.pages, ElementsAre(1u));  // positions 2, 3 hold 0.7 of the mass
  const ExactAttention one = Tiny(1);
  auto r = EvaluateSelection(one, kValues, **sel, s, 2);
  ASSERT_THAT(r, IsOk());
  EXPECT_NEAR(r->mass_recall, 0.7, 1e-6);
  EXPECT_NEAR(r->topk_recall, 1.0, 1e-12);
  EXPECT_NEAR(r->output_rel_error, 1.0, 1e-6);
  EXPECT_EQ(r->selected_tokens, 2);
  // The same with positions carried in the selection, and without values.
  p.want_positions = true;
  ASSERT_THAT((*sel)->Select(kQueries, 1, p, &s), IsOk());
  r = EvaluateSelection(one, nullptr, **sel, s, 2);
  ASSERT_THAT(r, IsOk());
  EXPECT_NEAR(r->mass_recall, 0.7, 1e-6);
  EXPECT_TRUE(std::isnan(r->output_rel_error));
  // A page the selector does not have.
  Selection bogus;
  bogus.pages = {7};
  bogus.fills = {2};
  bogus.scores = {0};
  EXPECT_THAT(EvaluateSelection(one, kValues, **sel, bogus, 2),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(QualityTest, OraclePagesRanksPagesByMeanMassOverQueries) {
  SelectorConfig c;
  c.kind = SelectorKind::kStreaming;  // any layout: the oracle reads only positions
  c.head_dim = 2;
  c.page_tokens = 2;
  c.num_query_heads = 2;
  auto frames = OwnedPageKeys::ForSelector(c);
  ASSERT_THAT(frames, IsOk());
  auto sel = Selector::Create(c, frames->get());
  ASSERT_THAT(sel, IsOk());
  std::vector<Placement> pl;
  ASSERT_THAT((*sel)->Build(kKeys, 4, &pl), IsOk());
  SelectParams p;
  p.budget_tokens = 2;
  p.sink_tokens = 0;
  // One query: page 1 holds 0.3 + 0.4 of the mass, page 0 0.1 + 0.2.
  auto one = OraclePages(Tiny(1), **sel, p);
  ASSERT_THAT(one, IsOk());
  EXPECT_THAT(one->pages, ElementsAre(1u));
  EXPECT_NEAR(one->scores[0], 0.7, 1e-6);
  // Two queries: page 0 has (0.3 + 0.72) / 2 = 0.51, page 1 (0.7 + 0.28) / 2.
  auto two = OraclePages(Tiny(2), **sel, p);
  ASSERT_THAT(two, IsOk());
  EXPECT_THAT(two->pages, ElementsAre(0u));
  EXPECT_NEAR(two->scores[0], 0.51, 1e-6);
  // Forced pages come first; a budget beyond n is rejected.
  p.recent_tokens = 1;
  auto forced = OraclePages(Tiny(2), **sel, p);
  ASSERT_THAT(forced, IsOk());
  EXPECT_THAT(forced->pages, ElementsAre(1u));
  p.budget_tokens = 5;
  EXPECT_THAT(OraclePages(Tiny(2), **sel, p), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(QualityTest, BadInputsAreRejected) {
  EXPECT_THAT(ComputeExactAttention(nullptr, nullptr, 4, 2, kQueries, 1),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ComputeExactAttention(kKeys, nullptr, 0, 2, kQueries, 1),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ComputeExactAttention(kKeys, nullptr, 4, 2, kQueries, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  float nan_keys[8];
  std::copy(kKeys, kKeys + 8, nan_keys);
  nan_keys[5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT(ComputeExactAttention(nan_keys, nullptr, 4, 2, kQueries, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("key row 2")));
  const ExactAttention one = Tiny(1);
  EXPECT_THAT(MassRecall(one, std::vector<int32_t>{4}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(TopKRecall(one, std::vector<int32_t>{-1}, 2),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(TopKRecall(one, std::vector<int32_t>{0}, 0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(OracleTokens(one, 0, 0), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(OracleTokens(one, 5, 0), StatusIs(absl::StatusCode::kInvalidArgument));
  auto no_values = ComputeExactAttention(kKeys, nullptr, 4, 2, kQueries, 1);
  ASSERT_THAT(no_values, IsOk());
  EXPECT_THAT(OutputRelError(*no_values, kValues, std::vector<int32_t>{0}),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(MassRecall(ExactAttention{}, std::vector<int32_t>{}),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace icecache
