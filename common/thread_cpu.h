// CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID), nanoseconds: the
// clock the quality sampler's budget and the width calibrator's costs use
// (docs/architecture.md §5.1), unskewed by other threads on a loaded machine.
// Thread safety: reentrant.
#ifndef ICECACHE_COMMON_THREAD_CPU_H_
#define ICECACHE_COMMON_THREAD_CPU_H_

#include <cstdint>

namespace icecache {

int64_t ThreadCpuNanos();

}  // namespace icecache

#endif  // ICECACHE_COMMON_THREAD_CPU_H_
