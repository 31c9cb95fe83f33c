// The push to a client's GPU through the recording fake of the CUDA runtime:
// the call sequence, the bytes that land, handle and event lifetimes, and
// that every bad request fails before any copy.
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "server/transfer/buffer_registry.h"
#include "tests/support/recording_cuda_runtime.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/transfer/paged_kv_reference.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::RecordingCudaRuntime;
using ::icecache::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string Bytes(const CudaIpcHandle& h) {
  return std::string(reinterpret_cast<const char*>(h.bytes.data()), h.bytes.size());
}

class DevicePushTest : public ::testing::TestWithParam<ScatterMode> {
 protected:
  void SetUp() override {
    BufferRegistryOptions o;
    o.cuda = &cuda_;
    o.scatter_mode = GetParam();
    auto r = BufferRegistry::Create(o);
    ASSERT_THAT(r, IsOk());
    registry_ = std::move(r).value();
    caller_.tenant = "t1";
    layout_.format = PagedKvFormat::kFlashInferHnd;
    layout_.num_layers = 2;
    layout_.num_blocks = 16;
    layout_.block_tokens = 16;
    layout_.kv_heads = 2;
    layout_.head_dim = 8;
    layout_.dtype = DType::kF16;
    size_ = 2 * 2ull * 16 * 16 * 2 * 8 * 2;
    handle_ = cuda_.AddPeerAllocation(0, size_, &peer_);
  }

  // A fetch of 2 pages per head over both layers, staged with random bytes.
  void MakeFetch(int page_tokens) {
    PageGeometry g{page_tokens, 8, DType::kF16};
    const uint32_t pt = static_cast<uint32_t>(page_tokens);
    auto f = PlanFetchLayout(g, 0, 2, {{4, 1}, {0, 2}}, {{pt, 3}, {1, pt}}, 0, size_);
    ASSERT_THAT(f, IsOk());
    fetch_ = *f;
    staged_.resize(fetch_.total_bytes);
    std::mt19937 rng(3);
    for (uint8_t& b : staged_) b = static_cast<uint8_t>(rng() | 1);
  }
  // A write of blocks 0 and 15 that waits on one peer event and records
  // another.
  DeviceWrite EventedWrite() {
    DeviceWrite dw;
    dw.block_ids = {0, 15};
    dw.wait_event = Bytes(cuda_.AddPeerEvent());
    dw.done_event = Bytes(cuda_.AddPeerEvent());
    return dw;
  }
  absl::Status Push(BufferLease& lease, const DeviceWrite& dw) {
    return lease.WriteFetch(
        fetch_, dw, [&](uint8_t* dst) { std::memcpy(dst, staged_.data(), staged_.size()); });
  }
  std::string RegisterKv() {
    auto info = registry_->RegisterCudaIpc(caller_, Bytes(handle_), size_,
                                           RecordingCudaRuntime::UuidOf(0).ToString(), absl::Now(),
                                           &layout_);
    EXPECT_THAT(info, IsOk());
    EXPECT_TRUE(info->paged_kv);
    return info->id;
  }

  // The cache holds `before` with the staged pages scattered into `blocks`
  // (the naive per-layout reference), byte for byte.
  void ExpectScattered(const std::vector<uint8_t>& before, const std::vector<uint32_t>& blocks) {
    auto resolved = ResolveKvLayout(layout_, size_);
    ASSERT_THAT(resolved, IsOk());
    const std::vector<uint8_t> want = testing::NaiveScatter(layout_, resolved->layer_base, fetch_,
                                                            blocks, staged_.data(), before);
    EXPECT_EQ(std::memcmp(peer_, want.data(), size_), 0);
  }

  RecordingCudaRuntime cuda_;
  std::unique_ptr<BufferRegistry> registry_;
  Caller caller_;
  PagedKvLayout layout_;
  uint64_t size_ = 0;
  uint8_t* peer_ = nullptr;
  CudaIpcHandle handle_;
  FetchLayout fetch_;
  std::vector<uint8_t> staged_;
};

