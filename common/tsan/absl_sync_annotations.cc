// TSan builds only (-DICECACHE_SANITIZE=thread; deploy/dev.sh sanitize tsan),
// as libicecache_tsan_absl.so, loaded with LD_PRELOAD by the TSan test run.
//
// Debian's Abseil is not built with -fsanitize=thread, so ThreadSanitizer
// cannot see absl::Mutex or absl::CondVar: their lock words and futex waits
// live in uninstrumented code, and every access guarded by an absl::Mutex
// would be reported as a race. This file interposes the out-of-line lock
// entry points of libabsl_synchronization.so (an executable's definition wins
// over a shared library's), calls the real one (dlsym RTLD_NEXT) and tells
// TSan about the happens-before edge: acquire after a lock is taken, release
// before it is given up (CondVar waits and Mutex::Await give it up and take it
// again). This is exactly the ordering a mutex provides, so real races on data
// not guarded by the mutex are still reported. The entry points covered are
// the ones this code base (and gRPC) call; the TSan hooks are weak, so a
// process without TSan (openssl run by a test) loads this unharmed.
//
// A Condition (Await, LockWhen, ...) is evaluated inside the real call with
// the mutex held, before the call returns to us: by the waiter once it holds
// the lock again, or by the thread that is unlocking, and a waiter may then
// give the lock up again inside the call. So the condition is wrapped: the
// wrapper acquires, evaluates the caller's condition, and releases (the
// lock is held throughout, so both edges are ones the mutex really makes).
// Without it every read in a condition of data written under the mutex by
// another thread, and every write after it by the next holder, is reported
// (the first TSan run here reported exactly these).
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "absl/base/options.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

extern "C" {
void __tsan_acquire(void* addr) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
}

namespace {

#define ICECACHE_STR2(x) #x
#define ICECACHE_STR(x) ICECACHE_STR2(x)

// "_ZN4absl<len><inline namespace>" + rest: the mangled name of an absl
// symbol in this Abseil build (inline namespace from absl/base/options.h).
std::string AbslMangled(const char* rest) {
  const std::string ns = ICECACHE_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  return "_ZN4absl" + std::to_string(ns.size()) + ns + rest;
}

// The real (next) definition of a symbol; aborts when it is missing, since a
// TSan build that silently skipped the lock would be wrong.
template <typename Fn>
Fn Real(const char* rest) {
  const std::string name = AbslMangled(rest);
  void* p = ::dlsym(RTLD_NEXT, name.c_str());
  if (p == nullptr) {
    std::fprintf(stderr, "tsan absl shim: %s not found: %s\n", name.c_str(), ::dlerror());
    std::abort();
  }
  return reinterpret_cast<Fn>(p);
}

void Acquire(void* addr) {
  if (__tsan_acquire != nullptr) __tsan_acquire(addr);
}
void Release(void* addr) {
  if (__tsan_release != nullptr) __tsan_release(addr);
}

// A Condition that evaluates `inner` between an acquire and a release of `mu`
// (see the top).
// Not copyable: the Condition points at the object's own fields.
class GuardedCondition {
 public:
  GuardedCondition(absl::Mutex* mu, const absl::Condition& inner)
      : mu_(mu), inner_(&inner), cond_(&GuardedCondition::Eval, this) {}
  GuardedCondition(const GuardedCondition&) = delete;
  GuardedCondition& operator=(const GuardedCondition&) = delete;
  const absl::Condition& get() const { return cond_; }

 private:
  static bool Eval(GuardedCondition* g) {
    Acquire(g->mu_);
    const bool met = g->inner_->Eval();
    Release(g->mu_);
    return met;
  }
  absl::Mutex* mu_;
  const absl::Condition* inner_;
  absl::Condition cond_;
};

using MuFn = void (*)(absl::Mutex*);
using MuTryFn = bool (*)(absl::Mutex*);
using MuCondFn = void (*)(absl::Mutex*, const absl::Condition&);
using MuCondTimeoutFn = bool (*)(absl::Mutex*, const absl::Condition&, absl::Duration);
using MuCondDeadlineFn = bool (*)(absl::Mutex*, const absl::Condition&, absl::Time);
using CvWaitFn = void (*)(absl::CondVar*, absl::Mutex*);
using CvTimeoutFn = bool (*)(absl::CondVar*, absl::Mutex*, absl::Duration);
using CvDeadlineFn = bool (*)(absl::CondVar*, absl::Mutex*, absl::Time);

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  static const MuFn real = Real<MuFn>("5Mutex4LockEv");
  real(this);
  Acquire(this);
}

