#include "server/transfer/device_push.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace icecache {
namespace {

std::string HandleKey(const CudaIpcHandle& h) {
  return std::string(reinterpret_cast<const char*>(h.bytes.data()), h.bytes.size());
}

constexpr uint64_t kTableAlign = 64;
constexpr uint64_t kMinStaging = uint64_t{1} << 20;

uint64_t AlignUp(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

}  // namespace

void PinnedRegion::Set(const uint8_t* base, uint64_t bytes, intptr_t delta) {
  absl::MutexLock l(&mu_);
  view_ = View{base, bytes, delta};
}

PinnedRegion::View PinnedRegion::Get() const {
  absl::MutexLock l(&mu_);
  return view_;
}

IpcMemory::~IpcMemory() { cuda_->CloseIpcHandle(device_, ptr_).IgnoreError(); }

PushChannel::PushChannel(CudaRuntime* cuda, int device, void* stream, ScatterMode mode,
                         std::shared_ptr<const PinnedRegion> region,
                         std::shared_ptr<PushCounts> counts)
    : cuda_(cuda),
      device_(device),
      stream_(stream),
      mode_(mode),
      region_(std::move(region)),
      counts_(std::move(counts)) {}

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
  if (spec.frames.data != nullptr && region_ != nullptr) {
    absl::StatusOr<bool> done = PushInPlace(dst, spec);
    if (!done.ok()) return done.status();
    if (*done) {
      in_place_.fetch_add(1, std::memory_order_relaxed);
      if (counts_ != nullptr) counts_->in_place.fetch_add(1, std::memory_order_relaxed);
      return absl::OkStatus();
    }
  }
  staged_.fetch_add(1, std::memory_order_relaxed);
  if (counts_ != nullptr) counts_->staged.fetch_add(1, std::memory_order_relaxed);
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

absl::Status PushChannel::EnsureDeviceStaging(uint64_t bytes) {
  if (device_bytes_ >= bytes) return absl::OkStatus();
  if (device_staging_ != nullptr) cuda_->FreeDevice(device_, device_staging_).IgnoreError();
  device_staging_ = nullptr;
  device_bytes_ = 0;
  const uint64_t want = std::max(bytes, pinned_bytes_);
  absl::StatusOr<void*> d = cuda_->AllocDevice(device_, want);
  if (!d.ok()) return d.status();
  device_staging_ = static_cast<uint8_t*>(*d);
  device_bytes_ = want;
  return absl::OkStatus();
}

absl::Status PushChannel::EnqueueInPlace(uint8_t* dst, const PushSpec& spec, uint32_t word,
                                         uint64_t frames_at, uint64_t total) {
  const ScatterPlan* plan = spec.scatter;
  const PageFrames& f = spec.frames;
  RETURN_IF_ERROR(EnsureDeviceStaging(total));
  if (spec.wait_event != nullptr) {
    ASSIGN_OR_RETURN(void* e, EventLocked(*spec.wait_event));
    RETURN_IF_ERROR(cuda_->StreamWaitEvent(device_, stream_, e));
  }
  RETURN_IF_ERROR(cuda_->CopyToDeviceAsync(device_, stream_, device_staging_, pinned_, total));
  const auto* frames = reinterpret_cast<const uint8_t* const*>(device_staging_ + frames_at);
  if (plan != nullptr) {
    ScatterSource src;
    src.frames = frames;
    src.frame_bytes = f.bytes;
    RETURN_IF_ERROR(cuda_->LaunchScatter(device_, stream_, plan->geometry,
                                         reinterpret_cast<const ScatterTask*>(device_staging_),
                                         static_cast<uint32_t>(plan->tasks.size()), src, dst));
  } else {
    RETURN_IF_ERROR(cuda_->LaunchGatherFrames(device_, stream_, frames,
                                              static_cast<uint32_t>(f.count), f.bytes, word,
                                              dst + spec.offset));
  }
  if (spec.done_event != nullptr) {
    ASSIGN_OR_RETURN(void* e, EventLocked(*spec.done_event));
    RETURN_IF_ERROR(cuda_->RecordEvent(device_, stream_, e));
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> PushChannel::PushInPlace(uint8_t* dst, const PushSpec& spec) {
  const PinnedRegion::View region = region_->Get();
  const PageFrames& f = spec.frames;
  if (region.base == nullptr || f.bytes == 0 || f.count == 0 || f.count * f.bytes != spec.length) {
    return false;
  }
  const ScatterPlan* plan = spec.scatter;
  // The copy word: what divides the frame size, the destination and every
  // frame's address (the scatter's own word must divide them too).
  uint64_t bits = f.bytes;
  if (plan == nullptr) bits |= reinterpret_cast<uintptr_t>(dst + spec.offset);
  for (size_t i = 0; i < f.count; ++i) {
    if (!region.Covers(f.data[i], f.bytes)) return false;
    bits |= reinterpret_cast<uintptr_t>(f.data[i]);
  }
  uint32_t word = 16;
  while (word > 1 && bits % word != 0) word /= 2;
  if (plan != nullptr && word < plan->geometry.word_bytes) return false;
  // The tables (tasks, then device addresses of the frames), in one copy.
  const uint64_t task_bytes = plan == nullptr ? 0 : plan->tasks.size() * sizeof(ScatterTask);
  const uint64_t frames_at = AlignUp(task_bytes, kTableAlign);
  const uint64_t total = frames_at + f.count * sizeof(const uint8_t*);
  RETURN_IF_ERROR(Reserve(total));
  if (task_bytes > 0) std::memcpy(pinned_, plan->tasks.data(), task_bytes);
  auto* table = reinterpret_cast<const uint8_t**>(pinned_ + frames_at);
  for (size_t i = 0; i < f.count; ++i) table[i] = f.data[i] + region.delta;
  absl::Status s = EnqueueInPlace(dst, spec, word, frames_at, total);
  if (!s.ok()) {
    pending_ = true;  // whatever was enqueued may still read the tables
    return s;
  }
  // The device reads the pool's pages: they must not be reused before it is
  // done, so even a push with a done event waits here.
  RETURN_IF_ERROR(cuda_->SynchronizeStream(device_, stream_));
  return true;
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
      if (absl::Status s = EnsureDeviceStaging(total); !s.ok()) return s;
      // The one host -> device copy: pages and task table together.
      if (absl::Status s =
              cuda_->CopyToDeviceAsync(device_, stream_, device_staging_, pinned_, total);
          !s.ok()) {
        return s;
      }
      src = device_staging_;
    }
    const ScatterPlan& plan = *spec.scatter;
    ScatterSource source;
    source.base = src;
    if (absl::Status s = cuda_->LaunchScatter(
            device_, stream_, plan.geometry, reinterpret_cast<const ScatterTask*>(src + tasks_at),
            static_cast<uint32_t>(plan.tasks.size()), source, dst);
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
  auto channel = std::make_shared<PushChannel>(cuda_, device, *stream, mode_, region_, counts_);
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
