// The index math of the scatter into an engine's paged KV cache
// (docs/architecture.md §6.2), shared by the CUDA kernel (scatter_kernel.cu)
// and the host executor (ScatterOnHost, the reference the unit tests compare
// against a naive per-layout indexing). Plain structs and inline functions:
// this header includes no CUDA header and compiles as host and device code.
//
// The staged bytes are the fetch layout of gather.h (per layer, per KV head,
// per page a frame: K block of page_tokens rows, then V block), followed by
// the task table. One task moves the K and V rows of one (layer, block, KV
// head): rows [0, fill) from the staged frame, rows [fill, block_tokens)
// zero (also every row when the head has no page for that block).
#ifndef ICECACHE_SERVER_TRANSFER_SCATTER_MATH_H_
#define ICECACHE_SERVER_TRANSFER_SCATTER_MATH_H_

#include <cstdint>

#if defined(__CUDACC__)
#define ICECACHE_HD __host__ __device__
#else
#define ICECACHE_HD
#endif

namespace icecache {

// Byte geometry of one scatter (the same for every task).
struct ScatterGeometry {
  uint32_t block_tokens = 0;  // rows per block in the engine's cache
  uint32_t page_tokens = 0;   // rows per staged page (<= block_tokens)
  uint32_t row_bytes = 0;     // head_dim x dtype size: one contiguous row
  uint64_t kv_stride = 0;     // bytes from a K row to its V row
  uint64_t token_stride = 0;  // bytes between consecutive rows of a block
  // Largest of 16, 8, 4, 2, 1 dividing row_bytes, both strides and every
  // task's dst and src: the kernel's copy word.
  uint32_t word_bytes = 1;
};

// One (layer, block, KV head) of the scatter.
struct ScatterTask {
  uint64_t dst = 0;  // byte offset in the device allocation of K row 0
  // Byte offset in the staging of the K block of the staged page, or
  // kNoSource: every row of this task is zero.
  uint64_t src = 0;
  uint32_t fill = 0;  // staged rows to copy; the rest are zero
  uint32_t pad = 0;
};
inline constexpr uint64_t kNoSource = ~uint64_t{0};

// Where the staged bytes of a scatter (or a frame gather) are read from:
// one device-readable region (`base`: device staging, or mapped pinned
// staging), or, with `frames` set, the pool's page frames in place (pinned,
// mapped host memory; the direct mode): staged byte s is byte
// s % frame_bytes of frames[s / frame_bytes]. `frames` is a device-readable
// table of device addresses.
struct ScatterSource {
  const uint8_t* base = nullptr;
  const uint8_t* const* frames = nullptr;
  uint64_t frame_bytes = 0;
};

// The address of staged byte `offset` (not kNoSource).
ICECACHE_HD inline const uint8_t* SourceAt(const ScatterSource& s, uint64_t offset) {
  if (s.frames == nullptr) return s.base + offset;
  return s.frames[offset / s.frame_bytes] + offset % s.frame_bytes;
}

// Byte offset in the device allocation of row `t` of K (kv = 0) or V (1).
ICECACHE_HD inline uint64_t ScatterDstRow(const ScatterGeometry& g, const ScatterTask& task, int kv,
                                          uint32_t t) {
  return task.dst + static_cast<uint64_t>(kv) * g.kv_stride + uint64_t{t} * g.token_stride;
}

// Byte offset in the staging of row `t` of K or V; kNoSource when the row is
// padding (no staged page, or t >= fill).
ICECACHE_HD inline uint64_t ScatterSrcRow(const ScatterGeometry& g, const ScatterTask& task, int kv,
                                          uint32_t t) {
  if (task.src == kNoSource || t >= task.fill) return kNoSource;
  return task.src + (static_cast<uint64_t>(kv) * g.page_tokens + t) * g.row_bytes;
}

}  // namespace icecache

#endif  // ICECACHE_SERVER_TRANSFER_SCATTER_MATH_H_
