// Daemon: everything icecached runs, wired together (docs/architecture.md).
//
// Create() builds the core (PagePool, BufferRegistry, SessionManager with its
// lease reaper), the authenticator, the metrics registry and the gRPC server
// (the four icecache.v1 services, grpc.health.v1, server reflection; no
// listening port of its own besides the optional TLS TCP port), then the
// Unix-socket listener (unix_listener.h) and, when metrics.port != 0, the
// loopback HTTP endpoint (/metrics in Prometheus text format, /healthz).
//
// Shutdown sequence (SIGTERM/SIGINT, or AdminService.Drain(shutdown)):
// BeginDrain() makes CreateSession answer UNAVAILABLE and health report
// NOT_SERVING; Shutdown() then stops accepting connections, lets in-flight
// calls finish for up to drain_timeout_ms (then cancels them) and stops
// everything. Both are idempotent.
//
// Thread safety: BeginDrain, RequestShutdown and WaitForShutdownRequest are
// thread-safe; Start/Shutdown are called by the owning (main) thread.
#ifndef ICECACHE_SERVER_RPC_DAEMON_H_
#define ICECACHE_SERVER_RPC_DAEMON_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "icecache/v1/config.pb.h"
#include "server/pool/page_pool.h"
#include "server/rpc/auth.h"
#include "server/rpc/decode_ring.h"
#include "server/rpc/decode_ring_service.h"
#include "server/rpc/metrics.h"
#include "server/rpc/quality_metrics.h"
#include "server/rpc/services.h"
#include "server/rpc/unix_listener.h"
#include "server/session/session_manager.h"
#include "server/transfer/buffer_registry.h"
#include "server/transfer/cuda_runtime.h"
#include "server/transfer/host_pinner.h"

namespace httplib {
class Server;
}

namespace icecache::rpc {

// Choices of the embedding program that are not part of the config file.
struct DaemonOptions {
  // Bind the metrics endpoint to any free loopback port (read it back with
  // metrics_port()) instead of metrics.port; for tests and embedders that
  // run several daemons on one host.
  bool metrics_any_port = false;
};

class Daemon {
 public:
  // `config` must be defaulted and valid (ApplyDefaults + ValidateConfig).
  // Errors: those of PagePool/BufferRegistry/SessionManager creation, of the
  // Unix listener (socket path busy, not a socket, no permission), TLS files
  // unreadable (InvalidArgument), gRPC failing to start (Internal), the
  // metrics port unavailable (Unavailable).
  static absl::StatusOr<std::unique_ptr<Daemon>> Create(const v1::IcecachedConfig& config,
                                                        const DaemonOptions& options = {});
  ~Daemon();  // Shutdown() if not done.
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  const std::string& socket_path() const { return listener_->path(); }
  int metrics_port() const { return metrics_port_; }  // 0 when off
  int tcp_port() const { return tcp_port_; }          // 0 when off
  uint64_t epoch() const { return manager_->epoch(); }

  void BeginDrain();
  // Wakes WaitForShutdownRequest (signal-thread safe; not async-signal-safe).
  void RequestShutdown();
  void WaitForShutdownRequest();
  // pool.prefault: blocks until the arena is faulted in (true) or a shutdown
  // was requested first (false). At once true without pool.prefault. Until
  // then gRPC health says NOT_SERVING and /healthz answers 503 "prefaulting";
  // calls are served (slower: they may take the first-touch faults).
  bool WaitUntilReady();
  bool ready() const { return ready_.load(); }
  // Drains, waits for in-flight calls (bounded by drain_timeout_ms), stops.
  void Shutdown();

  Registry* metrics() { return &registry_; }

  // After Shutdown(): the process's exit code. 0 normally; after a drain for
  // upgrade, kExitDrainedForUpgrade when the warm-restart snapshot was
  // written (the arena file and snapshot are kept), 1 when it could not be.
  static constexpr int kExitDrainedForUpgrade = 3;
  int exit_code() const { return exit_code_.load(); }

