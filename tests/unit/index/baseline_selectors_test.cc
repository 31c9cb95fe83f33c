// The baseline selectors (docs/architecture.md §3.8) against naive
// references of their scoring on small data, and their bad parameters. The
// shared contract is in selector_typed_test.cc.
#include <algorithm>
#include <cmath>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/index/owned_page_keys.h"
#include "server/index/positional_layout.h"
#include "server/index/selector.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/index_test_data.h"

namespace icecache {
namespace {

using ::icecache::testing::HeadData;
using ::icecache::testing::IsOk;
using ::icecache::testing::MakeSyntheticHead;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

constexpr int kPage = 16;

struct Built {
  std::unique_ptr<OwnedPageKeys> frames;
  std::unique_ptr<Selector> sel;
};

SelectorConfig Config(SelectorKind kind, const HeadData& d) {
  SelectorConfig c;
  c.kind = kind;
  c.head_dim = d.dim;
  c.dtype = DType::kF32;
  c.page_tokens = kPage;
  c.num_query_heads = d.num_queries;
  return c;
}

// Builds `prefill` keys in bulk and inserts the rest one chunk of 7 at a time.
Built Build(const SelectorConfig& c, const HeadData& d, int64_t prefill) {
  Built b;
  auto frames = OwnedPageKeys::ForSelector(c);
  EXPECT_THAT(frames, IsOk());
  b.frames = std::move(*frames);
  auto sel = Selector::Create(c, b.frames.get());
  EXPECT_THAT(sel, IsOk());
  if (!sel.ok()) return b;
  b.sel = std::move(*sel);
  std::vector<Placement> pl;
  EXPECT_THAT(b.sel->Build(d.keys.data(), prefill, &pl), IsOk());
  EXPECT_THAT(b.frames->Apply(pl, d.keys.data()), IsOk());
  for (int64_t at = prefill; at < d.n; at += 7) {
    const int64_t n = std::min<int64_t>(7, d.n - at);
    EXPECT_THAT(b.sel->Insert(d.key(at), n, &pl), IsOk());
    EXPECT_THAT(b.frames->Apply(pl, d.key(at)), IsOk());
  }
  return b;
}

// Naive GQA token shares: share[i] = sum_j softmax_j(i) in double.
std::vector<double> NaiveShares(const HeadData& d, const float* q) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(d.dim));
  std::vector<double> share(d.n, 0.0);
  for (int j = 0; j < d.num_queries; ++j) {
    std::vector<double> l(d.n);
    double mx = -INFINITY;
    for (int64_t i = 0; i < d.n; ++i) {
      double s = 0;
      for (int c = 0; c < d.dim; ++c) s += double(q[j * d.dim + c]) * d.key(i)[c];
      l[i] = s * scale;
      mx = std::max(mx, l[i]);
    }
    double z = 0;
    for (double x : l) z += std::exp(x - mx);
    for (int64_t i = 0; i < d.n; ++i) share[i] += std::exp(l[i] - mx) / z;
  }
  return share;
}

// The selected tokens hold at least `fraction` of the best possible sum of
// shares for their count (an exact top-k gets 1).
void ExpectTopShares(const std::vector<double>& share, const std::vector<int32_t>& got,
                     double fraction) {
  std::set<int32_t> unique(got.begin(), got.end());
  ASSERT_EQ(unique.size(), got.size());
  std::vector<double> sorted = share;
  std::sort(sorted.rbegin(), sorted.rend());
  double best = 0, have = 0;
  for (size_t i = 0; i < got.size(); ++i) best += sorted[i];
  for (int32_t p : got) have += share[p];
  EXPECT_GE(have, fraction * best - 1e-9) << "selected " << got.size() << " tokens";
}

const TokenRanker& Ranker(const Built& b) {
  const auto* r = dynamic_cast<const TokenRanker*>(b.sel.get());
  EXPECT_NE(r, nullptr);
  return *r;
}

SelectParams Params(int budget) {
  SelectParams p;
  p.budget_tokens = budget;
  p.sink_tokens = 0;
  return p;
}

TEST(OmnikvSelectorTest, TokensAreTheExactTopByGroupShare) {
  const HeadData d = MakeSyntheticHead(400, 2, 3, 21);
  const Built b = Build(Config(SelectorKind::kOmnikv, d), d, 300);
  for (int s = 0; s < d.steps; ++s) {
    std::vector<int32_t> got;
    ASSERT_THAT(Ranker(b).SelectTokens(d.query(s), 2, Params(40), &got), IsOk());
    ASSERT_EQ(got.size(), 40u);
    ExpectTopShares(NaiveShares(d, d.query(s)), got, 1.0 - 1e-5);
  }
}

