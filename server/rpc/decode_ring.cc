#include "server/rpc/decode_ring.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/decode_ring_layout.h"
#include "common/random_id.h"
#include "common/status_macros.h"
#include "server/rpc/log.h"

namespace icecache::rpc {

struct DecodeRingServer::Ring {
  ~Ring() {
    if (request_fd >= 0) ::close(request_fd);
    if (response_fd >= 0) ::close(response_fd);
  }
  // Held while a thread serves the ring. EPOLLONESHOT already gives the ring
  // to one thread at a time; the (uncontended) mutex makes that hand-off
  // visible to the thread-safety tools (TSan does not see epoll).
  absl::Mutex serve_mu;
  uint64_t key = 0;
  std::string id;
  Caller caller;
  BufferLease lease;
  uint64_t request_capacity = 0, response_capacity = 0;
  int request_fd = -1, response_fd = -1;
  DecodeCursor cursor;
  uint64_t handled_seq = 0;
  // When the last answer was written, and the time from the answer before
  // it to the request after it (AwaitNext's window).
  absl::Time answered = absl::InfinitePast();
  absl::Duration last_gap = absl::InfiniteDuration();
  // Reused message by message: the request copied out of shared memory and
  // the parsed messages.
  std::string in;
  v1::DecodeStepRequest request;
  v1::DecodeStepResponse response;
};

namespace {

uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

absl::Status CheckCapacity(uint64_t bytes, absl::string_view field) {
  if (bytes < ring::kMinCapacity || bytes > ring::kMaxCapacity) {
    return absl::InvalidArgumentError(absl::StrCat(field, " = ", bytes, " is outside ",
                                                   ring::kMinCapacity, "..", ring::kMaxCapacity));
  }
  return absl::OkStatus();
}

// Opens the FIFO `path` (directly in `dir`, owned by `uid`) with `flags`
// (O_RDONLY or O_WRONLY), non-blocking. The file is checked before it is
// opened (never opens a non-FIFO) and again through the descriptor.
absl::StatusOr<int> OpenFifo(const std::string& dir, const std::string& path, int flags, uid_t uid,
                             absl::string_view field) {
  const std::string prefix = dir + "/";
  const std::string name =
      path.size() > prefix.size() && path.compare(0, prefix.size(), prefix) == 0
          ? path.substr(prefix.size())
          : std::string();
  if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..") {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " '", path, "' must name a FIFO directly in ", dir));
  }
  const int dfd = ::open(dir.c_str(), O_DIRECTORY | O_RDONLY | O_CLOEXEC);
  if (dfd < 0) {
    return absl::InternalError(absl::StrCat("cannot open ", dir, ": ", std::strerror(errno)));
  }
  struct stat before;
  if (::fstatat(dfd, name.c_str(), &before, AT_SYMLINK_NOFOLLOW) != 0) {
    const int err = errno;
    ::close(dfd);
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(field, " '", path, "' not found"));
    return absl::InternalError(absl::StrCat(field, " '", path, "': ", std::strerror(err)));
  }
  if (!S_ISFIFO(before.st_mode)) {
    ::close(dfd);
    return absl::InvalidArgumentError(absl::StrCat(field, " '", path, "' is not a FIFO",
                                                   S_ISLNK(before.st_mode) ? " (a symlink)" : ""));
  }
  if (before.st_uid != uid) {
    ::close(dfd);
    return absl::PermissionDeniedError(absl::StrCat(field, " '", path, "' is owned by uid ",
                                                    before.st_uid, ", not the caller's ", uid));
  }
  const int fd =
      ::openat(dfd, name.c_str(), flags | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
  const int err = errno;
  ::close(dfd);
  if (fd < 0) {
    if (err == ENXIO) {
      return absl::FailedPreconditionError(
          absl::StrCat(field, " '", path, "' has no reader: open it for reading first"));
    }
    return absl::InternalError(absl::StrCat(field, " '", path, "': ", std::strerror(err)));
  }
  struct stat after;
  if (::fstat(fd, &after) != 0 || after.st_ino != before.st_ino || after.st_dev != before.st_dev) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(field, " '", path, "' changed while opened"));
  }
  return fd;
}

