// icecache-load: bounded load with byte checks against a real daemon on its
// Unix socket (docs/operations.md, "Load"). Tenants are separate processes,
// each under its own uid when run as root (the daemon maps unmapped uids to
// tenant "uid-<n>"), each with worker threads, sessions and decode streams
// (tests/load/load_worker.h). It runs for --seconds and stops by itself,
// then checks: no tenant process crashed, the daemon is alive, zero wrong
// bytes, every bad request got its precise code, and after every session
// and buffer is dropped the pool is empty and the daemon's RSS is back
// within --rss-slack-mib of where it started. Prints a table and JSON
// (throughput, p50/p99 latencies); exits 1 when a check fails.
#include <grp.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/daemon_process.h"
#include "common/cli.h"
#include "tests/load/load_worker.h"

namespace icecache::load {
namespace {

struct Flags {
  std::string socket;
  std::string spawn;
  double seconds = 20;
  int tenants = 3;
  int workers = 2;
  int sessions = 2;
  int64_t tokens = 1024;
  int bad_every = 16;
  int64_t rss_slack_mib = 128;
  double settle_seconds = 6;
  std::string json;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

int64_t ProcField(pid_t pid, const std::string& field) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(field, 0) == 0) return std::stoll(line.substr(field.size())) * 1024;
  }
  return 0;
}

// Resident bytes of the daemon's pool arena (the mapping of exactly
// `arena_bytes`, /proc/PID/smaps): the rest of the RSS is the heap, thread
// stacks and code. Tells pool retention from heap growth after a run.
int64_t ArenaRssBytes(pid_t pid, uint64_t arena_bytes) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/smaps"));
  bool in_arena = false;
  for (std::string line; std::getline(in, line);) {
    unsigned long long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%llx-%llx ", &lo, &hi) == 2) {  // a mapping's first line
      in_arena = hi - lo == arena_bytes;
      continue;
    }
    if (in_arena && line.rfind("Rss:", 0) == 0) return std::stoll(line.substr(4)) * 1024;
  }
  return 0;
}

// Forks one tenant process; its result comes back as one JSON line on the
// returned fd. As root the child becomes uid 60000 + index.
pid_t ForkTenant(const TenantOptions& o, int index, int* fd) {
  int p[2];
  if (::pipe(p) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid != 0) {
    ::close(p[1]);
    *fd = p[0];
    return pid;
  }
  ::close(p[0]);
  if (::geteuid() == 0) {
    const uid_t uid = 60000 + index;
    if (::setgroups(0, nullptr) != 0 || ::setgid(uid) != 0 || ::setuid(uid) != 0) _exit(126);
  }
  const LoadResult r = RunTenant(o);
  const std::string line = DumpJson(r.ToJson(true)) + "\n";
  size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::write(p[1], line.data() + done, line.size() - done);
    if (n <= 0) _exit(3);
    done += static_cast<size_t>(n);
  }
  _exit(0);
}

