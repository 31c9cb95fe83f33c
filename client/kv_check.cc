#include "client/kv_check.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status_macros.h"

namespace icecache {

HostKv HostKv::FromDump(KvDump* dump) {
  HostKv kv;
  kv.layers_ = dump->layers;
  kv.kv_heads_ = dump->kv_heads;
  kv.head_dim_ = dump->head_dim;
  kv.tokens_ = dump->tokens;
  kv.k_.resize(dump->keys.size());
  kv.v_.resize(dump->values.size());
  FloatToHalf(dump->keys.data(), kv.k_.data(), kv.k_.size());
  FloatToHalf(dump->values.data(), kv.v_.data(), kv.v_.size());
  HalfToFloat(kv.k_.data(), dump->keys.data(), kv.k_.size());
  HalfToFloat(kv.v_.data(), dump->values.data(), kv.v_.size());
  return kv;
}

const uint16_t* HostKv::key(int layer, int head, int64_t token) const {
  return k_.data() +
         ((static_cast<size_t>(layer) * kv_heads_ + head) * tokens_ + token) * head_dim_;
}
const uint16_t* HostKv::value(int layer, int head, int64_t token) const {
  return v_.data() +
         ((static_cast<size_t>(layer) * kv_heads_ + head) * tokens_ + token) * head_dim_;
}

size_t HostKv::ChunkBytes(int64_t begin, int64_t end) const {
  return 2 * static_cast<size_t>(layers_) * kv_heads_ * static_cast<size_t>(end - begin) *
         row_bytes();
}

void HostKv::FillChunk(int64_t begin, int64_t end, uint8_t* out) const {
  FillLayers(begin, end, 0, layers_, out);
}

void HostKv::FillLayers(int64_t begin, int64_t end, int first_layer, int num_layers,
                        uint8_t* out) const {
  const size_t n = static_cast<size_t>(end - begin) * row_bytes();
  for (int pass = 0; pass < 2; ++pass) {
    for (int l = first_layer; l < first_layer + num_layers; ++l) {
      for (int h = 0; h < kv_heads_; ++h) {
        std::memcpy(out, pass == 0 ? key(l, h, begin) : value(l, h, begin), n);
        out += n;
      }
    }
  }
}

std::vector<uint8_t> HostKv::Chunk(int64_t begin, int64_t end) const {
  std::vector<uint8_t> out(ChunkBytes(begin, end));
  FillChunk(begin, end, out.data());
  return out;
}

namespace {

// Token slots (page id kTokenSlotPage) hold the selected tokens packed in
// order: every slot full but the last, and no page slot among them.
absl::Status CheckTokenSlots(const HeadLayout& h, uint32_t page_tokens) {
  size_t token_slots = 0;
  for (uint32_t page : h.pages) token_slots += page == kTokenSlotPage ? 1 : 0;
  if (token_slots == 0) return absl::OkStatus();
  if (token_slots != h.pages.size()) {
    return absl::InternalError(
        absl::StrCat("head ", h.kv_head, ": token slots and pages mixed in one layout"));
  }
  for (size_t i = 0; i + 1 < h.fills.size(); ++i) {
    if (h.fills[i] != page_tokens) {
      return absl::DataLossError(absl::StrCat("head ", h.kv_head, " token slot ", i, " holds ",
                                              h.fills[i], " of ", page_tokens,
                                              " rows before the last slot (tokens not packed)"));
    }
  }
  return absl::OkStatus();
}

bool SameTokens(std::vector<int32_t> a, std::vector<int32_t> b) {
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  return a == b;
}

}  // namespace

absl::StatusOr<int64_t> VerifyFetch(const HostKv& kv, int64_t tokens, const FetchLayout& layout,
                                    const std::vector<HeadSelection>& heads, const uint8_t* data,
                                    size_t size) {
  const size_t row = kv.row_bytes();
  const size_t block = static_cast<size_t>(layout.page_tokens) * row;
  if (layout.page_bytes != 2 * block) {
    return absl::InternalError(
        absl::StrCat("layout page_bytes ", layout.page_bytes, " != 2 x ", block));
  }
  const uint32_t num_layers = layout.num_layers == 0 ? 1 : layout.num_layers;
  int64_t checked = 0;
  for (uint32_t j = 0; j < num_layers; ++j) {
    const int layer = static_cast<int>(layout.first_layer + j);
    if (layer >= kv.layers()) return absl::InternalError(absl::StrCat("layout layer ", layer));
    const uint64_t shift = j * layout.layer_stride_bytes;
    for (size_t hi = 0; hi < layout.heads.size(); ++hi) {
      const HeadLayout& h = layout.heads[hi];
      if (h.kv_head >= static_cast<uint32_t>(kv.kv_heads())) {
        return absl::InternalError(absl::StrCat("layout kv_head ", h.kv_head));
      }
      const std::vector<int32_t>* pos = &h.positions;
      const std::vector<int32_t>* selected = hi < heads.size() ? &heads[hi].positions : nullptr;
      if (pos->empty() && selected != nullptr) pos = selected;
      // The same tokens; an in-place write (rows_kept) lays them out in
      // another order.
      if (selected != nullptr && !selected->empty() && *pos != *selected &&
          (layout.rows_kept == 0 || !SameTokens(*pos, *selected))) {
        return absl::DataLossError(
            absl::StrCat("layer ", layer, " head ", h.kv_head,
                         ": the layout's positions are not the selection's"));
      }
      if (h.fills.size() != h.pages.size() || h.byte_offsets.size() != h.pages.size()) {
        return absl::InternalError("layout arrays of different lengths");
      }
      RETURN_IF_ERROR(CheckTokenSlots(h, layout.page_tokens));
      size_t cursor = 0;
      for (size_t i = 0; i < h.pages.size(); ++i) {
        const uint64_t off = h.byte_offsets[i] + shift;
        if (off + 2 * block > size || off + 2 * block < off) {
          return absl::InternalError(absl::StrCat("layout block at ", off, " past the buffer"));
        }
        const uint8_t* kblk = data + off;
        const uint8_t* vblk = kblk + block;
        for (uint32_t s = 0; s < layout.page_tokens; ++s) {
          if (s < h.fills[i]) {
            if (cursor >= pos->size()) {
              return absl::InternalError("fewer positions than fills (ask want_positions)");
            }
            const int32_t p = (*pos)[cursor++];
            if (p < 0 || p >= tokens) {
              return absl::InternalError(
                  absl::StrCat("position ", p, " outside [0, ", tokens, ")"));
            }
            if (std::memcmp(kblk + s * row, kv.key(layer, h.kv_head, p), row) != 0 ||
                std::memcmp(vblk + s * row, kv.value(layer, h.kv_head, p), row) != 0) {
              return absl::DataLossError(absl::StrCat(
                  "layer ", layer, " head ", h.kv_head, " page ", h.pages[i], " slot ", s,
                  " (position ", p, "): fetched bytes differ from the appended ones"));
            }
          } else {
            for (size_t b = 0; b < row; ++b) {
              if (kblk[s * row + b] != 0 || vblk[s * row + b] != 0) {
                return absl::DataLossError(absl::StrCat("layer ", layer, " head ", h.kv_head,
                                                        " page ", h.pages[i], " slot ", s,
                                                        " past the fill is not zero"));
              }
            }
          }
        }
        ++checked;
      }
    }
  }
  return checked;
}

}  // namespace icecache