// The ring's header: magic and version as the client wrote them.
absl::Status CheckHeader(BufferLease& lease, uint64_t* request_seq) {
  uint8_t h[24];
  RETURN_IF_ERROR(lease.Read(0, sizeof h, h));
  if (Load32(h + ring::kMagicOffset) != ring::kMagic) {
    return absl::InvalidArgumentError(
        "the ring buffer's header has no ring magic (\"ICRG\" at byte 0): write the header "
        "before OpenDecodeRing");
  }
  if (Load32(h + ring::kVersionOffset) != ring::kVersion) {
    return absl::InvalidArgumentError(absl::StrCat("ring header version ",
                                                   Load32(h + ring::kVersionOffset),
                                                   "; this daemon speaks ", ring::kVersion));
  }
  *request_seq = Load64(h + ring::kRequestSeqOffset);
  return absl::OkStatus();
}

// Reads what is in the FIFO; false at end of file (no writer left).
// A short read means the FIFO is empty now; a bell arriving later re-arms
// the ring's (level-triggered) epoll entry anyway, so one read() usually does.
bool DrainDoorbell(int fd) {
  char buf[64];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0 && n < static_cast<ssize_t>(sizeof buf)) return true;
    if (n > 0) continue;
    if (n == 0) return false;
    if (errno == EINTR) continue;
    return true;  // EAGAIN: drained
  }
}

}  // namespace

DecodeRingServer::DecodeRingServer(const DecodeRingOptions& options, BufferRegistry* buffers,
                                   RingHandler handler)
    : options_(options), buffers_(buffers), handler_(std::move(handler)) {}

absl::StatusOr<std::unique_ptr<DecodeRingServer>> DecodeRingServer::Create(
    const DecodeRingOptions& options, BufferRegistry* buffers, RingHandler handler) {
  std::unique_ptr<DecodeRingServer> s(new DecodeRingServer(options, buffers, std::move(handler)));
  RETURN_IF_ERROR(s->Start());
  return s;
}

absl::Status DecodeRingServer::Start() {
  epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (epoll_fd_ < 0 || stop_fd_ < 0) {
    return absl::InternalError(absl::StrCat("decode rings: epoll/eventfd: ", std::strerror(errno)));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;  // level-triggered: wakes every thread at Stop()
  ev.data.u64 = 0;
  if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, stop_fd_, &ev) != 0) {
    return absl::InternalError(absl::StrCat("decode rings: epoll_ctl: ", std::strerror(errno)));
  }
  for (int i = 0; i < std::max(1, options_.threads); ++i) {
    threads_.emplace_back([this] { ThreadMain(); });
  }
  return absl::OkStatus();
}

