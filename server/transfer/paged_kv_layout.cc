#include "server/transfer/paged_kv_layout.h"

#include <cstring>
#include <unordered_set>

#include "absl/strings/str_cat.h"

namespace icecache {
namespace {

using u128 = unsigned __int128;
constexpr u128 kMaxU64 = ~uint64_t{0};

absl::Status CheckShape(const PagedKvLayout& l) {
  auto bad = [](const char* field, int64_t lo, int64_t hi, int64_t got) {
    return absl::InvalidArgumentError(
        absl::StrCat("paged_kv.", field, " must be in ", lo, "..", hi, ", got ", got));
  };
  if (l.first_layer < 0 || l.first_layer > 65535)
    return bad("first_layer", 0, 65535, l.first_layer);
  if (l.num_layers < 1 || l.num_layers > 1024) return bad("num_layers", 1, 1024, l.num_layers);
  if (l.num_blocks < 1) return bad("num_blocks", 1, 0xffffffffll, l.num_blocks);
  if (l.block_tokens < 1 || l.block_tokens > 1024) {
    return bad("block_tokens", 1, 1024, l.block_tokens);
  }
  if (l.kv_heads < 1 || l.kv_heads > 4096) return bad("kv_heads", 1, 4096, l.kv_heads);
  if (l.head_dim < 1 || l.head_dim > 1024) return bad("head_dim", 1, 1024, l.head_dim);
  if (!l.layer_offsets_bytes.empty() &&
      l.layer_offsets_bytes.size() != static_cast<size_t>(l.num_layers)) {
    return absl::InvalidArgumentError(
        absl::StrCat("paged_kv.layer_offsets_bytes must list num_layers = ", l.num_layers,
                     " offsets (one per layer tensor), got ", l.layer_offsets_bytes.size()));
  }
  if (!l.layer_offsets_bytes.empty() && (l.layer_stride != 0 || l.base_offset_bytes != 0)) {
    return absl::InvalidArgumentError(
        "paged_kv: give layer_offsets_bytes (per-layer tensors) or layer_stride / "
        "base_offset_bytes (one all-layer tensor), not both");
  }
  return absl::OkStatus();
}

// Element strides (kv, block, token, head) of the format.
absl::Status FillStrides(const PagedKvLayout& l, uint64_t s[4]) {
  const uint64_t n = l.num_blocks, b = l.block_tokens, h = l.kv_heads, d = l.head_dim;
  switch (l.format) {
    case PagedKvFormat::kVllmFlash:  // [2, N, B, H, D]
      s[0] = n * b * h * d, s[1] = b * h * d, s[2] = h * d, s[3] = d;
      return absl::OkStatus();
    case PagedKvFormat::kFlashInferNhd:  // [N, 2, B, H, D]
      s[0] = b * h * d, s[1] = 2 * b * h * d, s[2] = h * d, s[3] = d;
      return absl::OkStatus();
    case PagedKvFormat::kFlashInferHnd:  // [N, 2, H, B, D]
      s[0] = h * b * d, s[1] = 2 * h * b * d, s[2] = d, s[3] = b * d;
      return absl::OkStatus();
    case PagedKvFormat::kCustom:
      s[0] = l.kv_stride, s[1] = l.block_stride, s[2] = l.token_stride, s[3] = l.head_stride;
      if (s[0] == 0 || s[1] == 0 || s[2] == 0 || s[3] == 0) {
        return absl::InvalidArgumentError(
            "paged_kv: format CUSTOM needs kv_stride, block_stride, token_stride and head_stride "
            "(elements, as Tensor.stride() reports them), all > 0");
      }
      for (int i = 0; i < 4; ++i) {
        if (s[i] < static_cast<uint64_t>(l.head_dim)) {
          return absl::InvalidArgumentError(
              absl::StrCat("paged_kv: every stride must be >= head_dim (", l.head_dim,
                           ": the head_dim axis is contiguous), got ", s[i]));
        }
      }
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("paged_kv.format ", static_cast<int>(l.format), " is not known"));
}

absl::Status CheckEnds(const std::string& what, u128 start, u128 extent, uint64_t size) {
  if (start + extent > size) {
    return absl::OutOfRangeError(absl::StrCat(
        what, ": the layer tensor of ", static_cast<uint64_t>(extent), " bytes ends at ",
        static_cast<uint64_t>(start + extent > kMaxU64 ? kMaxU64 : start + extent),
        ", past the buffer size ", size));
  }
  return absl::OkStatus();
}

}  // namespace

std::string_view PagedKvFormatName(PagedKvFormat f) {
  switch (f) {
    case PagedKvFormat::kCustom:
      return "CUSTOM";
    case PagedKvFormat::kVllmFlash:
      return "VLLM_FLASH";
    case PagedKvFormat::kFlashInferNhd:
      return "FLASHINFER_NHD";
    case PagedKvFormat::kFlashInferHnd:
      return "FLASHINFER_HND";
  }
  return "UNKNOWN";
}

uint64_t ResolvedKvLayout::RowOffset(int layer_index, int kv, uint32_t block, uint32_t token,
                                     int head) const {
  return layer_base[layer_index] + static_cast<uint64_t>(kv) * kv_stride_bytes +
         uint64_t{block} * block_stride_bytes + uint64_t{token} * token_stride_bytes +
         static_cast<uint64_t>(head) * head_stride_bytes;
}

absl::StatusOr<ResolvedKvLayout> ResolveKvLayout(const PagedKvLayout& layout,
                                                 uint64_t buffer_size) {
  if (absl::Status s = CheckShape(layout); !s.ok()) return s;
  uint64_t st[4];
  if (absl::Status s = FillStrides(layout, st); !s.ok()) return s;
  ResolvedKvLayout r;
  r.layout = layout;
  r.elem_bytes = DTypeSize(layout.dtype);
  // The last element of a layer: kv 1, block N-1, token B-1, head H-1, dim D-1.
  const u128 last = u128{st[0]} + u128{st[1]} * (layout.num_blocks - 1) +
                    u128{st[2]} * (layout.block_tokens - 1) + u128{st[3]} * (layout.kv_heads - 1) +
                    layout.head_dim;
  const u128 extent = last * r.elem_bytes;
  if (extent > buffer_size) {
    return absl::OutOfRangeError(absl::StrCat(
        "paged_kv: one layer of ", layout.num_blocks, " blocks x ", layout.block_tokens,
        " tokens x ", layout.kv_heads, " kv heads x ", layout.head_dim, " x ",
        std::string(DTypeName(layout.dtype)), " (", std::string(PagedKvFormatName(layout.format)),
        ") does not fit in the buffer's ", buffer_size, " bytes"));
  }
  r.extent_bytes = static_cast<uint64_t>(extent);
  r.kv_stride_bytes = st[0] * r.elem_bytes;
  r.block_stride_bytes = st[1] * r.elem_bytes;
  r.token_stride_bytes = st[2] * r.elem_bytes;
  r.head_stride_bytes = st[3] * r.elem_bytes;
  r.layer_base.resize(layout.num_layers);
  for (int i = 0; i < layout.num_layers; ++i) {
    if (!layout.layer_offsets_bytes.empty()) {
      const uint64_t off = layout.layer_offsets_bytes[i];
      if (absl::Status s = CheckEnds(absl::StrCat("paged_kv.layer_offsets_bytes[", i, "] = ", off),
                                     off, extent, buffer_size);
          !s.ok()) {
        return s;
      }
      r.layer_base[i] = off;
      continue;
    }
    const u128 stride =
        layout.layer_stride == 0 ? extent : u128{layout.layer_stride} * r.elem_bytes;
    const u128 start = u128{layout.base_offset_bytes} + stride * i;
    if (absl::Status s = CheckEnds(absl::StrCat("paged_kv layer ", layout.first_layer + i,
                                                " (base_offset_bytes + ", i, " x layer_stride)"),
                                   start, extent, buffer_size);
        !s.ok()) {
      return s;
    }
    r.layer_base[i] = static_cast<uint64_t>(start);
  }
  return r;
}

namespace {

absl::Status CheckSessionMatches(const ResolvedKvLayout& cache, const FetchLayout& fetch) {
  const PagedKvLayout& l = cache.layout;
  if (fetch.head_dim != l.head_dim || fetch.dtype != l.dtype ||
      fetch.heads.size() != static_cast<size_t>(l.kv_heads)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block_ids: the buffer's paged KV cache holds ", l.kv_heads, " kv heads x head_dim ",
        l.head_dim, " ", std::string(DTypeName(l.dtype)), "; the session has ", fetch.heads.size(),
        " kv heads x head_dim ", fetch.head_dim, " ", std::string(DTypeName(fetch.dtype))));
  }
  if (fetch.page_tokens > l.block_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_ids: the session's pages hold ", fetch.page_tokens,
                     " tokens, more than the paged KV cache's block_tokens ", l.block_tokens,
                     "; use page_tokens <= block_tokens"));
  }
  const int last = fetch.first_layer + fetch.num_layers - 1;
  if (fetch.first_layer < l.first_layer || last >= l.first_layer + l.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat("block_ids: layers ", fetch.first_layer, "..", last,
                     " are not all in the buffer's paged KV cache (layers ", l.first_layer, "..",
                     l.first_layer + l.num_layers - 1, ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckBlockIds(const ResolvedKvLayout& cache, const FetchLayout& fetch,
                           const std::vector<uint32_t>& block_ids) {
  if (block_ids.empty()) return absl::InvalidArgumentError("block_ids is empty");
  for (size_t h = 0; h < fetch.heads.size(); ++h) {
    if (fetch.heads[h].slots.size() > block_ids.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("block_ids lists ", block_ids.size(), " blocks but kv head ", h, " has ",
                       fetch.heads[h].slots.size(), " pages; give one block per page"));
    }
  }
  std::unordered_set<uint32_t> seen;
  seen.reserve(block_ids.size());
  for (size_t i = 0; i < block_ids.size(); ++i) {
    if (block_ids[i] >= cache.layout.num_blocks) {
      return absl::OutOfRangeError(absl::StrCat("block_ids[", i, "] = ", block_ids[i],
                                                " is past the paged KV cache's ",
                                                cache.layout.num_blocks, " blocks"));
    }
    if (!seen.insert(block_ids[i]).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("block_ids[", i, "] = ", block_ids[i], " repeats an earlier block"));
    }
  }
  return absl::OkStatus();
}

