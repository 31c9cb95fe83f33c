#include "server/transfer/gather.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"

namespace icecache {

uint32_t FetchLayout::total_slots() const {
  return frame_bytes == 0 ? 0 : static_cast<uint32_t>(layer_stride_bytes / frame_bytes);
}

uint64_t PageGeometry::frame_bytes() const {
  return 2 * static_cast<uint64_t>(page_tokens) * static_cast<uint64_t>(head_dim) *
         DTypeSize(dtype);
}

absl::StatusOr<FetchLayout> PlanFetchLayout(const PageGeometry& geometry, int first_layer,
                                            int num_layers,
                                            const std::vector<std::vector<uint32_t>>& pages,
                                            const std::vector<std::vector<uint32_t>>& fills,
                                            uint64_t buffer_offset, uint64_t buffer_size) {
  if (geometry.page_tokens < 1 || geometry.page_tokens > 256 || geometry.head_dim < 1 ||
      geometry.head_dim > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("fetch: bad page geometry page_tokens=", geometry.page_tokens,
                     " head_dim=", geometry.head_dim));
  }
  if (num_layers < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("fetch: num_layers must be >= 1, got ", num_layers));
  }
  if (first_layer < 0) {
    return absl::InvalidArgumentError(absl::StrCat("fetch: layer must be >= 0, got ", first_layer));
  }
  if (pages.size() != fills.size()) {
    return absl::InvalidArgumentError("fetch: pages and fills differ in head count");
  }
  FetchLayout layout;
  layout.first_layer = first_layer;
  layout.num_layers = num_layers;
  layout.page_tokens = geometry.page_tokens;
  layout.head_dim = geometry.head_dim;
  layout.dtype = geometry.dtype;
  layout.frame_bytes = geometry.frame_bytes();
  layout.buffer_offset = buffer_offset;
  uint64_t slots = 0;
  for (size_t h = 0; h < pages.size(); ++h) {
    if (pages[h].size() != fills[h].size()) {
      return absl::InvalidArgumentError(absl::StrCat("fetch: head ", h, " has ", pages[h].size(),
                                                     " pages but ", fills[h].size(), " fills"));
    }
    slots += pages[h].size();
  }
  // slots <= total vector sizes, so slots * frame_bytes can only overflow for
  // absurd requests; check anyway.
  const uint64_t kMax = std::numeric_limits<uint64_t>::max();
  if (slots > std::numeric_limits<uint32_t>::max() ||
      (slots > 0 && layout.frame_bytes > kMax / slots)) {
    return absl::OutOfRangeError(absl::StrCat("fetch of ", slots, " pages overflows"));
  }
  layout.layer_stride_bytes = slots * layout.frame_bytes;
  if (layout.layer_stride_bytes > 0 &&
      static_cast<uint64_t>(num_layers) > kMax / layout.layer_stride_bytes) {
    return absl::OutOfRangeError("fetch size overflows");
  }
  layout.total_bytes = layout.layer_stride_bytes * static_cast<uint64_t>(num_layers);
  if (buffer_offset > buffer_size || layout.total_bytes > buffer_size - buffer_offset) {
    return absl::OutOfRangeError(absl::StrCat("fetch of ", layout.total_bytes, " bytes at offset ",
                                              buffer_offset, " exceeds buffer size ", buffer_size));
  }
  layout.heads.resize(pages.size());
  uint32_t slot = 0;
  for (size_t h = 0; h < pages.size(); ++h) {
    FetchHeadLayout& head = layout.heads[h];
    head.kv_head = static_cast<int>(h);
    head.slots.reserve(pages[h].size());
    for (size_t i = 0; i < pages[h].size(); ++i) {
      if (fills[h][i] > static_cast<uint32_t>(geometry.page_tokens)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "fetch: fill ", fills[h][i], " exceeds page_tokens ", geometry.page_tokens));
      }
      head.slots.push_back(FetchSlot{pages[h][i], slot, fills[h][i],
                                     buffer_offset + uint64_t{slot} * layout.frame_bytes});
      ++slot;
    }
  }
  return layout;
}

void GatherFrames(const uint8_t* const* frames, size_t count, uint64_t frame_bytes, uint8_t* dst) {
  for (size_t i = 0; i < count; ++i) {
    std::memcpy(dst + i * frame_bytes, frames[i], frame_bytes);
  }
}

namespace {

// Asks for the cache lines of one token's K and V rows.
void PrefetchRows(const RowSource& r, uint64_t row_bytes, uint64_t block) {
  const uint8_t* k = r.frame + uint64_t{r.slot} * row_bytes;
  for (uint64_t off = 0; off < row_bytes; off += 64) {
    __builtin_prefetch(k + off);
    __builtin_prefetch(k + block + off);
  }
}

}  // namespace

namespace {

// Copies token i's K and V rows to packed row index to(i).
template <typename To>
void CopyRows(const RowSource* rows, size_t count, To to, size_t page_tokens, uint64_t row_bytes,
              uint8_t* dst, int prefetch_ahead) {
  const size_t t = page_tokens;
  const uint64_t block = t * row_bytes;  // one K (or V) block
  const size_t ahead = prefetch_ahead > 0 ? static_cast<size_t>(prefetch_ahead) : 0;
  for (size_t i = 0; i < std::min(ahead, count); ++i) PrefetchRows(rows[i], row_bytes, block);
  for (size_t i = 0; i < count; ++i) {
    if (ahead > 0 && i + ahead < count) PrefetchRows(rows[i + ahead], row_bytes, block);
    const size_t r = to(i);
    uint8_t* slot = dst + (r / t) * 2 * block;
    const uint64_t row = (r % t) * row_bytes;
    const uint64_t src = uint64_t{rows[i].slot} * row_bytes;
    std::memcpy(slot + row, rows[i].frame + src, row_bytes);
    std::memcpy(slot + block + row, rows[i].frame + block + src, row_bytes);
  }
}

// Zeroes the rows of the last slot past `total` tokens.
void ZeroTail(size_t total, size_t page_tokens, uint64_t row_bytes, uint8_t* dst) {
  const size_t t = page_tokens;
  const uint64_t block = t * row_bytes;
  const size_t rem = total % t;
  if (rem == 0) return;
  uint8_t* slot = dst + (total / t) * 2 * block;
  std::memset(slot + rem * row_bytes, 0, (t - rem) * row_bytes);
  std::memset(slot + block + rem * row_bytes, 0, (t - rem) * row_bytes);
}

}  // namespace

void GatherRows(const RowSource* rows, size_t count, int page_tokens, uint64_t row_bytes,
                uint8_t* dst, int prefetch_ahead) {
  const size_t t = static_cast<size_t>(page_tokens);
  CopyRows(
      rows, count, [](size_t i) { return i; }, t, row_bytes, dst, prefetch_ahead);
  ZeroTail(count, t, row_bytes, dst);
}

void GatherRowsTo(const RowSource* rows, const uint32_t* to, size_t count, size_t total,
                  int page_tokens, uint64_t row_bytes, uint8_t* dst, int prefetch_ahead) {
  const size_t t = static_cast<size_t>(page_tokens);
  CopyRows(
      rows, count, [to](size_t i) { return static_cast<size_t>(to[i]); }, t, row_bytes, dst,
      prefetch_ahead);
  ZeroTail(total, t, row_bytes, dst);
}

}  // namespace icecache