DecodeRingServer::~DecodeRingServer() {
  Stop();
  if (epoll_fd_ >= 0) ::close(epoll_fd_);
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

absl::Status DecodeRingServer::Admit(const Caller& caller) const {
  if (stopped_) return absl::UnavailableError("the daemon is stopping; use the DecodeStep stream");
  auto it = by_tenant_.find(caller.tenant);
  const int mine = it == by_tenant_.end() ? 0 : it->second;
  if (mine >= options_.max_rings_per_tenant) {
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant '", caller.tenant, "' already has ", mine,
                     " decode rings open, the most one tenant may have "
                     "(limits.max_calls_per_tenant); close rings or use the DecodeStep stream"));
  }
  if (static_cast<int>(rings_.size()) >= options_.max_rings) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the daemon has ", rings_.size(),
                     " decode rings open, all it serves (limits.max_concurrent_calls minus "
                     "limits.reserved_calls); use the DecodeStep stream"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> DecodeRingServer::Open(const Caller& caller, const RingOpenParams& p) {
  RETURN_IF_ERROR(CheckCapacity(p.request_capacity, "request_capacity"));
  RETURN_IF_ERROR(CheckCapacity(p.response_capacity, "response_capacity"));
  {
    absl::MutexLock lock(&mu_);
    RETURN_IF_ERROR(Admit(caller));
  }
  auto r = std::make_shared<Ring>();
  r->caller = caller;
  r->request_capacity = p.request_capacity;
  r->response_capacity = p.response_capacity;
  r->cursor.session_id = p.session_id;
  ASSIGN_OR_RETURN(r->lease, buffers_->Acquire(caller, p.buffer_id, absl::Now()));
  if (r->lease.kind() != BufferKind::kHostShm) {
    return absl::FailedPreconditionError(
        absl::StrCat("buffer ", p.buffer_id, " is CUDA_IPC; a ring needs a HOST_SHM buffer"));
  }
  const uint64_t bytes = ring::RingBytes(p.request_capacity, p.response_capacity);
  if (bytes > r->lease.size()) {
    return absl::OutOfRangeError(
        absl::StrCat("a ring of ", bytes, " bytes (", ring::kHeaderBytes, " + request_capacity ",
                     p.request_capacity, " + response_capacity ", p.response_capacity,
                     ") does not fit in buffer ", p.buffer_id, " of ", r->lease.size(), " bytes"));
  }
  RETURN_IF_ERROR(r->lease.CheckRegion(0, bytes));
  RETURN_IF_ERROR(CheckHeader(r->lease, &r->handled_seq));
  ASSIGN_OR_RETURN(r->request_fd, OpenFifo(options_.fifo_dir, p.request_fifo, O_RDONLY, caller.uid,
                                           "request_fifo"));
  // The hello byte proves a writer held the FIFO when it was opened here,
  // so its last close reaches this side as end of file (decode_ring.proto).
  char hello;
  if (::read(r->request_fd, &hello, 1) != 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        "request_fifo '", p.request_fifo,
        "' has no writer with a hello byte: open it for writing and write one byte before "
        "OpenDecodeRing"));
  }
  ASSIGN_OR_RETURN(r->response_fd, OpenFifo(options_.fifo_dir, p.response_fifo, O_WRONLY,
                                            caller.uid, "response_fifo"));
  r->id = RandomHexId();
  absl::MutexLock lock(&mu_);
  RETURN_IF_ERROR(Admit(caller));
  r->key = next_key_++;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLONESHOT;
  ev.data.u64 = r->key;
  if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, r->request_fd, &ev) != 0) {
    return absl::InternalError(absl::StrCat("decode ring: epoll_ctl: ", std::strerror(errno)));
  }
  rings_[r->key] = r;
  ++by_tenant_[caller.tenant];
  return r->id;
}

std::shared_ptr<DecodeRingServer::Ring> DecodeRingServer::Find(uint64_t key) const {
  absl::MutexLock lock(&mu_);
  auto it = rings_.find(key);
  return it == rings_.end() ? nullptr : it->second;
}

void DecodeRingServer::Close(uint64_t key) {
  std::shared_ptr<Ring> r;
  {
    absl::MutexLock lock(&mu_);
    auto it = rings_.find(key);
    if (it == rings_.end()) return;
    r = std::move(it->second);
    rings_.erase(it);
    auto t = by_tenant_.find(r->caller.tenant);
    if (t != by_tenant_.end() && --t->second <= 0) by_tenant_.erase(t);
    ++reclaimed_;
  }
  ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, r->request_fd, nullptr);
  Log(LogLevel::kDebug, "decode_ring_closed",
      {{"tenant", r->caller.tenant}, {"id", r->id}, {"session", r->cursor.session_id}});
  // The descriptors and the lease go with the last reference.
}

void DecodeRingServer::ThreadMain() {
  // A client that closed its response FIFO must not kill the daemon: the
  // write gets EPIPE and the signal stays pending on this thread.
  sigset_t pipe;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
  for (;;) {
    epoll_event ev;
    const int n = ::epoll_wait(epoll_fd_, &ev, 1, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Log(LogLevel::kError, "decode_ring_epoll_failed", {{"error", std::strerror(errno)}});
      return;
    }
    if (n == 0) continue;
    if (ev.data.u64 == 0) return;  // Stop()
    std::shared_ptr<Ring> r = Find(ev.data.u64);
    if (r == nullptr) continue;
    bool open;
    {
      absl::MutexLock serving(&r->serve_mu);
      open = Serve(*r, ev.events);
      // The client's next message (a decode loop's next layer) is served by
      // this thread if it comes soon; its doorbell byte is drained later.
      while (open && AwaitNext(*r)) open = ServeRequest(*r);
    }
    if (!open) {
      Close(r->key);
      continue;
    }
    epoll_event again{};
    again.events = EPOLLIN | EPOLLONESHOT;
    again.data.u64 = r->key;
    // ENOENT when the ring was closed meanwhile: nothing to re-arm.
    ::epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, r->request_fd, &again);
  }
}

