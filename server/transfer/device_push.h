// The push of fetched pages to a client's GPU (docs/architecture.md §6.3).
//
// CudaClients keeps, per (tenant, device):
//   - the client's opened IPC allocations, one open per (tenant, device,
//     handle), shared by every buffer registered on it and closed
//     (cudaIpcCloseMemHandle) when the last such buffer is unregistered,
//     expires or is dropped with its tenant;
//   - one PushChannel: a stream of its own, a pinned staging area, a device
//     staging area and the client's opened IPC events, destroyed with the
//     last buffer of that (tenant, device).
// A push is one request: the gather fills the pinned staging, then ONE
// host -> device copy (to the client's region, or, for a scatter, of pages
// and task table to the device staging followed by the scatter kernel), on
// the channel's stream. Without events the push waits for its stream
// (synchronous, the default). With a wait event the stream first waits on
// the client's event; with a done event the daemon records it after the work
// and returns at once (the client's stream waits on it); the next push on the
// channel waits for that work before it reuses the staging.
//
// Reading in place (the direct mode): when the push names the page frames
// its bytes are gathered from and they all lie in the channel's
// PinnedRegion (the page pool's arena, pinned and mapped by HostPinner), the
// CPU gathers nothing: one small host -> device copy moves the task and
// frame tables, and the scatter kernel (or, for a plain buffer, the frame
// gather kernel) reads the pages over the bus where they lie. Such a push
// always waits for its stream before it returns (a done event is still
// recorded for the client): the pool's pages must not be reused while the
// device reads them; the staged path holds its own copy. Frames outside the
// region, a region not pinned (yet), or misaligned frames take the staged
// path.
//
// Every CUDA error comes back as the runtime's status (Internal, naming the
// call). Thread safety: CudaClients is thread-safe; a PushChannel serialises
// its pushes with its own mutex. Handles are released through the runtime,
// which must outlive this object and everything it returned.
#ifndef ICECACHE_SERVER_TRANSFER_DEVICE_PUSH_H_
#define ICECACHE_SERVER_TRANSFER_DEVICE_PUSH_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/transfer/cuda_runtime.h"
#include "server/transfer/paged_kv_layout.h"

namespace icecache {

enum class ScatterMode {
  kStaged = 0,    // one H2D copy into device staging, then the kernel
  kZeroCopy = 1,  // the kernel reads the pinned staging over the bus
};

// Host memory the device may read in place: [base, base + bytes), pinned and
// mapped, at device address host + delta. Empty until Set (the pool's arena
// is pinned in the background at start). Thread-safe.
class PinnedRegion {
 public:
  struct View {
    const uint8_t* base = nullptr;
    uint64_t bytes = 0;
    intptr_t delta = 0;  // device address - host address
    bool Covers(const uint8_t* p, uint64_t n) const {
      return base != nullptr && p >= base && n <= bytes &&
             static_cast<uint64_t>(p - base) <= bytes - n;
    }
  };
  void Set(const uint8_t* base, uint64_t bytes, intptr_t delta) ABSL_LOCKS_EXCLUDED(mu_);
  View Get() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  mutable absl::Mutex mu_;
  View view_ ABSL_GUARDED_BY(mu_);
};

// Pushes by path over every channel that shares this (metrics).
struct PushCounts {
  std::atomic<uint64_t> in_place{0};  // the device read the pages where they lie
  std::atomic<uint64_t> staged{0};    // gathered into pinned staging first
};

// One client allocation opened in this process; closed on destruction.
class IpcMemory {
 public:
  IpcMemory(CudaRuntime* cuda, int device, void* ptr) : cuda_(cuda), device_(device), ptr_(ptr) {}
  ~IpcMemory();
  IpcMemory(const IpcMemory&) = delete;
  IpcMemory& operator=(const IpcMemory&) = delete;
  uint8_t* data() const { return static_cast<uint8_t*>(ptr_); }
  int device() const { return device_; }

 private:
  CudaRuntime* const cuda_;
  const int device_;
  void* const ptr_;
};

// Page frames in host memory, in staging order: frame i is `bytes` bytes at
// data[i] (count x bytes == the staged length).
struct PageFrames {
  const uint8_t* const* data = nullptr;
  size_t count = 0;
  uint64_t bytes = 0;
};

// What one push does besides filling the staging.
struct PushSpec {
  uint64_t offset = 0;                        // plain copy: where in the allocation
  uint64_t length = 0;                        // plain copy: bytes; scatter: staged bytes
  const ScatterPlan* scatter = nullptr;       // set: scatter instead of the plain copy
  const CudaIpcHandle* wait_event = nullptr;  // the client's event to wait on
  const CudaIpcHandle* done_event = nullptr;  // the client's event to record
  // The staged bytes as the page frames they are gathered from: lets the
  // device read them in place (the direct mode); `fill` is then not called.
  PageFrames frames;
};

class PushChannel {
 public:
  // `region` (may be null): what the device may read in place; `counts`
  // (may be null): totals this channel adds its pushes to.
  PushChannel(CudaRuntime* cuda, int device, void* stream, ScatterMode mode,
              std::shared_ptr<const PinnedRegion> region = nullptr,
              std::shared_ptr<PushCounts> counts = nullptr);
  ~PushChannel();
  PushChannel(const PushChannel&) = delete;
  PushChannel& operator=(const PushChannel&) = delete;

