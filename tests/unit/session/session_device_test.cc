// A decode step into an engine's paged KV cache through the real session
// manager (real pool, selection and gather), with the recording fake of the
// CUDA runtime standing in for the device (docs/architecture.md §6.3): one
// copy and one kernel per request, and every byte of the cache checked
// against the appended KV at the positions the step reports.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "tests/support/recording_cuda_runtime.h"
#include "tests/unit/session/session_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::RecordingCudaRuntime;
using ::icecache::testing::StatusIs;

Caller Alice() { return Caller{"alice", static_cast<uint32_t>(getuid()), false}; }

TEST(SessionDeviceTest, DecodeStepScattersSelectedPagesIntoTheBlockTable) {
  FakeClock clock;
  RecordingCudaRuntime cuda;
  PagePoolOptions po;
  po.capacity_bytes = uint64_t{64} << 20;
  po.use_huge_pages = false;
  auto pool = PagePool::Create(po);
  ASSERT_THAT(pool, IsOk());
  BufferRegistryOptions bo;
  bo.cuda = &cuda;
  auto buffers = BufferRegistry::Create(bo);
  ASSERT_THAT(buffers, IsOk());
  SessionManagerOptions mo;
  mo.pool = pool->get();
  mo.buffers = buffers->get();
  mo.clock = &clock;
  auto manager = SessionManager::Create(mo);
  ASSERT_THAT(manager, IsOk());

  const SessionConfig c = testing::SmallConfig();  // 4 layers, 2 kv heads, dim 16, pages of 4
  auto info = (*manager)->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  const int64_t n = 64;
  const std::vector<uint8_t> kv = testing::MakeKv(c, 0, n);
  ASSERT_THAT((*manager)->AppendKv(Alice(), info->id, n, kv), IsOk());

  // The engine's cache: vLLM layout, all 4 layers, 32 blocks of 4 tokens.
  PagedKvLayout l;
  l.format = PagedKvFormat::kVllmFlash;
  l.num_layers = 4;
  l.num_blocks = 32;
  l.block_tokens = 4;
  l.kv_heads = 2;
  l.head_dim = 16;
  l.dtype = DType::kF16;
  const uint64_t layer_elems = 2ull * 32 * 4 * 2 * 16, size = 4 * layer_elems * 2;
  uint8_t* cache = nullptr;
  const CudaIpcHandle handle = cuda.AddPeerAllocation(0, size, &cache);
  std::memset(cache, 0xAB, size);
  auto reg = (*buffers)->RegisterCudaIpc(
      Alice(), std::string(reinterpret_cast<const char*>(handle.bytes.data()), 64), size,
      RecordingCudaRuntime::UuidOf(0).ToString(), absl::Now(), &l);
  ASSERT_THAT(reg, IsOk());

  SelectRequest sel;
  sel.layer = 2;
  sel.queries = testing::MakeQueries(c, 5);
  sel.params.budget_tokens = 16;
  sel.params.sink_tokens = 4;
  sel.params.want_positions = true;
  DeviceWrite dw;
  dw.block_ids = {30, 2, 7, 19, 11, 0, 25, 4};
  cuda.ClearCalls();
  auto step = (*manager)->DecodeStep(Alice(), info->id, sel, reg->id, 0, 2, dw);
  ASSERT_THAT(step, IsOk());
  const auto ops = cuda.ops();
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "copy_h2d"), 1);
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "scatter"), 1);
  EXPECT_EQ(cuda.violations(), 0);

  // Expected cache: the sentinel everywhere but layers 2-3 of the named blocks.
  const uint64_t row = 16 * 2;
  std::vector<uint8_t> want(cache, cache + size);
  for (int layer = 2; layer < 4; ++layer) {
    for (int h = 0; h < 2; ++h) {
      const FetchHeadLayout& head = step->layout.heads[h];
      ASSERT_LE(head.slots.size(), dw.block_ids.size());
      size_t pos = 0;
      for (size_t i = 0; i < dw.block_ids.size(); ++i) {
        const uint32_t fill = i < head.slots.size() ? head.slots[i].fill : 0;
        for (int k = 0; k < 2; ++k) {
          for (uint32_t t = 0; t < 4; ++t) {
            // [2, blocks, block_tokens, kv_heads, head_dim]
            uint8_t* out = want.data() + layer * layer_elems * 2 +
                           ((((k * 32 + dw.block_ids[i]) * 4 + t) * 2 + h) * 16) * 2;
            if (t < fill) {
              const int64_t p = head.positions[pos + t];
              // AppendKv layout: [kv][layers][kv_heads][n][head_dim].
              const uint8_t* in = kv.data() + (((k * 4 + layer) * 2 + h) * n + p) * row;
              std::memcpy(out, in, row);
            } else {
              std::memset(out, 0, row);
            }
          }
        }
        pos += fill;
      }
      EXPECT_EQ(pos, head.positions.size());
    }
  }
  EXPECT_EQ(std::memcmp(cache, want.data(), size), 0);

  // A block table the cache cannot hold writes nothing.
  std::vector<uint8_t> before(cache, cache + size);
  dw.block_ids[3] = 32;
  EXPECT_THAT((*manager)->DecodeStep(Alice(), info->id, sel, reg->id, 0, 2, dw),
              StatusIs(absl::StatusCode::kOutOfRange, ::testing::HasSubstr("block_ids[3] = 32")));
  EXPECT_EQ(std::memcmp(cache, before.data(), size), 0);
}