uint32_t CopyWord(const ScatterGeometry& g, const std::vector<ScatterTask>& tasks) {
  uint64_t bits = g.row_bytes | g.kv_stride | g.token_stride;
  for (const ScatterTask& t : tasks) bits |= t.dst | (t.src == kNoSource ? 0 : t.src);
  uint32_t word = 16;
  while (word > 1 && (bits & (word - 1)) != 0) word /= 2;
  return word;
}

}  // namespace

absl::StatusOr<ScatterPlan> PlanScatter(const ResolvedKvLayout& cache, const FetchLayout& fetch,
                                        const std::vector<uint32_t>& block_ids) {
  if (absl::Status s = CheckSessionMatches(cache, fetch); !s.ok()) return s;
  if (absl::Status s = CheckBlockIds(cache, fetch, block_ids); !s.ok()) return s;
  ScatterPlan plan;
  plan.geometry.block_tokens = static_cast<uint32_t>(cache.layout.block_tokens);
  plan.geometry.page_tokens = static_cast<uint32_t>(fetch.page_tokens);
  plan.geometry.row_bytes = static_cast<uint32_t>(cache.layout.head_dim * cache.elem_bytes);
  plan.geometry.kv_stride = cache.kv_stride_bytes;
  plan.geometry.token_stride = cache.token_stride_bytes;
  plan.staged_bytes = fetch.total_bytes;
  const size_t heads = fetch.heads.size();
  plan.tasks.reserve(static_cast<size_t>(fetch.num_layers) * block_ids.size() * heads);
  for (int j = 0; j < fetch.num_layers; ++j) {
    const int layer_index = fetch.first_layer + j - cache.layout.first_layer;
    const uint64_t staged_layer = static_cast<uint64_t>(j) * fetch.layer_stride_bytes;
    for (size_t i = 0; i < block_ids.size(); ++i) {
      for (size_t h = 0; h < heads; ++h) {
        ScatterTask t;
        t.dst = cache.RowOffset(layer_index, 0, block_ids[i], 0, static_cast<int>(h));
        const std::vector<FetchSlot>& slots = fetch.heads[h].slots;
        if (i < slots.size()) {
          t.src = staged_layer + uint64_t{slots[i].slot} * fetch.frame_bytes;
          t.fill = slots[i].fill;
        } else {
          t.src = kNoSource;
        }
        plan.tasks.push_back(t);
      }
    }
  }
  plan.geometry.word_bytes = CopyWord(plan.geometry, plan.tasks);
  return plan;
}

void ScatterOnHost(const ScatterGeometry& g, const ScatterTask* tasks, size_t num_tasks,
                   const uint8_t* staging, uint8_t* dst) {
  ScatterSource src;
  src.base = staging;
  ScatterOnHost(g, tasks, num_tasks, src, dst);
}

void ScatterOnHost(const ScatterGeometry& g, const ScatterTask* tasks, size_t num_tasks,
                   const ScatterSource& source, uint8_t* dst) {
  for (size_t i = 0; i < num_tasks; ++i) {
    for (int kv = 0; kv < 2; ++kv) {
      for (uint32_t t = 0; t < g.block_tokens; ++t) {
        uint8_t* out = dst + ScatterDstRow(g, tasks[i], kv, t);
        const uint64_t src = ScatterSrcRow(g, tasks[i], kv, t);
        if (src == kNoSource) {
          std::memset(out, 0, g.row_bytes);
        } else {
          std::memcpy(out, SourceAt(source, src), g.row_bytes);
        }
      }
    }
  }
}

}  // namespace icecache
