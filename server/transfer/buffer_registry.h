// BufferRegistry: client-registered destinations (and sources) of KV bytes
// (docs/architecture.md, "Buffers").
//
// HOST_SHM: a file under /dev/shm created and owned by the client; checked and
// mapped MAP_SHARED by common/shm_file.h (ShmFile::OpenChecked). CUDA_IPC: a
// 64-byte cudaIpcMemHandle + size + device UUID, opened through CudaRuntime;
// without a CUDA device registration answers FailedPrecondition
// "no CUDA device".
//
// Tenancy: a buffer belongs to the registering caller's tenant. Every call
// that names a buffer id answers NotFound ("buffer <id> not found") for ids
// of other tenants exactly as for unknown ids, so ids never leak across
// tenants (the same rule as sessions). Admin callers may List every
// tenant's buffers but, like everyone, use or unregister only their own.
//
// Lifetime: Unregister removes the id at once; the mapping stays alive until
// the last BufferLease (an in-flight append/fetch) is released (refcount).
// A buffer not used (Acquire) or kept alive (Touch/TouchTenant) for
// `idle_ttl` is dropped by ExpireIdle(), so a killed client's buffers go.
//
// Thread safety: all methods are thread-safe. A BufferLease may be used by one
// thread at a time; different leases (also of one buffer) concurrently.
#ifndef ICECACHE_SERVER_TRANSFER_BUFFER_REGISTRY_H_
#define ICECACHE_SERVER_TRANSFER_BUFFER_REGISTRY_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/caller.h"
#include "common/shm_file.h"
#include "server/transfer/cuda_runtime.h"
#include "server/transfer/device_push.h"
#include "server/transfer/gather.h"
#include "server/transfer/paged_kv_layout.h"
#include "server/transfer/write_log.h"

namespace icecache {

enum class BufferKind { kHostShm = 1, kCudaIpc = 2 };
std::string_view BufferKindName(BufferKind kind);  // "HOST_SHM", "CUDA_IPC"

struct BufferRegistryOptions {
  ShmOpenOptions shm;  // root (/dev/shm) and max mapping bytes
  uint64_t max_cuda_bytes = uint64_t{64} << 30;
  int max_buffers_per_tenant = 64;  // ResourceExhausted beyond
  // RegisterShm touches the pages the client's file already holds for at
  // most this long (ShmFile::TouchResidentPages), so a prefill's first chunk
  // and a decode's first gather do not fault the mapping in page by page.
  // Zero: none (every page faults in at its first use).
  absl::Duration touch_budget = absl::Seconds(2);
  // Buffers idle longer than this are dropped by ExpireIdle();
  // absl::InfiniteDuration() = never.
  absl::Duration idle_ttl = absl::Minutes(5);
  // Not owned; may be null (then CUDA_IPC answers "no CUDA device").
  CudaRuntime* cuda = nullptr;
  // How a scatter into a paged KV cache reads the staged pages
  // (docs/architecture.md §6.2).
  ScatterMode scatter_mode = ScatterMode::kStaged;
};

// What a fetch into a CUDA_IPC buffer asks of the device besides the bytes
// (docs/architecture.md §6.3): the destination blocks of a registered paged
// KV cache, and CUDA IPC events ordering the push against the client's
// stream. Handles are the client's cudaIpcEventHandle_t (64 bytes) or empty.
struct DeviceWrite {
  std::vector<uint32_t> block_ids;
  std::string wait_event;
  std::string done_event;
  bool empty() const { return block_ids.empty() && wait_event.empty() && done_event.empty(); }
};

struct BufferInfo {
  std::string id;  // opaque, 32 hex characters
  std::string tenant;
  BufferKind kind = BufferKind::kHostShm;
  uint64_t size = 0;        // registered bytes
  std::string path;         // HOST_SHM only
  std::string device_uuid;  // CUDA_IPC only, "GPU-..." form
  bool paged_kv = false;    // CUDA_IPC registered with a paged KV cache layout
  absl::Time created;
  absl::Time last_use;
  int64_t leases = 0;  // in-flight users
};

class BufferRegistry;

// A use of one registered buffer; keeps its mapping alive while it exists.
// Move-only RAII.
class BufferLease {
 public:
  BufferLease();
  ~BufferLease();
  BufferLease(BufferLease&&) noexcept;
  BufferLease& operator=(BufferLease&&) noexcept;
  BufferLease(const BufferLease&) = delete;
  BufferLease& operator=(const BufferLease&) = delete;

  const std::string& id() const;
  BufferKind kind() const;
  uint64_t size() const;  // registered size

  // The checks of Read/Write without moving a byte: [offset, offset + length)
  // inside the registered size (OutOfRange) and, for HOST_SHM, inside the
  // file as it is now (FailedPrecondition). Callers that must allocate to
  // receive `length` bytes check here first, so a request can never make the
  // daemon allocate more than the buffer holds.
  absl::Status CheckRegion(uint64_t offset, uint64_t length) const;

