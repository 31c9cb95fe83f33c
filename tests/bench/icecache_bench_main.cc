// icecache-bench: workload drivers for IceCache. Subcommands:
//   select   the page-selection benchmark (tests/bench/select_bench.h)
//   rpc      the daemon decode-loop benchmark: runs icecache-bench-rpc
//            (client/bench_rpc_main.cc), which links the client library
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "tests/bench/select_bench.h"

namespace {

// Execs icecache-bench-rpc with the remaining arguments: first the binary next
// to this one (installed layout), then the build tree's.
int ExecRpcBench(int argc, char** argv) {
  std::vector<std::string> candidates;
  char self[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    self[n] = '\0';
    std::string dir(self);
    dir.resize(dir.rfind('/') + 1);
    candidates.push_back(dir + "icecache-bench-rpc");
  }
#ifdef ICECACHE_BENCH_RPC_PATH
  candidates.push_back(ICECACHE_BENCH_RPC_PATH);
#endif
  for (const std::string& path : candidates) {
    if (access(path.c_str(), X_OK) != 0) continue;
    std::vector<char*> args;
    args.push_back(const_cast<char*>(path.c_str()));
    for (int i = 2; i < argc; ++i) args.push_back(argv[i]);
    args.push_back(nullptr);
    execv(path.c_str(), args.data());
    std::fprintf(stderr, "icecache-bench rpc: cannot run %s: %s\n", path.c_str(),
                 std::strerror(errno));
    return 1;
  }
  std::fprintf(stderr,
               "icecache-bench rpc: icecache-bench-rpc not found (build with "
               "ICECACHE_BUILD_SERVER=ON; looked next to this binary and in the build tree)\n");
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fprintf(stderr,
                 "usage: icecache-bench select [options]   (icecache-bench select --help)\n"
                 "       icecache-bench rpc [options]      (icecache-bench rpc --help)\n");
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  if (cmd == "rpc") return ExecRpcBench(argc, argv);
  if (cmd != "select") {
    std::fprintf(stderr, "icecache-bench: unknown subcommand '%s' (known: select, rpc)\n",
                 cmd.c_str());
    return 2;
  }
  std::vector<std::string> args(argv + 2, argv + argc);
  for (const auto& a : args) {
    if (a == "--help" || a == "-h") {
      std::printf("%s", icecache::bench::SelectUsage().c_str());
      return 0;
    }
  }
  auto options = icecache::bench::ParseSelectArgs(args);
  if (!options.ok()) {
    std::fprintf(stderr, "icecache-bench select: %s\n\n%s", options.status().ToString().c_str(),
                 icecache::bench::SelectUsage().c_str());
    return 2;
  }
  const absl::Status s = icecache::bench::RunSelectBench(*options);
  if (!s.ok()) {
    std::fprintf(stderr, "icecache-bench select: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