void Mutex::ReaderLock() {
  static const MuFn real = Real<MuFn>("5Mutex10ReaderLockEv");
  real(this);
  Acquire(this);
}

bool Mutex::TryLock() {
  static const MuTryFn real = Real<MuTryFn>("5Mutex7TryLockEv");
  const bool locked = real(this);
  if (locked) Acquire(this);
  return locked;
}

bool Mutex::ReaderTryLock() {
  static const MuTryFn real = Real<MuTryFn>("5Mutex13ReaderTryLockEv");
  const bool locked = real(this);
  if (locked) Acquire(this);
  return locked;
}

void Mutex::LockWhen(const Condition& cond) {
  static const MuCondFn real = Real<MuCondFn>("5Mutex8LockWhenERKNS0_9ConditionE");
  const GuardedCondition guarded(this, cond);
  real(this, guarded.get());
  Acquire(this);
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  static const MuCondFn real = Real<MuCondFn>("5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  const GuardedCondition guarded(this, cond);
  real(this, guarded.get());
  Acquire(this);
}

void Mutex::Unlock() {
  static const MuFn real = Real<MuFn>("5Mutex6UnlockEv");
  Release(this);
  real(this);
}

void Mutex::ReaderUnlock() {
  static const MuFn real = Real<MuFn>("5Mutex12ReaderUnlockEv");
  Release(this);
  real(this);
}

void Mutex::Await(const Condition& cond) {
  static const MuCondFn real = Real<MuCondFn>("5Mutex5AwaitERKNS0_9ConditionE");
  const GuardedCondition guarded(this, cond);
  Release(this);
  real(this, guarded.get());
  Acquire(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, Duration timeout) {
  static const MuCondTimeoutFn real =
      Real<MuCondTimeoutFn>("5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  const GuardedCondition guarded(this, cond);
  Release(this);
  const bool held = real(this, guarded.get(), timeout);
  Acquire(this);
  return held;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, Time deadline) {
  static const MuCondDeadlineFn real =
      Real<MuCondDeadlineFn>("5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  const GuardedCondition guarded(this, cond);
  Release(this);
  const bool held = real(this, guarded.get(), deadline);
  Acquire(this);
  return held;
}

// The timed lock variants hold the mutex on return whatever they return.
bool Mutex::LockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static const MuCondTimeoutFn real =
      Real<MuCondTimeoutFn>("5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  const GuardedCondition guarded(this, cond);
  const bool met = real(this, guarded.get(), timeout);
  Acquire(this);
  return met;
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, Duration timeout) {
  static const MuCondTimeoutFn real =
      Real<MuCondTimeoutFn>("5Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  const GuardedCondition guarded(this, cond);
  const bool met = real(this, guarded.get(), timeout);
  Acquire(this);
  return met;
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, Time deadline) {
  static const MuCondDeadlineFn real =
      Real<MuCondDeadlineFn>("5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  const GuardedCondition guarded(this, cond);
  const bool met = real(this, guarded.get(), deadline);
  Acquire(this);
  return met;
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, Time deadline) {
  static const MuCondDeadlineFn real =
      Real<MuCondDeadlineFn>("5Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  const GuardedCondition guarded(this, cond);
  const bool met = real(this, guarded.get(), deadline);
  Acquire(this);
  return met;
}

void CondVar::Wait(Mutex* mu) {
  static const CvWaitFn real = Real<CvWaitFn>("7CondVar4WaitEPNS0_5MutexE");
  Release(mu);
  real(this, mu);
  Acquire(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, Duration timeout) {
  static const CvTimeoutFn real =
      Real<CvTimeoutFn>("7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Release(mu);
  const bool timed_out = real(this, mu, timeout);
  Acquire(mu);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, Time deadline) {
  static const CvDeadlineFn real =
      Real<CvDeadlineFn>("7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Release(mu);
  const bool timed_out = real(this, mu, deadline);
  Acquire(mu);
  return timed_out;
}

ABSL_NAMESPACE_END
}  // namespace absl
