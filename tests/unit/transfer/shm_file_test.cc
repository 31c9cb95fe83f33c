#include "common/shm_file.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/transfer/shm_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::icecache::testing::UniqueShmName;
using ::testing::HasSubstr;

TEST(ShmFileTest, CreateThenOpenCheckedSharesBytes) {
  auto f = ShmFile::Create(UniqueShmName("share"), 8192);
  ASSERT_THAT(f, IsOk());
  std::memset(f->data(), 0x5a, 8192);
  auto g = ShmFile::OpenChecked(f->path(), 4096, getuid());
  ASSERT_THAT(g, IsOk());
  EXPECT_EQ(g->size(), 4096u);
  EXPECT_EQ(g->data()[4095], 0x5a);
  g->data()[0] = 1;
  EXPECT_EQ(f->data()[0], 1);  // MAP_SHARED both ways
}

TEST(ShmFileTest, CreateRefusesBadNamesAndExisting) {
  EXPECT_THAT(ShmFile::Create("a/b", 10), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ShmFile::Create("..", 10), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ShmFile::Create("", 10), StatusIs(absl::StatusCode::kInvalidArgument));
  const std::string name = UniqueShmName("dup");
  EXPECT_THAT(ShmFile::Create(name, 0), StatusIs(absl::StatusCode::kInvalidArgument));
  auto f = ShmFile::Create(name, 10);
  ASSERT_THAT(f, IsOk());
  EXPECT_THAT(ShmFile::Create(name, 10), StatusIs(absl::StatusCode::kAlreadyExists));
}

TEST(ShmFileTest, UnlinksOnClose) {
  std::string path;
  {
    auto f = ShmFile::Create(UniqueShmName("unlink"), 64);
    ASSERT_THAT(f, IsOk());
    path = f->path();
    EXPECT_EQ(access(path.c_str(), F_OK), 0);
  }
  EXPECT_NE(access(path.c_str(), F_OK), 0);
}

