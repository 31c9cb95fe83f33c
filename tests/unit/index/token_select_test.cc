// Token-granular selection (token_select.h): every selector kind at
// Granularity::kToken returns well-formed packed tokens, and the exact kinds
// return exactly the naive reference's best tokens.
#include "server/index/token_select.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/index/mdci_selector.h"
#include "server/index/owned_page_keys.h"
#include "server/index/page_select.h"
#include "server/index/selector.h"
#include "server/index/width_calibrator.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/index_test_data.h"

namespace icecache {
namespace {

using ::icecache::testing::HeadData;
using ::icecache::testing::IsOk;
using ::icecache::testing::MakeSyntheticHead;
using ::icecache::testing::StatusIs;
using ::testing::ElementsAre;

constexpr int kPage = 16;
constexpr int kGroup = 2;

struct Built {
  std::unique_ptr<OwnedPageKeys> frames;
  std::unique_ptr<Selector> sel;
  std::vector<Placement> placements;  // by position
};

// fp32 keys, so the naive reference's logits are the selector's.
Built Build(SelectorKind kind, const HeadData& data, int64_t prefill) {
  Built b;
  SelectorConfig c;
  c.kind = kind;
  c.head_dim = data.dim;
  c.dtype = DType::kF32;
  c.page_tokens = kPage;
  c.num_query_heads = data.num_queries;
  auto frames = OwnedPageKeys::ForSelector(c);
  EXPECT_THAT(frames, IsOk());
  b.frames = std::move(*frames);
  auto sel = Selector::Create(c, b.frames.get());
  EXPECT_THAT(sel, IsOk());
  b.sel = std::move(*sel);
  for (int64_t at = 0; at < data.n;) {
    const int64_t n = at == 0 ? prefill : std::min<int64_t>(5, data.n - at);
    std::vector<Placement> pl;
    EXPECT_THAT(at == 0 ? b.sel->Build(data.key(at), n, &pl) : b.sel->Insert(data.key(at), n, &pl),
                IsOk());
    EXPECT_THAT(b.frames->Apply(pl, data.key(at)), IsOk());
    b.placements.insert(b.placements.end(), pl.begin(), pl.end());
    at += n;
  }
  return b;
}

// Naive group score of every token: sum over queries of its softmax share.
std::vector<double> NaiveTokenScores(const HeadData& d, const float* queries) {
  std::vector<double> score(d.n, 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d.dim));
  for (int j = 0; j < d.num_queries; ++j) {
    std::vector<double> l(d.n);
    for (int64_t i = 0; i < d.n; ++i) {
      double dot = 0.0;
      for (int c = 0; c < d.dim; ++c) dot += double{queries[j * d.dim + c]} * d.key(i)[c];
      l[i] = dot * scale;
    }
    const double m = *std::max_element(l.begin(), l.end());
    double z = 0.0;
    for (double x : l) z += std::exp(x - m);
    for (int64_t i = 0; i < d.n; ++i) score[i] += std::exp(l[i] - m) / z;
  }
  return score;
}

class TokenSelectTest : public ::testing::TestWithParam<SelectorKind> {};

// Page `page` of `sel` as a token candidate: its exact logits for the
// step's queries `q` into *cand, their per-query log-masses appended to
// *lse.
void AddCandidate(const Selector& sel, const HeadData& data, const float* q, uint32_t page,
                  TokenCandidates* cand, std::vector<float>* lse) {
  const int nq = data.num_queries;
  const float scale = 1.0f / std::sqrt(static_cast<float>(data.dim));
  const uint32_t fill = sel.fill(page);
  float* l = cand->Add(page, nq, fill);
  const int32_t* pos = sel.positions(page);
  for (int j = 0; j < nq; ++j) {
    for (uint32_t t = 0; t < fill; ++t) {
      float dot = 0.0f;
      for (int c = 0; c < data.dim; ++c) dot += q[j * data.dim + c] * data.key(pos[t])[c];
      l[j * fill + t] = dot;
    }
  }
  lse->resize(lse->size() + nq);
  PageQueryLogMass(l, nq, static_cast<int>(fill), static_cast<int>(fill), scale,
                   lse->data() + lse->size() - nq);
}

TEST_P(TokenSelectTest, PacksDistinctTokensWithForcedOnesAndTheirPlacements) {
  const HeadData data = MakeSyntheticHead(1200, kGroup, 2, 21);
  Built b = Build(GetParam(), data, 1100);
  ASSERT_NE(b.sel, nullptr);
  for (int budget : {1, 16, 17, 100, 256, 1200}) {
    for (int sink : {0, 4, 40}) {
      for (int recent : {0, 20}) {
        SCOPED_TRACE(::testing::Message()
                     << "budget " << budget << " sink " << sink << " recent " << recent);
        SelectParams p;
        p.budget_tokens = budget;
        p.sink_tokens = sink;
        p.recent_tokens = recent;
        p.granularity = Granularity::kToken;
        Selection out;
        ASSERT_THAT(b.sel->Select(data.query(1), kGroup, p, &out), IsOk());
        EXPECT_TRUE(out.pages.empty());
        const int64_t forced = std::min(sink, budget > 0 ? 1200 : 0) + recent;
        const size_t expect = static_cast<size_t>(std::max<int64_t>(budget, forced));
        ASSERT_EQ(out.token_refs.size(), std::min<size_t>(expect, 1200));
        ASSERT_EQ(out.positions.size(), out.token_refs.size());
        ASSERT_EQ(out.scores.size(), out.token_refs.size());
        std::vector<uint32_t> fills;
        PackedFills(static_cast<int64_t>(out.token_refs.size()), kPage, &fills);
        EXPECT_EQ(out.fills, fills);
        std::set<int32_t> seen;
        for (size_t i = 0; i < out.token_refs.size(); ++i) {
          const int32_t pos = out.positions[i];
          ASSERT_TRUE(seen.insert(pos).second) << "position " << pos << " twice";
          EXPECT_EQ(out.token_refs[i].page, b.placements[pos].page) << "position " << pos;
          EXPECT_EQ(out.token_refs[i].slot, b.placements[pos].slot) << "position " << pos;
        }
        for (int s = 0; s < sink; ++s) EXPECT_TRUE(seen.count(s)) << "sink " << s;
        for (int r = 0; r < recent; ++r) EXPECT_TRUE(seen.count(1199 - r)) << "recent " << r;
      }
    }
  }
}

TEST_P(TokenSelectTest, PlacementOfEveryPositionMatchesTheLayout) {
  const HeadData data = MakeSyntheticHead(700, kGroup, 1, 22);
  Built b = Build(GetParam(), data, 640);
  ASSERT_NE(b.sel, nullptr);
  for (int32_t pos = 0; pos < 700; ++pos) {
    const Placement p = b.sel->placement_of(pos);
    ASSERT_EQ(p.page, b.placements[pos].page) << "position " << pos;
    ASSERT_EQ(p.slot, b.placements[pos].slot) << "position " << pos;
  }
}

INSTANTIATE_TEST_SUITE_P(AllSelectors, TokenSelectTest,
                         ::testing::Values(SelectorKind::kExact, SelectorKind::kQuest,
                                           SelectorKind::kStreaming, SelectorKind::kMdci,
                                           SelectorKind::kExactMdci),
                         [](const ::testing::TestParamInfo<SelectorKind>& info) {
                           std::string name(SelectorKindName(info.param));
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// The exact kinds at token granularity are the exact token oracle: the
// sinks, then the tokens of the largest group score (naive reference).
TEST(TokenSelectReferenceTest, ExactKindsTakeTheNaiveBestTokens) {
  const HeadData data = MakeSyntheticHead(1500, 4, 3, 23);
  for (SelectorKind kind : {SelectorKind::kExact, SelectorKind::kExactMdci}) {
    Built b = Build(kind, data, 1400);
    for (int step = 0; step < data.steps; ++step) {
      SCOPED_TRACE(::testing::Message() << SelectorKindName(kind) << " step " << step);
      const std::vector<double> score = NaiveTokenScores(data, data.query(step));
      SelectParams p;
      p.budget_tokens = 100;
      p.sink_tokens = 4;
      p.granularity = Granularity::kToken;
      Selection out;
      ASSERT_THAT(b.sel->Select(data.query(step), 4, p, &out), IsOk());
      std::vector<int32_t> order(data.n - 4);
      std::iota(order.begin(), order.end(), 4);
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t c) {
        return score[a] > score[c] || (score[a] == score[c] && a < c);
      });
      std::vector<int32_t> want = {0, 1, 2, 3};
      want.insert(want.end(), order.begin(), order.begin() + 96);
      // Same tokens, in the same order, unless two scores tie to float precision.
      double got_mass = 0.0, want_mass = 0.0;
      for (int32_t pos : out.positions) got_mass += score[pos];
      for (int32_t pos : want) want_mass += score[pos];
      EXPECT_NEAR(got_mass, want_mass, 1e-6 * want_mass);
      int same = 0;
      for (size_t i = 0; i < want.size(); ++i) same += out.positions[i] == want[i];
      EXPECT_GE(same, 98);
      for (size_t i = 4; i < out.scores.size(); ++i) {
        EXPECT_NEAR(out.scores[i], score[out.positions[i]], 1e-4 * score[out.positions[i]] + 1e-9);
      }
    }
  }
}

// TakeTokens selects the best candidates linearly and sorts only them: the
// taken tokens come best first (ties to the lower position), and no token
// left out scores above the last one taken.
TEST(TokenSelectReferenceTest, TakenTokensComeBestFirstAndNoneLeftOutScoresHigher) {
  const HeadData data = MakeSyntheticHead(3000, 4, 3, 29);
  for (SelectorKind kind : {SelectorKind::kExact, SelectorKind::kMdci}) {
    Built b = Build(kind, data, 2900);
    for (int step = 0; step < data.steps; ++step) {
      SCOPED_TRACE(::testing::Message() << SelectorKindName(kind) << " step " << step);
      SelectParams p;
      p.budget_tokens = 300;
      p.sink_tokens = 4;
      p.recent_tokens = 8;
      p.granularity = Granularity::kToken;
      Selection out;
      ASSERT_THAT(b.sel->Select(data.query(step), 4, p, &out), IsOk());
      ASSERT_EQ(out.positions.size(), 300u);
      constexpr size_t kForced = 12;
      for (size_t i = kForced; i + 1 < out.scores.size(); ++i) {
        const bool ordered =
            out.scores[i] > out.scores[i + 1] ||
            (out.scores[i] == out.scores[i + 1] && out.positions[i] < out.positions[i + 1]);
        ASSERT_TRUE(ordered) << "taken " << i << ": score " << out.scores[i] << " at "
                             << out.positions[i] << ", then " << out.scores[i + 1] << " at "
                             << out.positions[i + 1];
      }
      if (kind != SelectorKind::kExact) continue;
      // Every token is a candidate of the exact kind: none left out is better.
      const std::vector<double> score = NaiveTokenScores(data, data.query(step));
      std::set<int32_t> taken(out.positions.begin(), out.positions.end());
      const double last = score[out.positions.back()];
      for (int64_t i = 4; i < data.n - 8; ++i) {
        if (taken.count(static_cast<int32_t>(i)) == 0) {
          EXPECT_LE(score[i], last * (1 + 1e-4) + 1e-9) << "position " << i << " left out";
        }
      }
    }
  }
}

// TakeTokensBounded opens pages best bound first and stops at the first
// whose bound is under the worst token held: the same tokens, scores, order,
// placements and fills as TakeTokens over every candidate, whatever the
// bound (each page's largest logits, the looser page share, NaN), with ties
// (a run of equal keys), a budget the forced tokens fill, and one larger
// than the candidates.
TEST(TokenSelectReferenceTest, BoundedTakesWhatTakeTokensTakes) {
  HeadData data = MakeSyntheticHead(2000, 4, 3, 31);
  for (int64_t i = 900; i < 940; ++i) {  // equal scores: ties go to the lower position
    std::copy(data.key(899), data.key(899) + data.dim, data.keys.begin() + i * data.dim);
  }
  Built b = Build(SelectorKind::kExact, data, 2000);
  const Selector& sel = *b.sel;
  const int nq = data.num_queries;
  const float scale = 1.0f / std::sqrt(static_cast<float>(data.dim));
  for (int step = 0; step < data.steps; ++step) {
    const float* q = data.query(step);
    // Every other page a candidate, with its logits and log-masses.
    TokenCandidates cand;
    std::vector<float> lse;
    std::vector<uint32_t> pages;
    for (uint32_t page = 0; page < sel.num_pages(); page += 1 + (page % 3 == 0 ? 1 : 0)) {
      AddCandidate(sel, data, q, page, &cand, &lse);
      pages.push_back(page);
    }
    std::vector<float> log_norm(nq);
    QueryLogNorms(lse.data(), pages.size(), nq, nullptr, log_norm.data());
    std::vector<float> tight, share, nan_every_third;
    for (size_t i = 0; i < pages.size(); ++i) {
      const uint32_t fill = sel.fill(pages[i]);
      const float* l = cand.logits.data() + cand.offsets[i];
      float b = 0.0f;
      for (int j = 0; j < nq; ++j) {
        float m = -INFINITY;
        for (uint32_t t = 0; t < fill; ++t) m = std::max(m, l[j * fill + t] * scale);
        b += std::exp(m - log_norm[j]);
      }
      tight.push_back(b);
      share.push_back(std::exp(GroupPageScore(&lse[i * nq], log_norm.data(), nq)));
      nan_every_third.push_back(i % 3 == 0 ? NAN : b);
    }
    for (int budget : {8, 64, 300, 5000}) {
      SelectParams p;
      p.budget_tokens = budget;
      p.sink_tokens = 4;
      p.recent_tokens = 8;
      p.granularity = Granularity::kToken;
      Selection want;
      TakeTokens(sel, cand, log_norm.data(), nq, scale, p, &want);
      for (const auto* bound : {&tight, &share, &nan_every_third}) {
        SCOPED_TRACE(::testing::Message() << "step " << step << " budget " << budget << " bound "
                                          << (bound == &tight   ? "max"
                                              : bound == &share ? "share"
                                                                : "nan"));
        Selection got;
        TakeTokensBounded(sel, cand, bound->data(), log_norm.data(), nq, scale, p, &got);
        EXPECT_EQ(got.positions, want.positions);
        ASSERT_EQ(got.scores.size(), want.scores.size());
        EXPECT_EQ(0, std::memcmp(got.scores.data(), want.scores.data(),
                                 want.scores.size() * sizeof(float)));
        ASSERT_EQ(got.token_refs.size(), want.token_refs.size());
        for (size_t i = 0; i < got.token_refs.size(); ++i) {
          EXPECT_EQ(got.token_refs[i].page, want.token_refs[i].page);
          EXPECT_EQ(got.token_refs[i].slot, want.token_refs[i].slot);
        }
        EXPECT_EQ(got.fills, want.fills);
      }
    }
  }
}

// A smaller budget takes exactly the head of the full ranking (every
// candidate taken, sorted by score, ties by position), through both the
// unbounded and the bounded take: the linear selection of the best `want`
// (and the bounded take's compactions) keeps the set a sort would, ties at
// the cutoff included. Runs of equal keys put many ties at the cutoffs, and the
// candidates come last page first, so ties arrive out of position order.
TEST(TokenSelectReferenceTest, ASmallerBudgetTakesTheHeadOfTheFullRanking) {
  HeadData data = MakeSyntheticHead(1500, 4, 2, 77);
  for (int64_t i = 300; i < 700; i += 3) {  // a third of a range shares one key
    std::copy(data.key(299), data.key(299) + data.dim, data.keys.begin() + i * data.dim);
  }
  Built b = Build(SelectorKind::kExact, data, 1500);
  const Selector& sel = *b.sel;
  const int nq = data.num_queries;
  const float scale = 1.0f / std::sqrt(static_cast<float>(data.dim));
  for (int step = 0; step < data.steps; ++step) {
    const float* q = data.query(step);
    TokenCandidates cand;
    std::vector<float> lse, bound;
    size_t n = 0;
    // The candidates last page first, so that tied tokens reach the
    // selection out of position order.
    for (uint32_t page = sel.num_pages(); page-- > 0; ++n) {
      AddCandidate(sel, data, q, page, &cand, &lse);
    }
    std::vector<float> log_norm(nq);
    QueryLogNorms(lse.data(), n, nq, nullptr, log_norm.data());
    for (size_t i = 0; i < n; ++i) bound.push_back(INFINITY);  // every page opened
    SelectParams p;
    p.sink_tokens = 2;
    p.recent_tokens = 4;
    p.granularity = Granularity::kToken;
    p.budget_tokens = 1500;
    Selection all;
    TakeTokens(sel, cand, log_norm.data(), nq, scale, p, &all);
    ASSERT_EQ(all.positions.size(), 1500u);
    // The ranking has ties: equal scores in a row, ordered by position.
    int ties = 0;
    for (size_t i = 7; i < all.scores.size(); ++i) {
      if (all.scores[i] == all.scores[i - 1]) {
        ++ties;
        EXPECT_LT(all.positions[i - 1], all.positions[i]);
      }
    }
    EXPECT_GT(ties, 50);
    // Budgets that cut through each run of ties, and some others.
    std::vector<int> budgets = {7, 20, 64, 129, 700, 1499};
    for (size_t i = 7; i + 2 < all.scores.size(); ++i) {
      if (all.scores[i] == all.scores[i + 1] && all.scores[i] != all.scores[i - 1]) {
        budgets.push_back(static_cast<int>(i) + 1);
        budgets.push_back(static_cast<int>(i) + 2);
      }
    }
    for (int budget : budgets) {
      SCOPED_TRACE(::testing::Message() << "step " << step << " budget " << budget);
      p.budget_tokens = budget;
      for (bool bounded : {false, true}) {
        Selection got;
        if (bounded) {
          TakeTokensBounded(sel, cand, bound.data(), log_norm.data(), nq, scale, p, &got);
        } else {
          TakeTokens(sel, cand, log_norm.data(), nq, scale, p, &got);
        }
        ASSERT_EQ(got.positions.size(), static_cast<size_t>(budget));
        EXPECT_TRUE(std::equal(got.positions.begin(), got.positions.end(), all.positions.begin()))
            << (bounded ? "bounded" : "unbounded");
        EXPECT_EQ(0, std::memcmp(got.scores.data(), all.scores.data(), budget * sizeof(float)));
      }
    }
  }
}

TEST(TokenSelectReferenceTest, MdciTokensHoldAtLeastItsPagesMassOnTheirCandidates) {
  // Same descent, same candidates: the best tokens among them hold at least
  // the mass of the best whole pages among them (budget in tokens).
  const HeadData data = MakeSyntheticHead(4096, 4, 4, 24);
  Built b = Build(SelectorKind::kMdci, data, 4000);
  for (int step = 0; step < data.steps; ++step) {
    const std::vector<double> score = NaiveTokenScores(data, data.query(step));
    SelectParams p;
    p.budget_tokens = 128;
    p.sink_tokens = 4;
    p.want_positions = true;
    Selection pages, tokens;
    ASSERT_THAT(b.sel->Select(data.query(step), 4, p, &pages), IsOk());
    p.granularity = Granularity::kToken;
    ASSERT_THAT(b.sel->Select(data.query(step), 4, p, &tokens), IsOk());
    double page_mass = 0.0, token_mass = 0.0;
    // Whole pages may cross the budget: count only their first 128 tokens' worth.
    std::vector<double> page_scores;
    for (int32_t pos : pages.positions) page_scores.push_back(score[pos]);
    std::sort(page_scores.rbegin(), page_scores.rend());
    for (size_t i = 0; i < std::min<size_t>(128, page_scores.size()); ++i)
      page_mass += page_scores[i];
    for (int32_t pos : tokens.positions) token_mass += score[pos];
    EXPECT_GE(token_mass, page_mass * (1 - 1e-6)) << "step " << step;
  }
}

TEST(TokenSelectReferenceTest, CalibratorReferenceAtTokenGranularityIsTheExactBestTokens) {
  const HeadData data = MakeSyntheticHead(2048, 4, 2, 25);
  Built b = Build(SelectorKind::kMdci, data, 2000);
  const auto& mdci = static_cast<const MdciSelector&>(*b.sel);
  SelectParams p;
  p.budget_tokens = 64;
  p.sink_tokens = 4;
  p.granularity = Granularity::kToken;
  // Every page a candidate: the exact best tokens, ratio 1.
  p.candidate_factor = 64.0f;
  Selection all;
  ASSERT_THAT(b.sel->Select(data.query(0), 4, p, &all), IsOk());
  auto q = MeasureSelection(mdci, data.query(0), 4, p, all);
  ASSERT_THAT(q, IsOk());
  EXPECT_NEAR(q->mass_ratio, 1.0, 1e-4);
  EXPECT_NEAR(q->topk_recall, 1.0, 1e-9);
  // The sinks and the most recent tokens only: less mass, ratio below 1.
  Selection recent = all;
  for (int i = 4; i < 64; ++i) recent.positions[i] = 2048 - i;
  q = MeasureSelection(mdci, data.query(0), 4, p, recent);
  ASSERT_THAT(q, IsOk());
  EXPECT_LT(q->mass_ratio, 0.99);
  EXPECT_LT(q->topk_recall, 0.9);
}

TEST(GranularityTest, NamesRoundTripAndUnknownNamesAreRejected) {
  for (Granularity g : {Granularity::kPage, Granularity::kToken}) {
    auto parsed = ParseGranularity(GranularityName(g));
    ASSERT_THAT(parsed, IsOk());
    EXPECT_EQ(*parsed, g);
  }
  EXPECT_THAT(ParseGranularity("row"), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(PackedFillsTest, FullSlotsThenTheRest) {
  std::vector<uint32_t> fills;
  PackedFills(35, 16, &fills);
  EXPECT_THAT(fills, ElementsAre(16, 16, 3));
  PackedFills(32, 16, &fills);
  EXPECT_THAT(fills, ElementsAre(16, 16));
  PackedFills(0, 16, &fills);
  EXPECT_TRUE(fills.empty());
}

}  // namespace
}  // namespace icecache
