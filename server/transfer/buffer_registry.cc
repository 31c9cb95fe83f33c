#include "server/transfer/buffer_registry.h"

#include <atomic>
#include <cstring>
#include <optional>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/random_id.h"

namespace icecache {

std::string_view BufferKindName(BufferKind kind) {
  switch (kind) {
    case BufferKind::kHostShm:
      return "HOST_SHM";
    case BufferKind::kCudaIpc:
      return "CUDA_IPC";
  }
  return "UNKNOWN";
}

struct BufferLease::Entry {
  std::string id;
  std::string tenant;
  BufferKind kind = BufferKind::kHostShm;
  uint64_t size = 0;
  std::string path;
  std::string device_uuid;
  absl::Time created;
  std::atomic<int64_t> leases{0};
  // Set when the registry lets go of the buffer (unregistered, expired,
  // dropped with its tenant); leases may still hold it.
  std::atomic<bool> removed{false};
  // HOST_SHM
  ShmFile shm;
  // CUDA_IPC: the opened allocation (shared per tenant, device and handle)
  // and the (tenant, device) push channel; the layout when it is an engine's
  // paged KV cache.
  std::shared_ptr<IpcMemory> memory;
  std::shared_ptr<PushChannel> channel;
  std::optional<ResolvedKvLayout> paged_kv;
  WriteLog writes;

  ~Entry() {
    // Work still running from a push with a done event must finish before
    // the allocation it writes is closed.
    if (channel != nullptr) channel->Drain();
    channel.reset();
    memory.reset();
  }

  absl::Status CheckRange(uint64_t offset, uint64_t length) const {
    if (offset > size || length > size - offset) {
      return absl::OutOfRangeError(absl::StrCat("region of ", length, " bytes at offset ", offset,
                                                " exceeds buffer size ", size, " of buffer ", id));
    }
    return absl::OkStatus();
  }
};

// ---------------------------------------------------------------- BufferLease

BufferLease::BufferLease() = default;
BufferLease::~BufferLease() {
  if (entry_ != nullptr) entry_->leases.fetch_sub(1);
}
BufferLease::BufferLease(BufferLease&& o) noexcept : entry_(std::move(o.entry_)) {
  o.entry_.reset();
}
BufferLease& BufferLease::operator=(BufferLease&& o) noexcept {
  if (this != &o) {
    if (entry_ != nullptr) entry_->leases.fetch_sub(1);
    entry_ = std::move(o.entry_);
    o.entry_.reset();
  }
  return *this;
}

const std::string& BufferLease::id() const { return entry_->id; }
BufferKind BufferLease::kind() const { return entry_->kind; }
uint64_t BufferLease::size() const { return entry_->size; }

absl::Status BufferLease::CheckRegion(uint64_t offset, uint64_t length) const {
  if (entry_ == nullptr) return absl::FailedPreconditionError("empty buffer lease");
  if (absl::Status s = entry_->CheckRange(offset, length); !s.ok()) return s;
  if (length == 0 || entry_->kind != BufferKind::kHostShm) return absl::OkStatus();
  return entry_->shm.CheckFileCovers(offset + length);
}

absl::Status BufferLease::Write(uint64_t offset, uint64_t length,
                                absl::FunctionRef<void(uint8_t*)> fill, FileCheck check) {
  if (entry_ == nullptr) return absl::FailedPreconditionError("empty buffer lease");
  if (absl::Status s = entry_->CheckRange(offset, length); !s.ok()) return s;
  if (length == 0) return absl::OkStatus();
  if (entry_->kind == BufferKind::kHostShm) {
    if (check == FileCheck::kNow) {
      if (absl::Status s = entry_->shm.CheckFileCovers(offset + length); !s.ok()) return s;
    }
    uint8_t* dst = entry_->shm.data() + offset;
    return RunSigbusGuarded([&] { fill(dst); });
  }
  PushSpec spec;
  spec.offset = offset;
  spec.length = length;
  return entry_->channel->Push(entry_->memory->data(), spec, fill);
}

namespace {

absl::StatusOr<std::optional<CudaIpcHandle>> EventField(std::string_view field,
                                                        const std::string& bytes) {
  if (bytes.empty()) return std::optional<CudaIpcHandle>();
  absl::StatusOr<CudaIpcHandle> h = ParseCudaIpcHandle(bytes);
  if (!h.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(field), " (a cudaIpcEventHandle_t): ", h.status().message()));
  }
  return std::optional<CudaIpcHandle>(*h);
}

}  // namespace

