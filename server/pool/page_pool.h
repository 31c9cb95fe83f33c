// PagePool: the CPU memory that holds every session's KV pages (docs/architecture.md §4).
//
// One arena of `capacity_bytes` is mapped once at Create(): MAP_HUGETLB when
// asked and the kernel has enough reserved 2 MiB pages for the whole arena
// (reserved at mmap time, so a short huge-page pool cannot SIGBUS later),
// else normal pages with MAP_NORESERVE, 2 MiB-aligned, and, when asked,
// madvise(MADV_HUGEPAGE) (PagePoolOptions.transparent_huge_pages). The arena is cut into 2 MiB
// slabs; a slab belongs to one size class while it holds frames of that class. A slab whose last
// frame is freed stays carved in its class (re-allocation costs no page
// faults) while at most `max_empty_slabs` slabs are empty, until another class
// needs a slab and the arena has none left (it is then taken over) or Trim() is
// called; beyond that bound Free() releases the excess at once. A slab that
// leaves its class goes back to the kernel with MADV_DONTNEED. A size class is created on first use
// of a frame size and has an intrusive doubly linked free list threaded through its free frames, so
// Allocate/Free are O(1) per frame and allocate no heap memory besides the FrameSet's pointer
// vector.
//
// A frame of a KV page holds K then V, page_tokens x head_dim each, in the
// session dtype: frame_bytes = 2 x page_tokens x head_dim x DTypeSize(dtype)
// (at most 2 MiB). Frames are carved at a stride of frame_bytes rounded up to
// 64 bytes, so every frame is 64-byte aligned. Token positions are not kept
// in frames (the selector holds them).
//
// Accounting: "used" bytes count frame strides handed out; "reserved" bytes
// count slabs carved from the arena. Capacity limits used bytes (and slabs);
// a tenant quota limits the tenant's used bytes. Allocation is all-or-nothing.
//
// Thread safety: every method is thread-safe (one absl::Mutex). FrameSet is a
// move-only RAII owner of frames; one FrameSet must not be used from two
// threads at once, but different FrameSets may be used and destroyed
// concurrently. The pool must outlive every FrameSet it handed out.
#ifndef ICECACHE_SERVER_POOL_PAGE_POOL_H_
#define ICECACHE_SERVER_POOL_PAGE_POOL_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace icecache {

class PagePool;

// Quota value meaning "no per-tenant limit" (the global capacity still holds).
inline constexpr uint64_t kUnlimitedQuota = ~uint64_t{0};

struct PagePoolOptions {
  // Bytes of the arena; rounded up to a multiple of kSlabBytes. > 0 and at
  // most 1 TiB.
  uint64_t capacity_bytes = uint64_t{1} << 30;
  // Try MAP_HUGETLB first (falls back silently to normal pages + THP advice).
  // Off by default, like the daemon's pool.huge_pages unset, so in-process
  // benchmarks and tests get the arena a daemon without a config gets.
  bool use_huge_pages = false;
  // An arena of normal pages (not a backing file) is always mapped 2 MiB-
  // aligned; with this (or use_huge_pages) it is also advised MADV_HUGEPAGE
  // (transparent huge pages, where the kernel's THP mode is "madvise" or
  // "always"): each slab is then one huge page. Off by default: a token
  // gather of 1024 random rows from a 4 GiB arena takes 2.5x as long in
  // 4 KiB pages, but on the 2-core VM the daemon's faults into fresh huge
  // pages made an 8-layer prefill 5-7x slower and its DecodeStep messages
  // slower too (docs/bench/gather_arena.md); operators opt in with
  // pool.huge_pages where their kernel backs huge pages cheaply.
  bool transparent_huge_pages = false;
  // Maximum number of distinct frame sizes (1..64).
  int max_size_classes = 16;
  // Quota of a tenant that has none set with SetQuota().
  uint64_t default_tenant_quota_bytes = kUnlimitedQuota;
  // Warm restart (docs/architecture.md §4): when set, the arena is this file
  // (under /dev/shm or a hugetlbfs mount), mapped MAP_SHARED, so its bytes
  // outlive the process. Created 0600 with O_NOFOLLOW; an existing file must
  // be a regular file owned by this uid with no group/other permissions.
  // Removed when the pool is destroyed unless KeepBackingFile() was called.
  std::string backing_file;
  // With backing_file: keep the existing file's bytes (its size must equal
  // the capacity; then Recover() re-owns the frames a snapshot names).
  // false: the file is emptied first.
  bool reuse_backing_file = false;
  // Empty slabs (carved, no frame in use) the pool keeps resident for quick
  // re-use, over all size classes. A Free() that leaves more empty than this
  // returns the excess to the kernel (MADV_DONTNEED) at once, so memory goes
  // back when sessions drop (docs/architecture.md §4). ~0 = keep every one
  // until Trim().
  uint64_t max_empty_slabs = 16;
  // The whole arena stays resident: no slab's memory is ever given back to
  // the kernel (no MADV_DONTNEED of free or trimmed slabs, none of the
  // slabs PrefaultAhead no longer needs). What the daemon's pool.prefault
  // sets, with PrefaultArena() run once at start: on a host whose memory is
  // slow to fault in (docs/operations.md "Memory the host backs lazily") a
  // prefill then takes no first-touch faults, and a session dropped does not
  // undo that. The process then holds the capacity for its life.
  bool keep_resident = false;
};

