// Two tenants on one daemon: uid 0 is "alpha", uid 65534 ("nobody") is
// "beta" through the daemon's uid -> tenant map (SO_PEERCRED on the Unix
// socket). The beta client is a separate process started with
// fork + setuid, so the daemon sees a real second uid.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <map>

#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;

SessionSpec ProbeShape() {
  SessionSpec s;
  s.layers = 1;
  s.kv_heads = 2;
  s.q_heads = 4;
  s.head_dim = 64;
  s.dtype = DType::kF16;
  s.page_tokens = 16;
  s.selector = SelectorType::kExact;
  s.ttl = absl::Seconds(60);
  return s;
}

TEST(TenancyTest, TwoTenantsCannotSeeDropOrReadEachOthersSessionsOrBuffers) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run the second tenant as uid 65534";
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto alpha = Connect(**daemon);
  ASSERT_THAT(alpha, IsOk());
  Client& a = **alpha;

  const SessionSpec spec = ProbeShape();
  auto session = a.CreateSession(spec);
  ASSERT_THAT(session, IsOk());
  EXPECT_EQ(session->tenant, "alpha");
  std::vector<uint8_t> kv(spec.ChunkBytes(64));
  for (size_t i = 0; i < kv.size() / 2; ++i) {
    reinterpret_cast<uint16_t*>(kv.data())[i] = FloatToHalf(static_cast<float>(i % 97) / 97.f);
  }
  ASSERT_THAT(a.AppendKvInline(session->id, kv, 64), IsOk());
  auto buffer = a.CreateShmBuffer(1 << 20);
  ASSERT_THAT(buffer, IsOk());
  std::memset(buffer->data(), 0xAB, buffer->size());

  auto probe = ChildProcess::Start({ProbePath(), "isolation", (*daemon)->socket_path(), session->id,
                                    buffer->buffer_id(), buffer->path()},
                                   kOtherUid);
  ASSERT_THAT(probe, IsOk());
  std::map<std::string, std::string> checks;
  std::string beta_session, beta_buffer, beta_path, visible;
  while (true) {
    auto line = (*probe)->ReadLine(60);
    ASSERT_THAT(line, IsOk()) << "daemon stderr:\n" << (*daemon)->Stderr();
    std::vector<std::string> f = absl::StrSplit(*line, ' ');
    if (f[0] == "ready") break;
    ASSERT_EQ(f.size(), f[0] == "check" ? 3u : 2u) << *line;
    if (f[0] == "check") checks[f[1]] = f[2];
    if (f[0] == "session") beta_session = f[1];
    if (f[0] == "buffer") beta_buffer = f[1];
    if (f[0] == "path") beta_path = f[1];
    if (f[0] == "visible_sessions") visible = f[1];
  }
  // Beta cannot touch alpha's session or buffer: unknown ids, so ids do not leak.
  for (const char* name : {"get_session", "keepalive", "select_pages", "fetch_pages", "decode_step",
                           "drop_session", "unregister_buffer", "append_from_other_buffer",
                           "fetch_into_other_buffer", "decode_into_other_buffer"}) {
    EXPECT_EQ(checks[name], "NOT_FOUND") << name;
  }
  // Admin verbs and the all-tenant listing need the admin role.
  for (const char* name : {"pin_session", "evict_session", "list_all_tenants", "get_stats",
                           "list_tenants", "set_quota"}) {
    EXPECT_EQ(checks[name], "PERMISSION_DENIED") << name;
  }
  // Alpha's file in /dev/shm is owned by uid 0, not by beta.
  EXPECT_EQ(checks["register_other_file"], "PERMISSION_DENIED");
  EXPECT_EQ(visible, "0");
  for (const char* name :
       {"list_own", "create_own_session", "append_own", "drop_own_session", "create_own_buffer"}) {
    EXPECT_EQ(checks[name], "OK") << name;
  }
  ASSERT_FALSE(beta_session.empty());
  ASSERT_FALSE(beta_buffer.empty());

  // Alpha's session and buffer are intact: same tokens, same bytes.
  auto info = a.GetSession(session->id);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->tokens, 64u);
  EXPECT_FALSE(info->pinned);
  for (size_t i = 0; i < buffer->size(); ++i) ASSERT_EQ(buffer->data()[i], 0xAB) << "byte " << i;

  // And the other way round: alpha (not using its admin verbs) cannot see,
  // drop or use beta's session or buffer.
  EXPECT_THAT(a.GetSession(beta_session), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(a.DropSession(beta_session), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(a.KeepAlive({beta_session}), StatusIs(absl::StatusCode::kNotFound));
  std::vector<float> q(4 * 64, 0.25f);
  EXPECT_THAT(a.SelectPages(beta_session, 0, q), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(
      a.FetchPages(session->id, 0, std::vector<std::vector<uint32_t>>{{0}, {0}}, beta_buffer, 0),
      StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(a.AppendKv(session->id, beta_buffer, 0, spec.ChunkBytes(16), 16),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(a.UnregisterBuffer(beta_buffer), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(a.RegisterShm(beta_path, 4096), StatusIs(absl::StatusCode::kPermissionDenied));
  auto own = a.ListSessions(false);
  ASSERT_THAT(own, IsOk());
  ASSERT_EQ(own->size(), 1u);
  EXPECT_EQ((*own)[0].id, session->id);
  // The admin view sees both tenants.
  auto all = a.ListSessions(true);
  ASSERT_THAT(all, IsOk());
  EXPECT_EQ(all->size(), 2u);
  auto tenants = a.ListTenants();
  ASSERT_THAT(tenants, IsOk());
  std::map<std::string, TenantInfo> by_name;
  for (const auto& t : *tenants) by_name[t.tenant] = t;
  ASSERT_TRUE(by_name.count("alpha") && by_name.count("beta"));
  EXPECT_EQ(by_name["alpha"].sessions, 1u);
  EXPECT_EQ(by_name["beta"].sessions, 1u);
  EXPECT_GE(by_name["beta"].buffers, 1u);
  // The admin can act on beta's session.
  EXPECT_THAT(a.EvictSession(beta_session), IsOk());
  (*probe)->Kill(SIGKILL);
  (*probe)->Wait();
}

}  // namespace
}  // namespace icecache::testing
