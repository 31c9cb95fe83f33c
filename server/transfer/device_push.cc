#include "server/transfer/device_push.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace icecache {
namespace {

std::string HandleKey(const CudaIpcHandle& h) {
  return std::string(reinterpret_cast<const char*>(h.bytes.data()), h.bytes.size());
}

constexpr uint64_t kTableAlign = 64;
constexpr uint64_t kMinStaging = uint64_t{1} << 20;

uint64_t AlignUp(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

}  // namespace

IpcMemory::~IpcMemory() { cuda_->CloseIpcHandle(device_, ptr_).IgnoreError(); }

PushChannel::PushChannel(CudaRuntime* cuda, int device, void* stream, ScatterMode mode)
    : cuda_(cuda), device_(device), stream_(stream), mode_(mode) {}

PushChannel::~PushChannel() {
  absl::MutexLock l(&mu_);
  // Work recorded against a client's event may still run: let it finish
  // before the staging it reads goes.
  if (pending_) cuda_->SynchronizeStream(device_, stream_).IgnoreError();
  for (auto& [key, event] : events_) cuda_->DestroyEvent(device_, event).IgnoreError();
  if (pinned_ != nullptr) cuda_->FreePinned(pinned_).IgnoreError();
  if (device_staging_ != nullptr) cuda_->FreeDevice(device_, device_staging_).IgnoreError();
  cuda_->DestroyStream(device_, stream_).IgnoreError();
}

void PushChannel::Drain() {
  absl::MutexLock l(&mu_);
  if (!pending_) return;
  cuda_->SynchronizeStream(device_, stream_).IgnoreError();
  pending_ = false;
}

absl::Status PushChannel::Reserve(uint64_t bytes) {
  if (bytes <= pinned_bytes_) return absl::OkStatus();
  const uint64_t want = std::max(kMinStaging, std::max(bytes, 2 * pinned_bytes_));
  if (pinned_ != nullptr) cuda_->FreePinned(pinned_).IgnoreError();
  pinned_ = nullptr;
  pinned_bytes_ = 0;
  absl::StatusOr<void*> p = cuda_->AllocPinned(want);
  if (!p.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", want, " bytes of pinned staging: ", p.status().message()));
  }
  pinned_ = static_cast<uint8_t*>(*p);
  pinned_bytes_ = want;
  return absl::OkStatus();
}

absl::StatusOr<void*> PushChannel::EventLocked(const CudaIpcHandle& handle) {
  std::string key = HandleKey(handle);
  auto it = events_.find(key);
  if (it != events_.end()) return it->second;
  absl::StatusOr<void*> e = cuda_->OpenIpcEvent(device_, handle);
  if (!e.ok()) return e.status();
  events_.emplace(std::move(key), *e);
  return *e;
}

absl::Status PushChannel::Push(uint8_t* dst, const PushSpec& spec,
                               absl::FunctionRef<void(uint8_t*)> fill) {
  absl::MutexLock l(&mu_);
  if (pending_) {
    // The previous push returned before its copy ran (done event): it may
    // still read the staging this one is about to overwrite.
    if (absl::Status s = cuda_->SynchronizeStream(device_, stream_); !s.ok()) return s;
    pending_ = false;
  }
  const uint64_t tasks_at = AlignUp(spec.length, kTableAlign);
  const uint64_t total = spec.scatter == nullptr
                             ? spec.length
                             : tasks_at + spec.scatter->tasks.size() * sizeof(ScatterTask);
  if (absl::Status s = Reserve(total); !s.ok()) return s;
  fill(pinned_);
  if (spec.scatter != nullptr && !spec.scatter->tasks.empty()) {
    std::memcpy(pinned_ + tasks_at, spec.scatter->tasks.data(),
                spec.scatter->tasks.size() * sizeof(ScatterTask));
  }
  absl::Status s = Enqueue(dst, spec, tasks_at, total);
  if (!s.ok()) {
    // Whatever was enqueued may still read the staging.
    pending_ = true;
    return s;
  }
  if (spec.done_event != nullptr) {
    pending_ = true;
    return absl::OkStatus();
  }
  return cuda_->SynchronizeStream(device_, stream_);
}

absl::Status PushChannel::RecordDone(const CudaIpcHandle& done_event) {
  absl::MutexLock l(&mu_);
  absl::StatusOr<void*> e = EventLocked(done_event);
  if (!e.ok()) return e.status();
  return cuda_->RecordEvent(device_, stream_, *e);
}

absl::Status PushChannel::Enqueue(uint8_t* dst, const PushSpec& spec, uint64_t tasks_at,
                                  uint64_t total) {
  if (spec.wait_event != nullptr) {
    absl::StatusOr<void*> e = EventLocked(*spec.wait_event);
    if (!e.ok()) return e.status();
    if (absl::Status s = cuda_->StreamWaitEvent(device_, stream_, *e); !s.ok()) return s;
  }
  if (spec.scatter == nullptr) {
    if (absl::Status s =
            cuda_->CopyToDeviceAsync(device_, stream_, dst + spec.offset, pinned_, spec.length);
        !s.ok()) {
      return s;
    }
  } else {
    const uint8_t* src = nullptr;
    if (mode_ == ScatterMode::kZeroCopy) {
      absl::StatusOr<void*> mapped = cuda_->DevicePointerOf(pinned_);
      if (!mapped.ok()) return mapped.status();
      src = static_cast<const uint8_t*>(*mapped);
    } else {
      if (device_bytes_ < total) {
        if (device_staging_ != nullptr) cuda_->FreeDevice(device_, device_staging_).IgnoreError();
        device_staging_ = nullptr;
        device_bytes_ = 0;
        absl::StatusOr<void*> d = cuda_->AllocDevice(device_, pinned_bytes_);
        if (!d.ok()) return d.status();
        device_staging_ = static_cast<uint8_t*>(*d);
        device_bytes_ = pinned_bytes_;
      }
      // The one host -> device copy: pages and task table together.
      if (absl::Status s =
              cuda_->CopyToDeviceAsync(device_, stream_, device_staging_, pinned_, total);
          !s.ok()) {
        return s;
      }
      src = device_staging_;
    }
    const ScatterPlan& plan = *spec.scatter;
    if (absl::Status s = cuda_->LaunchScatter(device_, stream_, plan.geometry,
                                              reinterpret_cast<const ScatterTask*>(src + tasks_at),
                                              static_cast<uint32_t>(plan.tasks.size()), src, dst);
        !s.ok()) {
      return s;
    }
  }
  if (spec.done_event != nullptr) {
    absl::StatusOr<void*> e = EventLocked(*spec.done_event);
    if (!e.ok()) return e.status();
    if (absl::Status s = cuda_->RecordEvent(device_, stream_, *e); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<IpcMemory>> CudaClients::OpenMemory(const std::string& tenant,
                                                                   int device,
                                                                   const CudaIpcHandle& handle) {
  absl::MutexLock l(&mu_);
  MemoryKey key{tenant, device, HandleKey(handle)};
  auto it = memories_.find(key);
  if (it != memories_.end()) {
    if (std::shared_ptr<IpcMemory> live = it->second.lock()) return live;
  }
  absl::StatusOr<void*> p = cuda_->OpenIpcHandle(device, handle);
  if (!p.ok()) return p.status();
  auto mem = std::make_shared<IpcMemory>(cuda_, device, *p);
  memories_[key] = mem;
  return mem;
}

absl::StatusOr<std::shared_ptr<PushChannel>> CudaClients::Channel(const std::string& tenant,
                                                                  int device) {
  absl::MutexLock l(&mu_);
  ChannelKey key{tenant, device};
  auto it = channels_.find(key);
  if (it != channels_.end()) {
    if (std::shared_ptr<PushChannel> live = it->second.lock()) return live;
  }
  absl::StatusOr<void*> stream = cuda_->CreateStream(device);
  if (!stream.ok()) return stream.status();
  auto channel = std::make_shared<PushChannel>(cuda_, device, *stream, mode_);
  channels_[key] = channel;
  return channel;
}

size_t CudaClients::open_memories() const {
  absl::MutexLock l(&mu_);
  size_t n = 0;
  for (const auto& [k, w] : memories_) n += w.expired() ? 0 : 1;
  return n;
}

size_t CudaClients::channels() const {
  absl::MutexLock l(&mu_);
  size_t n = 0;
  for (const auto& [k, w] : channels_) n += w.expired() ? 0 : 1;
  return n;
}

}  // namespace icecache