// What PagePool::PrefaultArena did.
struct ArenaPrefault {
  uint64_t bytes = 0;     // arena bytes faulted in (at most the capacity)
  bool populate = false;  // by MADV_POPULATE_WRITE (false: by touching each 4 KiB page)
  bool stopped = false;   // `stop` was set before the end
  double seconds = 0;     // wall time it took
};

// The frames of one session found in a warm-restart snapshot: byte offsets
// of frames of `frame_bytes` from the arena base, charged to `tenant`.
struct RecoveredFrames {
  std::string tenant;
  uint64_t frame_bytes = 0;
  std::vector<uint64_t> offsets;
};

// Index of a size class inside one pool.
using SizeClassId = uint32_t;

struct SizeClassStats {
  SizeClassId id = 0;
  uint64_t frame_bytes = 0;   // requested frame size
  uint64_t stride_bytes = 0;  // frame_bytes rounded up to 64
  uint64_t slabs = 0;         // slabs held by the class
  uint64_t frames_used = 0;
  uint64_t frames_free = 0;  // free frames inside the class's slabs
};

struct TenantPoolStats {
  std::string tenant;
  uint64_t used_bytes = 0;
  uint64_t quota_bytes = kUnlimitedQuota;
  uint64_t frames = 0;
};

// A consistent snapshot of the pool's counters.
struct PoolStats {
  uint64_t capacity_bytes = 0;  // arena size
  uint64_t reserved_bytes = 0;  // slabs carved into frames (empty ones included)
  uint64_t used_bytes = 0;      // strides of frames handed out
  uint64_t frames_used = 0;
  uint64_t frames_free = 0;  // free frames in carved slabs (all classes)
  uint64_t allocations = 0;  // successful Allocate() calls
  uint64_t rejected = 0;     // Allocate() calls refused (quota/capacity)
  bool huge_pages = false;   // arena mapped with MAP_HUGETLB
  std::vector<SizeClassStats> classes;
  std::vector<TenantPoolStats> tenants;  // sorted by tenant name
};

// Move-only owner of frames of one size class, charged to one tenant.
// Destruction (or Reset) returns every frame to the pool.
class FrameSet {
 public:
  FrameSet() = default;
  ~FrameSet() { Reset(); }
  FrameSet(FrameSet&& other) noexcept;
  FrameSet& operator=(FrameSet&& other) noexcept;
  FrameSet(const FrameSet&) = delete;
  FrameSet& operator=(const FrameSet&) = delete;

