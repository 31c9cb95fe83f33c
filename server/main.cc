// icecached: the IceCache KV-cache offload daemon (docs/architecture.md §1, §8).
//
//   icecached [--config FILE] [--socket PATH] [--metrics-port N] ...
//
// Flags follow every tool's convention (common/cli.h): kebab-case, the old
// snake_case spellings (--metrics_port) kept as aliases.
//
// Configuration: the textproto file (schema icecache.v1.IcecachedConfig, see
// deploy/icecached.textproto) is read first, flags given on the command line
// override it, then defaults fill the rest; every field is validated and a bad
// one stops the daemon (exit 2) with a message naming it. With no file at all
// the defaults apply.
//
// When serving, one line "icecached ready socket=<path> epoch=<n>
// metrics_port=<n>" goes to stderr (whatever --log-level), so scripts and
// tests can wait for it. SIGTERM/SIGINT drain (new sessions UNAVAILABLE,
// health NOT_SERVING), in-flight calls finish within drain_timeout_ms, exit 0.
// A SIGINT while draining exits at once with status 1. After AdminService.Drain
// with for_upgrade the warm-restart snapshot is written and the exit code is 3.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/cli.h"
#include "common/mutex_checks.h"
#include "google/protobuf/text_format.h"
#include "server/rpc/config.h"
#include "server/rpc/daemon.h"
#include "server/rpc/log.h"

namespace {

using icecache::rpc::Log;
using icecache::rpc::LogLevel;

// "250ms", "2s", "1m" or plain milliseconds "250".
std::optional<uint64_t> ParseMillis(const std::string& text) {
  uint64_t ms = 0;
  if (absl::SimpleAtoi(text, &ms)) return ms;
  absl::Duration d;
  if (!absl::ParseDuration(text, &d) || d < absl::ZeroDuration()) return std::nullopt;
  return static_cast<uint64_t>(absl::ToInt64Milliseconds(d));
}

// Command-line overrides. Flags left at their "unset" default (empty, -1, 0)
// do not override the config file.
struct Flags {
  std::string config;
  std::string socket;
  int64_t metrics_port = -1;
  uint64_t capacity_bytes = 0;
  std::string log_level;
  std::string ttl_reaper_interval;
  std::string default_ttl;
  std::string drain_timeout;
  std::string tcp_address;
  uint32_t worker_threads = 0;
  bool pool_prefault = false;
  bool check_config = false;
  bool mutex_deadlock_detection = false;
};

void AddFlags(CLI::App& app, Flags* f) {
  app.add_option("--config", f->config,
                 "Path of the textproto config file (IcecachedConfig); empty = defaults only");
  app.add_option("--socket", f->socket, "Unix socket path (listen.unix_socket)");
  app.add_option("--metrics-port,--metrics_port", f->metrics_port,
                 "Prometheus /metrics + /healthz port on loopback; 0 = off, -1 = the config's "
                 "(metrics.port, default 9464)");
  app.add_option("--capacity-bytes,--capacity_bytes", f->capacity_bytes,
                 "Pool capacity in bytes; 0 = the config's (pool.capacity_bytes, default 4 GiB)");
  app.add_option("--log-level,--log_level", f->log_level,
                 "debug, info, warn or error (log_level, default info)");
  app.add_option("--ttl-reaper-interval,--ttl_reaper_interval", f->ttl_reaper_interval,
                 "How often session leases are checked (sessions.reaper_interval_ms, default "
                 "1s): a duration like 100ms or 2s, or plain milliseconds");
  app.add_option("--default-ttl,--default_ttl", f->default_ttl,
                 "Session lease when a session asks none (sessions.default_ttl_ms, default "
                 "60s): duration or ms");
  app.add_option("--drain-timeout,--drain_timeout", f->drain_timeout,
                 "Longest wait for in-flight calls at shutdown (drain_timeout_ms, default 10s): "
                 "duration or ms");
  app.add_option("--tcp-address,--tcp_address", f->tcp_address,
                 "TCP listener host:port (needs TLS files in the config)");
  app.add_option("--worker-threads,--worker_threads", f->worker_threads,
                 "Index build threads; 0 = CPUs (worker_threads)");
  app.add_flag("--pool-prefault,--pool_prefault", f->pool_prefault,
               "Fault the whole pool arena in at start, in the background, and keep it "
               "resident (pool.prefault; not ready until done)");
  app.add_flag("--check-config,--check_config", f->check_config,
               "Validate the configuration, print it and exit");
  app.add_flag("--mutex-deadlock-detection", f->mutex_deadlock_detection,
               "Abseil's lock-order checks on every mutex, aborting on an inversion (a "
               "debugging aid; off by default: common/mutex_checks.h)");
}

int Fail(int code, absl::string_view msg) {
  std::fprintf(stderr, "icecached: %.*s\n", static_cast<int>(msg.size()), msg.data());
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "icecached: IceCache KV-cache offload daemon. Flags override the config file; see "
      "deploy/icecached.textproto for every field.",
      "icecached"};
  icecache::cli::Configure(app);
  Flags flags;
  AddFlags(app, &flags);
  if (std::optional<int> code = icecache::cli::Parse(app, argc, argv)) return *code;
  icecache::SetMutexDeadlockChecks(flags.mutex_deadlock_detection);

