#include "server/pool/page_pool.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/aligned_mapping.h"
#include "common/caller.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "server/pool/heap_trim.h"

namespace icecache {

namespace {

// Opens (creating 0600) the arena's backing file. Refuses a file that is not
// regular, not this uid's, or open to group/other: another user must never
// read or plant KV bytes.
absl::StatusOr<int> OpenBackingFile(const std::string& path, uint64_t capacity, bool reuse) {
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("page pool: cannot open arena file ", path, ": ", std::strerror(errno)));
  }
  struct stat st;
  std::string why = PrivateFileProblem(fd, &st);
  if (why.empty() && reuse && static_cast<uint64_t>(st.st_size) != capacity) {
    why = absl::StrCat("holds ", st.st_size, " bytes, the pool's capacity is ", capacity);
  } else if (why.empty() && !reuse &&
             (ftruncate(fd, 0) != 0 || ftruncate(fd, static_cast<off_t>(capacity)) != 0)) {
    why = absl::StrCat("cannot size it to ", capacity, " bytes: ", std::strerror(errno));
  }
  if (why.empty()) return fd;
  close(fd);
  return absl::FailedPreconditionError(absl::StrCat("page pool: arena file ", path, ": ", why));
}

}  // namespace

struct PagePool::Tenant {
  std::string name;
  uint64_t used_bytes = 0;
  uint64_t frames = 0;
  uint64_t quota = kUnlimitedQuota;
};

// Lives inside a free frame (every stride is >= 64 bytes).
struct PagePool::FreeNode {
  FreeNode* prev;
  FreeNode* next;
};

struct PagePool::SizeClass {
  SizeClassId id = 0;
  uint64_t frame_bytes = 0;
  uint64_t stride = 0;
  uint64_t frames_per_slab = 0;
  FreeNode head;  // sentinel of the circular free list
  uint64_t slabs = 0;
  uint64_t frames_used = 0;
  uint64_t frames_free = 0;
  // Slabs of this class with no frame in use: kept carved (no page faults
  // when the class grows again) until another class needs a slab or Trim().
  uint64_t empty_slabs = 0;
  // Indices of slabs that became empty; may hold stale entries (checked on use).
  std::vector<uint64_t> empty_candidates;

  void PushFront(FreeNode* n) {
    n->prev = &head;
    n->next = head.next;
    head.next->prev = n;
    head.next = n;
  }
  static void Unlink(FreeNode* n) {
    n->prev->next = n->next;
    n->next->prev = n->prev;
  }
  FreeNode* PopFront() {
    FreeNode* n = head.next;
    Unlink(n);
    return n;
  }
};

struct PagePool::Slab {
  int32_t class_id = -1;
  uint32_t used = 0;
};

// ---------------------------------------------------------------- FrameSet

FrameSet::FrameSet(FrameSet&& other) noexcept
    : pool_(std::exchange(other.pool_, nullptr)),
      tenant_(std::exchange(other.tenant_, nullptr)),
      class_id_(other.class_id_),
      frame_bytes_(other.frame_bytes_),
      frames_(std::move(other.frames_)) {
  other.frames_.clear();
}

FrameSet& FrameSet::operator=(FrameSet&& other) noexcept {
  if (this != &other) {
    Reset();
    pool_ = std::exchange(other.pool_, nullptr);
    tenant_ = std::exchange(other.tenant_, nullptr);
    class_id_ = other.class_id_;
    frame_bytes_ = other.frame_bytes_;
    frames_ = std::move(other.frames_);
    other.frames_.clear();
  }
  return *this;
}

const std::string& FrameSet::tenant() const {
  static const std::string* const kNone = new std::string();
  if (tenant_ == nullptr) return *kNone;
  return static_cast<const PagePool::Tenant*>(tenant_)->name;
}

FrameSet FrameSet::TakeBack(size_t n) {
  n = std::min(n, frames_.size());
  FrameSet out;
  out.pool_ = pool_;
  out.tenant_ = tenant_;
  out.class_id_ = class_id_;
  out.frame_bytes_ = frame_bytes_;
  out.frames_.assign(frames_.end() - static_cast<std::ptrdiff_t>(n), frames_.end());
  frames_.resize(frames_.size() - n);
  return out;
}