  // Fills the pinned staging through `fill` (spec.length bytes) and moves it
  // to `dst` (the client's allocation) as described above. The caller has
  // checked every offset against the registered size (and planned the
  // scatter against it). Internal for CUDA errors, ResourceExhausted when
  // staging cannot be allocated.
  absl::Status Push(uint8_t* dst, const PushSpec& spec, absl::FunctionRef<void(uint8_t*)> fill)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Records the client's `done_event` on the channel's stream now: after
  // every push enqueued so far (a layer prefetched in the background whose
  // call carries a done event; docs/architecture.md §6.3). Internal for
  // CUDA errors.
  absl::Status RecordDone(const CudaIpcHandle& done_event) ABSL_LOCKS_EXCLUDED(mu_);
  // Waits for work still running from an earlier push (done event), so the
  // memory it writes can be closed. Errors are dropped (nothing to tell).
  void Drain() ABSL_LOCKS_EXCLUDED(mu_);
  // Pushes that read the pages in place / through the staging so far.
  uint64_t pushes_in_place() const { return in_place_.load(std::memory_order_relaxed); }
  uint64_t pushes_staged() const { return staged_.load(std::memory_order_relaxed); }

 private:
  // The direct mode: false (nothing done) when the frames cannot be read in
  // place; then the staged path runs.
  absl::StatusOr<bool> PushInPlace(uint8_t* dst, const PushSpec& spec)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // PushInPlace's device work: tables to the device, the kernel, the events.
  absl::Status EnqueueInPlace(uint8_t* dst, const PushSpec& spec, uint32_t word, uint64_t frames_at,
                              uint64_t total) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status EnsureDeviceStaging(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Reserve(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<void*> EventLocked(const CudaIpcHandle& handle) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Enqueue(uint8_t* dst, const PushSpec& spec, uint64_t tasks_at, uint64_t total)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  CudaRuntime* const cuda_;
  const int device_;
  void* const stream_;
  const ScatterMode mode_;
  const std::shared_ptr<const PinnedRegion> region_;
  const std::shared_ptr<PushCounts> counts_;
  std::atomic<uint64_t> in_place_{0};
  std::atomic<uint64_t> staged_{0};
  absl::Mutex mu_;
  uint8_t* pinned_ ABSL_GUARDED_BY(mu_) = nullptr;
  uint64_t pinned_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint8_t* device_staging_ ABSL_GUARDED_BY(mu_) = nullptr;
  uint64_t device_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool pending_ ABSL_GUARDED_BY(mu_) = false;  // async work may still read the staging
  std::map<std::string, void*> events_ ABSL_GUARDED_BY(mu_);  // handle bytes -> opened
};

class CudaClients {
 public:
  CudaClients(CudaRuntime* cuda, ScatterMode mode)
      : cuda_(cuda),
        mode_(mode),
        region_(std::make_shared<PinnedRegion>()),
        counts_(std::make_shared<PushCounts>()) {}

  // What every channel may read in place (set once the pool is pinned).
  PinnedRegion& region() { return *region_; }
  const PinnedRegion& region() const { return *region_; }
  // Pushes by path, every channel so far.
  const PushCounts& counts() const { return *counts_; }

  // The tenant's allocation `handle` on `device`, opened on first use.
  // Errors of cudaIpcOpenMemHandle as Internal.
  absl::StatusOr<std::shared_ptr<IpcMemory>> OpenMemory(const std::string& tenant, int device,
                                                        const CudaIpcHandle& handle)
      ABSL_LOCKS_EXCLUDED(mu_);
  // The tenant's channel on `device`, made on first use (Internal when the
  // stream cannot be created).
  absl::StatusOr<std::shared_ptr<PushChannel>> Channel(const std::string& tenant, int device)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Live opened allocations / channels (for tests and metrics).
  size_t open_memories() const ABSL_LOCKS_EXCLUDED(mu_);
  size_t channels() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  using MemoryKey = std::tuple<std::string, int, std::string>;
  using ChannelKey = std::tuple<std::string, int>;
  CudaRuntime* const cuda_;
  const ScatterMode mode_;
  const std::shared_ptr<PinnedRegion> region_;
  const std::shared_ptr<PushCounts> counts_;
  mutable absl::Mutex mu_;
  std::map<MemoryKey, std::weak_ptr<IpcMemory>> memories_ ABSL_GUARDED_BY(mu_);
  std::map<ChannelKey, std::weak_ptr<PushChannel>> channels_ ABSL_GUARDED_BY(mu_);
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_TRANSFER_DEVICE_PUSH_H_
