// OwnedPageKeys: an owner of page frames for tests, benchmarks and tools,
// standing in for a session's pool frames. It holds, per page, page_tokens x
// head_dim keys (and optionally values) in the configured dtype, writes new
// tokens where a selector's Placements say, and gives the selector read access
// to the keys through PageKeys.
//
// Pages are carved in id order out of 2 MiB slabs advised for transparent
// huge pages, as the daemon's pool frames sit in a huge-page arena
// (server/pool/page_pool.h): page reads cost what they cost there, not a
// 4 KiB page walk each (docs/architecture.md §3.4).
//
// Ownership: owns all page storage; pointers returned by page_keys() and
// page_values() stay valid until the object is destroyed (pages never move,
// even when more pages are added).
// Thread safety: the const readers may run concurrently with each other; Apply()
// needs exclusive access (the same writer lock as the selector's Insert()).
#ifndef ICECACHE_SERVER_INDEX_OWNED_PAGE_KEYS_H_
#define ICECACHE_SERVER_INDEX_OWNED_PAGE_KEYS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "server/index/selector.h"

namespace icecache {

class OwnedPageKeys final : public PageKeys {
 public:
  // InvalidArgument for head_dim outside [1, 1024], page_tokens outside
  // [1, 256] or an unknown dtype.
  static absl::StatusOr<std::unique_ptr<OwnedPageKeys>> Create(int head_dim, DType dtype,
                                                               int page_tokens,
                                                               bool with_values = false);
  // Same shape as a selector's config.
  static absl::StatusOr<std::unique_ptr<OwnedPageKeys>> ForSelector(const SelectorConfig& config,
                                                                    bool with_values = false);

  OwnedPageKeys(const OwnedPageKeys&) = delete;
  OwnedPageKeys& operator=(const OwnedPageKeys&) = delete;

  // Writes row i of `keys` (fp32, placements.size() x head_dim) converted to
  // the dtype at placements[i]; likewise `values` when this owner holds
  // values. Page ids are dense: a batch may open pages up to
  // num_pages() + placements.size() - 1; new pages start zeroed.
  // InvalidArgument for null keys (or null values when values are held),
  // a slot >= page_tokens or a page id beyond that range; on error nothing is
  // written.
  absl::Status Apply(const std::vector<Placement>& placements, const float* keys,
                     const float* values = nullptr);

  // PageKeys: nullptr for a page that does not exist.
  const void* page_keys(uint32_t page) const override;
  // nullptr for a page that does not exist or when no values are held.
  const void* page_values(uint32_t page) const;

  // The key / value at `at` converted to fp32 (head_dim floats into `out`).
  // OutOfRange for a page or slot that does not exist; FailedPrecondition for
  // ReadValue() when no values are held.
  absl::Status ReadKey(Placement at, float* out) const;
  absl::Status ReadValue(Placement at, float* out) const;

  uint32_t num_pages() const { return static_cast<uint32_t>(keys_.pages.size()); }
  int head_dim() const { return head_dim_; }
  DType dtype() const { return dtype_; }
  int page_tokens() const { return page_tokens_; }
  bool has_values() const { return with_values_; }
  // Bytes of page storage held (K, plus V when held).
  size_t bytes() const;

 private:
  OwnedPageKeys(int head_dim, DType dtype, int page_tokens, bool with_values);
  struct FreeSlab {
    void operator()(uint8_t* p) const;
  };
  // Pages handed out in order from `slabs` (`used` bytes of the last one).
  struct SlabArena {
    std::vector<std::unique_ptr<uint8_t, FreeSlab>> slabs;
    size_t used = 0;
    std::vector<uint8_t*> pages;
    uint8_t* NewPage(size_t page_bytes);  // zeroed
  };
  size_t page_bytes() const;
  absl::Status CheckAt(Placement at) const;

  const int head_dim_;
  const DType dtype_;
  const int page_tokens_;
  const bool with_values_;
  const size_t elem_bytes_;
  SlabArena keys_;
  SlabArena values_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_OWNED_PAGE_KEYS_H_