TEST_P(DevicePushTest, ScatterIsOneCopyAndOneKernelAndLandsEveryByte) {
  const std::string id = RegisterKv();
  MakeFetch(16);
  auto lease = registry_->Acquire(caller_, id, absl::Now());
  ASSERT_THAT(lease, IsOk());
  std::memset(peer_, 0xAB, size_);
  std::vector<uint8_t> before(peer_, peer_ + size_);
  cuda_.ClearCalls();
  DeviceWrite dw;
  dw.block_ids = {9, 3};
  ASSERT_THAT(Push(*lease, dw), IsOk());
  if (GetParam() == ScatterMode::kStaged) {
    EXPECT_THAT(cuda_.ops(),
                ElementsAre("alloc_pinned", "alloc_device", "copy_h2d", "scatter", "sync"));
    // The one copy moves the pages and the task table, nothing else.
    const auto calls = cuda_.calls();
    EXPECT_EQ(calls[2].bytes, (fetch_.total_bytes + 63) / 64 * 64 + 8 * sizeof(ScatterTask));
  } else {
    EXPECT_THAT(cuda_.ops(), ElementsAre("alloc_pinned", "device_pointer_of", "scatter", "sync"));
  }
  ExpectScattered(before, dw.block_ids);
  EXPECT_EQ(cuda_.violations(), 0);
}

TEST_P(DevicePushTest, EventsOrderThePushAndAreOpenedOnce) {
  const std::string id = RegisterKv();
  MakeFetch(8);  // partial pages: rows 8..15 of every block are zero
  auto lease = registry_->Acquire(caller_, id, absl::Now());
  ASSERT_THAT(lease, IsOk());
  const DeviceWrite dw = EventedWrite();
  cuda_.ClearCalls();
  ASSERT_THAT(Push(*lease, dw), IsOk());
  std::vector<std::string> ops = cuda_.ops();
  ASSERT_GE(ops.size(), 5u);
  EXPECT_EQ(ops[1], "open_event");
  EXPECT_EQ(ops[2], "wait_event");  // before anything touches the device
  EXPECT_EQ(ops[ops.size() - 2], "open_event");
  EXPECT_EQ(ops.back(), "record_event");  // no sync: the client's stream waits
  cuda_.ClearCalls();
  ASSERT_THAT(Push(*lease, dw), IsOk());
  ops = cuda_.ops();
  EXPECT_EQ(ops.front(), "sync");  // the staging is reused only after the last push ran
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "open_event"), 0);
  EXPECT_EQ(cuda_.live_events(), 2);
  EXPECT_THAT(registry_->Unregister(caller_, id), IsOk());
  *lease = BufferLease();  // the last user goes: the buffer's resources with it
  EXPECT_EQ(cuda_.live_events(), 0);
  EXPECT_EQ(cuda_.live_streams(), 0);
  EXPECT_EQ(cuda_.live_allocations(), 0);
  EXPECT_EQ(cuda_.open_handles(), 0);
}

TEST_P(DevicePushTest, HandlesAreSharedPerClientAndClosedWithTheLastBuffer) {
  const std::string a = RegisterKv();
  auto plain = registry_->RegisterCudaIpc(caller_, Bytes(handle_), size_,
                                          RecordingCudaRuntime::UuidOf(0).ToString(), absl::Now());
  ASSERT_THAT(plain, IsOk());
  auto ops = cuda_.ops();
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "open_ipc"), 1);
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "create_stream"), 1);
  EXPECT_EQ(cuda_.open_handles(), 1);
  EXPECT_THAT(registry_->Unregister(caller_, a), IsOk());
  EXPECT_EQ(cuda_.open_handles(), 1);
  EXPECT_EQ(registry_->DropTenant("t1"), 1);  // the client's lease ended
  EXPECT_EQ(cuda_.open_handles(), 0);
  EXPECT_EQ(cuda_.live_streams(), 0);
}

