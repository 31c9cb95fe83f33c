// Internal to icecache_session: the private memory an append's bytes are
// copied into before anything reads them (docs/architecture.md §5).
//
// A prefill appends hundreds of MiB per call. A fresh mapping of that size
// takes a page fault per 4 KiB at first touch, about ten times the cost of
// the copy itself on the machines we measured (docs/bench/prefill.md), and a
// background build used to copy the bytes once more into its job. So the
// bytes are copied once, into a `StagingBuffer` that the append, and then its
// background build, owns; a released buffer goes back to its `StagingCache`
// for the next append, up to a byte bound, and is unmapped once idle.
#ifndef ICECACHE_SERVER_SESSION_APPEND_STAGING_H_
#define ICECACHE_SERVER_SESSION_APPEND_STAGING_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace icecache {

class StagingCache;

// `size()` bytes of private, writable memory (a mapping of at least that
// many bytes). Move-only; on destruction the mapping returns to the cache it
// came from, or is unmapped. Not thread-safe (one owner at a time).
class StagingBuffer {
 public:
  StagingBuffer() = default;
  ~StagingBuffer();
  StagingBuffer(StagingBuffer&& other) noexcept;
  StagingBuffer& operator=(StagingBuffer&& other) noexcept;
  StagingBuffer(const StagingBuffer&) = delete;
  StagingBuffer& operator=(const StagingBuffer&) = delete;

  uint8_t* data() const { return base_; }
  uint64_t size() const { return size_; }
  uint64_t capacity() const { return capacity_; }

 private:
  friend class StagingCache;
  StagingBuffer(std::shared_ptr<StagingCache> cache, uint8_t* base, uint64_t capacity,
                uint64_t size)
      : cache_(std::move(cache)), base_(base), capacity_(capacity), size_(size) {}
  void Release();

  std::shared_ptr<StagingCache> cache_;  // null: unmapped on release
  uint8_t* base_ = nullptr;
  uint64_t capacity_ = 0;
  uint64_t size_ = 0;
};

struct StagingCacheOptions {
  // Bytes of released buffers kept for later appends (0: none kept).
  uint64_t max_cached_bytes = uint64_t{1} << 30;
  // Requests below this size are small: they never take a cached buffer nor
  // a piece of the reserve. Up to kSmallKept released small mappings are kept
  // apart for the next small request (a decode append's few KiB, every
  // token: a fresh mapping cost an mmap, a fault per 4 KiB page at the copy
  // and an munmap with its TLB flush each time).
  uint64_t min_cached_bytes = uint64_t{4} << 20;
  // Cacheable buffers are mapped 2 MiB-aligned, rounded up to whole 2 MiB,
  // and advised MADV_HUGEPAGE (transparent huge pages where the kernel's THP
  // mode is "madvise" or "always"): a prefill chunk of 512 MiB then takes
  // 256 faults instead of 131072. Where a fault is a trip through the
  // hypervisor (a paravirtualised guest: docs/operations.md "Memory the host
  // backs lazily") that is the difference between 1.6 s and 0.05-1.0 s per
  // 512 MiB. The daemon sets it with its pool's huge pages (pool.prefault or
  // pool.huge_pages), so the same operator choice covers both.
  bool huge_pages = false;
};

// Thread-safe. Buffers hold a reference to their cache, so the cache lives
// until the last buffer is gone: make it with `Create`.
class StagingCache : public std::enable_shared_from_this<StagingCache> {
 public:
  static std::shared_ptr<StagingCache> Create(const StagingCacheOptions& options);
  ~StagingCache();
  StagingCache(const StagingCache&) = delete;
  StagingCache& operator=(const StagingCache&) = delete;