std::string ReadAll(int fd) {
  std::string out;
  char buf[65536];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

// Polls the daemon until every session, buffer and call is gone.
absl::StatusOr<DaemonStats> SettledStats(Client& admin) {
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (true) {
    absl::StatusOr<DaemonStats> st = admin.GetStats();
    // Frames come back when the last holder of a dropped session lets go
    // (a background tree build or quality sample may still hold it): wait
    // for them too; pages never returned still fail the run at the deadline.
    if (st.ok() && st->sessions == 0 && st->buffers == 0 && st->in_flight == 0 &&
        st->bytes_used == 0 && st->frames_used == 0) {
      return st;
    }
    if (absl::Now() > deadline) return st;
    absl::SleepFor(absl::Milliseconds(100));
  }
}

// Pool capacity of a spawned daemon.
constexpr uint64_t kSpawnPoolBytes = uint64_t{1} << 30;

int Run(const Flags& f) {
  std::unique_ptr<DaemonProcess> daemon;
  std::string socket = f.socket;
  if (!f.spawn.empty()) {
    DaemonOptions d;
    d.binary = f.spawn;
    d.config_textproto = absl::StrCat("listen { unix_socket_mode: 438 }\n",
                                      "pool { capacity_bytes: ", kSpawnPoolBytes, " }\n",
                                      "sessions { reaper_interval_ms: 200 }\n");
    auto started = DaemonProcess::Start(d);
    if (!started.ok()) {
      std::cerr << "icecache-load: " << started.status() << "\n";
      return 1;
    }
    daemon = *std::move(started);
    socket = daemon->socket_path();
    // The baseline is the idle daemon after its reaper's first passes (it
    // keeps sessions.prefault_slabs of the pool faulted in ahead).
    absl::SleepFor(absl::Seconds(1));
  }
  const pid_t dpid = daemon ? daemon->pid() : 0;
  const int64_t rss_before = dpid ? ProcField(dpid, "VmRSS:") : 0;
  const int64_t arena_before = dpid ? ArenaRssBytes(dpid, kSpawnPoolBytes) : 0;
  TenantOptions o;
  o.socket_path = socket;
  o.workers = f.workers;
  o.sessions = f.sessions;
  o.tokens = f.tokens;
  o.bad_every = f.bad_every;
  o.deadline = absl::Now() + absl::Seconds(f.seconds);
  const absl::Time start = absl::Now();
  std::vector<pid_t> pids(f.tenants);
  std::vector<int> fds(f.tenants);
  for (int t = 0; t < f.tenants; ++t) {
    o.seed = 1000 + t;
    pids[t] = ForkTenant(o, t, &fds[t]);
    if (pids[t] < 0) {
      std::cerr << "icecache-load: fork failed\n";
      return 1;
    }
  }
  LoadResult total;
  int crashed = 0;
  for (int t = 0; t < f.tenants; ++t) {
    const std::string line = ReadAll(fds[t]);
    int status = 0;
    ::waitpid(pids[t], &status, 0);
    auto j = ParseJson(line);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || !j.ok()) {
      ++crashed;
      std::cerr << "tenant " << t << " ended with wait status " << status << "\n";
      continue;
    }
    total.Merge(LoadResult::FromJson(*j));
  }
  const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);

  ClientOptions co;
  co.socket_path = socket;
  auto admin = Client::Create(co);
  absl::StatusOr<DaemonStats> st =
      admin.ok() ? SettledStats(**admin) : absl::StatusOr<DaemonStats>(admin.status());
  // The daemon gives memory back in the background once sessions are gone
  // (its reaper: the pool's prefault window, the heap trim at most every
  // 5 s); the "after" figure is the idle daemon a few seconds later.
  absl::SleepFor(absl::Seconds(f.settle_seconds));
  const bool daemon_alive = daemon ? daemon->running() : st.ok();
  const int64_t rss_peak = dpid ? ProcField(dpid, "VmHWM:") : 0;
  const int64_t rss_after = dpid ? ProcField(dpid, "VmRSS:") : 0;
  const int64_t arena_after = dpid ? ArenaRssBytes(dpid, kSpawnPoolBytes) : 0;
  const bool pool_empty = st.ok() && st->bytes_used == 0 && st->sessions == 0 && st->buffers == 0 &&
                          st->frames_used == 0;
  const bool rss_back = !dpid || rss_after <= rss_before + (f.rss_slack_mib << 20);

  const int streams = f.tenants * f.workers * f.sessions;
  Json j = total.ToJson(false);
  j["seconds"] = elapsed;
  j["tenants"] = f.tenants;
  j["workers_per_tenant"] = f.workers;
  j["live_sessions"] = streams;
  j["requests_per_s"] = (total.ops + total.bad_requests) / elapsed;
  j["decode_steps"] = total.decode_us.size();
  j["decode_p50_us"] = Percentile(total.decode_us, 0.5);
  j["decode_p99_us"] = Percentile(total.decode_us, 0.99);
  j["append_p50_us"] = Percentile(total.append_us, 0.5);
  j["append_p99_us"] = Percentile(total.append_us, 0.99);
  j["tenants_crashed"] = crashed;
  j["daemon_alive"] = daemon_alive;
  j["pool_empty_after"] = pool_empty;
  j["rss_before_bytes"] = rss_before;
  j["rss_peak_bytes"] = rss_peak;
  j["rss_after_bytes"] = rss_after;
  j["pool_arena_rss_before_bytes"] = arena_before;
  j["pool_arena_rss_after_bytes"] = arena_after;
  if (!st.ok()) j["stats_error"] = st.status().ToString();

  std::cout << absl::StrFormat(
      "icecache-load: %d tenants x %d workers x %d sessions (%d streams), %.1f s\n"
      "  requests      %lld good + %lld bad, %.0f/s\n"
      "  decode steps  %zu  p50 %.0f us  p99 %.0f us\n"
      "  appends       %zu  p50 %.0f us  p99 %.0f us\n"
      "  bytes         %lld page blocks checked, %lld wrong\n"
      "  failures      %lld good requests failed, %lld bad requests with the wrong code, "
      "%d tenants crashed\n"
      "  daemon        %s; pool %s after; RSS %.1f MiB before, %.1f peak, %.1f after\n"
      "                (of which the pool arena: %.1f MiB before, %.1f after)\n",
      f.tenants, f.workers, f.sessions, streams, elapsed, static_cast<long long>(total.ops),
      static_cast<long long>(total.bad_requests), (total.ops + total.bad_requests) / elapsed,
      total.decode_us.size(), Percentile(total.decode_us, 0.5), Percentile(total.decode_us, 0.99),
      total.append_us.size(), Percentile(total.append_us, 0.5), Percentile(total.append_us, 0.99),
      static_cast<long long>(total.pages_checked), static_cast<long long>(total.wrong_bytes),
      static_cast<long long>(total.errors), static_cast<long long>(total.bad_wrong_code), crashed,
      daemon_alive ? "alive" : "DEAD", pool_empty ? "empty" : "NOT EMPTY", rss_before / 1048576.0,
      rss_peak / 1048576.0, rss_after / 1048576.0, arena_before / 1048576.0,
      arena_after / 1048576.0);
  if (st.ok() && !pool_empty) {
    std::cout << "  pool after 20 s: " << st->sessions << " sessions, " << st->buffers
              << " buffers, " << st->frames_used << " frames, " << st->bytes_used
              << " bytes used\n";
  }
  for (const auto& msg : total.first_failures) std::cout << "  first failure: " << msg << "\n";
  if (!f.json.empty()) {
    std::ofstream(f.json) << DumpJson(j, 2) << "\n";
  }
  const bool ok = crashed == 0 && daemon_alive && total.wrong_bytes == 0 && total.errors == 0 &&
                  total.bad_wrong_code == 0 && pool_empty && rss_back && total.ops > 0;
  if (!ok) std::cout << "icecache-load: FAILED\n";
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace icecache::load