TEST(PqcacheSelectorTest, WithACentroidPerKeyTheCodesAreExact) {
  // 200 keys and 2^8 centroids: k-means starts from every key, so each key is
  // its own centroid and PQ scores are exact.
  const HeadData d = MakeSyntheticHead(200, 2, 3, 22);
  SelectorConfig c = Config(SelectorKind::kPqcache, d);
  c.baseline.pq_bits = 8;
  c.baseline.pq_rescore_factor = 1.0f;
  const Built b = Build(c, d, 200);
  for (int s = 0; s < d.steps; ++s) {
    std::vector<int32_t> got;
    ASSERT_THAT(Ranker(b).SelectTokens(d.query(s), 2, Params(30), &got), IsOk());
    ExpectTopShares(NaiveShares(d, d.query(s)), got, 1.0 - 1e-5);
  }
}

TEST(PqcacheSelectorTest, CoarseCodesWithRescoringKeepMostOfTheMass) {
  const HeadData d = MakeSyntheticHead(2000, 2, 4, 23);
  const Built b = Build(Config(SelectorKind::kPqcache, d), d, 1800);
  for (int s = 0; s < d.steps; ++s) {
    std::vector<int32_t> got;
    ASSERT_THAT(Ranker(b).SelectTokens(d.query(s), 2, Params(128), &got), IsOk());
    ExpectTopShares(NaiveShares(d, d.query(s)), got, 0.5);
  }
}

TEST(MdciPublishedSelectorTest, WithEveryKeyACandidateItIsExact) {
  const HeadData d = MakeSyntheticHead(500, 2, 3, 24);
  SelectorConfig c = Config(SelectorKind::kMdciPublished, d);
  c.baseline.dci_candidate_factor = 100.0f;  // 100 x 20 >= 500: every key
  const Built b = Build(c, d, 420);          // 80 tail keys scored exactly
  for (int s = 0; s < d.steps; ++s) {
    std::vector<int32_t> got;
    ASSERT_THAT(Ranker(b).SelectTokens(d.query(s), 2, Params(20), &got), IsOk());
    ExpectTopShares(NaiveShares(d, d.query(s)), got, 1.0 - 1e-5);
  }
}

TEST(ArkvaleSelectorTest, PagesRankByTheGroupScoreOfTheirBoxBounds) {
  const HeadData d = MakeSyntheticHead(320, 2, 2, 25);
  const Built b = Build(Config(SelectorKind::kArkvale, d), d, 320);
  const int pages = 320 / kPage;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d.dim));
  for (int s = 0; s < d.steps; ++s) {
    const float* q = d.query(s);
    // Naive: bound[p][j] = max over the box of q_j.k; shares of a softmax over pages.
    std::vector<double> score(pages, 0.0);
    for (int j = 0; j < 2; ++j) {
      std::vector<double> bound(pages);
      for (int p = 0; p < pages; ++p) {
        double u = 0;
        for (int c = 0; c < d.dim; ++c) {
          double lo = INFINITY, hi = -INFINITY;
          for (int t = 0; t < kPage; ++t) {
            lo = std::min(lo, double(d.key(p * kPage + t)[c]));
            hi = std::max(hi, double(d.key(p * kPage + t)[c]));
          }
          u += std::max(q[j * d.dim + c] * lo, q[j * d.dim + c] * hi);
        }
        bound[p] = u * scale;
      }
      const double mx = *std::max_element(bound.begin(), bound.end());
      double z = 0;
      for (double x : bound) z += std::exp(x - mx);
      for (int p = 0; p < pages; ++p) score[p] += std::exp(bound[p] - mx) / z;
    }
    Selection out;
    ASSERT_THAT(b.sel->Select(q, 2, Params(5 * kPage), &out), IsOk());
    ASSERT_EQ(out.pages.size(), 5u);
    for (size_t i = 0; i < out.pages.size(); ++i) {
      EXPECT_NEAR(out.scores[i], std::log(score[out.pages[i]]), 1e-3) << "page " << out.pages[i];
      for (int p = 0; p < pages; ++p) {
        if (std::find(out.pages.begin(), out.pages.end(), p) == out.pages.end()) {
          EXPECT_GE(score[out.pages[i]], score[p] * (1 - 1e-4)) << "page " << p << " missed";
        }
      }
    }
  }
}

