// Candidate carry-over (SelectParams::carry, docs/architecture.md §3.4): a
// fresh mdci select records its candidate pages and the estimate of the mass
// outside them; up to carry_steps selects after it score those pages (and
// the forced ones of now) for their own queries instead of scanning again.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "server/index/mdci_selector.h"
#include "server/index/selector.h"
#include "tests/unit/index/mdci_test_util.h"

namespace icecache {
namespace {

constexpr int kDim = 64;
constexpr int kPage = 16;
constexpr int64_t kTokens = 4096;

struct Fixture {
  std::vector<float> keys = mdci_test::ClusteredKeys(kTokens + 64, kDim, 24, 0.4f, 7);
  mdci_test::BuiltSelector built;
  explicit Fixture(float pq_factor, float keep = MdciParams{}.carry_keep_factor) {
    SelectorConfig c = mdci_test::MdciConfig(kDim, kPage, pq_factor);
    c.mdci.carry_keep_factor = keep;
    built = mdci_test::BuildWithInserts(c, keys, kTokens, 0);
  }
  const Selector& sel() const { return *built.sel; }
};

SelectParams Params(Granularity g) {
  SelectParams p;
  p.budget_tokens = 128;
  p.sink_tokens = 4;
  p.recent_tokens = 16;
  p.granularity = g;
  p.want_positions = true;
  return p;
}

// Params(g) carrying through `carry` for `steps` selects after each fresh one.
SelectParams Carrying(Granularity g, int steps, CandidateCarry* carry) {
  SelectParams p = Params(g);
  p.carry = carry;
  p.carry_steps = steps;
  return p;
}

// The sinks' and the recent window's pages of Params().
std::set<uint32_t> ForcedPagesOf(const Selector& sel) {
  std::set<uint32_t> forced;
  for (int32_t pos = 0; pos < 4; ++pos) forced.insert(sel.placement_of(pos).page);
  for (int32_t pos = kTokens - 16; pos < kTokens; ++pos) forced.insert(sel.placement_of(pos).page);
  return forced;
}

// Every page a selection holds (token granularity: the pages of its tokens).
std::set<uint32_t> PagesOf(const Selector& sel, const Selection& s) {
  std::set<uint32_t> pages(s.pages.begin(), s.pages.end());
  for (int32_t pos : s.positions) pages.insert(sel.placement_of(pos).page);
  return pages;
}

class CandidateCarryTest : public ::testing::TestWithParam<std::tuple<float, Granularity>> {};

TEST_P(CandidateCarryTest, ACarriedSelectOfTheSameQueriesSelectsAsTheFreshOne) {
  const auto [pq, g] = GetParam();
  Fixture f(pq);
  const std::vector<float> q = mdci_test::GaussianRows(4, kDim, 1.0f, 3);
  CandidateCarry carry;
  SelectParams p = Carrying(g, 1, &carry);
  Selection fresh, carried, again;
  ASSERT_TRUE(f.sel().Select(q.data(), 4, p, &fresh).ok());
  EXPECT_FALSE(fresh.carried);
  ASSERT_TRUE(carry.valid);
  EXPECT_FALSE(carry.candidates.empty());
  ASSERT_TRUE(f.sel().Select(q.data(), 4, p, &carried).ok());
  EXPECT_TRUE(carried.carried);
  // The kept candidates, the same queries, the dropped pages' mass in the
  // rest: the same selection, and the same scores up to rounding (the
  // normaliser is summed in another order).
  EXPECT_EQ(carried.pages, fresh.pages);
  EXPECT_EQ(carried.positions, fresh.positions);
  ASSERT_EQ(carried.scores.size(), fresh.scores.size());
  for (size_t i = 0; i < fresh.scores.size(); ++i) {
    if (std::isinf(fresh.scores[i])) {
      EXPECT_EQ(carried.scores[i], fresh.scores[i]) << i;
    } else {
      EXPECT_NEAR(carried.scores[i], fresh.scores[i], 1e-4f * std::abs(fresh.scores[i])) << i;
    }
  }
  // carry_steps 1: the next one scans afresh (and records again).
  ASSERT_TRUE(f.sel().Select(q.data(), 4, p, &again).ok());
  EXPECT_FALSE(again.carried);
  EXPECT_EQ(again.positions, fresh.positions);
  EXPECT_EQ(carry.age, 0);
}

TEST_P(CandidateCarryTest, CarriedSelectsTakeOnlyTheRecordedAndForcedPages) {
  const auto [pq, g] = GetParam();
  Fixture f(pq);
  CandidateCarry carry;
  SelectParams p = Carrying(g, 3, &carry);
  const std::vector<float> q0 = mdci_test::GaussianRows(4, kDim, 1.0f, 11);
  Selection s;
  ASSERT_TRUE(f.sel().Select(q0.data(), 4, p, &s).ok());
  ASSERT_FALSE(s.carried);
  const std::set<uint32_t> recorded(carry.candidates.begin(), carry.candidates.end());
  const std::set<uint32_t> forced = ForcedPagesOf(f.sel());
  for (int step = 1; step <= 3; ++step) {
    // Other queries: the carried candidates serve them, whatever they are.
    const std::vector<float> q = mdci_test::GaussianRows(4, kDim, 1.0f, 100 + step);
    ASSERT_TRUE(f.sel().Select(q.data(), 4, p, &s).ok());
    EXPECT_TRUE(s.carried) << step;
    EXPECT_EQ(carry.age, step);
    EXPECT_GT(s.tokens(), 0);
    for (uint32_t page : PagesOf(f.sel(), s)) {
      EXPECT_TRUE(recorded.count(page) > 0 || forced.count(page) > 0)
          << "page " << page << " step " << step;
    }
  }
  ASSERT_TRUE(f.sel().Select(q0.data(), 4, p, &s).ok());
  EXPECT_FALSE(s.carried);  // after carry_steps, a fresh one
}

INSTANTIATE_TEST_SUITE_P(ScanAndTree, CandidateCarryTest,
                         ::testing::Combine(::testing::Values(8.0f, 0.0f),
                                            ::testing::Values(Granularity::kPage,
                                                              Granularity::kToken)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) > 0 ? "Scan" : "Tree") +
                                  (std::get<1>(info.param) == Granularity::kPage ? "Page"
                                                                                 : "Token");
                         });

