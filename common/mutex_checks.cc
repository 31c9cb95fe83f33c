#include "common/mutex_checks.h"

#include "absl/synchronization/mutex.h"

namespace icecache {

void SetMutexDeadlockChecks(bool on) {
  absl::SetMutexDeadlockDetectionMode(on ? absl::OnDeadlockCycle::kAbort
                                         : absl::OnDeadlockCycle::kIgnore);
}

}  // namespace icecache
