// UnixListener: the daemon's own listening Unix socket (docs/architecture.md §8).
//
// Why not ServerBuilder::AddListeningPort("unix:..."): gRPC 1.51 exposes no
// peer uid for Unix-socket calls (auth_context is empty, peer() is the path).
// So the daemon binds and accepts itself, reads SO_PEERCRED of each accepted
// connection, and gives the connected fd to gRPC (see auth.h).
//
// Create() binds `path`:
//  - a stale socket file at `path` (S_ISSOCK, nobody accepting: connect()
//    fails with ECONNREFUSED) is removed; a live one is FailedPrecondition
//    ("another daemon is listening"); any other kind of file there is
//    FailedPrecondition and is never removed;
//  - after bind the socket file is chmod'ed to `mode` (0660 by default);
//  - errors: InvalidArgument (relative path, too long for sun_path),
//    NotFound (parent directory missing), PermissionDenied (cannot bind),
//    Internal (other socket errors, with errno text).
// Start() runs an accept thread that calls `on_accept(fd, cred)` for each
// connection (the callee takes ownership of fd). Stop() ends the thread,
// closes the listening socket and unlinks `path` if it is still our socket.
// Destruction calls Stop().
//
// Thread safety: Start/Stop from one controlling thread; on_accept runs on
// the accept thread.
#ifndef ICECACHE_SERVER_RPC_UNIX_LISTENER_H_
#define ICECACHE_SERVER_RPC_UNIX_LISTENER_H_

#include <sys/types.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "server/rpc/auth.h"

namespace icecache::rpc {

class UnixListener {
 public:
  using AcceptFn = std::function<void(int fd, const PeerCred& cred)>;

  static absl::StatusOr<std::unique_ptr<UnixListener>> Create(const std::string& path, mode_t mode);
  ~UnixListener();
  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;

  void Start(AcceptFn on_accept);
  void Stop();
  const std::string& path() const { return path_; }
  uint64_t accepted() const { return accepted_.load(); }

 private:
  UnixListener(std::string path, int listen_fd, int wake_fd, dev_t dev, ino_t ino);
  void AcceptLoop(AcceptFn on_accept);

  const std::string path_;
  int listen_fd_;
  int wake_fd_;  // eventfd that wakes the accept loop for Stop()
  const dev_t dev_;
  const ino_t ino_;  // identity of our socket file, so Stop() unlinks only it
  std::thread thread_;
  std::atomic<uint64_t> accepted_{0};
  bool stopped_ = false;
};

// PeerCred of a connected Unix socket. Internal with errno text on failure.
absl::StatusOr<PeerCred> GetPeerCred(int fd);

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_UNIX_LISTENER_H_
