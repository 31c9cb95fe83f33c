#include "server/rpc/auth.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "server/rpc/config.h"

namespace icecache::rpc {
namespace {

// Compares without an early exit so timing does not reveal a token prefix.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? a[i] : 0;
    const unsigned char y = i < b.size() ? b[i] : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

}  // namespace

void PeerTable::Set(int fd, const PeerCred& cred) {
  absl::MutexLock lock(&mu_);
  peers_[fd] = cred;
}

std::optional<PeerCred> PeerTable::Get(int fd) const {
  absl::MutexLock lock(&mu_);
  auto it = peers_.find(fd);
  if (it == peers_.end()) return std::nullopt;
  return it->second;
}

void PeerTable::Erase(int fd) {
  absl::MutexLock lock(&mu_);
  peers_.erase(fd);
}

absl::StatusOr<int> ParseFdPeer(absl::string_view peer) {
  int fd = -1;
  if (!absl::ConsumePrefix(&peer, "fd:") || !absl::SimpleAtoi(peer, &fd) || fd < 0) {
    return absl::InvalidArgumentError(absl::StrCat("peer \"", peer, "\" is not an fd peer"));
  }
  return fd;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Create(const v1::AuthConfig& config,
                                                                     uint32_t daemon_uid) {
  std::unique_ptr<Authenticator> a(new Authenticator());
  for (const auto& m : config.uid_tenants()) {
    if (!IsValidTenantName(m.tenant())) {
      return absl::InvalidArgumentError(
          absl::StrCat("auth: uid ", m.uid(), ": invalid tenant name \"", m.tenant(), "\""));
    }
    if (!a->uid_tenants_.emplace(m.uid(), m.tenant()).second) {
      return absl::InvalidArgumentError(absl::StrCat("auth: uid ", m.uid(), " mapped twice"));
    }
  }
  if (config.no_unix_admins() && config.admin_uids_size() > 0) {
    return absl::InvalidArgumentError(
        "auth: admin_uids and no_unix_admins together; keep one of them");
  }
  for (uint32_t uid : config.admin_uids()) a->admin_uids_.insert(uid);
  if (config.admin_uids_size() == 0 && !config.no_unix_admins()) {
    a->admin_uids_.insert(daemon_uid);  // a first run works with no config
    a->admin_uids_.insert(0);
  }
  a->refuse_unmapped_ = config.unmapped_uid() == v1::UNMAPPED_UID_POLICY_REFUSE;
  for (const auto& t : config.tokens()) {
    if (!IsValidTenantName(t.tenant())) {
      return absl::InvalidArgumentError(
          absl::StrCat("auth: token: invalid tenant name \"", t.tenant(), "\""));
    }
    for (const TokenEntry& e : a->tokens_) {
      if (e.token == t.token()) return absl::InvalidArgumentError("auth: token listed twice");
    }
    a->tokens_.push_back(TokenEntry{t.token(), t.tenant(), t.admin()});
  }
  return a;
}

std::vector<uint32_t> Authenticator::admin_uids() const {
  std::vector<uint32_t> out(admin_uids_.begin(), admin_uids_.end());
  std::sort(out.begin(), out.end());
  return out;
}

absl::StatusOr<Caller> Authenticator::FromUid(uint32_t uid) const {
  Caller caller;
  caller.uid = uid;
  caller.admin = admin_uids_.contains(uid);
  auto it = uid_tenants_.find(uid);
  if (it != uid_tenants_.end()) {
    caller.tenant = it->second;
  } else if (refuse_unmapped_) {
    return absl::PermissionDeniedError(
        absl::StrCat("uid ", uid,
                     " is not mapped to a tenant (auth.uid_tenants) and the daemon refuses "
                     "unmapped uids (auth.unmapped_uid = REFUSE)"));
  } else {
    caller.tenant = absl::StrCat("uid-", uid);
  }
  return caller;
}

absl::StatusOr<Caller> Authenticator::FromAuthorization(
    std::optional<absl::string_view> header) const {
  if (!header.has_value()) {
    return absl::UnauthenticatedError(
        "missing \"authorization: Bearer <token>\" metadata (required on TCP)");
  }
  absl::string_view v = *header;
  if (!absl::ConsumePrefix(&v, "Bearer ") && !absl::ConsumePrefix(&v, "bearer ")) {
    return absl::UnauthenticatedError("authorization metadata must be \"Bearer <token>\"");
  }
  const TokenEntry* match = nullptr;
  for (const TokenEntry& e : tokens_) {
    // No early exit: every token is compared.
    if (ConstantTimeEquals(e.token, v) && match == nullptr) match = &e;
  }
  if (match == nullptr) return absl::PermissionDeniedError("unknown bearer token");
  Caller caller;
  caller.tenant = match->tenant;
  caller.uid = static_cast<uint32_t>(-1);  // no local uid: shm buffers cannot match
  caller.admin = match->admin;
  return caller;
}

absl::StatusOr<Caller> Authenticator::Resolve(
    absl::string_view peer, const PeerTable& peers,
    std::optional<absl::string_view> authorization) const {
  if (absl::StartsWith(peer, "fd:")) {
    absl::StatusOr<int> fd = ParseFdPeer(peer);
    if (!fd.ok()) return absl::UnauthenticatedError(fd.status().message());
    std::optional<PeerCred> cred = peers.Get(*fd);
    if (!cred.has_value()) {
      return absl::UnauthenticatedError(
          absl::StrCat("no peer credentials recorded for connection ", peer));
    }
    return FromUid(cred->uid);
  }
  return FromAuthorization(authorization);
}

}  // namespace icecache::rpc
