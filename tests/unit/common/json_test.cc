#include "common/json.h"

#include <cmath>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

TEST(JsonTest, DumpThenParseRoundTrips) {
  Json root = Json::object();
  root["name"] = "a \"quoted\"\nline\twith \\ and \x01";
  root["x"] = 1.5;
  root["n"] = int64_t{131072};
  root["big"] = uint64_t{18446744073709551615u};
  root["nan"] = std::nan("");
  root["inf"] = HUGE_VAL;
  Json arr = Json::array();
  arr.push_back(true);
  arr.push_back(nullptr);
  arr.push_back(-2.25e-7);
  root["arr"] = std::move(arr);
  for (int indent : {0, 2}) {
    auto parsed = ParseJson(DumpJson(root, indent));
    ASSERT_THAT(parsed.status(), IsOk());
    EXPECT_EQ((*parsed)["name"], "a \"quoted\"\nline\twith \\ and \x01");
    EXPECT_DOUBLE_EQ((*parsed)["x"].get<double>(), 1.5);
    EXPECT_EQ((*parsed)["n"].get<int64_t>(), 131072);
    EXPECT_EQ((*parsed)["big"].get<uint64_t>(), 18446744073709551615u);
    EXPECT_TRUE((*parsed)["nan"].is_null());
    EXPECT_TRUE((*parsed)["inf"].is_null());
    ASSERT_EQ((*parsed)["arr"].size(), 3u);
    EXPECT_TRUE((*parsed)["arr"][0].get<bool>());
    EXPECT_TRUE((*parsed)["arr"][1].is_null());
    EXPECT_DOUBLE_EQ((*parsed)["arr"][2].get<double>(), -2.25e-7);
  }
}

TEST(JsonTest, KeysKeepInsertionOrderAndOneLineHasNoNewline) {
  Json root = Json::object();
  root["zeta"] = 1;
  root["alpha"] = 2;
  EXPECT_EQ(DumpJson(root), R"({"zeta":1,"alpha":2})");
  EXPECT_EQ(DumpJson(root, 2), "{\n  \"zeta\": 1,\n  \"alpha\": 2\n}");
}

TEST(JsonTest, ControlCharactersAreEscaped) {
  Json s = std::string("a\x01\n\"");
  EXPECT_EQ(DumpJson(s), R"("a\u0001\n\"")");
}

TEST(JsonTest, InvalidUtf8IsReplacedNotThrown) {
  Json s = std::string("ok\xff");
  EXPECT_EQ(DumpJson(s), "\"ok\xEF\xBF\xBD\"");
}

TEST(JsonTest, MalformedInputIsInvalidArgumentNamingTheByte) {
  for (const char* bad : {"", "{", "{\"a\" 1}", "[1,]", "{\"a\":1} x", "\"abc", "nul", "[1 2]"}) {
    EXPECT_THAT(ParseJson(bad).status(), StatusIs(absl::StatusCode::kInvalidArgument)) << bad;
  }
  EXPECT_THAT(ParseJson("[1 2]").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("byte 4")));
}

}  // namespace
}  // namespace icecache
