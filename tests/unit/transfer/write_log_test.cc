#include "server/transfer/write_log.h"

#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace icecache {
namespace {

TEST(WriteLogTest, OnlyAnotherWritersOverlappingWriteSinceTheStampCounts) {
  WriteLog log;
  const uint64_t mine = log.Note(7, 1000, 100);  // [1000, 1100)
  EXPECT_EQ(mine, 1u);
  EXPECT_FALSE(log.WrittenSince(7, 1000, 100, mine));
  // My own writes, anywhere, and others' writes next to the region.
  log.Note(7, 1050, 10);
  log.Note(8, 900, 100);  // ends at 1000
  log.Note(8, 1100, 50);  // starts at 1100
  log.Note(0, 5000, 16);  // a ring response elsewhere
  log.Note(9, 1050, 0);   // empty
  EXPECT_FALSE(log.WrittenSince(7, 1000, 100, mine));
  // One byte of another writer inside.
  const uint64_t over = log.Note(8, 1099, 1);
  EXPECT_TRUE(log.WrittenSince(7, 1000, 100, mine));
  // Not after a later stamp of mine.
  EXPECT_FALSE(log.WrittenSince(7, 1000, 100, over));
  // A region around another writer's whole write.
  log.Note(0, 1010, 5);
  EXPECT_TRUE(log.WrittenSince(7, 1000, 100, over));
  // Offsets near the top of the range do not overflow.
  const uint64_t top = log.Note(7, ~uint64_t{0} - 10, 10);
  log.Note(8, 0, 16);
  EXPECT_FALSE(log.WrittenSince(7, ~uint64_t{0} - 10, 10, top));
}

TEST(WriteLogTest, AStampItCannotVouchForCounts) {
  WriteLog log;
  EXPECT_TRUE(log.WrittenSince(1, 0, 10, 0));  // never given
  EXPECT_TRUE(log.WrittenSince(1, 0, 10, 1));  // not given yet
  const uint64_t stamp = log.Note(1, 0, 10);
  // Capacity - 1 notes after it, none overlapping: still known clean.
  for (size_t i = 0; i + 1 < WriteLog::kCapacity; ++i) log.Note(2, 100, 10);
  EXPECT_FALSE(log.WrittenSince(1, 0, 10, stamp));
  // One more and the ring no longer holds every note since: assume written.
  log.Note(2, 100, 10);
  EXPECT_TRUE(log.WrittenSince(1, 0, 10, stamp));
}

TEST(WriteLogTest, AClaimOverlappingAnotherWritersClaimInFlightIsRefused) {
  WriteLog log;
  uint64_t off = 0, bytes = 0;
  const uint64_t a = log.Claim(1, 100, 50, &off, &bytes);  // [100, 150)
  ASSERT_GT(a, 0u);
  EXPECT_EQ(log.Claim(2, 149, 10, &off, &bytes), 0u);  // one shared byte
  EXPECT_EQ(off, 100u);
  EXPECT_EQ(bytes, 50u);
  const uint64_t touching = log.Claim(2, 150, 10, &off, &bytes);  // adjacent: fine
  EXPECT_GT(touching, 0u);
  const uint64_t same = log.Claim(1, 120, 10, &off, &bytes);  // the same writer: fine
  EXPECT_GT(same, 0u);
  EXPECT_GT(log.Claim(2, 120, 0, &off, &bytes), 0u);  // an empty range claims nothing
  EXPECT_EQ(log.claims_in_flight(), 4u);
  log.Release(a);
  EXPECT_EQ(log.Claim(2, 118, 5, &off, &bytes), 0u);  // writer 1's other claim
  log.Release(same);
  const uint64_t now = log.Claim(2, 118, 5, &off, &bytes);
  EXPECT_GT(now, 0u);
  log.Release(0);       // ignored
  log.Release(987654);  // unknown: ignored
  EXPECT_EQ(log.claims_in_flight(), 3u);
}

TEST(WriteLogTest, ConcurrentNotesGetDistinctStamps) {
  WriteLog log;
  constexpr int kThreads = 4, kNotes = 2000;
  std::vector<std::vector<uint64_t>> stamps(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kNotes; ++i) {
        stamps[t].push_back(log.Note(t + 1, static_cast<uint64_t>(t) * 4096, 64));
        (void)log.WrittenSince(t + 1, static_cast<uint64_t>(t) * 4096, 64, stamps[t].back());
      }
    });
  }
  for (std::thread& th : threads) th.join();
  std::vector<bool> seen(kThreads * kNotes + 1, false);
  for (const auto& v : stamps) {
    for (uint64_t s : v) {
      ASSERT_GE(s, 1u);
      ASSERT_LE(s, static_cast<uint64_t>(kThreads * kNotes));
      EXPECT_FALSE(seen[s]);
      seen[s] = true;
    }
  }
  // Every writer kept to its own 64 bytes: nobody wrote over anybody.
  const uint64_t last = log.Note(1, 0, 64);
  EXPECT_FALSE(log.WrittenSince(1, 0, 64, last));
}

}  // namespace
}  // namespace icecache
