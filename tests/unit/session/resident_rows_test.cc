// In-place token writes (resident_rows.h): the plan that keeps the tokens
// selected again in their slots, and the per-layer records of what a
// session's writes left in its clients' buffers.
#include "server/session/resident_rows.h"

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace icecache {
namespace {

using ::testing::ElementsAre;

TEST(PlanInPlaceTest, WithoutAPreviousWriteEveryTokenIsCopiedInOrder) {
  const std::vector<int32_t> selected = {9, 3, 7};
  const InPlacePlan plan = PlanInPlace({}, selected);
  EXPECT_THAT(plan.slots, ElementsAre(9, 3, 7));
  EXPECT_THAT(plan.copy_index, ElementsAre(0, 1, 2));
  EXPECT_THAT(plan.copy_slot, ElementsAre(0, 1, 2));
}

TEST(PlanInPlaceTest, TokensSelectedAgainKeepTheirSlotsAndNewOnesTakeTheFreedOnesLowestFirst) {
  const std::vector<int32_t> previous = {10, 20, 30, 40};
  const std::vector<int32_t> selected = {40, 50, 10, 60};
  const InPlacePlan plan = PlanInPlace(previous, selected);
  EXPECT_THAT(plan.slots, ElementsAre(10, 50, 60, 40));
  EXPECT_THAT(plan.copy_index, ElementsAre(1, 3));
  EXPECT_THAT(plan.copy_slot, ElementsAre(1, 2));
}

TEST(PlanInPlaceTest, TheSameSelectionCopiesNothing) {
  const std::vector<int32_t> previous = {5, 1, 4};
  const InPlacePlan plan = PlanInPlace(previous, std::vector<int32_t>{1, 4, 5});
  EXPECT_THAT(plan.slots, ElementsAre(5, 1, 4));
  EXPECT_TRUE(plan.copy_index.empty());
  EXPECT_TRUE(plan.copy_slot.empty());
}

TEST(PlanInPlaceTest, AShorterSelectionMovesTheTokensOfSlotsPastItsEnd) {
  // 5 was in slot 4, past the 3 slots now: it is copied again, into a free slot.
  const std::vector<int32_t> previous = {1, 2, 3, 4, 5};
  const InPlacePlan plan = PlanInPlace(previous, std::vector<int32_t>{5, 1, 9});
  EXPECT_THAT(plan.slots, ElementsAre(1, 5, 9));
  EXPECT_THAT(plan.copy_index, ElementsAre(0, 2));
  EXPECT_THAT(plan.copy_slot, ElementsAre(1, 2));
}

TEST(PlanInPlaceTest, ALongerSelectionAppendsItsNewTokens) {
  const std::vector<int32_t> previous = {7, 8};
  const InPlacePlan plan = PlanInPlace(previous, std::vector<int32_t>{8, 7, 9, 10});
  EXPECT_THAT(plan.slots, ElementsAre(7, 8, 9, 10));
  EXPECT_THAT(plan.copy_index, ElementsAre(2, 3));
  EXPECT_THAT(plan.copy_slot, ElementsAre(2, 3));
}

TEST(PlanInPlaceTest, APositionListedTwiceIsKeptOnceAndEverySlotIsFilled) {
  const std::vector<int32_t> previous = {1, 2};
  const InPlacePlan plan = PlanInPlace(previous, std::vector<int32_t>{2, 2});
  EXPECT_THAT(plan.slots, ElementsAre(2, 2));
  EXPECT_THAT(plan.copy_index, ElementsAre(1));
  EXPECT_THAT(plan.copy_slot, ElementsAre(0));
}

// Random selections over a small universe, against the plan's definition.
TEST(PlanInPlaceTest, RandomSelectionsFollowTheRules) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    SCOPED_TRACE(trial);
    std::vector<int32_t> universe(64);
    for (int i = 0; i < 64; ++i) universe[i] = i * 37 + (trial % 5) * 100000;
    std::shuffle(universe.begin(), universe.end(), rng);
    const size_t np = rng() % 40, nn = rng() % 40;
    const std::vector<int32_t> previous(universe.begin(), universe.begin() + np);
    std::shuffle(universe.begin(), universe.end(), rng);
    const std::vector<int32_t> selected(universe.begin(), universe.begin() + nn);
    const InPlacePlan plan = PlanInPlace(previous, selected);
    // The slots hold exactly the selection.
    std::vector<int32_t> a = plan.slots, b = selected;
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    ASSERT_EQ(a, b);
    // A token selected again whose slot is still inside stays there, and
    // only the other slots are copied, in increasing slot order.
    std::set<uint32_t> kept;
    for (size_t s = 0; s < previous.size(); ++s) {
      if (s < nn && std::find(selected.begin(), selected.end(), previous[s]) != selected.end()) {
        ASSERT_EQ(plan.slots[s], previous[s]);
        kept.insert(static_cast<uint32_t>(s));
      }
    }
    ASSERT_EQ(plan.copy_slot.size(), nn - kept.size());
    ASSERT_EQ(plan.copy_index.size(), plan.copy_slot.size());
    for (size_t i = 0; i < plan.copy_slot.size(); ++i) {
      ASSERT_EQ(kept.count(plan.copy_slot[i]), 0u);
      ASSERT_EQ(plan.slots[plan.copy_slot[i]], selected[plan.copy_index[i]]);
      if (i > 0) {
        ASSERT_LT(plan.copy_slot[i - 1], plan.copy_slot[i]);
      }
    }
  }
}

