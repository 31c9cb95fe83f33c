#include "common/shm_file.h"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"

namespace icecache {
namespace {

std::string Errno(int err) { return std::strerror(err); }

absl::StatusOr<std::string> RealPath(const std::string& p) {
  char buf[PATH_MAX];
  if (realpath(p.c_str(), buf) == nullptr) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) {
      return absl::NotFoundError(absl::StrCat("shm path: directory ", p, " does not exist"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("shm path: cannot resolve ", p, ": ", Errno(err)));
  }
  return std::string(buf);
}

// Splits an absolute, clean path into components; InvalidArgument for empty,
// ".", ".." components (doubled or trailing slashes included).
absl::StatusOr<std::vector<std::string>> CleanComponents(std::string_view path, const char* what) {
  if (path.empty() || path.front() != '/') {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be an absolute path, got '", std::string(path), "'"));
  }
  if (path.size() >= PATH_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is longer than ", PATH_MAX - 1));
  }
  if (path.find('\0') != std::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(what, " contains a NUL byte"));
  }
  std::vector<std::string> parts;
  std::string_view rest = path.substr(1);
  if (rest.empty()) return parts;
  for (absl::string_view c : absl::StrSplit(absl::string_view(rest.data(), rest.size()), '/')) {
    if (c.empty() || c == "." || c == "..") {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " '", std::string(path),
                       "' must not contain '.', '..', empty components or a trailing slash"));
    }
    parts.emplace_back(c);
  }
  return parts;
}

absl::Status CheckSize(uint64_t size, const ShmOpenOptions& options) {
  if (size == 0 || size > options.max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("shm size must be in 1..", options.max_bytes, " bytes, got ", size));
  }
  if (size > static_cast<uint64_t>(SIZE_MAX)) {
    return absl::InvalidArgumentError("shm size does not fit the address space");
  }
  return absl::OkStatus();
}

}  // namespace

ShmFile::~ShmFile() {
  if (data_ != nullptr) munmap(data_, size_);
  if (fd_ >= 0) close(fd_);
  if (unlink_on_close_ && !path_.empty()) unlink(path_.c_str());
}

ShmFile::ShmFile(ShmFile&& o) noexcept
    : fd_(std::exchange(o.fd_, -1)),
      data_(std::exchange(o.data_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      path_(std::move(o.path_)),
      unlink_on_close_(std::exchange(o.unlink_on_close_, false)) {
  o.path_.clear();
}

ShmFile& ShmFile::operator=(ShmFile&& o) noexcept {
  if (this != &o) {
    ShmFile dead(std::move(*this));  // releases our old resources
    fd_ = std::exchange(o.fd_, -1);
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
    path_ = std::move(o.path_);
    o.path_.clear();
    unlink_on_close_ = std::exchange(o.unlink_on_close_, false);
  }
  return *this;
}

absl::StatusOr<ShmFile> ShmFile::Create(std::string_view name, uint64_t size, bool unlink_on_close,
                                        const ShmOpenOptions& options) {
  if (name.empty() || name.size() > NAME_MAX || name == "." || name == ".." ||
      name.find('/') != std::string_view::npos || name.find('\0') != std::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("shm name must be one path component, got '", std::string(name), "'"));
  }
  if (absl::Status s = CheckSize(size, options); !s.ok()) return s;
  ShmFile f;
  f.path_ = absl::StrCat(options.root, "/", std::string(name));
  f.fd_ = open(f.path_.c_str(), O_CREAT | O_EXCL | O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (f.fd_ < 0) {
    const int err = errno;
    f.path_.clear();
    if (err == EEXIST) {
      return absl::AlreadyExistsError(
          absl::StrCat("shm file ", options.root, "/", std::string(name), " already exists"));
    }
    return absl::InternalError(absl::StrCat("shm create ", std::string(name), ": ", Errno(err)));
  }
  f.unlink_on_close_ = unlink_on_close;
  if (ftruncate(f.fd_, static_cast<off_t>(size)) != 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("shm ftruncate to ", size, ": ", Errno(errno)));
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, f.fd_, 0);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(absl::StrCat("shm mmap of ", size, ": ", Errno(errno)));
  }
  f.data_ = static_cast<uint8_t*>(p);
  f.size_ = size;
  return f;
}

