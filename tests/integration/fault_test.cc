// The fault matrix (docs/operations.md, "Faults and what clients see"),
// each case against a real daemon: SIGKILL and restart on the same socket,
// SIGTERM with a stream the client never closes, a client killed mid-stream,
// a client that stops reading its stream, a shm file deleted or truncated
// under a live stream, and a pool full of pinned sessions. In every case everyone
// else is served, nothing is served stale, and what the faulty client held
// is reclaimed. Waits poll with generous deadlines; nothing asserts speed.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <functional>
#include <iostream>
#include <thread>

#include "absl/strings/str_split.h"
#include "client/client_internal.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;
namespace v1 = ::icecache::v1;
using Code = absl::StatusCode;

// A session of `m` with all its tokens appended.
absl::StatusOr<SessionInfo> FilledSession(Client& c, const TestModel& m) {
  ASSIGN_OR_RETURN(SessionInfo s, c.CreateSession(m.spec));
  RETURN_IF_ERROR(c.AppendKvInline(s.id, m.kv.Chunk(0, m.kv.tokens()), m.kv.tokens()).status());
  return s;
}

// One decode step on layer 0 of `session` into `out`, every fetched byte
// checked against `m`.
absl::Status CheckedStep(Client& c, const TestModel& m, const std::string& session,
                         const ShmBuffer& out, int step = 0) {
  SelectOptions opt;
  opt.budget_tokens = 64;
  opt.want_positions = true;
  ASSIGN_OR_RETURN(StepResult r,
                   c.DecodeStep(session, 0, Queries(m, step, 0), out.buffer_id(), 0, opt));
  ASSIGN_OR_RETURN(int64_t rows,
                   VerifyFetch(m.kv, m.kv.tokens(), r.layout, r.heads, out.data(), out.size()));
  if (rows <= 0) return absl::InternalError("the step fetched no rows");
  return absl::OkStatus();
}

// Reads the probe's lines up to "ready" (or "streaming" when `until` says
// so); fills session/path from its "session"/"path" lines.
absl::Status ReadProbe(ChildProcess& probe, const std::string& until, std::string* session,
                       std::string* path) {
  while (true) {
    ASSIGN_OR_RETURN(std::string line, probe.ReadLine(60));
    std::vector<std::string> f = absl::StrSplit(line, ' ');
    if (f[0] == until) return absl::OkStatus();
    if (f[0] == "check" && f.size() == 3 && f[2] != "OK") {
      return absl::InternalError(absl::StrCat("probe: ", line));
    }
    if (f[0] == "session") *session = f[1];
    if (f[0] == "path") *path = f[1];
  }
}

TEST(FaultTest, SigkillAndRestartGiveNotFoundAndANewEpochNeverOldData) {
  auto first = StartDaemon();
  ASSERT_THAT(first, IsOk());
  auto client = Connect(**first);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(2, 2, 512, 2);
  auto s = FilledSession(c, m);
  ASSERT_THAT(s, IsOk());
  auto out = c.CreateShmBuffer(1 << 20);
  ASSERT_THAT(out, IsOk());
  ASSERT_THAT(CheckedStep(c, m, s->id, *out), IsOk());
  auto before = c.GetStats();
  ASSERT_THAT(before, IsOk());

  ASSERT_THAT((*first)->Signal(SIGKILL), IsOk());
  ASSERT_THAT((*first)->Wait(Scaled(absl::Seconds(30))), IsOk());
  // Down: calls fail UNAVAILABLE, the open stream included.
  EXPECT_THAT(c.GetSession(s->id), StatusIs(Code::kUnavailable));
  EXPECT_THAT(CheckedStep(c, m, s->id, *out, 1), StatusIs(Code::kUnavailable));

  // A supervisor restarts it on the same socket (the stale file is removed).
  DaemonOptions o = TestDaemonOptions("", {}, "info");
  o.socket_path = (*first)->socket_path();
  auto second = DaemonProcess::Start(o);
  ASSERT_THAT(second, IsOk());
  EXPECT_THAT((*second)->Stderr(), HasSubstr("removed_stale_socket"));
  // The channel reconnects (after its backoff from the failed calls above).
  ASSERT_TRUE(Eventually([&] { return c.GetStats().ok(); })) << (*second)->Stderr();
  auto after = c.GetStats();
  ASSERT_THAT(after, IsOk());
  EXPECT_NE(after->epoch, before->epoch) << "a restarted daemon has a new epoch";
  EXPECT_EQ(after->sessions, 0u);
  EXPECT_EQ(after->bytes_used, 0u);
  // The old names mean nothing now: NOT_FOUND, never the old (or other) data.
  EXPECT_THAT(c.GetSession(s->id), StatusIs(Code::kNotFound));
  EXPECT_THAT(c.AppendKvInline(s->id, m.kv.Chunk(0, 16), 16), StatusIs(Code::kNotFound));
  const absl::Status stale = CheckedStep(c, m, s->id, *out, 1);
  EXPECT_TRUE(stale.code() == Code::kNotFound || stale.code() == Code::kUnavailable) << stale;
  if (stale.code() == Code::kUnavailable) {
    // The client's broken stream answered; the next step reaches the daemon.
    EXPECT_THAT(CheckedStep(c, m, s->id, *out, 1), StatusIs(Code::kNotFound));
  }
  EXPECT_THAT(
      c.FetchPages(s->id, 0, std::vector<std::vector<uint32_t>>{{0}, {0}}, out->buffer_id(), 0),
      StatusIs(Code::kNotFound));
  // The client re-creates what it had and continues, byte-identical.
  auto again = FilledSession(c, m);
  ASSERT_THAT(again, IsOk());
  EXPECT_NE(again->id, s->id);
  EXPECT_EQ(again->epoch, after->epoch);
  auto out2 = c.CreateShmBuffer(1 << 20);
  ASSERT_THAT(out2, IsOk());
  for (int step = 0; step < 2; ++step) {
    EXPECT_THAT(CheckedStep(c, m, again->id, *out2, step), IsOk()) << (*second)->Stderr();
  }
}

