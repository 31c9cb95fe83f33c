// Who is calling: turns a connection into an icecache::Caller (docs/architecture.md).
//
// Unix socket: the daemon accepts connections itself (UnixListener), reads
// the peer's SO_PEERCRED, records it in a PeerTable under the connection's
// fd, and hands the fd to gRPC (grpc::AddInsecureChannelFromFd). gRPC names
// such a connection "fd:<n>" in ServerContext::peer(), which is how a call
// finds its peer credentials. The fd cannot be reused by another connection
// while a call on it runs (the transport, and so the fd, lives until its
// last stream is gone), and the table entry is written before the fd is
// handed to gRPC, so a lookup at the start of a call sees the right uid.
// The uid maps to a tenant through AuthConfig.uid_tenants; unmapped uids
// become tenant "uid-<n>" or are refused (AuthConfig.unmapped_uid). The
// admin role goes to AuthConfig.admin_uids, by default the daemon's own uid
// and root.
//
// TCP (TLS): the call must carry "authorization: Bearer <token>"; the token
// maps to a tenant (and optionally the admin role) through AuthConfig.tokens.
// Token comparison is constant-time.
//
// Thread safety: PeerTable and Authenticator are thread-safe.
#ifndef ICECACHE_SERVER_RPC_AUTH_H_
#define ICECACHE_SERVER_RPC_AUTH_H_

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/caller.h"
#include "icecache/v1/config.pb.h"

namespace icecache::rpc {

struct PeerCred {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

// fd -> credentials of the Unix-socket connection on that fd.
class PeerTable {
 public:
  void Set(int fd, const PeerCred& cred) ABSL_LOCKS_EXCLUDED(mu_);
  std::optional<PeerCred> Get(int fd) const ABSL_LOCKS_EXCLUDED(mu_);
  void Erase(int fd) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  mutable absl::Mutex mu_;
  absl::flat_hash_map<int, PeerCred> peers_ ABSL_GUARDED_BY(mu_);
};

// "fd:17" -> 17. InvalidArgument for anything else.
absl::StatusOr<int> ParseFdPeer(absl::string_view peer);

class Authenticator {
 public:
  // `daemon_uid` is the uid the daemon runs as: with an empty
  // config.admin_uids (and no_unix_admins false) it and root are the admins.
  // InvalidArgument for a bad tenant name, duplicate uid/token, or
  // admin_uids together with no_unix_admins (ValidateConfig catches these
  // first; checked again so the class stands alone).
  static absl::StatusOr<std::unique_ptr<Authenticator>> Create(const v1::AuthConfig& config,
                                                               uint32_t daemon_uid);

  // The uids with the admin role on the Unix socket, ascending.
  std::vector<uint32_t> admin_uids() const;

  // Caller for a Unix-socket peer uid. PermissionDenied when the uid is
  // unmapped and the policy is REFUSE.
  absl::StatusOr<Caller> FromUid(uint32_t uid) const;
  // Caller for the value of the "authorization" metadata. Unauthenticated
  // when missing or not "Bearer <token>"; PermissionDenied for an unknown token.
  absl::StatusOr<Caller> FromAuthorization(std::optional<absl::string_view> header) const;

  // Resolves a call: `peer` is ServerContext::peer(); fd peers use `peers`,
  // others (TCP) the authorization header. Unauthenticated when an fd peer
  // has no recorded credentials.
  absl::StatusOr<Caller> Resolve(absl::string_view peer, const PeerTable& peers,
                                 std::optional<absl::string_view> authorization) const;

 private:
  struct TokenEntry {
    std::string token;
    std::string tenant;
    bool admin = false;
  };
  Authenticator() = default;

  std::map<uint32_t, std::string> uid_tenants_;
  absl::flat_hash_set<uint32_t> admin_uids_;
  bool refuse_unmapped_ = false;
  std::vector<TokenEntry> tokens_;
};

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_AUTH_H_