absl::Status FrameSet::Absorb(FrameSet&& other) {
  if (other.frames_.empty()) {
    other.Reset();
    return absl::OkStatus();
  }
  if (pool_ == nullptr && frames_.empty()) {
    *this = std::move(other);
    return absl::OkStatus();
  }
  if (other.pool_ != pool_ || other.tenant_ != tenant_ || other.class_id_ != class_id_) {
    return absl::FailedPreconditionError(
        "FrameSet::Absorb: frame sets differ in pool, tenant or size class");
  }
  frames_.insert(frames_.end(), other.frames_.begin(), other.frames_.end());
  other.frames_.clear();
  return absl::OkStatus();
}

void FrameSet::Reset() {
  if (pool_ != nullptr && !frames_.empty()) pool_->Free(this);
  frames_.clear();
}

// ---------------------------------------------------------------- PagePool

absl::StatusOr<std::unique_ptr<PagePool>> PagePool::Create(const PagePoolOptions& options) {
  constexpr uint64_t kMaxCapacity = uint64_t{1} << 40;
  if (options.capacity_bytes == 0 || options.capacity_bytes > kMaxCapacity) {
    return absl::InvalidArgumentError(absl::StrCat("page pool: capacity_bytes must be in 1..",
                                                   kMaxCapacity, ", got ", options.capacity_bytes));
  }
  if (options.max_size_classes < 1 || options.max_size_classes > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "page pool: max_size_classes must be in 1..64, got ", options.max_size_classes));
  }
  const uint64_t capacity = (options.capacity_bytes + kSlabBytes - 1) / kSlabBytes * kSlabBytes;
  bool huge = false;
  int fd = -1;
  ASSIGN_OR_RETURN(uint8_t * base, MapArena(options, capacity, &huge, &fd));
  return std::unique_ptr<PagePool>(new PagePool(options, base, capacity, huge, fd));
}

absl::StatusOr<uint8_t*> PagePool::MapArena(const PagePoolOptions& options, uint64_t capacity,
                                            bool* huge, int* fd) {
  if (!options.backing_file.empty()) {
    ASSIGN_OR_RETURN(*fd,
                     OpenBackingFile(options.backing_file, capacity, options.reuse_backing_file));
    void* base = mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
    if (base == MAP_FAILED) {
      const int err = errno;
      close(*fd);
      *fd = -1;
      return absl::ResourceExhaustedError(absl::StrCat("page pool: mmap of ", capacity,
                                                       " bytes of ", options.backing_file,
                                                       " failed: ", std::strerror(err)));
    }
    return static_cast<uint8_t*>(base);
  }
  void* base = MAP_FAILED;
  if (options.use_huge_pages) {
    // No MAP_NORESERVE here: huge pages are then reserved at mmap time, so a
    // short huge-page pool makes mmap fail (and we fall back) instead of
    // raising SIGBUS at first touch much later.
    base = mmap(nullptr, capacity, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
    *huge = base != MAP_FAILED;
  }
  if (base == MAP_FAILED) {
    ASSIGN_OR_RETURN(uint8_t * aligned, MapAlignedAnonymous(capacity));
    base = aligned;
    if (options.use_huge_pages || options.transparent_huge_pages) {
      madvise(base, capacity, MADV_HUGEPAGE);  // advice only
    }
  }
  return static_cast<uint8_t*>(base);
}

absl::StatusOr<uint8_t*> PagePool::MapAlignedAnonymous(uint64_t capacity) {
  // Slab k starts on a 2 MiB boundary, so with transparent huge pages each
  // slab is one huge page (its carve, prefault and release act on whole
  // pages; a random read over a multi-GiB arena needs a TLB entry per slab
  // instead of one per 4 KiB: docs/bench/gather_arena.md).
  uint8_t* base = MapAligned(capacity, kSlabBytes, MAP_NORESERVE);
  if (base == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("page pool: mmap of ", capacity, " bytes failed: ", std::strerror(errno)));
  }
  return base;
}

