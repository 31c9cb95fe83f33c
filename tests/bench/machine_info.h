// What a benchmark report records about its machine and build. The CPU model
// and cache sizes matter as much as the load: the VMs these figures come from
// change between sessions (an AMD EPYC with a 32 MiB L3, an Intel Xeon with a
// 2 MiB L2 per core), and a latency-bound cold select or gather moved 2x
// between them, more than any change measured on one (docs/bench/README.md).
#ifndef ICECACHE_TESTS_BENCH_MACHINE_INFO_H_
#define ICECACHE_TESTS_BENCH_MACHINE_INFO_H_

#include <string>

namespace icecache::bench {

// The first line of a file ("" when it cannot be read).
std::string ReadFirstLine(const std::string& path);
// /proc/cpuinfo's first "model name" ("unknown").
std::string CpuModel();
// cpu0's L2 and L3 sizes as sysfs gives them ("2048K"; "unknown").
std::string L2Size();
std::string L3Size();
// The commit the binary was built from (empty when unknown).
std::string BuildCommit();
// The commit checked out when the report is written, which may have moved
// since the build (empty when unknown).
std::string HeadCommitNow();
// "<model>, <n> cores, L2 <size>, L3 <size>": one line for a report's header.
std::string MachineLine();

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_MACHINE_INFO_H_
