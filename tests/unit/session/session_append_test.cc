// The pure steps of an append (server/session/session_append.h).
#include "server/session/session_append.h"

#include <vector>

#include "gtest/gtest.h"

namespace icecache {

// Found by argument-dependent lookup (SlotRun is in icecache).
bool operator==(const SlotRun& a, const SlotRun& b) {
  return a.page == b.page && a.begin == b.begin && a.end == b.end;
}

namespace {

TEST(UnwrittenSlotsTest, FullNewPagesNeedNoZeroing) {
  std::vector<Placement> placed;
  for (uint32_t p = 3; p < 5; ++p)
    for (uint32_t slot = 0; slot < 4; ++slot) placed.push_back({p, slot});
  EXPECT_TRUE(UnwrittenSlots(placed, 3, 5, 4).empty());
}

TEST(UnwrittenSlotsTest, PartialPageGivesItsTail) {
  // Page 7 (old, partly filled before) takes a row; page 8 is new with two.
  const std::vector<Placement> placed = {{7, 2}, {8, 0}, {8, 1}};
  const std::vector<SlotRun> want = {{8, 2, 16}};
  EXPECT_EQ(UnwrittenSlots(placed, 8, 9, 16), want);
}

TEST(UnwrittenSlotsTest, GapsAndUntouchedNewPagesAreRuns) {
  // Slots written out of order with a gap; page 11 opened but not written;
  // 70-slot pages span two bitmask words.
  const std::vector<Placement> placed = {{10, 5}, {10, 0}, {10, 64}, {10, 65}};
  const std::vector<SlotRun> want = {{10, 1, 5}, {10, 6, 64}, {10, 66, 70}, {11, 0, 70}};
  EXPECT_EQ(UnwrittenSlots(placed, 10, 12, 70), want);
}

TEST(UnwrittenSlotsTest, NoNewPagesNoRuns) {
  const std::vector<Placement> placed = {{0, 3}};
  EXPECT_TRUE(UnwrittenSlots(placed, 1, 1, 4).empty());
}

}  // namespace
}  // namespace icecache
