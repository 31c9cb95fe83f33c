#include "server/index/owned_page_keys.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <new>

#include "absl/strings/str_cat.h"
#include "common/aligned_mapping.h"
#include "common/status_macros.h"

namespace icecache {

OwnedPageKeys::OwnedPageKeys(int head_dim, DType dtype, int page_tokens, bool with_values)
    : head_dim_(head_dim),
      dtype_(dtype),
      page_tokens_(page_tokens),
      with_values_(with_values),
      elem_bytes_(DTypeSize(dtype)) {}

absl::StatusOr<std::unique_ptr<OwnedPageKeys>> OwnedPageKeys::Create(int head_dim, DType dtype,
                                                                     int page_tokens,
                                                                     bool with_values) {
  if (head_dim < 1 || head_dim > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("OwnedPageKeys head_dim must be in [1, 1024], got ", head_dim));
  }
  if (page_tokens < 1 || page_tokens > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("OwnedPageKeys page_tokens must be in [1, 256], got ", page_tokens));
  }
  if (dtype != DType::kF16 && dtype != DType::kBF16 && dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat("OwnedPageKeys dtype is unknown (value ", static_cast<int>(dtype), ")"));
  }
  return std::unique_ptr<OwnedPageKeys>(
      new OwnedPageKeys(head_dim, dtype, page_tokens, with_values));
}

absl::StatusOr<std::unique_ptr<OwnedPageKeys>> OwnedPageKeys::ForSelector(
    const SelectorConfig& config, bool with_values) {
  return Create(config.head_dim, config.dtype, config.page_tokens, with_values);
}

namespace {
constexpr size_t kSlabBytes = size_t{2} << 20;  // one transparent huge page
}  // namespace

void OwnedPageKeys::FreeSlab::operator()(uint8_t* p) const { munmap(p, kSlabBytes); }

uint8_t* OwnedPageKeys::SlabArena::NewPage(size_t page_bytes) {
  if (slabs.empty() || used + page_bytes > kSlabBytes) {
    // page_bytes <= 256 x 1024 x 4 = 1 MiB, so a page always fits a slab.
    // A fresh anonymous mapping is zero and committed only as pages are
    // written (no 2 MiB memset on the append that opens a slab), and
    // 2 MiB-aligned.
    uint8_t* slab = MapAligned(kSlabBytes, kSlabBytes);
    if (slab == nullptr) throw std::bad_alloc();  // as make_unique would
    madvise(slab, kSlabBytes, MADV_HUGEPAGE);     // advice only
    slabs.emplace_back(slab);
    used = 0;
  }
  uint8_t* page = slabs.back().get() + used;
  used += page_bytes;
  pages.push_back(page);
  return page;
}

size_t OwnedPageKeys::page_bytes() const {
  return static_cast<size_t>(page_tokens_) * head_dim_ * elem_bytes_;
}

absl::Status OwnedPageKeys::Apply(const std::vector<Placement>& placements, const float* keys,
                                  const float* values) {
  if (placements.empty()) return absl::OkStatus();
  if (keys == nullptr) return absl::InvalidArgumentError("keys must not be null");
  if (with_values_ && values == nullptr) {
    return absl::InvalidArgumentError("this OwnedPageKeys holds values: values must not be null");
  }
  const uint64_t page_limit = static_cast<uint64_t>(keys_.pages.size()) + placements.size();
  uint32_t max_page = 0;
  for (size_t i = 0; i < placements.size(); ++i) {
    const Placement& p = placements[i];
    if (p.slot >= static_cast<uint32_t>(page_tokens_) || p.page >= page_limit) {
      return absl::InvalidArgumentError(absl::StrCat(
          "placement ", i, " (page ", p.page, ", slot ", p.slot, ") is out of range: slots < ",
          page_tokens_, ", pages < ", page_limit, " for this batch"));
    }
    max_page = std::max(max_page, p.page);
  }
  const size_t bytes = page_bytes();
  while (keys_.pages.size() <= max_page) {
    keys_.NewPage(bytes);
    if (with_values_) values_.NewPage(bytes);
  }
  const size_t row_bytes = static_cast<size_t>(head_dim_) * elem_bytes_;
  for (size_t i = 0; i < placements.size(); ++i) {
    const Placement& p = placements[i];
    const size_t offset = p.slot * row_bytes;
    FromFloat(dtype_, keys + i * head_dim_, keys_.pages[p.page] + offset, head_dim_);
    if (with_values_) {
      FromFloat(dtype_, values + i * head_dim_, values_.pages[p.page] + offset, head_dim_);
    }
  }
  return absl::OkStatus();
}

const void* OwnedPageKeys::page_keys(uint32_t page) const {
  return page < keys_.pages.size() ? keys_.pages[page] : nullptr;
}

const void* OwnedPageKeys::page_values(uint32_t page) const {
  return with_values_ && page < values_.pages.size() ? values_.pages[page] : nullptr;
}

absl::Status OwnedPageKeys::CheckAt(Placement at) const {
  if (at.page >= keys_.pages.size() || at.slot >= static_cast<uint32_t>(page_tokens_)) {
    return absl::OutOfRangeError(absl::StrCat("(page ", at.page, ", slot ", at.slot,
                                              ") does not exist: ", keys_.pages.size(),
                                              " pages of ", page_tokens_, " slots"));
  }
  return absl::OkStatus();
}

absl::Status OwnedPageKeys::ReadKey(Placement at, float* out) const {
  RETURN_IF_ERROR(CheckAt(at));
  const size_t row_bytes = static_cast<size_t>(head_dim_) * elem_bytes_;
  ToFloat(dtype_, keys_.pages[at.page] + at.slot * row_bytes, out, head_dim_);
  return absl::OkStatus();
}

absl::Status OwnedPageKeys::ReadValue(Placement at, float* out) const {
  if (!with_values_) {
    return absl::FailedPreconditionError("this OwnedPageKeys was created without values");
  }
  RETURN_IF_ERROR(CheckAt(at));
  const size_t row_bytes = static_cast<size_t>(head_dim_) * elem_bytes_;
  ToFloat(dtype_, values_.pages[at.page] + at.slot * row_bytes, out, head_dim_);
  return absl::OkStatus();
}

size_t OwnedPageKeys::bytes() const {
  return (keys_.pages.size() + values_.pages.size()) * page_bytes();
}

}  // namespace icecache