  // Checks [offset, offset + length) against the registered size (overflow
  // safe; OutOfRange "... exceeds buffer size ..." before any byte moves) and,
  // for HOST_SHM, that the file still covers it (fstat; FailedPrecondition
  // "buffer file shrank ..."). Then calls fill(dst) with `length` writable
  // bytes: the mapping itself for HOST_SHM (zero-copy), a staging area for
  // CUDA_IPC that is copied to the device after fill returns. fill runs under
  // RunSigbusGuarded, so a file truncated concurrently yields
  // FailedPrecondition instead of a crash; fill must obey its rules (no
  // resources, no locks). length == 0 is OK and calls nothing.
  //
  // `check`: kNow does the file check above; kChecked skips it, for a caller
  // that passed CheckRegion for a range holding this one in the same request
  // (one fstat per request instead of one per block: 1.4 us each on the
  // paravirtualised VMs here). The range check and the guard stay, so a file
  // truncated since is still caught, where whole pages past its end are
  // touched.
  enum class FileCheck { kNow, kChecked };
  absl::Status Write(uint64_t offset, uint64_t length, absl::FunctionRef<void(uint8_t*)> fill,
                     FileCheck check = FileCheck::kNow);

  // Copies [offset, offset + length) of a HOST_SHM buffer into `dst` with the
  // same checks and guard. FailedPrecondition for CUDA_IPC buffers
  // ("reading KV from a CUDA_IPC buffer is not supported").
  absl::Status Read(uint64_t offset, uint64_t length, void* dst, FileCheck check = FileCheck::kNow);

  // Runs `fn` on the mapped bytes [offset, offset + length) of a HOST_SHM
  // buffer, in place, after Read's checks and under one SIGBUS guard: for a
  // loop that watches a word the client writes (the decode ring's request
  // sequence) without a check and a guard per look. `fn` obeys the guard's
  // rules (no resources, no locks held where it touches the bytes).
  absl::Status ReadInPlace(uint64_t offset, uint64_t length,
                           absl::FunctionRef<void(const uint8_t*)> fn);

  // Writes a fetch (`layout`, planned against this buffer's size) whose bytes
  // `fill` produces. Without `device` fields this is Write(layout.buffer_offset,
  // layout.total_bytes, fill). With block_ids the pages are scattered into the
  // registered paged KV cache instead (PlanScatter's codes; FailedPrecondition
  // when the buffer has no paged_kv layout); events order the push
  // (InvalidArgument for a handle that is not 64 bytes, naming the field).
  // Device fields on a HOST_SHM buffer: InvalidArgument. Nothing is written
  // before every check passed.
  // `frames` (optional): the pages `fill` gathers, in order; a CUDA_IPC
  // buffer's push may then read them in place (device_push.h, the direct
  // mode) and not call `fill`.
  absl::Status WriteFetch(const FetchLayout& layout, const DeviceWrite& device,
                          absl::FunctionRef<void(uint8_t*)> fill, const PageFrames& frames = {});

  // Records the client's done event (a cudaIpcEventHandle_t) on the buffer's
  // push stream after the pushes enqueued so far, for a fetch whose bytes a
  // background push already wrote (layer-group prefetch). InvalidArgument
  // for a handle that is not 64 bytes or a HOST_SHM buffer; Internal for
  // CUDA errors.
  absl::Status SignalDone(const std::string& done_event);

  // False once the buffer was unregistered, expired or dropped with its
  // tenant (the lease keeps the mapping alive; background work stops).
  bool registered() const;

  // The buffer's write log (write_log.h), shared by every lease of it: every
  // daemon write into the buffer notes itself there first (Session's fetches
  // with the session's writer id, the decode ring's responses with
  // WriteLog::kNoWriter). Write and WriteFetch do not note by themselves.
  uint64_t NoteWrite(uint64_t writer, uint64_t offset, uint64_t bytes);
  bool WrittenSince(uint64_t writer, uint64_t offset, uint64_t bytes, uint64_t stamp) const;

  struct Entry;  // internal to buffer_registry.cc

  // A write in flight (WriteLog::Claim): holds [offset, offset + bytes) of
  // the buffer for `writer` until destroyed. Move-only RAII.
  class WriteClaim {
   public:
    WriteClaim() = default;
    ~WriteClaim();
    WriteClaim(WriteClaim&& o) noexcept;
    WriteClaim& operator=(WriteClaim&& o) noexcept;
    WriteClaim(const WriteClaim&) = delete;
    WriteClaim& operator=(const WriteClaim&) = delete;

