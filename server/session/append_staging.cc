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
// Requests below reserve / kReservePieces do not take from the reserve.
constexpr uint64_t kReservePieces = 8;

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
  // Buffers hold the cache, so every piece of the reserve is back by now.
  for (const Entry& e : cached_) {
    if (!InReserveLocked(e.base)) Unmap(e.base, e.capacity);
  }
  for (const Entry& e : small_) Unmap(e.base, e.capacity);
  Unmap(reserve_base_, reserve_capacity_);
}

absl::StatusOr<double> StagingCache::Reserve(uint64_t bytes, const std::atomic<bool>* stop) {
  if (bytes == 0) return absl::InvalidArgumentError("staging reserve: 0 bytes");
  {
    absl::MutexLock l(&mu_);
    if (reserve_base_ != nullptr || reserving_) {
      return absl::FailedPreconditionError("staging reserve: already made");
    }
    reserving_ = true;
  }
  const absl::Time t0 = absl::Now();
  uint64_t capacity = bytes;
  uint8_t* base = MapHuge(&capacity);
  if (base == nullptr) {
    absl::MutexLock l(&mu_);
    reserving_ = false;
    return absl::ResourceExhaustedError(absl::StrCat("staging reserve: cannot map ", capacity,
                                                     " bytes (", std::strerror(errno), ")"));
  }
  // Fault it in a step at a time, so a shutdown stops it soon.
  constexpr uint64_t kStep = uint64_t{64} << 20;
  bool populate = true;
  for (uint64_t at = 0; at < capacity; at += kStep) {
    if (stop != nullptr && stop->load(std::memory_order_relaxed)) {
      Unmap(base, capacity);
      absl::MutexLock l(&mu_);
      reserving_ = false;
      return absl::CancelledError("staging reserve: stopped (shutdown)");
    }
    FaultInForWrite(base + at, std::min(kStep, capacity - at), &populate);
  }
  absl::MutexLock l(&mu_);
  reserving_ = false;
  reserve_base_ = base;
  reserve_capacity_ = capacity;
  cached_.push_back(Entry{base, capacity, absl::Now()});
  return absl::ToDoubleSeconds(absl::Now() - t0);
}

uint64_t StagingCache::reserve_bytes() const {
  absl::MutexLock l(&mu_);
  return reserve_capacity_;
}

StagingBuffer StagingCache::TakeKeptLocked(uint64_t bytes) {
  // The reserve serves large requests only (a prefill chunk, not a tree
  // build's key scratch), so small ones cannot cut it into pieces no chunk
  // fits.
  const bool reserve_ok = bytes >= reserve_capacity_ / kReservePieces;
  auto best = cached_.end();
  for (auto it = cached_.begin(); it != cached_.end(); ++it) {
    if (!reserve_ok && InReserveLocked(it->base)) continue;
    if (it->capacity >= bytes && (best == cached_.end() || it->capacity < best->capacity)) {
      best = it;
    }
  }
  if (best == cached_.end()) return StagingBuffer();
  Entry e = *best;
  cached_.erase(best);
  ++reuses_;
  if (!InReserveLocked(e.base)) {
    cached_bytes_ -= e.capacity;
  } else {
    // A piece of the reserve, whole 2 MiB pages; the rest stays free.
    const uint64_t take = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    if (take < e.capacity) {
      cached_.push_back(Entry{e.base + take, e.capacity - take, e.released});
      e.capacity = take;
    }
  }
  lent_bytes_ += e.capacity;
  return StagingBuffer(shared_from_this(), e.base, e.capacity, bytes);
}

absl::StatusOr<StagingBuffer> StagingCache::Acquire(uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("staging: a buffer of 0 bytes");
  const bool cacheable = bytes >= options_.min_cached_bytes;
  if (cacheable) {
    absl::MutexLock l(&mu_);
    StagingBuffer kept = TakeKeptLocked(bytes);
    if (kept.data() != nullptr) return kept;
  }
  if (!cacheable) {
    // A decode append's few KiB: the smallest kept small mapping that holds
    // them. A fresh one costs a mapping, a fault per 4 KiB page at the copy
    // and an unmap with its TLB flush, every token.
    absl::MutexLock l(&mu_);
    auto best = small_.end();
    for (auto it = small_.begin(); it != small_.end(); ++it) {
      if (it->capacity >= bytes && (best == small_.end() || it->capacity < best->capacity)) {
        best = it;
      }
    }
    if (best != small_.end()) {
      Entry e = *best;
      *best = small_.back();
      small_.pop_back();
      small_bytes_ -= e.capacity;
      ++reuses_;
      return StagingBuffer(shared_from_this(), e.base, e.capacity, bytes);
    }
  }
  uint64_t capacity = bytes;
  uint8_t* base = nullptr;
  if (cacheable && options_.huge_pages) base = MapHuge(&capacity);
  if (base == nullptr) {
    capacity = bytes;
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "cannot map ", bytes, " bytes of staging memory now (", std::strerror(errno), ")"));
    }
    base = static_cast<uint8_t*>(m);
  }
  if (cacheable) {
    absl::MutexLock l(&mu_);
    lent_bytes_ += capacity;
  }
  return StagingBuffer(shared_from_this(), base, capacity, bytes);
}