TEST(FaultTest, SigtermWithAStreamTheClientNeverClosesExitsWithinTheDrainTimeout) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(1, 2, 256, 1);
  auto s = FilledSession(c, m);
  ASSERT_THAT(s, IsOk());
  auto out = c.CreateShmBuffer(1 << 20);
  ASSERT_THAT(out, IsOk());
  // The stream stays open and idle: the client never closes it.
  ASSERT_THAT(CheckedStep(c, m, s->id, *out), IsOk());
  const absl::Time sent = absl::Now();
  ASSERT_THAT((*daemon)->Signal(SIGTERM), IsOk());
  auto status = (*daemon)->Wait(Scaled(absl::Seconds(60)));
  ASSERT_THAT(status, IsOk());
  // --drain_timeout=5s (harness), plus slack for a loaded machine: an idle
  // stream must not hold the daemon past its drain timeout.
  EXPECT_LT(absl::Now() - sent, absl::Seconds(5) + Scaled(absl::Seconds(20)))
      << (*daemon)->Stderr();
  EXPECT_TRUE(WIFEXITED(*status)) << "wait status " << *status;
  EXPECT_EQ(WEXITSTATUS(*status), 0) << (*daemon)->Stderr();
  // The stream's next step fails UNAVAILABLE, nothing else.
  EXPECT_THAT(CheckedStep(c, m, s->id, *out), StatusIs(Code::kUnavailable));
}

TEST(FaultTest, ClientKilledMidStreamIsReclaimedAndOthersAreServed) {
  // The killed client's buffer is reclaimed after the buffer idle TTL: a short one here.
  auto daemon = StartDaemon(kShortBufferTtlConfig);
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(1, 2, 256, 2);
  auto mine = FilledSession(c, m);
  ASSERT_THAT(mine, IsOk());
  auto out = c.CreateShmBuffer(1 << 20);
  ASSERT_THAT(out, IsOk());
  auto baseline = c.GetStats();
  ASSERT_THAT(baseline, IsOk());

  const int uid = ::geteuid() == 0 ? static_cast<int>(kOtherUid) : -1;
  auto probe = ChildProcess::Start({ProbePath(), "stream", (*daemon)->socket_path()}, uid);
  ASSERT_THAT(probe, IsOk());
  std::string session, path;
  ASSERT_THAT(ReadProbe(**probe, "streaming", &session, &path), IsOk()) << (*daemon)->Stderr();
  // Served while the probe streams, and after it is killed mid-stream.
  ASSERT_THAT(CheckedStep(c, m, mine->id, *out), IsOk());
  absl::SleepFor(absl::Milliseconds(100));
  (*probe)->Kill(SIGKILL);
  (*probe)->Wait();
  EXPECT_THAT(CheckedStep(c, m, mine->id, *out, 1), IsOk());
  // The killed client's tenant ends up holding nothing (its stream ended,
  // its session and buffer were reclaimed after its lease).
  auto holds_nothing = [&] {
    auto all = c.ListSessions(true);
    auto tenants = c.ListTenants();
    auto st = c.GetStats();
    if (!all.ok() || !tenants.ok() || !st.ok() || st->in_flight != 0) return false;
    for (const SessionInfo& s : *all) {
      if (s.id == session) return false;
    }
    for (const TenantInfo& t : *tenants) {
      if (t.tenant != mine->tenant && (t.sessions || t.buffers || t.bytes_used)) return false;
    }
    return true;
  };
  EXPECT_TRUE(Eventually(holds_nothing)) << "daemon stderr:\n" << (*daemon)->Stderr();
  auto st = c.GetStats();
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->bytes_used, baseline->bytes_used);
  EXPECT_EQ(st->sessions, 1u);
  // Ours is still served (into a fresh buffer: an idle one is reclaimed
  // after buffer_idle_ttl_ms, 3 s here).
  auto out2 = c.CreateShmBuffer(1 << 20);
  ASSERT_THAT(out2, IsOk());
  EXPECT_THAT(CheckedStep(c, m, mine->id, *out2, 0), IsOk());
  if (!path.empty()) ::unlink(path.c_str());
}