PagePool::PagePool(const PagePoolOptions& options, uint8_t* base, uint64_t capacity, bool huge,
                   int fd)
    : options_(options),
      base_(base),
      capacity_bytes_(capacity),
      num_slabs_(capacity / kSlabBytes),
      huge_pages_(huge),
      fd_(fd) {
  absl::MutexLock l(&mu_);
  slabs_.resize(num_slabs_);
}

PagePool::~PagePool() {
  munmap(base_, capacity_bytes_);
  if (fd_ >= 0) {
    close(fd_);
    if (!keep_file_.load()) unlink(options_.backing_file.c_str());
  }
}

absl::StatusOr<SizeClassId> PagePool::GetOrCreateClass(uint64_t frame_bytes) {
  if (frame_bytes == 0 || frame_bytes > kSlabBytes) {
    return absl::InvalidArgumentError(absl::StrCat("page pool: frame size must be in 1..",
                                                   kSlabBytes, " bytes, got ", frame_bytes));
  }
  absl::MutexLock l(&mu_);
  SizeClass* c = ClassForLocked(frame_bytes);
  if (c == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("page pool: a new size class for ", frame_bytes,
                     "-byte frames would exceed max_size_classes=", options_.max_size_classes));
  }
  return c->id;
}

PagePool::SizeClass* PagePool::ClassForLocked(uint64_t frame_bytes) {
  for (const auto& c : classes_) {
    if (c->frame_bytes == frame_bytes) return c.get();
  }
  if (classes_.size() >= static_cast<size_t>(options_.max_size_classes)) return nullptr;
  auto c = std::make_unique<SizeClass>();
  c->id = static_cast<SizeClassId>(classes_.size());
  c->frame_bytes = frame_bytes;
  c->stride = StrideFor(frame_bytes);
  c->frames_per_slab = kSlabBytes / c->stride;
  c->head.prev = c->head.next = &c->head;
  classes_.push_back(std::move(c));
  return classes_.back().get();
}

PagePool::Tenant* PagePool::GetTenantLocked(std::string_view tenant) {
  auto it = tenants_.find(tenant);
  if (it != tenants_.end()) return it->second.get();
  auto t = std::make_unique<Tenant>();
  t->name = std::string(tenant);
  t->quota = options_.default_tenant_quota_bytes;
  Tenant* raw = t.get();
  tenants_.emplace(raw->name, std::move(t));
  return raw;
}

uint64_t PagePool::SlabsNeededLocked(const SizeClass& c, uint64_t count) const {
  if (count <= c.frames_free) return 0;
  return (count - c.frames_free + c.frames_per_slab - 1) / c.frames_per_slab;
}

absl::Status PagePool::CheckLocked(const Tenant* t, uint64_t quota, const SizeClass& c,
                                   uint64_t count, std::string_view tenant) const {
  if (count == 0) return absl::OkStatus();  // allocates nothing: never refused
  const uint64_t used = t == nullptr ? 0 : t->used_bytes;
  // count <= capacity / stride is checked first so the products cannot overflow.
  if (count > capacity_bytes_ / c.stride) {
    return absl::ResourceExhaustedError(absl::StrCat("page pool capacity: ", count, " frames of ",
                                                     c.stride, " bytes exceed the capacity of ",
                                                     capacity_bytes_, " bytes"));
  }
  const uint64_t bytes = count * c.stride;
  if (quota != kUnlimitedQuota && (bytes > quota || used > quota - bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat("quota of tenant '", std::string(tenant),
                                                     "': using ", used, " of ", quota, " bytes, ",
                                                     bytes, " more requested"));
  }
  const uint64_t slabs_available =
      free_slabs_.size() + (num_slabs_ - next_unused_slab_) + (empty_slabs_total_ - c.empty_slabs);
  const uint64_t slabs_needed = SlabsNeededLocked(c, count);
  if (slabs_needed > slabs_available) {
    return absl::ResourceExhaustedError(
        absl::StrCat("page pool capacity: ", bytes, " more bytes requested, ", counters_.used_bytes,
                     " of ", capacity_bytes_, " bytes in use (", slabs_available, " free slabs, ",
                     slabs_needed, " needed)"));
  }
  return absl::OkStatus();
}