TEST(SnapkvSelectorTest, KeepsTheWindowAndTheBestPooledVotesFixedAtTheFirstSelect) {
  const HeadData d = MakeSyntheticHead(300, 2, 3, 26);
  SelectorConfig c = Config(SelectorKind::kSnapkv, d);
  const Built b = Build(c, d, 300);
  const int window = c.baseline.snapkv_window, kernel = c.baseline.snapkv_kernel;
  const int64_t prefix = d.n - window;
  // Naive votes of the first call's queries, max-pooled.
  const std::vector<double> share = NaiveShares(d, d.query(0));
  std::vector<double> vote(prefix);
  for (int64_t i = 0; i < prefix; ++i) {
    vote[i] = -INFINITY;
    for (int64_t t = std::max<int64_t>(0, i - kernel / 2);
         t <= std::min<int64_t>(prefix - 1, i + kernel / 2); ++t) {
      vote[i] = std::max(vote[i], share[t]);
    }
  }
  std::vector<int32_t> first;
  ASSERT_THAT(Ranker(b).SelectTokens(d.query(0), 2, Params(100), &first), IsOk());
  ASSERT_EQ(first.size(), 100u);
  std::set<int32_t> kept(first.begin(), first.end());
  for (int64_t i = prefix; i < d.n; ++i) EXPECT_TRUE(kept.count(i)) << "window token " << i;
  double worst_kept = INFINITY, best_dropped = -INFINITY;
  for (int64_t i = 0; i < prefix; ++i) {
    (kept.count(i) ? worst_kept : best_dropped) =
        kept.count(i) ? std::min(worst_kept, vote[i]) : std::max(best_dropped, vote[i]);
  }
  EXPECT_GE(worst_kept, best_dropped - 1e-5);
  // Fixed: other queries get the same set.
  std::vector<int32_t> later;
  ASSERT_THAT(Ranker(b).SelectTokens(d.query(2), 2, Params(100), &later), IsOk());
  EXPECT_EQ(std::set<int32_t>(later.begin(), later.end()), kept);
}

TEST(MagicpigSelectorTest, WithCertainSamplingTheEstimateIsExactAttention) {
  // K = 1 bit, 256 tables, 1 collision: every key with an angle below ~170
  // degrees is sampled with probability ~1, so the estimate is the exact
  // attention output.
  const HeadData d = MakeSyntheticHead(300, 2, 2, 27);
  SelectorConfig c = Config(SelectorKind::kMagicpig, d);
  c.baseline.magicpig_bits = 1;
  c.baseline.magicpig_tables = 256;
  c.baseline.magicpig_min_collisions = 1;
  const Built b = Build(c, d, 300);
  const auto* est = dynamic_cast<const AttentionEstimator*>(b.sel.get());
  ASSERT_NE(est, nullptr);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d.dim));
  for (int s = 0; s < d.steps; ++s) {
    std::vector<float> out(2 * d.dim);
    int64_t sampled = 0;
    ASSERT_THAT(
        est->EstimateOutput(d.query(s), 2, Params(16), d.values.data(), out.data(), &sampled),
        IsOk());
    EXPECT_GT(sampled, 2 * 250);
    for (int j = 0; j < 2; ++j) {
      const float* q = d.query(s) + j * d.dim;
      std::vector<double> l(d.n);
      double mx = -INFINITY;
      for (int64_t i = 0; i < d.n; ++i) {
        double x = 0;
        for (int k = 0; k < d.dim; ++k) x += double(q[k]) * d.key(i)[k];
        l[i] = x * scale;
        mx = std::max(mx, l[i]);
      }
      double z = 0, err = 0, norm = 0;
      std::vector<double> o(d.dim, 0.0);
      for (int64_t i = 0; i < d.n; ++i) {
        const double w = std::exp(l[i] - mx);
        z += w;
        for (int k = 0; k < d.dim; ++k) o[k] += w * d.values[i * d.dim + k];
      }
      for (int k = 0; k < d.dim; ++k) {
        o[k] /= z;
        err += (o[k] - out[j * d.dim + k]) * (o[k] - out[j * d.dim + k]);
        norm += o[k] * o[k];
      }
      EXPECT_LT(std::sqrt(err / norm), 0.02) << "step " << s << " query " << j;
    }
  }
}

TEST(MagicpigSelectorTest, FewerBitsPerTableSampleMoreKeysAndNullValuesAreRefused) {
  // A table collides with probability u^K: fewer bits, more samples.
  const HeadData d = MakeSyntheticHead(2000, 2, 2, 28);
  int64_t sampled[2] = {0, 0};
  for (int i = 0; i < 2; ++i) {
    SelectorConfig c = Config(SelectorKind::kMagicpig, d);
    c.baseline.magicpig_bits = i == 0 ? 10 : 4;
    const Built b = Build(c, d, 2000);
    const auto* est = dynamic_cast<const AttentionEstimator*>(b.sel.get());
    ASSERT_NE(est, nullptr);
    std::vector<float> out(2 * d.dim);
    ASSERT_THAT(
        est->EstimateOutput(d.query(0), 2, Params(16), d.values.data(), out.data(), &sampled[i]),
        IsOk());
    EXPECT_THAT(est->EstimateOutput(d.query(0), 2, Params(16), nullptr, out.data(), nullptr),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("values")));
  }
  EXPECT_GT(sampled[1], sampled[0]) << "K = 4 sampled " << sampled[1] << ", K = 10 " << sampled[0];
}