absl::StatusOr<ShmFile> ShmFile::OpenChecked(std::string_view path, uint64_t size,
                                             uid_t expected_uid, const ShmOpenOptions& options) {
  auto root_parts = CleanComponents(options.root, "shm root");
  if (!root_parts.ok()) return root_parts.status();
  auto parts = CleanComponents(path, "shm path");
  if (!parts.ok()) return parts.status();
  if (parts->size() <= root_parts->size() ||
      !std::equal(root_parts->begin(), root_parts->end(), parts->begin())) {
    return absl::InvalidArgumentError(
        absl::StrCat("shm path '", std::string(path), "' is not under ", options.root));
  }
  if (absl::Status s = CheckSize(size, options); !s.ok()) return s;

  // The parent must resolve to exactly the lexical parent under the resolved
  // root: no component between the root and the file may be a symlink.
  auto real_root = RealPath(options.root);
  if (!real_root.ok()) return real_root.status();
  std::string lexical_parent = *real_root;
  for (size_t i = root_parts->size(); i + 1 < parts->size(); ++i) {
    absl::StrAppend(&lexical_parent, "/", (*parts)[i]);
  }
  auto real_parent = RealPath(lexical_parent);
  if (!real_parent.ok()) return real_parent.status();
  if (*real_parent != lexical_parent) {
    return absl::InvalidArgumentError(absl::StrCat("shm path '", std::string(path),
                                                   "' goes through a symlink (resolves to ",
                                                   *real_parent, ")"));
  }
  const int dir = open(real_parent->c_str(), O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC | O_RDONLY);
  if (dir < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("shm path: cannot open directory ", *real_parent, ": ", Errno(errno)));
  }
  const std::string& base = parts->back();
  const int fd = openat(dir, base.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  const int open_err = errno;
  close(dir);
  if (fd < 0) {
    switch (open_err) {
      case ENOENT:
        return absl::NotFoundError(absl::StrCat("shm file ", std::string(path), " does not exist"));
      case ELOOP:
        return absl::InvalidArgumentError(
            absl::StrCat("shm path ", std::string(path), " is a symlink; symlinks are refused"));
      case EACCES:
      case EPERM:
        return absl::PermissionDeniedError(
            absl::StrCat("shm file ", std::string(path), ": ", Errno(open_err)));
      case EISDIR:
        return absl::InvalidArgumentError(
            absl::StrCat("shm path ", std::string(path), " is a directory, not a regular file"));
      default:
        return absl::InternalError(
            absl::StrCat("shm open ", std::string(path), ": ", Errno(open_err)));
    }
  }
  ShmFile f;
  f.fd_ = fd;
  f.path_ = std::string(path);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    return absl::InternalError(absl::StrCat("shm fstat ", f.path_, ": ", Errno(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat("shm path ", f.path_, " is not a regular file"));
  }
  if (st.st_uid != expected_uid) {
    return absl::PermissionDeniedError(absl::StrCat("shm file ", f.path_, " is owned by uid ",
                                                    st.st_uid, ", not by the caller (uid ",
                                                    expected_uid, ")"));
  }
  if (st.st_size < 0 || static_cast<uint64_t>(st.st_size) < size) {
    return absl::InvalidArgumentError(absl::StrCat("shm file ", f.path_, " holds ", st.st_size,
                                                   " bytes, fewer than the claimed size ", size));
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("shm mmap ", f.path_, ": ", Errno(errno)));
  }
  f.data_ = static_cast<uint8_t*>(p);
  f.size_ = size;
  return f;
}

absl::StatusOr<uint64_t> ShmFile::CurrentFileSize() const {
  struct stat st;
  if (fd_ < 0) return absl::FailedPreconditionError("shm file is not open");
  if (fstat(fd_, &st) != 0) {
    return absl::InternalError(absl::StrCat("shm fstat ", path_, ": ", Errno(errno)));
  }
  return st.st_size < 0 ? 0 : static_cast<uint64_t>(st.st_size);
}

