#include "client/daemon_process.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/file_util.h"

namespace icecache {
namespace {

std::string Tail(const std::string& s, size_t n) {
  return s.size() <= n ? s : s.substr(s.size() - n);
}

bool CanConnect(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    ::close(fd);
    return false;
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}

}  // namespace

absl::StatusOr<std::unique_ptr<DaemonProcess>> DaemonProcess::Start(const DaemonOptions& options) {
  if (options.binary.empty()) {
    return absl::InvalidArgumentError("DaemonOptions.binary is empty: give the icecached path");
  }
  if (::access(options.binary.c_str(), X_OK) != 0) {
    return absl::NotFoundError(
        absl::StrCat("icecached binary '", options.binary,
                     "' is missing or not executable: ", std::strerror(errno)));
  }
  std::unique_ptr<DaemonProcess> d(new DaemonProcess());
  d->options_ = options;
  // Under $TMPDIR, like mktemp(1), where the socket's path fits sun_path
  // (107 bytes); under /tmp otherwise, and when TMPDIR is unset.
  const char* tmpdir = ::getenv("TMPDIR");
  std::string tmpl = "/tmp/icecached-XXXXXX";
  if (tmpdir != nullptr && tmpdir[0] == '/' &&
      std::strlen(tmpdir) + std::strlen("/icecached-XXXXXX/icecached.sock") <= 107) {
    tmpl = absl::StrCat(tmpdir, "/icecached-XXXXXX");
  }
  if (::mkdtemp(tmpl.data()) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp(", tmpl, "): ", std::strerror(errno)));
  }
  d->temp_dir_ = tmpl;
  // Let a non-root client (tests run a second tenant under another uid)
  // reach the socket in this directory.
  ::chmod(d->temp_dir_.c_str(), 0755);
  d->socket_path_ =
      options.socket_path.empty() ? d->temp_dir_ + "/icecached.sock" : options.socket_path;
  d->stderr_path_ = d->temp_dir_ + "/stderr.log";

  std::vector<std::string> args = {options.binary, "--socket=" + d->socket_path_,
                                   "--metrics_port=" + std::to_string(options.metrics_port),
                                   "--log_level=" + options.log_level};
  if (!options.config_textproto.empty()) {
    const std::string config_path = d->temp_dir_ + "/icecached.textproto";
    std::ofstream out(config_path);
    out << options.config_textproto;
    out.close();
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", config_path));
    args.push_back("--config=" + config_path);
  }
  for (const auto& a : options.extra_args) args.push_back(a);

  const int err_fd =
      ::open(d->stderr_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (err_fd < 0) {
    return absl::InternalError(absl::StrCat("open ", d->stderr_path_, ": ", std::strerror(errno)));
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(err_fd);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls from here on.
    if (options.die_with_parent) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != parent) _exit(127);  // the parent died before prctl
    }
    ::dup2(err_fd, STDERR_FILENO);
    const int null_fd = ::open("/dev/null", O_RDWR);
    if (null_fd >= 0) {
      ::dup2(null_fd, STDIN_FILENO);
      ::dup2(null_fd, STDOUT_FILENO);
    }
    ::execv(argv[0], argv.data());
    _exit(127);
  }
  ::close(err_fd);
  d->pid_ = pid;
  absl::Status ready = d->WaitReady(options.ready_timeout);
  if (!ready.ok()) {
    if (d->running()) {
      ::kill(d->pid_, SIGKILL);
      (void)d->Wait(absl::Seconds(10));
    }
    return ready;
  }
  return d;
}

absl::Status DaemonProcess::WaitReady(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (!running()) {
      return absl::UnavailableError(
          absl::StrCat("icecached exited before it was ready (wait status ", wait_status_,
                       "); stderr tail:\n", Tail(Stderr(), 4000)));
    }
    if (Stderr().find("icecached ready") != std::string::npos && CanConnect(socket_path_)) {
      return absl::OkStatus();
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat("icecached not ready on ", socket_path_,
                                                  " after ", absl::FormatDuration(timeout),
                                                  "; stderr tail:\n", Tail(Stderr(), 4000)));
}

DaemonProcess::~DaemonProcess() {
  if (pid_ > 0 && running()) (void)Stop();
  if (!temp_dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(temp_dir_, ec);
  }
}

std::string DaemonProcess::Stderr() const { return ReadFileToString(stderr_path_).value_or(""); }

absl::Status DaemonProcess::Signal(int signal) {
  if (!running()) return absl::FailedPreconditionError("icecached has already exited");
  if (::kill(pid_, signal) != 0) {
    return absl::InternalError(absl::StrCat("kill(", pid_, "): ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

bool DaemonProcess::running() {
  if (exited_ || pid_ <= 0) return false;
  int status = 0;
  const pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exited_ = true;
    wait_status_ = status;
    return false;
  }
  return r == 0;
}

absl::StatusOr<int> DaemonProcess::Wait(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (running()) {
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "icecached (pid ", pid_, ") still running after ", absl::FormatDuration(timeout)));
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return wait_status_;
}

absl::StatusOr<int> DaemonProcess::Stop() {
  if (running()) ::kill(pid_, SIGTERM);
  absl::StatusOr<int> st = Wait(options_.stop_timeout);
  if (!st.ok() && running()) {
    ::kill(pid_, SIGKILL);
    return Wait(absl::Seconds(10));
  }
  return st;
}

absl::StatusOr<int64_t> ProcessRssBytes(pid_t pid) {
  const std::string path = absl::StrCat("/proc/", pid, "/status");
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path, ": process gone?"));
  std::string line;
  while (std::getline(in, line)) {
    absl::string_view v = line;
    if (absl::ConsumePrefix(&v, "VmRSS:")) {
      v = absl::StripAsciiWhitespace(v);
      absl::ConsumeSuffix(&v, "kB");
      v = absl::StripAsciiWhitespace(v);
      int64_t kb = 0;
      if (!absl::SimpleAtoi(v, &kb)) break;
      return kb * 1024;
    }
  }
  return absl::InternalError(absl::StrCat("no VmRSS line in ", path));
}

}  // namespace icecache
