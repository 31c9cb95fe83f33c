#include "server/index/page_sketch.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace icecache {

PageSketch::PageSketch(int dim, int page_tokens)
    : dim_(dim),
      page_tokens_(page_tokens),
      page_bytes_(static_cast<size_t>(page_tokens) * dim),
      row_(dim),
      raw_(static_cast<size_t>(dim) * sizeof(float)) {}

float PageSketch::QuantizeRow(const float* x, int dim, int8_t* codes) {
  float m = 0.0f;
  for (int c = 0; c < dim; ++c) m = std::max(m, std::fabs(x[c]));
  if (!(m > 0.0f) || !std::isfinite(m)) {
    std::fill(codes, codes + dim, int8_t{0});
    return 0.0f;
  }
  const float inv = 127.0f / m;
  for (int c = 0; c < dim; ++c) {
    const float v = std::nearbyint(x[c] * inv);
    codes[c] = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
  }
  return m / 127.0f;
}

void PageSketch::EnsurePages(uint32_t pages) {
  while (static_cast<size_t>(blocks_.size()) * kPagesPerBlock < pages) {
    Block b;
    b.codes.reset(new int8_t[page_bytes_ * kPagesPerBlock]());
    b.scales.reset(new float[static_cast<size_t>(page_tokens_) * kPagesPerBlock]());
    blocks_.push_back(std::move(b));
  }
  num_pages_ = std::max(num_pages_, pages);
}

void PageSketch::Write(const std::vector<Placement>& placements, const float* keys, DType dtype) {
  uint32_t need = num_pages_;
  for (const Placement& p : placements) need = std::max(need, p.page + 1);
  EnsurePages(need);
  for (size_t i = 0; i < placements.size(); ++i) {
    // The value the frame holds.
    const float* row =
        RoundThrough(dtype, keys + i * static_cast<size_t>(dim_), raw_.data(), row_.data(), dim_);
    const Placement& at = placements[i];
    int8_t* codes = mutable_codes(at.page) + static_cast<size_t>(at.slot) * dim_;
    mutable_scales(at.page)[at.slot] = QuantizeRow(row, dim_, codes);
  }
}

absl::Status PageSketch::Rebuild(const PageKeys& keys, DType dtype, uint32_t num_pages,
                                 const std::function<uint32_t(uint32_t)>& fill) {
  EnsurePages(num_pages);
  const size_t row_bytes = static_cast<size_t>(dim_) * DTypeSize(dtype);
  for (uint32_t page = 0; page < num_pages; ++page) {
    const uint32_t rows = fill(page);
    if (rows == 0) continue;
    const auto* frame = static_cast<const uint8_t*>(keys.page_keys(page));
    if (frame == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("page ", page, " holds ", rows, " keys but has no frame to read"));
    }
    int8_t* codes = mutable_codes(page);
    float* scales = mutable_scales(page);
    for (uint32_t slot = 0; slot < rows; ++slot) {
      ToFloat(dtype, frame + slot * row_bytes, row_.data(), dim_);
      scales[slot] = QuantizeRow(row_.data(), dim_, codes + static_cast<size_t>(slot) * dim_);
    }
  }
  return absl::OkStatus();
}

size_t PageSketch::bytes() const {
  return blocks_.size() * kPagesPerBlock * (page_bytes_ + page_tokens_ * sizeof(float));
}

}  // namespace icecache
