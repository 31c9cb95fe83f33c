// Session lifecycle through a real daemon: quota exhaustion, eviction at the
// watermark, TTL expiry, reclaiming a SIGKILLed client's session and
// buffers, and SIGTERM drain. Waiting for the daemon's reaper is done by
// polling with a generous deadline (never by asserting on elapsed time).
#include <signal.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <set>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;

// The lease of the probe's "hold" session (tenant_probe_main.cc): it renews
// every 200 ms, so only a stall of over 2.8 s could lapse it.
constexpr absl::Duration kProbeLease = absl::Seconds(3);

TEST(LifecycleTest, QuotaExhaustionIsResourceExhaustedAndChangesNothing) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(2, 2, 1024, 1);
  auto s = c.CreateSession(m.spec);
  ASSERT_THAT(s, IsOk());
  ASSERT_THAT(c.AppendKvInline(s->id, m.kv.Chunk(0, 256), 256), IsOk());
  auto before = c.GetSession(s->id);
  ASSERT_THAT(before, IsOk());
  ASSERT_GT(before->bytes, 0u);
  // Quota = what the session holds now: the next append cannot fit.
  auto t = c.SetQuota("alpha", before->bytes);
  ASSERT_THAT(t, IsOk());
  EXPECT_EQ(t->quota_bytes, before->bytes);
  auto stats_before = c.GetStats();
  ASSERT_THAT(stats_before, IsOk());

  EXPECT_THAT(c.AppendKvInline(s->id, m.kv.Chunk(256, 768), 512),
              StatusIs(absl::StatusCode::kResourceExhausted));
  auto after = c.GetSession(s->id);
  ASSERT_THAT(after, IsOk());
  EXPECT_EQ(after->tokens, before->tokens);
  EXPECT_EQ(after->bytes, before->bytes);
  EXPECT_EQ(after->pages, before->pages);
  auto stats_after = c.GetStats();
  ASSERT_THAT(stats_after, IsOk());
  EXPECT_EQ(stats_after->bytes_used, stats_before->bytes_used);
  EXPECT_GT(stats_after->admissions_rejected, stats_before->admissions_rejected);
  // A second session's first append is refused too; the session stays empty.
  auto s2 = c.CreateSession(m.spec);
  if (s2.ok()) {
    EXPECT_THAT(c.AppendKvInline(s2->id, m.kv.Chunk(0, 256), 256),
                StatusIs(absl::StatusCode::kResourceExhausted));
    auto e = c.GetSession(s2->id);
    ASSERT_THAT(e, IsOk());
    EXPECT_EQ(e->tokens, 0u);
    EXPECT_EQ(e->bytes, 0u);
  } else {
    EXPECT_THAT(s2, StatusIs(absl::StatusCode::kResourceExhausted));
  }
  // The session still serves what it has.
  SelectOptions opt;
  opt.budget_tokens = 32;
  EXPECT_THAT(c.SelectPages(s->id, 0, Queries(m, 0, 0), opt), IsOk());
  // Raising the quota admits the same append.
  ASSERT_THAT(c.SetQuota("alpha", 0), IsOk());
  auto grown = c.AppendKvInline(s->id, m.kv.Chunk(256, 768), 512);
  ASSERT_THAT(grown, IsOk());
  EXPECT_EQ(*grown, 768u);
}

TEST(LifecycleTest, SessionAndBufferLimitsAreResourceExhausted) {
  auto daemon = StartDaemon(
      "sessions { max_sessions_per_tenant: 2 }\nlimits { max_buffers_per_tenant: 2 }\n");
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(1, 1, 64, 1);
  auto a = c.CreateSession(m.spec);
  auto b = c.CreateSession(m.spec);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  EXPECT_THAT(c.CreateSession(m.spec), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(c.ListSessions().value().size(), 2u);
  ASSERT_THAT(c.DropSession(a->id), IsOk());
  EXPECT_THAT(c.CreateSession(m.spec), IsOk());

  auto b1 = c.CreateShmBuffer(4096);
  auto b2 = c.CreateShmBuffer(4096);
  ASSERT_THAT(b1, IsOk());
  ASSERT_THAT(b2, IsOk());
  EXPECT_THAT(c.CreateShmBuffer(4096), StatusIs(absl::StatusCode::kResourceExhausted));
  ASSERT_THAT(b1->Unregister(), IsOk());
  EXPECT_THAT(c.CreateShmBuffer(4096), IsOk());
}

// This process's buffer files (other tests may run beside it).
std::set<std::string> OwnShmFiles() {
  const std::string prefix = absl::StrCat("icecache-", ::getpid(), "-");
  std::set<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator("/dev/shm")) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) == 0) out.insert(name);
  }
  return out;
}

