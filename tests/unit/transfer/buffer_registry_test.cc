#include "server/transfer/buffer_registry.h"

#include <unistd.h>

#include <cstring>
#include <string>
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

const absl::Time kT0 = absl::FromUnixSeconds(1'000'000);

Caller Alice() { return Caller{"alice", static_cast<uint32_t>(getuid()), false}; }
Caller Bob() { return Caller{"bob", static_cast<uint32_t>(getuid()), false}; }

std::unique_ptr<BufferRegistry> MakeRegistry(int max_per_tenant = 8, CudaRuntime* cuda = nullptr) {
  BufferRegistryOptions o;
  o.max_buffers_per_tenant = max_per_tenant;
  o.idle_ttl = absl::Seconds(30);
  o.cuda = cuda;
  auto r = BufferRegistry::Create(o);
  EXPECT_THAT(r, IsOk());
  return std::move(r).value();
}

TEST(BufferRegistryTest, CreateValidatesOptions) {
  BufferRegistryOptions o;
  o.max_buffers_per_tenant = 0;
  EXPECT_THAT(BufferRegistry::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(BufferRegistryTest, RegisterWriteReadUnregister) {
  auto reg = MakeRegistry();
  auto file = ShmFile::Create(UniqueShmName("reg"), 4096);
  ASSERT_THAT(file, IsOk());
  auto info = reg->RegisterShm(Alice(), file->path(), 4096, kT0);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->id.size(), 32u);
  EXPECT_EQ(info->kind, BufferKind::kHostShm);
  EXPECT_EQ(info->tenant, "alice");
  EXPECT_EQ(info->path, file->path());

  auto lease = reg->Acquire(Alice(), info->id, kT0);
  ASSERT_THAT(lease, IsOk());
  EXPECT_EQ(reg->Get(Alice(), info->id)->leases, 1);
  ASSERT_THAT(lease->Write(100, 8, [](uint8_t* d) { std::memcpy(d, "icecache", 8); }), IsOk());
  EXPECT_EQ(std::memcmp(file->data() + 100, "icecache", 8), 0);
  std::memcpy(file->data() + 200, "fromclnt", 8);
  char back[8];
  ASSERT_THAT(lease->Read(200, 8, back), IsOk());
  EXPECT_EQ(std::memcmp(back, "fromclnt", 8), 0);

  // Unregister while leased: the id is gone, the mapping stays usable.
  ASSERT_THAT(reg->Unregister(Alice(), info->id), IsOk());
  EXPECT_THAT(reg->Acquire(Alice(), info->id, kT0), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(lease->Write(0, 4, [](uint8_t* d) { std::memcpy(d, "last", 4); }), IsOk());
  EXPECT_EQ(std::memcmp(file->data(), "last", 4), 0);
  EXPECT_THAT(reg->Unregister(Alice(), info->id), StatusIs(absl::StatusCode::kNotFound));
}

TEST(BufferRegistryTest, BoundsAreCheckedBeforeAnyByteIsWritten) {
  auto reg = MakeRegistry();
  auto file = ShmFile::Create(UniqueShmName("bounds"), 8192);
  ASSERT_THAT(file, IsOk());
  auto info = reg->RegisterShm(Alice(), file->path(), 4096, kT0);  // registers less than the file
  ASSERT_THAT(info, IsOk());
  auto lease = reg->Acquire(Alice(), info->id, kT0);
  ASSERT_THAT(lease, IsOk());
  bool called = false;
  auto fill = [&](uint8_t*) { called = true; };
  EXPECT_THAT(lease->Write(4000, 97, fill),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("exceeds buffer size 4096")));
  EXPECT_THAT(lease->Write(4097, 0, fill), StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(lease->Write(~uint64_t{0} - 10, 20, fill), StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(lease->Write(1, ~uint64_t{0}, fill), StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_FALSE(called);
  EXPECT_THAT(lease->Write(4000, 96, fill), IsOk());
  EXPECT_TRUE(called);
  char buf[16];
  EXPECT_THAT(lease->Read(4090, 16, buf), StatusIs(absl::StatusCode::kOutOfRange));
}

TEST(BufferRegistryTest, TruncatedFileGivesStatusNotCrash) {
  auto reg = MakeRegistry();
  const long page = sysconf(_SC_PAGESIZE);
  auto file = ShmFile::Create(UniqueShmName("trunc"), 8 * page);
  ASSERT_THAT(file, IsOk());
  auto info = reg->RegisterShm(Alice(), file->path(), 8 * page, kT0);
  ASSERT_THAT(info, IsOk());
  auto lease = reg->Acquire(Alice(), info->id, kT0);
  ASSERT_THAT(lease, IsOk());
  ASSERT_EQ(ftruncate(file->fd(), page), 0);
  bool called = false;
  EXPECT_THAT(lease->Write(0, 8 * page, [&](uint8_t*) { called = true; }),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("shrank")));
  EXPECT_FALSE(called);  // refused by the fstat check before the copy
  std::vector<uint8_t> out(8 * page);
  EXPECT_THAT(lease->Read(0, 8 * page, out.data()),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("shrank")));
  // Within the remaining size it still works.
  EXPECT_THAT(lease->Write(0, page, [](uint8_t* d) { d[0] = 9; }), IsOk());

  // The race: the file shrinks after the fstat check, during the copy. The
  // SIGBUS guard catches the fault.
  ASSERT_EQ(ftruncate(file->fd(), 8 * page), 0);
  int fd = file->fd();
  absl::Status s = lease->Write(0, 8 * page, [&](uint8_t* d) {
    d[0] = 1;
    (void)!ftruncate(fd, 0);
    std::memset(d, 3, 8 * page);
  });
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("SIGBUS")));
}

