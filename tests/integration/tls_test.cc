// The remote path: the daemon's TCP listener with TLS and bearer tokens,
// reached by icecache::Client (address + CA + token) and by icecachectl
// (--address --ca --token). Tokens map to tenants, so this is also a second
// real way to get two tenants on one daemon.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;

constexpr char kGammaToken[] = "gamma-token-0123456789abcdef";
constexpr char kAdminToken[] = "admin-token-0123456789abcdef";

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::icecache::testing::TempPathTemplate("icecache-tls-");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    cert_ = dir_ + "/cert.pem";
    key_ = dir_ + "/key.pem";
    auto r =
        RunCommand({"/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                    "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key_, "-out", cert_});
    if (!r.ok() || r->exit_code != 0) {
      GTEST_SKIP() << "openssl could not make a test certificate: "
                   << (r.ok() ? r->err : r.status().ToString());
    }
    port_ = FreePort();
    ASSERT_GT(port_, 0);
    address_ = absl::StrCat("localhost:", port_);
    auto d = StartDaemon(absl::StrCat("listen { tcp_address: \"127.0.0.1:", port_,
                                      "\" tls_cert_file: \"", cert_, "\" tls_key_file: \"", key_,
                                      "\" }\n", "auth { tokens { token: \"", kGammaToken,
                                      "\" tenant: \"gamma\" }\n", "       tokens { token: \"",
                                      kAdminToken, "\" tenant: \"ops\" admin: true } }\n"));
    ASSERT_THAT(d, IsOk());
    daemon_ = *std::move(d);
  }
  void TearDown() override {
    daemon_.reset();
    if (!dir_.empty()) {
      ::unlink(cert_.c_str());
      ::unlink(key_.c_str());
      ::rmdir(dir_.c_str());
    }
  }
  absl::StatusOr<std::unique_ptr<Client>> Remote(const std::string& token) {
    ClientOptions o;
    o.address = address_;
    o.ca_file = cert_;
    o.token = token;
    o.timeout = absl::Seconds(20);
    return Client::Create(o);
  }

  std::string dir_, cert_, key_, address_;
  int port_ = 0;
  std::unique_ptr<DaemonProcess> daemon_;
};

TEST_F(TlsTest, BearerTokensMapToTenantsOverTls) {
  auto gamma = Remote(kGammaToken);
  ASSERT_THAT(gamma, IsOk());
  TestModel m = MakeModel(1, 2, 256, 1);
  auto s = (*gamma)->CreateSession(m.spec);
  ASSERT_THAT(s, IsOk()) << daemon_->Stderr();
  EXPECT_EQ(s->tenant, "gamma");
  auto n = (*gamma)->AppendKvInline(s->id, m.kv.Chunk(0, 256), 256);
  ASSERT_THAT(n, IsOk());
  EXPECT_EQ(*n, 256u);
  SelectOptions opt;
  opt.budget_tokens = 32;
  opt.want_positions = true;
  auto sel = (*gamma)->SelectPages(s->id, 0, Queries(m, 0, 0), opt);
  ASSERT_THAT(sel, IsOk());
  EXPECT_EQ(sel->size(), 2u);
  // Not an admin.
  EXPECT_THAT((*gamma)->GetStats(), StatusIs(absl::StatusCode::kPermissionDenied));

  // The Unix-socket tenant (uid 0 -> alpha) does not see gamma's session.
  auto local = Connect(*daemon_);
  ASSERT_THAT(local, IsOk());
  EXPECT_THAT((*local)->GetSession(s->id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT((*local)->DropSession(s->id), StatusIs(absl::StatusCode::kNotFound));

  // Wrong or missing tokens are refused.
  auto bad = Remote("not-a-valid-token-at-all-xxxx");
  ASSERT_THAT(bad, IsOk());
  absl::Status st = (*bad)->ListSessions().status();
  EXPECT_TRUE(st.code() == absl::StatusCode::kPermissionDenied ||
              st.code() == absl::StatusCode::kUnauthenticated)
      << st;
  ::unsetenv("ICECACHE_TOKEN");
  auto none = Remote("");
  ASSERT_THAT(none, IsOk());
  EXPECT_THAT((*none)->ListSessions(), StatusIs(absl::StatusCode::kUnauthenticated));

  // icecachectl over TCP with the admin token sees gamma's session.
  auto r = RunCommand({IcecachectlPath(), "--address", address_, "--ca", cert_, "--token",
                       kAdminToken, "--json", "sessions", "list", "--all"});
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->exit_code, 0) << r->err;
  EXPECT_THAT(r->out, HasSubstr(s->id));
  EXPECT_THAT(ParseJson(r->out), IsOk());
  r = RunCommand(
      {IcecachectlPath(), "--address", address_, "--ca", cert_, "--token", kGammaToken, "stats"});
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->exit_code, 4) << r->err;
  // The same daemon over TCP without trusting its CA: TLS fails, unavailable.
  r = RunCommand({IcecachectlPath(), "--address", address_, "--token", kAdminToken, "--timeout",
                  "3", "health"});
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->exit_code, 5) << r->err;
}

}  // namespace
}  // namespace icecache::testing