  size_t size() const { return frames_.size(); }
  bool empty() const { return frames_.empty(); }
  // Start of frame i (64-byte aligned, frame_bytes() writable bytes).
  // Contents are unspecified (not zeroed) when allocated.
  uint8_t* frame(size_t i) const { return frames_[i]; }
  uint64_t frame_bytes() const { return frame_bytes_; }
  SizeClassId size_class() const { return class_id_; }
  const std::string& tenant() const;

  // Moves the last `n` frames (n <= size()) into a new FrameSet of the same
  // pool, tenant and class. Allocates only the new set's pointer vector.
  FrameSet TakeBack(size_t n);
  // Moves every frame of `other` (same pool, tenant and class, or empty) into
  // this set. Returns FailedPrecondition (and leaves both unchanged) when the
  // pool, tenant or class differ.
  absl::Status Absorb(FrameSet&& other);
  // Returns all frames to the pool.
  void Reset();
  // Room for `n` frames, so a later Absorb up to there does not reallocate.
  void Reserve(size_t n) { frames_.reserve(n); }

 private:
  friend class PagePool;
  PagePool* pool_ = nullptr;
  void* tenant_ = nullptr;  // PagePool::Tenant*, stable for the pool's life
  SizeClassId class_id_ = 0;
  uint64_t frame_bytes_ = 0;
  std::vector<uint8_t*> frames_;
};

class PagePool {
 public:
  // Largest frame (one slab).
  static constexpr uint64_t kSlabBytes = uint64_t{2} << 20;

  // InvalidArgument for capacity 0 or > 1 TiB or max_size_classes outside
  // 1..64; ResourceExhausted when the arena cannot be mapped.
  static absl::StatusOr<std::unique_ptr<PagePool>> Create(const PagePoolOptions& options);
  ~PagePool();  // Unmaps the arena; every FrameSet must be gone.
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  // Class for frames of `frame_bytes`, created on first use.
  // InvalidArgument when frame_bytes is 0 or > kSlabBytes, or when a new class
  // would exceed max_size_classes.
  absl::StatusOr<SizeClassId> GetOrCreateClass(uint64_t frame_bytes) ABSL_LOCKS_EXCLUDED(mu_);

  // Allocates `count` frames of class `id` charged to `tenant`, all or
  // nothing (on error nothing changes). count == 0 returns an empty set.
  // InvalidArgument: unknown class id or invalid tenant name.
  // ResourceExhausted: the tenant's quota ("quota") or the pool capacity
  // ("capacity") would be exceeded; the message gives the numbers.
  absl::StatusOr<FrameSet> Allocate(std::string_view tenant, SizeClassId id, uint64_t count)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Would Allocate(tenant, id, count) succeed now? Same codes as Allocate,
  // nothing changes. (A concurrent caller may take the room afterwards.)
  absl::Status CheckAdmission(std::string_view tenant, SizeClassId id, uint64_t count) const
      ABSL_LOCKS_EXCLUDED(mu_);

  // Sets the quota of `tenant` (kUnlimitedQuota for none). A quota below the
  // current usage is allowed: it only refuses new allocations.
  // InvalidArgument for a bad tenant name.
  absl::Status SetQuota(std::string_view tenant, uint64_t quota_bytes) ABSL_LOCKS_EXCLUDED(mu_);
  uint64_t Quota(std::string_view tenant) const ABSL_LOCKS_EXCLUDED(mu_);
  uint64_t TenantUsedBytes(std::string_view tenant) const ABSL_LOCKS_EXCLUDED(mu_);

  // Bytes one frame of `frame_bytes` costs against quota and capacity.
  static uint64_t StrideFor(uint64_t frame_bytes) { return (frame_bytes + 63) / 64 * 64; }

  // Returns every empty slab of every class to the arena and its memory to
  // the kernel (MADV_DONTNEED); returns the bytes released.
  uint64_t Trim() ABSL_LOCKS_EXCLUDED(mu_);

