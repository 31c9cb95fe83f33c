// Naive reference of the scatter into a paged KV cache, written from each
// layout's shape (not from strides), for the scatter tests.
#ifndef ICECACHE_TESTS_UNIT_TRANSFER_PAGED_KV_REFERENCE_H_
#define ICECACHE_TESTS_UNIT_TRANSFER_PAGED_KV_REFERENCE_H_

#include <cstdint>
#include <cstring>
#include <vector>

#include "server/transfer/gather.h"
#include "server/transfer/paged_kv_layout.h"

namespace icecache::testing {

// Element index inside one layer tensor of (kv, block, token, head, dim 0),
// from the layout's documented shape. CUSTOM here means the transposed shape
// [num_blocks, kv_heads, 2, block_tokens, head_dim] with matching strides
// (see CustomHeadMajor).
inline uint64_t NaiveElement(const PagedKvLayout& l, int kv, uint64_t b, uint64_t t, uint64_t h) {
  const uint64_t N = l.num_blocks, B = l.block_tokens, H = l.kv_heads, D = l.head_dim;
  switch (l.format) {
    case PagedKvFormat::kVllmFlash:  // [2, N, B, H, D]
      return (((kv * N + b) * B + t) * H + h) * D;
    case PagedKvFormat::kFlashInferNhd:  // [N, 2, B, H, D]
      return (((b * 2 + kv) * B + t) * H + h) * D;
    case PagedKvFormat::kFlashInferHnd:  // [N, 2, H, B, D]
      return (((b * 2 + kv) * H + h) * B + t) * D;
    case PagedKvFormat::kCustom:  // [N, H, 2, B, D]
      return (((b * H + h) * 2 + kv) * B + t) * D;
  }
  return 0;
}

// CUSTOM strides of the shape [N, H, 2, B, D] (what Tensor.stride() says).
inline void CustomHeadMajor(PagedKvLayout* l) {
  const uint64_t H = l->kv_heads, B = l->block_tokens, D = l->head_dim;
  l->format = PagedKvFormat::kCustom;
  l->kv_stride = B * D;
  l->block_stride = H * 2 * B * D;
  l->token_stride = D;
  l->head_stride = 2 * B * D;
}

// What the allocation must hold after scattering `staging` (laid out as
// `fetch`) into `block_ids`, starting from `before`; layer tensors at
// `layer_base` bytes.
inline std::vector<uint8_t> NaiveScatter(const PagedKvLayout& l,
                                         const std::vector<uint64_t>& layer_base,
                                         const FetchLayout& fetch,
                                         const std::vector<uint32_t>& block_ids,
                                         const uint8_t* staging, std::vector<uint8_t> before) {
  const uint64_t es = DTypeSize(l.dtype), row = l.head_dim * es;
  for (int j = 0; j < fetch.num_layers; ++j) {
    const int li = fetch.first_layer + j - l.first_layer;
    for (size_t i = 0; i < block_ids.size(); ++i) {
      for (int h = 0; h < l.kv_heads; ++h) {
        for (int kv = 0; kv < 2; ++kv) {
          for (int t = 0; t < l.block_tokens; ++t) {
            uint8_t* out =
                before.data() + layer_base[li] + NaiveElement(l, kv, block_ids[i], t, h) * es;
            const auto& slots = fetch.heads[h].slots;
            if (i < slots.size() && static_cast<uint32_t>(t) < slots[i].fill) {
              const uint8_t* in = staging + j * fetch.layer_stride_bytes +
                                  slots[i].slot * fetch.frame_bytes +
                                  (kv * fetch.page_tokens + t) * row;
              std::memcpy(out, in, row);
            } else {
              std::memset(out, 0, row);
            }
          }
        }
      }
    }
  }
  return before;
}

}  // namespace icecache::testing

#endif  // ICECACHE_TESTS_UNIT_TRANSFER_PAGED_KV_REFERENCE_H_
