// The client half of the GPU check (tests/gpu/README in tests/gpu/run.sh):
// a second process on the same GPU as icecached. It allocates an engine-like
// paged KV cache (vLLM FlashAttention layout, all layers in one allocation)
// and a plain device buffer, registers both by CUDA IPC, appends KV whose
// every element it can recompute, then:
//   1. DecodeStep with block_ids and a wait/done event pair: the daemon's
//      stream waits on our event, scatters, records the done event; our
//      stream waits on it; every byte of the cache is checked (scattered
//      rows, zero padding, untouched blocks and layers);
//   2. FetchPages of the same pages into the plain buffer (synchronous push):
//      every byte of the fetch layout is checked.
// Prints one line "gpu_kv_client: OK ..." and exits 0, or names the first
// wrong byte and exits 1. Built only with CUDA (links cudart directly: this
// is the engine's side, not the daemon's).
#include <cuda_runtime_api.h>
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "icecache/v1/buffer.grpc.pb.h"
#include "icecache/v1/kv.grpc.pb.h"
#include "icecache/v1/session.grpc.pb.h"

namespace {

namespace v1 = icecache::v1;

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

void RpcOrDie(const grpc::Status& s, const char* what) {
  if (s.ok()) return;
  std::fprintf(stderr, "gpu_kv_client: %s: %s\n", what, s.error_message().c_str());
  std::exit(1);
}

// The fp16 bits of element d of token t, KV head h, layer l (kv 0 = K).
uint16_t Element(int kv, int l, int h, int t, int d) {
  const float v = static_cast<float>((t * 31 + h * 17 + d * 7 + l * 13 + kv * 5) % 97) / 97.0f;
  return icecache::FloatToHalf(v - 0.5f);
}

std::string AppendBytes() {
  std::vector<uint16_t> kv;
  for (int kvi = 0; kvi < 2; ++kvi)
    for (int l = 0; l < kLayers; ++l)
      for (int h = 0; h < kKvHeads; ++h)
        for (int t = 0; t < kTokens; ++t)
          for (int d = 0; d < kHeadDim; ++d) kv.push_back(Element(kvi, l, h, t, d));
  return std::string(reinterpret_cast<const char*>(kv.data()), kv.size() * 2);
}

// Element index of (kv, block, token, head, 0) in one layer of the cache.
size_t VllmIndex(int kv, int b, int t, int h) {
  return ((((static_cast<size_t>(kv) * kBlocks + b) * kPage + t) * kKvHeads + h) * kHeadDim);
}

std::string Bytes(const void* p, size_t n) { return std::string(static_cast<const char*>(p), n); }

// Checks the whole cache after the scatter of `layout` into `blocks`.
bool CheckCache(const std::vector<uint16_t>& cache, const v1::FetchLayout& layout,
                const std::vector<uint32_t>& blocks) {
  const size_t layer_elems = 2ull * kBlocks * kPage * kKvHeads * kHeadDim;
  std::vector<uint16_t> want(cache.size(), kSentinel);
  for (uint32_t j = 0; j < layout.num_layers(); ++j) {
    const int l = static_cast<int>(layout.first_layer() + j);
    for (int h = 0; h < kKvHeads; ++h) {
      const v1::HeadLayout& head = layout.heads(h);
      int pos_at = 0;
      for (size_t i = 0; i < blocks.size(); ++i) {
        const int fill = i < static_cast<size_t>(head.fills_size()) ? head.fills(i) : 0;
        for (int kv = 0; kv < 2; ++kv) {
          for (int t = 0; t < kPage; ++t) {
            uint16_t* row = want.data() + l * layer_elems + VllmIndex(kv, blocks[i], t, h);
            for (int d = 0; d < kHeadDim; ++d) {
              row[d] = t < fill ? Element(kv, l, h, head.positions(pos_at + t), d) : 0;
            }
          }
        }
        pos_at += fill;
      }
    }
  }
  for (size_t e = 0; e < cache.size(); ++e) {
    if (cache[e] != want[e]) {
      const size_t l = e / layer_elems, r = e % layer_elems;
      std::fprintf(stderr,
                   "gpu_kv_client: scatter: element %zu (layer %zu, offset %zu in the layer) is "
                   "0x%04x, want 0x%04x\n",
                   e, l, r, cache[e], want[e]);
      return false;
    }
  }
  return true;
}

// Checks the plain fetch layout (gather.h) in `buf`.
bool CheckPlain(const std::vector<uint16_t>& buf, const v1::FetchLayout& layout) {
  for (uint32_t j = 0; j < layout.num_layers(); ++j) {
    const int l = static_cast<int>(layout.first_layer() + j);
    for (int h = 0; h < kKvHeads; ++h) {
      const v1::HeadLayout& head = layout.heads(h);
      int pos_at = 0;
      for (int i = 0; i < head.pages_size(); ++i) {
        const size_t base = (layout.offset() + j * layout.layer_stride_bytes() +
                             head.slots(i) * layout.page_bytes()) /
                            2;
        for (int kv = 0; kv < 2; ++kv) {
          for (int t = 0; t < kPage; ++t) {
            for (int d = 0; d < kHeadDim; ++d) {
              const uint16_t want = t < static_cast<int>(head.fills(i))
                                        ? Element(kv, l, h, head.positions(pos_at + t), d)
                                        : 0;
              const uint16_t got = buf[base + (kv * kPage + t) * kHeadDim + d];
              if (got != want) {
                std::fprintf(stderr,
                             "gpu_kv_client: plain fetch: layer %d head %d page %d row %d dim %d "
                             "is 0x%04x, want 0x%04x\n",
                             l, h, i, t, d, got, want);
                return false;
              }
            }
          }
        }
        pos_at += head.fills(i);
      }
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: gpu_kv_client unix:<socket>\n");
    return 2;
  }
  auto channel = grpc::CreateChannel(argv[1], grpc::InsecureChannelCredentials());
  auto buffers = v1::BufferService::NewStub(channel);
  auto sessions = v1::SessionService::NewStub(channel);
  auto kv = v1::KvService::NewStub(channel);

  CUDA_OR_DIE(cudaSetDevice(0));
  cudaDeviceProp prop;
  CUDA_OR_DIE(cudaGetDeviceProperties(&prop, 0));
  const size_t cache_elems =
      static_cast<size_t>(kLayers) * 2 * kBlocks * kPage * kKvHeads * kHeadDim;
  void* cache = nullptr;
  CUDA_OR_DIE(cudaMalloc(&cache, cache_elems * 2));
  CUDA_OR_DIE(cudaMemset(cache, 0xFF, cache_elems * 2));
  const size_t plain_bytes = size_t{4} << 20;
  void* plain = nullptr;
  CUDA_OR_DIE(cudaMalloc(&plain, plain_bytes));
  CUDA_OR_DIE(cudaMemset(plain, 0xFF, plain_bytes));
  cudaIpcMemHandle_t cache_handle, plain_handle;
  CUDA_OR_DIE(cudaIpcGetMemHandle(&cache_handle, cache));
  CUDA_OR_DIE(cudaIpcGetMemHandle(&plain_handle, plain));

  v1::RegisterBufferRequest reg;
  reg.mutable_cuda_ipc()->set_handle(Bytes(&cache_handle, sizeof(cache_handle)));
  reg.mutable_cuda_ipc()->set_size(cache_elems * 2);
  reg.mutable_cuda_ipc()->set_device_uuid(Bytes(prop.uuid.bytes, 16));
  v1::PagedKvCache* pk = reg.mutable_cuda_ipc()->mutable_paged_kv();
  pk->set_format(v1::PAGED_KV_FORMAT_VLLM_FLASH);
  pk->set_num_layers(kLayers);
  pk->set_num_blocks(kBlocks);
  pk->set_block_tokens(kPage);
  pk->set_kv_heads(kKvHeads);
  pk->set_head_dim(kHeadDim);
  pk->set_dtype(v1::DTYPE_FLOAT16);
  v1::RegisterBufferResponse cache_buf, plain_buf;
  {
    grpc::ClientContext ctx;
    RpcOrDie(buffers->RegisterBuffer(&ctx, reg, &cache_buf), "RegisterBuffer (paged KV cache)");
  }
  reg.mutable_cuda_ipc()->clear_paged_kv();
  reg.mutable_cuda_ipc()->set_handle(Bytes(&plain_handle, sizeof(plain_handle)));
  reg.mutable_cuda_ipc()->set_size(plain_bytes);
  {
    grpc::ClientContext ctx;
    RpcOrDie(buffers->RegisterBuffer(&ctx, reg, &plain_buf), "RegisterBuffer (plain)");
  }

  v1::CreateSessionRequest cs;
  v1::ModelShape* m = cs.mutable_config()->mutable_model();
  m->set_layers(kLayers);
  m->set_kv_heads(kKvHeads);
  m->set_q_heads(kQHeads);
  m->set_head_dim(kHeadDim);
  m->set_dtype(v1::DTYPE_FLOAT16);
  cs.mutable_config()->set_page_tokens(kPage);
  cs.mutable_config()->mutable_selector()->set_kind(v1::SELECTOR_KIND_EXACT);
  cs.mutable_config()->set_layer_reuse(2);
  v1::CreateSessionResponse session;
  {
    grpc::ClientContext ctx;
    RpcOrDie(sessions->CreateSession(&ctx, cs, &session), "CreateSession");
  }
  const std::string sid = session.session().session_id();
  v1::AppendKvRequest ap;
  ap.set_session_id(sid);
  ap.set_num_tokens(kTokens);
  ap.set_inline_kv(AppendBytes());
  v1::AppendKvResponse apr;
  {
    grpc::ClientContext ctx;
    RpcOrDie(kv->AppendKv(&ctx, ap, &apr), "AppendKv");
  }

  // 1. DecodeStep: scatter into the cache, ordered by events.
  cudaStream_t stream;
  CUDA_OR_DIE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t before, done;
  CUDA_OR_DIE(cudaEventCreateWithFlags(&before, cudaEventDisableTiming | cudaEventInterprocess));
  CUDA_OR_DIE(cudaEventCreateWithFlags(&done, cudaEventDisableTiming | cudaEventInterprocess));
  cudaIpcEventHandle_t before_h, done_h;
  CUDA_OR_DIE(cudaIpcGetEventHandle(&before_h, before));
  CUDA_OR_DIE(cudaIpcGetEventHandle(&done_h, done));
  CUDA_OR_DIE(cudaEventRecord(before, stream));
  const std::vector<uint32_t> blocks = {40, 3, 17, 9, 60, 22, 31, 5};
  v1::DecodeStepRequest step;
  step.set_session_id(sid);
  step.set_buffer_id(cache_buf.buffer_id());
  step.set_layer(0);
  step.set_num_layers(2);
  std::vector<float> q(kQHeads * kHeadDim);
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>((i * 37) % 11) / 11.0f - 0.4f;
  step.set_queries(Bytes(q.data(), q.size() * 4));
  step.set_query_dtype(v1::DTYPE_FLOAT32);
  step.mutable_params()->set_budget_tokens(64);
  step.mutable_params()->set_want_positions(true);
  for (uint32_t b : blocks) step.add_block_ids(b);
  step.set_wait_event(Bytes(&before_h, sizeof(before_h)));
  step.set_done_event(Bytes(&done_h, sizeof(done_h)));
  v1::DecodeStepResponse resp;
  {
    grpc::ClientContext ctx;
    auto rw = kv->DecodeStep(&ctx);
    if (!rw->Write(step) || !rw->Read(&resp)) {
      RpcOrDie(rw->Finish(), "DecodeStep");
      std::fprintf(stderr, "gpu_kv_client: DecodeStep: no answer\n");
      return 1;
    }
    rw->WritesDone();
    RpcOrDie(rw->Finish(), "DecodeStep");
  }
  CUDA_OR_DIE(cudaStreamWaitEvent(stream, done, 0));
  std::vector<uint16_t> host(cache_elems);
  CUDA_OR_DIE(cudaMemcpyAsync(host.data(), cache, cache_elems * 2, cudaMemcpyDeviceToHost, stream));
  CUDA_OR_DIE(cudaStreamSynchronize(stream));
  if (!CheckCache(host, resp.layout(), blocks)) return 1;

  // 2. FetchPages of the same pages into the plain buffer (synchronous).
  v1::FetchPagesRequest fetch;
  fetch.set_session_id(sid);
  fetch.set_buffer_id(plain_buf.buffer_id());
  fetch.set_layer(2);
  fetch.set_num_layers(2);
  fetch.set_offset(4096);
  fetch.set_want_positions(true);
  for (int h = 0; h < kKvHeads; ++h) {
    v1::HeadPages* hp = fetch.add_heads();
    hp->set_kv_head(h);
    *hp->mutable_pages() = resp.layout().heads(h).pages();
  }
  v1::FetchPagesResponse fr;
  {
    grpc::ClientContext ctx;
    RpcOrDie(kv->FetchPages(&ctx, fetch, &fr), "FetchPages");
  }
  std::vector<uint16_t> plain_host(plain_bytes / 2);
  CUDA_OR_DIE(cudaMemcpy(plain_host.data(), plain, plain_bytes, cudaMemcpyDeviceToHost));
  if (!CheckPlain(plain_host, fr.layout())) return 1;

  std::printf(
      "gpu_kv_client: OK: scatter of %d pages/head x 2 layers into %zu blocks (events), "
      "plain fetch of %llu bytes; every byte checked\n",
      resp.layout().heads(0).pages_size(), blocks.size(),
      static_cast<unsigned long long>(fr.layout().total_bytes()));
  return 0;
}
