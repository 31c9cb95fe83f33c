#include "server/rpc/log.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache::rpc {
namespace {

using ::icecache::testing::StatusIs;

TEST(LogTest, FormatsKeyValuePairsAndQuotesWhatNeedsIt) {
  EXPECT_EQ(FormatLogLine(LogLevel::kInfo, "session_created",
                          {{"tenant", "a"}, {"bytes", 4096}, {"path", "/tmp/x y"}}, false),
            "level=info msg=session_created tenant=a bytes=4096 path=\"/tmp/x y\"\n");
  EXPECT_EQ(FormatLogLine(LogLevel::kWarn, "e", {{"v", "a=\"b\"\n"}, {"empty", ""}}, false),
            "level=warn msg=e v=\"a=\\\"b\\\"\\n\" empty=\"\"\n");
  EXPECT_EQ(FormatLogLine(LogLevel::kError, "ctl", {{"v", std::string("\x01", 1)}}, false),
            "level=error msg=ctl v=\"\\x01\"\n");
}

TEST(LogTest, LineStartsWithUtcTimestamp) {
  const std::string line = FormatLogLine(LogLevel::kDebug, "m", {});
  EXPECT_THAT(line, ::testing::MatchesRegex(
                        "ts=[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{12}Z level=debug msg=m\n"));
}

TEST(LogTest, ParsesLevelsAndRejectsUnknown) {
  EXPECT_EQ(*ParseLogLevel("DEBUG"), LogLevel::kDebug);
  EXPECT_EQ(*ParseLogLevel("warning"), LogLevel::kWarn);
  EXPECT_EQ(*ParseLogLevel("error"), LogLevel::kError);
  EXPECT_THAT(ParseLogLevel("loud"),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("loud")));
}

TEST(LogTest, LevelFilter) {
  SetLogLevel(LogLevel::kWarn);
  EXPECT_FALSE(LogEnabled(LogLevel::kInfo));
  EXPECT_TRUE(LogEnabled(LogLevel::kWarn));
  EXPECT_TRUE(LogEnabled(LogLevel::kError));
  SetLogLevel(LogLevel::kInfo);
  EXPECT_TRUE(LogEnabled(LogLevel::kInfo));
  EXPECT_FALSE(LogEnabled(LogLevel::kDebug));
}

}  // namespace
}  // namespace icecache::rpc