bool DecodeRingServer::Serve(Ring& r, uint32_t events) {
  (void)events;                                    // the FIFO's own state says it all
  if (!DrainDoorbell(r.request_fd)) return false;  // the client is gone
  return ServeRequest(r);
}

bool DecodeRingServer::AwaitNext(Ring& r) {
  if (options_.max_spin <= absl::ZeroDuration() || stopping_.load(std::memory_order_relaxed)) {
    return false;
  }
  // A ring whose last request came within the window is watched for the
  // whole window; one whose last gap was longer is not (a client between
  // sequences, or with more to do between layers, costs no CPU here).
  const absl::Duration window = options_.max_spin;
  if (r.last_gap > window) return false;
  if (spinning_.fetch_add(1, std::memory_order_acq_rel) >= std::max(1, options_.max_spinning)) {
    spinning_.fetch_sub(1, std::memory_order_acq_rel);
    return false;
  }
  const absl::Time deadline = r.answered + window;
  bool arrived = false;
  // One file check and one SIGBUS guard for the whole watch, not one per
  // look (two system calls each). A file truncated meanwhile ends the watch
  // through the guard; ServeRequest's check then closes the ring.
  (void)r.lease.ReadInPlace(ring::kRequestSeqOffset, sizeof(uint64_t), [&](const uint8_t* p) {
    for (;;) {
      if (__atomic_load_n(reinterpret_cast<const uint64_t*>(p), __ATOMIC_ACQUIRE) !=
          r.handled_seq) {
        arrived = true;
        return;
      }
      if (stopping_.load(std::memory_order_relaxed) || absl::Now() >= deadline) return;
      // Another runnable thread on this CPU (a selection, the client) goes
      // first; on an idle CPU this returns at once.
      ::sched_yield();
    }
  });
  spinning_.fetch_sub(1, std::memory_order_acq_rel);
  if (arrived) caught_.fetch_add(1, std::memory_order_relaxed);
  return arrived;
}

bool DecodeRingServer::ServeRequest(Ring& r) {
  // The file checked once for the whole message: the reads and the answer
  // below skip their own checks (a truncation since is caught by their
  // guards).
  if (!r.lease.CheckRegion(0, r.lease.size()).ok()) return false;  // the ring file shrank
  uint8_t h[24];
  if (!r.lease.Read(0, sizeof h, h, BufferLease::FileCheck::kChecked).ok()) return false;
  const uint64_t seq = Load64(h + ring::kRequestSeqOffset);
  const uint32_t len = Load32(h + ring::kRequestLenOffset);
  if (seq == r.handled_seq) return true;  // nothing new
  const absl::Time arrived = absl::Now();
  r.last_gap = arrived - r.answered;
  absl::Status status;
  if (seq != r.handled_seq + 1) {
    status = absl::InvalidArgumentError(absl::StrCat("decode ring ", r.id, ": request_seq ", seq,
                                                     " is not the next (", r.handled_seq + 1, ")"));
  } else if (len > r.request_capacity) {
    status = absl::InvalidArgumentError(absl::StrCat("decode ring ", r.id, ": request_len ", len,
                                                     " is larger than the request area (",
                                                     r.request_capacity, " bytes)"));
  } else {
    status = ReadRequest(r, seq, len);
    if (status.ok()) status = handler_(r.caller, r.request, &r.cursor, &r.response);
  }
  r.handled_seq = seq;
  return Answer(r, seq, status);
}

