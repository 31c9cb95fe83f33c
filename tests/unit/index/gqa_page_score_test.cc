// Right GQA page scores (page_select.h, GroupPageScore): on a group whose
// queries disagree (one query with large, flat logits; the others retrieving
// rare needles), the exact page oracles must capture at least as much of the
// group's attention mass as token-level top-k hits rounded up to pages at the
// same budget; with the max-over-queries score they did not.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "server/index/owned_page_keys.h"
#include "server/index/page_select.h"
#include "server/index/quality.h"
#include "server/index/selector.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;

constexpr int kDim = 64;
constexpr int kGroup = 4;
constexpr int kPage = 16;
constexpr int64_t kTokens = 4096;

struct Disagreeing {
  std::vector<float> keys;     // kTokens x kDim
  std::vector<float> queries;  // kGroup x kDim
};

// Every key has a common component 3 e0, so query 0 (20 e0) sees large,
// almost equal logits everywhere; queries 1..3 each retrieve 12 needles
// (5 v_j on top of the common part) scattered over the context.
Disagreeing MakeDisagreeingGroup(uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::uniform_int_distribution<int64_t> pos(0, kTokens - 1);
  Disagreeing d;
  d.keys.resize(static_cast<size_t>(kTokens) * kDim);
  for (int64_t i = 0; i < kTokens; ++i) {
    float* k = &d.keys[i * kDim];
    k[0] = 3.0f;
    for (int c = 1; c < kDim; ++c) k[c] = g(rng);
  }
  d.queries.assign(static_cast<size_t>(kGroup) * kDim, 0.0f);
  d.queries[0] = 20.0f;
  for (int j = 1; j < kGroup; ++j) {
    std::vector<float> v(kDim, 0.0f);
    float norm = 0.0f;
    for (int c = 1; c < kDim; ++c) norm += (v[c] = g(rng)) * v[c];
    for (int c = 1; c < kDim; ++c) v[c] /= std::sqrt(norm);
    for (int c = 1; c < kDim; ++c) d.queries[j * kDim + c] = 12.0f * v[c];
    for (int t = 0; t < 12; ++t) {
      float* k = &d.keys[pos(rng) * kDim];
      for (int c = 1; c < kDim; ++c) k[c] = 5.0f * v[c] + 0.3f * g(rng);
    }
  }
  return d;
}

struct Built {
  std::unique_ptr<OwnedPageKeys> frames;
  std::unique_ptr<Selector> sel;
};

Built Build(SelectorKind kind, const Disagreeing& d) {
  SelectorConfig c;
  c.kind = kind;
  c.head_dim = kDim;
  c.dtype = DType::kF32;
  c.page_tokens = kPage;
  c.num_query_heads = kGroup;
  Built b;
  auto frames = OwnedPageKeys::ForSelector(c);
  EXPECT_THAT(frames.status(), IsOk());
  b.frames = std::move(frames).value();
  auto sel = Selector::Create(c, b.frames.get());
  EXPECT_THAT(sel.status(), IsOk());
  b.sel = std::move(sel).value();
  std::vector<Placement> pl;
  EXPECT_THAT(b.sel->Build(d.keys.data(), kTokens, &pl), IsOk());
  EXPECT_THAT(b.frames->Apply(pl, d.keys.data()), IsOk());
  return b;
}

// Page of every position of `sel`.
std::vector<uint32_t> PageOfPosition(const Selector& sel) {
  std::vector<uint32_t> page_of(sel.num_tokens());
  for (uint32_t p = 0; p < sel.num_pages(); ++p) {
    for (uint32_t s = 0; s < sel.fill(p); ++s) page_of[sel.positions(p)[s]] = p;
  }
  return page_of;
}

// Tokens in `ranked` order rounded up to their pages, pages taken until
// `budget` tokens are covered; returns the covered positions.
std::vector<int32_t> RoundUpToPages(const Selector& sel, const std::vector<int32_t>& ranked,
                                    int64_t budget) {
  const std::vector<uint32_t> page_of = PageOfPosition(sel);
  std::vector<uint8_t> taken(sel.num_pages(), 0);
  std::vector<int32_t> out;
  for (int32_t t : ranked) {
    if (static_cast<int64_t>(out.size()) >= budget) break;
    const uint32_t p = page_of[t];
    if (taken[p]) continue;
    taken[p] = 1;
    out.insert(out.end(), sel.positions(p), sel.positions(p) + sel.fill(p));
  }
  return out;
}

