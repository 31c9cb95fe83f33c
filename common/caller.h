// Who is asking: the identity every core call takes (docs/architecture.md).
// The rpc layer derives it from SO_PEERCRED (uid -> tenant through config) or
// a bearer token, and the core trusts it. A Caller is a plain value type; it
// lives in common/ so every layer (pool, transfer, session, rpc) sees it
// without depending on another.
#ifndef ICECACHE_COMMON_CALLER_H_
#define ICECACHE_COMMON_CALLER_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace icecache {

struct Caller {
  // Owner of sessions, buffers and pool bytes. Non-empty, at most 128 bytes,
  // characters [A-Za-z0-9._@:-] (see ValidateTenantName).
  std::string tenant;
  // Unix uid of the peer process; shm files must be owned by it.
  uint32_t uid = 0;
  // Admin role: may call admin verbs and see every tenant's sessions.
  bool admin = false;
};

// InvalidArgument ("tenant name ...") when `tenant` is empty, longer than 128
// bytes or has a character outside [A-Za-z0-9._@:-].
absl::Status ValidateTenantName(std::string_view tenant);

}  // namespace icecache

#endif  // ICECACHE_COMMON_CALLER_H_
