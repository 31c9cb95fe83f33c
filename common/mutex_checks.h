// Abseil's mutex deadlock detection, switched off in the shipped binaries.
//
// It keeps a process-wide graph of lock orders, updated under one global
// lock on every absl::Mutex acquisition (gRPC's own locks are absl::Mutex
// too), and aborts the process when it sees two locks taken in both orders.
// It is on wherever Abseil was compiled without NDEBUG, which Debian's
// package is: there every lock of the daemon paid for it (measured without
// it, daemon CPU per call: Health 145 -> 105 us, GetSession of a 32-layer
// session 415 -> 350 us; a 32-layer, 32768-token prefill 19.2 -> 17.2 s;
// docs/bench/mutex31.md), and a lock-order inversion on a path no test
// reached would abort a serving daemon. The unit tests keep it (their
// binaries never call this), the integration tests start the daemon with
// --mutex-deadlock-detection, and the TSan build checks lock order too.
#ifndef ICECACHE_COMMON_MUTEX_CHECKS_H_
#define ICECACHE_COMMON_MUTEX_CHECKS_H_

namespace icecache {

// true: abort on a lock-order inversion (Abseil's debug default); false:
// no checks, no graph.
void SetMutexDeadlockChecks(bool on);

}  // namespace icecache

#endif  // ICECACHE_COMMON_MUTEX_CHECKS_H_