absl::Status BufferLease::WriteFetch(const FetchLayout& layout, const DeviceWrite& device,
                                     absl::FunctionRef<void(uint8_t*)> fill,
                                     const PageFrames& frames) {
  if (entry_ == nullptr) return absl::FailedPreconditionError("empty buffer lease");
  if (device.empty() && (entry_->kind != BufferKind::kCudaIpc || layout.total_bytes == 0)) {
    return Write(layout.buffer_offset, layout.total_bytes, fill);
  }
  if (entry_->kind != BufferKind::kCudaIpc) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_ids, wait_event and done_event need a CUDA_IPC buffer; buffer ",
                     entry_->id, " is ", std::string(BufferKindName(entry_->kind))));
  }
  absl::StatusOr<std::optional<CudaIpcHandle>> wait = EventField("wait_event", device.wait_event);
  if (!wait.ok()) return wait.status();
  absl::StatusOr<std::optional<CudaIpcHandle>> done = EventField("done_event", device.done_event);
  if (!done.ok()) return done.status();
  PushSpec spec;
  spec.frames = frames;
  spec.wait_event = wait->has_value() ? &**wait : nullptr;
  spec.done_event = done->has_value() ? &**done : nullptr;
  std::optional<ScatterPlan> plan;
  if (!device.block_ids.empty()) {
    if (!entry_->paged_kv.has_value()) {
      return absl::FailedPreconditionError(
          absl::StrCat("block_ids: buffer ", entry_->id,
                       " was registered without a paged_kv layout; register the engine's KV "
                       "cache with cuda_ipc.paged_kv to scatter into its blocks"));
    }
    absl::StatusOr<ScatterPlan> p = PlanScatter(*entry_->paged_kv, layout, device.block_ids);
    if (!p.ok()) return p.status();
    plan = std::move(p).value();
    spec.scatter = &*plan;
    spec.length = plan->staged_bytes;
  } else {
    if (absl::Status s = entry_->CheckRange(layout.buffer_offset, layout.total_bytes); !s.ok()) {
      return s;
    }
    spec.offset = layout.buffer_offset;
    spec.length = layout.total_bytes;
  }
  return entry_->channel->Push(entry_->memory->data(), spec, fill);
}

absl::Status BufferLease::SignalDone(const std::string& done_event) {
  if (entry_ == nullptr) return absl::FailedPreconditionError("empty buffer lease");
  if (done_event.empty()) return absl::OkStatus();
  if (entry_->kind != BufferKind::kCudaIpc) {
    return absl::InvalidArgumentError(absl::StrCat("done_event needs a CUDA_IPC buffer; buffer ",
                                                   entry_->id, " is ",
                                                   std::string(BufferKindName(entry_->kind))));
  }
  absl::StatusOr<std::optional<CudaIpcHandle>> done = EventField("done_event", done_event);
  if (!done.ok()) return done.status();
  if (!done->has_value()) return absl::OkStatus();
  return entry_->channel->RecordDone(**done);
}

uint64_t BufferLease::NoteWrite(uint64_t writer, uint64_t offset, uint64_t bytes) {
  return entry_ == nullptr ? 0 : entry_->writes.Note(writer, offset, bytes);
}

bool BufferLease::WrittenSince(uint64_t writer, uint64_t offset, uint64_t bytes,
                               uint64_t stamp) const {
  return entry_ == nullptr || entry_->writes.WrittenSince(writer, offset, bytes, stamp);
}

BufferLease::WriteClaim::~WriteClaim() {
  if (entry_ != nullptr) entry_->writes.Release(id_);
}

BufferLease::WriteClaim::WriteClaim(WriteClaim&& o) noexcept
    : entry_(std::move(o.entry_)), id_(std::exchange(o.id_, 0)) {}

