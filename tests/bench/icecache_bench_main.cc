// icecache-bench: workload drivers for IceCache. Subcommands:
//   select   the page-selection benchmark (tests/bench/select_bench.h)
#include <cstdio>
#include <string>
#include <vector>

#include "tests/bench/select_bench.h"

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::fprintf(stderr, "usage: icecache-bench select [options]   (icecache-bench select --help)\n");
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  if (cmd != "select") {
    std::fprintf(stderr, "icecache-bench: unknown subcommand '%s' (known: select)\n", cmd.c_str());
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