TEST(FaultTest, ClientThatStopsReadingItsStreamHoldsOnlyItself) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(1, 2, 256, 1);
  auto slow = FilledSession(c, m);
  auto other = FilledSession(c, m);
  ASSERT_THAT(slow, IsOk());
  ASSERT_THAT(other, IsOk());
  auto slow_out = c.CreateShmBuffer(1 << 20);
  auto out = c.CreateShmBuffer(1 << 20);
  ASSERT_THAT(slow_out, IsOk());
  ASSERT_THAT(out, IsOk());
  const int64_t rss_before = ProcessRssBytes((*daemon)->pid()).value_or(0);

  // Raw stream: write steps with positions as fast as possible, never read.
  Client::Impl& raw = *c.impl();
  auto ctx = raw.NewContext();
  auto stream = raw.kv->DecodeStep(ctx.get());
  v1::DecodeStepRequest req;
  req.set_session_id(slow->id);
  req.set_layer(0);
  auto q = Queries(m, 0, 0);
  req.set_queries(std::string(reinterpret_cast<const char*>(q.data()), q.size() * sizeof(float)));
  req.mutable_params()->set_budget_tokens(256);
  req.mutable_params()->set_want_positions(true);
  req.set_buffer_id(slow_out->buffer_id());
  std::atomic<int64_t> written{0};
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    while (!stop && written < 200000 && stream->Write(req)) ++written;
  });
  // Wait until the writes stall (flow control reached the writer) or a cap.
  int64_t last = -1;
  while (written < 200000) {
    absl::SleepFor(absl::Milliseconds(500));
    if (written == last) break;
    last = written;
  }
  std::cerr << "stalled after " << written << " unread steps\n";
  // Everyone else is served meanwhile, byte for byte.
  EXPECT_THAT(CheckedStep(c, m, other->id, *out), IsOk()) << (*daemon)->Stderr();
  EXPECT_THAT(c.GetStats(), IsOk());
  // The unread answers are bounded by flow control, not kept in the daemon.
  const int64_t rss_stalled = ProcessRssBytes((*daemon)->pid()).value_or(0);
  EXPECT_LT(rss_stalled - rss_before, int64_t{256} << 20) << written << " steps written, none read";
  // The client goes away: its call ends, its session is usable again.
  stop = true;
  ctx->TryCancel();
  writer.join();
  (void)stream->Finish();
  EXPECT_TRUE(Eventually([&] {
    auto st = c.GetStats();
    return st.ok() && st->in_flight == 0;
  })) << (*daemon)->Stderr();
  EXPECT_THAT(CheckedStep(c, m, slow->id, *slow_out), IsOk());
  EXPECT_THAT(c.DropSession(slow->id), IsOk());
}

