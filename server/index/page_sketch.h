// PageSketch: a compact copy of a selector's keys for ranking pages, int8
// codes with one fp32 scale per row (symmetric, scale = max |x| / 127), kept
// per page in page id order like the frames. mdci with
// MdciParams::sketch_scoring scores its candidate pages from it instead of
// the fp16 frames (docs/architecture.md §3.4): half the bytes read per
// candidate key (d + 4 instead of 2d) for logits within half a code step
// per element, at d + 4 bytes per token of memory beside the frames.
//
// It is derived from the keys only: Write() quantises the keys a Build or
// Insert places (rounded through the frames' dtype first, so they are the
// values the frames hold), and Rebuild() reads the frames back, which gives
// the same codes (after a warm restart the image does not carry it).
//
// Ownership: owns its storage, in blocks of kPagesPerBlock pages that never
// move (an insert allocates at most one new block, no reallocation of what
// is held).
// Thread safety: codes()/scales() may run concurrently with each other;
// Write() and Rebuild() need exclusive access (the selector's writer lock).
#ifndef ICECACHE_SERVER_INDEX_PAGE_SKETCH_H_
#define ICECACHE_SERVER_INDEX_PAGE_SKETCH_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "common/dtype.h"
#include "server/index/selector.h"

namespace icecache {

class PageSketch {
 public:
  static constexpr uint32_t kPagesPerBlock = 64;

  // dim in [1, 1024], page_tokens in [1, 256] (a validated selector config).
  PageSketch(int dim, int page_tokens);

  // Quantises row i of `keys` (fp32, placements.size() x dim), first
  // rounded to `dtype`, into placements[i]'s slot; opens pages as needed.
  void Write(const std::vector<Placement>& placements, const float* keys, DType dtype);

  // Opens pages up to `pages` (zero rows): the selector's tree may hold
  // pages no placement has named yet.
  void CoverPages(uint32_t pages) { EnsurePages(pages); }

  // Re-derives every page's first fill(page) rows from the frames of
  // `keys`. FailedPrecondition when a page with rows has no frame.
  absl::Status Rebuild(const PageKeys& keys, DType dtype, uint32_t num_pages,
                       const std::function<uint32_t(uint32_t)>& fill);

  // page_tokens x dim codes and page_tokens scales of a page < num_pages().
  const int8_t* codes(uint32_t page) const {
    return blocks_[page / kPagesPerBlock].codes.get() +
           static_cast<size_t>(page % kPagesPerBlock) * page_bytes_;
  }
  const float* scales(uint32_t page) const {
    return blocks_[page / kPagesPerBlock].scales.get() +
           static_cast<size_t>(page % kPagesPerBlock) * page_tokens_;
  }
  uint32_t num_pages() const { return num_pages_; }
  size_t bytes() const;

  // Symmetric int8 quantisation of one row: codes[c] = round(x[c] / scale)
  // in [-127, 127]; returns scale = max |x| / 127 (0 for a zero row, whose
  // codes are 0). |x[c] - codes[c] * scale| <= scale / 2 (plus rounding).
  static float QuantizeRow(const float* x, int dim, int8_t* codes);

 private:
  struct Block {
    std::unique_ptr<int8_t[]> codes;
    std::unique_ptr<float[]> scales;
  };
  void EnsurePages(uint32_t pages);
  int8_t* mutable_codes(uint32_t page) { return const_cast<int8_t*>(codes(page)); }
  float* mutable_scales(uint32_t page) { return const_cast<float*>(scales(page)); }

  int dim_;
  int page_tokens_;
  size_t page_bytes_;  // page_tokens x dim
  uint32_t num_pages_ = 0;
  std::vector<Block> blocks_;
  std::vector<float> row_;  // Write's scratch: one key rounded to the dtype
  std::vector<uint8_t> raw_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_PAGE_SKETCH_H_
