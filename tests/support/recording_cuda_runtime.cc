#include "tests/support/recording_cuda_runtime.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/transfer/paged_kv_layout.h"

namespace icecache::testing {
namespace {

std::string Key(const CudaIpcHandle& h) {
  return std::string(reinterpret_cast<const char*>(h.bytes.data()), h.bytes.size());
}

CudaIpcHandle HandleFromCounter(uint64_t n, uint8_t tag) {
  CudaIpcHandle h;
  h.bytes[0] = tag;
  std::memcpy(h.bytes.data() + 8, &n, sizeof(n));
  return h;
}

void* Token(uint64_t n) { return reinterpret_cast<void*>(uintptr_t{0x10000} + n * 16); }

}  // namespace

RecordingCudaRuntime::RecordingCudaRuntime(int devices) : devices_(devices) {}
RecordingCudaRuntime::~RecordingCudaRuntime() = default;

CudaDeviceUuid RecordingCudaRuntime::UuidOf(int device) {
  CudaDeviceUuid u;
  u.bytes[0] = static_cast<uint8_t>(device + 1);
  return u;
}

CudaIpcHandle RecordingCudaRuntime::AddPeerAllocation(int device, uint64_t size, uint8_t** data) {
  std::lock_guard<std::mutex> l(mu_);
  CudaIpcHandle h = HandleFromCounter(next_handle_++, 0x4d);
  auto mem = std::make_unique<uint8_t[]>(size);
  std::memset(mem.get(), 0, size);
  *data = mem.get();
  regions_[mem.get()] = Region{mem.get(), size};
  peer_size_[Key(h)] = size;
  peer_memory_[Key(h)] = std::move(mem);
  return h;
}

CudaIpcHandle RecordingCudaRuntime::AddPeerEvent() {
  std::lock_guard<std::mutex> l(mu_);
  CudaIpcHandle h = HandleFromCounter(next_handle_++, 0x45);
  peer_events_.insert(Key(h));
  return h;
}

std::vector<CudaCall> RecordingCudaRuntime::calls() const {
  std::lock_guard<std::mutex> l(mu_);
  return calls_;
}

std::vector<std::string> RecordingCudaRuntime::ops() const {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<std::string> out;
  for (const CudaCall& c : calls_) out.push_back(c.op);
  return out;
}

void RecordingCudaRuntime::ClearCalls() {
  std::lock_guard<std::mutex> l(mu_);
  calls_.clear();
}

int RecordingCudaRuntime::violations() const {
  std::lock_guard<std::mutex> l(mu_);
  return violations_;
}

void RecordingCudaRuntime::FailNext(const std::string& op, int skip) {
  std::lock_guard<std::mutex> l(mu_);
  fail_next_[op] = skip;
}

std::vector<std::pair<void*, size_t>> RecordingCudaRuntime::registered() const {
  std::lock_guard<std::mutex> l(mu_);
  return registered_;
}

std::vector<void*> RecordingCudaRuntime::unregistered() const {
  std::lock_guard<std::mutex> l(mu_);
  return unregistered_;
}

int RecordingCudaRuntime::open_handles() const {
  std::lock_guard<std::mutex> l(mu_);
  return static_cast<int>(opened_.size());
}
int RecordingCudaRuntime::live_streams() const {
  std::lock_guard<std::mutex> l(mu_);
  return static_cast<int>(streams_.size());
}
int RecordingCudaRuntime::live_allocations() const {
  std::lock_guard<std::mutex> l(mu_);
  return static_cast<int>(owned_.size());
}
int RecordingCudaRuntime::live_events() const {
  std::lock_guard<std::mutex> l(mu_);
  return static_cast<int>(events_.size());
}

absl::Status RecordingCudaRuntime::RecordLocked(const std::string& op, int device, uint64_t bytes,
                                                const void* ptr) {
  calls_.push_back(CudaCall{op, device, bytes, ptr});
  auto it = fail_next_.find(op);
  if (it != fail_next_.end() && it->second-- == 0) {
    fail_next_.erase(it);
    return absl::InternalError(absl::StrCat(op, ": injected CUDA error"));
  }
  return absl::OkStatus();
}

bool RecordingCudaRuntime::InsideLocked(const void* p, uint64_t n) const {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  auto it = regions_.upper_bound(p);
  if (it == regions_.begin()) return false;
  --it;
  const Region& r = it->second;
  return b >= r.base && n <= r.size && static_cast<uint64_t>(b - r.base) <= r.size - n;
}

bool RecordingCudaRuntime::ReadableLocked(const void* p, uint64_t n) const {
  if (InsideLocked(p, n)) return true;
  const uint8_t* b = static_cast<const uint8_t*>(p);
  for (const auto& [base, size] : registered_) {
    if (std::find(unregistered_.begin(), unregistered_.end(), base) != unregistered_.end()) {
      continue;
    }
    const uint8_t* r = static_cast<const uint8_t*>(base);
    if (b >= r && n <= size && static_cast<uint64_t>(b - r) <= size - n) return true;
  }
  return false;
}

absl::Status RecordingCudaRuntime::CheckDeviceLocked(int device) const {
  if (device < 0 || device >= devices_) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA device ", device, " out of range"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> RecordingCudaRuntime::FindDevice(const CudaDeviceUuid& uuid) const {
  for (int d = 0; d < devices_; ++d) {
    if (UuidOf(d).bytes == uuid.bytes) return d;
  }
  return absl::NotFoundError(absl::StrCat("no CUDA device with UUID ", uuid.ToString()));
}

absl::StatusOr<void*> RecordingCudaRuntime::OpenIpcHandle(int device, const CudaIpcHandle& h) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = peer_memory_.find(Key(h));
  void* p = it == peer_memory_.end() ? nullptr : it->second.get();
  if (absl::Status s = RecordLocked("open_ipc", device, 0, p); !s.ok()) return s;
  if (absl::Status s = CheckDeviceLocked(device); !s.ok()) return s;
  if (p == nullptr) return absl::InternalError("cudaIpcOpenMemHandle: invalid argument");
  if (!opened_.insert(p).second) {
    return absl::InternalError("cudaIpcOpenMemHandle: handle already opened in this process");
  }
  return p;
}

