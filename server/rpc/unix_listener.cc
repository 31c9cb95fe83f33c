#include "server/rpc/unix_listener.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "server/rpc/log.h"

namespace icecache::rpc {
namespace {

std::string Errno(int err) { return std::strerror(err); }

absl::Status ErrnoStatus(int err, absl::string_view what) {
  const std::string msg = absl::StrCat(what, ": ", Errno(err));
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return absl::NotFoundError(msg);
    case EACCES:
    case EPERM:
    case EROFS:
      return absl::PermissionDeniedError(msg);
    case EADDRINUSE:
      return absl::FailedPreconditionError(msg);
    default:
      return absl::InternalError(msg);
  }
}

// Removes `path` only when it is a socket nobody accepts on.
absl::Status RemoveStaleSocket(const std::string& path, const sockaddr_un& addr) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return ErrnoStatus(errno, absl::StrCat("stat ", path));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, " exists and is not a socket; refusing to remove it (choose another --socket)"));
  }
  const int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (probe < 0) return ErrnoStatus(errno, "socket");
  const int rc = ::connect(probe, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  const int err = errno;
  ::close(probe);
  if (rc == 0) {
    return absl::FailedPreconditionError(absl::StrCat("another daemon is listening on ", path,
                                                      "; stop it or choose another --socket"));
  }
  if (err != ECONNREFUSED) {
    return ErrnoStatus(err, absl::StrCat("probing existing socket ", path));
  }
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return ErrnoStatus(errno, absl::StrCat("removing stale socket ", path));
  }
  Log(LogLevel::kInfo, "removed_stale_socket", {{"path", path}});
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PeerCred> GetPeerCred(int fd) {
  struct ucred cred;
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return absl::InternalError(absl::StrCat("getsockopt(SO_PEERCRED): ", Errno(errno)));
  }
  return PeerCred{cred.pid, cred.uid, cred.gid};
}

absl::StatusOr<std::unique_ptr<UnixListener>> UnixListener::Create(const std::string& path,
                                                                   mode_t mode) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path[0] != '/') {
    return absl::InvalidArgumentError(absl::StrCat("socket path \"", path, "\" must be absolute"));
  }
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("socket path \"", path, "\" is longer than ",
                                                   sizeof(addr.sun_path) - 1, " bytes"));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (absl::Status st = RemoveStaleSocket(path, addr); !st.ok()) return st;

  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return ErrnoStatus(errno, "socket(AF_UNIX)");
  // Bind with a restrictive umask so the file never exists with looser bits
  // than `mode` between bind and chmod.
  const mode_t old_umask = ::umask(0177);
  const int brc = ::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  const int berr = errno;
  ::umask(old_umask);
  if (brc != 0) {
    ::close(fd);
    return ErrnoStatus(berr, absl::StrCat("bind ", path));
  }
  struct stat st;
  if (::chmod(path.c_str(), mode) != 0 || ::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return ErrnoStatus(err, absl::StrCat("chmod ", path));
  }
  if (::listen(fd, 256) != 0) {
    const int err = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return ErrnoStatus(err, absl::StrCat("listen ", path));
  }
  const int wake = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) {
    const int err = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return ErrnoStatus(err, "eventfd");
  }
  return std::unique_ptr<UnixListener>(new UnixListener(path, fd, wake, st.st_dev, st.st_ino));
}

UnixListener::UnixListener(std::string path, int listen_fd, int wake_fd, dev_t dev, ino_t ino)
    : path_(std::move(path)), listen_fd_(listen_fd), wake_fd_(wake_fd), dev_(dev), ino_(ino) {}

UnixListener::~UnixListener() { Stop(); }

void UnixListener::Start(AcceptFn on_accept) {
  thread_ = std::thread([this, fn = std::move(on_accept)] { AcceptLoop(fn); });
}

void UnixListener::AcceptLoop(AcceptFn on_accept) {
  pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
  while (true) {
    const int n = ::poll(fds, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      Log(LogLevel::kError, "accept_poll_failed", {{"error", Errno(errno)}});
      return;
    }
    if (fds[1].revents != 0) return;  // Stop()
    if ((fds[0].revents & POLLIN) == 0) continue;
    while (true) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        if (errno == EINTR || errno == ECONNABORTED) continue;
        // EMFILE and friends: log, back off briefly, keep serving.
        Log(LogLevel::kWarn, "accept_failed", {{"error", Errno(errno)}});
        ::poll(nullptr, 0, 50);
        break;
      }
      absl::StatusOr<PeerCred> cred = GetPeerCred(fd);
      if (!cred.ok()) {
        Log(LogLevel::kWarn, "peer_cred_failed", {{"error", cred.status().message()}});
        ::close(fd);
        continue;
      }
      accepted_.fetch_add(1);
      on_accept(fd, *cred);
    }
  }
}

void UnixListener::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (thread_.joinable()) {
    const uint64_t one = 1;
    ssize_t unused = ::write(wake_fd_, &one, sizeof(one));
    (void)unused;
    thread_.join();
  }
  ::close(listen_fd_);
  ::close(wake_fd_);
  struct stat st;
  if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) {
    ::unlink(path_.c_str());
  }
}

}  // namespace icecache::rpc
