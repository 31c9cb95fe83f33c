// icecached: the IceCache KV-cache offload daemon (DESIGN.md 2, 7, 8).
//
//   icecached [--config FILE] [--socket PATH] [--metrics_port N] ...
//
// Configuration: the textproto file (schema icecache.v1.IcecachedConfig, see
// deploy/icecached.textproto) is read first, flags given on the command line
// override it, then defaults fill the rest; every field is validated and a bad
// one stops the daemon (exit 2) with a message naming it. With no file at all
// the defaults apply.
//
// When serving, one line "icecached ready socket=<path> epoch=<n>
// metrics_port=<n>" goes to stderr (whatever --log_level), so scripts and
// tests can wait for it. SIGTERM/SIGINT drain (new sessions UNAVAILABLE,
// health NOT_SERVING), in-flight calls finish within drain_timeout_ms, exit 0.
// A SIGINT while draining exits at once with status 1.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "google/protobuf/text_format.h"
#include "server/rpc/config.h"
#include "server/rpc/daemon.h"
#include "server/rpc/log.h"

ABSL_FLAG(std::string, config, "",
          "Path of the textproto config file (IcecachedConfig); empty = defaults only");
ABSL_FLAG(std::string, socket, "", "Unix socket path (listen.unix_socket)");
// Flags left at their "unset" default (empty, -1, 0) do not override the file.
ABSL_FLAG(int64_t, metrics_port, -1,
          "Prometheus /metrics + /healthz port on loopback; 0 = off (metrics.port, default 9464)");
ABSL_FLAG(uint64_t, capacity_bytes, 0,
          "Pool capacity in bytes (pool.capacity_bytes, default 4 GiB)");
ABSL_FLAG(std::string, log_level, "", "debug, info, warn or error (log_level, default info)");
ABSL_FLAG(std::string, ttl_reaper_interval, "",
          "How often session leases are checked (sessions.reaper_interval_ms, default 1s): a "
          "duration like 100ms or 2s, or plain milliseconds");
ABSL_FLAG(std::string, default_ttl, "",
          "Session lease when a session asks none (sessions.default_ttl_ms, default 60s): "
          "duration or ms");
ABSL_FLAG(std::string, drain_timeout, "",
          "Longest wait for in-flight calls at shutdown (drain_timeout_ms, default 10s): "
          "duration or ms");
ABSL_FLAG(std::string, tcp_address, "", "TCP listener host:port (needs TLS files in the config)");
ABSL_FLAG(uint32_t, worker_threads, 0, "Index build threads; 0 = CPUs (worker_threads)");
ABSL_FLAG(bool, check_config, false, "Validate the configuration, print it and exit");

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

int Fail(int code, absl::string_view msg) {
  std::fprintf(stderr, "icecached: %.*s\n", static_cast<int>(msg.size()), msg.data());
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "icecached: IceCache KV-cache offload daemon.\n"
      "  icecached [--config FILE] [--socket PATH] [--metrics_port N] [--log_level LEVEL]\n"
      "Flags override the config file; see deploy/icecached.textproto for every field.");
  absl::ParseCommandLine(argc, argv);

  // Block the shutdown signals in every thread (gRPC's included) before any
  // thread starts; one thread waits for them with sigwait.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  icecache::v1::IcecachedConfig config;
  if (const std::string path = absl::GetFlag(FLAGS_config); !path.empty()) {
    absl::StatusOr<icecache::v1::IcecachedConfig> loaded = icecache::rpc::LoadConfigFile(path);
    if (!loaded.ok()) return Fail(2, loaded.status().message());
    config = *std::move(loaded);
  }
  icecache::rpc::ConfigOverrides o;
  if (!absl::GetFlag(FLAGS_socket).empty()) o.socket = absl::GetFlag(FLAGS_socket);
  if (const int64_t port = absl::GetFlag(FLAGS_metrics_port); port != -1) {
    if (port < 0 || port > 65535) return Fail(2, "--metrics_port must be 0 (off) .. 65535");
    o.metrics_port = static_cast<uint32_t>(port);
  }
  if (absl::GetFlag(FLAGS_capacity_bytes) != 0)
    o.capacity_bytes = absl::GetFlag(FLAGS_capacity_bytes);
  if (!absl::GetFlag(FLAGS_log_level).empty()) o.log_level = absl::GetFlag(FLAGS_log_level);
  if (!absl::GetFlag(FLAGS_tcp_address).empty()) o.tcp_address = absl::GetFlag(FLAGS_tcp_address);
  if (absl::GetFlag(FLAGS_worker_threads) != 0)
    o.worker_threads = absl::GetFlag(FLAGS_worker_threads);
  struct DurationFlag {
    const char* name;
    std::string value;
    std::optional<uint64_t>* out;
  };
  for (const DurationFlag& f :
       {DurationFlag{"ttl_reaper_interval", absl::GetFlag(FLAGS_ttl_reaper_interval),
                     &o.reaper_interval_ms},
        DurationFlag{"default_ttl", absl::GetFlag(FLAGS_default_ttl), &o.default_ttl_ms},
        DurationFlag{"drain_timeout", absl::GetFlag(FLAGS_drain_timeout), &o.drain_timeout_ms}}) {
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
  if (absl::GetFlag(FLAGS_check_config)) {
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

  const std::string ready =
      absl::StrCat("icecached ready socket=", d->socket_path(), " epoch=", d->epoch(),
                   " metrics_port=", d->metrics_port(), "\n");
  std::fputs(ready.c_str(), stderr);
  std::fflush(stderr);

  d->WaitForShutdownRequest();
  d->Shutdown();
  daemon->reset();
  return 0;
}