ResidentRegion Region(const std::string& buffer, uint64_t offset, uint64_t bytes, int layers = 1) {
  ResidentRegion r;
  r.buffer_id = buffer;
  r.offset = offset;
  r.bytes = bytes;
  r.num_layers = layers;
  r.head_offsets = {offset};
  r.slots = {{1, 2, 3}};
  return r;
}

TEST(ResidentRowsTest, ARecordIsTakenOnceAndOnlyForTheSamePlace) {
  ResidentRows rows(4);
  rows.Put(1, Region("b", 100, 50));
  // Another layer count, then another offset: no record, and it is gone.
  EXPECT_FALSE(rows.TakeForWrite(1, "b", 100, 50, 2).has_value());
  EXPECT_FALSE(rows.TakeForWrite(1, "b", 100, 50, 1).has_value());
  rows.Put(1, Region("b", 100, 50));
  EXPECT_FALSE(rows.TakeForWrite(1, "b", 200, 50, 1).has_value());
  EXPECT_FALSE(rows.TakeForWrite(1, "b", 100, 50, 1).has_value());
  rows.Put(1, Region("b", 100, 50));
  EXPECT_FALSE(rows.TakeForWrite(1, "other", 100, 50, 1).has_value());
  EXPECT_FALSE(rows.TakeForWrite(1, "b", 100, 50, 1).has_value());
  rows.Put(1, Region("b", 100, 50));
  auto taken = rows.TakeForWrite(1, "b", 100, 50, 1);
  ASSERT_TRUE(taken.has_value());
  EXPECT_THAT(taken->slots[0], ElementsAre(1, 2, 3));
  EXPECT_FALSE(rows.TakeForWrite(1, "b", 100, 50, 1).has_value());
  // Layers out of range hold nothing.
  rows.Put(9, Region("b", 0, 10));
  EXPECT_FALSE(rows.TakeForWrite(9, "b", 0, 10, 1).has_value());
  EXPECT_FALSE(rows.TakeForWrite(-1, "b", 0, 10, 1).has_value());
}

TEST(ResidentRowsTest, AWriteOverARecordsBytesDropsIt) {
  ResidentRows rows(4);
  const auto reset = [&] {
    rows.Put(0, Region("b", 100, 50));  // [100, 150)
    rows.Put(2, Region("b", 300, 50));  // [300, 350)
  };
  reset();
  // Another layer's write touching [149, 150): layer 0's record goes, layer 2's stays.
  EXPECT_FALSE(rows.TakeForWrite(1, "b", 149, 1, 1).has_value());
  EXPECT_FALSE(rows.TakeForWrite(0, "b", 100, 50, 1).has_value());
  EXPECT_TRUE(rows.TakeForWrite(2, "b", 300, 50, 1).has_value());
  reset();
  // Adjacent bytes and other buffers do not overlap.
  rows.Overwritten("b", 150, 150);
  rows.Overwritten("c", 0, 1000);
  EXPECT_TRUE(rows.TakeForWrite(0, "b", 100, 50, 1).has_value());
  EXPECT_TRUE(rows.TakeForWrite(2, "b", 300, 50, 1).has_value());
  reset();
  // A page write over both drops both.
  rows.Overwritten("b", 0, 1000);
  EXPECT_FALSE(rows.TakeForWrite(0, "b", 100, 50, 1).has_value());
  EXPECT_FALSE(rows.TakeForWrite(2, "b", 300, 50, 1).has_value());
  reset();
  // A newer record over an older one of another layer replaces it.
  rows.Put(3, Region("b", 120, 10));
  EXPECT_TRUE(rows.TakeForWrite(3, "b", 120, 10, 1).has_value());
  rows.Put(3, Region("b", 120, 10));
  EXPECT_FALSE(rows.TakeForWrite(0, "b", 100, 50, 1).has_value());
  // (and that write, over layer 3's bytes, dropped its record)
  EXPECT_FALSE(rows.TakeForWrite(3, "b", 120, 10, 1).has_value());
}

}  // namespace
}  // namespace icecache
