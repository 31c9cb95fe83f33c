#include "client/decode_ring_client.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/client_internal.h"
#include "common/decode_ring_layout.h"
#include "common/random_id.h"
#include "common/status_macros.h"
#include "icecache/v1/decode_ring.grpc.pb.h"

namespace icecache {
namespace {

absl::Status OsError(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, "(", path, "): ", std::strerror(errno)));
}

// Removes the FIFO names however Attach ends; the open descriptors stay.
struct FifoNames {
  ~FifoNames() {
    if (!request.empty()) ::unlink(request.c_str());
    if (!response.empty()) ::unlink(response.c_str());
  }
  std::string request, response;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DecodeRingClient>> DecodeRingClient::Open(
    Client& client, std::string_view session_id, absl::Duration spin) {
  std::unique_ptr<DecodeRingClient> r(new DecodeRingClient());
  r->spin_ = spin;
  RETURN_IF_ERROR(r->Attach(client, session_id));
  return r;
}

absl::Status DecodeRingClient::Attach(Client& client, std::string_view session_id) {
  ASSIGN_OR_RETURN(buffer_, client.CreateShmBuffer(ring::RingBytes(kCapacity, kCapacity)));
  uint8_t* h = buffer_.data();
  std::memcpy(h + ring::kMagicOffset, &ring::kMagic, sizeof ring::kMagic);
  std::memcpy(h + ring::kVersionOffset, &ring::kVersion, sizeof ring::kVersion);
  FifoNames names;
  const std::string stem =
      absl::StrFormat("/dev/shm/icecache-ring-%d-%s", ::getpid(), RandomHexId());
  for (std::string* path : {&names.request, &names.response}) {
    const std::string p = stem + (path == &names.request ? ".req" : ".resp");
    if (::mkfifo(p.c_str(), 0600) != 0) return OsError("mkfifo", p);
    *path = p;
  }
  // Read-write: this process is the FIFO's writer from here on, so the
  // daemon sees end of file only when this process closes it or exits.
  request_fd_ = ::open(names.request.c_str(), O_RDWR | O_CLOEXEC | O_NONBLOCK);
  if (request_fd_ < 0) return OsError("open", names.request);
  response_fd_ = ::open(names.response.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (response_fd_ < 0) return OsError("open", names.response);
  const char hello = 1;
  if (::write(request_fd_, &hello, 1) != 1) return OsError("write", names.request);

  v1::OpenDecodeRingRequest req;
  req.set_session_id(std::string(session_id));
  req.set_buffer_id(buffer_.buffer_id());
  req.set_request_capacity(kCapacity);
  req.set_response_capacity(kCapacity);
  req.set_request_fifo(names.request);
  req.set_response_fifo(names.response);
  v1::OpenDecodeRingResponse resp;
  auto ctx = client.impl()->NewContext();
  RETURN_IF_ERROR(FromGrpcStatus(client.impl()->rings->OpenDecodeRing(ctx.get(), req, &resp)));
  id_ = resp.ring_id();
  // The daemon holds the write end now: blocking reads end at its answer or
  // at end of file when it closes the ring.
  const int flags = ::fcntl(response_fd_, F_GETFL);
  if (flags < 0 || ::fcntl(response_fd_, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    return OsError("fcntl", names.response);
  }
  return absl::OkStatus();
}

DecodeRingClient::~DecodeRingClient() {
  if (request_fd_ >= 0) ::close(request_fd_);
  if (response_fd_ >= 0) ::close(response_fd_);
}

bool DecodeRingClient::Fits(const v1::DecodeStepRequest& req) const {
  return req.ByteSizeLong() <= kCapacity;
}

absl::Status DecodeRingClient::Exchange(const v1::DecodeStepRequest& req,
                                        v1::DecodeStepResponse* resp) {
  if (broken_) return absl::UnavailableError("the daemon closed this decode ring");
  uint8_t* h = buffer_.data();
  const size_t size = req.ByteSizeLong();
  if (size > kCapacity) {
    return absl::InvalidArgumentError(absl::StrCat("a DecodeStep request of ", size,
                                                   " bytes does not fit the ring's ", kCapacity,
                                                   "-byte request area"));
  }
  req.SerializeWithCachedSizesToArray(h + ring::RequestAreaOffset());
  const uint32_t len = static_cast<uint32_t>(size);
  std::memcpy(h + ring::kRequestLenOffset, &len, sizeof len);
  const uint64_t seq = ++seq_;
  __atomic_store_n(reinterpret_cast<uint64_t*>(h + ring::kRequestSeqOffset), seq, __ATOMIC_RELEASE);
  const char bell = 1;
  while (::write(request_fd_, &bell, 1) < 0 && errno == EINTR) {
  }
  // EAGAIN: the daemon has unread bells and reads request_seq anyway.
  RETURN_IF_ERROR(AwaitAnswer(seq));
  int32_t code;
  uint32_t n;
  std::memcpy(&code, h + ring::kCodeOffset, sizeof code);
  std::memcpy(&n, h + ring::kResponseLenOffset, sizeof n);
  if (n > kCapacity) return absl::InternalError("decode ring: response_len past the area");
  const uint8_t* body = h + ring::ResponseAreaOffset(kCapacity);
  if (code != 0) {
    if (code < 0 || code > static_cast<int32_t>(absl::StatusCode::kUnauthenticated)) {
      code = static_cast<int32_t>(absl::StatusCode::kUnknown);
    }
    return absl::Status(static_cast<absl::StatusCode>(code),
                        std::string(reinterpret_cast<const char*>(body), n));
  }
  if (!resp->ParseFromArray(body, static_cast<int>(n))) {
    return absl::InternalError("decode ring: the daemon's answer is not a DecodeStepResponse");
  }
  return absl::OkStatus();
}

bool DecodeRingClient::Answered(uint64_t seq) const {
  return __atomic_load_n(
             reinterpret_cast<const uint64_t*>(buffer_.data() + ring::kResponseSeqOffset),
             __ATOMIC_ACQUIRE) == seq;
}

absl::Status DecodeRingClient::AwaitAnswer(uint64_t seq) {
  const absl::Time sent = absl::Now();
  if (spin_ > absl::ZeroDuration() && last_wait_ <= spin_) {
    // The daemon's doorbell still comes; the next read drains it.
    for (;;) {
      if (Answered(seq)) {
        last_wait_ = absl::Now() - sent;
        return absl::OkStatus();
      }
      if (absl::Now() - sent >= spin_) break;
      ::sched_yield();  // the daemon's threads, if on this CPU, go first
    }
  }
  const absl::Status s = SleepForAnswer(seq);
  last_wait_ = absl::Now() - sent;
  return s;
}

absl::Status DecodeRingClient::SleepForAnswer(uint64_t seq) {
  for (;;) {
    if (Answered(seq)) return absl::OkStatus();
    char bells[64];
    const ssize_t n = ::read(response_fd_, bells, sizeof bells);
    if (n > 0) continue;
    if (n < 0 && errno == EINTR) continue;
    if (Answered(seq)) return absl::OkStatus();
    broken_ = true;
    return absl::UnavailableError(
        n == 0 ? "the daemon closed the decode ring (it stopped or reclaimed the ring)"
               : absl::StrCat("decode ring: read: ", std::strerror(errno)));
  }
}

}  // namespace icecache