  // A buffer of `bytes` (> 0): the smallest cached one that holds them (a
  // small request: the smallest kept small one), else a fresh mapping. ResourceExhausted (naming
  // the size) when the mapping fails. The contents are unspecified: the caller overwrites them.
  absl::StatusOr<StagingBuffer> Acquire(uint64_t bytes);
  // Acquire for an append's copy of a client's bytes (a prefill chunk),
  // with back-pressure. A client that sends chunks faster than their trees
  // build would otherwise have every queued chunk hold fresh staging: memory
  // without bound, and each chunk's first touches (on a host that backs
  // memory lazily, 0.2 s of faults per 128 MiB: docs/bench/staging59.md).
  // So where no kept buffer fits and the large buffers lent out plus this
  // one would pass lend_bound(), it waits for one to come back (a build that
  // finished), until `until` passes or `stop()` turns true, then maps fresh
  // memory as Acquire does. It never waits while nothing large is lent (a
  // request above the bound alone is served at once). Never call it from a
  // build: the builds are what returns staging.
  absl::StatusOr<StagingBuffer> AcquireWaiting(uint64_t bytes, absl::Time until,
                                               const std::function<bool()>& stop);
  // Large buffers lent at once before AcquireWaiting waits for a request of
  // `bytes`: the reserve where it holds two such requests (the pieces were
  // faulted in at start), else the larger of the reserve and
  // max_cached_bytes (what the cache keeps anyway).
  uint64_t lend_bound(uint64_t bytes) const;
  // Capacity of the large buffers (and reserve pieces) handed out and not
  // yet released.
  uint64_t lent_bytes() const;
  // AcquireWaiting calls that waited, those whose wait ended at `until` or
  // `stop` with nothing returned that fitted (they mapped fresh memory),
  // and the seconds waited in all.
  struct WaitStats {
    uint64_t waits = 0;
    uint64_t expired = 0;
    double seconds = 0;
  };
  WaitStats wait_stats() const;
  // Unmaps every buffer released at least `idle` ago, small ones included
  // (never the reserve); returns the bytes.
  uint64_t Trim(absl::Duration idle);
  // The reserve: maps `bytes` (rounded up to whole 2 MiB, 2 MiB-aligned,
  // advised MADV_HUGEPAGE), faults all of it in now (MADV_POPULATE_WRITE, or
  // a write to each page on kernels without it) and keeps it for the cache's
  // life. Trim never unmaps it, and it is not counted against
  // max_cached_bytes. A request of at least an eighth of it and at most
  // its free bytes takes a piece of it (split at 2 MiB; the pieces merge
  // again when they come back), so a prefill's first chunks, and two chunks
  // in flight at once, find staging already faulted in. Smaller requests (a
  // tree build's key scratch) never take from it: they would cut it into
  // pieces no chunk fits. For hosts where a first touch is a trip through the
  // hypervisor (pool.prefault; docs/operations.md "Memory the host backs
  // lazily"). Once per cache (FailedPrecondition after); ResourceExhausted
  // when the mapping fails; Cancelled when `*stop` turns true (the reserve
  // is then dropped). Returns the seconds it took.
  absl::StatusOr<double> Reserve(uint64_t bytes, const std::atomic<bool>* stop = nullptr);
  uint64_t reserve_bytes() const;
  // Whether a buffer of `bytes` is large: it returns to the byte-bounded
  // cache when released (small ones go to the few kept apart; a build's
  // small key scratch is cheaper in ordinary heap memory).
  bool Caches(uint64_t bytes) const { return bytes >= options_.min_cached_bytes; }
  // Bytes of released buffers kept, the reserve's and the small ones' not
  // counted.
  uint64_t cached_bytes() const;
  // Bytes of released small buffers kept (at most kSmallKept of them).
  uint64_t small_cached_bytes() const;
  static constexpr size_t kSmallKept = 8;
  // Buffers handed out by Acquire that came from the cache (tests, metrics).
  uint64_t reuses() const;

 private:
  explicit StagingCache(const StagingCacheOptions& options) : options_(options) {}
  friend class StagingBuffer;
  // Keeps the mapping for a later Acquire when it fits the bound (or is a
  // piece of the reserve), else unmaps it.
  void Release(uint8_t* base, uint64_t capacity);
  // A kept buffer (or reserve piece) that holds `bytes`, taken; an empty
  // buffer when none fits.
  StagingBuffer TakeKeptLocked(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  uint64_t LendBoundLocked(uint64_t bytes) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Adds the time since `started` (InfinitePast: none) to the waits' seconds.
  void AddWaitLocked(absl::Time started) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool InReserveLocked(const uint8_t* base) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return reserve_base_ != nullptr && base >= reserve_base_ &&
           base < reserve_base_ + reserve_capacity_;
  }

  struct Entry {
    uint8_t* base;
    uint64_t capacity;
    absl::Time released;
  };
  const StagingCacheOptions options_;
  mutable absl::Mutex mu_;
  std::vector<Entry> cached_ ABSL_GUARDED_BY(mu_);
  uint64_t cached_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // outside the reserve
  std::vector<Entry> small_ ABSL_GUARDED_BY(mu_);   // below min_cached_bytes
  uint64_t small_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  // The reserve's mapping; its free pieces are entries of cached_.
  uint8_t* reserve_base_ ABSL_GUARDED_BY(mu_) = nullptr;
  uint64_t reserve_capacity_ ABSL_GUARDED_BY(mu_) = 0;
  bool reserving_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t reuses_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t lent_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // large buffers out
  absl::CondVar returned_;                        // a large buffer came back
  WaitStats wait_stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_APPEND_STAGING_H_