TEST(FaultTest, ShmFileDeletedOrTruncatedUnderALiveStreamIsAStatusNotACrash) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(1, 2, 512, 2);
  auto s = FilledSession(c, m);
  auto t = FilledSession(c, m);
  ASSERT_THAT(s, IsOk());
  ASSERT_THAT(t, IsOk());
  auto victim = c.CreateShmBuffer(1 << 20);
  auto out = c.CreateShmBuffer(1 << 20);
  ASSERT_THAT(victim, IsOk());
  ASSERT_THAT(out, IsOk());
  // Deleted while registered: the mapping stays valid; steps still land.
  const int fd = ::open(victim->path().c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::unlink(victim->path().c_str()), 0);
  EXPECT_THAT(CheckedStep(c, m, s->id, *victim), IsOk());
  // Truncated and restored by another thread while steps fetch into it:
  // each step is OK or FAILED_PRECONDITION (the size check or the SIGBUS
  // guard), never a crash. Its bytes are not read here: this process would
  // take the SIGBUS itself.
  std::atomic<bool> stop{false};
  std::thread shrinker([&] {
    while (!stop) {
      (void)::ftruncate(fd, 0);
      absl::SleepFor(absl::Microseconds(200));
      (void)::ftruncate(fd, 1 << 20);
      absl::SleepFor(absl::Microseconds(200));
    }
  });
  SelectOptions opt;
  opt.budget_tokens = 64;
  int ok = 0, refused = 0;
  for (int i = 0; i < 300; ++i) {
    const absl::Status st =
        c.DecodeStep(s->id, 0, Queries(m, i % 2, 0), victim->buffer_id(), 0, opt).status();
    if (st.ok()) {
      ++ok;
    } else if (st.code() == Code::kFailedPrecondition) {
      ++refused;
    } else {
      ADD_FAILURE() << "step " << i << ": " << st;
    }
  }
  stop = true;
  shrinker.join();
  ::close(fd);
  std::cerr << "truncation race: " << ok << " steps served, " << refused << " refused\n";
  // Everyone else, and the same session into a good buffer, still served.
  EXPECT_THAT(CheckedStep(c, m, t->id, *out), IsOk());
  EXPECT_THAT(CheckedStep(c, m, s->id, *out), IsOk());
  // The deleted file's buffer is reclaimed when unregistered.
  auto st = c.GetStats();
  ASSERT_THAT(st, IsOk());
  ASSERT_THAT(victim->Unregister(), IsOk());
  auto after = c.GetStats();
  ASSERT_THAT(after, IsOk());
  EXPECT_EQ(after->buffers + 1, st->buffers);
  ASSERT_TRUE((*daemon)->running()) << (*daemon)->Stderr();
}

TEST(FaultTest, APoolFullOfPinnedSessionsRefusesAdmissionsAndEvictsNothing) {
  // 8 MiB pool; each session holds 1 MiB (2 layers x 2 heads x 1024 tokens x
  // 64 dims x K,V x 2 bytes).
  auto daemon = StartDaemon("pool { capacity_bytes: 8388608 high_watermark: 0.5 }\n");
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(2, 2, 1024, 1);
  std::vector<SessionInfo> pinned;
  absl::Status refused;
  for (int i = 0; i < 16 && refused.ok(); ++i) {
    SessionSpec spec = m.spec;
    spec.pinned = true;
    auto s = c.CreateSession(spec);
    if (!s.ok()) {
      refused = s.status();
      break;
    }
    refused = c.AppendKvInline(s->id, m.kv.Chunk(0, 1024), 1024).status();
    pinned.push_back(*s);
  }
  EXPECT_THAT(refused, StatusIs(Code::kResourceExhausted));
  EXPECT_GE(pinned.size(), 4u);
  auto st = c.GetStats();
  ASSERT_THAT(st, IsOk());
  EXPECT_EQ(st->evictions, 0u);
  EXPECT_LE(st->bytes_used, st->capacity_bytes);
  EXPECT_GT(st->admissions_rejected, 0u);
  // Every pinned session that was admitted whole still serves exact bytes.
  auto out = c.CreateShmBuffer(1 << 20);
  ASSERT_THAT(out, IsOk());
  for (const SessionInfo& s : pinned) {
    auto info = c.GetSession(s.id);
    ASSERT_THAT(info, IsOk());
    if (info->tokens == 1024) {
      EXPECT_THAT(CheckedStep(c, m, s.id, *out), IsOk());
    }
  }
  // Dropping them returns the pool to empty.
  for (const SessionInfo& s : pinned) EXPECT_THAT(c.DropSession(s.id), IsOk());
  auto empty = c.GetStats();
  ASSERT_THAT(empty, IsOk());
  EXPECT_EQ(empty->bytes_used, 0u);
}

}  // namespace
}  // namespace icecache::testing
