// icecache-bench-decode: the end-to-end decode benchmark (decode_bench.h).
// `icecache-bench decode ARGS` execs this binary with ARGS.
#include <cstdio>
#include <string>

#include "common/cli.h"
#include "common/mutex_checks.h"
#include "tests/bench/decode_bench.h"
#include "tests/bench/decode_flags.h"

int main(int argc, char** argv) {
  CLI::App app(
      "The end-to-end decode benchmark: TT2T, TPOT split into append, select, gather, RPC and "
      "attention (CPU stand-in for the GPU), and quality per layer, per policy.",
      "icecache-bench decode");
  icecache::cli::Configure(app);
  icecache::bench::DecodeFlags flags(&app);
  if (auto code = icecache::cli::Parse(app, argc, argv)) return *code;
  // As the daemon runs (its in-process companion and the client lock the same way).
  icecache::SetMutexDeadlockChecks(false);
  auto options = flags.Options();
  if (!options.ok()) {
    std::fprintf(stderr,
                 "icecache-bench decode: %s\n(run icecache-bench decode --help for usage)\n",
                 std::string(options.status().message()).c_str());
    return icecache::cli::kExitUsage;
  }
  const absl::Status s = icecache::bench::RunDecodeBench(*options);
  if (!s.ok()) {
    std::fprintf(stderr, "icecache-bench decode: FAILED: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