absl::Status RecordingCudaRuntime::CloseIpcHandle(int device, void* p) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("close_ipc", device, 0, p));
  if (opened_.erase(p) == 0) return absl::InternalError("cudaIpcCloseMemHandle: not open");
  return absl::OkStatus();
}

absl::Status RecordingCudaRuntime::CopyToDevice(int device, void* dst, const void* src, size_t n) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("copy_h2d_sync", device, n, dst));
  if (!InsideLocked(dst, n)) {
    ++violations_;
    return absl::InternalError("copy_h2d_sync: out of bounds");
  }
  std::memcpy(dst, src, n);
  return absl::OkStatus();
}

absl::Status RecordingCudaRuntime::HostRegister(void* p, size_t n) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("host_register", -1, n, p));
  registered_.emplace_back(p, n);
  return absl::OkStatus();
}
absl::Status RecordingCudaRuntime::HostUnregister(void* p) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("host_unregister", -1, 0, p));
  unregistered_.push_back(p);
  return absl::OkStatus();
}

absl::StatusOr<void*> RecordingCudaRuntime::CreateStream(int device) {
  std::lock_guard<std::mutex> l(mu_);
  void* s = Token(next_handle_++);
  RETURN_IF_ERROR(RecordLocked("create_stream", device, 0, s));
  RETURN_IF_ERROR(CheckDeviceLocked(device));
  streams_.insert(s);
  return s;
}
absl::Status RecordingCudaRuntime::DestroyStream(int device, void* stream) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("destroy_stream", device, 0, stream));
  if (streams_.erase(stream) == 0) return absl::InternalError("cudaStreamDestroy: bad stream");
  return absl::OkStatus();
}

absl::StatusOr<void*> RecordingCudaRuntime::AllocPinned(size_t n) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("alloc_pinned", -1, n, nullptr));
  auto mem = std::make_unique<uint8_t[]>(n);
  void* p = mem.get();
  regions_[p] = Region{mem.get(), n};
  owned_[p] = std::move(mem);
  return p;
}
absl::Status RecordingCudaRuntime::FreePinned(void* p) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("free_pinned", -1, 0, p));
  regions_.erase(p);
  if (owned_.erase(p) == 0) return absl::InternalError("cudaFreeHost: not allocated");
  return absl::OkStatus();
}
absl::StatusOr<void*> RecordingCudaRuntime::DevicePointerOf(void* pinned) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("device_pointer_of", -1, 0, pinned));
  if (!ReadableLocked(pinned, 1)) {
    return absl::InternalError("cudaHostGetDevicePointer: invalid argument (not pinned memory)");
  }
  return pinned;  // unified addressing: the same address
}
absl::StatusOr<void*> RecordingCudaRuntime::AllocDevice(int device, size_t n) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("alloc_device", device, n, nullptr));
  auto mem = std::make_unique<uint8_t[]>(n);
  void* p = mem.get();
  regions_[p] = Region{mem.get(), n};
  owned_[p] = std::move(mem);
  return p;
}
absl::Status RecordingCudaRuntime::FreeDevice(int device, void* p) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("free_device", device, 0, p));
  regions_.erase(p);
  if (owned_.erase(p) == 0) return absl::InternalError("cudaFree: not allocated");
  return absl::OkStatus();
}

