// Launchers of the scatter kernel (scatter_kernel.cu, built with nvcc only
// when ICECACHE_ENABLE_CUDA). Called by cuda_runtime_cuda.cc alone; this
// header includes no CUDA header (the stream is a cudaStream_t passed as
// void*, the result a cudaError_t as int).
#ifndef ICECACHE_SERVER_TRANSFER_SCATTER_KERNEL_H_
#define ICECACHE_SERVER_TRANSFER_SCATTER_KERNEL_H_

#include <cstdint>

#include "server/transfer/scatter_math.h"

namespace icecache {

// Enqueues the scatter of `num_tasks` tasks on `stream`: `tasks` and what
// `src` names must be readable by the device (device memory, or mapped
// pinned host memory through unified addressing: the zero-copy and direct
// modes), `dst` is the engine's allocation. Returns the launch's cudaError_t
// (0 = success).
int LaunchScatterKernel(void* stream, const ScatterGeometry& geometry, const ScatterTask* tasks,
                        uint32_t num_tasks, const ScatterSource& src, uint8_t* dst);
// Enqueues the copy of `count` frames of `frame_bytes` (`frames`: a
// device-readable table of device-readable addresses) to dst + i x
// frame_bytes, in words of `word_bytes` (16, 8, 4, 2 or 1; dividing
// frame_bytes and every address).
int LaunchGatherFramesKernel(void* stream, const uint8_t* const* frames, uint32_t count,
                             uint64_t frame_bytes, uint32_t word_bytes, uint8_t* dst);

}  // namespace icecache

#endif  // ICECACHE_SERVER_TRANSFER_SCATTER_KERNEL_H_