TEST_P(DevicePushTest, PlainCopyGoesToTheRequestedOffset) {
  auto info = registry_->RegisterCudaIpc(caller_, Bytes(handle_), size_,
                                         RecordingCudaRuntime::UuidOf(0).ToString(), absl::Now());
  ASSERT_THAT(info, IsOk());
  PageGeometry g{8, 8, DType::kF16};
  auto f = PlanFetchLayout(g, 0, 1, {{0}, {1}}, {{8}, {8}}, 512, size_);
  ASSERT_THAT(f, IsOk());
  fetch_ = *f;
  staged_.assign(fetch_.total_bytes, 0x5A);
  auto lease = registry_->Acquire(caller_, info->id, absl::Now());
  ASSERT_THAT(lease, IsOk());
  cuda_.ClearCalls();
  ASSERT_THAT(Push(*lease, DeviceWrite{}), IsOk());
  const auto calls = cuda_.calls();
  ASSERT_EQ(calls.size(), 3u);  // alloc_pinned, copy_h2d, sync
  EXPECT_EQ(calls[1].op, "copy_h2d");
  EXPECT_EQ(calls[1].ptr, peer_ + 512);
  EXPECT_EQ(calls[1].bytes, fetch_.total_bytes);
  EXPECT_EQ(peer_[512], 0x5A);
  EXPECT_EQ(peer_[511], 0);
}

TEST_P(DevicePushTest, BadRequestsFailBeforeAnyCopy) {
  const std::string id = RegisterKv();
  MakeFetch(16);
  auto lease = registry_->Acquire(caller_, id, absl::Now());
  ASSERT_THAT(lease, IsOk());
  cuda_.ClearCalls();
  DeviceWrite dw;
  dw.block_ids = {1, 16};
  EXPECT_THAT(Push(*lease, dw),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("block_ids[1] = 16")));
  dw.block_ids = {1, 2};
  dw.wait_event = "short";
  EXPECT_THAT(Push(*lease, dw),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("wait_event")));
  EXPECT_TRUE(cuda_.ops().empty());
  // A CUDA error is a status naming the call, and the next push still works.
  dw.wait_event.clear();
  cuda_.FailNext("scatter");
  EXPECT_THAT(Push(*lease, dw), StatusIs(absl::StatusCode::kInternal, HasSubstr("scatter")));
  EXPECT_THAT(Push(*lease, dw), IsOk());
  EXPECT_EQ(cuda_.violations(), 0);
}