// FileCheck::kChecked skips the fstat (the caller checked the region once for
// its request) but not the range check or the guard; ReadInPlace checks once
// and guards the whole of its function.
TEST(BufferRegistryTest, CheckedAccessesKeepTheRangeCheckAndTheGuard) {
  auto reg = MakeRegistry();
  const long page = sysconf(_SC_PAGESIZE);
  auto file = ShmFile::Create(UniqueShmName("checked"), 4 * page);
  ASSERT_THAT(file, IsOk());
  auto info = reg->RegisterShm(Alice(), file->path(), 4 * page, kT0);
  ASSERT_THAT(info, IsOk());
  auto lease = reg->Acquire(Alice(), info->id, kT0);
  ASSERT_THAT(lease, IsOk());
  const auto checked = BufferLease::FileCheck::kChecked;
  EXPECT_THAT(lease->Write(
                  8, 4, [](uint8_t* d) { std::memcpy(d, "ring", 4); }, checked),
              IsOk());
  char back[4];
  ASSERT_THAT(lease->Read(8, 4, back, checked), IsOk());
  EXPECT_EQ(std::memcmp(back, "ring", 4), 0);
  uint64_t seen = 0;
  ASSERT_THAT(lease->ReadInPlace(8, 4, [&](const uint8_t* p) { seen = p[0]; }), IsOk());
  EXPECT_EQ(seen, uint64_t{'r'});
  bool called = false;
  EXPECT_THAT(lease->Write(
                  4 * page - 2, 4, [&](uint8_t*) { called = true; }, checked),
              StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(lease->ReadInPlace(4 * page - 2, 4, [&](const uint8_t*) { called = true; }),
              StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_FALSE(called);

  // Truncated to nothing: the unchecked write meets the guard, not a crash;
  // ReadInPlace's own check refuses before calling.
  ASSERT_EQ(ftruncate(file->fd(), 0), 0);
  EXPECT_THAT(lease->Write(
                  0, 4 * page, [](uint8_t* d) { std::memset(d, 1, 16); }, checked),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("SIGBUS")));
  EXPECT_THAT(lease->Read(0, 16, back, checked),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("SIGBUS")));
  EXPECT_THAT(lease->ReadInPlace(0, 8, [&](const uint8_t*) { called = true; }),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("shrank")));
  EXPECT_FALSE(called);
  // Truncated while the function runs: the guard ends it.
  ASSERT_EQ(ftruncate(file->fd(), 4 * page), 0);
  int fd = file->fd();
  int looks = 0;
  EXPECT_THAT(lease->ReadInPlace(0, 8,
                                 [&](const uint8_t* p) {
                                   for (;; ++looks) {
                                     if (looks == 3) (void)!ftruncate(fd, 0);
                                     if (__atomic_load_n(p, __ATOMIC_ACQUIRE) == 0xFF) return;
                                   }
                                 }),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("SIGBUS")));
  EXPECT_EQ(looks, 3);
}

