// The fetch layout (docs/architecture.md §6) and the gather that fills it.
//
// A fetch copies the selected pages of every KV head of `num_layers`
// consecutive layers (one layer, or several layers of one layer group, which
// share their page ids) into one contiguous region of a registered buffer
// starting at `buffer_offset`. Every page occupies one SLOT of exactly
// frame_bytes = 2 x page_tokens x head_dim x dtype_size bytes:
//
//   region = for layer j in [0, num_layers):          (layer_stride_bytes each)
//              for kv head h in 0..kv_heads-1:         (in head order)
//                for each requested page of head h:    (in request/selection order)
//                  K block: page_tokens x head_dim elements, row = slot in page
//                  V block: page_tokens x head_dim elements
//
// in the session dtype, row-major. Rows [fill, page_tokens) of both blocks
// are zero. Slot s (0-based, counted across heads within one layer) of layer
// j starts at
//   buffer_offset + j * layer_stride_bytes + s * frame_bytes
// with layer_stride_bytes = total_slots_per_layer * frame_bytes, and its V
// block at + page_tokens * head_dim * dtype_size. Token positions, when asked
// for, are listed per head: fills[i] positions for the i-th page, in slot
// order, concatenated.
//
// Token granularity (FetchRequest.tokens): the slots hold selected tokens
// instead of whole pages. A head's tokens are packed in request order, row r
// of the head's i-th slot holding its (i x page_tokens + r)-th token (K row in
// the K block, V row in the V block); all slots are full but the head's last.
// Those slots carry page id kTokenSlot, and positions list the tokens in
// order. The region's geometry is the same.
//
// Thread safety: free functions, reentrant; FetchLayout is a value type.
#ifndef ICECACHE_SERVER_TRANSFER_GATHER_H_
#define ICECACHE_SERVER_TRANSFER_GATHER_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace icecache {

// FetchSlot.page of a slot packed with tokens (token granularity).
inline constexpr uint32_t kTokenSlot = UINT32_MAX;

// One page placed in the region (first layer of the fetch; add j *
// layer_stride_bytes for the j-th layer).
struct FetchSlot {
  uint32_t page = 0;         // page id within the (layer group, head) index
  uint32_t slot = 0;         // slot index within one layer's region
  uint32_t fill = 0;         // meaningful rows of the page
  uint64_t byte_offset = 0;  // absolute offset in the buffer of the K block
};

struct FetchHeadLayout {
  int kv_head = 0;
  std::vector<FetchSlot> slots;
  std::vector<int32_t> positions;  // when requested: sum(fills) entries
};

struct FetchLayout {
  int first_layer = 0;
  int num_layers = 1;
  int page_tokens = 0;
  int head_dim = 0;
  DType dtype = DType::kF16;
  uint64_t frame_bytes = 0;  // one slot
  uint64_t buffer_offset = 0;
  uint64_t layer_stride_bytes = 0;  // slots per layer x frame_bytes
  uint64_t total_bytes = 0;         // num_layers x layer_stride_bytes
  std::vector<FetchHeadLayout> heads;
  // Token granularity, per layer of the fetch over every KV head: rows
  // copied, and rows left where the previous write put them (in place).
  uint64_t rows_copied = 0, rows_kept = 0;
  uint32_t total_slots() const;  // per layer
};

// Geometry of one session's pages.
struct PageGeometry {
  int page_tokens = 0;
  int head_dim = 0;
  DType dtype = DType::kF16;
  uint64_t frame_bytes() const;  // 2 x page_tokens x head_dim x DTypeSize(dtype)
};

// Computes the layout for `pages[h]` / `fills[h]` (one vector per KV head, in
// order) over `num_layers` layers starting at `first_layer`, and checks that
// [buffer_offset, buffer_offset + total_bytes) fits in `buffer_size` with
// overflow-safe arithmetic. InvalidArgument for num_layers < 1, a bad
// geometry or pages/fills of different lengths, or a fill > page_tokens;
// OutOfRange ("fetch of N bytes at offset O exceeds buffer size S") when the
// region does not fit. Positions are left empty (the caller adds them).
absl::StatusOr<FetchLayout> PlanFetchLayout(const PageGeometry& geometry, int first_layer,
                                            int num_layers,
                                            const std::vector<std::vector<uint32_t>>& pages,
                                            const std::vector<std::vector<uint32_t>>& fills,
                                            uint64_t buffer_offset, uint64_t buffer_size);

// Copies `count` frames of `frame_bytes` each, frames[i] -> dst + i *
// frame_bytes. Plain memcpy: safe inside RunSigbusGuarded / BufferLease::Write.
void GatherFrames(const uint8_t* const* frames, size_t count, uint64_t frame_bytes, uint8_t* dst);

// Where one token's rows are: its page's frame (K block, then V block of
// page_tokens rows each) and its slot in the page.
struct RowSource {
  const uint8_t* frame = nullptr;
  uint32_t slot = 0;
};

// Packs `count` tokens into ceil(count / page_tokens) consecutive slots of
// 2 x page_tokens x row_bytes bytes at `dst`: token i's K row goes to row
// i % page_tokens of slot i / page_tokens's K block, its V row likewise; the
// rows past the last token are zeroed. Plain memcpy (as GatherFrames).
// The K and V rows of the token `prefetch_ahead` places further are asked
// for before each copy (0: none): a token-granular selection reads ~1024
// scattered rows per head from a multi-GiB arena, each read a cache and
// often a TLB miss, which would otherwise come one after another
// (docs/bench/gather_arena.md).
inline constexpr int kGatherPrefetchAhead = 8;
void GatherRows(const RowSource* rows, size_t count, int page_tokens, uint64_t row_bytes,
                uint8_t* dst, int prefetch_ahead = kGatherPrefetchAhead);
// The same for an in-place write (server/session/resident_rows.h): token i
// goes to packed row index `to[i]` instead of i, and only these rows are
// written; then the rows of the last slot past `total` tokens are zeroed,
// as GatherRows zeroes them.
void GatherRowsTo(const RowSource* rows, const uint32_t* to, size_t count, size_t total,
                  int page_tokens, uint64_t row_bytes, uint8_t* dst,
                  int prefetch_ahead = kGatherPrefetchAhead);

}  // namespace icecache

#endif  // ICECACHE_SERVER_TRANSFER_GATHER_H_
