// icecache-bench: workload drivers for IceCache. Subcommands:
//   select   the page-selection benchmark (tests/bench/select_bench.h)
//   append   decode appends at a long context (tests/bench/append_bench.h)
//   transfer the gather against memcpy, and with --gpu the push + scatter
//            against a pinned cudaMemcpy (tests/bench/transfer_bench.h)
//   monitor  the quality monitor and calibrated width in the session core
//            (tests/bench/monitor_bench.h)
//   rpc      the daemon decode-loop benchmark: runs icecache-bench-rpc
//            (client/bench_rpc_main.cc), which links the client library
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/cli.h"
#include "tests/bench/append_bench.h"
#include "tests/bench/monitor_bench.h"
#include "tests/bench/select_bench.h"
#include "tests/bench/select_flags.h"
#include "tests/bench/transfer_bench.h"

namespace {

// Execs icecache-bench-rpc with the remaining arguments: first the binary next
// to this one (installed layout), then the build tree's.
int ExecRpcBench(const std::vector<std::string>& rpc_args) {
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
    for (const std::string& a : rpc_args) args.push_back(const_cast<char*>(a.c_str()));
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
  // Everything after `rpc` (--help included) goes to icecache-bench-rpc.
  CLI::App* rpc =
      app.add_subcommand("rpc", "the daemon decode-loop benchmark (icecache-bench rpc --help)");
  rpc->prefix_command();
  rpc->fallthrough(false);
  rpc->set_help_flag();
  if (auto code = icecache::cli::Parse(app, argc, argv)) return *code;
  if (rpc->parsed()) return ExecRpcBench(rpc->remaining());
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