 private:
  Daemon(const v1::IcecachedConfig& config, const DaemonOptions& options);
  absl::Status Init();
  absl::Status StartMetricsHttp();
  void CollectMetrics();
  // The direct mode (config transfer.direct_reads): pins the pool's arena in
  // the background, then lets pushes read pages in place (device_push.h).
  void StartPinningPool();
  // Warm restart (docs/architecture.md §5): the pool, file-backed when
  // pool.backing_dir is set, over the previous daemon's arena when its
  // snapshot can be used (the snapshot is consumed: read, then removed;
  // likewise the index images, opened into index_images_ until the
  // sessions are recovered).
  absl::Status CreatePool(std::optional<SnapshotImage>* snapshot);
  void RecoverSessions(const SnapshotImage& snapshot);
  void WriteUpgradeSnapshot();
  // The pool.prefault thread: PagePool::PrefaultArena, then ready.
  void PrefaultPool();
  bool ReadyOrShutdownLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const v1::IcecachedConfig config_;
  const DaemonOptions options_;
  Registry registry_;
  std::unique_ptr<RpcMetrics> rpc_metrics_;
  // Fed by the manager's sampler thread: declared before manager_ so it
  // outlives it.
  std::unique_ptr<QualityMetrics> quality_metrics_;
  std::unique_ptr<CudaRuntime> cuda_;
  std::unique_ptr<PagePool> pool_;
  std::unique_ptr<BufferRegistry> buffers_;
  // Pins the pool's arena for the direct mode (device_push.h); before pool_
  // goes, after every push stopped.
  std::unique_ptr<HostPinner> pinner_;
  std::unique_ptr<SessionManager> manager_;
  std::unique_ptr<Authenticator> auth_;
  PeerTable peers_;
  std::unique_ptr<CallLimiter> limiter_;
  ServiceDeps deps_;
  std::unique_ptr<SessionServiceImpl> session_service_;
  std::unique_ptr<BufferServiceImpl> buffer_service_;
  std::unique_ptr<KvServiceImpl> kv_service_;
  std::unique_ptr<AdminServiceImpl> admin_service_;
  std::unique_ptr<DecodeRingServiceImpl> ring_service_;
  // After ring_service_ (its handler) and the core: stopped before them.
  std::unique_ptr<DecodeRingServer> rings_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<UnixListener> listener_;
  std::unique_ptr<httplib::Server> http_;
  std::thread http_thread_;
  int metrics_port_ = 0;
  int tcp_port_ = 0;
  Caller internal_admin_;  // for stats collection

  SnapshotFamily* pool_bytes_ = nullptr;
  SnapshotFamily* tenant_bytes_ = nullptr;
  SnapshotFamily* tenant_quota_ = nullptr;
  SnapshotFamily* tenant_free_ = nullptr;
  SnapshotFamily* tenant_sessions_ = nullptr;
  SnapshotFamily* class_bytes_ = nullptr;
  SnapshotFamily* class_frames_ = nullptr;
  SnapshotFamily* sessions_ = nullptr;
  SnapshotFamily* buffers_gauge_ = nullptr;
  SnapshotFamily* gpu_pushes_ = nullptr;
  SnapshotFamily* session_events_ = nullptr;
  SnapshotFamily* draining_gauge_ = nullptr;
  SnapshotFamily* connections_ = nullptr;
  SnapshotFamily* checksum_failures_ = nullptr;
  SnapshotFamily* pages_verified_ = nullptr;
  SnapshotFamily* decode_keys_ = nullptr;
  SnapshotFamily* decode_rings_ = nullptr;
  SnapshotFamily* decode_rings_closed_ = nullptr;
  SnapshotFamily* decode_ring_caught_ = nullptr;
  SnapshotFamily* decode_lane_jobs_ = nullptr;
  SnapshotFamily* decode_lane_helper_tasks_ = nullptr;
  SnapshotFamily* decode_lane_jobs_alone_ = nullptr;
  SnapshotFamily* prefault_bytes_ = nullptr;
  SnapshotFamily* prefault_seconds_ = nullptr;
  SnapshotFamily* staging_reserve_ = nullptr;
  SnapshotFamily* staging_lent_ = nullptr;
  SnapshotFamily* staging_waits_ = nullptr;
  SnapshotFamily* staging_wait_seconds_ = nullptr;

  // pool.prefault (docs/operations.md): the thread, its stop flag, its time.
  std::thread prefault_thread_;
  std::atomic<bool> prefault_stop_{false};
  std::atomic<double> prefault_seconds_value_{-1};  // -1: not done (or off)
  std::atomic<bool> ready_{true};
  // Orders the health status the prefault thread sets against a drain's.
  absl::Mutex health_mu_;

  std::string snapshot_path_;                     // empty: no warm restart
  std::string index_images_path_;                 // next to the snapshot
  std::unique_ptr<IndexImageFile> index_images_;  // from CreatePool to RecoverSessions
  std::atomic<bool> for_upgrade_{false};
  std::atomic<int> exit_code_{0};

  bool started_ = false;  // Init() completed
  absl::Mutex mu_;
  bool shutdown_requested_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_DAEMON_H_