  // Faults in the memory of the next `slabs` slabs a class would carve, so
  // the allocation that carves them takes no page fault (the kernel zeroes a
  // 2 MiB slab on first touch: about a millisecond on the append that needs
  // it). Contents are unchanged (MADV_POPULATE_WRITE), so it is safe while
  // allocations run; a no-op where the kernel lacks it. Meant for a
  // background thread. Free slabs an earlier call faulted in that are no
  // longer among the next `slabs` are returned to the kernel, so at most
  // `slabs` free slabs stay resident. Returns the slabs populated.
  uint64_t PrefaultAhead(uint64_t slabs) ABSL_LOCKS_EXCLUDED(mu_);

  // Faults in the slabs that allocations of about `bytes` more would carve
  // next (MADV_POPULATE_WRITE, contents unchanged), with the pool lock
  // released while the kernel works: a large allocation (a prefill's
  // frames) then takes its page faults here, in one call per slab, instead
  // of one per 4 KiB page under the pool lock when it carves them
  // (docs/bench/prefill.md). PrefaultAhead keeps them resident until the
  // next allocation, then bounds them like its own. Returns the slabs
  // populated; 0 where the kernel lacks it or the pool is frozen.
  uint64_t PopulateNext(uint64_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // Faults in the whole arena, slab after slab, no lock held: with
  // MADV_POPULATE_WRITE where the kernel has it (Linux 5.14), else by an
  // atomic no-op write (fetch_or 0) to each 4 KiB page. Contents are
  // unchanged either way, so allocations may run meanwhile (a warm restart's
  // recovered frames included). Never touches beyond the capacity. Checks
  // `stop` (may be null) between slabs. Meant for a background thread at
  // start-up with keep_resident (else freed slabs go back to the kernel).
  // prefaulted_bytes() reads the progress from another thread.
  ArenaPrefault PrefaultArena(const std::atomic<bool>* stop) ABSL_LOCKS_EXCLUDED(mu_);
  uint64_t prefaulted_bytes() const { return prefaulted_bytes_.load(std::memory_order_relaxed); }
  // A prefaulter's cue (server/session's prefault thread): blocks until a
  // slab has been carved after the carve count `seen` (each carve takes one
  // of the slabs PrefaultAhead faulted in), `*stop` is true, or `timeout`
  // passes; returns the carve count then. Whoever sets *stop calls
  // WakeCarveWaiters() afterwards. Costs the allocations nothing beyond a
  // signal per slab carved.
  uint64_t WaitForCarve(uint64_t seen, const std::atomic<bool>* stop, absl::Duration timeout)
      ABSL_LOCKS_EXCLUDED(mu_);
  void WakeCarveWaiters() ABSL_LOCKS_EXCLUDED(mu_);
  uint64_t slabs_carved() const ABSL_LOCKS_EXCLUDED(mu_);
  // Warm restart: takes ownership of exactly the listed frames (every other
  // frame of the arena stays free) and returns one FrameSet per entry, in
  // order. Only on a pool that has handed out nothing yet.
  // FailedPrecondition: frames were allocated already; InvalidArgument: an
  // offset outside the arena or not on a frame boundary of its class, a
  // frame listed twice, a slab claimed by two frame sizes, a bad tenant.
  // On error nothing changes.
  absl::StatusOr<std::vector<FrameSet>> Recover(const std::vector<RecoveredFrames>& sets)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Byte offset of a frame of this pool from the arena base.
  uint64_t OffsetOf(const uint8_t* frame) const { return static_cast<uint64_t>(frame - base_); }
  // Keep the backing file when the pool is destroyed (drain for upgrade).
  void KeepBackingFile() { keep_file_.store(true); }
  // From now on freed frames are only accounted, never written (no free-list
  // links in them), so a snapshot taken of the arena stays valid while the
  // process winds down. Allocation afterwards fails with FailedPrecondition.
  void Freeze() ABSL_LOCKS_EXCLUDED(mu_);
  const std::string& backing_file() const { return options_.backing_file; }

  uint64_t capacity_bytes() const { return capacity_bytes_; }
  // The arena (e.g. to pin it with cudaHostRegister). Valid for the pool's life.
  uint8_t* arena_base() const { return base_; }
  bool huge_pages() const { return huge_pages_; }
  uint64_t used_bytes() const ABSL_LOCKS_EXCLUDED(mu_);
  PoolStats Stats() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  friend class FrameSet;
  struct Tenant;
  struct SizeClass;
  struct Slab;
  struct FreeNode;

  PagePool(const PagePoolOptions& options, uint8_t* base, uint64_t capacity, bool huge, int fd);
  // Maps the arena (anonymous, or the backing file); sets *fd for a file.
  static absl::StatusOr<uint8_t*> MapArena(const PagePoolOptions& options, uint64_t capacity,
                                           bool* huge, int* fd);
  // Anonymous MAP_NORESERVE mapping of `capacity` bytes starting on a slab
  // (2 MiB) boundary; ResourceExhausted when mmap fails.
  static absl::StatusOr<uint8_t*> MapAlignedAnonymous(uint64_t capacity);
  absl::Status CheckRecoverLocked(const std::vector<RecoveredFrames>& sets,
                                  std::vector<int32_t>* slab_class)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  SizeClass* ClassForLocked(uint64_t frame_bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Free(FrameSet* set) ABSL_LOCKS_EXCLUDED(mu_);
  Tenant* GetTenantLocked(std::string_view tenant) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckLocked(const Tenant* t, uint64_t quota, const SizeClass& c, uint64_t count,
                           std::string_view tenant) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  uint64_t SlabsNeededLocked(const SizeClass& c, uint64_t count) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void CarveSlabLocked(SizeClass* c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Appends to `next` the (at most `slabs`) slabs CarveSlabLocked takes next.
  void NextSlabsLocked(uint64_t slabs, std::vector<uint64_t>* next) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // MADV_POPULATE_WRITE of each slab, no lock held; returns those done.
  uint64_t PopulateSlabs(const std::vector<uint64_t>& slabs) ABSL_LOCKS_EXCLUDED(mu_);
  void ReleaseSlabLocked(SizeClass* c, uint64_t slab) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StealEmptySlabLocked(SizeClass* taker) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool PopEmptySlabLocked(SizeClass* c, uint64_t* slab) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseExcessEmptySlabsLocked(SizeClass* first) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // MADV_DONTNEED (MADV_REMOVE for a file) of one slab that no frame uses.
  void DropSlabMemoryLocked(uint64_t slab) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const PagePoolOptions options_;
  uint8_t* const base_;
  const uint64_t capacity_bytes_;
  const uint64_t num_slabs_;
  const bool huge_pages_;
  const int fd_;  // backing file, or -1
  std::atomic<bool> keep_file_{false};
  std::atomic<uint64_t> prefaulted_bytes_{0};  // PrefaultArena's progress

  // All hot counters in one cache-aligned block.
  struct alignas(64) Counters {
    uint64_t reserved_bytes = 0;
    uint64_t used_bytes = 0;
    uint64_t frames_used = 0;
    uint64_t frames_free = 0;
    uint64_t allocations = 0;
    uint64_t rejected = 0;
  };

  mutable absl::Mutex mu_;
  Counters counters_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<SizeClass>> classes_ ABSL_GUARDED_BY(mu_);
  std::vector<Slab> slabs_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> free_slabs_ ABSL_GUARDED_BY(mu_);  // stack of slab indices
  uint64_t next_unused_slab_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t empty_slabs_total_ ABSL_GUARDED_BY(mu_) = 0;    // carved slabs with no frame used
  std::vector<uint64_t> prefaulted_ ABSL_GUARDED_BY(mu_);  // the last PrefaultAhead's slabs
  // Slabs a PopulateNext faulted in for an allocation not made yet.
  uint64_t populate_hold_ ABSL_GUARDED_BY(mu_) = 0;
  bool frozen_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t slabs_carved_ ABSL_GUARDED_BY(mu_) = 0;  // ever (WaitForCarve)
  absl::CondVar carved_;                            // signalled with mu_ held
  std::map<std::string, std::unique_ptr<Tenant>, std::less<>> tenants_ ABSL_GUARDED_BY(mu_);
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_POOL_PAGE_POOL_H_
