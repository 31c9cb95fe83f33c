#include "tests/integration/harness.h"

#include <fcntl.h>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <grp.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/synthetic.h"
#include "tests/support/temp_path.h"

namespace icecache::testing {

// ICECACHE_TEST_ICECACHED in the environment overrides the build's path (a
// prebuilt bundle run elsewhere: tests/gpu/run.sh --prebuilt).
std::string IcecachedPath() {
  const char* env = std::getenv("ICECACHE_TEST_ICECACHED");
  return env != nullptr && *env != '\0' ? env : ICECACHE_TEST_ICECACHED;
}
std::string IcecachectlPath() { return ICECACHE_TEST_ICECACHECTL; }
std::string ProbePath() { return ICECACHE_TEST_PROBE; }

int FreePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    ::close(fd);
    return -1;
  }
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

double MetricValue(const DaemonProcess& daemon, const std::string& series) {
  const std::string log = daemon.Stderr();
  const size_t at = log.find(" metrics_port=");
  if (at == std::string::npos) return -1;
  const size_t start = at + std::strlen(" metrics_port=");
  int port = 0;
  if (!absl::SimpleAtoi(log.substr(start, log.find_first_of(" \n", start) - start), &port) ||
      port <= 0) {
    return -1;
  }
  httplib::Client http("127.0.0.1", port);
  http.set_read_timeout(10);
  auto res = http.Get("/metrics");
  if (!res) return -1;
  const std::string key = series + " ";
  const size_t line = res->body.find("\n" + key);
  if (line == std::string::npos) return -1;
  const size_t value = line + 1 + key.size();
  double v = -1;
  if (!absl::SimpleAtod(res->body.substr(value, res->body.find('\n', value) - value), &v)) {
    return -1;
  }
  return v;
}

std::string BaseConfig(const std::string& extra) {
  return absl::StrCat(
      "listen { unix_socket_mode: 438 }\n"  // 0666
      "auth {\n"
      "  uid_tenants { uid: ",
      ::geteuid(), " tenant: \"alpha\" }\n",
      ::geteuid() == kOtherUid
          ? ""
          : absl::StrCat("  uid_tenants { uid: ", kOtherUid, " tenant: \"beta\" }\n"),
      "  admin_uids: ", ::geteuid(),
      "\n"
      "}\n"
      "sessions { reaper_interval_ms: 100 buffer_idle_ttl_ms: ",
      kDefaultTestBufferIdleTtlMs,
      " }\n"
      "pool { capacity_bytes: 268435456 }\n"
      "worker_threads: 2\n",
      extra);
}

bool Eventually(const std::function<bool()>& done, absl::Duration limit) {
  const absl::Time deadline = absl::Now() + Scaled(limit);
  while (absl::Now() < deadline) {
    if (done()) return true;
    absl::SleepFor(absl::Milliseconds(50));
  }
  return done();
}

DaemonOptions TestDaemonOptions(const std::string& extra_config,
                                const std::vector<std::string>& extra_args,
                                const std::string& log_level) {
  DaemonOptions o;
  o.log_level = log_level;
  o.binary = IcecachedPath();
  o.ready_timeout = Scaled(o.ready_timeout);
  o.stop_timeout = Scaled(o.stop_timeout);
  o.config_textproto = BaseConfig(extra_config);
  o.extra_args = extra_args;
  const bool own_drain =
      std::any_of(extra_args.begin(), extra_args.end(),
                  [](const std::string& a) { return absl::StartsWith(a, "--drain_timeout"); });
  if (!own_drain) o.extra_args.push_back("--drain_timeout=5s");
  // The daemon switches Abseil's lock-order checks off (common/mutex_checks.h);
  // the tests keep them, so an inversion a test reaches aborts the daemon.
  o.extra_args.push_back("--mutex-deadlock-detection");
  return o;
}

absl::StatusOr<std::unique_ptr<DaemonProcess>> StartDaemon(
    const std::string& extra_config, const std::vector<std::string>& extra_args,
    const std::string& log_level) {
  return DaemonProcess::Start(TestDaemonOptions(extra_config, extra_args, log_level));
}

absl::StatusOr<std::unique_ptr<Client>> Connect(const DaemonProcess& daemon) {
  ClientOptions o;
  o.socket_path = daemon.socket_path();
  o.timeout = absl::Seconds(60);
  return Client::Create(o);
}