TEST_P(DevicePushTest, RegistrationChecksTheLayoutFirst) {
  PagedKvLayout big = layout_;
  big.num_blocks = 17;
  EXPECT_THAT(
      registry_->RegisterCudaIpc(caller_, Bytes(handle_), size_,
                                 RecordingCudaRuntime::UuidOf(0).ToString(), absl::Now(), &big),
      StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("paged_kv")));
  EXPECT_EQ(cuda_.open_handles(), 0);
  // Without a device the form is still checked first.
  BufferRegistryOptions o;
  auto none = BufferRegistry::Create(o);
  ASSERT_THAT(none, IsOk());
  EXPECT_THAT(
      (*none)->RegisterCudaIpc(caller_, Bytes(handle_), size_,
                               RecordingCudaRuntime::UuidOf(0).ToString(), absl::Now(), &big),
      StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(
      (*none)->RegisterCudaIpc(caller_, Bytes(handle_), size_,
                               RecordingCudaRuntime::UuidOf(0).ToString(), absl::Now(), &layout_),
      StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no CUDA device")));
}

TEST_P(DevicePushTest, DeviceFieldsNeedACudaBufferWithALayout) {
  auto plain = registry_->RegisterCudaIpc(caller_, Bytes(handle_), size_,
                                          RecordingCudaRuntime::UuidOf(0).ToString(), absl::Now());
  ASSERT_THAT(plain, IsOk());
  MakeFetch(16);
  auto lease = registry_->Acquire(caller_, plain->id, absl::Now());
  ASSERT_THAT(lease, IsOk());
  DeviceWrite dw;
  dw.block_ids = {0, 1};
  EXPECT_THAT(Push(*lease, dw), StatusIs(absl::StatusCode::kFailedPrecondition,
                                         HasSubstr("without a paged_kv layout")));
}

INSTANTIATE_TEST_SUITE_P(Modes, DevicePushTest,
                         ::testing::Values(ScatterMode::kStaged, ScatterMode::kZeroCopy),
                         [](const auto& info) {
                           return info.param == ScatterMode::kStaged ? "Staged" : "ZeroCopy";
                         });

// The direct mode (device_push.h): the fetch's frames lie in a pinned,
// mapped arena (the pool's, here a host array registered with the fake), so
// the device reads them in place; with the fallback mode of each parameter.
class DirectPushTest : public DevicePushTest {
 protected:
  void SetUp() override {
    DevicePushTest::SetUp();
    arena_.assign(64 * 1024 + 64, 0);
    base_ = arena_.data() + (64 - reinterpret_cast<uintptr_t>(arena_.data()) % 64) % 64;
    ASSERT_THAT(cuda_.HostRegister(base_, 64 * 1024), IsOk());
    registry_->pinned_region()->Set(base_, 64 * 1024, 0);
  }
  // MakeFetch, then the staged bytes spread over frames of the arena (frame
  // i at slot 7 * i + 3, out of order, as a pool's pages are).
  void MakeFrames(int page_tokens) {
    MakeFetch(page_tokens);
    frame_bytes_ = fetch_.frame_bytes;
    frames_.clear();
    for (size_t i = 0; i * frame_bytes_ < staged_.size(); ++i) {
      uint8_t* f = base_ + ((7 * i + 3) % 29) * frame_bytes_;
      std::memcpy(f, staged_.data() + i * frame_bytes_, frame_bytes_);
      frames_.push_back(f);
    }
  }
  absl::Status PushFrames(BufferLease& lease, const DeviceWrite& dw) {
    return lease.WriteFetch(
        fetch_, dw,
        [&](uint8_t* dst) {
          ++fills_;
          std::memcpy(dst, staged_.data(), staged_.size());
        },
        PageFrames{frames_.data(), frames_.size(), frame_bytes_});
  }

  std::vector<uint8_t> arena_;
  uint8_t* base_ = nullptr;
  uint64_t frame_bytes_ = 0;
  std::vector<const uint8_t*> frames_;
  int fills_ = 0;
};

TEST_P(DirectPushTest, TheScatterReadsThePagesInPlaceAndLandsEveryByte) {
  const std::string id = RegisterKv();
  MakeFrames(8);  // partial pages: rows 8..15 of every block are zero
  auto lease = registry_->Acquire(caller_, id, absl::Now());
  ASSERT_THAT(lease, IsOk());
  std::memset(peer_, 0xAB, size_);
  const std::vector<uint8_t> before(peer_, peer_ + size_);
  cuda_.ClearCalls();
  DeviceWrite dw;
  dw.block_ids = {9, 3};
  ASSERT_THAT(PushFrames(*lease, dw), IsOk());
  EXPECT_EQ(fills_, 0);  // no CPU gather
  EXPECT_THAT(cuda_.ops(),
              ElementsAre("alloc_pinned", "alloc_device", "copy_h2d", "scatter_in_place", "sync"));
  // The one copy moves the tables only: 8 tasks, then a device address per frame.
  EXPECT_EQ(cuda_.calls()[2].bytes, 8 * sizeof(ScatterTask) + frames_.size() * sizeof(void*));
  ExpectScattered(before, dw.block_ids);
  EXPECT_EQ(cuda_.violations(), 0);
  EXPECT_EQ(registry_->push_counts()->in_place.load(), 1u);
  EXPECT_EQ(registry_->push_counts()->staged.load(), 0u);
}

TEST_P(DirectPushTest, APlainFetchIsGatheredOnTheDeviceAtItsOffset) {
  auto info = registry_->RegisterCudaIpc(caller_, Bytes(handle_), size_,
                                         RecordingCudaRuntime::UuidOf(0).ToString(), absl::Now());
  ASSERT_THAT(info, IsOk());
  PageGeometry g{8, 8, DType::kF16};
  auto f = PlanFetchLayout(g, 0, 2, {{0, 5}, {1}}, {{8, 3}, {8}}, 512, size_);
  ASSERT_THAT(f, IsOk());
  fetch_ = *f;
  staged_.resize(fetch_.total_bytes);
  std::mt19937 rng(5);
  for (uint8_t& b : staged_) b = static_cast<uint8_t>(rng() | 1);
  frame_bytes_ = fetch_.frame_bytes;
  for (size_t i = 0; i * frame_bytes_ < staged_.size(); ++i) {
    uint8_t* frame = base_ + (40 - i) * frame_bytes_;
    std::memcpy(frame, staged_.data() + i * frame_bytes_, frame_bytes_);
    frames_.push_back(frame);
  }
  auto lease = registry_->Acquire(caller_, info->id, absl::Now());
  ASSERT_THAT(lease, IsOk());
  cuda_.ClearCalls();
  ASSERT_THAT(PushFrames(*lease, DeviceWrite{}), IsOk());
  EXPECT_EQ(fills_, 0);
  EXPECT_THAT(cuda_.ops(),
              ElementsAre("alloc_pinned", "alloc_device", "copy_h2d", "gather_frames", "sync"));
  EXPECT_EQ(cuda_.calls()[3].ptr, peer_ + 512);
  EXPECT_EQ(std::memcmp(peer_ + 512, staged_.data(), staged_.size()), 0);
  EXPECT_EQ(peer_[511], 0);
  EXPECT_EQ(peer_[512 + staged_.size()], 0);
  EXPECT_EQ(cuda_.violations(), 0);
}

TEST_P(DirectPushTest, ADoneEventIsRecordedAndThePushStillWaitsForTheRead) {
  const std::string id = RegisterKv();
  MakeFrames(16);
  auto lease = registry_->Acquire(caller_, id, absl::Now());
  ASSERT_THAT(lease, IsOk());
  const DeviceWrite dw = EventedWrite();
  cuda_.ClearCalls();
  ASSERT_THAT(PushFrames(*lease, dw), IsOk());
  const std::vector<std::string> ops = cuda_.ops();
  ASSERT_GE(ops.size(), 4u);
  EXPECT_NE(std::find(ops.begin(), ops.end(), "wait_event"), ops.end());
  EXPECT_LT(std::find(ops.begin(), ops.end(), "wait_event"),
            std::find(ops.begin(), ops.end(), "copy_h2d"));
  EXPECT_EQ(ops[ops.size() - 2], "record_event");
  EXPECT_EQ(ops.back(), "sync");  // the pool's pages are read before the call returns
  EXPECT_EQ(fills_, 0);
}

TEST_P(DirectPushTest, FramesOutsideThePinnedRegionAreStaged) {
  const std::string id = RegisterKv();
  MakeFrames(16);
  std::vector<uint8_t> elsewhere(frame_bytes_ + 64);
  uint8_t* outside =
      elsewhere.data() + (64 - reinterpret_cast<uintptr_t>(elsewhere.data()) % 64) % 64;
  std::memcpy(outside, frames_.back(), frame_bytes_);
  frames_.back() = outside;  // one frame not pinned: the whole push is staged
  auto lease = registry_->Acquire(caller_, id, absl::Now());
  ASSERT_THAT(lease, IsOk());
  std::memset(peer_, 0xAB, size_);
  const std::vector<uint8_t> before(peer_, peer_ + size_);
  DeviceWrite dw;
  dw.block_ids = {2, 4};
  cuda_.ClearCalls();
  ASSERT_THAT(PushFrames(*lease, dw), IsOk());
  EXPECT_EQ(fills_, 1);
  const std::vector<std::string> ops = cuda_.ops();
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "scatter_in_place"), 0);
  ExpectScattered(before, dw.block_ids);
  EXPECT_EQ(registry_->push_counts()->staged.load(), 1u);
  // Without a pinned region (the pool not pinned yet) too.
  registry_->pinned_region()->Set(nullptr, 0, 0);
  MakeFrames(16);
  ASSERT_THAT(PushFrames(*lease, dw), IsOk());
  EXPECT_EQ(fills_, 2);
  EXPECT_EQ(registry_->push_counts()->in_place.load(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Modes, DirectPushTest,
                         ::testing::Values(ScatterMode::kStaged, ScatterMode::kZeroCopy),
                         [](const ::testing::TestParamInfo<ScatterMode>& info) {
                           return info.param == ScatterMode::kStaged ? "Staged" : "ZeroCopy";
                         });

}  // namespace
}  // namespace icecache
