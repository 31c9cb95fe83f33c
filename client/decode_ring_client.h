// DecodeRingClient: the client's end of a DecodeStep ring
// (proto/icecache/v1/decode_ring.proto, docs/architecture.md §8.1). Client
// internals: used by Client::DecodeStep when ClientOptions.decode_ring is on
// and the daemon accepts the ring; includes generated protobuf headers.
//
// Open() creates a ring buffer (a registered ShmBuffer), two FIFOs under
// /dev/shm, writes the header and the hello byte, asks the daemon to attach
// (OpenDecodeRing) and unlinks the FIFOs. Exchange() sends one request and
// waits for its answer: watching response_seq for up to `spin` while the
// last answer came within it, then blocked in read() on the response FIFO.
// Destruction closes the FIFOs (the daemon then reclaims the ring) and
// unregisters the buffer.
//
// Thread safety: one thread at a time (the session's stream state mutex in
// client.cc serialises it).
#ifndef ICECACHE_CLIENT_DECODE_RING_CLIENT_H_
#define ICECACHE_CLIENT_DECODE_RING_CLIENT_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "icecache/v1/kv.pb.h"

namespace icecache {

class DecodeRingClient {
 public:
  // Request and response areas of this size each (the ring's buffer is
  // their sum plus the 256-byte header; untouched pages cost nothing).
  static constexpr uint64_t kCapacity = uint64_t{4} << 20;

  // The daemon's status when it refuses the ring (UNIMPLEMENTED from a
  // daemon without rings; see decode_ring.proto for the others); Internal
  // for local OS errors.
  // `spin`: ClientOptions::decode_ring_spin.
  static absl::StatusOr<std::unique_ptr<DecodeRingClient>> Open(
      Client& client, std::string_view session_id, absl::Duration spin = absl::ZeroDuration());
  ~DecodeRingClient();
  DecodeRingClient(const DecodeRingClient&) = delete;
  DecodeRingClient& operator=(const DecodeRingClient&) = delete;

  // Whether `req` fits the request area (else the caller uses the stream).
  bool Fits(const v1::DecodeStepRequest& req) const;
  // One request and its answer. The answer's status (the daemon's code and
  // message), UNAVAILABLE once the daemon closed the ring (it stopped or
  // reclaimed it; the ring is then broken()), Internal for an answer that is
  // not a DecodeStepResponse.
  absl::Status Exchange(const v1::DecodeStepRequest& req, v1::DecodeStepResponse* resp);
  bool broken() const { return broken_; }
  const std::string& id() const { return id_; }

 private:
  DecodeRingClient() = default;
  absl::Status Attach(Client& client, std::string_view session_id);
  // Whether response_seq is `seq` (acquire: the answer's bytes are visible).
  bool Answered(uint64_t seq) const;
  absl::Status AwaitAnswer(uint64_t seq);
  // Blocked in read() on the response FIFO until answer `seq`.
  absl::Status SleepForAnswer(uint64_t seq);

  ShmBuffer buffer_;
  std::string id_;
  int request_fd_ = -1;   // the request FIFO, open read-write (a writer)
  int response_fd_ = -1;  // the response FIFO, open for reading
  uint64_t seq_ = 0;
  bool broken_ = false;
  absl::Duration spin_;
  absl::Duration last_wait_ = absl::ZeroDuration();  // send to answer, the last exchange
};

}  // namespace icecache

#endif  // ICECACHE_CLIENT_DECODE_RING_CLIENT_H_
