// The client API of paged KV caches, block ids, events and layer-group
// prefetch (client.h RegisterCudaIpc, DeviceWrite, StepOptions) against a
// real icecached. What needs no GPU runs here: the daemon's precise answers
// to a paged KV registration without a device and to bad layouts, the
// client's own checks of block ids and event handles, device fields on a
// HOST_SHM buffer (nothing written), and prefetch into shared memory with
// every byte checked. The device path itself: tests/gpu.
#include <cstring>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;
using Code = absl::StatusCode;

constexpr int kTokens = 512;

class DeviceApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto d = StartDaemon();
    ASSERT_THAT(d, IsOk());
    daemon_ = *std::move(d);
    auto c = Connect(*daemon_);
    ASSERT_THAT(c, IsOk());
    client_ = *std::move(c);
    // kTokens + 1: PrefetchedLayers... appends token kTokens as a decode
    // token (Chunk past the model's end read beyond its arrays).
    model_ = std::make_unique<TestModel>(MakeModel(/*layers=*/4, /*kv_heads=*/2, kTokens + 1, 2));
    model_->spec.layer_reuse = 4;
    auto s = client_->CreateSession(model_->spec);
    ASSERT_THAT(s, IsOk());
    session_ = s->id;
    ASSERT_THAT(client_->AppendKvInline(session_, model_->kv.Chunk(0, kTokens), kTokens), IsOk());
    auto b = client_->CreateShmBuffer(4 << 20);
    ASSERT_THAT(b, IsOk());
    buffer_ = std::make_unique<ShmBuffer>(*std::move(b));
  }
  void TearDown() override {
    buffer_.reset();
    client_.reset();
    daemon_.reset();
  }

  // A vLLM FlashAttention cache of 2 layers in one allocation of `size` bytes.
  static CudaIpcBuffer PagedCache(uint64_t size) {
    CudaIpcBuffer b;
    b.handle = std::string(64, 'h');
    b.size = size;
    b.device_uuid = std::string(16, 'u');
    PagedKvCache kv;
    kv.format = PagedKvFormat::kVllmFlash;
    kv.num_layers = 2;
    kv.num_blocks = 16;
    kv.block_tokens = 16;
    kv.kv_heads = 2;
    kv.head_dim = 64;
    kv.dtype = DType::kF16;
    b.paged_kv = kv;
    return b;
  }

  SelectOptions Options() const {
    SelectOptions o;
    o.budget_tokens = 48;
    o.want_positions = true;
    return o;
  }

  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<TestModel> model_;
  std::string session_;
  std::unique_ptr<ShmBuffer> buffer_;
};

TEST_F(DeviceApiTest, PagedKvRegistrationWithoutADeviceIsAPreciseFailedPrecondition) {
  // 2 layers x 2 (K, V) x 16 blocks x 16 tokens x 2 heads x 64 dims x 2 bytes.
  const uint64_t size = 2ull * 2 * 16 * 16 * 2 * 64 * 2;
  absl::StatusOr<std::string> id = client_->RegisterCudaIpc(PagedCache(size));
  if (absl::IsNotFound(id.status()) || absl::IsInternal(id.status())) {
    GTEST_SKIP() << "a CUDA device is present (" << id.status()
                 << "); the registration itself is checked by tests/gpu";
  }
  EXPECT_THAT(id, StatusIs(Code::kFailedPrecondition, HasSubstr("no CUDA device")));
}

TEST_F(DeviceApiTest, BadPagedKvLayoutsAreRefusedByTheirFormNamingTheField) {
  // The layer tensors do not fit 4096 bytes: refused before the device.
  EXPECT_THAT(client_->RegisterCudaIpc(PagedCache(4096)),
              StatusIs(Code::kOutOfRange, HasSubstr("paged_kv")));
  CudaIpcBuffer b = PagedCache(1 << 20);
  b.paged_kv->block_tokens = 0;
  EXPECT_THAT(client_->RegisterCudaIpc(b),
              StatusIs(Code::kInvalidArgument, HasSubstr("block_tokens")));
  b = PagedCache(1 << 20);
  b.paged_kv->layer_offsets_bytes = {0};  // 2 layers, 1 offset
  EXPECT_THAT(client_->RegisterCudaIpc(b),
              StatusIs(Code::kInvalidArgument, HasSubstr("layer_offsets_bytes")));
  b = PagedCache(1 << 20);
  b.handle = "short";
  EXPECT_THAT(client_->RegisterCudaIpc(b), StatusIs(Code::kInvalidArgument, HasSubstr("64")));
}