   private:
    friend class BufferLease;
    std::shared_ptr<Entry> entry_;
    uint64_t id_ = 0;
  };
  // Claims the bytes a session's write is about to write, before anything
  // of the write happens. FailedPrecondition naming both ranges when another
  // writer's write into overlapping bytes of this buffer runs now (two
  // sessions given one region: the client would read a mix of both).
  absl::StatusOr<WriteClaim> ClaimWrite(uint64_t writer, uint64_t offset, uint64_t bytes);
  size_t writes_in_flight() const;

 private:
  friend class BufferRegistry;
  std::shared_ptr<Entry> entry_;
};

class BufferRegistry {
 public:
  // InvalidArgument for a non-positive max_buffers_per_tenant.
  static absl::StatusOr<std::unique_ptr<BufferRegistry>> Create(
      const BufferRegistryOptions& options);
  ~BufferRegistry();

  // Registers a HOST_SHM buffer: ShmFile::OpenChecked(path, size, caller.uid)
  // (InvalidArgument: path outside the root, '..', symlink, not a regular
  // file, size 0 / too large / larger than the file; PermissionDenied: file
  // not owned by caller.uid; NotFound: no such file), ResourceExhausted when
  // the tenant has max_buffers_per_tenant buffers, InvalidArgument for a bad
  // tenant name.
  absl::StatusOr<BufferInfo> RegisterShm(const Caller& caller, std::string_view path, uint64_t size,
                                         absl::Time now);
  // Registers a CUDA_IPC buffer. The form first, the same with or without a
  // device: handle 64 bytes and not all zero, uuid valid, 0 < size <=
  // max_cuda_bytes (InvalidArgument); then
  // FailedPrecondition "no CUDA device ..." without a device, NotFound for an
  // unknown device UUID, Internal when cudaIpcOpenMemHandle fails.
  // `paged_kv` (may be null): the allocation is an engine's paged KV cache
  // with this layout, checked against `size` with the form (ResolveKvLayout:
  // InvalidArgument / OutOfRange naming the paged_kv field).
  absl::StatusOr<BufferInfo> RegisterCudaIpc(const Caller& caller, std::string_view handle_bytes,
                                             uint64_t size, std::string_view device_uuid,
                                             absl::Time now,
                                             const PagedKvLayout* paged_kv = nullptr);
  // NotFound for unknown ids and other tenants' ids.
  absl::Status Unregister(const Caller& caller, std::string_view id);
  absl::StatusOr<BufferInfo> Get(const Caller& caller, std::string_view id) const;
  // The caller's tenant's buffers (admin: all), sorted by id.
  std::vector<BufferInfo> List(const Caller& caller) const;

  // Takes a lease (refcount) on the caller's buffer and marks it used at
  // `now`. NotFound for unknown ids and other tenants' ids.
  absl::StatusOr<BufferLease> Acquire(const Caller& caller, std::string_view id, absl::Time now);

  // Keep-alive: marks one buffer / every buffer of `tenant` used at `now`.
  absl::Status Touch(const Caller& caller, std::string_view id, absl::Time now);
  void TouchTenant(std::string_view tenant, absl::Time now);

  // Drops buffers idle since before now - idle_ttl (leased buffers stay
  // mapped until released). Returns how many were dropped.
  int ExpireIdle(absl::Time now);
  // Drops every buffer of `tenant`; returns how many.
  int DropTenant(std::string_view tenant);
  size_t size() const;

  // What pushes to GPUs may read in place (device_push.h; set once the
  // pool is pinned). Null without a CUDA runtime.
  PinnedRegion* pinned_region() { return clients_ == nullptr ? nullptr : &clients_->region(); }
  const PinnedRegion* pinned_region() const {
    return clients_ == nullptr ? nullptr : &clients_->region();
  }
  // Pushes to GPUs by path (null without a CUDA runtime).
  const PushCounts* push_counts() const {
    return clients_ == nullptr ? nullptr : &clients_->counts();
  }

 private:
  explicit BufferRegistry(const BufferRegistryOptions& options);
  absl::StatusOr<BufferInfo> Insert(const Caller& caller, std::shared_ptr<BufferLease::Entry> e,
                                    absl::Time now);
  // One registered buffer: its shared state (also held by leases) and the
  // registry's own bookkeeping.
  struct Slot {
    std::shared_ptr<BufferLease::Entry> entry;
    absl::Time last_use;  // last Acquire/Touch; drives ExpireIdle
  };
  // The caller's slot for `id`, or null (unknown id or another tenant's).
  Slot* FindLocked(const Caller& caller, std::string_view id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  const Slot* FindLocked(const Caller& caller, std::string_view id) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const BufferRegistryOptions options_;
  // Opened IPC allocations and push channels per (tenant, device); null
  // without a CUDA runtime.
  std::unique_ptr<CudaClients> clients_;
  mutable absl::Mutex mu_;
  std::map<std::string, Slot, std::less<>> buffers_ ABSL_GUARDED_BY(mu_);
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_TRANSFER_BUFFER_REGISTRY_H_