TEST(BaselineParamsTest, BadParametersNameTheFieldAndTheValue) {
  auto frames = OwnedPageKeys::Create(64, DType::kF16, kPage);
  ASSERT_THAT(frames, IsOk());
  struct Case {
    SelectorKind kind;
    const char* message;
    void (*mutate)(BaselineParams*);
  };
  const Case cases[] = {
      {SelectorKind::kPqcache,
       "baseline.pq_subspaces must be in [1, 64] and divide head_dim 64, got 3",
       [](BaselineParams* p) { p->pq_subspaces = 3; }},
      {SelectorKind::kPqcache, "baseline.pq_bits must be in [1, 8], got 9",
       [](BaselineParams* p) { p->pq_bits = 9; }},
      {SelectorKind::kPqcache, "baseline.pq_kmeans_iters must be >= 1, got 0",
       [](BaselineParams* p) { p->pq_kmeans_iters = 0; }},
      {SelectorKind::kPqcache, "baseline.pq_rescore_factor must be finite and >= 1, got 0.5",
       [](BaselineParams* p) { p->pq_rescore_factor = 0.5f; }},
      {SelectorKind::kSnapkv, "baseline.snapkv_window must be >= 1, got 0",
       [](BaselineParams* p) { p->snapkv_window = 0; }},
      {SelectorKind::kSnapkv, "baseline.snapkv_kernel must be odd and in [1, 255], got 6",
       [](BaselineParams* p) { p->snapkv_kernel = 6; }},
      {SelectorKind::kMagicpig, "baseline.magicpig_bits must be in [1, 16], got 17",
       [](BaselineParams* p) { p->magicpig_bits = 17; }},
      {SelectorKind::kMagicpig, "baseline.magicpig_tables must be in [1, 1024], got 0",
       [](BaselineParams* p) { p->magicpig_tables = 0; }},
      {SelectorKind::kMagicpig,
       "baseline.magicpig_min_collisions must be in [1, magicpig_tables = 150], got 151",
       [](BaselineParams* p) { p->magicpig_min_collisions = 151; }},
      {SelectorKind::kMdciPublished, "baseline.dci_num_composite must be in [1, 64], got 0",
       [](BaselineParams* p) { p->dci_num_composite = 0; }},
      {SelectorKind::kMdciPublished, "baseline.dci_num_simple must be in [1, 255], got 256",
       [](BaselineParams* p) { p->dci_num_simple = 256; }},
      {SelectorKind::kMdciPublished, "baseline.dci_num_levels must be in [1, 16], got 17",
       [](BaselineParams* p) { p->dci_num_levels = 17; }},
      {SelectorKind::kMdciPublished, "baseline.dci_field_of_view must be in [1, 1048576], got 0",
       [](BaselineParams* p) { p->dci_field_of_view = 0; }},
      {SelectorKind::kMdciPublished,
       "baseline.dci_candidate_factor must be finite and >= 1, got nan",
       [](BaselineParams* p) { p->dci_candidate_factor = NAN; }},
  };
  for (const Case& c : cases) {
    SelectorConfig config;
    config.kind = c.kind;
    config.head_dim = 64;
    config.page_tokens = kPage;
    c.mutate(&config.baseline);
    EXPECT_THAT(Selector::Create(config, frames->get()),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.message)));
    // Other kinds ignore the field.
    config.kind = SelectorKind::kArkvale;
    EXPECT_THAT(Selector::Create(config, frames->get()), IsOk());
  }
}

TEST(BaselineKindsTest, NamesParseAndUseThePositionalLayout) {
  for (const char* name :
       {"arkvale", "pqcache", "snapkv", "omnikv", "magicpig", "mdci-published"}) {
    auto kind = ParseSelectorKind(name);
    ASSERT_THAT(kind, IsOk()) << name;
    EXPECT_EQ(SelectorKindName(*kind), name);
    EXPECT_TRUE(UsesPositionalLayout(*kind));
  }
  EXPECT_FALSE(UsesPositionalLayout(SelectorKind::kMdci));
  EXPECT_THAT(ParseSelectorKind("h2o"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("mdci-published")));
}

}  // namespace
}  // namespace icecache