// CreateShmBuffer takes the file's memory at creation (posix_fallocate): a
// buffer /dev/shm cannot hold is refused there, with the size and what to
// do, not a SIGBUS at the first write; nothing is left in /dev/shm.
TEST(LifecycleTest, ABufferDevShmCannotHoldIsRefusedAtCreation) {
  auto daemon = StartDaemon("");
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  struct statvfs shm;
  ASSERT_EQ(::statvfs("/dev/shm", &shm), 0);
  const size_t too_big = uint64_t{shm.f_blocks} * shm.f_frsize + (uint64_t{1} << 30);
  const std::set<std::string> before = OwnShmFiles();
  EXPECT_THAT((*client)->CreateShmBuffer(too_big),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("/dev/shm has no room")));
  EXPECT_EQ(OwnShmFiles(), before);
  auto fine = (*client)->CreateShmBuffer(1 << 20);
  ASSERT_THAT(fine, IsOk());
  EXPECT_EQ(std::count(fine->data(), fine->data() + fine->size(), 0), 1 << 20);
}

TEST(LifecycleTest, IdleSessionsAreEvictedAtTheWatermarkPinnedOnesAreNot) {
  // 8 MiB pool, watermark at 50%. Each session below holds ~1 MiB.
  auto daemon = StartDaemon("pool { capacity_bytes: 8388608 high_watermark: 0.5 }\n");
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(2, 2, 1024, 1);
  auto one_mib_session = [&](bool pinned) -> absl::StatusOr<SessionInfo> {
    SessionSpec spec = m.spec;
    spec.pinned = pinned;
    ASSIGN_OR_RETURN(SessionInfo s, c.CreateSession(spec));
    // 2 layers x 2 heads x 1024 tokens x 64 dims x 2 (K,V) x 2 bytes = 1 MiB.
    RETURN_IF_ERROR(c.AppendKvInline(s.id, m.kv.Chunk(0, 1024), 1024).status());
    return c.GetSession(s.id);
  };
  auto pinned = one_mib_session(true);
  ASSERT_THAT(pinned, IsOk());
  EXPECT_TRUE(pinned->pinned);
  auto oldest = one_mib_session(false);
  ASSERT_THAT(oldest, IsOk());
  absl::SleepFor(absl::Milliseconds(20));  // distinct last-use times (LRU order)
  auto middle = one_mib_session(false);
  ASSERT_THAT(middle, IsOk());
  // Use `oldest` again so that `middle` becomes the least recently used.
  SelectOptions opt;
  opt.budget_tokens = 32;
  ASSERT_THAT(c.SelectPages(oldest->id, 0, Queries(m, 0, 0), opt), IsOk());
  absl::SleepFor(absl::Milliseconds(20));
  auto stats = c.GetStats();
  ASSERT_THAT(stats, IsOk());
  const uint64_t evictions_before = stats->evictions;
  // Keep adding sessions until the pool passes the watermark and evicts.
  std::vector<std::string> later;
  for (int i = 0; i < 6; ++i) {
    auto s = one_mib_session(false);
    if (!s.ok()) {
      EXPECT_THAT(s, StatusIs(absl::StatusCode::kResourceExhausted));
      break;
    }
    later.push_back(s->id);
    auto st = c.GetStats();
    ASSERT_THAT(st, IsOk());
    if (st->evictions > evictions_before) break;
  }
  ASSERT_TRUE(Eventually([&] {
    auto st = c.GetStats();
    return st.ok() && st->evictions > evictions_before;
  })) << "no eviction; daemon stderr:\n"
      << (*daemon)->Stderr();
  // The least recently used idle session went first; the pinned one stays.
  EXPECT_THAT(c.GetSession(middle->id), StatusIs(absl::StatusCode::kNotFound));
  auto p = c.GetSession(pinned->id);
  ASSERT_THAT(p, IsOk());
  EXPECT_EQ(p->tokens, 1024u);
  auto st = c.GetStats();
  ASSERT_THAT(st, IsOk());
  EXPECT_LE(st->bytes_used, st->capacity_bytes);
}

