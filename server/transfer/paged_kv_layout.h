// An engine's paged KV cache registered as a CUDA_IPC buffer, and the scatter
// of fetched pages into its blocks (docs/architecture.md §6.2,
// docs/engines.md "Paged KV caches").
//
// A paged KV cache is, per layer, a tensor of `num_blocks` blocks of
// `block_tokens` tokens x `kv_heads` heads x `head_dim` elements, for K and V.
// Where each element lives is given by element strides of four axes (kv,
// block, token, head; the head_dim axis is contiguous), as torch reports them
// (Tensor.stride()). Presets fill them for the common layouts:
//   VLLM_FLASH       [2, num_blocks, block_tokens, kv_heads, head_dim]
//   FLASHINFER_NHD   [num_blocks, 2, block_tokens, kv_heads, head_dim]
//   FLASHINFER_HND   [num_blocks, 2, kv_heads, block_tokens, head_dim]
// Layers: per-layer tensors inside the allocation at `layer_offsets_bytes`
// (one per layer), or one all-layer tensor whose layer l starts at
// base_offset_bytes + l x layer_stride elements.
//
// Every tensor's extent is checked against the registered size when the
// buffer is registered (Validate), and every block id of a scatter against
// num_blocks before a byte moves (PlanScatter). Value types; thread-safe as
// values.
#ifndef ICECACHE_SERVER_TRANSFER_PAGED_KV_LAYOUT_H_
#define ICECACHE_SERVER_TRANSFER_PAGED_KV_LAYOUT_H_

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "server/transfer/gather.h"
#include "server/transfer/scatter_math.h"

namespace icecache {

enum class PagedKvFormat { kCustom = 0, kVllmFlash = 1, kFlashInferNhd = 2, kFlashInferHnd = 3 };
std::string_view PagedKvFormatName(PagedKvFormat f);  // "VLLM_FLASH", ...

struct PagedKvLayout {
  PagedKvFormat format = PagedKvFormat::kVllmFlash;
  int first_layer = 0;  // model layer of the buffer's first layer tensor
  int num_layers = 1;
  uint32_t num_blocks = 0;
  int block_tokens = 0;
  int kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kF16;
  // Per-layer tensors: byte offset of each layer's tensor in the allocation
  // (num_layers entries). Empty: one all-layer tensor (below).
  std::vector<uint64_t> layer_offsets_bytes;
  uint64_t base_offset_bytes = 0;  // all-layer tensor: where layer 0 starts
  uint64_t layer_stride = 0;       // elements; 0 = the layer extent (dense)
  // Element strides; CUSTOM only (the presets compute them).
  uint64_t kv_stride = 0;
  uint64_t block_stride = 0;
  uint64_t token_stride = 0;
  uint64_t head_stride = 0;
};

// A validated layout with its byte strides resolved.
struct ResolvedKvLayout {
  PagedKvLayout layout;
  uint64_t elem_bytes = 0;
  uint64_t kv_stride_bytes = 0;
  uint64_t block_stride_bytes = 0;
  uint64_t token_stride_bytes = 0;
  uint64_t head_stride_bytes = 0;
  uint64_t extent_bytes = 0;         // one layer: from its start to past its last element
  std::vector<uint64_t> layer_base;  // byte offset of each layer's tensor

  // Byte offset of element 0 of (layer index in this buffer, kv, block,
  // token, head).
  uint64_t RowOffset(int layer_index, int kv, uint32_t block, uint32_t token, int head) const;
};

// Checks the layout against a buffer of `buffer_size` bytes. InvalidArgument
// (naming the field: "paged_kv.head_dim must be in 1..1024, got 0") for a
// bad shape, an unknown format, CUSTOM without strides, layer_offsets_bytes
// of the wrong length; OutOfRange when a layer tensor reaches past the
// registered size ("paged_kv.layer_offsets_bytes[3] = ...: the layer tensor
// of N bytes ends at E, past the buffer size S") or arithmetic overflows.
absl::StatusOr<ResolvedKvLayout> ResolveKvLayout(const PagedKvLayout& layout, uint64_t buffer_size);

// A scatter ready to run: the task table and geometry. Tasks are ordered
// (layer, block index in block_ids, KV head).
struct ScatterPlan {
  ScatterGeometry geometry;
  std::vector<ScatterTask> tasks;
  uint64_t staged_bytes = 0;  // the fetch layout's bytes (tasks follow)
};

// Plans the scatter of `fetch` (the gather's layout, staged from offset 0)
// into the blocks `block_ids` of `cache`: the i-th page of KV head h lands in
// block block_ids[i] at head h; a head with fewer pages than block_ids has
// zero rows in the remaining blocks, and rows past each page's fill are
// zero. InvalidArgument when the session's head_dim, kv_heads or dtype differ
// from the cache's, page_tokens > block_tokens, block_ids is empty, shorter
// than a head's page count, or repeats a block; OutOfRange for a block id >=
// num_blocks ("block_ids[2] = 9000 is past the paged KV cache's 4096
// blocks") or a layer outside the buffer's layers. Nothing is written.
absl::StatusOr<ScatterPlan> PlanScatter(const ResolvedKvLayout& cache, const FetchLayout& fetch,
                                        const std::vector<uint32_t>& block_ids);

// The scatter on the CPU: what the kernel does, with the same index math
// (scatter_math.h). `src` names the staged pages (host addresses), `dst`
// the allocation; the second form reads one staging region.
void ScatterOnHost(const ScatterGeometry& g, const ScatterTask* tasks, size_t num_tasks,
                   const ScatterSource& src, uint8_t* dst);
void ScatterOnHost(const ScatterGeometry& g, const ScatterTask* tasks, size_t num_tasks,
                   const uint8_t* staging, uint8_t* dst);

}  // namespace icecache

#endif  // ICECACHE_SERVER_TRANSFER_PAGED_KV_LAYOUT_H_
