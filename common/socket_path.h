// Where icecached's Unix socket is by default: one candidate list shared by
// the daemon (server/rpc/config.cc, where it listens) and the client
// (client/client.cc, where it connects), so the two cannot drift apart.
//
// Candidates, in order:
//   1. /run/icecache/icecached.sock
//   2. $XDG_RUNTIME_DIR/icecached.sock (when the variable is an absolute path
//      and the socket path fits a sockaddr_un)
//   3. /tmp/icecached-<uid>.sock
// The daemon listens at the first candidate whose directory it can write (the
// last always qualifies); a client connects to the first candidate that
// exists, else to where a daemon of its own uid would listen.
// Thread-safe (reads the environment and the file system only).
#ifndef ICECACHE_COMMON_SOCKET_PATH_H_
#define ICECACHE_COMMON_SOCKET_PATH_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/function_ref.h"

namespace icecache {

// Longest Unix socket path: sizeof(sockaddr_un::sun_path) - 1.
inline constexpr size_t kMaxUnixSocketPath = 107;

// The candidates above for `xdg_runtime_dir` (may be empty) and `uid`.
std::vector<std::string> SocketCandidates(std::string_view xdg_runtime_dir, uint32_t uid);

// The first candidate for which `usable` is true; the last when none is.
std::string FirstUsableSocket(const std::vector<std::string>& candidates,
                              absl::FunctionRef<bool(const std::string&)> usable);

// Where the daemon listens by default (first candidate with a writable
// directory), from this process's environment and uid.
std::string DaemonDefaultSocketPath();

// Where a client connects by default: the first candidate that exists, else
// DaemonDefaultSocketPath().
std::string ClientDefaultSocketPath();

}  // namespace icecache

#endif  // ICECACHE_COMMON_SOCKET_PATH_H_