absl::Status PagePool::CheckAdmission(std::string_view tenant, SizeClassId id,
                                      uint64_t count) const {
  if (absl::Status s = ValidateTenantName(tenant); !s.ok()) return s;
  absl::ReaderMutexLock l(&mu_);
  if (id >= classes_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("page pool: unknown size class ", id));
  }
  auto it = tenants_.find(tenant);
  const Tenant* t = it == tenants_.end() ? nullptr : it->second.get();
  const uint64_t quota = t == nullptr ? options_.default_tenant_quota_bytes : t->quota;
  return CheckLocked(t, quota, *classes_[id], count, tenant);
}

void PagePool::NextSlabsLocked(uint64_t slabs, std::vector<uint64_t>* next) const {
  // CarveSlabLocked takes free slabs from the back, then unused ones.
  for (auto it = free_slabs_.rbegin(); it != free_slabs_.rend() && next->size() < slabs; ++it) {
    next->push_back(*it);
  }
  for (uint64_t s = next_unused_slab_; s < num_slabs_ && next->size() < slabs; ++s) {
    next->push_back(s);
  }
}

uint64_t PagePool::PopulateSlabs(const std::vector<uint64_t>& slabs) {
  uint64_t done = 0;
#ifdef MADV_POPULATE_WRITE
  for (uint64_t slab : slabs) {
    // Each page's first touch paid here, not by the carve and the row
    // writes of an append; reads only, as a carve may be writing the slab.
    if (PopulateWritable(base_ + slab * kSlabBytes, kSlabBytes)) ++done;
  }
#else
  (void)slabs;
#endif
  return done;
}

uint64_t PagePool::PrefaultAhead(uint64_t slabs) {
#ifdef MADV_POPULATE_WRITE
  std::vector<uint64_t> next;
  {
    absl::MutexLock l(&mu_);
    // Slabs a PopulateNext faulted in for an allocation still to come stay.
    NextSlabsLocked(std::max(slabs, populate_hold_), &next);
    // Slabs faulted in by an earlier call that are still free but no longer
    // next in line (others were freed on top of them) go back to the kernel:
    // at most `slabs` free slabs stay resident, however the pool churns.
    std::vector<uint64_t> sorted = next;
    std::sort(sorted.begin(), sorted.end());
    for (uint64_t s : prefaulted_) {
      if (slabs_[s].class_id == -1 && !std::binary_search(sorted.begin(), sorted.end(), s)) {
        DropSlabMemoryLocked(s);
      }
    }
    prefaulted_ = next;
    next.resize(std::min<size_t>(next.size(), slabs));  // the held ones are faulted in already
  }
  return PopulateSlabs(next);
#else
  (void)slabs;
  return 0;
#endif
}

uint64_t PagePool::PopulateNext(uint64_t bytes) {
#ifdef MADV_POPULATE_WRITE
  std::vector<uint64_t> next;
  {
    absl::MutexLock l(&mu_);
    if (frozen_) return 0;
    NextSlabsLocked((bytes + kSlabBytes - 1) / kSlabBytes, &next);
    // Kept resident by PrefaultAhead until the next allocation, then bound
    // by it like its own.
    populate_hold_ = std::max<uint64_t>(populate_hold_, next.size());
    prefaulted_.insert(prefaulted_.end(), next.begin(), next.end());
    std::sort(prefaulted_.begin(), prefaulted_.end());
    prefaulted_.erase(std::unique(prefaulted_.begin(), prefaulted_.end()), prefaulted_.end());
  }
  return PopulateSlabs(next);
#else
  (void)bytes;
  return 0;
#endif
}