BufferLease::WriteClaim& BufferLease::WriteClaim::operator=(WriteClaim&& o) noexcept {
  if (this != &o) {
    if (entry_ != nullptr) entry_->writes.Release(id_);
    entry_ = std::move(o.entry_);
    id_ = std::exchange(o.id_, 0);
  }
  return *this;
}

absl::StatusOr<BufferLease::WriteClaim> BufferLease::ClaimWrite(uint64_t writer, uint64_t offset,
                                                                uint64_t bytes) {
  WriteClaim claim;
  if (entry_ == nullptr || bytes == 0) return claim;
  uint64_t other_offset = 0, other_bytes = 0;
  const uint64_t id = entry_->writes.Claim(writer, offset, bytes, &other_offset, &other_bytes);
  if (id == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "bytes [", offset, ", ", offset + bytes, ") of buffer ", entry_->id, " overlap bytes [",
        other_offset, ", ", other_offset + other_bytes,
        ") that another session is writing right now; give each session of a batch its own "
        "region of the buffer (nothing was written)"));
  }
  claim.entry_ = entry_;
  claim.id_ = id;
  return claim;
}

size_t BufferLease::writes_in_flight() const {
  return entry_ == nullptr ? 0 : entry_->writes.claims_in_flight();
}

bool BufferLease::registered() const {
  return entry_ != nullptr && !entry_->removed.load(std::memory_order_acquire);
}

absl::Status BufferLease::Read(uint64_t offset, uint64_t length, void* dst, FileCheck check) {
  if (entry_ == nullptr) return absl::FailedPreconditionError("empty buffer lease");
  if (entry_->kind != BufferKind::kHostShm) {
    return absl::FailedPreconditionError(
        "reading KV from a CUDA_IPC buffer is not supported; use a HOST_SHM buffer or inline "
        "bytes");
  }
  if (absl::Status s = entry_->CheckRange(offset, length); !s.ok()) return s;
  if (length == 0) return absl::OkStatus();
  if (check == FileCheck::kNow) {
    if (absl::Status s = entry_->shm.CheckFileCovers(offset + length); !s.ok()) return s;
  }
  const uint8_t* src = entry_->shm.data() + offset;
  return RunSigbusGuarded([&] { std::memcpy(dst, src, length); });
}

absl::Status BufferLease::ReadInPlace(uint64_t offset, uint64_t length,
                                      absl::FunctionRef<void(const uint8_t*)> fn) {
  if (entry_ == nullptr) return absl::FailedPreconditionError("empty buffer lease");
  if (entry_->kind != BufferKind::kHostShm) {
    return absl::FailedPreconditionError("only a HOST_SHM buffer can be read in place");
  }
  if (absl::Status s = entry_->CheckRange(offset, length); !s.ok()) return s;
  if (length == 0) return absl::OkStatus();
  if (absl::Status s = entry_->shm.CheckFileCovers(offset + length); !s.ok()) return s;
  const uint8_t* src = entry_->shm.data() + offset;
  return RunSigbusGuarded([&] { fn(src); });
}

// ------------------------------------------------------------- BufferRegistry

namespace {

BufferInfo InfoOf(const BufferLease::Entry& e, absl::Time last_use);

}  // namespace

absl::StatusOr<std::unique_ptr<BufferRegistry>> BufferRegistry::Create(
    const BufferRegistryOptions& options) {
  if (options.max_buffers_per_tenant < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("buffer registry: max_buffers_per_tenant must be >= 1, got ",
                     options.max_buffers_per_tenant));
  }
  if (options.idle_ttl <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("buffer registry: idle_ttl must be positive");
  }
  return std::unique_ptr<BufferRegistry>(new BufferRegistry(options));
}

BufferRegistry::BufferRegistry(const BufferRegistryOptions& options) : options_(options) {
  if (options.cuda != nullptr) {
    clients_ = std::make_unique<CudaClients>(options.cuda, options.scatter_mode);
  }
}
BufferRegistry::~BufferRegistry() = default;