TEST(BufferRegistryTest, TenantsNeverSeeEachOthersBuffers) {
  auto reg = MakeRegistry();
  auto file = ShmFile::Create(UniqueShmName("iso"), 4096);
  ASSERT_THAT(file, IsOk());
  auto info = reg->RegisterShm(Alice(), file->path(), 4096, kT0);
  ASSERT_THAT(info, IsOk());
  // Bob gets exactly the answer of an unknown id.
  EXPECT_THAT(
      reg->Acquire(Bob(), info->id, kT0),
      StatusIs(absl::StatusCode::kNotFound, HasSubstr("buffer " + info->id + " not found")));
  EXPECT_THAT(reg->Get(Bob(), info->id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(reg->Unregister(Bob(), info->id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(reg->Touch(Bob(), info->id, kT0), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_TRUE(reg->List(Bob()).empty());
  EXPECT_EQ(reg->List(Alice()).size(), 1u);
  Caller admin{"ops", 0, true};
  EXPECT_EQ(reg->List(admin).size(), 1u);
  EXPECT_THAT(reg->Get(Alice(), info->id), IsOk());
}

TEST(BufferRegistryTest, ShmChecksApplyAtRegistration) {
  auto reg = MakeRegistry();
  auto file = ShmFile::Create(UniqueShmName("checks"), 4096);
  ASSERT_THAT(file, IsOk());
  Caller other_uid{"alice", static_cast<uint32_t>(getuid()) + 1, false};
  EXPECT_THAT(reg->RegisterShm(other_uid, file->path(), 4096, kT0),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(reg->RegisterShm(Alice(), file->path(), 1 << 20, kT0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(reg->RegisterShm(Alice(), "/etc/passwd", 10, kT0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  const std::string link = "/dev/shm/" + UniqueShmName("reglink");
  ASSERT_EQ(symlink(file->path().c_str(), link.c_str()), 0);
  EXPECT_THAT(reg->RegisterShm(Alice(), link, 4096, kT0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("symlink")));
  unlink(link.c_str());
  EXPECT_THAT(reg->RegisterShm(Caller{"", 0, false}, file->path(), 4096, kT0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(reg->size(), 0u);
}

TEST(BufferRegistryTest, PerTenantLimit) {
  auto reg = MakeRegistry(2);
  auto file = ShmFile::Create(UniqueShmName("limit"), 4096);
  ASSERT_THAT(file, IsOk());
  ASSERT_THAT(reg->RegisterShm(Alice(), file->path(), 4096, kT0), IsOk());
  ASSERT_THAT(reg->RegisterShm(Alice(), file->path(), 4096, kT0), IsOk());
  EXPECT_THAT(reg->RegisterShm(Alice(), file->path(), 4096, kT0),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("max_buffers_per_tenant")));
  EXPECT_THAT(reg->RegisterShm(Bob(), file->path(), 4096, kT0), IsOk());
  EXPECT_EQ(reg->DropTenant("alice"), 2);
  EXPECT_EQ(reg->size(), 1u);
}

TEST(BufferRegistryTest, IdleBuffersExpireButLeasedOnesStay) {
  auto reg = MakeRegistry();
  auto file = ShmFile::Create(UniqueShmName("idle"), 4096);
  ASSERT_THAT(file, IsOk());
  auto a = reg->RegisterShm(Alice(), file->path(), 4096, kT0);
  auto b = reg->RegisterShm(Alice(), file->path(), 4096, kT0);
  auto c = reg->RegisterShm(Bob(), file->path(), 4096, kT0);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(reg->ExpireIdle(kT0 + absl::Seconds(30)), 0);  // exactly the TTL: not yet
  ASSERT_THAT(reg->Touch(Alice(), a->id, kT0 + absl::Seconds(20)), IsOk());
  auto lease = reg->Acquire(Bob(), c->id, kT0);
  ASSERT_THAT(lease, IsOk());
  EXPECT_EQ(reg->ExpireIdle(kT0 + absl::Seconds(31)), 1);  // only b
  EXPECT_THAT(reg->Get(Alice(), b->id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(reg->Get(Alice(), a->id), IsOk());
  EXPECT_THAT(reg->Get(Bob(), c->id), IsOk());
  reg->TouchTenant("alice", kT0 + absl::Seconds(60));
  *lease = BufferLease();
  EXPECT_EQ(reg->ExpireIdle(kT0 + absl::Seconds(61)), 1);  // c, now unleased
  EXPECT_THAT(reg->Get(Alice(), a->id), IsOk());
}

TEST(BufferRegistryTest, CudaIpcWithoutDeviceIsFailedPrecondition) {
  auto cuda = CudaRuntime::Create();
  if (cuda->available()) GTEST_SKIP() << "a CUDA device is present; this test needs none";
  auto reg = MakeRegistry(8, cuda.get());
  std::string handle(64, '\x01');
  const std::string uuid = "GPU-01234567-89ab-cdef-0123-456789abcdef";
  EXPECT_THAT(reg->RegisterCudaIpc(Alice(), handle, 1 << 20, uuid, kT0),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no CUDA device")));
  // Malformed input is still InvalidArgument first.
  EXPECT_THAT(reg->RegisterCudaIpc(Alice(), std::string(63, 'x'), 1 << 20, uuid, kT0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("64 bytes")));
  EXPECT_THAT(reg->RegisterCudaIpc(Alice(), handle, 0, uuid, kT0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(reg->RegisterCudaIpc(Alice(), handle, 1 << 20, "GPU-xyz", kT0),
              StatusIs(absl::StatusCode::kInvalidArgument));
  auto no_runtime = MakeRegistry(8, nullptr);
  EXPECT_THAT(no_runtime->RegisterCudaIpc(Alice(), handle, 1 << 20, uuid, kT0),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no CUDA device")));
}

}  // namespace
}  // namespace icecache
