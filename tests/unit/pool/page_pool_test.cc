#include "server/pool/page_pool.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/caller.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint64_t kMiB = uint64_t{1} << 20;

std::unique_ptr<PagePool> MakePool(uint64_t capacity, int max_classes = 4) {
  PagePoolOptions o;
  o.capacity_bytes = capacity;
  o.use_huge_pages = false;
  o.max_size_classes = max_classes;
  auto pool = PagePool::Create(o);
  EXPECT_THAT(pool, IsOk());
  return std::move(pool).value();
}

TEST(PagePoolTest, CreateValidatesOptions) {
  PagePoolOptions o;
  o.capacity_bytes = 0;
  EXPECT_THAT(PagePool::Create(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("capacity_bytes")));
  o.capacity_bytes = 4 * kMiB;
  o.max_size_classes = 0;
  EXPECT_THAT(PagePool::Create(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_size_classes")));
}

TEST(PagePoolTest, CapacityRoundsUpToSlabs) {
  auto pool = MakePool(3 * kMiB);
  EXPECT_EQ(pool->capacity_bytes(), 4 * kMiB);
}

TEST(PagePoolTest, ClassesAreCreatedOnFirstUseAndBounded) {
  auto pool = MakePool(8 * kMiB, 2);
  auto a = pool->GetOrCreateClass(8192);
  ASSERT_THAT(a, IsOk());
  auto a2 = pool->GetOrCreateClass(8192);
  ASSERT_THAT(a2, IsOk());
  EXPECT_EQ(*a, *a2);
  auto b = pool->GetOrCreateClass(4096);
  ASSERT_THAT(b, IsOk());
  EXPECT_NE(*a, *b);
  EXPECT_THAT(pool->GetOrCreateClass(1024),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_size_classes")));
  EXPECT_THAT(pool->GetOrCreateClass(0), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(pool->GetOrCreateClass(PagePool::kSlabBytes + 1),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(pool->Allocate("t", 7, 1), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(PagePoolTest, FramesAreAlignedDistinctAndWritable) {
  auto pool = MakePool(8 * kMiB);
  auto id = pool->GetOrCreateClass(1000);  // stride 1024
  ASSERT_THAT(id, IsOk());
  auto set = pool->Allocate("alice", *id, 100);
  ASSERT_THAT(set, IsOk());
  ASSERT_EQ(set->size(), 100u);
  EXPECT_EQ(set->frame_bytes(), 1000u);
  std::set<uint8_t*> seen;
  for (size_t i = 0; i < set->size(); ++i) {
    uint8_t* f = set->frame(i);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(f) % 64, 0u);
    EXPECT_TRUE(seen.insert(f).second);
    std::memset(f, static_cast<int>(i), 1000);
  }
  for (size_t i = 0; i < set->size(); ++i) {
    EXPECT_EQ(set->frame(i)[0], static_cast<uint8_t>(i));
    EXPECT_EQ(set->frame(i)[999], static_cast<uint8_t>(i));
  }
  // Frames do not overlap: distinct pointers at least a stride apart.
  std::vector<uint8_t*> sorted(seen.begin(), seen.end());
  for (size_t i = 1; i < sorted.size(); ++i) EXPECT_GE(sorted[i] - sorted[i - 1], 1024);
}

TEST(PagePoolTest, FreeReturnsFrameToItsClass) {
  auto pool = MakePool(8 * kMiB);
  auto id = pool->GetOrCreateClass(4096);
  ASSERT_THAT(id, IsOk());
  auto keep = pool->Allocate("alice", *id, 3);  // keeps the slab alive
  ASSERT_THAT(keep, IsOk());
  uint8_t* freed;
  {
    auto one = pool->Allocate("alice", *id, 1);
    ASSERT_THAT(one, IsOk());
    freed = one->frame(0);
    EXPECT_EQ(pool->Stats().frames_used, 4u);
  }
  PoolStats s = pool->Stats();
  EXPECT_EQ(s.frames_used, 3u);
  EXPECT_EQ(s.used_bytes, 3u * 4096);
  auto again = pool->Allocate("alice", *id, 1);
  ASSERT_THAT(again, IsOk());
  EXPECT_EQ(again->frame(0), freed);  // LIFO free list
}

TEST(PagePoolTest, StatsTrackClassesTenantsAndSlabs) {
  auto pool = MakePool(8 * kMiB);
  auto id = pool->GetOrCreateClass(PagePool::kSlabBytes / 4);  // 4 frames per slab
  ASSERT_THAT(id, IsOk());
  auto a = pool->Allocate("alice", *id, 5);  // 2 slabs
  ASSERT_THAT(a, IsOk());
  auto b = pool->Allocate("bob", *id, 1);  // fits in the second slab
  ASSERT_THAT(b, IsOk());
  PoolStats s = pool->Stats();
  EXPECT_EQ(s.reserved_bytes, 2 * PagePool::kSlabBytes);
  EXPECT_EQ(s.used_bytes, 6 * PagePool::kSlabBytes / 4);
  EXPECT_EQ(s.frames_used, 6u);
  EXPECT_EQ(s.frames_free, 2u);
  ASSERT_EQ(s.classes.size(), 1u);
  EXPECT_EQ(s.classes[0].slabs, 2u);
  EXPECT_EQ(s.classes[0].frames_used, 6u);
  ASSERT_EQ(s.tenants.size(), 2u);
  EXPECT_EQ(s.tenants[0].tenant, "alice");
  EXPECT_EQ(s.tenants[0].frames, 5u);
  EXPECT_EQ(s.tenants[1].tenant, "bob");
  EXPECT_EQ(s.tenants[1].used_bytes, PagePool::kSlabBytes / 4);
  a->Reset();
  b->Reset();
  s = pool->Stats();
  EXPECT_EQ(s.used_bytes, 0u);
  EXPECT_EQ(s.reserved_bytes, 2 * PagePool::kSlabBytes);  // empty slabs stay carved
  EXPECT_EQ(s.frames_free, 8u);
  EXPECT_EQ(pool->Trim(), 2 * PagePool::kSlabBytes);
  s = pool->Stats();
  EXPECT_EQ(s.reserved_bytes, 0u);  // back to the arena
  EXPECT_EQ(s.frames_free, 0u);
  EXPECT_EQ(s.classes[0].slabs, 0u);
  EXPECT_EQ(pool->Trim(), 0u);
  auto again = pool->Allocate("alice", *id, 4);
  ASSERT_THAT(again, IsOk());
  EXPECT_EQ(pool->Stats().reserved_bytes, PagePool::kSlabBytes);
}

// Resident 4 KiB pages of the arena's slab `slab` (mincore).
uint64_t ResidentPages(const PagePool& pool, uint64_t slab) {
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> vec(PagePool::kSlabBytes / page);
  if (::mincore(pool.arena_base() + slab * PagePool::kSlabBytes, PagePool::kSlabBytes,
                vec.data()) != 0) {
    ADD_FAILURE() << "mincore failed";
    return 0;
  }
  uint64_t n = 0;
  for (unsigned char v : vec) n += v & 1;
  return n;
}

TEST(PagePoolTest, FreeReturnsEmptySlabsBeyondTheBoundToTheKernel) {
  PagePoolOptions o;
  o.capacity_bytes = 16 * kMiB;  // 8 slabs
  o.use_huge_pages = false;
  o.max_empty_slabs = 2;
  auto created = PagePool::Create(o);
  ASSERT_THAT(created, IsOk());
  PagePool& pool = **created;
  auto id = pool.GetOrCreateClass(PagePool::kSlabBytes / 4);
  ASSERT_THAT(id, IsOk());
  {
    auto set = pool.Allocate("alice", *id, 6 * 4);  // 6 slabs, every byte touched
    ASSERT_THAT(set, IsOk());
    for (size_t i = 0; i < set->size(); ++i) std::memset(set->frame(i), 0x5A, set->frame_bytes());
    uint64_t resident = 0;
    for (uint64_t slab = 0; slab < 6; ++slab) resident += ResidentPages(pool, slab);
    EXPECT_EQ(resident * ::sysconf(_SC_PAGESIZE), 6 * PagePool::kSlabBytes);
  }
  // Dropped: two empty slabs stay carved (and resident), four went back.
  PoolStats s = pool.Stats();
  EXPECT_EQ(s.used_bytes, 0u);
  EXPECT_EQ(s.reserved_bytes, 2 * PagePool::kSlabBytes);
  EXPECT_EQ(s.frames_free, 2u * 4);
  uint64_t resident = 0;
  for (uint64_t slab = 0; slab < 8; ++slab) resident += ResidentPages(pool, slab);
  EXPECT_EQ(resident * ::sysconf(_SC_PAGESIZE), 2 * PagePool::kSlabBytes);
  // The released slabs are carved again, zeroed, when needed.
  auto again = pool.Allocate("alice", *id, 8 * 4);
  ASSERT_THAT(again, IsOk());
  EXPECT_EQ(pool.Stats().reserved_bytes, 8 * PagePool::kSlabBytes);
}

// pool.prefault: PrefaultArena faults in every slab of the arena (and no
// more: it reports the capacity), keeps frames' contents, and with
// keep_resident nothing goes back to the kernel when sessions drop or the
// pool is trimmed.
TEST(PagePoolTest, PrefaultArenaMakesTheWholeArenaResidentAndKeepsIt) {
  PagePoolOptions o;
  o.capacity_bytes = 16 * kMiB;  // 8 slabs
  o.max_empty_slabs = 0;         // every emptied slab would go back at once
  o.keep_resident = true;
  auto created = PagePool::Create(o);
  ASSERT_THAT(created, IsOk());
  PagePool& pool = **created;
  auto id = pool.GetOrCreateClass(PagePool::kSlabBytes / 4);
  ASSERT_THAT(id, IsOk());
  auto set = pool.Allocate("alice", *id, 4);  // one slab, written before the prefault
  ASSERT_THAT(set, IsOk());
  for (size_t i = 0; i < set->size(); ++i) std::memset(set->frame(i), 0x5A, set->frame_bytes());
  uint64_t resident = 0;
  for (uint64_t slab = 0; slab < 8; ++slab) resident += ResidentPages(pool, slab);
  EXPECT_LT(resident * ::sysconf(_SC_PAGESIZE), 8 * PagePool::kSlabBytes);

  const ArenaPrefault done = pool.PrefaultArena(nullptr);
  EXPECT_EQ(done.bytes, pool.capacity_bytes());
  EXPECT_EQ(pool.prefaulted_bytes(), pool.capacity_bytes());
  EXPECT_FALSE(done.stopped);
  resident = 0;
  for (uint64_t slab = 0; slab < 8; ++slab) resident += ResidentPages(pool, slab);
  EXPECT_EQ(resident * ::sysconf(_SC_PAGESIZE), 8 * PagePool::kSlabBytes);
  for (size_t i = 0; i < set->size(); ++i) {
    EXPECT_EQ(set->frame(i)[0], 0x5A);
    EXPECT_EQ(set->frame(i)[set->frame_bytes() - 1], 0x5A);
  }
  set->Reset();
  pool.Trim();
  resident = 0;
  for (uint64_t slab = 0; slab < 8; ++slab) resident += ResidentPages(pool, slab);
  EXPECT_EQ(resident * ::sysconf(_SC_PAGESIZE), 8 * PagePool::kSlabBytes);
}

TEST(PagePoolTest, PrefaultArenaStopsWhenAsked) {
  PagePoolOptions o;
  o.capacity_bytes = 16 * kMiB;
  auto created = PagePool::Create(o);
  ASSERT_THAT(created, IsOk());
  std::atomic<bool> stop{true};
  const ArenaPrefault done = (*created)->PrefaultArena(&stop);
  EXPECT_TRUE(done.stopped);
  EXPECT_EQ(done.bytes, 0u);
  uint64_t resident = 0;
  for (uint64_t slab = 0; slab < 8; ++slab) resident += ResidentPages(**created, slab);
  EXPECT_EQ(resident, 0u);
}

TEST(PagePoolTest, PrefaultAheadKeepsAtMostItsCountOfFreeSlabsResident) {
  PagePoolOptions o;
  o.capacity_bytes = 16 * kMiB;  // 8 slabs
  o.use_huge_pages = false;
  o.max_empty_slabs = 0;  // a freed slab goes back at once
  auto created = PagePool::Create(o);
  ASSERT_THAT(created, IsOk());
  PagePool& pool = **created;
  auto id = pool.GetOrCreateClass(PagePool::kSlabBytes);  // one frame per slab
  ASSERT_THAT(id, IsOk());
  auto a = pool.Allocate("t", *id, 2);
  auto b = pool.Allocate("t", *id, 2);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  for (FrameSet* set : {&*a, &*b}) {
    for (size_t i = 0; i < set->size(); ++i) std::memset(set->frame(i), 1, set->frame_bytes());
  }
  auto resident_slabs = [&] {
    uint64_t pages = 0;
    for (uint64_t slab = 0; slab < 8; ++slab) pages += ResidentPages(pool, slab);
    return pages * ::sysconf(_SC_PAGESIZE) / PagePool::kSlabBytes;
  };
  a->Reset();  // its two slabs go back, then are faulted in ahead
  if (pool.PrefaultAhead(2) == 0) GTEST_SKIP() << "kernel without MADV_POPULATE_WRITE";
  EXPECT_EQ(resident_slabs(), 4u);
  // b's slabs are freed on top of the faulted ones; the next call faults in
  // those and returns the two that sank below them.
  b->Reset();
  EXPECT_EQ(resident_slabs(), 2u);
  EXPECT_EQ(pool.PrefaultAhead(2), 2u);
  EXPECT_EQ(resident_slabs(), 2u);
  // And the pool still hands out every slab.
  auto all = pool.Allocate("t", *id, 8);
  EXPECT_THAT(all, IsOk());
}

TEST(PagePoolTest, PopulateNextFaultsInWhatTheNextAllocationCarvesAndPrefaultKeepsIt) {
  PagePoolOptions o;
  o.capacity_bytes = 16 * kMiB;  // 8 slabs
  o.use_huge_pages = false;
  o.max_empty_slabs = 0;
  auto created = PagePool::Create(o);
  ASSERT_THAT(created, IsOk());
  PagePool& pool = **created;
  auto id = pool.GetOrCreateClass(PagePool::kSlabBytes);  // one frame per slab
  ASSERT_THAT(id, IsOk());
  auto resident = [&](uint64_t first, uint64_t end) {
    uint64_t pages = 0;
    for (uint64_t slab = first; slab < end; ++slab) pages += ResidentPages(pool, slab);
    return pages * ::sysconf(_SC_PAGESIZE) / PagePool::kSlabBytes;
  };
  if (pool.PopulateNext(5 * PagePool::kSlabBytes - 1) == 0) {
    GTEST_SKIP() << "kernel without MADV_POPULATE_WRITE";
  }
  EXPECT_EQ(resident(0, 8), 5u);
  // The reaper's smaller prefault does not return them before the
  // allocation they were faulted in for.
  EXPECT_EQ(pool.PrefaultAhead(1), 1u);
  EXPECT_EQ(resident(0, 8), 5u);
  auto a = pool.Allocate("t", *id, 4);
  ASSERT_THAT(a, IsOk());
  // After it, the one left over is bound like a prefaulted slab.
  EXPECT_EQ(pool.PrefaultAhead(0), 0u);
  EXPECT_EQ(resident(0, 8), 4u);
  EXPECT_EQ(resident(0, 4), 4u);
}

TEST(PagePoolTest, ChurnDoesNotGrowOrLeak) {
  auto pool = MakePool(4 * kMiB);
  auto small = pool->GetOrCreateClass(4096);
  auto big = pool->GetOrCreateClass(PagePool::kSlabBytes / 2);
  ASSERT_THAT(small, IsOk());
  ASSERT_THAT(big, IsOk());
  for (int round = 0; round < 50; ++round) {
    // Fill the whole arena with one class, free it, then with the other: the
    // empty slabs of the first class are taken over by the second.
    auto a = pool->Allocate("t", *small, 2 * 512);
    ASSERT_THAT(a, IsOk()) << "round " << round;
    a->Reset();
    auto b = pool->Allocate("t", *big, 4);
    ASSERT_THAT(b, IsOk()) << "round " << round;
    for (size_t i = 0; i < b->size(); ++i) b->frame(i)[PagePool::kSlabBytes / 2 - 1] = 1;
    b->Reset();
  }
  PoolStats s = pool->Stats();
  EXPECT_EQ(s.used_bytes, 0u);
  EXPECT_LE(s.reserved_bytes, 4 * kMiB);
  EXPECT_EQ(s.classes[0].frames_used + s.classes[1].frames_used, 0u);
  EXPECT_EQ(s.frames_free, s.classes[0].frames_free + s.classes[1].frames_free);
}

TEST(PagePoolTest, EmptySlabsMoveBetweenClasses) {
  auto pool = MakePool(2 * kMiB);  // one slab
  auto small = pool->GetOrCreateClass(64);
  auto big = pool->GetOrCreateClass(PagePool::kSlabBytes);
  ASSERT_THAT(small, IsOk());
  ASSERT_THAT(big, IsOk());
  {
    auto s = pool->Allocate("t", *small, 10);
    ASSERT_THAT(s, IsOk());
    EXPECT_THAT(pool->Allocate("t", *big, 1),
                StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("capacity")));
  }
  auto b = pool->Allocate("t", *big, 1);
  EXPECT_THAT(b, IsOk());
}

TEST(PagePoolTest, CapacityRejectionChangesNothing) {
  auto pool = MakePool(4 * kMiB);
  auto id = pool->GetOrCreateClass(PagePool::kSlabBytes / 2);
  ASSERT_THAT(id, IsOk());
  auto a = pool->Allocate("t", *id, 3);
  ASSERT_THAT(a, IsOk());
  PoolStats before = pool->Stats();
  EXPECT_THAT(pool->Allocate("t", *id, 2),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("capacity")));
  EXPECT_THAT(pool->Allocate("t", *id, ~uint64_t{0}),
              StatusIs(absl::StatusCode::kResourceExhausted));
  PoolStats after = pool->Stats();
  EXPECT_EQ(after.used_bytes, before.used_bytes);
  EXPECT_EQ(after.reserved_bytes, before.reserved_bytes);
  EXPECT_EQ(after.frames_free, before.frames_free);
  EXPECT_EQ(after.rejected, before.rejected + 2);
  EXPECT_THAT(pool->Allocate("t", *id, 1), IsOk());  // exactly the last frame
}

TEST(PagePoolTest, QuotaAdmissionChangesNothing) {
  auto pool = MakePool(16 * kMiB);
  auto id = pool->GetOrCreateClass(4096);
  ASSERT_THAT(id, IsOk());
  ASSERT_THAT(pool->SetQuota("alice", 10 * 4096), IsOk());
  EXPECT_EQ(pool->Quota("alice"), 10u * 4096);
  EXPECT_EQ(pool->Quota("nobody"), kUnlimitedQuota);
  auto a = pool->Allocate("alice", *id, 8);
  ASSERT_THAT(a, IsOk());
  EXPECT_THAT(pool->CheckAdmission("alice", *id, 3),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("quota")));
  EXPECT_THAT(pool->Allocate("alice", *id, 3),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("quota of tenant 'alice'")));
  EXPECT_EQ(pool->TenantUsedBytes("alice"), 8u * 4096);
  EXPECT_THAT(pool->CheckAdmission("alice", *id, 2), IsOk());
  EXPECT_THAT(pool->Allocate("alice", *id, 2), IsOk());
  // Other tenants are not limited by alice's quota.
  EXPECT_THAT(pool->Allocate("bob", *id, 100), IsOk());
  // Lowering the quota below usage is allowed; it refuses new frames only.
  ASSERT_THAT(pool->SetQuota("alice", 4096), IsOk());
  EXPECT_EQ(pool->TenantUsedBytes("alice"), 8u * 4096);
  EXPECT_THAT(pool->Allocate("alice", *id, 1), StatusIs(absl::StatusCode::kResourceExhausted));
  // Allocating nothing is never refused.
  auto none = pool->Allocate("alice", *id, 0);
  ASSERT_THAT(none, IsOk());
  EXPECT_TRUE(none->empty());
}

TEST(PagePoolTest, DefaultQuotaAppliesToNewTenants) {
  PagePoolOptions o;
  o.capacity_bytes = 8 * kMiB;
  o.use_huge_pages = false;
  o.default_tenant_quota_bytes = 2 * 4096;
  auto pool = PagePool::Create(o);
  ASSERT_THAT(pool, IsOk());
  auto id = (*pool)->GetOrCreateClass(4096);
  ASSERT_THAT(id, IsOk());
  EXPECT_THAT((*pool)->Allocate("x", *id, 3), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT((*pool)->Allocate("x", *id, 2), IsOk());
}

TEST(PagePoolTest, BadTenantNamesAreRefused) {
  auto pool = MakePool(4 * kMiB);
  auto id = pool->GetOrCreateClass(4096);
  ASSERT_THAT(id, IsOk());
  EXPECT_THAT(pool->Allocate("", *id, 1), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(pool->Allocate("a b", *id, 1), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(pool->SetQuota(std::string(200, 'a'), 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("128")));
  EXPECT_THAT(ValidateTenantName("uid-1000@host:x_y.z"), IsOk());
}

TEST(PagePoolTest, FrameSetTakeBackAndAbsorb) {
  auto pool = MakePool(4 * kMiB);
  auto id = pool->GetOrCreateClass(4096);
  auto id2 = pool->GetOrCreateClass(8192);
  ASSERT_THAT(id, IsOk());
  ASSERT_THAT(id2, IsOk());
  auto a = pool->Allocate("t", *id, 10);
  ASSERT_THAT(a, IsOk());
  uint8_t* last = a->frame(9);
  FrameSet tail = a->TakeBack(4);
  EXPECT_EQ(a->size(), 6u);
  ASSERT_EQ(tail.size(), 4u);
  EXPECT_EQ(tail.frame(3), last);
  EXPECT_EQ(tail.tenant(), "t");
  tail.Reset();
  EXPECT_EQ(pool->Stats().frames_used, 6u);
  auto b = pool->Allocate("t", *id, 2);
  ASSERT_THAT(b, IsOk());
  ASSERT_THAT(a->Absorb(std::move(*b)), IsOk());
  EXPECT_EQ(a->size(), 8u);
  auto other_tenant = pool->Allocate("u", *id, 1);
  ASSERT_THAT(other_tenant, IsOk());
  EXPECT_THAT(a->Absorb(std::move(*other_tenant)), StatusIs(absl::StatusCode::kFailedPrecondition));
  auto other_class = pool->Allocate("t", *id2, 1);
  ASSERT_THAT(other_class, IsOk());
  EXPECT_THAT(a->Absorb(std::move(*other_class)), StatusIs(absl::StatusCode::kFailedPrecondition));
  FrameSet moved = std::move(*a);
  EXPECT_EQ(moved.size(), 8u);
  EXPECT_TRUE(a->empty());
  moved = FrameSet();
  EXPECT_EQ(pool->TenantUsedBytes("t"), 8192u);  // only other_class is left
}

TEST(PagePoolTest, ConcurrentAllocateAndFreeKeepCountersExact) {
  auto pool = MakePool(64 * kMiB);
  auto id = pool->GetOrCreateClass(2048);
  ASSERT_THAT(id, IsOk());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const std::string tenant = "t" + std::to_string(t);
      for (int i = 0; i < 200; ++i) {
        auto s = pool->Allocate(tenant, *id, 1 + (i % 7));
        ASSERT_TRUE(s.ok());
        for (size_t k = 0; k < s->size(); ++k) std::memset(s->frame(k), t, 2048);
        for (size_t k = 0; k < s->size(); ++k) ASSERT_EQ(s->frame(k)[2047], t);
      }
    });
  }
  for (auto& th : threads) th.join();
  PoolStats s = pool->Stats();
  EXPECT_EQ(s.used_bytes, 0u);
  EXPECT_EQ(s.frames_used, 0u);
  EXPECT_EQ(s.allocations, 800u);
}

TEST(PagePoolTest, PrefaultAheadKeepsContentsAndAllocationsWork) {
  auto pool = MakePool(16 * kMiB);
  auto id = pool->GetOrCreateClass(4096);
  ASSERT_THAT(id, IsOk());
  auto a = pool->Allocate("alice", *id, 600);  // more than one slab
  ASSERT_THAT(a, IsOk());
  for (size_t i = 0; i < a->size(); ++i) std::memset(a->frame(i), static_cast<int>(i), 4096);
  // The slabs next in line (free and never carved), at most as many as asked.
  EXPECT_LE(pool->PrefaultAhead(3), 3u);
  auto b = pool->Allocate("alice", *id, 1000);
  ASSERT_THAT(b, IsOk());
  for (size_t i = 0; i < b->size(); ++i) std::memset(b->frame(i), 0xab, 4096);
  EXPECT_LE(pool->PrefaultAhead(100), 8u);  // 8 slabs in all, some carved
  for (size_t i = 0; i < a->size(); ++i) {
    ASSERT_EQ(a->frame(i)[0], static_cast<uint8_t>(i));
    ASSERT_EQ(a->frame(i)[4095], static_cast<uint8_t>(i));
  }
  EXPECT_EQ(b->frame(999)[17], 0xab);
}

// The VmFlags line of the /proc/self/smaps entry that holds `addr`.
std::string VmFlagsOf(const void* addr) {
  std::ifstream smaps("/proc/self/smaps");
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  bool inside = false;
  std::string line;
  while (std::getline(smaps, line)) {
    uintptr_t lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find(' ') < 40) {
      inside = lo <= a && a < hi;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      return line;
    }
  }
  return "";
}

TEST(PagePoolTest, AnonymousArenaIsSlabAlignedAndAdvisedHugePages) {
  for (bool thp : {true, false}) {
    PagePoolOptions o;
    o.capacity_bytes = 6 * kMiB;
    o.use_huge_pages = false;
    o.transparent_huge_pages = thp;
    auto pool = PagePool::Create(o);
    ASSERT_THAT(pool, IsOk());
    const uint8_t* base = (*pool)->arena_base();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(base) % PagePool::kSlabBytes, 0u);
    const std::string flags = VmFlagsOf(base);
    ASSERT_FALSE(flags.empty()) << "no smaps entry for the arena";
    EXPECT_EQ(flags.find(" hg") != std::string::npos, thp) << flags;
    // The whole arena is usable (the trimmed mapping covers every slab).
    auto id = (*pool)->GetOrCreateClass(PagePool::kSlabBytes);
    ASSERT_THAT(id, IsOk());
    auto all = (*pool)->Allocate("t", *id, 3);
    ASSERT_THAT(all, IsOk());
    for (size_t i = 0; i < all->size(); ++i) {
      std::memset(all->frame(i), 7, PagePool::kSlabBytes);
    }
  }
}

}  // namespace
}  // namespace icecache
