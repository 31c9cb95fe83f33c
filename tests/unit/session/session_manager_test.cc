// Sessions, tenants, leases, quotas, eviction and admin verbs.
#include "server/session/session_manager.h"

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/session/session_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::Env;
using ::icecache::testing::GateClock;
using ::icecache::testing::IsOk;
using ::icecache::testing::MakeEnv;
using ::icecache::testing::MakeKv;
using ::icecache::testing::MakeQueries;
using ::icecache::testing::SmallConfig;
using ::icecache::testing::StatusIs;
using ::icecache::testing::UniqueName;
using ::testing::HasSubstr;

const Caller kAlice{"alice", 1000, false};
const Caller kBob{"bob", 1001, false};
const Caller kAdmin{"ops", 0, true};

TEST(SessionManagerTest, CreateValidatesOptions) {
  FakeClock clock;
  Env env = MakeEnv(&clock);
  SessionManagerOptions o;
  EXPECT_THAT(SessionManager::Create(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("pool")));
  o.pool = env.pool.get();
  o.buffers = env.buffers.get();
  o.high_watermark = 1.5;
  EXPECT_THAT(SessionManager::Create(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("high_watermark")));
  o.high_watermark = 0.9;
  o.default_ttl = absl::Hours(48);
  EXPECT_THAT(SessionManager::Create(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("default_ttl")));
  o.default_ttl = SessionManagerOptions{}.default_ttl;
  for (double w : {0.0, -1.0, 65.0, std::nan("")}) {
    o.quality.min_width = w;
    EXPECT_THAT(SessionManager::Create(o),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("min_width must be in")))
        << w;
  }
}

TEST(SessionManagerTest, ConfigValidationNamesTheField) {
  FakeClock clock;
  Env env = MakeEnv(&clock);
  struct Case {
    void (*mutate)(SessionConfig*);
    const char* field;
  };
  const Case cases[] = {
      {[](SessionConfig* c) { c->layers = 0; }, "layers must be in 1..512"},
      {[](SessionConfig* c) { c->layers = 513; }, "layers must be in 1..512"},
      {[](SessionConfig* c) { c->kv_heads = 0; }, "kv_heads must be in 1..256"},
      {[](SessionConfig* c) { c->kv_heads = 257; }, "kv_heads"},
      {[](SessionConfig* c) { c->q_heads = 3; }, "q_heads must be a multiple of kv_heads"},
      {[](SessionConfig* c) { c->q_heads = 0; }, "q_heads"},
      {[](SessionConfig* c) { c->head_dim = 0; }, "head_dim must be in 1..1024"},
      {[](SessionConfig* c) { c->head_dim = 1025; }, "head_dim"},
      {[](SessionConfig* c) { c->dtype = static_cast<DType>(9); }, "dtype"},
      {[](SessionConfig* c) { c->page_tokens = 0; }, "page_tokens must be in 1..256"},
      {[](SessionConfig* c) { c->page_tokens = 257; }, "page_tokens"},
      {[](SessionConfig* c) { c->layer_reuse = 0; }, "layer_reuse must be in 1..layers"},
      {[](SessionConfig* c) { c->layer_reuse = 5; }, "layer_reuse"},
      {[](SessionConfig* c) { c->ttl = absl::Milliseconds(10); }, "ttl"},
      {[](SessionConfig* c) { c->ttl = absl::Hours(25); }, "ttl"},
      {[](SessionConfig* c) { c->selector = static_cast<SelectorKind>(42); }, "selector"},
      {[](SessionConfig* c) { c->default_select.budget_tokens = -3; }, "budget_tokens"},
  };
  for (const Case& k : cases) {
    SessionConfig c = SmallConfig();
    k.mutate(&c);
    EXPECT_THAT(env.manager->CreateSession(kAlice, c),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(k.field)))
        << k.field;
  }
  EXPECT_THAT(env.manager->CreateSession(Caller{"bad tenant", 1, false}, SmallConfig()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("tenant")));
  EXPECT_TRUE(env.manager->ListSessions(kAdmin).empty());
}

