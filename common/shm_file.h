// Shared-memory files under /dev/shm: the client side creates one (ShmFile::
// Create), the daemon side opens the client's file with every check of
// docs/architecture.md (ShmFile::OpenChecked), and both map it MAP_SHARED.
//
// A client may truncate its file while the daemon has it mapped; touching a
// MAP_SHARED page beyond EOF raises SIGBUS. RunSigbusGuarded() turns such a
// fault inside a bounded piece of code into a status instead of a crash.
//
// Ownership: a ShmFile owns its fd and its mapping (RAII, move-only); the
// file itself is unlinked on destruction only if `unlink_on_close` was set.
// Thread safety: a ShmFile is immutable after creation except for moves;
// data() may be read and written from many threads (the bytes are shared
// memory: synchronisation of their contents is the users' business).
#ifndef ICECACHE_COMMON_SHM_FILE_H_
#define ICECACHE_COMMON_SHM_FILE_H_

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace icecache {

struct ShmOpenOptions {
  // Directory every path must resolve into (no symlinks anywhere, no '..').
  std::string root = "/dev/shm";
  // Largest mapping accepted.
  uint64_t max_bytes = uint64_t{64} << 30;
};

class ShmFile {
 public:
  ShmFile() = default;
  ~ShmFile();
  ShmFile(ShmFile&& other) noexcept;
  ShmFile& operator=(ShmFile&& other) noexcept;
  ShmFile(const ShmFile&) = delete;
  ShmFile& operator=(const ShmFile&) = delete;

  // Client side: creates `root/name` (O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600),
  // sizes it to `size` bytes and maps it read-write. `name` is a single path
  // component. InvalidArgument for a bad name or size 0 / above max_bytes;
  // AlreadyExists when the file exists; Internal/ResourceExhausted for
  // ftruncate/mmap failures (message carries errno text).
  static absl::StatusOr<ShmFile> Create(std::string_view name, uint64_t size,
                                        bool unlink_on_close = true,
                                        const ShmOpenOptions& options = {});

  // Daemon side: opens a client's file with the checks of docs/architecture.md and maps
  // its first `size` bytes MAP_SHARED read-write:
  //  - `path` is absolute, has no "." / ".." components or doubled slashes,
  //    lies under options.root, and no component is a symlink
  //    (realpath of the parent equals the parent; last component opened with
  //    O_NOFOLLOW|O_RDWR|O_CLOEXEC|O_NONBLOCK);  -> InvalidArgument
  //  - fstat: regular file                         -> InvalidArgument
  //  - st_uid == expected_uid                      -> PermissionDenied
  //  - 0 < size <= max_bytes                       -> InvalidArgument
  //  - st_size >= size                             -> InvalidArgument ("size")
  //  - the file does not exist                     -> NotFound
  //  - other open/mmap errors                      -> PermissionDenied (EACCES)
  //                                                   or Internal
  static absl::StatusOr<ShmFile> OpenChecked(std::string_view path, uint64_t size,
                                             uid_t expected_uid,
                                             const ShmOpenOptions& options = {});

  bool valid() const { return data_ != nullptr; }
  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }  // mapped bytes
  const std::string& path() const { return path_; }
  int fd() const { return fd_; }

  // Daemon side, before the first copy: reads one byte of every page of the
  // mapping that the file already holds (mincore), so that the first copy
  // finds its page-table entries made. A fresh mapping of a client's file
  // otherwise pays a fault per page at its first use, and on a guest with
  // shadow page tables each first touch also traps to the hypervisor: a
  // 512 MiB copy through a fresh mapping took 0.8-1.9 s against 35-50 ms
  // through a touched one (docs/bench/touch49.md). A page the file does not
  // hold is left alone, so a sparse file is never filled in (a read of a
  // hole would allocate it). Stops once `budget` has passed (checked every
  // 64 MiB; the rest is faulted in at first use, as before). Returns the
  // bytes touched; FailedPrecondition when the file shrinks meanwhile
  // (SIGBUS guarded), Internal when mincore fails.
  absl::StatusOr<uint64_t> TouchResidentPages(absl::Duration budget) const;

  // Current size of the file (fstat). Internal on fstat failure.
  absl::StatusOr<uint64_t> CurrentFileSize() const;
  // OK when the file still holds at least `end` bytes; FailedPrecondition
  // ("buffer file shrank ...") otherwise.
  absl::Status CheckFileCovers(uint64_t end) const;

 private:
  int fd_ = -1;
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  std::string path_;
  bool unlink_on_close_ = false;
};

// Runs `fn` on this thread; if `fn` touches memory that raises SIGBUS (a
// truncated MAP_SHARED file), the fault is caught, `fn` is abandoned at that
// point and FailedPrecondition ("buffer file shrank ...") is returned.
// SIGBUS raised outside a guarded region keeps its default (fatal) effect.
// Because `fn` may be abandoned midway (siglongjmp), it must not own
// resources or hold locks: plain memcpy/arithmetic only. Thread-safe;
// guards on different threads are independent; not reentrant on one thread
// (a nested call returns Internal without running `fn`).
absl::Status RunSigbusGuarded(absl::FunctionRef<void()> fn);

}  // namespace icecache

#endif  // ICECACHE_COMMON_SHM_FILE_H_
