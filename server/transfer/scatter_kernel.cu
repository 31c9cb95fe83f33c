// The scatter kernel (docs/architecture.md §6.2): one thread block per task
// (layer, block, KV head); its threads copy the task's 2 x block_tokens rows
// in words of geometry.word_bytes, zeroing rows past the staged fill. The
// index math is scatter_math.h's, shared with ScatterOnHost (the reference
// the unit tests check on the CPU).
#include <cuda_runtime_api.h>

#include <cstdint>

#include "server/transfer/scatter_kernel.h"

namespace icecache {
namespace {

template <typename Word>
__global__ void ScatterRows(ScatterGeometry g, const ScatterTask* tasks, uint32_t num_tasks,
                            const uint8_t* src, uint8_t* dst) {
  const uint32_t words = g.row_bytes / sizeof(Word);
  const uint32_t per_task = 2 * g.block_tokens * words;
  for (uint32_t ti = blockIdx.x; ti < num_tasks; ti += gridDim.x) {
    const ScatterTask task = tasks[ti];
    for (uint32_t i = threadIdx.x; i < per_task; i += blockDim.x) {
      const uint32_t w = i % words;
      const uint32_t row = i / words;
      const int kv = row >= g.block_tokens ? 1 : 0;
      const uint32_t t = row - kv * g.block_tokens;
      Word* out = reinterpret_cast<Word*>(dst + ScatterDstRow(g, task, kv, t)) + w;
      const uint64_t s = ScatterSrcRow(g, task, kv, t);
      if (s == kNoSource) {
        *out = Word{};
      } else {
        *out = reinterpret_cast<const Word*>(src + s)[w];
      }
    }
  }
}

template <typename Word>
cudaError_t Launch(cudaStream_t stream, const ScatterGeometry& g, const ScatterTask* tasks,
                   uint32_t n, const uint8_t* src, uint8_t* dst) {
  constexpr uint32_t kThreads = 128;
  const uint32_t grid = n < 65535 ? n : 65535;
  ScatterRows<Word><<<grid, kThreads, 0, stream>>>(g, tasks, n, src, dst);
  return cudaGetLastError();
}

}  // namespace

int LaunchScatterKernel(void* stream_ptr, const ScatterGeometry& g, const ScatterTask* tasks,
                        uint32_t num_tasks, const uint8_t* src, uint8_t* dst) {
  if (num_tasks == 0) return cudaSuccess;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (g.word_bytes) {
    case 16:
      return Launch<uint4>(stream, g, tasks, num_tasks, src, dst);
    case 8:
      return Launch<uint2>(stream, g, tasks, num_tasks, src, dst);
    case 4:
      return Launch<uint32_t>(stream, g, tasks, num_tasks, src, dst);
    case 2:
      return Launch<uint16_t>(stream, g, tasks, num_tasks, src, dst);
    default:
      return Launch<uint8_t>(stream, g, tasks, num_tasks, src, dst);
  }
}

}  // namespace icecache
