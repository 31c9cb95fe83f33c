// CallLimiter: how many tenant calls may be in flight at once, per tenant and
// in total, so one tenant cannot take every server thread (docs/architecture.md,
// "Threading and locking").
//
// The gRPC sync server runs each call, and each open DecodeStep stream for
// its whole life, on one thread of a pool of limits.max_concurrent_calls.
// Tenant-scoped calls take a CallTicket first: a tenant may hold at most
// `per_tenant` tickets, and all tenants together at most `total`
// (max_concurrent_calls - reserved_calls), so the reserved threads stay free
// for admin verbs and the health service, which take no ticket. Beyond a cap
// the call is answered RESOURCE_EXHAUSTED at once, releasing its thread.
//
// Thread safety: thread-safe. A CallTicket is move-only and returns its
// place when destroyed.
#ifndef ICECACHE_SERVER_RPC_CALL_LIMITER_H_
#define ICECACHE_SERVER_RPC_CALL_LIMITER_H_

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace icecache::rpc {

class CallLimiter;

class CallTicket {
 public:
  CallTicket() = default;
  ~CallTicket();
  CallTicket(CallTicket&& o) noexcept;
  CallTicket& operator=(CallTicket&& o) noexcept;
  CallTicket(const CallTicket&) = delete;
  CallTicket& operator=(const CallTicket&) = delete;

 private:
  friend class CallLimiter;
  CallTicket(CallLimiter* limiter, std::string tenant)
      : limiter_(limiter), tenant_(std::move(tenant)) {}
  CallLimiter* limiter_ = nullptr;  // null: nothing held
  std::string tenant_;
};

class CallLimiter {
 public:
  // per_tenant and total >= 1 (ValidateConfig ensures it; clamped to 1).
  CallLimiter(int per_tenant, int total);

  // A place for one call of `tenant`. ResourceExhausted naming the tenant
  // and the limit (limits.max_calls_per_tenant, or the total left after
  // limits.reserved_calls) when none is free.
  absl::StatusOr<CallTicket> Acquire(absl::string_view tenant) ABSL_LOCKS_EXCLUDED(mu_);

  int in_flight(absl::string_view tenant) const ABSL_LOCKS_EXCLUDED(mu_);
  int in_flight_total() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  friend class CallTicket;
  void Release(const std::string& tenant) ABSL_LOCKS_EXCLUDED(mu_);

  const int per_tenant_;
  const int total_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, int> by_tenant_ ABSL_GUARDED_BY(mu_);
  int total_in_flight_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_CALL_LIMITER_H_
