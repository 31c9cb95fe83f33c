#include "server/index/mdci_selector.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/mdci_test_util.h"

namespace icecache {
namespace {

using ::icecache::mdci_test::ClusteredKeys;
using ::icecache::mdci_test::GaussianRows;
using ::icecache::mdci_test::MassOf;
using ::icecache::mdci_test::SelectedPositions;
using ::icecache::mdci_test::TestPageKeys;
using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

struct Fixture {
  SelectorConfig config;
  std::unique_ptr<TestPageKeys> keys;
  std::unique_ptr<Selector> sel;
};

Fixture Make(SelectorKind kind, int d, int P, int G, DType dtype = DType::kF32,
             MdciParams mdci = MdciParams()) {
  Fixture f;
  f.config.kind = kind;
  f.config.head_dim = d;
  f.config.page_tokens = P;
  f.config.num_query_heads = G;
  f.config.dtype = dtype;
  f.config.mdci = mdci;
  f.keys = std::make_unique<TestPageKeys>(d, P, dtype);
  auto s = Selector::Create(f.config, f.keys.get());
  EXPECT_THAT(s, IsOk());
  f.sel = std::move(s).value();
  return f;
}

void BuildAll(Fixture& f, const std::vector<float>& k, int64_t n) {
  std::vector<Placement> pl;
  ASSERT_THAT(f.sel->Build(k.data(), n, &pl), IsOk());
  f.keys->Apply(k.data(), pl);
}

// Queries aimed at random keys (so attention is peaked on a few clusters).
std::vector<float> AimedQueries(const std::vector<float>& keys, int64_t n, int d, int nq,
                                float gain, uint64_t seed) {
  auto noise = GaussianRows(nq, d, 0.3f, seed);
  std::vector<float> q(static_cast<size_t>(nq) * d);
  for (int j = 0; j < nq; ++j) {
    const int64_t src = (seed * 7919 + j * 104729) % n;
    for (int k = 0; k < d; ++k) q[j * d + k] = gain * (keys[src * d + k] + noise[j * d + k]);
  }
  return q;
}

TEST(MdciSelectorTest, CreatesBothKinds) {
  for (SelectorKind kind : {SelectorKind::kMdci, SelectorKind::kExactMdci}) {
    Fixture f = Make(kind, 16, 8, 2);
    ASSERT_NE(f.sel, nullptr);
    EXPECT_EQ(f.sel->kind(), kind);
  }
}

TEST(MdciSelectorTest, WideFieldOfViewMatchesExactMdci) {
  const int d = 32, P = 8, G = 2;
  const int64_t n = 4096;
  auto k = ClusteredKeys(n, d, 40, 0.5f, 21);
  MdciParams wide;
  wide.field_of_view = 64;
  wide.candidate_factor = 16.0f;
  wide.spread_weight = 1.0f;
  Fixture m = Make(SelectorKind::kMdci, d, P, G, DType::kF32, wide);
  Fixture e = Make(SelectorKind::kExactMdci, d, P, G, DType::kF32, wide);
  ASSERT_NO_FATAL_FAILURE(BuildAll(m, k, n));
  ASSERT_NO_FATAL_FAILURE(BuildAll(e, k, n));
  double hit = 0, total = 0;
  for (int step = 0; step < 10; ++step) {
    auto q = AimedQueries(k, n, d, G, 1.5f, 100 + step);
    SelectParams sp;
    sp.budget_tokens = 64;
    sp.sink_tokens = 0;
    Selection sm, se;
    ASSERT_THAT(m.sel->Select(q.data(), G, sp, &sm), IsOk());
    ASSERT_THAT(e.sel->Select(q.data(), G, sp, &se), IsOk());
    EXPECT_LT(sm.keys_touched, static_cast<uint64_t>(n));
    // Top-k recall of mdci against the exact selection on the same layout.
    auto pm = SelectedPositions(*m.sel, sm);
    auto pe = SelectedPositions(*e.sel, se);
    std::set<int32_t> got(pm.begin(), pm.end());
    for (int32_t p : pe) hit += got.count(p);
    total += pe.size();
  }
  EXPECT_GE(hit / total, 0.99);
}

TEST(MdciSelectorTest, MassWithinReachOfExactMdciAndExactMdciScoresEverything) {
  const int d = 32, P = 16, G = 4;
  const int64_t n = 8192;
  auto k = ClusteredKeys(n, d, 100, 0.6f, 31);
  MdciParams mp;  // scaled to the small index: 4 x budget candidates, 12.5% of the keys
  mp.candidate_factor = 4.0f;
  mp.field_of_view = 8;
  Fixture m = Make(SelectorKind::kMdci, d, P, G, DType::kF32, mp);
  Fixture e = Make(SelectorKind::kExactMdci, d, P, G);
  ASSERT_NO_FATAL_FAILURE(BuildAll(m, k, n));
  ASSERT_NO_FATAL_FAILURE(BuildAll(e, k, n));
  ASSERT_EQ(m.sel->num_pages(), e.sel->num_pages());
  double mass_m = 0, mass_e = 0;
  for (int step = 0; step < 8; ++step) {
    auto q = AimedQueries(k, n, d, G, 1.0f, 200 + step);
    SelectParams sp;
    sp.budget_tokens = 256;
    Selection sm, se;
    ASSERT_THAT(m.sel->Select(q.data(), G, sp, &sm), IsOk());
    ASSERT_THAT(e.sel->Select(q.data(), G, sp, &se), IsOk());
    EXPECT_EQ(se.keys_touched, static_cast<uint64_t>(n));
    EXPECT_LT(sm.keys_touched, static_cast<uint64_t>(n) / 3);
    EXPECT_GE(sm.tokens(), 256);
    EXPECT_LT(sm.tokens(), 256 + 2 * P);
    mass_m += MassOf(k.data(), n, d, q.data(), G, SelectedPositions(*m.sel, sm));
    mass_e += MassOf(k.data(), n, d, q.data(), G, SelectedPositions(*e.sel, se));
  }
  EXPECT_GE(mass_m / mass_e, 0.95) << "mdci " << mass_m / 8 << " exact-mdci " << mass_e / 8;
}

TEST(MdciSelectorTest, SinkPagesAreAlwaysIncluded) {
  const int d = 16, P = 8, G = 2;
  const int64_t n = 2048;
  auto k = ClusteredKeys(n, d, 20, 0.5f, 41);
  Fixture f = Make(SelectorKind::kMdci, d, P, G);
  ASSERT_NO_FATAL_FAILURE(BuildAll(f, k, n));
  auto q = AimedQueries(k, n, d, G, 1.0f, 5);
  SelectParams sp;
  sp.budget_tokens = 32;
  sp.sink_tokens = 4;
  sp.recent_tokens = 3;
  sp.want_positions = true;
  Selection sel;
  ASSERT_THAT(f.sel->Select(q.data(), G, sp, &sel), IsOk());
  std::set<int32_t> got(sel.positions.begin(), sel.positions.end());
  for (int32_t p : {0, 1, 2, 3, 2045, 2046, 2047}) EXPECT_EQ(got.count(p), 1u) << p;
}

// Queries along keys inserted one token at a time (decode appends): mdci,
// by the tree's descent and by the PQ scan, finds the exact selection's best
// page (a budget of one page) and the target itself nearly as often as the
// exact selection does. The keys come in shuffled cluster order (no dwell on
// a topic), the hard case for MdciParams::insert_fit. Over 40 seeds the
// descent missed the exact best page for 24 of 2560 targets with every key
// routed, 40 with insert_fit 2 and 130 with a gate that takes every key
// (insert_fit 1e6); the scan 10, 11 and 10 (docs/bench/fit56.md). On these
// 8 seeds the default gives 3 and 3 misses; the gate that takes every key
// fails the bounds (the descent: 18 misses, and 96 targets found of 113).
TEST(MdciSelectorTest, InsertedTokensAreSelectable) {
  const int d = 32, P = 16, G = 2, kSeeds = 8;
  const int64_t n = 4096, inserted = 64;
  for (float pq : {0.0f, 8.0f}) {
    int misses = 0, found = 0, found_exact = 0;
    for (int seed = 0; seed < kSeeds; ++seed) {
      auto k = ClusteredKeys(n + inserted, d, 30, 0.5f, 1000 + seed);
      MdciParams mp;
      mp.pq_factor = pq;
      Fixture f = Make(SelectorKind::kMdci, d, P, G, DType::kF16, mp);
      Fixture e = Make(SelectorKind::kExactMdci, d, P, G, DType::kF16, mp);  // the same layout
      ASSERT_NO_FATAL_FAILURE(BuildAll(f, k, n));
      ASSERT_NO_FATAL_FAILURE(BuildAll(e, k, n));
      std::vector<Placement> pl;
      for (int64_t chunk = 0; chunk < inserted / 16; ++chunk) {
        for (Fixture* x : {&f, &e}) {
          ASSERT_THAT(x->sel->Insert(&k[(n + 16 * chunk) * d], 16, &pl), IsOk());
          x->keys->Apply(&k[(n + 16 * chunk) * d], pl);
        }
      }
      ASSERT_EQ(f.sel->num_tokens(), n + inserted);
      for (int64_t target = n; target < n + inserted; ++target) {
        std::vector<float> q(static_cast<size_t>(G) * d);
        for (int j = 0; j < G; ++j) {
          for (int c = 0; c < d; ++c) q[j * d + c] = 4.0f * k[target * d + c];
        }
        SelectParams sp;
        sp.budget_tokens = 16;
        sp.sink_tokens = 0;
        sp.want_positions = true;
        Selection sm, se;
        ASSERT_THAT(f.sel->Select(q.data(), G, sp, &sm), IsOk());
        ASSERT_THAT(e.sel->Select(q.data(), G, sp, &se), IsOk());
        ASSERT_FALSE(se.pages.empty());
        misses += std::find(sm.pages.begin(), sm.pages.end(), se.pages[0]) == sm.pages.end();
        found += std::find(sm.positions.begin(), sm.positions.end(), target) != sm.positions.end();
        found_exact +=
            std::find(se.positions.begin(), se.positions.end(), target) != se.positions.end();
      }
    }
    const int targets = kSeeds * static_cast<int>(inserted);
    EXPECT_LE(misses, targets / 50) << "pq " << pq;  // 2%
    EXPECT_GE(found, 0.9 * found_exact) << "pq " << pq;
    EXPECT_GE(found, targets / 8) << "pq " << pq;
  }
}

TEST(MdciSelectorTest, RebuildKeepsLayoutAndResultsSane) {
  const int d = 16, P = 8, G = 2;
  const int64_t n = 2048;
  auto k = ClusteredKeys(n, d, 20, 0.5f, 61);
  MdciParams mp;
  mp.norm_headroom = 1.0f;
  mp.rebuild_fraction = 0.01f;
  Fixture f = Make(SelectorKind::kMdci, d, P, G, DType::kF32, mp);
  ASSERT_NO_FATAL_FAILURE(BuildAll(f, k, n));
  auto* mdci = static_cast<MdciSelector*>(f.sel.get());
  EXPECT_FALSE(mdci->NeedsRebuild());
  // Decode keys far above the prefill norm bound.
  auto big = GaussianRows(64, d, 5.0f, 62);
  std::vector<Placement> pl;
  ASSERT_THAT(f.sel->Insert(big.data(), 64, &pl), IsOk());
  f.keys->Apply(big.data(), pl);
  EXPECT_GT(mdci->tree().mips().over_bound(), 20);
  EXPECT_TRUE(mdci->NeedsRebuild());
  const uint32_t pages = f.sel->num_pages();
  std::vector<std::vector<int32_t>> layout;
  for (uint32_t p = 0; p < pages; ++p) {
    layout.emplace_back(f.sel->positions(p), f.sel->positions(p) + f.sel->fill(p));
  }
  auto rb = mdci->PrepareRebuild();
  ASSERT_THAT(rb, IsOk());
  // Tokens added in between make the prepared rebuild stale.
  auto rb_stale = mdci->PrepareRebuild();
  ASSERT_THAT(rb_stale, IsOk());
  ASSERT_THAT(mdci->CommitRebuild(std::move(rb).value()), IsOk());
  EXPECT_FALSE(mdci->NeedsRebuild());
  EXPECT_EQ(mdci->tree().mips().over_bound(), 0);
  ASSERT_EQ(f.sel->num_pages(), pages);
  for (uint32_t p = 0; p < pages; ++p) {
    EXPECT_EQ(layout[p],
              std::vector<int32_t>(f.sel->positions(p), f.sel->positions(p) + f.sel->fill(p)));
  }
  ASSERT_THAT(f.sel->Insert(&k[0], 1, &pl), IsOk());
  EXPECT_THAT(mdci->CommitRebuild(std::move(rb_stale).value()),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  f.keys->Apply(&k[0], pl);
  // The big keys are found after the rebuild.
  std::vector<float> q(static_cast<size_t>(G) * d);
  for (int j = 0; j < G; ++j) {
    for (int c = 0; c < d; ++c) q[j * d + c] = big[10 * d + c];
  }
  SelectParams sp;
  sp.budget_tokens = 16;
  sp.sink_tokens = 0;
  sp.want_positions = true;
  Selection sel;
  ASSERT_THAT(f.sel->Select(q.data(), G, sp, &sel), IsOk());
  EXPECT_NE(std::find(sel.positions.begin(), sel.positions.end(), n + 10), sel.positions.end());
}

TEST(MdciSelectorTest, ConcurrentSelectsGiveIdenticalResults) {
  const int d = 32, P = 16, G = 4;
  const int64_t n = 8192;
  auto k = ClusteredKeys(n, d, 60, 0.5f, 71);
  Fixture f = Make(SelectorKind::kMdci, d, P, G, DType::kF16);
  ASSERT_NO_FATAL_FAILURE(BuildAll(f, k, n));
  std::vector<std::vector<float>> queries;
  std::vector<Selection> want(16);
  SelectParams sp;
  sp.budget_tokens = 128;
  sp.want_positions = true;
  for (int i = 0; i < 16; ++i) {
    queries.push_back(AimedQueries(k, n, d, G, 1.0f, 300 + i));
    ASSERT_THAT(f.sel->Select(queries[i].data(), G, sp, &want[i]), IsOk());
  }
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      Selection got;
      for (int rep = 0; rep < 20; ++rep) {
        const int i = (rep * 5 + t) % 16;
        if (!f.sel->Select(queries[i].data(), G, sp, &got).ok() || got.pages != want[i].pages ||
            got.scores != want[i].scores || got.positions != want[i].positions ||
            got.keys_touched != want[i].keys_touched) {
          ++mismatches[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

TEST(MdciSelectorTest, DeterministicAcrossInstances) {
  const int d = 16, P = 8, G = 2;
  const int64_t n = 3000;
  auto k = ClusteredKeys(n, d, 25, 0.5f, 81);
  Fixture a = Make(SelectorKind::kMdci, d, P, G);
  Fixture b = Make(SelectorKind::kMdci, d, P, G);
  ASSERT_NO_FATAL_FAILURE(BuildAll(a, k, n));
  ASSERT_NO_FATAL_FAILURE(BuildAll(b, k, n));
  ASSERT_EQ(a.sel->num_pages(), b.sel->num_pages());
  for (uint32_t p = 0; p < a.sel->num_pages(); ++p) {
    ASSERT_EQ(a.sel->fill(p), b.sel->fill(p));
    EXPECT_TRUE(
        std::equal(a.sel->positions(p), a.sel->positions(p) + a.sel->fill(p), b.sel->positions(p)));
  }
  auto q = AimedQueries(k, n, d, G, 1.0f, 9);
  Selection sa, sb;
  SelectParams sp;
  ASSERT_THAT(a.sel->Select(q.data(), G, sp, &sa), IsOk());
  ASSERT_THAT(b.sel->Select(q.data(), G, sp, &sb), IsOk());
  EXPECT_EQ(sa.pages, sb.pages);
}

TEST(MdciSelectorTest, BadInputGetsStatusesAndChangesNothing) {
  const int d = 8, P = 4, G = 2;
  Fixture f = Make(SelectorKind::kMdci, d, P, G);
  std::vector<float> q(G * d, 1.0f);
  Selection sel;
  SelectParams sp;
  sp.budget_tokens = 4;
  EXPECT_THAT(f.sel->Select(q.data(), G, sp, &sel),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  auto k = ClusteredKeys(100, d, 5, 0.5f, 91);
  std::vector<Placement> pl;
  EXPECT_THAT(f.sel->Build(k.data(), 0, &pl), StatusIs(absl::StatusCode::kInvalidArgument));
  auto bad = k;
  bad[50 * d + 3] = NAN;
  EXPECT_THAT(f.sel->Build(bad.data(), 100, &pl), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(f.sel->num_tokens(), 0);
  ASSERT_NO_FATAL_FAILURE(BuildAll(f, k, 100));
  EXPECT_THAT(f.sel->Build(k.data(), 100, &pl), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(f.sel->Insert(bad.data(), 100, &pl), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(f.sel->num_tokens(), 100);
  Selection before;
  ASSERT_THAT(f.sel->Select(q.data(), G, sp, &before), IsOk());
  sp.budget_tokens = 0;
  EXPECT_THAT(f.sel->Select(q.data(), G, sp, &sel), StatusIs(absl::StatusCode::kInvalidArgument));
  sp.budget_tokens = 101;
  EXPECT_THAT(f.sel->Select(q.data(), G, sp, &sel), StatusIs(absl::StatusCode::kInvalidArgument));
  sp.budget_tokens = 4;
  EXPECT_THAT(f.sel->Select(q.data(), 0, sp, &sel), StatusIs(absl::StatusCode::kInvalidArgument));
  q[3] = INFINITY;
  EXPECT_THAT(f.sel->Select(q.data(), G, sp, &sel), StatusIs(absl::StatusCode::kInvalidArgument));
  q[3] = 1.0f;
  Selection after;
  ASSERT_THAT(f.sel->Select(q.data(), G, sp, &after), IsOk());
  EXPECT_EQ(before.pages, after.pages);
}

}  // namespace
}  // namespace icecache
