#include "server/session/append_staging.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/aligned_mapping.h"

namespace icecache {
namespace {

constexpr uint64_t kHugePage = uint64_t{2} << 20;

void Unmap(uint8_t* base, uint64_t capacity) {
  if (base != nullptr) munmap(base, capacity);
}

// `*capacity` bytes (rounded up to whole huge pages) starting on a huge-page
// boundary, advised MADV_HUGEPAGE; null when the mapping fails. The slack
// mapped for the alignment is unmapped, so Unmap(base, *capacity) frees all.
uint8_t* MapHuge(uint64_t* capacity) {
  const uint64_t bytes = (*capacity + kHugePage - 1) / kHugePage * kHugePage;
  uint8_t* base = MapAligned(bytes, kHugePage);
  if (base == nullptr) return nullptr;
  madvise(base, bytes, MADV_HUGEPAGE);  // advice only
  *capacity = bytes;
  return base;
}

}  // namespace

StagingBuffer::~StagingBuffer() { Release(); }

StagingBuffer::StagingBuffer(StagingBuffer&& other) noexcept
    : cache_(std::move(other.cache_)),
      base_(std::exchange(other.base_, nullptr)),
      capacity_(std::exchange(other.capacity_, 0)),
      size_(std::exchange(other.size_, 0)) {}

StagingBuffer& StagingBuffer::operator=(StagingBuffer&& other) noexcept {
  if (this != &other) {
    Release();
    cache_ = std::move(other.cache_);
    base_ = std::exchange(other.base_, nullptr);
    capacity_ = std::exchange(other.capacity_, 0);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void StagingBuffer::Release() {
  if (base_ == nullptr) return;
  if (cache_ != nullptr) {
    cache_->Release(base_, capacity_);
  } else {
    Unmap(base_, capacity_);
  }
  cache_.reset();
  base_ = nullptr;
  capacity_ = size_ = 0;
}

std::shared_ptr<StagingCache> StagingCache::Create(const StagingCacheOptions& options) {
  return std::shared_ptr<StagingCache>(new StagingCache(options));
}

StagingCache::~StagingCache() {
  absl::MutexLock l(&mu_);
  for (const Entry& e : cached_) Unmap(e.base, e.capacity);
}

absl::StatusOr<StagingBuffer> StagingCache::Acquire(uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("staging: a buffer of 0 bytes");
  const bool cacheable = bytes >= options_.min_cached_bytes;
  if (cacheable) {
    absl::MutexLock l(&mu_);
    auto best = cached_.end();
    for (auto it = cached_.begin(); it != cached_.end(); ++it) {
      if (it->capacity >= bytes && (best == cached_.end() || it->capacity < best->capacity)) {
        best = it;
      }
    }
    if (best != cached_.end()) {
      const Entry e = *best;
      cached_.erase(best);
      cached_bytes_ -= e.capacity;
      ++reuses_;
      return StagingBuffer(shared_from_this(), e.base, e.capacity, bytes);
    }
  }
  if (cacheable && options_.huge_pages) {
    uint64_t capacity = bytes;
    if (uint8_t* base = MapHuge(&capacity)) {
      return StagingBuffer(shared_from_this(), base, capacity, bytes);
    }
  }
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot map ", bytes, " bytes of staging memory now (", std::strerror(errno), ")"));
  }
  return StagingBuffer(cacheable ? shared_from_this() : nullptr, static_cast<uint8_t*>(base), bytes,
                       bytes);
}

void StagingCache::Release(uint8_t* base, uint64_t capacity) {
  {
    absl::MutexLock l(&mu_);
    if (cached_bytes_ + capacity <= options_.max_cached_bytes) {
      cached_.push_back(Entry{base, capacity, absl::Now()});
      cached_bytes_ += capacity;
      return;
    }
  }
  Unmap(base, capacity);
}

uint64_t StagingCache::Trim(absl::Duration idle) {
  std::vector<Entry> drop;
  {
    absl::MutexLock l(&mu_);
    const absl::Time cutoff = absl::Now() - idle;
    auto keep = std::partition(cached_.begin(), cached_.end(),
                               [cutoff](const Entry& e) { return e.released > cutoff; });
    drop.assign(keep, cached_.end());
    cached_.erase(keep, cached_.end());
    for (const Entry& e : drop) cached_bytes_ -= e.capacity;
  }
  uint64_t freed = 0;
  for (const Entry& e : drop) {
    Unmap(e.base, e.capacity);
    freed += e.capacity;
  }
  return freed;
}

uint64_t StagingCache::cached_bytes() const {
  absl::MutexLock l(&mu_);
  return cached_bytes_;
}

uint64_t StagingCache::reuses() const {
  absl::MutexLock l(&mu_);
  return reuses_;
}

}  // namespace icecache
