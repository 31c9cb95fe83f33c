#include "common/cli.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache::cli {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

struct Tool {
  CLI::App app{"a test tool", "tool"};
  int page_tokens = 16;
  int budget = 256;
  bool json = false;
  CLI::App* sub = nullptr;
  Tool() {
    Configure(app);
    app.add_option("--page-tokens,--page_tokens", page_tokens, "tokens per page");
    app.add_option("--budget", budget, "budget")->check(Positive());
    app.add_flag("--json", json, "JSON output");
    sub = app.add_subcommand("list", "a subcommand");
  }
};

TEST(CliTest, KebabFlagsAndSnakeAliasesAndEquals) {
  Tool a;
  ASSERT_THAT(ParseArgs(a.app, {"--page-tokens", "32", "--budget=7"}), IsOk());
  EXPECT_EQ(a.page_tokens, 32);
  EXPECT_EQ(a.budget, 7);
  Tool b;
  ASSERT_THAT(ParseArgs(b.app, {"--page_tokens=8"}), IsOk());
  EXPECT_EQ(b.page_tokens, 8);
}

TEST(CliTest, ParentFlagsAreAcceptedAfterASubcommand) {
  Tool t;
  ASSERT_THAT(ParseArgs(t.app, {"list", "--json"}), IsOk());
  EXPECT_TRUE(t.json);
  EXPECT_TRUE(t.sub->parsed());
}

TEST(CliTest, BadCommandLinesNameTheFlag) {
  Tool t1;
  EXPECT_THAT(ParseArgs(t1.app, {"--budget", "0"}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'0' is not a positive")));
  Tool t2;
  EXPECT_THAT(ParseArgs(t2.app, {"--budget", "abc"}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--budget")));
  Tool t3;
  EXPECT_THAT(ParseArgs(t3.app, {"--frobnicate"}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--frobnicate")));
  Tool t4;
  EXPECT_THAT(ParseArgs(t4.app, {"--page-tokens"}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--page-tokens")));
}

TEST(CliTest, HelpShowsDefaultsAndAliases) {
  Tool t;
  const std::string help = t.app.help();
  EXPECT_THAT(help, HasSubstr("--page-tokens,--page_tokens INT=16"));
  EXPECT_THAT(help, HasSubstr("=256"));
}

TEST(CliTest, ParseReturnsUsageExitForBadLinesAndZeroForHelp) {
  Tool bad;
  std::vector<std::string> args = {"tool", "--budget", "-3"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  EXPECT_EQ(Parse(bad.app, static_cast<int>(argv.size()), argv.data()), kExitUsage);
  Tool good;
  std::vector<std::string> ok_args = {"tool", "--budget", "3"};
  std::vector<char*> ok_argv;
  for (auto& a : ok_args) ok_argv.push_back(a.data());
  EXPECT_EQ(Parse(good.app, static_cast<int>(ok_argv.size()), ok_argv.data()), std::nullopt);
  EXPECT_EQ(good.budget, 3);
  Tool help;
  std::vector<std::string> help_args = {"tool", "--help"};
  std::vector<char*> help_argv;
  for (auto& a : help_args) help_argv.push_back(a.data());
  ::testing::internal::CaptureStdout();
  EXPECT_EQ(Parse(help.app, static_cast<int>(help_argv.size()), help_argv.data()), 0);
  EXPECT_THAT(::testing::internal::GetCapturedStdout(), HasSubstr("a test tool"));
}

}  // namespace
}  // namespace icecache::cli