// Token rankings a token-level peer could produce: by the max over queries
// of the softmax share, by its sum, and each query's top tokens in turn
// (an ANN index per query, hits merged by rank).
std::vector<std::vector<int32_t>> TokenRankings(const ExactAttention& ex) {
  const int64_t n = ex.n;
  std::vector<std::vector<int32_t>> rankings;
  for (int mode = 0; mode < 2; ++mode) {
    std::vector<double> key(n, 0.0);
    for (int j = 0; j < ex.num_queries; ++j) {
      for (int64_t i = 0; i < n; ++i) {
        const double p = ex.probs[j * n + i];
        key[i] = mode == 0 ? std::max(key[i], p) : key[i] + p;
      }
    }
    std::vector<int32_t> r(n);
    for (int64_t i = 0; i < n; ++i) r[i] = static_cast<int32_t>(i);
    std::stable_sort(r.begin(), r.end(), [&](int32_t a, int32_t b) { return key[a] > key[b]; });
    rankings.push_back(std::move(r));
  }
  std::vector<std::vector<int32_t>> per_query(ex.num_queries);
  for (int j = 0; j < ex.num_queries; ++j) {
    per_query[j].resize(n);
    for (int64_t i = 0; i < n; ++i) per_query[j][i] = static_cast<int32_t>(i);
    std::stable_sort(per_query[j].begin(), per_query[j].end(), [&](int32_t a, int32_t b) {
      return ex.logits[j * n + a] > ex.logits[j * n + b];
    });
  }
  std::vector<int32_t> merged;
  for (int64_t r = 0; r < n; ++r) {
    for (int j = 0; j < ex.num_queries; ++j) merged.push_back(per_query[j][r]);
  }
  rankings.push_back(std::move(merged));
  return rankings;
}

double Mass(const ExactAttention& ex, const std::vector<int32_t>& positions) {
  auto m = MassRecall(ex, positions);
  EXPECT_THAT(m.status(), IsOk());
  return m.ok() ? *m : 0.0;
}

TEST(GqaPageScoreTest, ExactPageOracleNeverBeatenByTokenHitsRoundedToPages) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    const Disagreeing d = MakeDisagreeingGroup(seed);
    auto ex =
        ComputeExactAttention(d.keys.data(), nullptr, kTokens, kDim, d.queries.data(), kGroup);
    ASSERT_THAT(ex.status(), IsOk());
    for (SelectorKind kind : {SelectorKind::kExact, SelectorKind::kExactMdci}) {
      Built b = Build(kind, d);
      ASSERT_NE(b.sel, nullptr);
      for (int64_t budget : {64, 256}) {
        SelectParams params;
        params.budget_tokens = static_cast<int>(budget);
        params.sink_tokens = 0;
        Selection sel;
        ASSERT_THAT(b.sel->Select(d.queries.data(), kGroup, params, &sel), IsOk());
        auto pos = SelectionPositions(*b.sel, sel);
        ASSERT_THAT(pos.status(), IsOk());
        const double ours = Mass(*ex, *pos);
        // The true page oracle on the same layout (quality.h): the same pages.
        auto oracle = OraclePages(*ex, *b.sel, params);
        ASSERT_THAT(oracle.status(), IsOk());
        auto oracle_pos = SelectionPositions(*b.sel, *oracle);
        ASSERT_THAT(oracle_pos.status(), IsOk());
        EXPECT_NEAR(ours, Mass(*ex, *oracle_pos), 1e-4)
            << SelectorKindName(kind) << " seed " << seed << " budget " << budget;
        // Token-level hits rounded up to whole pages cover at least as many
        // tokens (the last page may cross the budget), never more mass.
        for (const auto& ranking : TokenRankings(*ex)) {
          const double peer = Mass(*ex, RoundUpToPages(*b.sel, ranking, budget));
          EXPECT_GE(ours, peer - 1e-4)
              << SelectorKindName(kind) << " seed " << seed << " budget " << budget;
        }
      }
    }
  }
}

TEST(GqaPageScoreTest, GroupScoreIsTheSumOfEachQuerysShare) {
  // Two queries, two pages: query 0 has large logits, query 1 small ones.
  const float lse[4] = {100.0f, -3.0f,  // page 0
                        99.0f, 2.0f};   // page 1
  float norm[2];
  QueryLogNorms(lse, 2, 2, nullptr, norm);
  EXPECT_NEAR(norm[0], 100.0f + std::log1p(std::exp(-1.0f)), 1e-4);
  EXPECT_NEAR(norm[1], 2.0f + std::log1p(std::exp(-5.0f)), 1e-4);
  const double share00 = 1.0 / (1.0 + std::exp(-1.0)), share01 = 1.0 - share00;
  const double share10 = std::exp(-5.0) / (1.0 + std::exp(-5.0)), share11 = 1.0 - share10;
  EXPECT_NEAR(std::exp(GroupPageScore(&lse[0], norm, 2)), share00 + share10, 1e-4);
  EXPECT_NEAR(std::exp(GroupPageScore(&lse[2], norm, 2)), share01 + share11, 1e-4);
  // Page 1 wins although query 0's unnormalised mass is larger on page 0.
  EXPECT_GT(GroupPageScore(&lse[2], norm, 2), GroupPageScore(&lse[0], norm, 2));
  // A known mass outside the pages lowers every share.
  const float rest[2] = {100.0f, 2.0f};
  float norm_rest[2];
  QueryLogNorms(lse, 2, 2, rest, norm_rest);
  EXPECT_GT(norm_rest[0], norm[0]);
  EXPECT_GT(norm_rest[1], norm[1]);
}

TEST(GqaPageScoreTest, LogSumExpIsStable) {
  std::vector<float> x(37, -1000.0f);
  EXPECT_NEAR(LogSumExp(x.data(), x.size()), -1000.0f + std::log(37.0f), 1e-3);
  x[5] = 1000.0f;
  EXPECT_NEAR(LogSumExp(x.data(), x.size()), 1000.0f, 1e-3);
  EXPECT_EQ(LogSumExp(x.data(), 0), -std::numeric_limits<float>::infinity());
}

}  // namespace
}  // namespace icecache
