// The staging memory of appends (server/session/append_staging.h).
#include "server/session/append_staging.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

constexpr uint64_t kMiB = uint64_t{1} << 20;

std::shared_ptr<StagingCache> MakeCache(uint64_t max_cached) {
  StagingCacheOptions o;
  o.max_cached_bytes = max_cached;
  o.min_cached_bytes = 4 * kMiB;
  return StagingCache::Create(o);
}

TEST(StagingCacheTest, AReleasedBufferServesTheNextAppend) {
  auto cache = MakeCache(64 * kMiB);
  uint8_t* first = nullptr;
  {
    auto a = cache->Acquire(8 * kMiB);
    ASSERT_THAT(a, IsOk());
    EXPECT_EQ(a->size(), 8 * kMiB);
    std::memset(a->data(), 7, a->size());  // writable, all of it
    first = a->data();
  }
  EXPECT_EQ(cache->cached_bytes(), 8 * kMiB);
  auto b = cache->Acquire(6 * kMiB);  // fits in the cached one
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(b->data(), first);
  EXPECT_EQ(b->size(), 6 * kMiB);
  EXPECT_EQ(b->capacity(), 8 * kMiB);
  EXPECT_EQ(cache->reuses(), 1u);
  EXPECT_EQ(cache->cached_bytes(), 0u);
}

TEST(StagingCacheTest, HugePageBuffersAreAlignedWholeHugePagesAndReused) {
  StagingCacheOptions o;
  o.max_cached_bytes = 64 * kMiB;
  o.min_cached_bytes = 4 * kMiB;
  o.huge_pages = true;
  auto cache = StagingCache::Create(o);
  uint8_t* first = nullptr;
  {
    auto a = cache->Acquire(5 * kMiB + 1);
    ASSERT_THAT(a, IsOk());
    EXPECT_EQ(a->size(), 5 * kMiB + 1);
    EXPECT_EQ(a->capacity(), 6 * kMiB);  // rounded up to whole 2 MiB pages
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data()) % (2 * kMiB), 0u);
    std::memset(a->data(), 7, a->capacity());  // writable, all of the capacity
    first = a->data();
  }
  EXPECT_EQ(cache->cached_bytes(), 6 * kMiB);
  auto b = cache->Acquire(6 * kMiB);  // fits the rounded capacity
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(b->data(), first);
  EXPECT_EQ(b->data()[6 * kMiB - 1], 7);
  EXPECT_EQ(cache->reuses(), 1u);
  // Below min_cached_bytes: a plain mapping of exactly the size, never cached.
  auto small = cache->Acquire(100);
  ASSERT_THAT(small, IsOk());
  EXPECT_EQ(small->capacity(), 100u);
}

TEST(StagingCacheTest, TheSmallestBufferThatFitsIsTaken) {
  auto cache = MakeCache(64 * kMiB);
  uint8_t* small = nullptr;
  {
    auto a = cache->Acquire(16 * kMiB);
    auto b = cache->Acquire(5 * kMiB);
    ASSERT_THAT(a, IsOk());
    ASSERT_THAT(b, IsOk());
    small = b->data();
  }
  auto c = cache->Acquire(5 * kMiB);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->data(), small);
  auto d = cache->Acquire(20 * kMiB);  // nothing cached is that large: a fresh mapping
  ASSERT_THAT(d, IsOk());
  EXPECT_EQ(cache->reuses(), 1u);
  EXPECT_EQ(cache->cached_bytes(), 16 * kMiB);
}

TEST(StagingCacheTest, KeepsAtMostItsBoundAndSmallOnesApart) {
  auto cache = MakeCache(10 * kMiB);
  {
    auto a = cache->Acquire(8 * kMiB);
    auto b = cache->Acquire(8 * kMiB);
    auto small = cache->Acquire(kMiB);  // below min_cached_bytes
    ASSERT_THAT(small, IsOk());
    EXPECT_FALSE(cache->Caches(small->size()));
  }
  EXPECT_EQ(cache->cached_bytes(), 8 * kMiB);  // the second did not fit the bound
  EXPECT_EQ(cache->small_cached_bytes(), kMiB);
  // A small request never takes a large buffer, nor a large one a small one.
  auto small = cache->Acquire(4096);
  ASSERT_THAT(small, IsOk());
  EXPECT_EQ(small->capacity(), kMiB);
  EXPECT_EQ(cache->cached_bytes(), 8 * kMiB);
  auto large = cache->Acquire(8 * kMiB);
  ASSERT_THAT(large, IsOk());
  EXPECT_EQ(cache->small_cached_bytes(), 0u);
}

