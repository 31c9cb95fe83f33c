// CPU time of this process and of a child (the daemon a benchmark spawned):
// where a phase's wall time went (`icecache-bench decode` reports the
// daemon's cores busy during the prefill, the decode steps and each batch).
#ifndef ICECACHE_TESTS_BENCH_PROCESS_CPU_H_
#define ICECACHE_TESTS_BENCH_PROCESS_CPU_H_

#include <sys/types.h>

#include <string_view>

namespace icecache::bench {

// This process's CPU time so far (user + system, every thread), s.
double ProcessCpuSeconds();

// A process's CPU time so far from /proc/<pid>/stat, s: user + system, and
// system alone (the kernel's share: page faults, system calls); NaN when it
// cannot be read (no such process, no procfs).
struct CpuTimes {
  double total = 0, system = 0;
};
CpuTimes ProcessCpuTimes(pid_t pid);
inline double ProcessCpuSeconds(pid_t pid) { return ProcessCpuTimes(pid).total; }

// Cores busy: `cpu_s` of CPU time (from ProcessCpuTimes) over `wall_s`;
// NaN when the wall is shorter than kMinCpuWallTicks clock ticks. /proc
// counts whole ticks (10 ms at 100 Hz), so a phase of a few ms reads 0 or
// one tick: a smoke run's 3 ms batch sweep read 12.6 cores on 2.
inline constexpr int kMinCpuWallTicks = 20;
double CoresOver(double cpu_s, double wall_s);

// utime + stime in clock ticks from the text of a /proc/<pid>/stat file, and
// stime alone in `*system` (when not null); -1 when it is not one. The
// command name (field 2) may hold spaces and parentheses, so the fields are
// counted from the last ')'.
long long StatCpuTicks(std::string_view stat, long long* system = nullptr);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_PROCESS_CPU_H_
