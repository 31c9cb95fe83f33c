#include "tests/bench/process_cpu.h"

#include <time.h>
#include <unistd.h>

#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace icecache::bench {

double ProcessCpuSeconds() {
  timespec ts{};
  if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) != 0) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

long long StatCpuTicks(std::string_view stat, long long* system) {
  const size_t close = stat.rfind(')');
  if (close == std::string_view::npos) return -1;
  // After "pid (comm)": field 3 (state) is the first; utime and stime are
  // fields 14 and 15, so the 12th and 13th after the name.
  const absl::string_view rest(stat.data() + close + 1, stat.size() - close - 1);
  std::vector<absl::string_view> f = absl::StrSplit(rest, ' ', absl::SkipEmpty());
  long long utime = 0, stime = 0;
  if (f.size() < 13 || !absl::SimpleAtoi(f[11], &utime) || !absl::SimpleAtoi(f[12], &stime) ||
      utime < 0 || stime < 0) {
    return -1;
  }
  if (system != nullptr) *system = stime;
  return utime + stime;
}

double CoresOver(double cpu_s, double wall_s) {
  const long hz = sysconf(_SC_CLK_TCK);
  if (hz <= 0 || !(wall_s * static_cast<double>(hz) >= kMinCpuWallTicks)) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  return cpu_s / wall_s;
}

CpuTimes ProcessCpuTimes(pid_t pid) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (pid <= 0) return {nan, nan};
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  if (!in) return {nan, nan};
  std::stringstream text;
  text << in.rdbuf();
  long long system = 0;
  const long long ticks = StatCpuTicks(text.str(), &system);
  const long hz = sysconf(_SC_CLK_TCK);
  if (ticks < 0 || hz <= 0) return {nan, nan};
  return {static_cast<double>(ticks) / static_cast<double>(hz),
          static_cast<double>(system) / static_cast<double>(hz)};
}

}  // namespace icecache::bench
