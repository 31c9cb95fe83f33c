// The device kernels of the push (docs/architecture.md §6.2-6.3):
//   - the scatter: one thread block per task (layer, block, KV head); its
//     threads copy the task's 2 x block_tokens rows in words of
//     geometry.word_bytes, zeroing rows past the staged fill;
//   - the frame gather (direct mode, plain buffers): one thread block per
//     page frame, copied whole to dst + i x frame_bytes.
// Both read their source through ScatterSource: the staging, or, in the
// direct mode, the pool's pinned page frames in place over the bus. Each
// thread keeps kUnroll words in flight, so reads over the bus overlap. The
// index math is scatter_math.h's, shared with ScatterOnHost (the reference
// the unit tests check on the CPU).
#include <cuda_runtime_api.h>

#include <cstdint>

#include "server/transfer/scatter_kernel.h"

namespace icecache {
namespace {

constexpr int kUnroll = 4;
constexpr uint32_t kThreads = 128;

template <typename Word>
__global__ void ScatterRows(ScatterGeometry g, const ScatterTask* __restrict__ tasks,
                            uint32_t num_tasks, ScatterSource src, uint8_t* __restrict__ dst) {
  const uint32_t words = g.row_bytes / sizeof(Word);
  const uint32_t per_task = 2 * g.block_tokens * words;
  for (uint32_t ti = blockIdx.x; ti < num_tasks; ti += gridDim.x) {
    const ScatterTask task = tasks[ti];
    // A page's K and V blocks lie in one frame: its address once per task.
    const uint8_t* page = task.src == kNoSource ? nullptr : SourceAt(src, task.src);
    for (uint32_t i0 = threadIdx.x; i0 < per_task; i0 += kUnroll * blockDim.x) {
      Word v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t i = i0 + u * blockDim.x;
        v[u] = Word{};
        if (i < per_task && page != nullptr) {
          const uint32_t row = i / words;
          const int kv = row >= g.block_tokens ? 1 : 0;
          const uint32_t t = row - kv * g.block_tokens;
          const uint64_t s = ScatterSrcRow(g, task, kv, t);
          if (s != kNoSource) {
            v[u] = reinterpret_cast<const Word*>(page + (s - task.src))[i % words];
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t i = i0 + u * blockDim.x;
        if (i < per_task) {
          const uint32_t row = i / words;
          const int kv = row >= g.block_tokens ? 1 : 0;
          const uint32_t t = row - kv * g.block_tokens;
          reinterpret_cast<Word*>(dst + ScatterDstRow(g, task, kv, t))[i % words] = v[u];
        }
      }
    }
  }
}

template <typename Word>
__global__ void GatherFrameWords(const uint8_t* const* __restrict__ frames, uint32_t count,
                                 uint64_t frame_bytes, uint8_t* __restrict__ dst) {
  const uint64_t words = frame_bytes / sizeof(Word);
  for (uint32_t f = blockIdx.x; f < count; f += gridDim.x) {
    const Word* in = reinterpret_cast<const Word*>(frames[f]);
    Word* out = reinterpret_cast<Word*>(dst + f * frame_bytes);
    for (uint64_t i0 = threadIdx.x; i0 < words; i0 += kUnroll * blockDim.x) {
      Word v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint64_t i = i0 + u * blockDim.x;
        if (i < words) v[u] = in[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint64_t i = i0 + u * blockDim.x;
        if (i < words) out[i] = v[u];
      }
    }
  }
}

uint32_t Grid(uint32_t n) { return n < 65535 ? n : 65535; }

template <typename Word>
cudaError_t LaunchScatterWords(cudaStream_t stream, const ScatterGeometry& g,
                               const ScatterTask* tasks, uint32_t n, const ScatterSource& src,
                               uint8_t* dst) {
  ScatterRows<Word><<<Grid(n), kThreads, 0, stream>>>(g, tasks, n, src, dst);
  return cudaGetLastError();
}

template <typename Word>
cudaError_t LaunchGatherWords(cudaStream_t stream, const uint8_t* const* frames, uint32_t n,
                              uint64_t frame_bytes, uint8_t* dst) {
  GatherFrameWords<Word><<<Grid(n), kThreads, 0, stream>>>(frames, n, frame_bytes, dst);
  return cudaGetLastError();
}

}  // namespace

int LaunchScatterKernel(void* stream_ptr, const ScatterGeometry& g, const ScatterTask* tasks,
                        uint32_t num_tasks, const ScatterSource& src, uint8_t* dst) {
  if (num_tasks == 0) return cudaSuccess;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (g.word_bytes) {
    case 16:
      return LaunchScatterWords<uint4>(stream, g, tasks, num_tasks, src, dst);
    case 8:
      return LaunchScatterWords<uint2>(stream, g, tasks, num_tasks, src, dst);
    case 4:
      return LaunchScatterWords<uint32_t>(stream, g, tasks, num_tasks, src, dst);
    case 2:
      return LaunchScatterWords<uint16_t>(stream, g, tasks, num_tasks, src, dst);
    default:
      return LaunchScatterWords<uint8_t>(stream, g, tasks, num_tasks, src, dst);
  }
}

int LaunchGatherFramesKernel(void* stream_ptr, const uint8_t* const* frames, uint32_t count,
                             uint64_t frame_bytes, uint32_t word_bytes, uint8_t* dst) {
  if (count == 0) return cudaSuccess;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (word_bytes) {
    case 16:
      return LaunchGatherWords<uint4>(stream, frames, count, frame_bytes, dst);
    case 8:
      return LaunchGatherWords<uint2>(stream, frames, count, frame_bytes, dst);
    case 4:
      return LaunchGatherWords<uint32_t>(stream, frames, count, frame_bytes, dst);
    case 2:
      return LaunchGatherWords<uint16_t>(stream, frames, count, frame_bytes, dst);
    default:
      return LaunchGatherWords<uint8_t>(stream, frames, count, frame_bytes, dst);
  }
}

}  // namespace icecache