TEST(LifecycleTest, SessionsExpireAfterTheirTtlUnlessKeptAlive) {
  auto daemon = StartDaemon("", {}, "info");
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(1, 2, 256, 1);
  SessionSpec spec = m.spec;
  // The kept session is renewed every 200 ms, so only a stall of over
  // kTtl - 200 ms (under ctest -j, on a loaded machine) could lapse it.
  constexpr absl::Duration kTtl = absl::Seconds(4);
  spec.ttl = kTtl;
  auto kept = c.CreateSession(spec);
  auto lapsed = c.CreateSession(spec);
  ASSERT_THAT(kept, IsOk());
  ASSERT_THAT(lapsed, IsOk());
  ASSERT_THAT(c.AppendKvInline(lapsed->id, m.kv.Chunk(0, 256), 256), IsOk());
  EXPECT_GT(kept->expires, kept->created);
  // Keep one alive until the other has lapsed (and at least one TTL).
  const absl::Time start = absl::Now();
  bool lapsed_gone = false;
  while (!lapsed_gone || absl::Now() < start + kTtl) {
    auto e = c.KeepAlive({kept->id});
    ASSERT_THAT(e, IsOk());
    ASSERT_EQ(e->size(), 1u);
    lapsed_gone = c.GetSession(lapsed->id).status().code() == absl::StatusCode::kNotFound;
    ASSERT_LT(absl::Now(), start + Scaled(absl::Seconds(60)))
        << "the unrenewed session never expired";
    absl::SleepFor(absl::Milliseconds(200));
  }
  EXPECT_THAT(c.GetSession(kept->id), IsOk());
  auto st = c.GetStats();
  ASSERT_THAT(st, IsOk());
  EXPECT_GE(st->expirations, 1u);
  // An operator can see why a session went away.
  EXPECT_THAT((*daemon)->Stderr(),
              HasSubstr(absl::StrCat("msg=session_expired tenant=alpha id=", lapsed->id)));
  // Once no longer kept alive it expires too.
  EXPECT_TRUE(Eventually(
      [&] { return c.GetSession(kept->id).status().code() == absl::StatusCode::kNotFound; }));
  EXPECT_THAT(c.KeepAlive({kept->id}), StatusIs(absl::StatusCode::kNotFound));
}

TEST(LifecycleTest, KilledClientsSessionAndBuffersAreReclaimedAfterTheLease) {
  // The killed client's buffer is reclaimed after the buffer idle TTL: a short one here.
  auto daemon = StartDaemon(kShortBufferTtlConfig);
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& admin = **client;
  // The probe (a separate client process; another uid when root) creates a
  // session with a kProbeLease lease and a registered buffer, then keeps them alive.
  const int uid = ::geteuid() == 0 ? static_cast<int>(kOtherUid) : -1;
  auto probe = ChildProcess::Start({ProbePath(), "hold", (*daemon)->socket_path()}, uid);
  ASSERT_THAT(probe, IsOk());
  std::string session, path;
  while (true) {
    auto line = (*probe)->ReadLine(60);
    ASSERT_THAT(line, IsOk()) << (*daemon)->Stderr();
    std::vector<std::string> f = absl::StrSplit(*line, ' ');
    if (f[0] == "ready") break;
    if (f[0] == "check") {
      EXPECT_EQ(f[2], "OK") << *line;
    }
    if (f[0] == "session") session = f[1];
    if (f[0] == "path") path = f[1];
  }
  auto all = admin.ListSessions(true);
  ASSERT_THAT(all, IsOk());
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ((*all)[0].id, session);
  const std::string tenant = (*all)[0].tenant;
  auto busy = admin.GetStats();
  ASSERT_THAT(busy, IsOk());
  EXPECT_EQ(busy->buffers, 1u);
  EXPECT_GT(busy->bytes_used, 0u);
  // Still alive after more than a lease period while the client lives.
  absl::SleepFor(kProbeLease + absl::Milliseconds(500));
  EXPECT_EQ(admin.ListSessions(true).value().size(), 1u);

  (*probe)->Kill(SIGKILL);
  (*probe)->Wait();
  // The pool's bytes come back when the expired session's last holder lets
  // go, a moment after it leaves the session table (a TSan run once read
  // sessions 0, buffers 0 and 32768 bytes still used): wait for all three.
  EXPECT_TRUE(Eventually([&] {
    auto st = admin.GetStats();
    return st.ok() && st->sessions == 0 && st->buffers == 0 && st->bytes_used == 0;
  })) << "daemon stderr:\n"
      << (*daemon)->Stderr();
  auto st = admin.GetStats();
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->bytes_used, 0u);
  auto tenants = admin.ListTenants();
  ASSERT_THAT(tenants, IsOk());
  for (const auto& t : *tenants) {
    if (t.tenant != tenant) continue;
    EXPECT_EQ(t.sessions, 0u);
    EXPECT_EQ(t.buffers, 0u);
    EXPECT_EQ(t.bytes_used, 0u);
  }
  // The daemon keeps serving.
  EXPECT_THAT(admin.Health(), IsOk());
  if (!path.empty()) ::unlink(path.c_str());  // the killed client's file
}