absl::Status RecordingCudaRuntime::CopyToDeviceAsync(int device, void* stream, void* dst,
                                                     const void* src, size_t n) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("copy_h2d", device, n, dst));
  if (streams_.count(stream) == 0) return absl::InternalError("cudaMemcpyAsync: bad stream");
  if (!InsideLocked(dst, n) || !InsideLocked(src, n)) {
    ++violations_;
    return absl::InternalError("copy_h2d: out of bounds");
  }
  std::memcpy(dst, src, n);
  return absl::OkStatus();
}

absl::Status RecordingCudaRuntime::LaunchScatter(int device, void* stream, const ScatterGeometry& g,
                                                 const ScatterTask* tasks, uint32_t n,
                                                 const ScatterSource& src, uint8_t* dst) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(
      RecordLocked(src.frames != nullptr ? "scatter_in_place" : "scatter", device, n, dst));
  if (streams_.count(stream) == 0) return absl::InternalError("scatter: bad stream");
  if (!InsideLocked(tasks, uint64_t{n} * sizeof(ScatterTask))) {
    ++violations_;
    return absl::InternalError("scatter: task table out of bounds");
  }
  for (uint32_t i = 0; i < n; ++i) {
    for (int kv = 0; kv < 2; ++kv) {
      for (uint32_t t = 0; t < g.block_tokens; ++t) {
        const uint64_t s = ScatterSrcRow(g, tasks[i], kv, t);
        if (s != kNoSource && src.frames != nullptr &&
            !InsideLocked(src.frames + s / src.frame_bytes, sizeof(const uint8_t*))) {
          ++violations_;
          return absl::InternalError("scatter: frame table out of bounds");
        }
        if (!InsideLocked(dst + ScatterDstRow(g, tasks[i], kv, t), g.row_bytes) ||
            (s != kNoSource && !ReadableLocked(SourceAt(src, s), g.row_bytes))) {
          ++violations_;
          return absl::InternalError("scatter: out of bounds");
        }
      }
    }
  }
  ScatterOnHost(g, tasks, n, src, dst);
  return absl::OkStatus();
}

absl::Status RecordingCudaRuntime::LaunchGatherFrames(int device, void* stream,
                                                      const uint8_t* const* frames, uint32_t count,
                                                      uint64_t frame_bytes, uint32_t word_bytes,
                                                      uint8_t* dst) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("gather_frames", device, count, dst));
  if (streams_.count(stream) == 0) return absl::InternalError("gather_frames: bad stream");
  if (!InsideLocked(frames, uint64_t{count} * sizeof(const uint8_t*)) ||
      !InsideLocked(dst, uint64_t{count} * frame_bytes)) {
    ++violations_;
    return absl::InternalError("gather_frames: out of bounds");
  }
  for (uint32_t i = 0; i < count; ++i) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(frames[i]) | reinterpret_cast<uintptr_t>(dst);
    if (word_bytes == 0 || frame_bytes % word_bytes != 0 || a % word_bytes != 0) {
      ++violations_;
      return absl::InternalError("gather_frames: misaligned word");
    }
    if (!ReadableLocked(frames[i], frame_bytes)) {
      ++violations_;
      return absl::InternalError("gather_frames: frame out of bounds");
    }
  }
  for (uint32_t i = 0; i < count; ++i) std::memcpy(dst + i * frame_bytes, frames[i], frame_bytes);
  return absl::OkStatus();
}

absl::StatusOr<void*> RecordingCudaRuntime::OpenIpcEvent(int device, const CudaIpcHandle& h) {
  std::lock_guard<std::mutex> l(mu_);
  void* e = Token(next_handle_++);
  RETURN_IF_ERROR(RecordLocked("open_event", device, 0, e));
  if (peer_events_.count(Key(h)) == 0) {
    return absl::InternalError("cudaIpcOpenEventHandle: invalid resource handle");
  }
  events_.insert(e);
  return e;
}
absl::Status RecordingCudaRuntime::DestroyEvent(int device, void* event) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("destroy_event", device, 0, event));
  if (events_.erase(event) == 0) return absl::InternalError("cudaEventDestroy: bad event");
  return absl::OkStatus();
}
absl::Status RecordingCudaRuntime::StreamWaitEvent(int device, void* stream, void* event) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("wait_event", device, 0, event));
  if (events_.count(event) == 0) return absl::InternalError("cudaStreamWaitEvent: bad event");
  return absl::OkStatus();
}
absl::Status RecordingCudaRuntime::RecordEvent(int device, void* stream, void* event) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("record_event", device, 0, event));
  if (events_.count(event) == 0) return absl::InternalError("cudaEventRecord: bad event");
  return absl::OkStatus();
}
absl::Status RecordingCudaRuntime::SynchronizeStream(int device, void* stream) {
  std::lock_guard<std::mutex> l(mu_);
  RETURN_IF_ERROR(RecordLocked("sync", device, 0, stream));
  if (streams_.count(stream) == 0) return absl::InternalError("cudaStreamSynchronize: bad stream");
  return absl::OkStatus();
}

}  // namespace icecache::testing
