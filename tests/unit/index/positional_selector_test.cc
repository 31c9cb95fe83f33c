// The positional selectors (exact, quest, streaming) against naive scalar
// references written here.
#include "server/index/positional_selector.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/index/owned_page_keys.h"
#include "server/index/quality.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/index_test_data.h"

namespace icecache {
namespace {

using ::icecache::testing::HeadData;
using ::icecache::testing::IsOk;
using ::icecache::testing::MakeSyntheticHead;
using ::icecache::testing::StatusIs;
using ::testing::ElementsAre;

constexpr int kDim = 64;
constexpr int kPage = 16;

struct Built {
  std::unique_ptr<OwnedPageKeys> frames;
  std::unique_ptr<Selector> sel;
};

Built BuildSelector(SelectorKind kind, const HeadData& data, int group, DType dtype,
                    int64_t chunk = 0, float rescore = 0.0f) {
  SelectorConfig c;
  c.kind = kind;
  c.head_dim = kDim;
  c.page_tokens = kPage;
  c.num_query_heads = group;
  c.dtype = dtype;
  c.quest_rescore_factor = rescore;
  Built b;
  b.frames = *OwnedPageKeys::ForSelector(c);
  b.sel = *Selector::Create(c, b.frames.get());
  std::vector<Placement> pl;
  if (chunk <= 0) chunk = data.n;
  for (int64_t at = 0; at < data.n; at += chunk) {
    const int64_t m = std::min(chunk, data.n - at);
    EXPECT_THAT(at == 0 ? b.sel->Build(data.key(at), m, &pl) : b.sel->Insert(data.key(at), m, &pl),
                IsOk());
    EXPECT_THAT(b.frames->Apply(pl, data.key(at)), IsOk());
  }
  return b;
}

// Naive exact selector: double-precision logits of the stored (dtype-rounded)
// keys, page score = log of the sum over queries of each query's softmax share
// of the page (GroupPageScore), forced sinks first, then descending score
// (ties to the lower page) until the budget is filled.
std::vector<std::pair<uint32_t, double>> NaiveExact(const Built& b, const float* queries, int g,
                                                    int budget, int sinks) {
  const Selector& sel = *b.sel;
  std::vector<std::pair<double, uint32_t>> scored;
  std::vector<float> key(kDim);
  std::vector<double> mass(static_cast<size_t>(sel.num_pages()) * g, 0.0), total(g, 0.0);
  for (uint32_t p = 0; p < sel.num_pages(); ++p) {
    for (int j = 0; j < g; ++j) {
      double sum = 0.0;
      for (uint32_t s = 0; s < sel.fill(p); ++s) {
        EXPECT_THAT(b.frames->ReadKey(Placement{p, s}, key.data()), IsOk());
        double dot = 0.0;
        for (int d = 0; d < kDim; ++d) dot += static_cast<double>(queries[j * kDim + d]) * key[d];
        sum += std::exp(dot / std::sqrt(static_cast<double>(kDim)));
      }
      mass[static_cast<size_t>(p) * g + j] = sum;
      total[j] += sum;
    }
  }
  for (uint32_t p = 0; p < sel.num_pages(); ++p) {
    double share = 0.0;
    for (int j = 0; j < g; ++j) share += mass[static_cast<size_t>(p) * g + j] / total[j];
    scored.emplace_back(std::log(share), p);
  }
  std::vector<std::pair<uint32_t, double>> out;
  int64_t tokens = 0;
  const uint32_t sink_pages = static_cast<uint32_t>((sinks + kPage - 1) / kPage);
  for (uint32_t p = 0; p < sink_pages; ++p) {
    out.emplace_back(p, INFINITY);
    tokens += sel.fill(p);
  }
  std::sort(scored.begin(), scored.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  for (const auto& [score, p] : scored) {
    if (tokens >= budget) break;
    if (p < sink_pages) continue;
    out.emplace_back(p, score);
    tokens += sel.fill(p);
  }
  return out;
}

TEST(ExactSelectorTest, MatchesNaiveReferencePageByPage) {
  for (int g : {1, 2, 4}) {
    for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
      const HeadData data = MakeSyntheticHead(1500, g, 3, 21 + g);
      const Built b = BuildSelector(SelectorKind::kExact, data, g, dtype);
      for (int step = 0; step < data.steps; ++step) {
        for (int budget : {16, 100, 300}) {
          SCOPED_TRACE(::testing::Message() << "g " << g << " dtype " << static_cast<int>(dtype)
                                            << " step " << step << " budget " << budget);
          SelectParams p;
          p.budget_tokens = budget;
          p.sink_tokens = 4;
          Selection s;
          ASSERT_THAT(b.sel->Select(data.query(step), g, p, &s), IsOk());
          const auto ref = NaiveExact(b, data.query(step), g, budget, 4);
          ASSERT_EQ(s.pages.size(), ref.size());
          for (size_t i = 0; i < ref.size(); ++i) {
            EXPECT_EQ(s.pages[i], ref[i].first) << "rank " << i;
            if (std::isinf(ref[i].second)) {
              EXPECT_TRUE(std::isinf(s.scores[i]));
            } else {
              EXPECT_NEAR(s.scores[i], ref[i].second,
                          1e-3 * std::max(1.0, std::abs(ref[i].second)));
            }
          }
          EXPECT_EQ(s.keys_touched, static_cast<uint64_t>(data.n));
        }
      }
    }
  }
}

TEST(QuestSelectorTest, BoundMatchesNaiveFormulaAndBoundsEveryLogit) {
  const int g = 2;
  const HeadData data = MakeSyntheticHead(1000, g, 3, 31);
  const Built b = BuildSelector(SelectorKind::kQuest, data, g, DType::kF16, /*chunk=*/37);
  const double scale = 1.0 / std::sqrt(static_cast<double>(kDim));
  for (int step = 0; step < data.steps; ++step) {
    SelectParams p;
    p.budget_tokens = static_cast<int>(data.n);  // every page, so every bound is reported
    p.sink_tokens = 0;
    Selection s;
    ASSERT_THAT(b.sel->Select(data.query(step), g, p, &s), IsOk());
    ASSERT_EQ(s.pages.size(), b.sel->num_pages());
    EXPECT_EQ(s.keys_touched, 2ull * b.sel->num_pages());
    for (size_t i = 0; i < s.pages.size(); ++i) {
      const uint32_t page = s.pages[i];
      const int64_t first = static_cast<int64_t>(page) * kPage;
      const uint32_t fill = b.sel->fill(page);
      double bound = -INFINITY, max_logit = -INFINITY;
      for (int j = 0; j < g; ++j) {
        const float* q = data.query(step) + j * kDim;
        double sum = 0.0;
        for (int d = 0; d < kDim; ++d) {
          double mn = INFINITY, mx = -INFINITY;
          for (uint32_t t = 0; t < fill; ++t) {
            mn = std::min<double>(mn, data.key(first + t)[d]);
            mx = std::max<double>(mx, data.key(first + t)[d]);
          }
          sum += std::max(q[d] * mn, q[d] * mx);
        }
        bound = std::max(bound, sum * scale);
        for (uint32_t t = 0; t < fill; ++t) {
          double dot = 0.0;
          for (int d = 0; d < kDim; ++d) dot += static_cast<double>(q[d]) * data.key(first + t)[d];
          max_logit = std::max(max_logit, dot * scale);
        }
      }
      EXPECT_NEAR(s.scores[i], bound, 1e-3 * std::max(1.0, std::abs(bound))) << "page " << page;
      EXPECT_GE(s.scores[i], max_logit - 1e-3) << "page " << page;
    }
  }
}

TEST(QuestSelectorTest, RescoringEveryPageEqualsExact) {
  const int g = 2;
  const HeadData data = MakeSyntheticHead(800, g, 3, 41);
  const Built exact = BuildSelector(SelectorKind::kExact, data, g, DType::kF16);
  const Built quest = BuildSelector(SelectorKind::kQuest, data, g, DType::kF16, 0, 1000.0f);
  for (int step = 0; step < data.steps; ++step) {
    SelectParams p;
    p.budget_tokens = 96;
    Selection a, b;
    ASSERT_THAT(exact.sel->Select(data.query(step), g, p, &a), IsOk());
    ASSERT_THAT(quest.sel->Select(data.query(step), g, p, &b), IsOk());
    EXPECT_EQ(a.pages, b.pages);
    EXPECT_EQ(a.scores, b.scores);
  }
}

TEST(QuestSelectorTest, RescoringTouchesBoundsPlusCandidatePagesOnly) {
  const int g = 2;
  const HeadData data = MakeSyntheticHead(1600, g, 1, 42);  // 100 full pages
  const Built quest = BuildSelector(SelectorKind::kQuest, data, g, DType::kF16, 0, 2.0f);
  SelectParams p;
  p.budget_tokens = 160;  // 10 pages; 2x -> 20 candidate pages besides the sink page
  p.sink_tokens = 4;
  Selection s;
  ASSERT_THAT(quest.sel->Select(data.query(0), g, p, &s), IsOk());
  // Bounds of every page, the candidates' keys, and the sink page's keys
  // (its mass is part of each query's normaliser).
  EXPECT_EQ(s.keys_touched, 2u * 100 + 20u * kPage + 1u * kPage);
  EXPECT_EQ(s.tokens(), 160);
}

TEST(StreamingSelectorTest, TakesSinkPagesThenNewestPages) {
  const HeadData data = MakeSyntheticHead(1000, 1, 1, 51);  // 62 full pages + 8
  const Built b = BuildSelector(SelectorKind::kStreaming, data, 1, DType::kF16, 100);
  SelectParams p;
  p.budget_tokens = 64;
  p.sink_tokens = 4;
  Selection s;
  ASSERT_THAT(b.sel->Select(data.query(0), 1, p, &s), IsOk());
  EXPECT_THAT(s.pages, ElementsAre(0u, 62u, 61u, 60u, 59u));
  EXPECT_EQ(s.keys_touched, 0u);
  p.sink_tokens = 0;
  p.budget_tokens = 8;
  ASSERT_THAT(b.sel->Select(data.query(0), 1, p, &s), IsOk());
  EXPECT_THAT(s.pages, ElementsAre(62u));
}

TEST(PositionalSelectorTest, BuildInOneBatchEqualsInsertInChunks) {
  const HeadData data = MakeSyntheticHead(777, 2, 2, 61);
  for (SelectorKind kind : {SelectorKind::kExact, SelectorKind::kQuest, SelectorKind::kStreaming}) {
    const Built whole = BuildSelector(kind, data, 2, DType::kF16);
    const Built chunks = BuildSelector(kind, data, 2, DType::kF16, 5);
    ASSERT_EQ(whole.sel->num_pages(), chunks.sel->num_pages());
    ASSERT_EQ(whole.sel->num_pages(), (777u + kPage - 1) / kPage);
    for (uint32_t p = 0; p < whole.sel->num_pages(); ++p) {
      ASSERT_EQ(whole.sel->fill(p), chunks.sel->fill(p));
      ASSERT_EQ(whole.sel->positions(p)[0], static_cast<int32_t>(p * kPage));
    }
    for (int step = 0; step < data.steps; ++step) {
      SelectParams sp;
      sp.budget_tokens = 100;
      Selection a, b;
      ASSERT_THAT(whole.sel->Select(data.query(step), 2, sp, &a), IsOk());
      ASSERT_THAT(chunks.sel->Select(data.query(step), 2, sp, &b), IsOk());
      EXPECT_EQ(a.pages, b.pages);
      EXPECT_EQ(a.scores, b.scores);
    }
  }
}

// With one query and full pages, exact takes the highest-mass pages, so no
// other positional selector can capture more attention mass at the same budget.
TEST(PositionalSelectorTest, ExactCapturesAtLeastTheMassOfQuestAndStreaming) {
  const HeadData data = MakeSyntheticHead(2048, 1, 6, 71);
  const Built exact = BuildSelector(SelectorKind::kExact, data, 1, DType::kF32);
  const Built quest = BuildSelector(SelectorKind::kQuest, data, 1, DType::kF32);
  const Built rescored = BuildSelector(SelectorKind::kQuest, data, 1, DType::kF32, 0, 4.0f);
  const Built streaming = BuildSelector(SelectorKind::kStreaming, data, 1, DType::kF32);
  for (int step = 0; step < data.steps; ++step) {
    auto ex = ComputeExactAttention(data.keys.data(), data.values.data(), data.n, kDim,
                                    data.query(step), 1);
    ASSERT_THAT(ex, IsOk());
    SelectParams p;
    p.budget_tokens = 128;
    auto mass = [&](const Built& b) {
      Selection s;
      EXPECT_THAT(b.sel->Select(data.query(step), 1, p, &s), IsOk());
      EXPECT_EQ(s.tokens(), 128);
      auto r = EvaluateSelection(*ex, data.values.data(), *b.sel, s, p.budget_tokens);
      EXPECT_THAT(r, IsOk());
      return r.ok() ? r->mass_recall : -1.0;
    };
    const double m_exact = mass(exact);
    EXPECT_GE(m_exact + 1e-9, mass(quest)) << "step " << step;
    EXPECT_GE(m_exact + 1e-9, mass(rescored)) << "step " << step;
    EXPECT_GE(m_exact + 1e-9, mass(streaming)) << "step " << step;
    // With one query, exact ranks pages by their true mass: it is the page
    // oracle on this layout.
    auto page_oracle = OraclePages(*ex, *exact.sel, p);
    ASSERT_THAT(page_oracle, IsOk());
    auto oracle_report = EvaluateSelection(*ex, nullptr, *exact.sel, *page_oracle, 128);
    ASSERT_THAT(oracle_report, IsOk());
    EXPECT_NEAR(oracle_report->mass_recall, m_exact, 1e-4) << "step " << step;
    // The token oracle at the same budget bounds every page selection.
    auto oracle = OracleTokens(*ex, p.budget_tokens, p.sink_tokens);
    ASSERT_THAT(oracle, IsOk());
    EXPECT_GE(*MassRecall(*ex, *oracle) + 1e-9, m_exact);
  }
}

TEST(PositionalSelectorTest, MissingFramesAreFailedPrecondition) {
  SelectorConfig c;
  c.kind = SelectorKind::kExact;
  c.head_dim = kDim;
  auto frames = OwnedPageKeys::ForSelector(c);
  ASSERT_THAT(frames, IsOk());
  auto sel = Selector::Create(c, frames->get());
  ASSERT_THAT(sel, IsOk());
  const HeadData data = MakeSyntheticHead(64, 1, 1, 81);
  std::vector<Placement> pl;
  ASSERT_THAT((*sel)->Build(data.keys.data(), 64, &pl), IsOk());
  // The placements were never applied to the frames.
  SelectParams p;
  p.budget_tokens = 16;
  Selection s;
  EXPECT_THAT((*sel)->Select(data.query(0), 1, p, &s),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST(PositionalSelectorTest, FactoryRejectsMdciKinds) {
  SelectorConfig c;
  c.kind = SelectorKind::kMdci;
  EXPECT_THAT(NewPositionalSelector(c, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(PositionalSelectorTest, OneTokenInsertsDoNotCopyThePositions) {
  // Inserts used to reserve exactly one more position each time: every
  // one-token append copied the whole array.
  SelectorConfig c;
  c.kind = SelectorKind::kQuest;
  c.head_dim = kDim;
  auto frames = OwnedPageKeys::ForSelector(c);
  ASSERT_THAT(frames, IsOk());
  auto sel = Selector::Create(c, frames->get());
  ASSERT_THAT(sel, IsOk());
  const HeadData data = MakeSyntheticHead(3000, 1, 1, 82);
  std::vector<Placement> pl;
  ASSERT_THAT((*sel)->Build(data.keys.data(), 1000, &pl), IsOk());
  const int32_t* before = (*sel)->positions(0);
  for (int64_t t = 1000; t < 3000; ++t) ASSERT_THAT((*sel)->Insert(data.key(t), 1, &pl), IsOk());
  EXPECT_EQ((*sel)->positions(0), before);
  EXPECT_EQ((*sel)->num_tokens(), 3000);
  EXPECT_EQ((*sel)->positions(2999 / c.page_tokens)[2999 % c.page_tokens], 2999);
}

}  // namespace
}  // namespace icecache
