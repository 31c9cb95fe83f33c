// The client half of the GPU check (tests/gpu/README in tests/gpu/run.sh):
// a second process on the same GPU as icecached, an engine's side written
// against the public client API (client/client.h: RegisterCudaIpc with a
// PagedKvCache, DeviceWrite, StepOptions). It allocates an engine-like
// paged KV cache (vLLM FlashAttention layout, all layers in one allocation)
// and a plain device buffer, registers both by CUDA IPC, appends KV whose
// every element it can recompute, then:
//   1. DecodeStep with block_ids and a wait/done event pair: the daemon's
//      stream waits on our event, scatters, records the done event; our
//      stream waits on it; every byte of the cache is checked (scattered
//      rows, zero padding, untouched blocks and layers);
//   2. FetchPages of the same pages into the plain buffer (synchronous push):
//      every byte of the fetch layout is checked;
//   3. layer-group prefetch to the device: DecodeStep of the second group's
//      first layer with prefetch_group into other blocks, then its second
//      layer (reuse_group_selection, same blocks, a done event): the daemon
//      pushed that layer in the background; the whole cache is checked again.
// Prints one line "gpu_kv_client: OK ..." and exits 0, or names the first
// wrong byte and exits 1. Built only with CUDA (links cudart directly: this
// is the engine's side, not the daemon's).
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "client/client.h"
#include "common/dtype.h"