namespace {

// In the child after fork: only async-signal-safe calls.
void BecomeUid(int uid) {
  if (uid < 0) return;
  gid_t gid = static_cast<gid_t>(uid);
  if (::setgroups(0, nullptr) != 0 || ::setgid(gid) != 0 ||
      ::setuid(static_cast<uid_t>(uid)) != 0) {
    _exit(126);
  }
}

std::vector<char*> Argv(std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  return argv;
}

int ExitCode(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : -1; }

// A binary run as another uid must be reachable by that uid, but the build
// tree may sit under a 0700 home directory (CI clones into /root). Such
// binaries are copied once into a 0755 directory under $TMPDIR (/tmp when
// unset; deploy/dev.sh makes its suites' TMPDIR 0755), removed at exit.
struct StagingDir {
  std::string path;
  ~StagingDir() {
    if (path.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

absl::StatusOr<std::string> StageForOtherUid(const std::string& binary) {
  static StagingDir dir;  // removed when the test process exits
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (dir.path.empty()) {
    std::string tmpl = ::icecache::testing::TempPathTemplate("icecache-bin-");
    if (::mkdtemp(tmpl.data()) == nullptr) {
      return absl::InternalError(absl::StrCat("mkdtemp: ", std::strerror(errno)));
    }
    ::chmod(tmpl.c_str(), 0755);
    dir.path = tmpl;
  }
  const std::string staged = dir.path + "/" + std::filesystem::path(binary).filename().string();
  std::error_code ec;
  if (!std::filesystem::exists(staged, ec)) {
    std::filesystem::copy_file(binary, staged, ec);
    if (ec) return absl::InternalError(absl::StrCat("copy ", binary, ": ", ec.message()));
    ::chmod(staged.c_str(), 0755);
  }
  return staged;
}

}  // namespace

absl::StatusOr<CommandResult> RunCommand(const std::vector<std::string>& argv_in, int uid) {
  std::vector<std::string> args = argv_in;
  if (uid >= 0 && !args.empty()) {
    ASSIGN_OR_RETURN(args[0], StageForOtherUid(args[0]));
  }
  std::vector<char*> argv = Argv(args);
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", std::strerror(errno)));
  }
  const pid_t pid = ::fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    ::dup2(err[1], STDERR_FILENO);
    BecomeUid(uid);
    ::execv(argv[0], argv.data());
    _exit(127);
  }
  ::close(out[1]);
  ::close(err[1]);
  CommandResult r;
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  char buf[4096];
  while (open_fds > 0) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      const ssize_t n = ::read(fds[i].fd, buf, sizeof(buf));
      if (n <= 0) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      } else {
        (i == 0 ? r.out : r.err).append(buf, static_cast<size_t>(n));
      }
    }
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  r.exit_code = ExitCode(status);
  return r;
}

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::Start(
    const std::vector<std::string>& argv_in, int uid) {
  std::vector<std::string> args = argv_in;
  if (uid >= 0 && !args.empty()) {
    ASSIGN_OR_RETURN(args[0], StageForOtherUid(args[0]));
  }
  std::vector<char*> argv = Argv(args);
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("pipe failed");
  const pid_t pid = ::fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  if (pid == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    BecomeUid(uid);
    ::execv(argv[0], argv.data());
    _exit(127);
  }
  ::close(out[1]);
  auto c = std::unique_ptr<ChildProcess>(new ChildProcess());
  c->pid_ = pid;
  c->out_fd_ = out[0];
  return c;
}

ChildProcess::~ChildProcess() {
  if (!reaped_) {
    Kill(SIGKILL);
    Wait();
  }
  if (out_fd_ >= 0) ::close(out_fd_);
}

absl::StatusOr<std::string> ChildProcess::ReadLine(double timeout_s) {
  const absl::Time deadline = absl::Now() + absl::Seconds(timeout_s);
  while (true) {
    const size_t nl = buffered_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buffered_.substr(0, nl);
      buffered_.erase(0, nl + 1);
      return line;
    }
    const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left_ms <= 0) return absl::DeadlineExceededError("no line from child in time");
    pollfd p{out_fd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left_ms)) <= 0) continue;
    char buf[4096];
    const ssize_t n = ::read(out_fd_, buf, sizeof(buf));
    if (n <= 0)
      return absl::OutOfRangeError(absl::StrCat("child stdout closed; partial: ", buffered_));
    buffered_.append(buf, static_cast<size_t>(n));
  }
}

void ChildProcess::Kill(int signal) {
  if (!reaped_ && pid_ > 0) ::kill(pid_, signal);
}

// The shm buffers a client process made (client.cc names them
// /dev/shm/icecache-<pid>-<hex>) and unlinks when it exits; one killed by a
// signal leaves them, so the test that killed it removes them. Errors are
// ignored (another uid's file in sticky /dev/shm when not root).
namespace {
void RemoveShmFilesOf(pid_t pid) {
  const std::string prefix = absl::StrCat("icecache-", pid, "-");
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    if (absl::StartsWith(entry.path().filename().string(), prefix)) {
      std::filesystem::remove(entry.path(), ec);
    }
  }
}
}  // namespace

int ChildProcess::Wait() {
  if (reaped_) return -1;
  int status = 0;
  ::waitpid(pid_, &status, 0);
  reaped_ = true;
  if (WIFSIGNALED(status)) RemoveShmFilesOf(pid_);
  return ExitCode(status);
}

TestModel MakeModel(int layers, int kv_heads, int64_t tokens, int steps, SelectorType selector,
                    uint64_t seed) {
  SyntheticConfig c = SyntheticPreset("small").value();
  c.layers = layers;
  c.q_heads = c.q_heads / c.kv_heads * kv_heads;
  c.kv_heads = kv_heads;
  c.tokens = tokens;
  c.steps = steps;
  c.seed = seed;
  c.mean_segment = 64;
  TestModel m;
  m.dump = GenerateSynthetic(c).value();
  m.kv = HostKv::FromDump(&m.dump);
  m.spec.layers = layers;
  m.spec.kv_heads = kv_heads;
  m.spec.q_heads = m.dump.q_heads;
  m.spec.head_dim = m.dump.head_dim;
  m.spec.dtype = DType::kF16;
  m.spec.page_tokens = 16;
  m.spec.selector = selector;
  m.spec.layer_reuse = 1;
  m.spec.ttl = absl::Seconds(120);
  return m;
}

absl::Span<const float> Queries(const TestModel& m, int step, int layer) {
  return absl::MakeConstSpan(m.dump.query(step, layer, 0),
                             static_cast<size_t>(m.dump.q_heads) * m.dump.head_dim);
}

absl::Status ParseJson(const std::string& text) {
  google::protobuf::Value v;
  auto st = google::protobuf::util::JsonStringToMessage(text, &v);
  if (!st.ok())
    return absl::InvalidArgumentError(absl::StrCat("not JSON: ", st.ToString(), ": ", text));
  return absl::OkStatus();
}

}  // namespace icecache::testing
