// DecodeRingServer: serves DecodeStep messages that local clients put into
// shared-memory rings (proto/icecache/v1/decode_ring.proto, docs/architecture.md
// §8.1), without gRPC on the message path.
//
// A ring is one client's, for one session: a registered HOST_SHM buffer (the
// header and the request and response areas), a request doorbell FIFO the
// daemon reads and a response doorbell FIFO it writes. Every open ring's
// request FIFO sits in one epoll set, EPOLLONESHOT; `threads` threads wait
// on it, and the thread woken for a ring handles its message itself (no
// hand-off): read the request out of shared memory into private memory,
// parse, run the handler, write the answer, ring back, re-arm. After an
// answer the thread may first watch the ring for the client's next message
// (DecodeRingOptions::max_spin, a busy ring only). An idle ring holds no
// thread, only its two descriptors and its buffer lease.
//
// Reclaim: when the client closes its end of the request FIFO (it exited,
// crashed, or closed the ring) the ring is closed and everything it held is
// released (the buffer lease, the descriptors, its place in the limits).
// Stop() closes every ring (clients read end of file on their response
// FIFO) and joins the threads; the daemon first lets rings drain like open
// streams (AwaitClosed until the drain deadline).
//
// Limits: a tenant may hold at most `max_rings_per_tenant` rings and the
// daemon `max_rings` (RESOURCE_EXHAUSTED beyond). Each message is handled
// under a call ticket of the handler's choosing (see RingHandler).
//
// Ownership: the registry must outlive the server. Thread safety: Open,
// Stop and the counters are thread-safe; the handler runs on the server's
// threads, one message of a ring at a time.
#ifndef ICECACHE_SERVER_RPC_DECODE_RING_H_
#define ICECACHE_SERVER_RPC_DECODE_RING_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/caller.h"
#include "icecache/v1/kv.pb.h"
#include "server/rpc/decode_step.h"
#include "server/transfer/buffer_registry.h"

namespace icecache::rpc {

// Handles one message of a ring of `caller` (HandleDecodeMessage plus the
// caller's call ticket and metrics in the daemon). Runs on a ring thread.
using RingHandler =
    std::function<absl::Status(const Caller& caller, const v1::DecodeStepRequest& req,
                               DecodeCursor* cursor, v1::DecodeStepResponse* resp)>;

struct DecodeRingOptions {
  int threads = 4;
  int max_rings_per_tenant = 64;
  int max_rings = 256;
  // Where the doorbell FIFOs must be (directly in it, no subdirectory).
  std::string fifo_dir = "/dev/shm";
  // After answering, the ring's thread watches request_seq for the ring's
  // next message for up to `max_spin` (zero: never) before it goes back to
  // epoll, when the ring's last request came within that time of the answer
  // before it: a decode loop's next layer message then starts without a
  // thread wake-up (docs/architecture.md §8.1 "Waiting"). At most
  // `max_spinning` threads watch at once; the watch yields the CPU between
  // looks.
  absl::Duration max_spin = absl::Milliseconds(1);
  int max_spinning = 1;
};

// What OpenDecodeRing asks for, after the handler checked the session.
struct RingOpenParams {
  std::string session_id;
  std::string buffer_id;
  uint64_t request_capacity = 0;
  uint64_t response_capacity = 0;
  std::string request_fifo;
  std::string response_fifo;
};

class DecodeRingServer {
 public:
  // Starts the threads. Internal when epoll/eventfd cannot be created.
  static absl::StatusOr<std::unique_ptr<DecodeRingServer>> Create(const DecodeRingOptions& options,
                                                                  BufferRegistry* buffers,
                                                                  RingHandler handler);
  ~DecodeRingServer();  // Stop()
  DecodeRingServer(const DecodeRingServer&) = delete;
  DecodeRingServer& operator=(const DecodeRingServer&) = delete;

  // Attaches a ring; returns its id. Codes as decode_ring.proto's
  // OpenDecodeRing (the session is the caller's to check first);
  // Unavailable after Stop().
  absl::StatusOr<std::string> Open(const Caller& caller, const RingOpenParams& params)
      ABSL_LOCKS_EXCLUDED(mu_);

  // Waits until every ring has been closed by its client, or `deadline`.
  // Returns whether none is open.
  bool AwaitClosed(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);

  // Closes every ring and joins the threads. Idempotent.
  void Stop() ABSL_LOCKS_EXCLUDED(mu_);

  int open_rings() const ABSL_LOCKS_EXCLUDED(mu_);
  int64_t rings_reclaimed() const ABSL_LOCKS_EXCLUDED(mu_);
  // Messages a ring thread found while watching for them (no wake-up).
  int64_t messages_caught_spinning() const { return caught_.load(std::memory_order_relaxed); }

  struct Ring;  // decode_ring.cc

 private:
  DecodeRingServer(const DecodeRingOptions& options, BufferRegistry* buffers, RingHandler handler);
  absl::Status Start();
  void ThreadMain();
  // Handles what woke the thread for ring `key`; false when the ring closed.
  bool Serve(Ring& ring, uint32_t events);
  // Handles the request in the ring's header if it is new; false when the
  // ring closed.
  bool ServeRequest(Ring& ring);
  // Watches the ring for its next request (DecodeRingOptions::max_spin);
  // true when one arrived.
  bool AwaitNext(Ring& ring);
  // The request `seq` of `len` bytes, copied out and parsed into ring.request.
  absl::Status ReadRequest(Ring& ring, uint64_t seq, uint32_t len);
  // Writes the answer and rings back; false when the ring buffer can no
  // longer be written (the ring is then closed).
  bool Answer(Ring& ring, uint64_t seq, const absl::Status& status);
  void Close(uint64_t key) ABSL_LOCKS_EXCLUDED(mu_);
  std::shared_ptr<Ring> Find(uint64_t key) const ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Admit(const Caller& caller) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool NoRings() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return rings_.empty(); }

  const DecodeRingOptions options_;
  BufferRegistry* const buffers_;
  const RingHandler handler_;
  std::atomic<int> spinning_{0};
  std::atomic<int64_t> caught_{0};
  std::atomic<bool> stopping_{false};
  int epoll_fd_ = -1;
  int stop_fd_ = -1;  // eventfd: readable once Stop() began
  std::vector<std::thread> threads_;

  mutable absl::Mutex mu_;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t next_key_ ABSL_GUARDED_BY(mu_) = 1;  // 0 is the stop eventfd
  absl::flat_hash_map<uint64_t, std::shared_ptr<Ring>> rings_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, int> by_tenant_ ABSL_GUARDED_BY(mu_);
  int64_t reclaimed_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_DECODE_RING_H_
