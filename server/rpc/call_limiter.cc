#include "server/rpc/call_limiter.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace icecache::rpc {

CallTicket::~CallTicket() {
  if (limiter_ != nullptr) limiter_->Release(tenant_);
}

CallTicket::CallTicket(CallTicket&& o) noexcept
    : limiter_(std::exchange(o.limiter_, nullptr)), tenant_(std::move(o.tenant_)) {}

CallTicket& CallTicket::operator=(CallTicket&& o) noexcept {
  if (this != &o) {
    if (limiter_ != nullptr) limiter_->Release(tenant_);
    limiter_ = std::exchange(o.limiter_, nullptr);
    tenant_ = std::move(o.tenant_);
  }
  return *this;
}

CallLimiter::CallLimiter(int per_tenant, int total)
    : per_tenant_(std::max(per_tenant, 1)), total_(std::max(total, 1)) {}

absl::StatusOr<CallTicket> CallLimiter::Acquire(absl::string_view tenant) {
  absl::MutexLock l(&mu_);
  int& mine = by_tenant_[tenant];
  if (mine >= per_tenant_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant '", tenant, "' already has ", mine,
        " calls in flight (open DecodeStep streams count), the most one tenant may have "
        "(limits.max_calls_per_tenant); close idle streams or retry later"));
  }
  if (total_in_flight_ >= total_) {
    if (mine == 0) by_tenant_.erase(by_tenant_.find(tenant));
    return absl::ResourceExhaustedError(absl::StrCat(
        "the daemon has ", total_in_flight_,
        " tenant calls in flight, all it serves at once (limits.max_concurrent_calls minus "
        "limits.reserved_calls); retry later"));
  }
  ++mine;
  ++total_in_flight_;
  return CallTicket(this, std::string(tenant));
}

void CallLimiter::Release(const std::string& tenant) {
  absl::MutexLock l(&mu_);
  auto it = by_tenant_.find(tenant);
  if (it != by_tenant_.end() && --it->second <= 0) by_tenant_.erase(it);
  --total_in_flight_;
}

int CallLimiter::in_flight(absl::string_view tenant) const {
  absl::MutexLock l(&mu_);
  auto it = by_tenant_.find(tenant);
  return it == by_tenant_.end() ? 0 : it->second;
}

int CallLimiter::in_flight_total() const {
  absl::MutexLock l(&mu_);
  return total_in_flight_;
}

}  // namespace icecache::rpc
