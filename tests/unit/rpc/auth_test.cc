#include "server/rpc/auth.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache::rpc {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

constexpr uint32_t kDaemonUid = 4242;

v1::AuthConfig TestConfig() {
  v1::AuthConfig c;
  auto* m = c.add_uid_tenants();
  m->set_uid(1001);
  m->set_tenant("inference-a");
  c.add_admin_uids(0);
  c.add_admin_uids(1001);
  auto* t = c.add_tokens();
  t->set_token("tok-remote-a-0123456789");
  t->set_tenant("remote-a");
  auto* t2 = c.add_tokens();
  t2->set_token("tok-admin-0123456789ab");
  t2->set_tenant("ops");
  t2->set_admin(true);
  return c;
}

TEST(AuthTest, MappedUidGetsItsTenantAndRole) {
  auto a = Authenticator::Create(TestConfig(), kDaemonUid);
  ASSERT_THAT(a, IsOk());
  auto c = (*a)->FromUid(1001);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->tenant, "inference-a");
  EXPECT_EQ(c->uid, 1001u);
  EXPECT_TRUE(c->admin);
}

TEST(AuthTest, UnmappedUidBecomesUidTenantOrIsRefused) {
  auto a = Authenticator::Create(TestConfig(), kDaemonUid);
  ASSERT_THAT(a, IsOk());
  auto c = (*a)->FromUid(2002);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->tenant, "uid-2002");
  EXPECT_FALSE(c->admin);

  v1::AuthConfig refuse = TestConfig();
  refuse.set_unmapped_uid(v1::UNMAPPED_UID_POLICY_REFUSE);
  auto r = Authenticator::Create(refuse, kDaemonUid);
  ASSERT_THAT(r, IsOk());
  EXPECT_THAT((*r)->FromUid(2002),
              StatusIs(absl::StatusCode::kPermissionDenied, HasSubstr("uid 2002")));
  EXPECT_THAT((*r)->FromUid(1001), IsOk());
}

TEST(AuthTest, BearerTokens) {
  auto a = Authenticator::Create(TestConfig(), kDaemonUid);
  ASSERT_THAT(a, IsOk());
  auto c = (*a)->FromAuthorization("Bearer tok-remote-a-0123456789");
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->tenant, "remote-a");
  EXPECT_FALSE(c->admin);
  auto admin = (*a)->FromAuthorization("Bearer tok-admin-0123456789ab");
  ASSERT_THAT(admin, IsOk());
  EXPECT_TRUE(admin->admin);
  EXPECT_EQ(admin->tenant, "ops");

  EXPECT_THAT((*a)->FromAuthorization(std::nullopt),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("authorization")));
  EXPECT_THAT((*a)->FromAuthorization("Basic abc"), StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT((*a)->FromAuthorization("Bearer tok-remote-a-012345678"),  // prefix of a token
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT((*a)->FromAuthorization("Bearer tok-remote-a-0123456789x"),
              StatusIs(absl::StatusCode::kPermissionDenied));
}

TEST(AuthTest, ResolveUsesPeerTableForFdPeersAndTokensOtherwise) {
  auto a = Authenticator::Create(TestConfig(), kDaemonUid);
  ASSERT_THAT(a, IsOk());
  PeerTable peers;
  peers.Set(17, PeerCred{123, 1001, 1001});
  auto c = (*a)->Resolve("fd:17", peers, std::nullopt);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->tenant, "inference-a");
  // A token on a Unix connection does not change who the peer is.
  auto c2 = (*a)->Resolve("fd:17", peers, "Bearer tok-admin-0123456789ab");
  ASSERT_THAT(c2, IsOk());
  EXPECT_EQ(c2->tenant, "inference-a");
  EXPECT_THAT((*a)->Resolve("fd:18", peers, std::nullopt),
              StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("fd:18")));
  auto tcp = (*a)->Resolve("ipv4:10.0.0.1:5555", peers, "Bearer tok-remote-a-0123456789");
  ASSERT_THAT(tcp, IsOk());
  EXPECT_EQ(tcp->tenant, "remote-a");
  EXPECT_THAT((*a)->Resolve("ipv4:10.0.0.1:5555", peers, std::nullopt),
              StatusIs(absl::StatusCode::kUnauthenticated));
  // A later connection on the same fd number replaces the entry.
  peers.Set(17, PeerCred{124, 3003, 3003});
  EXPECT_EQ((*a)->Resolve("fd:17", peers, std::nullopt)->tenant, "uid-3003");
}

TEST(AuthTest, ParseFdPeer) {
  EXPECT_EQ(*ParseFdPeer("fd:0"), 0);
  EXPECT_EQ(*ParseFdPeer("fd:1234"), 1234);
  EXPECT_THAT(ParseFdPeer("unix:/tmp/x"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseFdPeer("fd:"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseFdPeer("fd:-3"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseFdPeer("fd:12x"), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(AuthTest, CreateRejectsBadConfig) {
  v1::AuthConfig dup = TestConfig();
  auto* m = dup.add_uid_tenants();
  m->set_uid(1001);
  m->set_tenant("other");
  EXPECT_THAT(Authenticator::Create(dup, kDaemonUid),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("1001")));
  v1::AuthConfig bad_tenant;
  auto* t = bad_tenant.add_tokens();
  t->set_token("0123456789abcdef");
  t->set_tenant("no spaces allowed");
  EXPECT_THAT(Authenticator::Create(bad_tenant, kDaemonUid),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(AuthTest, WithNoAdminUidsTheDaemonsOwnUidAndRootAreAdmins) {
  auto a = Authenticator::Create(v1::AuthConfig(), kDaemonUid);
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ((*a)->admin_uids(), (std::vector<uint32_t>{0, kDaemonUid}));
  EXPECT_TRUE((*a)->FromUid(kDaemonUid)->admin);
  EXPECT_TRUE((*a)->FromUid(0)->admin);
  EXPECT_FALSE((*a)->FromUid(1001)->admin);
}

TEST(AuthTest, AdminUidsNarrowTheDefault) {
  v1::AuthConfig c;
  c.add_admin_uids(1001);
  auto a = Authenticator::Create(c, kDaemonUid);
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ((*a)->admin_uids(), (std::vector<uint32_t>{1001}));
  EXPECT_FALSE((*a)->FromUid(kDaemonUid)->admin);
  EXPECT_FALSE((*a)->FromUid(0)->admin);
  EXPECT_TRUE((*a)->FromUid(1001)->admin);
}

TEST(AuthTest, NoUnixAdminsLeavesOnlyAdminTokens) {
  v1::AuthConfig c = TestConfig();
  c.clear_admin_uids();
  c.set_no_unix_admins(true);
  auto a = Authenticator::Create(c, kDaemonUid);
  ASSERT_THAT(a, IsOk());
  EXPECT_TRUE((*a)->admin_uids().empty());
  EXPECT_FALSE((*a)->FromUid(0)->admin);
  EXPECT_FALSE((*a)->FromUid(kDaemonUid)->admin);
  EXPECT_TRUE((*a)->FromAuthorization("Bearer tok-admin-0123456789ab")->admin);
  c.add_admin_uids(7);
  EXPECT_THAT(Authenticator::Create(c, kDaemonUid),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no_unix_admins")));
}

}  // namespace
}  // namespace icecache::rpc
