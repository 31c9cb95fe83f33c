// icecache-bench: workload drivers for IceCache. Subcommands:
//   select   the page-selection benchmark (tests/bench/select_bench.h)
//   append   decode appends at a long context (tests/bench/append_bench.h)
//   transfer the gather against memcpy, and with --gpu the push + scatter
//            against a pinned cudaMemcpy (tests/bench/transfer_bench.h)
//   monitor  the quality monitor and calibrated width in the session core
//            (tests/bench/monitor_bench.h)
//   rpc      the daemon decode-loop benchmark: runs icecache-bench-rpc
//            (client/bench_rpc_main.cc), which links the client library
//   decode   the end-to-end decode benchmark: runs icecache-bench-decode
//            (tests/bench/decode_bench.h), which links the client and the core
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/cli.h"
#include "common/mutex_checks.h"
#include "tests/bench/append_bench.h"
#include "tests/bench/monitor_bench.h"
#include "tests/bench/select_bench.h"
#include "tests/bench/select_flags.h"
#include "tests/bench/transfer_bench.h"

namespace {

// Execs the tool `name` with the remaining arguments: first the binary next
// to this one (installed layout), then `built` (the build tree's; may be null).
int ExecTool(const char* command, const std::string& name, const char* built,
             const std::vector<std::string>& tool_args) {
  std::vector<std::string> candidates;
  char self[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    self[n] = '\0';
    std::string dir(self);
    dir.resize(dir.rfind('/') + 1);
    candidates.push_back(dir + name);
  }
  if (built != nullptr) candidates.push_back(built);
  for (const std::string& path : candidates) {
    if (access(path.c_str(), X_OK) != 0) continue;
    std::vector<char*> args;
    args.push_back(const_cast<char*>(path.c_str()));
    for (const std::string& a : tool_args) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(path.c_str(), args.data());
    std::fprintf(stderr, "icecache-bench %s: cannot run %s: %s\n", command, path.c_str(),
                 std::strerror(errno));
    return 1;
  }
  std::fprintf(stderr,
               "icecache-bench %s: %s not found (build with ICECACHE_BUILD_SERVER=ON; looked "
               "next to this binary and in the build tree)\n",
               command, name.c_str());
  return 1;
}

#ifndef ICECACHE_BENCH_RPC_PATH
#define ICECACHE_BENCH_RPC_PATH nullptr
#endif
#ifndef ICECACHE_BENCH_DECODE_PATH
#define ICECACHE_BENCH_DECODE_PATH nullptr
#endif

// A subcommand whose arguments (--help included) all go to another binary.
CLI::App* AddExecSubcommand(CLI::App& app, const char* name, const char* what) {
  CLI::App* sub = app.add_subcommand(name, what);
  sub->prefix_command();
  sub->fallthrough(false);
  sub->set_help_flag();
  return sub;
}

}  // namespace

int main(int argc, char** argv) {
  // As the daemon runs: the in-process paths measured beside it lock the same way.
  icecache::SetMutexDeadlockChecks(false);
  CLI::App app("Workload drivers for IceCache.", "icecache-bench");
  icecache::cli::Configure(app);
  app.require_subcommand(1);
  CLI::App* select = app.add_subcommand(
      "select", "the page-selection benchmark: every selector and peer on the same KV data");
  icecache::bench::SelectFlags select_flags(select);
  CLI::App* append = app.add_subcommand(
      "append", "decode appends as the daemon does them: 1-token steps at a long context");
  icecache::bench::AppendFlags append_flags(append);
  CLI::App* transfer = app.add_subcommand(
      "transfer", "gather vs memcpy on the CPU; with --gpu push + scatter vs a pinned copy");
  icecache::bench::TransferOptions transfer_options;
  icecache::bench::AddTransferFlags(transfer, &transfer_options);
  CLI::App* monitor = app.add_subcommand(
      "monitor", "the quality monitor and self-calibrating width: overhead and convergence");
  icecache::bench::MonitorBenchOptions monitor_options;
  icecache::bench::AddMonitorFlags(monitor, &monitor_options);
  CLI::App* rpc =
      AddExecSubcommand(app, "rpc", "the daemon decode-loop benchmark (icecache-bench rpc --help)");
  CLI::App* decode = AddExecSubcommand(
      app, "decode",
      "end to end: TT2T, TPOT breakdown and quality per policy (icecache-bench decode --help)");
  if (auto code = icecache::cli::Parse(app, argc, argv)) return *code;
  if (rpc->parsed()) {
    return ExecTool("rpc", "icecache-bench-rpc", ICECACHE_BENCH_RPC_PATH, rpc->remaining());
  }
  if (decode->parsed()) {
    return ExecTool("decode", "icecache-bench-decode", ICECACHE_BENCH_DECODE_PATH,
                    decode->remaining());
  }
  if (append->parsed()) {
    const absl::Status s = icecache::bench::RunAppendBench(append_flags.options());
    if (!s.ok()) {
      std::fprintf(stderr, "icecache-bench append: %s\n", s.ToString().c_str());
      return 1;
    }
    return 0;
  }
  if (transfer->parsed()) {
    const absl::Status s = icecache::bench::RunTransferBench(transfer_options);
    if (!s.ok()) {
      std::fprintf(stderr, "icecache-bench transfer: %s\n", s.ToString().c_str());
      return 1;
    }
    return 0;
  }
  if (monitor->parsed()) {
    const absl::Status s = icecache::bench::RunMonitorBench(monitor_options);
    if (!s.ok()) std::fprintf(stderr, "icecache-bench monitor: %s\n", s.ToString().c_str());
    return s.ok() ? 0 : 1;
  }

  auto options = select_flags.Options();
  if (!options.ok()) {
    std::fprintf(stderr,
                 "icecache-bench select: %s\n(run icecache-bench select --help for usage)\n",
                 std::string(options.status().message()).c_str());
    return icecache::cli::kExitUsage;
  }
  const absl::Status s = icecache::bench::RunSelectBench(*options);
  if (!s.ok()) {
    std::fprintf(stderr, "icecache-bench select: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