// Layer-group prefetch to the device (docs/architecture.md §5.2, §6.3): the
// first layer's step asks for the group's later layer, which is pushed in
// the background (its own copy and kernel, after the client's wait event)
// into the same blocks of its layer tensor; the call for it then only
// records its done event. Every byte of the cache is checked.
TEST(SessionDeviceTest, PrefetchPushesTheGroupsLaterLayerThroughThePushPath) {
  FakeClock clock;
  RecordingCudaRuntime cuda;
  PagePoolOptions po;
  po.capacity_bytes = uint64_t{64} << 20;
  po.use_huge_pages = false;
  auto pool = PagePool::Create(po);
  ASSERT_THAT(pool, IsOk());
  BufferRegistryOptions bo;
  bo.cuda = &cuda;
  auto buffers = BufferRegistry::Create(bo);
  ASSERT_THAT(buffers, IsOk());
  SessionManagerOptions mo;
  mo.pool = pool->get();
  mo.buffers = buffers->get();
  mo.clock = &clock;
  auto manager = SessionManager::Create(mo);
  ASSERT_THAT(manager, IsOk());
  const SessionConfig c = testing::SmallConfig();  // layer groups {0, 1} and {2, 3}
  auto info = (*manager)->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  const int64_t n = 64;
  const std::vector<uint8_t> kv = testing::MakeKv(c, 0, n);
  ASSERT_THAT((*manager)->AppendKv(Alice(), info->id, n, kv), IsOk());
  PagedKvLayout l;
  l.format = PagedKvFormat::kFlashInferNhd;
  l.num_layers = 4;
  l.num_blocks = 32;
  l.block_tokens = 4;
  l.kv_heads = 2;
  l.head_dim = 16;
  l.dtype = DType::kF16;
  const uint64_t layer_elems = 2ull * 32 * 4 * 2 * 16, size = 4 * layer_elems * 2;
  uint8_t* cache = nullptr;
  const CudaIpcHandle handle = cuda.AddPeerAllocation(0, size, &cache);
  std::memset(cache, 0xAB, size);
  auto reg = (*buffers)->RegisterCudaIpc(
      Alice(), std::string(reinterpret_cast<const char*>(handle.bytes.data()), 64), size,
      RecordingCudaRuntime::UuidOf(0).ToString(), absl::Now(), &l);
  ASSERT_THAT(reg, IsOk());
  auto bytes = [](const CudaIpcHandle& h) {
    return std::string(reinterpret_cast<const char*>(h.bytes.data()), h.bytes.size());
  };
  const std::string before_event = bytes(cuda.AddPeerEvent());
  const std::string done_event = bytes(cuda.AddPeerEvent());

  SelectRequest sel;
  sel.layer = 2;
  sel.queries = testing::MakeQueries(c, 5);
  sel.params.budget_tokens = 16;
  sel.params.want_positions = true;
  DeviceWrite dw;
  dw.block_ids = {30, 2, 7, 19, 11, 0, 25, 4};
  dw.wait_event = before_event;
  cuda.ClearCalls();
  auto first = (*manager)->DecodeStep(Alice(), info->id, sel, reg->id, 0, 1, dw, true);
  ASSERT_THAT(first, IsOk());
  EXPECT_EQ(first->prefetching, 1);
  (*manager)->WaitForPrefetch();
  // Two pushes (layer 2 on the call, layer 3 in the background), each after
  // the client's event: one copy and one kernel each.
  const auto ops = cuda.ops();
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "wait_event"), 2);
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "copy_h2d"), 2);
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "scatter"), 2);
  EXPECT_EQ(std::count(ops.begin(), ops.end(), "record_event"), 0);

  SelectRequest later;
  later.layer = 3;
  later.reuse_group_selection = true;
  later.params.want_positions = true;
  DeviceWrite later_dw;
  later_dw.block_ids = dw.block_ids;
  later_dw.done_event = done_event;
  cuda.ClearCalls();
  auto second = (*manager)->DecodeStep(Alice(), info->id, later, reg->id, 0, 1, later_dw);
  ASSERT_THAT(second, IsOk());
  EXPECT_TRUE(second->prefetched);
  // The bytes are in place: the call only records the client's done event.
  const auto later_ops = cuda.ops();
  EXPECT_EQ(std::count(later_ops.begin(), later_ops.end(), "copy_h2d"), 0);
  EXPECT_EQ(std::count(later_ops.begin(), later_ops.end(), "scatter"), 0);
  EXPECT_EQ(std::count(later_ops.begin(), later_ops.end(), "record_event"), 1);
  EXPECT_EQ(cuda.violations(), 0);

  // FlashInfer NHD: [blocks, 2, block_tokens, kv_heads, head_dim].
  const uint64_t row = 16 * 2;
  std::vector<uint8_t> want(size, 0xAB);
  for (int layer = 2; layer < 4; ++layer) {
    const FetchLayout& layout = layer == 2 ? first->layout : second->layout;
    for (int h = 0; h < 2; ++h) {
      const FetchHeadLayout& head = layout.heads[h];
      size_t pos = 0;
      for (size_t i = 0; i < dw.block_ids.size(); ++i) {
        const uint32_t fill = i < head.slots.size() ? head.slots[i].fill : 0;
        for (int k = 0; k < 2; ++k) {
          for (uint32_t t = 0; t < 4; ++t) {
            uint8_t* out = want.data() + layer * layer_elems * 2 +
                           ((((dw.block_ids[i] * 2 + k) * 4 + t) * 2 + h) * 16) * 2;
            if (t < fill) {
              const int64_t p = head.positions[pos + t];
              const uint8_t* in = kv.data() + (((k * 4 + layer) * 2 + h) * n + p) * row;
              std::memcpy(out, in, row);
            } else {
              std::memset(out, 0, row);
            }
          }
        }
        pos += fill;
      }
      EXPECT_EQ(pos, head.positions.size());
    }
  }
  EXPECT_EQ(std::memcmp(cache, want.data(), size), 0);
  const PrefetchStats st = (*manager)->prefetch_stats();
  EXPECT_EQ(st.written, 1u);
  EXPECT_EQ(st.used, 1u);
}

}  // namespace
}  // namespace icecache