TEST(ShmFileTest, RefusesPathsOutsideRootAndDotDot) {
  EXPECT_THAT(ShmFile::OpenChecked("/tmp/x", 10, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not under /dev/shm")));
  EXPECT_THAT(ShmFile::OpenChecked("/dev/shm/../../etc/passwd", 10, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'..'")));
  EXPECT_THAT(ShmFile::OpenChecked("/dev/shm//x", 10, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ShmFile::OpenChecked("dev/shm/x", 10, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("absolute")));
  EXPECT_THAT(ShmFile::OpenChecked("/dev/shm", 10, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ShmFile::OpenChecked("/dev/shmx/y", 10, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ShmFile::OpenChecked("/dev/shm/" + UniqueShmName("missing"), 10, getuid()),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(ShmFileTest, RefusesSymlinks) {
  auto target = ShmFile::Create(UniqueShmName("target"), 4096);
  ASSERT_THAT(target, IsOk());
  const std::string link = "/dev/shm/" + UniqueShmName("link");
  ASSERT_EQ(symlink(target->path().c_str(), link.c_str()), 0);
  EXPECT_THAT(ShmFile::OpenChecked(link, 4096, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("symlink")));
  unlink(link.c_str());
  // A symlinked directory in the middle is refused too (it points outside).
  const std::string dirlink = "/dev/shm/" + UniqueShmName("dirlink");
  ASSERT_EQ(symlink("/tmp", dirlink.c_str()), 0);
  EXPECT_THAT(ShmFile::OpenChecked(dirlink + "/whatever", 16, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("symlink")));
  unlink(dirlink.c_str());
}

TEST(ShmFileTest, RefusesNonRegularFiles) {
  const std::string dir = "/dev/shm/" + UniqueShmName("dir");
  ASSERT_EQ(mkdir(dir.c_str(), 0700), 0);
  EXPECT_THAT(ShmFile::OpenChecked(dir, 16, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  rmdir(dir.c_str());
  const std::string fifo = "/dev/shm/" + UniqueShmName("fifo");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_THAT(ShmFile::OpenChecked(fifo, 16, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("regular")));
  unlink(fifo.c_str());
}

TEST(ShmFileTest, RefusesWrongOwner) {
  auto f = ShmFile::Create(UniqueShmName("owner"), 4096);
  ASSERT_THAT(f, IsOk());
  // The caller claims another uid than the file's owner.
  EXPECT_THAT(ShmFile::OpenChecked(f->path(), 4096, getuid() + 1),
              StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr("owned by uid")));
  if (geteuid() == 0) {
    // As root we can give the file away: owned by nobody, refused for root.
    ASSERT_EQ(fchown(f->fd(), 65534, 65534), 0);
    EXPECT_THAT(ShmFile::OpenChecked(f->path(), 4096, 0),
                StatusIs(absl::StatusCode::kPermissionDenied));
    EXPECT_THAT(ShmFile::OpenChecked(f->path(), 4096, 65534), IsOk());
  }
}

TEST(ShmFileTest, RefusesSizeLies) {
  auto f = ShmFile::Create(UniqueShmName("size"), 4096);
  ASSERT_THAT(f, IsOk());
  EXPECT_THAT(ShmFile::OpenChecked(f->path(), 4097, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("fewer than the claimed")));
  EXPECT_THAT(ShmFile::OpenChecked(f->path(), 0, getuid()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ShmOpenOptions small;
  small.max_bytes = 1024;
  EXPECT_THAT(ShmFile::OpenChecked(f->path(), 2048, getuid(), small),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// The daemon touches the pages a client's file holds, and only those: a
// sparse file keeps its holes (a read there would allocate the page).
TEST(ShmFileTest, TouchResidentPagesTouchesTheHeldPagesAndFillsNoHole) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  auto f = ShmFile::Create(UniqueShmName("touch"), 64 * page);
  ASSERT_THAT(f, IsOk());
  f->data()[0] = 1;
  f->data()[5 * page + 7] = 2;
  f->data()[63 * page] = 3;
  struct stat before;
  ASSERT_EQ(fstat(f->fd(), &before), 0);
  auto g = ShmFile::OpenChecked(f->path(), 64 * page, getuid());
  ASSERT_THAT(g, IsOk());
  auto touched = g->TouchResidentPages(absl::InfiniteDuration());
  ASSERT_THAT(touched, IsOk());
  EXPECT_EQ(*touched, 3 * page);
  struct stat after;
  ASSERT_EQ(fstat(f->fd(), &after), 0);
  EXPECT_EQ(after.st_blocks, before.st_blocks);  // no hole filled
  EXPECT_EQ(g->data()[5 * page + 7], 2);         // nothing written
  // A whole file is touched whole, however small the budget: the first
  // 64 MiB always are.
  std::memset(f->data(), 0x11, 64 * page);
  touched = g->TouchResidentPages(absl::ZeroDuration());
  ASSERT_THAT(touched, IsOk());
  EXPECT_EQ(*touched, 64 * page);
  // A file cut short meanwhile: what is gone is not held, so not touched.
  ASSERT_EQ(ftruncate(f->fd(), 8 * page), 0);
  touched = g->TouchResidentPages(absl::InfiniteDuration());
  ASSERT_THAT(touched, IsOk());
  EXPECT_EQ(*touched, 8 * page);
}

TEST(ShmFileTest, CheckFileCoversSeesTruncation) {
  auto f = ShmFile::Create(UniqueShmName("shrink"), 8192);
  ASSERT_THAT(f, IsOk());
  auto g = ShmFile::OpenChecked(f->path(), 8192, getuid());
  ASSERT_THAT(g, IsOk());
  EXPECT_THAT(g->CheckFileCovers(8192), IsOk());
  ASSERT_EQ(ftruncate(f->fd(), 100), 0);
  EXPECT_THAT(g->CheckFileCovers(8192),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("shrank")));
}

TEST(ShmFileTest, SigbusGuardTurnsTruncationIntoStatus) {
  const long page = sysconf(_SC_PAGESIZE);
  auto f = ShmFile::Create(UniqueShmName("sigbus"), 4 * page);
  ASSERT_THAT(f, IsOk());
  auto g = ShmFile::OpenChecked(f->path(), 4 * page, getuid());
  ASSERT_THAT(g, IsOk());
  ASSERT_EQ(ftruncate(f->fd(), 0), 0);  // the client shrinks the file under us
  std::vector<uint8_t> src(4 * page, 7);
  uint8_t* dst = g->data();
  // Without the guard this memcpy kills the process with SIGBUS.
  absl::Status s = RunSigbusGuarded([&] { std::memcpy(dst, src.data(), src.size()); });
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("shrank")));
  // The guard is reusable and does not disturb normal code.
  int x = 0;
  EXPECT_THAT(RunSigbusGuarded([&] { x = 42; }), IsOk());
  EXPECT_EQ(x, 42);
  s = RunSigbusGuarded([&] {
    volatile uint8_t v = dst[page];
    (void)v;
  });
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kFailedPrecondition));
  // Nested use is refused, not undefined.
  absl::Status inner;
  EXPECT_THAT(RunSigbusGuarded([&] { inner = RunSigbusGuarded([] {}); }), IsOk());
  EXPECT_THAT(inner, StatusIs(absl::StatusCode::kInternal));
}

// The guard does not save the signal mask (a system call per access); a
// caught fault must still leave the mask as it was: SIGBUS unblocked (else
// the next fault kills), other blocked signals still blocked.
TEST(ShmFileTest, ACaughtSigbusLeavesTheSignalMaskAsItWas) {
  const long page = sysconf(_SC_PAGESIZE);
  auto f = ShmFile::Create(UniqueShmName("sigbus-mask"), page);
  ASSERT_THAT(f, IsOk());
  ASSERT_EQ(ftruncate(f->fd(), 0), 0);
  sigset_t usr2, before, after;
  sigemptyset(&usr2);
  sigaddset(&usr2, SIGUSR2);
  ASSERT_EQ(pthread_sigmask(SIG_BLOCK, &usr2, &before), 0);
  ASSERT_EQ(pthread_sigmask(SIG_BLOCK, nullptr, &before), 0);
  uint8_t* p = f->data();
  for (int i = 0; i < 3; ++i) {  // a second fault is caught too
    EXPECT_THAT(RunSigbusGuarded([&] { p[0] = 1; }),
                StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("shrank")));
    ASSERT_EQ(pthread_sigmask(SIG_BLOCK, nullptr, &after), 0);
    EXPECT_EQ(sigismember(&after, SIGBUS), 0);
    EXPECT_EQ(sigismember(&after, SIGUSR2), 1);
    for (int sig = 1; sig < SIGRTMIN; ++sig) {
      EXPECT_EQ(sigismember(&after, sig), sigismember(&before, sig)) << "signal " << sig;
    }
  }
  ASSERT_EQ(pthread_sigmask(SIG_UNBLOCK, &usr2, nullptr), 0);
}

TEST(ShmFileTest, UnguardedSigbusStillKills) {
  const long page = sysconf(_SC_PAGESIZE);
  auto f = ShmFile::Create(UniqueShmName("sigbus-dead"), page);
  ASSERT_THAT(f, IsOk());
  ASSERT_THAT(RunSigbusGuarded([] {}), IsOk());  // handler installed
  ASSERT_EQ(ftruncate(f->fd(), 0), 0);
  uint8_t* p = f->data();
  // Dies (by SIGBUS; under AddressSanitizer, by its SIGBUS report).
  EXPECT_DEATH({ p[0] = 1; }, "");
}

}  // namespace
}  // namespace icecache