absl::Status ShmFile::CheckFileCovers(uint64_t end) const {
  auto size = CurrentFileSize();
  if (!size.ok()) return size.status();
  if (*size < end) {
    return absl::FailedPreconditionError(
        absl::StrCat("buffer file shrank: ", path_, " holds ", *size, " bytes, ", end, " needed"));
  }
  return absl::OkStatus();
}

// ------------------------------------------------------------- SIGBUS guard

namespace {

thread_local sigjmp_buf* tls_sigbus_jump = nullptr;
struct sigaction g_previous_sigbus;
std::once_flag g_sigbus_once;

void SigbusHandler(int sig, siginfo_t* info, void* uctx) {
  sigjmp_buf* jump = tls_sigbus_jump;
  if (jump != nullptr) siglongjmp(*jump, 1);
  // Not a guarded region: behave as before we were installed.
  if ((g_previous_sigbus.sa_flags & SA_SIGINFO) != 0 && g_previous_sigbus.sa_sigaction != nullptr) {
    g_previous_sigbus.sa_sigaction(sig, info, uctx);
    return;
  }
  if (g_previous_sigbus.sa_handler != SIG_DFL && g_previous_sigbus.sa_handler != SIG_IGN) {
    g_previous_sigbus.sa_handler(sig);
    return;
  }
  // Default action: returning re-executes the faulting access, which now
  // terminates the process as SIGBUS always did.
  signal(SIGBUS, SIG_DFL);
}

void InstallSigbusHandler() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = SigbusHandler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, &g_previous_sigbus);
}

}  // namespace

absl::StatusOr<uint64_t> ShmFile::TouchResidentPages(absl::Duration budget) const {
  const long page = sysconf(_SC_PAGESIZE);
  if (data_ == nullptr || page <= 0) return 0;
  const uint64_t step = static_cast<uint64_t>(page);
  constexpr uint64_t kBlock = uint64_t{64} << 20;  // bytes per mincore call and clock check
  const absl::Time deadline = absl::Now() + budget;
  std::vector<unsigned char> held(kBlock / step);
  uint64_t touched = 0;
  for (uint64_t at = 0; at < size_; at += kBlock) {
    if (at > 0 && absl::Now() >= deadline) break;
    const uint64_t len = std::min(kBlock, size_ - at);
    if (mincore(data_ + at, len, held.data()) != 0) {
      return absl::InternalError(absl::StrCat("mincore of ", path_, ": ", Errno(errno)));
    }
    uint64_t block_touched = 0;
    RETURN_IF_ERROR(RunSigbusGuarded([&] {
      for (uint64_t i = 0; i * step < len; ++i) {
        if ((held[i] & 1) == 0) continue;
        (void)reinterpret_cast<const volatile uint8_t*>(data_ + at)[i * step];
        block_touched += std::min(step, len - i * step);
      }
    }));
    touched += block_touched;
  }
  return touched;
}

absl::Status RunSigbusGuarded(absl::FunctionRef<void()> fn) {
  std::call_once(g_sigbus_once, InstallSigbusHandler);
  if (tls_sigbus_jump != nullptr) {
    return absl::InternalError("RunSigbusGuarded is not reentrant on one thread");
  }
  sigjmp_buf jump;
  // savemask = 0: saving the mask is a system call on every guarded access
  // (1.1 us on the paravirtualised VMs here, a few per decode message). The
  // handler's one change to the mask is SIGBUS itself, blocked while it runs
  // (sa_mask is empty), so the way out unblocks just that. SIGBUS was not
  // blocked before the fault: a blocked SIGBUS from a fault kills the process.
  if (sigsetjmp(jump, 0) != 0) {
    tls_sigbus_jump = nullptr;
    sigset_t bus;
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &bus, nullptr);
    return absl::FailedPreconditionError(
        "buffer file shrank while it was being accessed (SIGBUS caught); the buffer's file "
        "must keep its registered size");
  }
  tls_sigbus_jump = &jump;
  fn();
  tls_sigbus_jump = nullptr;
  return absl::OkStatus();
}

}  // namespace icecache
