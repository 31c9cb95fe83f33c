// DaemonProcess: starts a real icecached binary as a child process on a
// private Unix socket and stops it again. Used by icecache-demo --spawn, by
// icecache-bench-rpc --spawn and by the integration tests (no mocks: a real
// process, a real socket).
//
// Ownership: the object owns the child process, a private temporary
// directory (socket, stderr log, optional config file) and removes all of
// them on destruction. Move-only.
// Thread safety: not thread-safe; use from one thread (the child process
// itself may of course be used concurrently through its socket).
#ifndef ICECACHE_CLIENT_DAEMON_PROCESS_H_
#define ICECACHE_CLIENT_DAEMON_PROCESS_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace icecache {

struct DaemonOptions {
  // Path of the icecached executable. Required.
  std::string binary;
  // Extra command-line flags appended after the defaults
  // (--socket=<tmp> --metrics_port=<metrics_port> --log_level=<log_level>).
  std::vector<std::string> extra_args;
  // The Prometheus /metrics port on loopback; 0: off.
  uint16_t metrics_port = 0;
  // When non-empty, written to <tmpdir>/icecached.textproto and passed with
  // --config=<that path>.
  std::string config_textproto;
  std::string log_level = "warn";
  // Where the daemon listens. Empty: <tmpdir>/icecached.sock. Set it to the
  // socket of a killed daemon to restart one in its place (what a supervisor
  // does); the new daemon removes the stale socket file.
  std::string socket_path;
  // How long Start() waits for "icecached ready" on stderr plus a successful
  // connect() on the socket.
  absl::Duration ready_timeout = absl::Seconds(30);
  // How long Stop() waits after SIGTERM before it sends SIGKILL.
  absl::Duration stop_timeout = absl::Seconds(20);
  // The daemon gets SIGTERM (drains, removes its socket and arena files) when
  // the thread that called Start() ends: a test or benchmark killed by a
  // timeout or a sanitizer leaves no daemon behind. Linux delivers this when
  // the forking *thread* exits, so a caller that starts a daemon from a
  // short-lived thread and keeps it must set this to false.
  bool die_with_parent = true;
};

class DaemonProcess {
 public:
  // Forks and execs the daemon, waits until it serves. Errors:
  // InvalidArgument (no binary), NotFound (binary missing/not executable),
  // Internal (mkdtemp/fork failures), Unavailable (the daemon exited before
  // being ready; the message carries the tail of its stderr),
  // DeadlineExceeded (not ready within ready_timeout; the child is killed).
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(const DaemonOptions& options);

  // Sends SIGTERM (if still running) and waits; removes the temp directory.
  ~DaemonProcess();
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;

  const std::string& socket_path() const { return socket_path_; }
  // "unix:<socket_path>", ready for grpc::CreateChannel or Client options.
  std::string target() const { return "unix:" + socket_path_; }
  pid_t pid() const { return pid_; }
  const std::string& temp_dir() const { return temp_dir_; }

  // Everything the daemon wrote to stderr so far.
  std::string Stderr() const;

  // Sends `signal` to the daemon. FailedPrecondition once it has exited.
  absl::Status Signal(int signal);
  // Waits for the daemon to exit (after Signal(SIGTERM) for example) and
  // returns its wait status (as from waitpid). DeadlineExceeded on timeout.
  absl::StatusOr<int> Wait(absl::Duration timeout);
  // True while the child has not been reaped.
  bool running();
  // SIGTERM, wait stop_timeout, then SIGKILL. Returns the wait status.
  absl::StatusOr<int> Stop();

 private:
  DaemonProcess() = default;
  absl::Status WaitReady(absl::Duration timeout);

  DaemonOptions options_;
  std::string temp_dir_;
  std::string socket_path_;
  std::string stderr_path_;
  pid_t pid_ = -1;
  bool exited_ = false;
  int wait_status_ = 0;
};

// Reads /proc/<pid>/status and returns VmRSS in bytes. NotFound when the
// process is gone, Internal when the field is missing.
absl::StatusOr<int64_t> ProcessRssBytes(pid_t pid);

}  // namespace icecache

#endif  // ICECACHE_CLIENT_DAEMON_PROCESS_H_