// A decode append's staging every token: the mapping released by one
// append serves the next (no mmap, first touch or munmap per token), at most
// kSmallKept are kept, and Trim drops the idle ones.
TEST(StagingCacheTest, SmallBuffersAreReusedBoundedAndTrimmed) {
  auto cache = MakeCache(64 * kMiB);
  uint8_t* first = nullptr;
  {
    auto a = cache->Acquire(128 << 10);
    ASSERT_THAT(a, IsOk());
    std::memset(a->data(), 3, a->size());
    first = a->data();
  }
  for (int token = 0; token < 5; ++token) {
    auto b = cache->Acquire(128 << 10);
    ASSERT_THAT(b, IsOk());
    EXPECT_EQ(b->data(), first);
    EXPECT_EQ(b->size(), uint64_t{128} << 10);
  }
  EXPECT_EQ(cache->reuses(), 5u);
  EXPECT_EQ(cache->Trim(absl::ZeroDuration()), uint64_t{128} << 10);
  {
    std::vector<StagingBuffer> many;
    for (size_t i = 0; i < StagingCache::kSmallKept + 3; ++i) {
      auto b = cache->Acquire(8192);
      ASSERT_THAT(b, IsOk());
      many.push_back(std::move(b).value());
    }
  }
  EXPECT_EQ(cache->small_cached_bytes(), StagingCache::kSmallKept * 8192);
  EXPECT_EQ(cache->Trim(absl::ZeroDuration()), StagingCache::kSmallKept * 8192);
  EXPECT_EQ(cache->small_cached_bytes(), 0u);
  // A cache that keeps nothing keeps no small ones either.
  auto none = MakeCache(0);
  { auto c = none->Acquire(8192); }
  EXPECT_EQ(none->small_cached_bytes(), 0u);
}

TEST(StagingCacheTest, TrimUnmapsIdleBuffers) {
  auto cache = MakeCache(64 * kMiB);
  { auto a = cache->Acquire(8 * kMiB); }
  EXPECT_EQ(cache->Trim(absl::Hours(1)), 0u);  // released just now
  EXPECT_EQ(cache->cached_bytes(), 8 * kMiB);
  EXPECT_EQ(cache->Trim(absl::ZeroDuration()), 8 * kMiB);
  EXPECT_EQ(cache->cached_bytes(), 0u);
}

