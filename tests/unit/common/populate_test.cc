// PopulateForWrite and the vector helpers built on it (common/populate.h).
#include "common/populate.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"

namespace icecache {
namespace {

size_t PageBytes() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

// Pages of [p, p + bytes) the kernel has in memory (mincore).
size_t ResidentPages(void* p, size_t bytes) {
  const size_t page = PageBytes();
  std::vector<unsigned char> vec((bytes + page - 1) / page);
  if (mincore(p, bytes, vec.data()) != 0) return 0;
  size_t n = 0;
  for (unsigned char v : vec) n += v & 1;
  return n;
}

// `pages` of fresh private anonymous memory, unmapped when it goes.
struct AnonMapping {
  explicit AnonMapping(size_t pages) : bytes(pages * PageBytes()) {
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    p = m == MAP_FAILED ? nullptr : static_cast<uint8_t*>(m);
  }
  ~AnonMapping() {
    if (p != nullptr) munmap(p, bytes);
  }
  size_t bytes;
  uint8_t* p;
};

// A fresh anonymous mapping is not resident; populated, all of it is, and
// reads as zeros; what was written before is kept.
TEST(PopulateTest, FaultsAFreshMappingInAndChangesNoByte) {
  const size_t page = PageBytes();
  AnonMapping m(256);
  ASSERT_NE(m.p, nullptr);
  uint8_t* p = m.p;
  const size_t bytes = m.bytes;
  p[5 * page + 3] = 42;
  ASSERT_LE(ResidentPages(p, bytes), 2u);
  PopulateForWrite(p, bytes);
#ifdef MADV_POPULATE_WRITE
  AnonMapping probe(1);
  ASSERT_NE(probe.p, nullptr);
  if (madvise(probe.p, probe.bytes, MADV_POPULATE_WRITE) != 0) {
    GTEST_SKIP() << "this kernel has no MADV_POPULATE_WRITE (Linux 5.14 and later): "
                    "PopulateForWrite is a no-op here";
  }
  EXPECT_EQ(ResidentPages(p, bytes), 256u);
#endif
  for (size_t i = 0; i < bytes; ++i) {
    ASSERT_EQ(p[i], i == 5 * page + 3 ? 42 : 0) << i;
  }
}

// Only the whole pages inside the range are touched: a range that starts
// and ends inside pages leaves the pages around it out, and a range below
// kPopulateMinBytes is left to demand faults.
TEST(PopulateTest, TouchesOnlyWholePagesInsideALargeEnoughRange) {
  const size_t page = PageBytes();
  AnonMapping m(64);
  ASSERT_NE(m.p, nullptr);
  uint8_t* p = m.p;
  const size_t bytes = m.bytes;
  PopulateForWrite(p + 1, kPopulateMinBytes - 2);  // below the bound once rounded
  PopulateForWrite(p + page / 2, 40 * page);       // pages 1..39 whole
  const size_t resident = ResidentPages(p, bytes);
  EXPECT_LE(resident, 39u);
  EXPECT_EQ(ResidentPages(p, page), 0u);                   // page 0: only partly inside
  EXPECT_EQ(ResidentPages(p + 41 * page, 23 * page), 0u);  // past the range
}

TEST(PopulateTest, ResizeAndAssignGiveWhatTheVectorsOwnDo) {
  std::vector<float> a = {1, 2, 3}, b = a;
  ResizePopulated(&a, 100000, 7.0f);
  b.resize(100000, 7.0f);
  EXPECT_EQ(a, b);
  ResizePopulated(&a, 10, 0.0f);
  b.resize(10, 0.0f);
  EXPECT_EQ(a, b);
  std::vector<uint32_t> c = {9, 9}, d = c;
  AssignPopulated(&c, 70000, 5u);
  d.assign(70000, 5u);
  EXPECT_EQ(c, d);
  AssignPopulated(&c, 3, 1u);
  d.assign(3, 1u);
  EXPECT_EQ(c, d);
  std::vector<uint16_t> e;
  ResizePopulated(&e, 0, uint16_t{1});
  EXPECT_TRUE(e.empty());
}

// A fresh mapping's pages are all resident after TouchZeroPages, up to a
// range that ends inside a page, and still zero.
TEST(PopulateTest, TouchZeroPagesMakesEveryPageResidentAndLeavesZeros) {
  const size_t page = PageBytes();
  AnonMapping m(64);
  ASSERT_NE(m.p, nullptr);
  ASSERT_EQ(ResidentPages(m.p, m.bytes), 0u);
  TouchZeroPages(m.p, 40 * page + 1);  // pages 0..40
  EXPECT_EQ(ResidentPages(m.p, m.bytes), 41u);
  for (size_t i = 0; i < m.bytes; ++i) ASSERT_EQ(m.p[i], 0) << i;
}

// TouchPagesForRead reads each page of its range and nothing past it (the
// pages after the range are PROT_NONE: a read there would fault), from an
// unaligned start too, and changes no byte.
TEST(PopulateTest, TouchPagesForReadStaysInsideItsRangeAndChangesNothing) {
  const size_t page = PageBytes();
  AnonMapping m(64);
  ASSERT_NE(m.p, nullptr);
  for (size_t i = 0; i < 41 * page; ++i) m.p[i] = static_cast<uint8_t>(i * 7 + 3);
  ASSERT_EQ(mprotect(m.p + 41 * page, 23 * page, PROT_NONE), 0);
  TouchPagesForRead(m.p, 40 * page + 1);    // pages 0..40
  TouchPagesForRead(m.p + 100, 40 * page);  // from inside page 0 to inside page 40
  TouchPagesForRead(m.p + 41 * page, 0);    // nothing
  for (size_t i = 0; i < 41 * page; ++i) ASSERT_EQ(m.p[i], static_cast<uint8_t>(i * 7 + 3)) << i;
  ASSERT_EQ(mprotect(m.p + 41 * page, 23 * page, PROT_READ | PROT_WRITE), 0);
}

}  // namespace
}  // namespace icecache