TEST(LifecycleTest, SigtermDrainsInFlightFinishesNewRefusedExitZero) {
  // The open stream must still be served after SIGTERM: a drain timeout
  // long enough that a loaded machine (or a sanitizer build) cannot run it
  // out between the signal and the step. That the timeout ends a drain is
  // FaultTest.SigtermWithAStreamTheClientNeverClosesExitsWithinTheDrainTimeout.
  auto daemon = StartDaemon("", {"--drain_timeout=30s"});
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  // In flight #1: a decode stream, open before SIGTERM, used after it.
  TestModel small = MakeModel(1, 2, 256, 2);
  auto streamed = c.CreateSession(small.spec);
  ASSERT_THAT(streamed, IsOk());
  ASSERT_THAT(c.AppendKvInline(streamed->id, small.kv.Chunk(0, 256), 256), IsOk());
  auto out = c.CreateShmBuffer(1 << 20);
  ASSERT_THAT(out, IsOk());
  SelectOptions opt;
  opt.budget_tokens = 32;
  opt.want_positions = true;
  ASSERT_THAT(c.DecodeStep(streamed->id, 0, Queries(small, 0, 0), out->buffer_id(), 0, opt),
              IsOk());

  // In flight #2: a big prefill (mdci bulk build); attempts grow until
  // SIGTERM lands while it runs. Sizes that do not fit /dev/shm (64 MiB in
  // a default container) are skipped.
  struct statvfs shm;
  const uint64_t shm_free =
      ::statvfs("/dev/shm", &shm) == 0 ? uint64_t{shm.f_bavail} * shm.f_frsize : 0;
  bool observed = false;
  absl::Status inflight_result;
  // Outlives the loop: the thread of the attempt SIGTERM caught is still
  // running after the loop ends (ASan: stack-use-after-scope when this was
  // declared inside it).
  std::atomic<bool> done{false};
  std::thread inflight;
  std::unique_ptr<ShmBuffer> big_buf;
  for (int64_t tokens : {16384, 32768, 65536}) {
    TestModel m = MakeModel(2, 4, tokens, 1, SelectorType::kMdci);
    const size_t bytes = m.kv.ChunkBytes(0, tokens);
    if (2 * bytes > shm_free) break;
    auto s = c.CreateSession(m.spec);
    ASSERT_THAT(s, IsOk());
    auto buf = c.CreateShmBuffer(bytes);
    ASSERT_THAT(buf, IsOk());
    m.kv.FillChunk(0, tokens, buf->data());
    big_buf = std::make_unique<ShmBuffer>(*std::move(buf));
    done = false;
    std::thread t([&c, &inflight_result, &done, &big_buf, id = s->id, bytes, tokens] {
      inflight_result = c.AppendKv(id, *big_buf, 0, bytes, tokens).status();
      done = true;
    });
    while (!done) {
      auto info = c.GetSession(s->id);
      if (info.ok() && info->in_flight > 0) {
        EXPECT_THAT((*daemon)->Signal(SIGTERM), IsOk());
        observed = true;
        break;
      }
      absl::SleepFor(absl::Milliseconds(1));
    }
    if (observed) {
      inflight = std::move(t);
      break;
    }
    t.join();
    ASSERT_THAT(inflight_result, IsOk());
    ASSERT_THAT(c.DropSession(s->id), IsOk());
    big_buf.reset();
  }
  if (!observed) {
    std::cerr << "note: no prefill was caught in flight; draining with the stream only\n";
    ASSERT_THAT((*daemon)->Signal(SIGTERM), IsOk());
  }
  // Once draining is visible (health NOT_SERVING, or the listener gone),
  // new sessions are refused with UNAVAILABLE.
  EXPECT_TRUE(Eventually([&] {
    auto h = c.Health();
    return !h.ok() || !*h;
  }));
  EXPECT_THAT(c.CreateSession(small.spec), StatusIs(absl::StatusCode::kUnavailable));
  // The open stream still serves, and closes cleanly.
  auto step = c.DecodeStep(streamed->id, 0, Queries(small, 1, 0), out->buffer_id(), 0, opt);
  ASSERT_THAT(step, IsOk()) << (*daemon)->Stderr();
  EXPECT_THAT(VerifyFetch(small.kv, 256, step->layout, step->heads, out->data(), out->size()),
              IsOk());
  EXPECT_THAT(c.CloseDecodeStream(streamed->id), IsOk());
  if (inflight.joinable()) {
    inflight.join();
    // It finishes, or, when it outlives the drain timeout (30 s here; a
    // loaded machine), is cancelled with UNAVAILABLE. Never anything else.
    if (!inflight_result.ok()) {
      EXPECT_THAT(inflight_result, StatusIs(absl::StatusCode::kUnavailable))
          << "an in-flight append ends OK or UNAVAILABLE (drain timeout)";
    }
  }
  auto status = (*daemon)->Wait(Scaled(absl::Seconds(60)));
  ASSERT_THAT(status, IsOk());
  EXPECT_TRUE(WIFEXITED(*status)) << "wait status " << *status;
  EXPECT_EQ(WEXITSTATUS(*status), 0) << (*daemon)->Stderr();
}