namespace {

using icecache::Client;
using icecache::FetchLayout;
using icecache::StepOptions;
using icecache::StepResult;

constexpr int kLayers = 4, kKvHeads = 2, kQHeads = 4, kHeadDim = 64, kPage = 16;
constexpr int kBlocks = 64, kTokens = 300;
constexpr uint16_t kSentinel = 0xFFFF;

#define CUDA_OR_DIE(call)                                                            \
  do {                                                                               \
    cudaError_t e = (call);                                                          \
    if (e != cudaSuccess) {                                                          \
      std::fprintf(stderr, "gpu_kv_client: %s: %s\n", #call, cudaGetErrorString(e)); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

template <typename T>
T OrDie(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) {
    std::fprintf(stderr, "gpu_kv_client: %s: %s\n", what, v.status().ToString().c_str());
    std::exit(1);
  }
  return *std::move(v);
}

// The fp16 bits of element d of token t, KV head h, layer l (kv 0 = K).
uint16_t Element(int kv, int l, int h, int t, int d) {
  const float v = static_cast<float>((t * 31 + h * 17 + d * 7 + l * 13 + kv * 5) % 97) / 97.0f;
  return icecache::FloatToHalf(v - 0.5f);
}

std::vector<uint8_t> AppendBytes() {
  std::vector<uint16_t> kv;
  for (int kvi = 0; kvi < 2; ++kvi)
    for (int l = 0; l < kLayers; ++l)
      for (int h = 0; h < kKvHeads; ++h)
        for (int t = 0; t < kTokens; ++t)
          for (int d = 0; d < kHeadDim; ++d) kv.push_back(Element(kvi, l, h, t, d));
  const auto* p = reinterpret_cast<const uint8_t*>(kv.data());
  return std::vector<uint8_t>(p, p + kv.size() * 2);
}

// Element index of (kv, block, token, head, 0) in one layer of the cache.
size_t VllmIndex(int kv, int b, int t, int h) {
  return ((((static_cast<size_t>(kv) * kBlocks + b) * kPage + t) * kKvHeads + h) * kHeadDim);
}
constexpr size_t kLayerElems = 2ull * kBlocks * kPage * kKvHeads * kHeadDim;

std::string Bytes(const void* p, size_t n) { return std::string(static_cast<const char*>(p), n); }

// What the scatter of `layout` into `blocks` writes, applied to `want`.
void ExpectScatter(const FetchLayout& layout, const std::vector<uint32_t>& blocks,
                   std::vector<uint16_t>* want) {
  for (uint32_t j = 0; j < layout.num_layers; ++j) {
    const int l = static_cast<int>(layout.first_layer + j);
    for (int h = 0; h < kKvHeads; ++h) {
      const icecache::HeadLayout& head = layout.heads[h];
      int pos_at = 0;
      for (size_t i = 0; i < blocks.size(); ++i) {
        const int fill = i < head.fills.size() ? static_cast<int>(head.fills[i]) : 0;
        for (int kv = 0; kv < 2; ++kv) {
          for (int t = 0; t < kPage; ++t) {
            uint16_t* row = want->data() + l * kLayerElems + VllmIndex(kv, blocks[i], t, h);
            for (int d = 0; d < kHeadDim; ++d) {
              row[d] = t < fill ? Element(kv, l, h, head.positions[pos_at + t], d) : 0;
            }
          }
        }
        pos_at += fill;
      }
    }
  }
}

// Compares the whole cache with what every scatter so far should have left.
bool CheckCache(const std::vector<uint16_t>& cache, const std::vector<uint16_t>& want,
                const char* what) {
  for (size_t e = 0; e < cache.size(); ++e) {
    if (cache[e] != want[e]) {
      std::fprintf(stderr,
                   "gpu_kv_client: %s: element %zu (layer %zu, offset %zu in the layer) is "
                   "0x%04x, want 0x%04x\n",
                   what, e, e / kLayerElems, e % kLayerElems, cache[e], want[e]);
      return false;
    }
  }
  return true;
}

// Checks the plain fetch layout (gather.h) in `buf`.
bool CheckPlain(const std::vector<uint16_t>& buf, const FetchLayout& layout) {
  for (uint32_t j = 0; j < layout.num_layers; ++j) {
    const int l = static_cast<int>(layout.first_layer + j);
    for (int h = 0; h < kKvHeads; ++h) {
      const icecache::HeadLayout& head = layout.heads[h];
      int pos_at = 0;
      for (size_t i = 0; i < head.pages.size(); ++i) {
        const size_t base =
            (layout.offset + j * layout.layer_stride_bytes + head.slots[i] * layout.page_bytes) / 2;
        for (int kv = 0; kv < 2; ++kv) {
          for (int t = 0; t < kPage; ++t) {
            for (int d = 0; d < kHeadDim; ++d) {
              const uint16_t want = t < static_cast<int>(head.fills[i])
                                        ? Element(kv, l, h, head.positions[pos_at + t], d)
                                        : 0;
              const uint16_t got = buf[base + (kv * kPage + t) * kHeadDim + d];
              if (got != want) {
                std::fprintf(stderr,
                             "gpu_kv_client: plain fetch: layer %d head %d page %zu row %d dim %d "
                             "is 0x%04x, want 0x%04x\n",
                             l, h, i, t, d, got, want);
                return false;
              }
            }
          }
        }
        pos_at += head.fills[i];
      }
    }
  }
  return true;
}

// An interprocess event and its IPC handle bytes.
struct IpcEvent {
  cudaEvent_t event;
  std::string handle;
};
IpcEvent MakeEvent() {
  IpcEvent made;
  CUDA_OR_DIE(
      cudaEventCreateWithFlags(&made.event, cudaEventDisableTiming | cudaEventInterprocess));
  cudaIpcEventHandle_t h;
  CUDA_OR_DIE(cudaIpcGetEventHandle(&h, made.event));
  made.handle = Bytes(&h, sizeof(h));
  return made;
}

std::vector<uint16_t> ReadCache(void* cache, cudaStream_t stream, const IpcEvent& done) {
  CUDA_OR_DIE(cudaStreamWaitEvent(stream, done.event, 0));
  std::vector<uint16_t> host(kLayers * kLayerElems);
  CUDA_OR_DIE(cudaMemcpyAsync(host.data(), cache, host.size() * 2, cudaMemcpyDeviceToHost, stream));
  CUDA_OR_DIE(cudaStreamSynchronize(stream));
  return host;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: gpu_kv_client unix:<socket>\n");
    return 2;
  }
  std::unique_ptr<Client> client = OrDie(Client::Create(argv[1]), "connect");

  CUDA_OR_DIE(cudaSetDevice(0));
  cudaDeviceProp prop;
  CUDA_OR_DIE(cudaGetDeviceProperties(&prop, 0));
  const size_t cache_bytes = kLayers * kLayerElems * 2;
  void* cache = nullptr;
  CUDA_OR_DIE(cudaMalloc(&cache, cache_bytes));
  CUDA_OR_DIE(cudaMemset(cache, 0xFF, cache_bytes));
  const size_t plain_bytes = size_t{4} << 20;
  void* plain = nullptr;
  CUDA_OR_DIE(cudaMalloc(&plain, plain_bytes));
  CUDA_OR_DIE(cudaMemset(plain, 0xFF, plain_bytes));
  cudaIpcMemHandle_t cache_handle, plain_handle;
  CUDA_OR_DIE(cudaIpcGetMemHandle(&cache_handle, cache));
  CUDA_OR_DIE(cudaIpcGetMemHandle(&plain_handle, plain));

  icecache::CudaIpcBuffer reg;
  reg.handle = Bytes(&cache_handle, sizeof(cache_handle));
  reg.size = cache_bytes;
  reg.device_uuid = Bytes(prop.uuid.bytes, 16);
  icecache::PagedKvCache pk;
  pk.format = icecache::PagedKvFormat::kVllmFlash;
  pk.num_layers = kLayers;
  pk.num_blocks = kBlocks;
  pk.block_tokens = kPage;
  pk.kv_heads = kKvHeads;
  pk.head_dim = kHeadDim;
  pk.dtype = icecache::DType::kF16;
  reg.paged_kv = pk;
  const std::string cache_buf = OrDie(client->RegisterCudaIpc(reg), "RegisterCudaIpc (cache)");
  reg.paged_kv.reset();
  reg.handle = Bytes(&plain_handle, sizeof(plain_handle));
  reg.size = plain_bytes;
  const std::string plain_buf = OrDie(client->RegisterCudaIpc(reg), "RegisterCudaIpc (plain)");

  icecache::SessionSpec spec;
  spec.layers = kLayers;
  spec.kv_heads = kKvHeads;
  spec.q_heads = kQHeads;
  spec.head_dim = kHeadDim;
  spec.dtype = icecache::DType::kF16;
  spec.page_tokens = kPage;
  spec.selector = icecache::SelectorType::kExact;
  spec.layer_reuse = 2;
  const std::string sid = OrDie(client->CreateSession(spec), "CreateSession").id;
  const std::vector<uint8_t> kv = AppendBytes();
  OrDie(client->AppendKvInline(sid, kv, kTokens), "AppendKv");

  // 1. DecodeStep of layers 0-1: scatter into the cache, ordered by events.
  cudaStream_t stream;
  CUDA_OR_DIE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const IpcEvent before = MakeEvent(), done = MakeEvent();
  CUDA_OR_DIE(cudaEventRecord(before.event, stream));
  const std::vector<uint32_t> blocks = {40, 3, 17, 9, 60, 22, 31, 5};
  std::vector<float> q(kQHeads * kHeadDim);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>((i * 37) % 11) / 11.0f - 0.4f;
  icecache::SelectOptions opt;
  opt.budget_tokens = 64;
  opt.want_positions = true;
  StepOptions step;
  step.num_layers = 2;
  step.device.block_ids = blocks;
  step.device.wait_event = before.handle;
  step.device.done_event = done.handle;
  const StepResult first =
      OrDie(client->DecodeStep(sid, 0, q, cache_buf, 0, opt, step), "DecodeStep (scatter)");
  std::vector<uint16_t> want(kLayers * kLayerElems, kSentinel);
  ExpectScatter(first.layout, blocks, &want);
  if (!CheckCache(ReadCache(cache, stream, done), want, "scatter")) return 1;

  // 2. FetchPages of the same pages into the plain buffer (synchronous).
  std::vector<std::vector<uint32_t>> pages;
  for (const icecache::HeadLayout& h : first.layout.heads) pages.push_back(h.pages);
  const FetchLayout fetched = OrDie(
      client->FetchPages(sid, 2, pages, plain_buf, 4096, /*want_positions=*/true, 2), "FetchPages");
  std::vector<uint16_t> plain_host(plain_bytes / 2);
  CUDA_OR_DIE(cudaMemcpy(plain_host.data(), plain, plain_bytes, cudaMemcpyDeviceToHost));
  if (!CheckPlain(plain_host, fetched)) return 1;

  // 3. Prefetch to the device: layer 2 (first of its group) with
  // prefetch_group; layer 3 is pushed in the background into the same blocks
  // of its tensor; its own call only records the done event.
  const std::vector<uint32_t> blocks2 = {1, 2, 7, 11, 13, 50, 51, 63};
  CUDA_OR_DIE(cudaEventRecord(before.event, stream));
  StepOptions pf;
  pf.device.block_ids = blocks2;
  pf.device.wait_event = before.handle;
  pf.prefetch_group = true;
  const StepResult two =
      OrDie(client->DecodeStep(sid, 2, q, cache_buf, 0, opt, pf), "DecodeStep (prefetch)");
  if (two.prefetching != 1) {
    std::fprintf(stderr, "gpu_kv_client: prefetch: %u layers prefetching, want 1\n",
                 two.prefetching);
    return 1;
  }
  icecache::SelectOptions reuse = opt;
  reuse.reuse_group_selection = true;
  StepOptions later;
  later.device.block_ids = blocks2;
  later.device.done_event = done.handle;
  const StepResult three =
      OrDie(client->DecodeStep(sid, 3, {}, cache_buf, 0, reuse, later), "DecodeStep (layer 3)");
  ExpectScatter(two.layout, blocks2, &want);
  ExpectScatter(three.layout, blocks2, &want);
  if (!CheckCache(ReadCache(cache, stream, done), want, "prefetch")) return 1;

  std::printf(
      "gpu_kv_client: OK: scatter of %zu pages/head x 2 layers into %zu blocks (events), "
      "plain fetch of %llu bytes, prefetched layer 3 (%s); every byte checked\n",
      first.layout.heads[0].pages.size(), blocks.size(),
      static_cast<unsigned long long>(fetched.total_bytes),
      three.prefetched ? "written in the background" : "its call came first and wrote it");
  return 0;
}