absl::StatusOr<BufferInfo> BufferRegistry::Insert(const Caller& caller,
                                                  std::shared_ptr<BufferLease::Entry> e,
                                                  absl::Time now) {
  absl::MutexLock l(&mu_);
  int count = 0;
  for (const auto& [id, slot] : buffers_) count += slot.entry->tenant == caller.tenant ? 1 : 0;
  if (count >= options_.max_buffers_per_tenant) {
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant '", caller.tenant, "' already has ", count,
                     " buffers (max_buffers_per_tenant); unregister some first"));
  }
  do {
    e->id = RandomHexId();
  } while (buffers_.count(e->id) != 0);
  e->tenant = caller.tenant;
  e->created = now;
  BufferInfo info = InfoOf(*e, now);
  std::string id = e->id;
  buffers_.emplace(std::move(id), Slot{std::move(e), now});
  return info;
}

absl::StatusOr<BufferInfo> BufferRegistry::RegisterShm(const Caller& caller, std::string_view path,
                                                       uint64_t size, absl::Time now) {
  if (absl::Status s = ValidateTenantName(caller.tenant); !s.ok()) return s;
  auto shm = ShmFile::OpenChecked(path, size, caller.uid, options_.shm);
  if (!shm.ok()) return shm.status();
  if (options_.touch_budget > absl::ZeroDuration()) {
    // No lock is held: the mapping is this call's alone until Insert.
    absl::StatusOr<uint64_t> touched = shm->TouchResidentPages(options_.touch_budget);
    if (!touched.ok()) return touched.status();
  }
  auto e = std::make_shared<BufferLease::Entry>();
  e->kind = BufferKind::kHostShm;
  e->size = size;
  e->path = std::string(path);
  e->shm = std::move(shm).value();
  return Insert(caller, std::move(e), now);
}

absl::StatusOr<BufferInfo> BufferRegistry::RegisterCudaIpc(
    const Caller& caller, std::string_view handle_bytes, uint64_t size,
    std::string_view device_uuid, absl::Time now, const PagedKvLayout* paged_kv) {
  if (absl::Status s = ValidateTenantName(caller.tenant); !s.ok()) return s;
  auto handle = ParseCudaIpcHandle(handle_bytes);
  if (!handle.ok()) return handle.status();
  auto uuid = ParseCudaDeviceUuid(device_uuid);
  if (!uuid.ok()) return uuid.status();
  if (size == 0 || size > options_.max_cuda_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA_IPC buffer size must be in 1..",
                                                   options_.max_cuda_bytes, ", got ", size));
  }
  std::optional<ResolvedKvLayout> layout;
  if (paged_kv != nullptr) {
    absl::StatusOr<ResolvedKvLayout> r = ResolveKvLayout(*paged_kv, size);
    if (!r.ok()) return r.status();
    layout = std::move(r).value();
  }
  if (options_.cuda == nullptr || !options_.cuda->available()) {
    return absl::FailedPreconditionError(
        options_.cuda == nullptr ? std::string("no CUDA device (no CUDA runtime configured)")
                                 : options_.cuda->unavailable_reason());
  }
  auto device = options_.cuda->FindDevice(*uuid);
  if (!device.ok()) return device.status();
  auto channel = clients_->Channel(caller.tenant, *device);
  if (!channel.ok()) return channel.status();
  auto memory = clients_->OpenMemory(caller.tenant, *device, *handle);
  if (!memory.ok()) return memory.status();
  auto e = std::make_shared<BufferLease::Entry>();
  e->kind = BufferKind::kCudaIpc;
  e->size = size;
  e->device_uuid = uuid->ToString();
  e->memory = std::move(memory).value();
  e->channel = std::move(channel).value();
  e->paged_kv = std::move(layout);
  return Insert(caller, std::move(e), now);
}

BufferRegistry::Slot* BufferRegistry::FindLocked(const Caller& caller, std::string_view id) {
  auto it = buffers_.find(id);
  if (it == buffers_.end() || it->second.entry->tenant != caller.tenant) return nullptr;
  return &it->second;
}

const BufferRegistry::Slot* BufferRegistry::FindLocked(const Caller& caller,
                                                       std::string_view id) const {
  auto it = buffers_.find(id);
  if (it == buffers_.end() || it->second.entry->tenant != caller.tenant) return nullptr;
  return &it->second;
}

