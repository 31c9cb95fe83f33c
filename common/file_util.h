// Whole-file reads, the one place the tools, the client and the daemon read a
// small file (config, certificates, logs) into memory.
#ifndef ICECACHE_COMMON_FILE_UTIL_H_
#define ICECACHE_COMMON_FILE_UTIL_H_

#include <string>

#include "absl/status/statusor.h"

namespace icecache {

// The bytes of the file at `path`. On failure the status carries the OS
// error's canonical code (NotFound for a missing file, PermissionDenied for
// an unreadable one, ...) and the message "<path>: <OS reason>".
// Thread-safe.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace icecache

#endif  // ICECACHE_COMMON_FILE_UTIL_H_
