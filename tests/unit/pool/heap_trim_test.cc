#include "server/pool/heap_trim.h"

#include <cstdlib>
#include <vector>

#include "gtest/gtest.h"

namespace icecache {
namespace {

TEST(HeapTrimTest, TrimsOnlyAfterEnoughFramesWereFreedAndNotTwiceInAnInterval) {
  // Freed heap to give back: many small blocks (kept in the arenas' bins).
  std::vector<void*> blocks;
  for (int i = 0; i < 4096; ++i) blocks.push_back(std::malloc(4096));
  for (void* b : blocks) std::free(b);

  NoteFramesFreed(kHeapTrimAfterFreedBytes / 2);
  EXPECT_FALSE(MaybeTrimHeap()) << "below the freed-bytes threshold";
  NoteFramesFreed(kHeapTrimAfterFreedBytes / 2);
#if defined(__GLIBC__)
  EXPECT_TRUE(MaybeTrimHeap());
#else
  EXPECT_FALSE(MaybeTrimHeap()) << "no malloc_trim here";
#endif
  // The counter restarted and the interval holds the next one back.
  NoteFramesFreed(kHeapTrimAfterFreedBytes);
  EXPECT_FALSE(MaybeTrimHeap()) << "within kHeapTrimMinIntervalMs of the last trim";
}

}  // namespace
}  // namespace icecache