namespace {
absl::Status BufferNotFound(std::string_view id) {
  return absl::NotFoundError(absl::StrCat("buffer ", std::string(id), " not found"));
}

BufferInfo InfoOf(const BufferLease::Entry& e, absl::Time last_use) {
  BufferInfo info;
  info.id = e.id;
  info.tenant = e.tenant;
  info.kind = e.kind;
  info.size = e.size;
  info.path = e.path;
  info.device_uuid = e.device_uuid;
  info.paged_kv = e.paged_kv.has_value();
  info.created = e.created;
  info.last_use = last_use;
  info.leases = e.leases.load();
  return info;
}
}  // namespace

absl::Status BufferRegistry::Unregister(const Caller& caller, std::string_view id) {
  std::shared_ptr<BufferLease::Entry> dead;  // unmapped after the lock is released
  absl::MutexLock l(&mu_);
  Slot* slot = FindLocked(caller, id);
  if (slot == nullptr) return BufferNotFound(id);
  dead = std::move(slot->entry);
  dead->removed.store(true, std::memory_order_release);
  buffers_.erase(buffers_.find(id));
  return absl::OkStatus();
}

absl::StatusOr<BufferInfo> BufferRegistry::Get(const Caller& caller, std::string_view id) const {
  absl::ReaderMutexLock l(&mu_);
  const Slot* slot = FindLocked(caller, id);
  if (slot == nullptr) return BufferNotFound(id);
  return InfoOf(*slot->entry, slot->last_use);
}

std::vector<BufferInfo> BufferRegistry::List(const Caller& caller) const {
  std::vector<BufferInfo> out;
  absl::ReaderMutexLock l(&mu_);
  for (const auto& [id, slot] : buffers_) {
    if (caller.admin || slot.entry->tenant == caller.tenant) {
      out.push_back(InfoOf(*slot.entry, slot.last_use));
    }
  }
  return out;
}

absl::StatusOr<BufferLease> BufferRegistry::Acquire(const Caller& caller, std::string_view id,
                                                    absl::Time now) {
  absl::MutexLock l(&mu_);
  Slot* slot = FindLocked(caller, id);
  if (slot == nullptr) return BufferNotFound(id);
  slot->last_use = std::max(slot->last_use, now);
  slot->entry->leases.fetch_add(1);
  BufferLease lease;
  lease.entry_ = slot->entry;
  return lease;
}

absl::Status BufferRegistry::Touch(const Caller& caller, std::string_view id, absl::Time now) {
  absl::MutexLock l(&mu_);
  Slot* slot = FindLocked(caller, id);
  if (slot == nullptr) return BufferNotFound(id);
  slot->last_use = std::max(slot->last_use, now);
  return absl::OkStatus();
}

void BufferRegistry::TouchTenant(std::string_view tenant, absl::Time now) {
  absl::MutexLock l(&mu_);
  for (auto& [id, slot] : buffers_) {
    if (slot.entry->tenant == tenant) slot.last_use = std::max(slot.last_use, now);
  }
}

int BufferRegistry::ExpireIdle(absl::Time now) {
  std::vector<std::shared_ptr<BufferLease::Entry>> dead;  // unmapped after the lock
  absl::MutexLock l(&mu_);
  for (auto it = buffers_.begin(); it != buffers_.end();) {
    const Slot& slot = it->second;
    if (slot.entry->leases.load() == 0 && now - slot.last_use > options_.idle_ttl) {
      it->second.entry->removed.store(true, std::memory_order_release);
      dead.push_back(std::move(it->second.entry));
      it = buffers_.erase(it);
    } else {
      ++it;
    }
  }
  return static_cast<int>(dead.size());
}

int BufferRegistry::DropTenant(std::string_view tenant) {
  std::vector<std::shared_ptr<BufferLease::Entry>> dead;  // unmapped after the lock
  absl::MutexLock l(&mu_);
  for (auto it = buffers_.begin(); it != buffers_.end();) {
    if (it->second.entry->tenant == tenant) {
      it->second.entry->removed.store(true, std::memory_order_release);
      dead.push_back(std::move(it->second.entry));
      it = buffers_.erase(it);
    } else {
      ++it;
    }
  }
  return static_cast<int>(dead.size());
}

size_t BufferRegistry::size() const {
  absl::ReaderMutexLock l(&mu_);
  return buffers_.size();
}

}  // namespace icecache