int main(int argc, char** argv) {
  icecache::load::Flags f;
  CLI::App app{"icecache-load: bounded multi-tenant load with byte checks"};
  icecache::cli::Configure(app);
  auto* where = app.add_option_group("daemon");
  where->add_option("--socket", f.socket, "Unix socket of a running daemon (needs the admin role)");
  where->add_option("--spawn", f.spawn, "Path of an icecached binary to start on a private socket");
  where->require_option(1);
  app.add_option("--seconds", f.seconds, "How long the load runs")->capture_default_str();
  app.add_option("--tenants", f.tenants, "Tenant processes (own uid each when root)")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  app.add_option("--workers", f.workers, "Worker threads per tenant")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  app.add_option("--sessions", f.sessions, "Live sessions (decode streams) per worker")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  app.add_option("--tokens", f.tokens, "Tokens per session (2 layers, 2 KV heads, 64 dims)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{64}, int64_t{1} << 20));
  app.add_option("--bad-every", f.bad_every, "One bad request per this many good ones (0: none)")
      ->capture_default_str();
  app.add_option("--settle-seconds", f.settle_seconds,
                 "Idle time after every session is gone before the RSS is read again")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 600.0));
  app.add_option("--rss-slack-mib", f.rss_slack_mib,
                 "Daemon RSS after the run may exceed the start by this much")
      ->capture_default_str();
  app.add_option("--json", f.json, "Also write the figures as JSON to this file");
  if (auto code = icecache::cli::Parse(app, argc, argv)) return *code;
  return icecache::load::Run(f);
}
