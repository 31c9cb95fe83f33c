// A new operator's first run: icecached with nothing but a socket path, then
// icecachectl as the same uid. No auth config, so the daemon's own uid (and
// root) hold the admin role and the start-up log says so.
#include <unistd.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<std::unique_ptr<DaemonProcess>> StartWithoutConfig() {
  DaemonOptions o;
  o.binary = IcecachedPath();
  o.log_level = "info";
  o.extra_args = {"--capacity_bytes=67108864"};
  return DaemonProcess::Start(o);
}

TEST(FirstRunTest, StatsWorksForTheDaemonsOwnUidWithNoConfig) {
  auto daemon = StartWithoutConfig();
  ASSERT_THAT(daemon, IsOk());
  auto r = RunCommand({IcecachectlPath(), "--socket", (*daemon)->socket_path(), "stats"});
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->exit_code, 0) << r->err;
  EXPECT_THAT(r->out, HasSubstr("sessions"));
}

TEST(FirstRunTest, StartUpLogNamesTheAdmins) {
  auto daemon = StartWithoutConfig();
  ASSERT_THAT(daemon, IsOk());
  const std::string log = (*daemon)->Stderr();
  EXPECT_THAT(log, HasSubstr("msg=admins"));
  EXPECT_THAT(log, HasSubstr(::geteuid() == 0 ? "uids=0 " : absl::StrCat("uids=0,", ::geteuid())));
  EXPECT_THAT(log, HasSubstr("default (daemon uid and root)"));
}

}  // namespace
}  // namespace icecache::testing