TEST(StagingCacheTest, BuffersOutliveTheirOwnerAndMove) {
  auto cache = MakeCache(64 * kMiB);
  auto a = cache->Acquire(8 * kMiB);
  ASSERT_THAT(a, IsOk());
  StagingBuffer moved = std::move(a).value();
  std::weak_ptr<StagingCache> weak = cache;
  cache.reset();  // the buffer keeps its cache
  EXPECT_FALSE(weak.expired());
  moved.data()[0] = 1;
  moved = StagingBuffer();  // released into the cache, which then goes
  EXPECT_TRUE(weak.expired());
  EXPECT_THAT(MakeCache(kMiB)->Acquire(0), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(StagingCacheTest, TheReserveServesPiecesThatMergeAgainAndIsNeverTrimmed) {
  auto cache = MakeCache(4 * kMiB);
  auto made = cache->Reserve(16 * kMiB - 1);  // rounded up to whole 2 MiB
  ASSERT_THAT(made, IsOk());
  EXPECT_GE(*made, 0.0);
  EXPECT_EQ(cache->reserve_bytes(), 16 * kMiB);
  EXPECT_EQ(cache->cached_bytes(), 0u);  // not counted against the bound
  uint8_t* base = nullptr;
  {
    auto a = cache->Acquire(5 * kMiB);  // a piece of 6 MiB
    ASSERT_THAT(a, IsOk());
    base = a->data();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(base) % (2 * kMiB), 0u);
    EXPECT_EQ(a->capacity(), 6 * kMiB);
    auto b = cache->Acquire(4 * kMiB);  // the next piece, 4 MiB
    ASSERT_THAT(b, IsOk());
    EXPECT_EQ(b->data(), base + 6 * kMiB);
    EXPECT_EQ(b->capacity(), 4 * kMiB);
    auto c = cache->Acquire(8 * kMiB);  // 6 MiB free in the reserve: a mapping of its own
    ASSERT_THAT(c, IsOk());
    EXPECT_TRUE(c->data() + c->capacity() <= base || c->data() >= base + 16 * kMiB);
    std::memset(a->data(), 1, a->capacity());
    std::memset(b->data(), 2, b->capacity());
    std::memset(c->data(), 3, c->size());
    EXPECT_EQ(a->data()[a->capacity() - 1], 1);  // the pieces do not overlap
    EXPECT_EQ(cache->reuses(), 2u);
  }
  // The pieces came back and merged: the whole reserve serves one request.
  EXPECT_EQ(cache->Trim(absl::ZeroDuration()), 0u);  // c was beyond the bound
  auto whole = cache->Acquire(16 * kMiB);
  ASSERT_THAT(whole, IsOk());
  EXPECT_EQ(whole->data(), base);
  EXPECT_EQ(whole->capacity(), 16 * kMiB);
}

TEST(StagingCacheTest, SmallRequestsLeaveTheReserveWhole) {
  auto cache = MakeCache(64 * kMiB);
  ASSERT_THAT(cache->Reserve(64 * kMiB), IsOk());  // serves requests of 8 MiB and more
  auto small = cache->Acquire(6 * kMiB);
  ASSERT_THAT(small, IsOk());
  EXPECT_EQ(cache->reuses(), 0u);  // a mapping of its own
  auto big = cache->Acquire(64 * kMiB);
  ASSERT_THAT(big, IsOk());
  EXPECT_EQ(cache->reuses(), 1u);  // the reserve, whole
  EXPECT_EQ(big->capacity(), 64 * kMiB);
  EXPECT_TRUE(small->data() + small->capacity() <= big->data() ||
              small->data() >= big->data() + big->capacity());
}

TEST(StagingCacheTest, TheReserveIsMadeOnceAndAStopDropsIt) {
  std::atomic<bool> stop{true};
  auto cache = MakeCache(64 * kMiB);
  EXPECT_THAT(cache->Reserve(8 * kMiB, &stop), StatusIs(absl::StatusCode::kCancelled));
  EXPECT_EQ(cache->reserve_bytes(), 0u);
  EXPECT_THAT(cache->Reserve(0), StatusIs(absl::StatusCode::kInvalidArgument));
  stop = false;
  ASSERT_THAT(cache->Reserve(8 * kMiB, &stop), IsOk());
  EXPECT_THAT(cache->Reserve(8 * kMiB), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(cache->reserve_bytes(), 8 * kMiB);
}

// Back-pressure (AcquireWaiting): a reserve of 16 MiB holds two 8 MiB
// chunks, so it bounds them by itself; a third waits for one to come back.
TEST(StagingCacheTest, AnAppendPastTheBoundWaitsForABuildToReturnItsStaging) {
  auto cache = MakeCache(4 * kMiB);
  ASSERT_THAT(cache->Reserve(16 * kMiB), IsOk());
  EXPECT_EQ(cache->lend_bound(8 * kMiB), 16 * kMiB);
  EXPECT_EQ(cache->lend_bound(12 * kMiB), 16 * kMiB);  // the reserve, the larger
  std::optional<StagingBuffer> building(*cache->Acquire(8 * kMiB));
  auto queued = cache->Acquire(8 * kMiB);
  ASSERT_THAT(queued, IsOk());
  EXPECT_EQ(cache->lent_bytes(), 16 * kMiB);
  uint8_t* const piece = building->data();
  std::atomic<bool> returned{false};
  uint8_t* got = nullptr;
  bool returned_first = false;
  std::thread next([&] {
    auto b = cache->AcquireWaiting(8 * kMiB, absl::Now() + absl::Seconds(60), [] { return false; });
    ASSERT_THAT(b, IsOk());
    returned_first = returned.load();
    got = b->data();
  });
  absl::SleepFor(absl::Milliseconds(100));  // it waits meanwhile
  returned = true;
  building.reset();  // the build finished: its piece goes back
  next.join();
  EXPECT_TRUE(returned_first);
  EXPECT_EQ(got, piece);  // the returned piece, not fresh memory
  const StagingCache::WaitStats w = cache->wait_stats();
  EXPECT_EQ(w.waits, 1u);
  EXPECT_EQ(w.expired, 0u);
  EXPECT_GE(w.seconds, 0.05);
  EXPECT_EQ(cache->lent_bytes(), 8 * kMiB);  // `queued`; the waiter's came back
}

TEST(StagingCacheTest, AWaitEndsAtItsDeadlineOrStopAndMapsFreshMemory) {
  auto cache = MakeCache(4 * kMiB);
  ASSERT_THAT(cache->Reserve(16 * kMiB), IsOk());
  auto a = cache->Acquire(8 * kMiB);
  auto b = cache->Acquire(8 * kMiB);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  const auto outside = [&](const StagingBuffer& x) {
    return x.data() + x.capacity() <= a->data() || x.data() >= a->data() + 16 * kMiB;
  };
  {
    const absl::Time t0 = absl::Now();
    auto late = cache->AcquireWaiting(8 * kMiB, t0 + absl::Milliseconds(60), [] { return false; });
    ASSERT_THAT(late, IsOk());
    EXPECT_GE(absl::Now() - t0, absl::Milliseconds(60));
    EXPECT_TRUE(outside(*late));
    EXPECT_EQ(late->size(), 8 * kMiB);
  }
  {
    auto stopped = cache->AcquireWaiting(8 * kMiB, absl::Now() + absl::Seconds(60),
                                         [] { return true; });  // a drain
    ASSERT_THAT(stopped, IsOk());
    EXPECT_TRUE(outside(*stopped));
  }
  // A deadline already past: no wait at all.
  auto past = cache->AcquireWaiting(8 * kMiB, absl::InfinitePast(), [] { return false; });
  ASSERT_THAT(past, IsOk());
  const StagingCache::WaitStats w = cache->wait_stats();
  EXPECT_EQ(w.waits, 2u);
  EXPECT_EQ(w.expired, 2u);
  EXPECT_THAT(cache->AcquireWaiting(0, absl::InfiniteFuture(), nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(StagingCacheTest, NoWaitWithNothingLentUnderTheBoundOrForSmallRequests) {
  auto cache = MakeCache(32 * kMiB);  // no reserve: the bound is the cache's 32 MiB
  EXPECT_EQ(cache->lend_bound(8 * kMiB), 32 * kMiB);
  const auto forever = absl::InfiniteFuture();
  {
    // Alone and above the bound: served at once.
    auto huge = cache->AcquireWaiting(40 * kMiB, forever, nullptr);
    ASSERT_THAT(huge, IsOk());
    EXPECT_EQ(cache->lent_bytes(), 40 * kMiB);
    // Small requests are never lent against the bound nor wait.
    auto small = cache->AcquireWaiting(kMiB, forever, nullptr);
    ASSERT_THAT(small, IsOk());
    EXPECT_EQ(cache->lent_bytes(), 40 * kMiB);
  }
  EXPECT_EQ(cache->lent_bytes(), 0u);
  auto a = cache->AcquireWaiting(16 * kMiB, forever, nullptr);
  auto b = cache->AcquireWaiting(16 * kMiB, forever, nullptr);  // 32 MiB: at the bound
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(cache->lent_bytes(), 32 * kMiB);
  EXPECT_EQ(cache->wait_stats().waits, 0u);
}

}  // namespace
}  // namespace icecache
