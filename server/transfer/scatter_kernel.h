// Launchers of the scatter kernel (scatter_kernel.cu, built with nvcc only
// when ICECACHE_ENABLE_CUDA). Called by cuda_runtime_cuda.cc alone; this
// header includes no CUDA header (the stream is a cudaStream_t passed as
// void*, the result a cudaError_t as int).
#ifndef ICECACHE_SERVER_TRANSFER_SCATTER_KERNEL_H_
#define ICECACHE_SERVER_TRANSFER_SCATTER_KERNEL_H_

#include <cstdint>

#include "server/transfer/scatter_math.h"

namespace icecache {

// Enqueues the scatter of `num_tasks` tasks on `stream`: `tasks` and `src`
// must be readable by the device (device memory, or mapped pinned host
// memory through unified addressing: the zero-copy mode), `dst` is the
// engine's allocation. Returns the launch's cudaError_t (0 = success).
int LaunchScatterKernel(void* stream, const ScatterGeometry& geometry, const ScatterTask* tasks,
                        uint32_t num_tasks, const uint8_t* src, uint8_t* dst);

}  // namespace icecache

#endif  // ICECACHE_SERVER_TRANSFER_SCATTER_KERNEL_H_