ArenaPrefault PagePool::PrefaultArena(const std::atomic<bool>* stop) {
  ArenaPrefault out;
  const auto t0 = absl::Now();
  bool populate = true;
  for (uint64_t slab = 0; slab < num_slabs_; ++slab) {
    if (stop != nullptr && stop->load(std::memory_order_relaxed)) {
      out.stopped = true;
      break;
    }
    // The no-op writes of a kernel without MADV_POPULATE_WRITE do not race a
    // frame's owner writing to it.
    FaultInForWrite(base_ + slab * kSlabBytes, kSlabBytes, &populate);
    out.bytes += kSlabBytes;
    prefaulted_bytes_.store(out.bytes, std::memory_order_relaxed);
  }
  out.populate = populate && out.bytes > 0;
  out.seconds = absl::ToDoubleSeconds(absl::Now() - t0);
  return out;
}

void PagePool::CarveSlabLocked(SizeClass* c) {
  if (free_slabs_.empty() && next_unused_slab_ == num_slabs_) StealEmptySlabLocked(c);
  uint64_t slab;
  if (!free_slabs_.empty()) {
    slab = free_slabs_.back();
    free_slabs_.pop_back();
  } else {
    slab = next_unused_slab_++;
  }
  slabs_[slab].class_id = static_cast<int32_t>(c->id);
  slabs_[slab].used = 0;
  uint8_t* start = base_ + slab * kSlabBytes;
  // Push in reverse so frames come out in address order.
  for (uint64_t i = c->frames_per_slab; i-- > 0;) {
    c->PushFront(reinterpret_cast<FreeNode*>(start + i * c->stride));
  }
  c->slabs++;
  c->frames_free += c->frames_per_slab;
  c->empty_slabs++;
  c->empty_candidates.push_back(slab);
  empty_slabs_total_++;
  counters_.frames_free += c->frames_per_slab;
  counters_.reserved_bytes += kSlabBytes;
  slabs_carved_++;
  carved_.SignalAll();
}

uint64_t PagePool::WaitForCarve(uint64_t seen, const std::atomic<bool>* stop,
                                absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock l(&mu_);
  while (slabs_carved_ == seen && !stop->load()) {
    if (carved_.WaitWithDeadline(&mu_, deadline)) break;  // timed out
  }
  return slabs_carved_;
}

uint64_t PagePool::slabs_carved() const {
  absl::ReaderMutexLock l(&mu_);
  return slabs_carved_;
}

void PagePool::WakeCarveWaiters() {
  absl::MutexLock l(&mu_);
  carved_.SignalAll();
}

bool PagePool::PopEmptySlabLocked(SizeClass* c, uint64_t* slab) {
  while (c->empty_slabs > 0 && !c->empty_candidates.empty()) {
    const uint64_t s = c->empty_candidates.back();
    c->empty_candidates.pop_back();
    if (slabs_[s].class_id == static_cast<int32_t>(c->id) && slabs_[s].used == 0) {
      *slab = s;
      return true;
    }
  }
  return false;
}

void PagePool::StealEmptySlabLocked(SizeClass* taker) {
  for (auto& other : classes_) {
    if (other.get() == taker || other->empty_slabs == 0) continue;
    uint64_t slab;
    if (PopEmptySlabLocked(other.get(), &slab)) {
      ReleaseSlabLocked(other.get(), slab);
      return;
    }
  }
}

void PagePool::ReleaseSlabLocked(SizeClass* c, uint64_t slab) {
  uint8_t* start = base_ + slab * kSlabBytes;
  for (uint64_t i = 0; i < c->frames_per_slab; ++i) {
    SizeClass::Unlink(reinterpret_cast<FreeNode*>(start + i * c->stride));
  }
  c->slabs--;
  c->frames_free -= c->frames_per_slab;
  c->empty_slabs--;
  empty_slabs_total_--;
  counters_.frames_free -= c->frames_per_slab;
  counters_.reserved_bytes -= kSlabBytes;
  slabs_[slab].class_id = -1;
  free_slabs_.push_back(slab);
  DropSlabMemoryLocked(slab);
}