TEST(SessionManagerTest, CreateGetListDrop) {
  FakeClock clock;
  Env env = MakeEnv(&clock);
  SessionConfig c = SmallConfig();
  c.ttl = absl::ZeroDuration();  // manager default
  auto a = env.manager->CreateSession(kAlice, c);
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ(a->id.size(), 32u);
  EXPECT_EQ(a->epoch, env.manager->epoch());
  EXPECT_NE(a->epoch, 0u);
  EXPECT_EQ(a->tenant, "alice");
  EXPECT_EQ(a->config.ttl, absl::Seconds(60));
  EXPECT_EQ(a->created, clock.Now());
  EXPECT_EQ(a->tokens, 0);
  auto b = env.manager->CreateSession(kAlice, SmallConfig());
  ASSERT_THAT(b, IsOk());
  EXPECT_NE(a->id, b->id);
  clock.Advance(absl::Seconds(3));
  ASSERT_THAT(env.manager->AppendKv(kAlice, a->id, 8, MakeKv(SmallConfig(), 0, 8)), IsOk());
  auto got = env.manager->GetSession(kAlice, a->id);
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->tokens, 8);
  EXPECT_EQ(got->last_use, clock.Now());
  EXPECT_EQ(got->expires, clock.Now() + absl::Seconds(60));
  // Positional layout: 8 tokens in pages of 4 -> 2 full pages per index.
  EXPECT_EQ(got->pages, 2u * 2 * 2);
  EXPECT_DOUBLE_EQ(got->page_fill, 1.0);
  EXPECT_EQ(env.manager->ListSessions(kAlice).size(), 2u);
  ASSERT_THAT(env.manager->DropSession(kAlice, a->id), IsOk());
  EXPECT_THAT(env.manager->GetSession(kAlice, a->id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(env.manager->DropSession(kAlice, a->id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(env.pool->used_bytes(), 0u);  // frames went back
  EXPECT_EQ(env.manager->ListSessions(kAlice).size(), 1u);
}

TEST(SessionManagerTest, TenantsAreIsolatedAndIdsDoNotLeak) {
  FakeClock clock;
  Env env = MakeEnv(&clock);
  const SessionConfig c = SmallConfig();
  auto a = env.manager->CreateSession(kAlice, c);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(env.manager->AppendKv(kAlice, a->id, 8, MakeKv(c, 0, 8)), IsOk());
  const std::string unknown = "00000000000000000000000000000000";
  auto same_answer = [&](const absl::Status& theirs, const absl::Status& unknown_status) {
    EXPECT_EQ(theirs.code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(unknown_status.code(), absl::StatusCode::kNotFound);
    // Identical text apart from the id itself.
    std::string t(theirs.message()), u(unknown_status.message());
    t.replace(t.find(a->id), a->id.size(), "ID");
    u.replace(u.find(unknown), unknown.size(), "ID");
    EXPECT_EQ(t, u);
  };
  same_answer(env.manager->GetSession(kBob, a->id).status(),
              env.manager->GetSession(kBob, unknown).status());
  same_answer(env.manager->DropSession(kBob, a->id), env.manager->DropSession(kBob, unknown));
  same_answer(env.manager->KeepAlive(kBob, a->id).status(),
              env.manager->KeepAlive(kBob, unknown).status());
  same_answer(env.manager->AppendKv(kBob, a->id, 1, MakeKv(c, 8, 1)).status(),
              env.manager->AppendKv(kBob, unknown, 1, MakeKv(c, 8, 1)).status());
  SelectRequest sel;
  sel.queries = MakeQueries(c, 1);
  same_answer(env.manager->SelectPages(kBob, a->id, sel).status(),
              env.manager->SelectPages(kBob, unknown, sel).status());
  FetchRequest f;
  f.pages = {{0}, {0}};
  same_answer(env.manager->FetchPages(kBob, a->id, f).status(),
              env.manager->FetchPages(kBob, unknown, f).status());
  EXPECT_TRUE(env.manager->ListSessions(kBob).empty());
  // Bob cannot fetch into alice's buffer either, even from his own session.
  auto shm = ShmFile::Create(UniqueName("iso"), 1 << 16);
  ASSERT_THAT(shm, IsOk());
  Caller alice_uid = kAlice;
  alice_uid.uid = getuid();
  auto buf = env.buffers->RegisterShm(alice_uid, shm->path(), shm->size(), clock.Now());
  ASSERT_THAT(buf, IsOk());
  auto b = env.manager->CreateSession(kBob, c);
  ASSERT_THAT(b, IsOk());
  ASSERT_THAT(env.manager->AppendKv(kBob, b->id, 8, MakeKv(c, 0, 8)), IsOk());
  f.buffer_id = buf->id;
  EXPECT_THAT(env.manager->FetchPages(kBob, b->id, f),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("buffer")));
  EXPECT_THAT(env.manager->FetchPages(kAlice, a->id, f), IsOk());
  // Alice's session is untouched; the admin sees both.
  EXPECT_EQ(env.manager->GetSession(kAlice, a->id)->tokens, 8);
  EXPECT_EQ(env.manager->ListSessions(kAdmin).size(), 2u);
  EXPECT_THAT(env.manager->GetSession(kAdmin, a->id), IsOk());
}

TEST(SessionManagerTest, LeasesExpireWithTheClock) {
  FakeClock clock;
  Env env = MakeEnv(&clock);
  SessionConfig c = SmallConfig();
  c.ttl = absl::Seconds(5);
  auto a = env.manager->CreateSession(kAlice, c);
  auto b = env.manager->CreateSession(kAlice, c);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  ASSERT_THAT(env.manager->AppendKv(kAlice, b->id, 8, MakeKv(c, 0, 8)), IsOk());
  clock.Advance(absl::Seconds(4));
  ASSERT_THAT(env.manager->KeepAlive(kAlice, a->id), IsOk());
  EXPECT_EQ(env.manager->ExpireLeases(clock.Now()), 0);
  clock.Advance(absl::Seconds(2));  // b idle 6 s, a idle 2 s
  EXPECT_EQ(env.manager->ExpireLeases(clock.Now()), 1);
  EXPECT_THAT(env.manager->GetSession(kAlice, b->id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(env.manager->GetSession(kAlice, a->id), IsOk());
  EXPECT_EQ(env.pool->used_bytes(), 0u);
  clock.Advance(absl::Seconds(10));
  EXPECT_EQ(env.manager->ExpireLeases(clock.Now()), 1);
  EXPECT_TRUE(env.manager->ListSessions(kAdmin).empty());
  auto stats = env.manager->Stats(kAdmin);
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->sessions_expired, 2u);
}

TEST(SessionManagerTest, ReaperThreadExpiresSessions) {
  FakeClock clock;
  Env env = MakeEnv(&clock, uint64_t{64} << 20, 0.9, absl::Milliseconds(2));
  SessionConfig c = SmallConfig();
  c.ttl = absl::Seconds(1);
  ASSERT_THAT(env.manager->CreateSession(kAlice, c), IsOk());
  clock.Advance(absl::Seconds(2));
  // Wait (bounded) for the reaper; this is a liveness check, not a timing one.
  for (int i = 0; i < 5000 && !env.manager->ListSessions(kAdmin).empty(); ++i) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  EXPECT_TRUE(env.manager->ListSessions(kAdmin).empty());
  env.manager.reset();  // stops and joins the reaper
}

TEST(SessionManagerTest, InFlightSessionsNeverExpire) {
  GateClock clock;
  Env env = MakeEnv(&clock);
  SessionConfig c = SmallConfig();
  c.ttl = absl::Seconds(5);
  auto a = env.manager->CreateSession(kAlice, c);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(env.manager->AppendKv(kAlice, a->id, 8, MakeKv(c, 0, 8)), IsOk());
  clock.Arm();
  std::thread t([&] {
    SelectRequest sel;
    sel.queries = MakeQueries(c, 1);
    EXPECT_THAT(env.manager->SelectPages(kAlice, a->id, sel), IsOk());
  });
  clock.WaitUntilBlocked();  // the select is in flight now
  EXPECT_EQ(env.manager->InFlight(), 1);
  clock.Advance(absl::Seconds(60));
  EXPECT_EQ(env.manager->ExpireLeases(clock.Now()), 0);
  clock.Release();
  t.join();
  EXPECT_EQ(env.manager->InFlight(), 0);
  clock.Advance(absl::Seconds(60));
  EXPECT_EQ(env.manager->ExpireLeases(clock.Now()), 1);
}

TEST(SessionManagerTest, QuotaAdmissionChangesNothing) {
  FakeClock clock;
  Env env = MakeEnv(&clock);
  const SessionConfig c = SmallConfig();
  const uint64_t stride = PagePool::StrideFor(2 * 4 * 16 * 2);  // 256 bytes
  auto a = env.manager->CreateSession(kAlice, c);
  ASSERT_THAT(a, IsOk());
  // 20 tokens = 5 pages per (layer, head) = 5 x 4 x 2 = 40 frames.
  ASSERT_THAT(env.manager->SetQuota(kAdmin, "alice", 39 * stride), IsOk());
  EXPECT_THAT(env.manager->AppendKv(kAlice, a->id, 20, MakeKv(c, 0, 20)),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("quota of tenant 'alice'")));
  EXPECT_EQ(env.manager->GetSession(kAlice, a->id)->tokens, 0);
  EXPECT_EQ(env.pool->used_bytes(), 0u);
  ASSERT_THAT(env.manager->SetQuota(kAdmin, "alice", 40 * stride), IsOk());
  ASSERT_THAT(env.manager->AppendKv(kAlice, a->id, 20, MakeKv(c, 0, 20)), IsOk());
  EXPECT_EQ(env.pool->TenantUsedBytes("alice"), 40 * stride);
  // A decode append that opens a new page is refused and changes nothing;
  // a later successful select still sees the old 20 tokens.
  EXPECT_THAT(env.manager->AppendKv(kAlice, a->id, 1, MakeKv(c, 20, 1)),
              StatusIs(absl::StatusCode::kResourceExhausted));
  auto got = env.manager->GetSession(kAlice, a->id);
  EXPECT_EQ(got->tokens, 20);
  EXPECT_EQ(env.pool->TenantUsedBytes("alice"), 40 * stride);
  // Lowering the quota below usage refuses new frames, not appends that fit
  // in open pages: 21 tokens open page 6; 22..24 fill it without new frames.
  ASSERT_THAT(env.manager->SetQuota(kAdmin, "alice", 48 * stride), IsOk());
  ASSERT_THAT(env.manager->AppendKv(kAlice, a->id, 1, MakeKv(c, 20, 1)), IsOk());
  ASSERT_THAT(env.manager->SetQuota(kAdmin, "alice", stride), IsOk());
  EXPECT_THAT(env.manager->AppendKv(kAlice, a->id, 3, MakeKv(c, 21, 3)), IsOk());
  EXPECT_THAT(env.manager->AppendKv(kAlice, a->id, 1, MakeKv(c, 24, 1)),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_EQ(env.manager->GetSession(kAlice, a->id)->tokens, 24);
  ASSERT_THAT(env.manager->SetQuota(kAdmin, "alice", 48 * stride), IsOk());
  SelectRequest sel;
  sel.queries = MakeQueries(c, 4);
  sel.params.budget_tokens = 100;
  auto s = env.manager->SelectPages(kAlice, a->id, sel);
  ASSERT_THAT(s, IsOk());
  EXPECT_EQ(s->heads[0].tokens(), 24);
  // Another tenant is unaffected; quotas never evict.
  auto b = env.manager->CreateSession(kBob, c);
  ASSERT_THAT(b, IsOk());
  ASSERT_THAT(env.manager->AppendKv(kBob, b->id, 20, MakeKv(c, 0, 20)), IsOk());
  EXPECT_THAT(env.manager->GetSession(kAlice, a->id), IsOk());
  auto stats = env.manager->Stats(kAdmin);
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->admissions_rejected, 3u);
}

TEST(SessionManagerTest, WatermarkEvictsIdleSessionsLruSkippingPinnedAndInFlight) {
  GateClock clock;
  // One session's append (256 tokens = 16 pages of 32 KiB) takes a quarter
  // of the 2 MiB pool; the watermark is at 1.5 MiB.
  SessionConfig c = SmallConfig();
  c.layers = 1;
  c.layer_reuse = 1;
  c.kv_heads = 1;
  c.q_heads = 1;
  c.head_dim = 256;
  c.page_tokens = 16;
  c.dtype = DType::kF32;  // frame = 2 x 16 x 256 x 4 = 32 KiB
  c.ttl = absl::Hours(1);
  Env env = MakeEnv(&clock, uint64_t{2} << 20, 0.75);
  const uint64_t frame = 32 << 10;
  std::vector<std::string> ids;
  for (int i = 0; i < 4; ++i) {
    auto s = env.manager->CreateSession(kAlice, c);
    ASSERT_THAT(s, IsOk());
    ids.push_back(s->id);
  }
  // Distinct times so the LRU order is ids[0] < ids[1] < ids[2].
  for (int i = 0; i < 3; ++i) {
    ASSERT_THAT(env.manager->AppendKv(kAlice, ids[i], 256, MakeKv(c, 0, 256)), IsOk());
    clock.Advance(absl::Seconds(1));
  }
  EXPECT_EQ(env.pool->used_bytes(), 48 * frame);  // exactly at the watermark
  EXPECT_EQ(env.manager->ListSessions(kAlice).size(), 4u);
  // ids[0] is the least recently used but pinned; ids[1] is in flight.
  ASSERT_THAT(env.manager->PinSession(kAdmin, ids[0], true), IsOk());
  clock.Arm();
  std::thread t([&] {
    SelectRequest sel;
    sel.queries = MakeQueries(c, 1);
    EXPECT_THAT(env.manager->SelectPages(kAlice, ids[1], sel), IsOk());
  });
  clock.WaitUntilBlocked();
  // ids[3]'s append crosses the watermark by one session's worth: the oldest
  // evictable session is ids[2] (ids[0] pinned, ids[1] in flight).
  ASSERT_THAT(env.manager->AppendKv(kAlice, ids[3], 256, MakeKv(c, 0, 256)), IsOk());
  EXPECT_THAT(env.manager->GetSession(kAlice, ids[2]), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(env.manager->GetSession(kAlice, ids[0]), IsOk());
  EXPECT_THAT(env.manager->GetSession(kAlice, ids[1]), IsOk());
  EXPECT_THAT(env.manager->GetSession(kAlice, ids[3]), IsOk());
  clock.Release();
  t.join();
  // ids[1] was last used by the select; ids[3] is kept alive later, so ids[1]
  // is now the least recently used evictable session.
  clock.Advance(absl::Seconds(1));
  ASSERT_THAT(env.manager->KeepAlive(kAlice, ids[3]), IsOk());
  auto e = env.manager->CreateSession(kAlice, c);
  ASSERT_THAT(e, IsOk());
  clock.Advance(absl::Seconds(1));
  ASSERT_THAT(env.manager->AppendKv(kAlice, e->id, 256, MakeKv(c, 0, 256)), IsOk());
  EXPECT_THAT(env.manager->GetSession(kAlice, ids[1]), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(env.manager->GetSession(kAlice, ids[3]), IsOk());
  EXPECT_THAT(env.manager->GetSession(kAlice, ids[0]), IsOk());
  EXPECT_EQ(env.pool->used_bytes(), 48 * frame);
  auto stats = env.manager->Stats(kAdmin);
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->sessions_evicted, 2u);
}

TEST(SessionManagerTest, CapacityRefusalEvictsNothing) {
  FakeClock clock;
  SessionConfig c = SmallConfig();
  c.layers = 1;
  c.layer_reuse = 1;
  c.kv_heads = 1;
  c.q_heads = 1;
  c.head_dim = 256;
  c.page_tokens = 16;
  c.dtype = DType::kF32;
  Env env = MakeEnv(&clock, uint64_t{2} << 20, 0.5);
  auto pinned = env.manager->CreateSession(kAlice, c);
  auto idle = env.manager->CreateSession(kAlice, c);
  auto big = env.manager->CreateSession(kAlice, c);
  ASSERT_THAT(pinned, IsOk());
  ASSERT_THAT(idle, IsOk());
  ASSERT_THAT(big, IsOk());
  ASSERT_THAT(env.manager->AppendKv(kAlice, pinned->id, 768, MakeKv(c, 0, 768)), IsOk());
  ASSERT_THAT(env.manager->PinSession(kAdmin, pinned->id, true), IsOk());
  ASSERT_THAT(env.manager->AppendKv(kAlice, idle->id, 256, MakeKv(c, 0, 256)), IsOk());
  // 1.5 MiB pinned + idle; 1 MiB more cannot fit even if `idle` goes.
  EXPECT_THAT(env.manager->AppendKv(kAlice, big->id, 512, MakeKv(c, 0, 512)),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("capacity")));
  EXPECT_THAT(env.manager->GetSession(kAlice, idle->id), IsOk());
  EXPECT_EQ(env.manager->GetSession(kAlice, big->id)->tokens, 0);
}

TEST(SessionManagerTest, AdminVerbsNeedTheAdminRole) {
  FakeClock clock;
  Env env = MakeEnv(&clock);
  auto a = env.manager->CreateSession(kAlice, SmallConfig());
  ASSERT_THAT(a, IsOk());
  EXPECT_THAT(env.manager->Stats(kAlice), StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(env.manager->ListTenants(kAlice), StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(env.manager->SetQuota(kAlice, "alice", 1),
              StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr("admin")));
  EXPECT_THAT(env.manager->EvictSession(kAlice, a->id),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(env.manager->PinSession(kAlice, a->id, true),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(env.manager->Drain(kAlice), StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(env.manager->SetQuota(kAdmin, "", 1), StatusIs(absl::StatusCode::kInvalidArgument));

  auto pinned = env.manager->PinSession(kAdmin, a->id, true);
  ASSERT_THAT(pinned, IsOk());
  EXPECT_TRUE(pinned->pinned);
  ASSERT_THAT(env.manager->SetQuota(kAdmin, "alice", 1 << 20), IsOk());
  ASSERT_THAT(env.manager->CreateSession(kBob, SmallConfig()), IsOk());
  auto tenants = env.manager->ListTenants(kAdmin);
  ASSERT_THAT(tenants, IsOk());
  ASSERT_EQ(tenants->size(), 2u);
  EXPECT_EQ((*tenants)[0].tenant, "alice");
  EXPECT_EQ((*tenants)[0].quota_bytes, 1u << 20);
  EXPECT_EQ((*tenants)[0].sessions, 1);
  EXPECT_EQ((*tenants)[1].tenant, "bob");
  EXPECT_EQ((*tenants)[1].quota_bytes, kUnlimitedQuota);

  // Evict works even on a pinned session (explicit admin act).
  ASSERT_THAT(env.manager->EvictSession(kAdmin, a->id), IsOk());
  EXPECT_THAT(env.manager->GetSession(kAlice, a->id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(env.manager->EvictSession(kAdmin, a->id), StatusIs(absl::StatusCode::kNotFound));

  auto in_flight = env.manager->Drain(kAdmin);
  ASSERT_THAT(in_flight, IsOk());
  EXPECT_EQ(*in_flight, 0);
  EXPECT_TRUE(env.manager->draining());
  EXPECT_THAT(env.manager->CreateSession(kAlice, SmallConfig()),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("draining")));
  auto stats = env.manager->Stats(kAdmin);
  ASSERT_THAT(stats, IsOk());
  EXPECT_TRUE(stats->draining);
  EXPECT_EQ(stats->sessions, 1);
  EXPECT_EQ(stats->sessions_created, 2u);
  EXPECT_EQ(stats->pages, 0u);
  EXPECT_EQ(stats->page_fill, 0.0);
  ASSERT_THAT(env.manager->Drain(kAdmin, false), IsOk());
  EXPECT_THAT(env.manager->CreateSession(kAlice, SmallConfig()), IsOk());
}

TEST(SessionManagerTest, PendingStopCountsAsDraining) {
  FakeClock clock;
  Env env = MakeEnv(&clock);
  std::atomic<bool> stop{false};
  SessionManagerOptions o;
  o.pool = env.pool.get();
  o.buffers = env.buffers.get();
  o.clock = &clock;
  o.reaper_interval = absl::ZeroDuration();
  o.stop_pending = [&stop] { return stop.load(); };
  auto m = SessionManager::Create(o);
  ASSERT_THAT(m, IsOk());
  auto a = (*m)->CreateSession(kAlice, SmallConfig());
  ASSERT_THAT(a, IsOk());
  stop.store(true);
  EXPECT_TRUE((*m)->draining());
  EXPECT_THAT((*m)->CreateSession(kAlice, SmallConfig()),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("draining")));
  auto stats = (*m)->Stats(kAdmin);
  ASSERT_THAT(stats, IsOk());
  EXPECT_TRUE(stats->draining);
  EXPECT_THAT((*m)->GetSession(kAlice, a->id), IsOk());  // existing sessions keep working
  // The daemon's own drain is remembered once: the second call reports it.
  EXPECT_FALSE((*m)->SetDraining(true));
  EXPECT_TRUE((*m)->SetDraining(true));
  stop.store(false);
  EXPECT_TRUE((*m)->draining());
}

TEST(SessionManagerTest, SessionCountLimits) {
  FakeClock clock;
  Env env = MakeEnv(&clock);
  SessionManagerOptions o;
  o.pool = env.pool.get();
  o.buffers = env.buffers.get();
  o.clock = &clock;
  o.max_sessions = 3;
  o.max_sessions_per_tenant = 2;
  o.reaper_interval = absl::ZeroDuration();
  auto m = SessionManager::Create(o);
  ASSERT_THAT(m, IsOk());
  ASSERT_THAT((*m)->CreateSession(kAlice, SmallConfig()), IsOk());
  ASSERT_THAT((*m)->CreateSession(kAlice, SmallConfig()), IsOk());
  EXPECT_THAT((*m)->CreateSession(kAlice, SmallConfig()),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("max_sessions_per_tenant")));
  ASSERT_THAT((*m)->CreateSession(kBob, SmallConfig()), IsOk());
  EXPECT_THAT((*m)->CreateSession(kBob, SmallConfig()),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("max_sessions")));
}

TEST(SessionManagerTest, DropWhileInFlightFreesFramesAfterwards) {
  GateClock clock;
  Env env = MakeEnv(&clock);
  const SessionConfig c = SmallConfig();
  auto a = env.manager->CreateSession(kAlice, c);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(env.manager->AppendKv(kAlice, a->id, 16, MakeKv(c, 0, 16)), IsOk());
  clock.Arm();
  std::thread t([&] {
    SelectRequest sel;
    sel.queries = MakeQueries(c, 1);
    EXPECT_THAT(env.manager->SelectPages(kAlice, a->id, sel), IsOk());
  });
  clock.WaitUntilBlocked();
  ASSERT_THAT(env.manager->DropSession(kAlice, a->id), IsOk());
  EXPECT_GT(env.pool->used_bytes(), 0u);  // still in use by the select
  clock.Release();
  t.join();
  EXPECT_EQ(env.pool->used_bytes(), 0u);
}

// A decode token into many trees runs its inserts and row writes on the
// decode lanes (two jobs: ApplyToIndexes, WriteRows), and gives the same
// pages and selections as the same appends run on oneTBB with no lanes.
TEST(SessionManagerTest, DecodeAppendsRunOnTheLanesAndMatchOneTbb) {
  SessionConfig c = SmallConfig(SelectorKind::kMdci);
  c.layers = 16;  // 16 layers x 2 KV heads: 32 trees, enough for a 1-token append's threads
  c.layer_reuse = 1;
  struct Run {
    Env env;
    std::string id;
  };
  auto make = [&](absl::Duration spin) {
    Run r;
    PagePoolOptions po;
    po.capacity_bytes = uint64_t{64} << 20;
    r.env.pool = std::move(PagePool::Create(po)).value();
    r.env.buffers = std::move(BufferRegistry::Create(BufferRegistryOptions())).value();
    SessionManagerOptions mo;
    mo.pool = r.env.pool.get();
    mo.buffers = r.env.buffers.get();
    mo.reaper_interval = absl::ZeroDuration();
    mo.build_threads = 2;
    mo.decode_threads = 2;  // lanes whatever the CPU count (one helper beside the caller)
    mo.decode_lane_spin = spin;
    r.env.manager = std::move(SessionManager::Create(mo)).value();
    auto info = r.env.manager->CreateSession(kAlice, c);
    EXPECT_THAT(info, IsOk());
    r.id = info->id;
    EXPECT_THAT(r.env.manager->AppendKv(kAlice, r.id, 96, MakeKv(c, 0, 96)), IsOk());
    return r;
  };
  Run lanes = make(absl::Milliseconds(1));
  Run tbb = make(absl::ZeroDuration());
  const SessionManager::DecodeLaneStats before = lanes.env.manager->decode_lane_stats();
  for (int64_t t = 96; t < 100; ++t) {
    ASSERT_THAT(lanes.env.manager->AppendKv(kAlice, lanes.id, 1, MakeKv(c, t, 1)), IsOk());
    ASSERT_THAT(tbb.env.manager->AppendKv(kAlice, tbb.id, 1, MakeKv(c, t, 1)), IsOk());
  }
  const SessionManager::DecodeLaneStats st = lanes.env.manager->decode_lane_stats();
  EXPECT_EQ(st.jobs + st.fallbacks - before.jobs - before.fallbacks, 4 * 2)
      << "two parallel steps per append";
  EXPECT_EQ(tbb.env.manager->decode_lane_stats().jobs, 0);
  auto a = lanes.env.manager->GetSession(kAlice, lanes.id);
  auto b = tbb.env.manager->GetSession(kAlice, tbb.id);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(a->tokens, 100);
  EXPECT_EQ(a->pages, b->pages);
  for (int layer : {0, 7, 15}) {
    SelectRequest sel;
    sel.layer = layer;
    sel.queries = MakeQueries(c, 11 + layer);
    sel.params.budget_tokens = 32;
    auto x = lanes.env.manager->SelectPages(kAlice, lanes.id, sel);
    auto y = tbb.env.manager->SelectPages(kAlice, tbb.id, sel);
    ASSERT_THAT(x, IsOk());
    ASSERT_THAT(y, IsOk());
    ASSERT_EQ(x->heads.size(), y->heads.size());
    for (size_t h = 0; h < x->heads.size(); ++h) {
      EXPECT_EQ(x->heads[h].pages, y->heads[h].pages) << "layer " << layer << " head " << h;
    }
  }
}

}  // namespace
}  // namespace icecache
