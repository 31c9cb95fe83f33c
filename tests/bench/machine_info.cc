#include "tests/bench/machine_info.h"

#include <cstdio>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "git_commit.h"  // generated at build time: ICECACHE_GIT_COMMIT

#ifndef ICECACHE_SOURCE_DIR
#define ICECACHE_SOURCE_DIR ""
#endif

namespace icecache::bench {

std::string ReadFirstLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (in) std::getline(in, line);
  return line;
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown";
}

namespace {

// The size of cpu0's unified (or data) cache of `level`.
std::string CacheSize(const std::string& level) {
  for (int i = 0; i < 8; ++i) {
    const std::string base = absl::StrCat("/sys/devices/system/cpu/cpu0/cache/index", i, "/");
    if (ReadFirstLine(base + "level") == level && ReadFirstLine(base + "type") != "Instruction") {
      return ReadFirstLine(base + "size");
    }
  }
  return "unknown";
}

}  // namespace

std::string L2Size() { return CacheSize("2"); }
std::string L3Size() { return CacheSize("3"); }

std::string BuildCommit() { return ICECACHE_GIT_COMMIT; }

std::string HeadCommitNow() {
  const std::string dir = ICECACHE_SOURCE_DIR;
  std::string commit;
  if (dir.empty()) return commit;
  const std::string cmd = absl::StrCat("git -C '", dir, "' rev-parse HEAD 2>/dev/null");
  if (FILE* f = popen(cmd.c_str(), "r")) {
    char buf[128] = {0};
    if (std::fgets(buf, sizeof(buf), f) != nullptr) {
      commit = buf;
      while (!commit.empty() && (commit.back() == '\n' || commit.back() == '\r')) commit.pop_back();
    }
    pclose(f);
  }
  return commit.size() == 40 ? commit : std::string();
}

std::string MachineLine() {
  return absl::StrCat(CpuModel(), ", ", std::thread::hardware_concurrency(), " cores, L2 ",
                      L2Size(), ", L3 ", L3Size());
}

}  // namespace icecache::bench