void PagePool::DropSlabMemoryLocked(uint64_t slab) {
  if (options_.keep_resident) return;  // pool.prefault: the arena stays faulted in
  // Give the memory back to the kernel; the next user faults in zero pages
  // (a file-backed arena: punch the hole in the file, or tmpfs keeps it).
  madvise(base_ + slab * kSlabBytes, kSlabBytes, fd_ >= 0 ? MADV_REMOVE : MADV_DONTNEED);
}

// Keeps the resident empty slabs within options_.max_empty_slabs: the
// memory of dropped sessions goes back to the kernel instead of staying in
// the process (icecache-load measured 200 MiB kept after every session was
// gone, docs/bench/load.md). Slabs of `first` (the class just freed) go
// first; the madvise runs under the lock because a released slab may be
// carved again by the next Allocate.
void PagePool::ReleaseExcessEmptySlabsLocked(SizeClass* first) {
  uint64_t slab;
  while (empty_slabs_total_ > options_.max_empty_slabs) {
    SizeClass* from = nullptr;
    if (PopEmptySlabLocked(first, &slab)) {
      from = first;
    } else {
      for (auto& other : classes_) {
        if (other.get() != first && PopEmptySlabLocked(other.get(), &slab)) {
          from = other.get();
          break;
        }
      }
    }
    if (from == nullptr) return;
    ReleaseSlabLocked(from, slab);
  }
}

uint64_t PagePool::Trim() {
  absl::MutexLock l(&mu_);
  uint64_t released = 0;
  for (auto& c : classes_) {
    uint64_t slab;
    while (PopEmptySlabLocked(c.get(), &slab)) {
      ReleaseSlabLocked(c.get(), slab);
      released += kSlabBytes;
    }
    c->empty_candidates.clear();
  }
  return released;
}

absl::StatusOr<FrameSet> PagePool::Allocate(std::string_view tenant, SizeClassId id,
                                            uint64_t count) {
  if (absl::Status s = ValidateTenantName(tenant); !s.ok()) return s;
  FrameSet out;
  std::vector<uint8_t*> frames;
  absl::MutexLock l(&mu_);
  if (id >= classes_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("page pool: unknown size class ", id));
  }
  if (frozen_) {
    return absl::FailedPreconditionError("page pool: frozen for a warm restart; no allocations");
  }
  SizeClass* c = classes_[id].get();
  Tenant* t = GetTenantLocked(tenant);
  if (absl::Status s = CheckLocked(t, t->quota, *c, count, tenant); !s.ok()) {
    counters_.rejected++;
    return s;
  }
  frames.reserve(count);  // bounded by capacity / stride after the check
  for (uint64_t n = SlabsNeededLocked(*c, count); n > 0; --n) CarveSlabLocked(c);
  populate_hold_ = 0;  // what a PopulateNext faulted in for this allocation is taken
  for (uint64_t i = 0; i < count; ++i) {
    uint8_t* f = reinterpret_cast<uint8_t*>(c->PopFront());
    if (slabs_[static_cast<uint64_t>(f - base_) / kSlabBytes].used++ == 0) {
      c->empty_slabs--;
      empty_slabs_total_--;
    }
    frames.push_back(f);
  }
  const uint64_t bytes = count * c->stride;
  c->frames_used += count;
  c->frames_free -= count;
  counters_.frames_free -= count;
  counters_.frames_used += count;
  counters_.used_bytes += bytes;
  counters_.allocations++;
  t->used_bytes += bytes;
  t->frames += count;
  out.pool_ = this;
  out.tenant_ = t;
  out.class_id_ = id;
  out.frame_bytes_ = c->frame_bytes;
  out.frames_ = std::move(frames);
  return out;
}