TEST_F(DeviceApiTest, BadBlockIdsAndEventsAreRefusedNamingThem) {
  const auto q = Queries(*model_, 0, 0);
  StepOptions step;
  step.device.block_ids = {3, 7, 3};
  EXPECT_THAT(client_->DecodeStep(session_, 0, q, buffer_->buffer_id(), 0, Options(), step),
              StatusIs(Code::kInvalidArgument, HasSubstr("block 3 is listed twice")));
  step.device.block_ids = {1, 2};
  step.device.wait_event = "short";
  EXPECT_THAT(client_->DecodeStep(session_, 0, q, buffer_->buffer_id(), 0, Options(), step),
              StatusIs(Code::kInvalidArgument, HasSubstr("wait_event")));
  DeviceWrite device;
  device.done_event = std::string(63, 'e');
  EXPECT_THAT(
      client_->FetchPages(session_, 0, {{0}, {0}}, buffer_->buffer_id(), 0, false, 1, device),
      StatusIs(Code::kInvalidArgument, HasSubstr("done_event")));
}

TEST_F(DeviceApiTest, DeviceFieldsOnAHostShmBufferAreRefusedAndWriteNothing) {
  std::memset(buffer_->data(), 0x5a, buffer_->size());
  StepOptions step;
  step.device.block_ids = {0, 1, 2, 3, 4, 5, 6, 7};
  EXPECT_THAT(client_->DecodeStep(session_, 0, Queries(*model_, 0, 0), buffer_->buffer_id(), 0,
                                  Options(), step),
              StatusIs(Code::kInvalidArgument, HasSubstr("CUDA_IPC")));
  DeviceWrite device;
  device.wait_event = std::string(64, 'w');
  EXPECT_THAT(
      client_->FetchPages(session_, 0, {{0}, {0}}, buffer_->buffer_id(), 0, false, 1, device),
      StatusIs(Code::kInvalidArgument, HasSubstr("CUDA_IPC")));
  for (size_t i = 0; i < buffer_->size(); ++i) {
    ASSERT_EQ(buffer_->data()[i], 0x5a) << "byte " << i << " was written";
  }
}

TEST_F(DeviceApiTest, PrefetchedLayersAreWrittenWhereTheGroupFetchPutsThem) {
  const SelectOptions opt = Options();
  for (int step = 0; step < 2; ++step) {
    if (step > 0) {
      ASSERT_THAT(client_->AppendKvInline(session_, model_->kv.Chunk(kTokens, kTokens + 1), 1),
                  IsOk());
    }
    const int64_t tokens = kTokens + step;
    StepOptions first_step;
    first_step.prefetch_group = true;
    auto first = client_->DecodeStep(session_, 0, Queries(*model_, step, 0), buffer_->buffer_id(),
                                     0, opt, first_step);
    ASSERT_THAT(first, IsOk());
    EXPECT_EQ(first->prefetching, 3u);
    ASSERT_THAT(VerifyFetch(model_->kv, tokens, first->layout, first->heads, buffer_->data(),
                            buffer_->size()),
                IsOk());
    SelectOptions reuse = opt;
    reuse.reuse_group_selection = true;
    const uint64_t stride = first->layout.layer_stride_bytes;
    int prefetched = 0;
    for (uint32_t layer = 1; layer < 4; ++layer) {
      auto later =
          client_->DecodeStep(session_, layer, {}, buffer_->buffer_id(), layer * stride, reuse);
      ASSERT_THAT(later, IsOk());
      EXPECT_TRUE(later->reused);
      EXPECT_EQ(later->layout.first_layer, layer);
      EXPECT_EQ(later->layout.offset, layer * stride);
      prefetched += later->prefetched;
      // Every byte of the layer, whoever wrote it.
      ASSERT_THAT(VerifyFetch(model_->kv, tokens, later->layout, first->heads, buffer_->data(),
                              buffer_->size()),
                  IsOk())
          << "step " << step << " layer " << layer;
    }
    // Whether the calls found their layers written depends on timing; the
    // bytes must be right either way. Usually they were.
    RecordProperty(absl::StrCat("prefetched_step_", step), prefetched);
  }
}

// The push counters the GPU check reads from /metrics (tests/gpu/
// gpu_push_test.cc, MetricValue) are exported and agree with GetStats; here
// nothing was pushed to a GPU, so both paths count zero.
TEST(DeviceApiMetricsTest, GpuPushCountersAreExportedAndAgreeWithStats) {
  DaemonOptions options = TestDaemonOptions("", {}, "info");
  const int port = FreePort();
  ASSERT_GT(port, 0);
  options.metrics_port = static_cast<uint16_t>(port);
  auto daemon = DaemonProcess::Start(options);
  ASSERT_THAT(daemon, IsOk());
  EXPECT_EQ(MetricValue(**daemon, "icecache_gpu_pushes_total{path=\"in_place\"}"), 0.0);
  EXPECT_EQ(MetricValue(**daemon, "icecache_gpu_pushes_total{path=\"staged\"}"), 0.0);
  EXPECT_EQ(MetricValue(**daemon, "icecache_gpu_pushes_total{path=\"elsewhere\"}"), -1.0);
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  auto stats = (*client)->GetStats();
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->gpu_pushes_in_place, 0u);
  EXPECT_EQ(stats->gpu_pushes_staged, 0u);
  EXPECT_LE(stats->pool_pinned_bytes, stats->capacity_bytes);
}

}  // namespace
}  // namespace icecache::testing