TEST_P(CandidateCarryTest, AFreshSelectKeepsItsBestCandidatesForTheCarry) {
  // MdciParams::carry_keep_factor: the carry keeps the pages of what the
  // fresh select took, the forced pages and the best others up to keep x
  // budget tokens' worth; 0 keeps every candidate.
  const auto [pq, g] = GetParam();
  Fixture trimmed(pq, 2.0f), all(pq, 0.0f);
  const std::vector<float> q = mdci_test::GaussianRows(4, kDim, 1.0f, 21);
  CandidateCarry carry_trimmed, carry_all;
  Selection s_trimmed, s_all;
  ASSERT_TRUE(trimmed.sel().Select(q.data(), 4, Carrying(g, 1, &carry_trimmed), &s_trimmed).ok());
  ASSERT_TRUE(all.sel().Select(q.data(), 4, Carrying(g, 1, &carry_all), &s_all).ok());
  // The fresh selections themselves are the same.
  EXPECT_EQ(s_trimmed.positions, s_all.positions);
  const std::set<uint32_t> kept(carry_trimmed.candidates.begin(), carry_trimmed.candidates.end());
  const std::set<uint32_t> every(carry_all.candidates.begin(), carry_all.candidates.end());
  EXPECT_LT(kept.size(), every.size());
  const std::set<uint32_t> forced = ForcedPagesOf(trimmed.sel());
  for (uint32_t page : PagesOf(trimmed.sel(), s_trimmed)) {
    EXPECT_TRUE(kept.count(page) > 0 || forced.count(page) > 0)
        << "page " << page << " was taken but not kept";
  }
  // Past the taken and forced pages, at most the keep factor's worth.
  const std::set<uint32_t> taken = PagesOf(trimmed.sel(), s_trimmed);
  const size_t want =
      std::max<size_t>(MdciParams{}.min_candidate_pages, 2 * Params(g).budget_tokens / kPage);
  size_t extra = 0;
  for (uint32_t page : kept) extra += (taken.count(page) == 0 && forced.count(page) == 0) ? 1 : 0;
  EXPECT_LE(extra, want);
  EXPECT_GE(kept.size(), std::min(every.size(), want));
  // The carried select of other queries reads only the kept (and forced) pages.
  const std::vector<float> q2 = mdci_test::GaussianRows(4, kDim, 1.0f, 22);
  Selection next;
  ASSERT_TRUE(trimmed.sel().Select(q2.data(), 4, Carrying(g, 1, &carry_trimmed), &next).ok());
  EXPECT_TRUE(next.carried);
  for (uint32_t page : PagesOf(trimmed.sel(), next)) {
    EXPECT_TRUE(kept.count(page) > 0 || forced.count(page) > 0) << "page " << page;
  }
}

