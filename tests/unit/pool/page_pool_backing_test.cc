// The file-backed arena of a warm restart (docs/architecture.md §4): file
// permissions, bytes that outlive the pool, Recover() re-owning exactly the
// listed frames, and Freeze().
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <set>
#include <string>

#include "gtest/gtest.h"
#include "server/pool/page_pool.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint64_t kMiB = uint64_t{1} << 20;

class PagePoolBackingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = "/dev/shm/icecache-pool-test-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name();
    unlink(path_.c_str());
  }
  void TearDown() override { unlink(path_.c_str()); }

  absl::StatusOr<std::unique_ptr<PagePool>> Open(bool reuse) {
    PagePoolOptions o;
    o.capacity_bytes = 8 * kMiB;
    o.backing_file = path_;
    o.reuse_backing_file = reuse;
    return PagePool::Create(o);
  }
  std::string path_;
};

TEST_F(PagePoolBackingTest, FileIsPrivateAndRemovedUnlessKept) {
  {
    auto pool = Open(false);
    ASSERT_THAT(pool, IsOk());
    struct stat st;
    ASSERT_EQ(stat(path_.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_EQ(st.st_uid, geteuid());
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), 8 * kMiB);
  }
  EXPECT_NE(access(path_.c_str(), F_OK), 0) << "removed at destruction";
  {
    auto pool = Open(false);
    ASSERT_THAT(pool, IsOk());
    (*pool)->KeepBackingFile();
  }
  EXPECT_EQ(access(path_.c_str(), F_OK), 0) << "kept";
}

TEST_F(PagePoolBackingTest, RefusesAFileOthersCanOpenAndASymlink) {
  ASSERT_EQ(close(open(path_.c_str(), O_CREAT | O_WRONLY, 0600)), 0);
  ASSERT_EQ(chmod(path_.c_str(), 0644), 0);
  EXPECT_THAT(Open(false), StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("0600")));
  unlink(path_.c_str());
  ASSERT_EQ(symlink("/dev/null", path_.c_str()), 0);
  EXPECT_THAT(Open(false), StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr(path_)));
}

TEST_F(PagePoolBackingTest, ReuseNeedsTheSameSize) {
  ASSERT_EQ(close(open(path_.c_str(), O_CREAT | O_WRONLY, 0600)), 0);
  EXPECT_THAT(Open(true), StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("holds 0")));
}

TEST_F(PagePoolBackingTest, RecoverReownsExactlyTheListedFramesWithTheirBytes) {
  std::vector<uint64_t> offsets;
  {
    auto pool = Open(false);
    ASSERT_THAT(pool, IsOk());
    const SizeClassId id = (*pool)->GetOrCreateClass(4096).value();
    auto frames = (*pool)->Allocate("alice", id, 10);
    ASSERT_THAT(frames, IsOk());
    for (size_t i = 0; i < frames->size(); i += 3) {  // keep frames 0, 3, 6, 9
      std::memset(frames->frame(i), static_cast<int>(i + 1), 4096);
      offsets.push_back((*pool)->OffsetOf(frames->frame(i)));
    }
    (*pool)->Freeze();  // destroying the set must not write into the frames
    (*pool)->KeepBackingFile();
  }
  auto pool = Open(true);
  ASSERT_THAT(pool, IsOk());
  auto sets = (*pool)->Recover({{"alice", 4096, offsets}});
  ASSERT_THAT(sets, IsOk());
  ASSERT_EQ(sets->size(), 1u);
  ASSERT_EQ((*sets)[0].size(), 4u);
  for (size_t j = 0; j < 4; ++j) {
    for (int b = 0; b < 4096; ++b) {
      ASSERT_EQ((*sets)[0].frame(j)[b], static_cast<uint8_t>(3 * j + 1)) << "frame " << j;
    }
  }
  EXPECT_EQ((*pool)->TenantUsedBytes("alice"), 4u * 4096);
  // New frames never land on a recovered one.
  const std::set<uint64_t> taken(offsets.begin(), offsets.end());
  auto more = (*pool)->Allocate("bob", (*sets)[0].size_class(), 1000);
  ASSERT_THAT(more, IsOk());
  for (size_t i = 0; i < more->size(); ++i) {
    EXPECT_EQ(taken.count((*pool)->OffsetOf(more->frame(i))), 0u);
  }
  EXPECT_THAT((*pool)->Recover({}), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_F(PagePoolBackingTest, RecoverRefusesBadListsAndChangesNothing) {
  auto pool = Open(false);
  ASSERT_THAT(pool, IsOk());
  EXPECT_THAT((*pool)->Recover({{"a", 4096, {0, 0}}}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("twice")));
  EXPECT_THAT((*pool)->Recover({{"a", 4096, {100}}}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a 4096-byte frame")));
  EXPECT_THAT((*pool)->Recover({{"a", 4096, {64 * kMiB}}}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT((*pool)->Recover({{"a", 4096, {0}}, {"b", 8192, {8192}}}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("two sizes")));
  EXPECT_EQ((*pool)->used_bytes(), 0u);
  auto held = (*pool)->Recover({{"a", 4096, {0, 4096}}});
  ASSERT_THAT(held, IsOk());
  EXPECT_EQ((*pool)->used_bytes(), 8192u);
}

TEST_F(PagePoolBackingTest, FrozenPoolRefusesAllocation) {
  auto pool = Open(false);
  ASSERT_THAT(pool, IsOk());
  const SizeClassId id = (*pool)->GetOrCreateClass(4096).value();
  (*pool)->Freeze();
  EXPECT_THAT((*pool)->Allocate("a", id, 1), StatusIs(absl::StatusCode::kFailedPrecondition));
}

}  // namespace
}  // namespace icecache