void PagePool::Free(FrameSet* set) {
  absl::MutexLock l(&mu_);
  SizeClass* c = classes_[set->class_id_].get();
  Tenant* t = static_cast<Tenant*>(set->tenant_);
  const uint64_t count = set->frames_.size();
  if (frozen_) {  // accounting only: the frames' bytes are a snapshot's
    counters_.used_bytes -= count * c->stride;
    counters_.frames_used -= count;
    c->frames_used -= count;
    t->used_bytes -= count * c->stride;
    t->frames -= count;
    return;
  }
  for (uint8_t* f : set->frames_) {
    c->PushFront(reinterpret_cast<FreeNode*>(f));
    const uint64_t slab = static_cast<uint64_t>(f - base_) / kSlabBytes;
    c->frames_free++;
    counters_.frames_free++;
    if (--slabs_[slab].used == 0) {
      c->empty_slabs++;
      empty_slabs_total_++;
      c->empty_candidates.push_back(slab);
    }
  }
  // Keep the stale-entry list bounded under churn.
  if (c->empty_candidates.size() > 2 * c->slabs + 16) {
    c->empty_candidates.clear();
    for (uint64_t s = 0; s < next_unused_slab_; ++s) {
      if (slabs_[s].class_id == static_cast<int32_t>(c->id) && slabs_[s].used == 0) {
        c->empty_candidates.push_back(s);
      }
    }
  }
  const uint64_t bytes = count * c->stride;
  c->frames_used -= count;
  counters_.frames_used -= count;
  counters_.used_bytes -= bytes;
  t->used_bytes -= bytes;
  t->frames -= count;
  ReleaseExcessEmptySlabsLocked(c);
  NoteFramesFreed(bytes);
}

absl::Status PagePool::SetQuota(std::string_view tenant, uint64_t quota_bytes) {
  if (absl::Status s = ValidateTenantName(tenant); !s.ok()) return s;
  absl::MutexLock l(&mu_);
  GetTenantLocked(tenant)->quota = quota_bytes;
  return absl::OkStatus();
}

uint64_t PagePool::Quota(std::string_view tenant) const {
  absl::ReaderMutexLock l(&mu_);
  auto it = tenants_.find(tenant);
  return it == tenants_.end() ? options_.default_tenant_quota_bytes : it->second->quota;
}

uint64_t PagePool::TenantUsedBytes(std::string_view tenant) const {
  absl::ReaderMutexLock l(&mu_);
  auto it = tenants_.find(tenant);
  return it == tenants_.end() ? 0 : it->second->used_bytes;
}

uint64_t PagePool::used_bytes() const {
  absl::ReaderMutexLock l(&mu_);
  return counters_.used_bytes;
}

void PagePool::Freeze() {
  absl::MutexLock l(&mu_);
  frozen_ = true;
}

