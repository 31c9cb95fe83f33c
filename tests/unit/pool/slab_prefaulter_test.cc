#include "server/pool/slab_prefaulter.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "server/pool/page_pool.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;

constexpr uint64_t kMiB = uint64_t{1} << 20;

// A pool of 8 slabs whose frames are whole slabs (one carve per frame).
std::unique_ptr<PagePool> SlabFramePool(SizeClassId* id) {
  PagePoolOptions o;
  o.capacity_bytes = 16 * kMiB;
  o.use_huge_pages = false;
  o.max_empty_slabs = 0;
  auto pool = PagePool::Create(o);
  EXPECT_THAT(pool, IsOk());
  auto class_id = (*pool)->GetOrCreateClass(PagePool::kSlabBytes);
  EXPECT_THAT(class_id, IsOk());
  *id = *class_id;
  return std::move(pool).value();
}

// Slabs [first, end) whose every 4 KiB page is resident (mincore).
uint64_t ResidentSlabs(const PagePool& pool, uint64_t first, uint64_t end) {
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> vec(PagePool::kSlabBytes / page);
  uint64_t slabs = 0;
  for (uint64_t s = first; s < end; ++s) {
    if (::mincore(pool.arena_base() + s * PagePool::kSlabBytes, PagePool::kSlabBytes, vec.data()) !=
        0) {
      ADD_FAILURE() << "mincore failed";
      return 0;
    }
    uint64_t resident = 0;
    for (unsigned char v : vec) resident += v & 1;
    slabs += resident == vec.size() ? 1 : 0;
  }
  return slabs;
}

// Polls `done` for up to 30 s (a deadline for a background thread to act on
// a loaded machine, not a timing check).
template <typename Done>
bool Eventually(Done done) {
  for (int i = 0; i < 30000; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return done();
}

TEST(PagePoolTest, WaitForCarveReturnsOnACarveAStopOrTheTimeout) {
  SizeClassId id;
  std::unique_ptr<PagePool> pool = SlabFramePool(&id);
  std::atomic<bool> stop{false};
  EXPECT_EQ(pool->slabs_carved(), 0u);
  EXPECT_EQ(pool->WaitForCarve(0, &stop, absl::ZeroDuration()), 0u);  // timed out
  auto a = pool->Allocate("t", id, 1);
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ(pool->WaitForCarve(0, &stop, absl::Hours(1)), 1u);  // carved before the call
  uint64_t woke = 0;
  std::thread waiter([&] { woke = pool->WaitForCarve(1, &stop, absl::Hours(1)); });
  auto b = pool->Allocate("t", id, 1);  // before or during the wait: either returns 2
  ASSERT_THAT(b, IsOk());
  waiter.join();
  EXPECT_EQ(woke, 2u);
  std::thread stopped([&] { woke = pool->WaitForCarve(2, &stop, absl::Hours(1)); });
  stop.store(true);
  pool->WakeCarveWaiters();
  stopped.join();
  EXPECT_EQ(woke, 2u);
  a->Reset();
  auto c = pool->Allocate("t", id, 1);
  ASSERT_THAT(c, IsOk());
  // max_empty_slabs 0: a's slab went back to the kernel, so it is carved again.
  EXPECT_EQ(pool->slabs_carved(), 3u);
}

TEST(SlabPrefaulterTest, ACarveWakesItLongBeforeItsInterval) {
  SizeClassId id;
  std::unique_ptr<PagePool> pool = SlabFramePool(&id);
  if (pool->PrefaultAhead(1) == 0) GTEST_SKIP() << "kernel without MADV_POPULATE_WRITE";
  SlabPrefaulter prefaulter(pool.get(), 2, absl::Hours(1));
  ASSERT_TRUE(Eventually([&] { return prefaulter.rounds() >= 1; }));
  EXPECT_EQ(ResidentSlabs(*pool, 0, 2), 2u);  // the next two in line
  EXPECT_EQ(ResidentSlabs(*pool, 2, 8), 0u);
  // Carving them (the interval is an hour away) has the next two faulted in.
  auto a = pool->Allocate("t", id, 2);
  ASSERT_THAT(a, IsOk());
  // rounds() counts a round once its PrefaultAhead has returned, so the pages
  // can be resident a moment before the count moves: wait on the count.
  ASSERT_TRUE(Eventually([&] { return prefaulter.rounds() >= 2; }));
  EXPECT_EQ(ResidentSlabs(*pool, 2, 4), 2u);
  EXPECT_EQ(ResidentSlabs(*pool, 4, 8), 0u);
}

TEST(SlabPrefaulterTest, StopsAtOnceWhileWaitingOutALongInterval) {
  SizeClassId id;
  std::unique_ptr<PagePool> pool = SlabFramePool(&id);
  {
    SlabPrefaulter prefaulter(pool.get(), 1, absl::Hours(1));
    ASSERT_TRUE(Eventually([&] { return prefaulter.rounds() >= 1; }));
  }                                     // joins: would hang for an hour if the stop did not wake it
  auto a = pool->Allocate("t", id, 8);  // the pool is intact and whole
  EXPECT_THAT(a, IsOk());
}

}  // namespace
}  // namespace icecache