  // Block the shutdown signals in every thread (gRPC's included) before any
  // thread starts; one thread waits for them with sigwait.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  icecache::v1::IcecachedConfig config;
  if (const std::string path = flags.config; !path.empty()) {
    absl::StatusOr<icecache::v1::IcecachedConfig> loaded = icecache::rpc::LoadConfigFile(path);
    if (!loaded.ok()) return Fail(2, loaded.status().message());
    config = *std::move(loaded);
  }
  icecache::rpc::ConfigOverrides o;
  if (!flags.socket.empty()) o.socket = flags.socket;
  if (const int64_t port = flags.metrics_port; port != -1) {
    if (port < 0 || port > 65535) return Fail(2, "--metrics-port must be 0 (off) .. 65535");
    o.metrics_port = static_cast<uint32_t>(port);
  }
  if (flags.capacity_bytes != 0) o.capacity_bytes = flags.capacity_bytes;
  if (!flags.log_level.empty()) o.log_level = flags.log_level;
  if (!flags.tcp_address.empty()) o.tcp_address = flags.tcp_address;
  if (flags.worker_threads != 0) o.worker_threads = flags.worker_threads;
  if (flags.pool_prefault) o.pool_prefault = true;
  struct DurationFlag {
    const char* name;
    std::string value;
    std::optional<uint64_t>* out;
  };
  for (const DurationFlag& f :
       {DurationFlag{"ttl-reaper-interval", flags.ttl_reaper_interval, &o.reaper_interval_ms},
        DurationFlag{"default-ttl", flags.default_ttl, &o.default_ttl_ms},
        DurationFlag{"drain-timeout", flags.drain_timeout, &o.drain_timeout_ms}}) {
    if (f.value.empty()) continue;
    std::optional<uint64_t> ms = ParseMillis(f.value);
    if (!ms) {
      return Fail(2, absl::StrCat("--", f.name, "=", f.value,
                                  ": want a duration like 100ms or 2s, or milliseconds"));
    }
    *f.out = *ms;
  }
  if (absl::Status st = icecache::rpc::ApplyOverrides(o, &config); !st.ok()) {
    return Fail(2, st.message());
  }
  icecache::rpc::ApplyDefaults(&config);
  if (absl::Status st = icecache::rpc::ValidateConfig(config); !st.ok()) {
    return Fail(2, st.message());
  }
  switch (config.log_level()) {
    case icecache::v1::LOG_LEVEL_DEBUG:
      icecache::rpc::SetLogLevel(LogLevel::kDebug);
      break;
    case icecache::v1::LOG_LEVEL_WARN:
      icecache::rpc::SetLogLevel(LogLevel::kWarn);
      break;
    case icecache::v1::LOG_LEVEL_ERROR:
      icecache::rpc::SetLogLevel(LogLevel::kError);
      break;
    default:
      icecache::rpc::SetLogLevel(LogLevel::kInfo);
      break;
  }
  if (flags.check_config) {
    std::string text;
    google::protobuf::TextFormat::PrintToString(icecache::rpc::RedactSecrets(config), &text);
    std::fputs(text.c_str(), stdout);
    return 0;
  }

  absl::StatusOr<std::unique_ptr<icecache::rpc::Daemon>> daemon =
      icecache::rpc::Daemon::Create(config);
  if (!daemon.ok()) {
    return Fail(1, absl::StrCat("cannot start: ", daemon.status().ToString()));
  }
  icecache::rpc::Daemon* d = daemon->get();

  std::thread signal_thread([d, signals] {
    int sig = 0;
    if (sigwait(&signals, &sig) != 0) return;
    // Drain first, log after: CreateSession checks the drain flag (and a
    // still-pending signal), so the window between the two is a few stores.
    d->BeginDrain();
    Log(LogLevel::kWarn, "signal", {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
    d->RequestShutdown();
    // Repeated SIGTERMs (e.g. sent to both the process and its group) change
    // nothing: the drain is already bounded by drain_timeout_ms. A SIGINT
    // while draining (Ctrl-C twice) exits at once.
    while (sigwait(&signals, &sig) == 0) {
      if (sig == SIGINT) {
        Log(LogLevel::kError, "second_sigint_exit", {});
        std::_Exit(1);
      }
    }
  });
  signal_thread.detach();

  // pool.prefault: ready once the arena is faulted in (or at a shutdown
  // request during it); calls are served meanwhile.
  if (!d->WaitUntilReady()) {
    d->Shutdown();
    const int code = d->exit_code();
    daemon->reset();
    return code;
  }
  const std::string ready =
      absl::StrCat("icecached ready socket=", d->socket_path(), " epoch=", d->epoch(),
                   " metrics_port=", d->metrics_port(), "\n");
  std::fputs(ready.c_str(), stderr);
  std::fflush(stderr);

  d->WaitForShutdownRequest();
  d->Shutdown();
  // 3 after a drain for upgrade whose snapshot was written (docs/operations.md).
  const int code = d->exit_code();
  daemon->reset();
  return code;
}
