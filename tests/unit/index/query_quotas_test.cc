// The mdci descent with per-query quotas (MdciParams.query_quotas) on a group
// whose queries disagree: query 0 spreads its mass over a large cluster of
// loud keys, query 1 puts most of its mass on a few quieter keys. Ranked by
// the loudest query, every candidate comes from query 0's cluster and query 1
// gets nothing; with quotas each query brings its own best nodes.
#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "server/index/owned_page_keys.h"
#include "server/index/quality.h"
#include "server/index/selector.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;

constexpr int kDim = 64;

struct Data {
  std::vector<float> keys;     // n x kDim, by position
  std::vector<float> queries;  // 2 x kDim
  int64_t n = 0;
};

Data Disagreeing(uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  // 0: background, 1: query 0's loud cluster (logit ~6), 2: query 1's keys (logit ~5).
  std::vector<int> kind(4096, 0);
  kind.insert(kind.end(), 1024, 1);
  kind.insert(kind.end(), 48, 2);
  std::shuffle(kind.begin(), kind.end(), rng);
  Data d;
  d.n = static_cast<int64_t>(kind.size());
  d.keys.resize(d.n * kDim);
  for (int64_t i = 0; i < d.n; ++i) {
    float* k = &d.keys[i * kDim];
    for (int c = 0; c < kDim; ++c) k[c] = (kind[i] == 0 ? 0.3f : 0.1f) * g(rng);
    if (kind[i] == 1) k[0] += 2.0f;
    if (kind[i] == 2) k[1] += 1.67f;
  }
  d.queries.assign(2 * kDim, 0.0f);
  d.queries[0] = 24.0f;         // query 0 along e0
  d.queries[kDim + 1] = 24.0f;  // query 1 along e1
  return d;
}

// Mean over the two queries of the mass each one's selection holds.
double SelectedMass(const Data& d, bool quotas) {
  SelectorConfig c;
  c.kind = SelectorKind::kMdci;
  c.head_dim = kDim;
  c.dtype = DType::kF32;
  c.page_tokens = 16;
  c.num_query_heads = 2;
  c.mdci.candidate_factor = 1.0f;  // candidates are scarce: 4 nodes for a budget of 64
  c.mdci.min_candidate_pages = 0;
  c.mdci.query_quotas = quotas;
  auto frames = OwnedPageKeys::ForSelector(c);
  EXPECT_THAT(frames, IsOk());
  auto sel = Selector::Create(c, frames->get());
  EXPECT_THAT(sel, IsOk());
  std::vector<Placement> pl;
  EXPECT_THAT((*sel)->Build(d.keys.data(), d.n, &pl), IsOk());
  EXPECT_THAT((*frames)->Apply(pl, d.keys.data()), IsOk());
  SelectParams p;
  p.budget_tokens = 64;
  p.sink_tokens = 0;
  p.want_positions = true;
  Selection out;
  EXPECT_THAT((*sel)->Select(d.queries.data(), 2, p, &out), IsOk());
  auto ex = ComputeExactAttention(d.keys.data(), nullptr, d.n, kDim, d.queries.data(), 2);
  EXPECT_THAT(ex, IsOk());
  auto mass = MassRecall(*ex, out.positions);
  EXPECT_THAT(mass, IsOk());
  return mass.ok() ? *mass : 0.0;
}

TEST(QueryQuotasTest, EveryQueryOfADisagreeingGroupGetsItsOwnCandidates) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    const Data d = Disagreeing(seed);
    const double loudest = SelectedMass(d, /*quotas=*/false);
    const double quotas = SelectedMass(d, /*quotas=*/true);
    // Query 1 gets candidates of its own (its keys share nodes with others).
    EXPECT_GT(quotas, 0.05) << "seed " << seed;
    EXPECT_GT(quotas, 2 * loudest) << "seed " << seed << ": loudest-query ranking " << loudest;
  }
}

}  // namespace
}  // namespace icecache