absl::StatusOr<StagingBuffer> StagingCache::AcquireWaiting(uint64_t bytes, absl::Time until,
                                                           const std::function<bool()>& stop) {
  if (bytes >= options_.min_cached_bytes) {
    // Checked at least this often for `stop` (a drain, a shutdown).
    constexpr absl::Duration kStopPoll = absl::Milliseconds(50);
    absl::Time started = absl::InfinitePast();
    while (true) {
      // `stop` takes its owner's locks: asked outside this cache's. A
      // buffer returned meanwhile is found below, under the same lock the
      // wait is entered with, so no return is missed.
      const bool stopped = started != absl::InfinitePast() && stop && stop();
      absl::MutexLock l(&mu_);
      StagingBuffer kept = TakeKeptLocked(bytes);
      if (kept.data() != nullptr) {
        AddWaitLocked(started);
        return kept;
      }
      if (lent_bytes_ == 0 || lent_bytes_ + bytes <= LendBoundLocked(bytes)) {
        AddWaitLocked(started);
        break;  // room under the bound: map fresh
      }
      const absl::Time now = absl::Now();
      if (started == absl::InfinitePast()) {
        if (now >= until) break;
        started = now;
        ++wait_stats_.waits;
      } else if (now >= until || stopped) {
        ++wait_stats_.expired;
        AddWaitLocked(started);
        break;
      }
      returned_.WaitWithDeadline(&mu_, std::min(until, now + kStopPoll));
    }
  }
  return Acquire(bytes);
}

void StagingCache::AddWaitLocked(absl::Time started) {
  if (started != absl::InfinitePast()) {
    wait_stats_.seconds += absl::ToDoubleSeconds(absl::Now() - started);
  }
}

uint64_t StagingCache::LendBoundLocked(uint64_t bytes) const {
  // A reserve that holds two such requests bounds them by itself: one chunk
  // builds while the next waits its turn in the builder's queue, so the
  // builder never idles for want of staging.
  if (reserve_capacity_ >= 2 * bytes) return reserve_capacity_;
  return std::max(reserve_capacity_, options_.max_cached_bytes);
}

uint64_t StagingCache::lend_bound(uint64_t bytes) const {
  absl::MutexLock l(&mu_);
  return LendBoundLocked(bytes);
}

uint64_t StagingCache::lent_bytes() const {
  absl::MutexLock l(&mu_);
  return lent_bytes_;
}

StagingCache::WaitStats StagingCache::wait_stats() const {
  absl::MutexLock l(&mu_);
  return wait_stats_;
}

void StagingCache::Release(uint8_t* base, uint64_t capacity) {
  {
    absl::MutexLock l(&mu_);
    if (InReserveLocked(base) || capacity >= options_.min_cached_bytes) {
      lent_bytes_ -= std::min(lent_bytes_, capacity);
      returned_.SignalAll();
    }
    if (InReserveLocked(base)) {
      // Merge with the free pieces on either side.
      Entry merged{base, capacity, absl::Now()};
      for (size_t i = 0; i < cached_.size();) {
        const Entry& e = cached_[i];
        if (InReserveLocked(e.base) &&
            (e.base + e.capacity == merged.base || merged.base + merged.capacity == e.base)) {
          merged.base = std::min(merged.base, e.base);
          merged.capacity += e.capacity;
          cached_[i] = cached_.back();
          cached_.pop_back();
        } else {
          ++i;
        }
      }
      cached_.push_back(merged);
      return;
    }
    if (capacity < options_.min_cached_bytes) {
      if (small_.size() < kSmallKept && options_.max_cached_bytes > 0) {
        small_.push_back(Entry{base, capacity, absl::Now()});
        small_bytes_ += capacity;
        return;
      }
    } else if (cached_bytes_ + capacity <= options_.max_cached_bytes) {
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
    const uint8_t* r0 = reserve_base_;
    const uint8_t* r1 = reserve_base_ + reserve_capacity_;
    auto keep = std::partition(cached_.begin(), cached_.end(), [&](const Entry& e) {
      return e.released > cutoff || (e.base >= r0 && e.base < r1);
    });
    drop.assign(keep, cached_.end());
    cached_.erase(keep, cached_.end());
    for (const Entry& e : drop) cached_bytes_ -= e.capacity;
    auto small_keep = std::partition(small_.begin(), small_.end(),
                                     [&](const Entry& e) { return e.released > cutoff; });
    for (auto it = small_keep; it != small_.end(); ++it) {
      small_bytes_ -= it->capacity;
      drop.push_back(*it);
    }
    small_.erase(small_keep, small_.end());
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

uint64_t StagingCache::small_cached_bytes() const {
  absl::MutexLock l(&mu_);
  return small_bytes_;
}

uint64_t StagingCache::reuses() const {
  absl::MutexLock l(&mu_);
  return reuses_;
}

}  // namespace icecache
