// Whole-file reads, the one place the tools, the client and the daemon read a
// small file (config, certificates, logs) into memory.
#ifndef ICECACHE_COMMON_FILE_UTIL_H_
#define ICECACHE_COMMON_FILE_UTIL_H_

#include <sys/stat.h>

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace icecache {

// The bytes of the file at `path`. On failure the status carries the OS
// error's canonical code (NotFound for a missing file, PermissionDenied for
// an unreadable one, ...) and the message "<path>: <OS reason>".
// Thread-safe.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Replaces the file at `path` with `contents` atomically: writes
// "<path>.tmp-<pid>" in the same directory, then renames it over `path`, so
// a reader (or a crash) never sees a half-written file and a failure leaves
// any previous file as it was. Errors carry the OS error's canonical code and
// "<path>: <OS reason>"; the temporary file is removed on failure.
absl::Status WriteFileAtomically(const std::string& path, std::string_view contents);

// Why the open file `fd` must not be trusted as one of this daemon's private
// files (the pool arena, the index images), or "" when it may: it must be a
// regular file, owned by this process's effective uid, with no group or
// other permission bits. `*st` receives its fstat for further checks.
std::string PrivateFileProblem(int fd, struct stat* st);

}  // namespace icecache

#endif  // ICECACHE_COMMON_FILE_UTIL_H_
