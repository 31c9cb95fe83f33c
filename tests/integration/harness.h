// Shared pieces of the integration suite: a real icecached process on a
// private Unix socket (client/daemon_process.h), running helper binaries
// (icecachectl, the tenant probe) optionally as another uid, small session
// shapes and synthetic KV.
#ifndef ICECACHE_TESTS_INTEGRATION_HARNESS_H_
#define ICECACHE_TESTS_INTEGRATION_HARNESS_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/daemon_process.h"
#include "client/kv_check.h"
#include "common/kv_dump.h"
#include "common/status_macros.h"
#include "tests/support/time_scale.h"

namespace icecache::testing {

// Paths of the built binaries (compile definitions from CMake).
std::string IcecachedPath();
std::string IcecachectlPath();
std::string ProbePath();

// The uid the suite uses as a second tenant ("beta"); "nobody".
constexpr uid_t kOtherUid = 65534;

// The buffer idle TTL of BaseConfig: long, so that a buffer a test leaves
// unused while something slow runs (a big prefill on a loaded machine, a
// sanitizer build) is never reclaimed under it. Tests of reclamation itself
// pass kShortBufferTtlConfig.
constexpr int64_t kDefaultTestBufferIdleTtlMs = 120'000;
// For the tests that wait for a dead client's buffer to be reclaimed: 3 s.
inline constexpr char kShortBufferTtlConfig[] = "sessions { buffer_idle_ttl_ms: 3000 }\n";

// Config text: the test's own uid (0 in CI) -> tenant "alpha" (admin),
// kOtherUid -> "beta" (not admin), socket mode 0666 so the other uid can connect, a 100 ms reaper
// and kDefaultTestBufferIdleTtlMs buffer idle TTL; `extra` is appended verbatim (textproto
// allows a message to be given in parts, e.g. "pool { capacity_bytes: ... }", and a field
// given again overrides the earlier value).
std::string BaseConfig(const std::string& extra = "");

// TimeScale() and Scaled(): tests/support/time_scale.h.

// Polls `done` every 50 ms until it holds (true) or Scaled(limit) passes (false).
bool Eventually(const std::function<bool()>& done, absl::Duration limit = absl::Seconds(30));

// The options StartDaemon uses: BaseConfig(extra_config), `extra_args`,
// logging at `log_level`, a 5 s drain timeout unless `extra_args` sets
// --drain_timeout.
DaemonOptions TestDaemonOptions(const std::string& extra_config = "",
                                const std::vector<std::string>& extra_args = {},
                                const std::string& log_level = "warn");

// Starts a daemon with BaseConfig(extra_config) and `extra_args`, logging at
// `log_level` (its stderr: DaemonProcess::Stderr()).
absl::StatusOr<std::unique_ptr<DaemonProcess>> StartDaemon(
    const std::string& extra_config = "", const std::vector<std::string>& extra_args = {},
    const std::string& log_level = "warn");

// A loopback TCP port that was free a moment ago (bind to 0, read it back,
// close); -1 when none could be bound.
int FreePort();

// The value of the sample `series` (name and labels as /metrics prints them,
// e.g. `icecache_gpu_pushes_total{path="staged"}`) from the /metrics of a
// daemon started with DaemonOptions.metrics_port (found in its log); -1
// when it cannot be read.
double MetricValue(const DaemonProcess& daemon, const std::string& series);

// A client of `daemon` with a short per-call deadline.
absl::StatusOr<std::unique_ptr<Client>> Connect(const DaemonProcess& daemon);

struct CommandResult {
  int exit_code = -1;  // -1 when killed by a signal
  std::string out;
  std::string err;
};
// fork + exec of argv[0] with argv, as `uid` (and its gid) when uid >= 0;
// waits for it and collects stdout/stderr. Internal on fork/pipe errors.
absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv, int uid = -1);

// A child process whose stdout can be read line by line while it runs
// (the probe's "hold" mode). Killed with SIGKILL on destruction.
class ChildProcess {
 public:
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Start(const std::vector<std::string>& argv,
                                                             int uid = -1);
  ~ChildProcess();
  // Reads one line of stdout (without '\n'); DeadlineExceeded after `timeout`
  // seconds, OutOfRange at EOF.
  absl::StatusOr<std::string> ReadLine(double timeout_s);
  pid_t pid() const { return pid_; }
  void Kill(int signal);
  int Wait();

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string buffered_;
  bool reaped_ = false;
};

// A small model for tests: "small" synthetic preset (64-dim, GQA 2:1) with
// the given shape.
struct TestModel {
  KvDump dump;
  HostKv kv;
  SessionSpec spec;
};
TestModel MakeModel(int layers, int kv_heads, int64_t tokens, int steps,
                    SelectorType selector = SelectorType::kExact, uint64_t seed = 7);
// q_heads x head_dim fp32 queries of (step, layer).
absl::Span<const float> Queries(const TestModel& m, int step, int layer);

// Parses JSON text (object or array) into a google.protobuf.Value and
// returns it serialised back; InvalidArgument when it is not valid JSON.
absl::Status ParseJson(const std::string& text);

}  // namespace icecache::testing

#endif  // ICECACHE_TESTS_INTEGRATION_HARNESS_H_
