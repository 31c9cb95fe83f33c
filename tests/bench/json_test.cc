#include "tests/bench/json.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/bench/select_bench.h"
#include "tests/support/status_matchers.h"

namespace icecache::bench {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

TEST(JsonTest, DumpThenParseRoundTrips) {
  Json root = Json::Object();
  root.Set("name", "a \"quoted\"\nline");
  root.Set("x", 1.5);
  root.Set("n", int64_t{131072});
  root.Set("nan", std::nan(""));
  Json arr = Json::Array();
  arr.Push(true);
  arr.Push(Json());
  arr.Push(-2.25e-7);
  root.Set("arr", std::move(arr));
  for (int indent : {0, 2}) {
    auto parsed = Json::Parse(root.Dump(indent));
    ASSERT_THAT(parsed.status(), IsOk());
    EXPECT_EQ(parsed->Find("name")->str(), "a \"quoted\"\nline");
    EXPECT_DOUBLE_EQ(parsed->Find("x")->number(), 1.5);
    EXPECT_DOUBLE_EQ(parsed->Find("n")->number(), 131072);
    EXPECT_TRUE(parsed->Find("nan")->is_null());
    ASSERT_EQ(parsed->Find("arr")->items().size(), 3u);
    EXPECT_TRUE(parsed->Find("arr")->items()[0].boolean());
    EXPECT_TRUE(parsed->Find("arr")->items()[1].is_null());
    EXPECT_DOUBLE_EQ(parsed->Find("arr")->items()[2].number(), -2.25e-7);
  }
}

TEST(JsonTest, MalformedInputIsInvalidArgument) {
  for (const char* bad : {"", "{", "{\"a\" 1}", "[1,]", "{\"a\":1} x", "\"abc", "nul", "[1 2]"}) {
    EXPECT_THAT(Json::Parse(bad).status(), StatusIs(absl::StatusCode::kInvalidArgument)) << bad;
  }
}

std::string Report(const std::vector<std::string>& names, double mass) {
  Json root = Json::Object();
  root.Set("machine", Json::Object());
  root.Set("config", Json::Object());
  Json results = Json::Array();
  for (const auto& name : names) {
    Json r = Json::Object();
    r.Set("selector", name);
    r.Set("page_tokens", 16);
    for (const char* m : {"build_s", "insert_tokens_per_s", "query_us_p50", "query_us_p99",
                          "topk_recall", "output_rel_error", "keys_touched",
                          "index_bytes_per_token", "page_fill", "session_cost_s"}) {
      r.Set(m, 0.5);
    }
    r.Set("mass_recall", mass);
    results.Push(std::move(r));
  }
  root.Set("results", std::move(results));
  return root.Dump();
}

TEST(CheckReportTest, AcceptsCompleteReport) {
  EXPECT_THAT(CheckReport(Report({"mdci", "exact"}, 0.9), {"mdci", "exact"}, {16}), IsOk());
}

TEST(CheckReportTest, RejectsMissingSelectorOrPageSize) {
  EXPECT_THAT(CheckReport(Report({"mdci"}, 0.9), {"mdci", "exact"}, {16}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(CheckReport(Report({"mdci"}, 0.9), {"mdci"}, {8}),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(CheckReportTest, RejectsOutOfRangeRecall) {
  EXPECT_THAT(CheckReport(Report({"mdci"}, 1.5), {"mdci"}, {16}),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(ParseSelectArgsTest, DefaultsAndErrors) {
  auto o = ParseSelectArgs({"--synthetic", "small", "--page-tokens", "32,8,16,8"});
  ASSERT_THAT(o.status(), IsOk());
  EXPECT_EQ(o->page_tokens, (std::vector<int>{8, 16, 32}));
  EXPECT_EQ(o->selectors, AllMethodNames());
  EXPECT_EQ(o->budget, 256);
  EXPECT_THAT(ParseSelectArgs({}).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--dump", "/x"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--selectors", "mdci,bogus"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--page-tokens", "0"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--budget"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--budget", "abc"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--frobnicate", "1"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace icecache::bench