// A daemon started by DaemonProcess goes with the process that started it:
// a test or benchmark killed by a timeout leaves no daemon behind. The child
// of this fork starts one, reports its pid and dies without stopping it.
// (ctest runs every test of this binary in its own process, so the fork
// happens before any thread of this test exists.)
TEST(LifecycleTest, DaemonExitsWhenTheProcessThatStartedItDies) {
  struct Started {
    pid_t pid = -1;
    char temp_dir[128];
  };
  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(pipe_fds[0]);
    auto d = DaemonProcess::Start(TestDaemonOptions());
    Started started{};
    if (d.ok()) {
      started.pid = (*d)->pid();
      std::snprintf(started.temp_dir, sizeof(started.temp_dir), "%s", (*d)->temp_dir().c_str());
    }
    (void)!::write(pipe_fds[1], &started, sizeof(started));
    if (d.ok()) (void)d->release();  // no destructor: nobody stops it
    _exit(0);
  }
  ::close(pipe_fds[1]);
  Started started{};
  ASSERT_EQ(::read(pipe_fds[0], &started, sizeof(started)), static_cast<ssize_t>(sizeof(started)));
  ::close(pipe_fds[0]);
  const pid_t daemon_pid = started.pid;
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_GT(daemon_pid, 0) << "the child could not start a daemon";
  // Gone, or a zombie its new parent has not reaped yet (a container's init
  // may never reap): either way it exited.
  const std::string stat_path = absl::StrCat("/proc/", daemon_pid, "/stat");
  EXPECT_TRUE(Eventually([&] {
    std::ifstream in(stat_path);
    std::string line;
    if (!std::getline(in, line)) return true;
    const size_t paren = line.rfind(')');
    return paren != std::string::npos && paren + 2 < line.size() && line[paren + 2] == 'Z';
  })) << "icecached "
      << daemon_pid << " still runs after its parent died";
  if (::kill(daemon_pid, 0) == 0) ::kill(daemon_pid, SIGKILL);  // never leave it behind
  std::error_code ec;
  std::filesystem::remove_all(started.temp_dir, ec);  // what ~DaemonProcess would remove
}

}  // namespace
}  // namespace icecache::testing