absl::Status DecodeRingServer::ReadRequest(Ring& r, uint64_t seq, uint32_t len) {
  // Copied out of shared memory first: the client cannot change what is
  // checked after it was checked.
  r.in.resize(len);
  RETURN_IF_ERROR(
      r.lease.Read(ring::RequestAreaOffset(), len, r.in.data(), BufferLease::FileCheck::kChecked));
  if (!r.request.ParseFromArray(r.in.data(), static_cast<int>(len))) {
    return absl::InvalidArgumentError(absl::StrCat("decode ring ", r.id, ": request ", seq, " (",
                                                   len, " bytes) is not a DecodeStepRequest"));
  }
  if (r.request.batch_size() == 0 && !r.request.session_id().empty() &&
      r.request.session_id() != r.cursor.session_id) {
    return absl::InvalidArgumentError(absl::StrCat("decode ring ", r.id, " belongs to session ",
                                                   r.cursor.session_id, "; request ", seq,
                                                   " names session ", r.request.session_id()));
  }
  return absl::OkStatus();
}

bool DecodeRingServer::Answer(Ring& r, uint64_t seq, const absl::Status& status) {
  int32_t code = static_cast<int32_t>(status.code());
  std::string message(status.message());
  size_t size = 0;
  if (status.ok()) {
    size = r.response.ByteSizeLong();
    if (size > r.response_capacity) {
      code = static_cast<int32_t>(absl::StatusCode::kResourceExhausted);
      message = absl::StrCat("the response of ", size, " bytes does not fit the ring's ",
                             r.response_capacity, "-byte response area; open a larger ring");
    }
  }
  const bool ok = code == 0;
  if (!ok) size = std::min<size_t>(message.size(), r.response_capacity);
  // Noted in the buffer's write log like a fetch (write_log.h): a client that
  // also fetches into this buffer learns of these bytes.
  r.lease.NoteWrite(WriteLog::kNoWriter, ring::ResponseAreaOffset(r.request_capacity), size);
  r.lease.NoteWrite(WriteLog::kNoWriter, ring::kResponseSeqOffset, 16);
  absl::Status w = r.lease.Write(
      ring::ResponseAreaOffset(r.request_capacity), size,
      [&](uint8_t* dst) {
        if (ok) {
          r.response.SerializeWithCachedSizesToArray(dst);
        } else {
          std::memcpy(dst, message.data(), size);
        }
      },
      BufferLease::FileCheck::kChecked);
  const uint32_t len = static_cast<uint32_t>(size);
  if (w.ok()) {
    w = r.lease.Write(
        ring::kResponseSeqOffset, 16,
        [&](uint8_t* dst) {
          std::memcpy(dst + (ring::kCodeOffset - ring::kResponseSeqOffset), &code, sizeof code);
          std::memcpy(dst + (ring::kResponseLenOffset - ring::kResponseSeqOffset), &len,
                      sizeof len);
          __atomic_store_n(reinterpret_cast<uint64_t*>(dst), seq, __ATOMIC_RELEASE);
        },
        BufferLease::FileCheck::kChecked);
  }
  if (!w.ok()) return false;  // the ring file shrank: close it (the client reads end of file)
  const char bell = 1;
  // EAGAIN: the client has unread bells and will look at response_seq.
  (void)!::write(r.response_fd, &bell, 1);
  r.answered = absl::Now();
  return true;
}

void DecodeRingServer::Stop() {
  absl::flat_hash_map<uint64_t, std::shared_ptr<Ring>> rings;
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return;
    stopped_ = true;
  }
  stopping_.store(true, std::memory_order_relaxed);
  if (stop_fd_ >= 0) {
    const uint64_t one = 1;
    (void)!::write(stop_fd_, &one, sizeof one);
  }
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
  {
    absl::MutexLock lock(&mu_);
    rings.swap(rings_);
    by_tenant_.clear();
  }
  for (auto& [key, r] : rings) ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, r->request_fd, nullptr);
  // Destroying the rings closes their FIFOs: clients read end of file.
}

bool DecodeRingServer::AwaitClosed(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithDeadline(absl::Condition(this, &DecodeRingServer::NoRings), deadline);
}

int DecodeRingServer::open_rings() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(rings_.size());
}

int64_t DecodeRingServer::rings_reclaimed() const {
  absl::MutexLock lock(&mu_);
  return reclaimed_;
}

}  // namespace icecache::rpc