TEST(CandidateCarryTest, AKeepFactorThatIsNotAFiniteNonNegativeNumberIsRefused) {
  Fixture f(8.0f);
  for (float bad :
       {-1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    SelectorConfig c = mdci_test::MdciConfig(kDim, kPage, 8.0f);
    c.mdci.carry_keep_factor = bad;
    const absl::Status st = Selector::Create(c, f.built.keys.get()).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(st.message().find("carry_keep_factor"), std::string_view::npos) << st.message();
  }
}

TEST(CandidateCarryTest, OtherParamsQueriesOrSelectorsCollectAfresh) {
  Fixture f(8.0f), other(8.0f);
  const std::vector<float> q = mdci_test::GaussianRows(4, kDim, 1.0f, 5);
  CandidateCarry carry;
  SelectParams p = Carrying(Granularity::kPage, 8, &carry);
  Selection s;
  ASSERT_TRUE(f.sel().Select(q.data(), 4, p, &s).ok());
  ASSERT_TRUE(carry.valid);
  // The calibrator widened the head: its candidates are another set.
  SelectParams wider = p;
  wider.pq_factor = 12.0f;
  ASSERT_TRUE(f.sel().Select(q.data(), 4, wider, &s).ok());
  EXPECT_FALSE(s.carried);
  // The method duel moved it to the tree.
  SelectParams tree = wider;
  tree.method = SearchMethod::kTree;
  ASSERT_TRUE(f.sel().Select(q.data(), 4, tree, &s).ok());
  EXPECT_FALSE(s.carried);
  ASSERT_TRUE(f.sel().Select(q.data(), 4, tree, &s).ok());
  EXPECT_TRUE(s.carried);
  // Another budget, another selector, fewer queries.
  SelectParams budget = tree;
  budget.budget_tokens = 64;
  ASSERT_TRUE(f.sel().Select(q.data(), 4, budget, &s).ok());
  EXPECT_FALSE(s.carried);
  ASSERT_TRUE(other.sel().Select(q.data(), 4, budget, &s).ok());
  EXPECT_FALSE(s.carried);
  ASSERT_TRUE(other.sel().Select(q.data(), 2, budget, &s).ok());
  EXPECT_FALSE(s.carried);
  // Exhaustive selects neither use nor record it.
  SelectParams exhaustive = budget;
  exhaustive.exhaustive = true;
  const int age = carry.age;
  ASSERT_TRUE(other.sel().Select(q.data(), 2, exhaustive, &s).ok());
  EXPECT_FALSE(s.carried);
  EXPECT_EQ(carry.age, age);
  // carry_steps 0: never carried, and the selection is a fresh one's.
  SelectParams off = p;
  off.carry_steps = 0;
  Selection plain;
  SelectParams none = Params(Granularity::kPage);
  ASSERT_TRUE(f.sel().Select(q.data(), 4, off, &s).ok());
  ASSERT_TRUE(f.sel().Select(q.data(), 4, none, &plain).ok());
  EXPECT_FALSE(s.carried);
  EXPECT_EQ(s.pages, plain.pages);
}

// The stagger (CandidateCarry::phase): a carry's fresh selects fall where
// (selects + phase) % (carry_steps + 1) == 0, so the heads given phases 0,
// 1, 2 at carry_steps 2 select afresh on different steps once past their
// first select, which is always fresh (nothing recorded yet).
TEST(CandidateCarryTest, ThePhaseSetsWhichSelectsAreFresh) {
  Fixture f(8.0f);
  const std::vector<float> q = mdci_test::GaussianRows(4, kDim, 1.0f, 5);
  const std::string want[] = {"fccfccf", "fcfccfc", "ffccfcc"};
  for (int phase = 0; phase < 3; ++phase) {
    SCOPED_TRACE(phase);
    CandidateCarry carry;
    carry.phase = phase;
    const SelectParams p = Carrying(Granularity::kPage, 2, &carry);
    std::string kinds;
    for (int i = 0; i < 7; ++i) {
      Selection s;
      ASSERT_TRUE(f.sel().Select(q.data(), 4, p, &s).ok());
      kinds += s.carried ? 'c' : 'f';
    }
    EXPECT_EQ(kinds, want[phase]);
  }
}

TEST(CandidateCarryTest, RecordedIdsPastThePageTableAreDroppedNotRead) {
  // A state whose ids name no page of this selector (recorded by another
  // selector that had its address): the carried select reads none of them.
  Fixture f(8.0f);
  CandidateCarry carry;
  SelectParams p = Carrying(Granularity::kToken, 1, &carry);
  const std::vector<float> q = mdci_test::GaussianRows(4, kDim, 1.0f, 13);
  Selection s;
  ASSERT_TRUE(f.sel().Select(q.data(), 4, p, &s).ok());
  ASSERT_TRUE(carry.valid);
  carry.candidates.push_back(f.sel().num_pages() + 7);
  carry.candidates.push_back(UINT32_MAX - 1);
  ASSERT_TRUE(f.sel().Select(q.data(), 4, p, &s).ok());
  EXPECT_TRUE(s.carried);
  EXPECT_GT(s.tokens(), 0);
  for (const Placement& r : s.token_refs) EXPECT_LT(r.page, f.sel().num_pages());
}

TEST(CandidateCarryTest, DecodeInsertsBetweenStepsStayCoveredByTheRecentPages) {
  // Tokens appended after the fresh select: the carried select still forces
  // the recent window of now, so the newest token is always selected.
  Fixture f(8.0f);
  CandidateCarry carry;
  SelectParams p = Carrying(Granularity::kToken, 4, &carry);
  const std::vector<float> q = mdci_test::GaussianRows(4, kDim, 1.0f, 9);
  Selection s;
  ASSERT_TRUE(f.sel().Select(q.data(), 4, p, &s).ok());
  auto* mdci = static_cast<MdciSelector*>(f.built.sel.get());
  for (int64_t i = kTokens; i < kTokens + 40; ++i) {
    std::vector<Placement> pl;
    ASSERT_TRUE(mdci->Insert(&f.keys[i * kDim], 1, &pl).ok());
    f.built.keys->Apply(&f.keys[i * kDim], pl);
    ASSERT_TRUE(f.sel().Select(q.data(), 4, p, &s).ok());
    if (!s.carried) continue;
    EXPECT_NE(std::find(s.positions.begin(), s.positions.end(), static_cast<int32_t>(i)),
              s.positions.end())
        << "token " << i;
  }
}

}  // namespace
}  // namespace icecache