absl::Status PagePool::CheckRecoverLocked(const std::vector<RecoveredFrames>& sets,
                                          std::vector<int32_t>* slab_class) {
  std::vector<uint64_t> all;
  for (const RecoveredFrames& set : sets) {
    RETURN_IF_ERROR(ValidateTenantName(set.tenant));
    if (set.frame_bytes == 0 || set.frame_bytes > kSlabBytes) {
      return absl::InvalidArgumentError(absl::StrCat("page pool: recovered frame size ",
                                                     set.frame_bytes, " is not 1..", kSlabBytes));
    }
    SizeClass* c = ClassForLocked(set.frame_bytes);
    if (c == nullptr) {
      return absl::InvalidArgumentError("page pool: recovered frames need too many size classes");
    }
    for (uint64_t off : set.offsets) {
      const uint64_t slab = off / kSlabBytes;
      const uint64_t in_slab = off % kSlabBytes;
      if (off >= capacity_bytes_ || in_slab % c->stride != 0 ||
          in_slab / c->stride >= c->frames_per_slab) {
        return absl::InvalidArgumentError(absl::StrCat(
            "page pool: recovered offset ", off, " is not a ", set.frame_bytes, "-byte frame"));
      }
      int32_t& owner = (*slab_class)[slab];
      if (owner != -1 && owner != static_cast<int32_t>(c->id)) {
        return absl::InvalidArgumentError(
            absl::StrCat("page pool: slab ", slab, " holds recovered frames of two sizes"));
      }
      owner = static_cast<int32_t>(c->id);
      all.push_back(off);
    }
  }
  std::sort(all.begin(), all.end());
  if (std::adjacent_find(all.begin(), all.end()) != all.end()) {
    return absl::InvalidArgumentError("page pool: a recovered frame is claimed twice");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<FrameSet>> PagePool::Recover(const std::vector<RecoveredFrames>& sets) {
  absl::MutexLock l(&mu_);
  if (counters_.allocations != 0 || next_unused_slab_ != 0 || frozen_) {
    return absl::FailedPreconditionError("page pool: Recover() on a pool already in use");
  }
  std::vector<int32_t> slab_class(num_slabs_, -1);
  RETURN_IF_ERROR(CheckRecoverLocked(sets, &slab_class));
  std::vector<std::vector<bool>> adopted(num_slabs_);
  for (const RecoveredFrames& set : sets) {
    const SizeClass* c = ClassForLocked(set.frame_bytes);
    for (uint64_t off : set.offsets) {
      std::vector<bool>& bits = adopted[off / kSlabBytes];
      bits.resize(c->frames_per_slab, false);
      bits[(off % kSlabBytes) / c->stride] = true;
    }
  }
  // Carve exactly the slabs that hold recovered frames; link only the other
  // frames into the free lists (a free-list link would overwrite data).
  for (uint64_t slab = 0; slab < num_slabs_; ++slab) {
    if (slab_class[slab] < 0) continue;
    SizeClass* c = classes_[slab_class[slab]].get();
    uint8_t* start = base_ + slab * kSlabBytes;
    uint32_t used = 0;
    for (uint64_t i = c->frames_per_slab; i-- > 0;) {
      if (adopted[slab][i]) {
        ++used;
      } else {
        c->PushFront(reinterpret_cast<FreeNode*>(start + i * c->stride));
      }
    }
    slabs_[slab].class_id = slab_class[slab];
    slabs_[slab].used = used;
    c->slabs++;
    c->frames_free += c->frames_per_slab - used;
    counters_.frames_free += c->frames_per_slab - used;
    counters_.reserved_bytes += kSlabBytes;
    next_unused_slab_ = slab + 1;
  }
  for (uint64_t slab = next_unused_slab_; slab-- > 0;) {
    if (slab_class[slab] < 0) free_slabs_.push_back(slab);
  }
  std::vector<FrameSet> out;
  for (const RecoveredFrames& set : sets) {
    SizeClass* c = ClassForLocked(set.frame_bytes);
    Tenant* t = GetTenantLocked(set.tenant);
    const uint64_t n = set.offsets.size();
    c->frames_used += n;
    counters_.frames_used += n;
    counters_.used_bytes += n * c->stride;
    counters_.allocations++;
    t->used_bytes += n * c->stride;
    t->frames += n;
    FrameSet fs;
    fs.pool_ = this;
    fs.tenant_ = t;
    fs.class_id_ = c->id;
    fs.frame_bytes_ = c->frame_bytes;
    for (uint64_t off : set.offsets) fs.frames_.push_back(base_ + off);
    out.push_back(std::move(fs));
  }
  return out;
}

PoolStats PagePool::Stats() const {
  PoolStats s;
  absl::ReaderMutexLock l(&mu_);
  s.capacity_bytes = capacity_bytes_;
  s.reserved_bytes = counters_.reserved_bytes;
  s.used_bytes = counters_.used_bytes;
  s.frames_used = counters_.frames_used;
  s.frames_free = counters_.frames_free;
  s.allocations = counters_.allocations;
  s.rejected = counters_.rejected;
  s.huge_pages = huge_pages_;
  for (const auto& c : classes_) {
    s.classes.push_back(
        SizeClassStats{c->id, c->frame_bytes, c->stride, c->slabs, c->frames_used, c->frames_free});
  }
  for (const auto& [name, t] : tenants_) {
    s.tenants.push_back(TenantPoolStats{name, t->used_bytes, t->quota, t->frames});
  }
  return s;
}

}  // namespace icecache
