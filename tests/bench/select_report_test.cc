#include <string>
#include <vector>

#include "common/json.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/bench/select_bench.h"
#include "tests/bench/select_flags.h"
#include "tests/support/status_matchers.h"

namespace icecache::bench {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

std::string Report(const std::vector<std::string>& names, double mass) {
  Json root = Json::object();
  root["machine"] = Json::object();
  root["config"] = Json::object();
  Json results = Json::array();
  for (const auto& name : names) {
    Json r = Json::object();
    r["selector"] = name;
    r["page_tokens"] = 16;
    for (const char* m : {"build_s", "insert_tokens_per_s", "query_us_p50", "query_us_p99",
                          "topk_recall", "output_rel_error", "keys_touched",
                          "index_bytes_per_token", "page_fill", "session_cost_s"}) {
      r[m] = 0.5;
    }
    r["mass_recall"] = mass;
    results.push_back(std::move(r));
  }
  root["results"] = std::move(results);
  return DumpJson(root);
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

TEST(CheckReportTest, RejectsMalformedJsonAndWrongTypes) {
  EXPECT_THAT(CheckReport("{\"machine\": {}", {"mdci"}, {16}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(CheckReport("[1, 2]", {"mdci"}, {16}), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(CheckReport(R"({"machine": {}, "config": {}, "results": {}})", {"mdci"}, {16}),
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
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--kv-dtype", "f8"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(ParseSelectArgsTest, ValuesAfterEqualsAndSpaces) {
  auto o = ParseSelectArgs({"--dump=/data/kv", "--budget", "128", "--selectors=mdci,quest",
                            "--kv-dtype", "bf16", "--verbose"});
  ASSERT_THAT(o.status(), IsOk());
  EXPECT_EQ(o->dump_dir, "/data/kv");
  EXPECT_EQ(o->budget, 128);
  EXPECT_EQ(o->selectors, (std::vector<std::string>{"mdci", "quest"}));
  EXPECT_EQ(o->kv_dtype, DType::kBF16);
  EXPECT_TRUE(o->verbose);
  EXPECT_FALSE(o->check);
}

}  // namespace
}  // namespace icecache::bench
