#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "common/json.h"
#include "common/kv_dump.h"
#include "common/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/bench/select_baselines_table.h"
#include "tests/bench/select_bench.h"
#include "tests/bench/select_flags.h"
#include "tests/bench/select_matrix.h"
#include "tests/support/status_matchers.h"

namespace icecache::bench {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

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

TEST(ParseSelectArgsTest, BaselinesTableFlags) {
  auto o = ParseSelectArgs({"--baselines", "--families", "rare-needles"});
  ASSERT_THAT(o.status(), IsOk());
  EXPECT_TRUE(o->baselines);
  EXPECT_EQ(o->selectors, BaselineTableMethods());
  EXPECT_THAT(ParseSelectArgs({"--baselines", "--synthetic", "small"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--baselines runs")));
  EXPECT_THAT(ParseSelectArgs({"--baselines", "--matrix"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("one of --matrix")));
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--pq-bits", "9"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("--pq-bits must be in [1, 8], got 9")));
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--snapkv-kernel", "6"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("--snapkv-kernel must be odd, got 6")));
  auto views = ParseSelectArgs({"--synthetic", "small", "--selectors", "pqcache@tok,magicpig-est"});
  ASSERT_THAT(views.status(), IsOk());
  EXPECT_EQ(views->isa, "auto");
  auto avx2 = ParseSelectArgs({"--synthetic", "small", "--isa", "avx2"});
  ASSERT_THAT(avx2.status(), IsOk());
  EXPECT_EQ(avx2->isa, "avx2");
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--isa", "sse"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("--isa must be auto, avx2 or avx512, got 'sse'")));
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
  EXPECT_EQ(o->tokens, 0);  // 16384 synthetic tokens, or the whole dump
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--tokens", "-1"}).status(),
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

// A dump longer than the old silent cap (16384 tokens) is used whole unless
// --tokens caps it.
TEST(RunSelectBenchTest, DumpIsUsedWholeUnlessTokensCapsIt) {
  SyntheticConfig c;
  c.kv_heads = 1;
  c.q_heads = 2;
  c.head_dim = 16;
  c.rank = 4;
  c.outlier_channels = 0;
  c.tokens = 17000;
  c.steps = 2;
  c.topics = 4;
  c.needles = 0;
  auto dump = GenerateSynthetic(c);
  ASSERT_THAT(dump.status(), IsOk());
  const std::string dir = ::testing::TempDir() + "/select_whole_dump";
  absl::Cleanup remove_dir = [&] { std::filesystem::remove_all(dir); };
  ASSERT_THAT(WriteKvDump(*dump, dir, DType::kF32), IsOk());
  auto context_of = [&](const std::vector<std::string>& extra) -> int64_t {
    std::vector<std::string> args = {"--dump", dir,      "--selectors",
                                     "exact",  "--json", dir + "/report.json"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto o = ParseSelectArgs(args);
    EXPECT_THAT(o.status(), IsOk());
    if (!o.ok()) return -1;
    EXPECT_THAT(RunSelectBench(*o), IsOk());
    std::ifstream in(dir + "/report.json");
    std::stringstream ss;
    ss << in.rdbuf();
    auto root = ParseJson(ss.str());
    EXPECT_THAT(root.status(), IsOk());
    return root.ok() ? (*root)["config"]["context_tokens"].get<int64_t>() : -1;
  };
  EXPECT_EQ(context_of({}), 17000);
  EXPECT_EQ(context_of({"--tokens", "4096"}), 4096);
}

TEST(ParseSelectArgsTest, MatrixFlags) {
  auto o = ParseSelectArgs({"--matrix", "--families", "baseline,local-heads", "--widths",
                            "32x8,128x16,exhaustive", "--plot", "f.svg"});
  ASSERT_THAT(o.status(), IsOk());
  EXPECT_TRUE(o->matrix);
  EXPECT_EQ(o->families, (std::vector<std::string>{"baseline", "local-heads"}));
  EXPECT_EQ(o->widths.size(), 3u);
  EXPECT_THAT(ParseSelectArgs({"--matrix", "--families", "bogus"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseSelectArgs({"--matrix", "--widths", "32"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseSelectArgs({"--matrix", "--synthetic", "small"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseSelectArgs({"--synthetic", "small", "--widths", "32x8"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  auto w = ParseWidth("128x16");
  ASSERT_THAT(w.status(), IsOk());
  EXPECT_EQ(w->field_of_view, 128);
  EXPECT_EQ(w->candidate_factor, 16.0f);
  EXPECT_TRUE(ParseWidth("exhaustive")->exhaustive);
  EXPECT_THAT(ParseWidth("0x8").status(), StatusIs(absl::StatusCode::kInvalidArgument));
}

// The matrix reports every family asked for with the figures of its row; the
// exhaustive width scores as exact-mdci does, and nothing beats the page
// oracle on its own layout.
TEST(RunSelectMatrixTest, ReportsEachFamilyAndTheFrontier) {
  const std::string dir = ::testing::TempDir() + "/select_matrix_report";
  ASSERT_TRUE(std::filesystem::create_directories(dir) || std::filesystem::is_directory(dir));
  absl::Cleanup remove_dir = [&] { std::filesystem::remove_all(dir); };
  auto o = ParseSelectArgs({"--matrix", "--families", "baseline,gqa-divergent", "--tokens", "2048",
                            "--heads", "1", "--steps", "2", "--budget", "64", "--chunk-tokens",
                            "32", "--widths", "8x4,exhaustive", "--json", dir + "/matrix.json",
                            "--plot", dir + "/matrix.svg"});
  ASSERT_THAT(o.status(), IsOk());
  ASSERT_THAT(RunSelectBench(*o), IsOk());
  std::ifstream in(dir + "/matrix.json");
  std::stringstream ss;
  ss << in.rdbuf();
  auto root = ParseJson(ss.str());
  ASSERT_THAT(root.status(), IsOk());
  const Json& fams = (*root)["families"];
  ASSERT_EQ(fams.size(), 2u);
  EXPECT_EQ(fams[1]["family"], "gqa-divergent");
  for (const Json& f : fams) {
    for (const char* k : {"mdci_vs_page_oracle", "mdci_vs_token_oracle", "mdci_speedup_vs_exact",
                          "page_fill", "layout_gain", "oracle_layout_gain"}) {
      EXPECT_TRUE(f[k].is_number()) << k;
    }
    for (const char* k : {"mdci_calibrated_vs_page_oracle", "mdci_token_vs_token_oracle",
                          "mdci_calibrated_token_vs_token_oracle"}) {
      EXPECT_TRUE(f[k].is_number()) << k;
      EXPECT_LE(f[k].get<double>(), 1.0 + 1e-6) << k;  // nothing beats its oracle
    }
    for (const char* k : {"calibrated_width", "calibrated_width_token"}) {
      ASSERT_TRUE(f[k].is_object()) << k;
      EXPECT_GE(f[k]["width"].get<double>(), 1.0) << k;
      EXPECT_TRUE(f[k]["overhead"].is_number()) << k;
    }
    EXPECT_LE(f["mdci_vs_page_oracle"].get<double>(), 1.0 + 1e-9);
    const double exact_mdci = f["policies"]["exact-mdci"]["mass_recall"].get<double>();
    EXPECT_LE(exact_mdci, f["page_oracle_mdci_layout"].get<double>() + 1e-9);
    ASSERT_EQ(f["frontier"].size(), 2u);
    // Exhaustive scores every page as exact-mdci does.
    EXPECT_NEAR(f["frontier"][1]["mass_recall"].get<double>(), exact_mdci, 0.02);
  }
  std::ifstream svg(dir + "/matrix.svg");
  std::stringstream sv;
  sv << svg.rdbuf();
  EXPECT_THAT(sv.str(), ::testing::HasSubstr("<polyline"));
  EXPECT_THAT(sv.str(), ::testing::HasSubstr("gqa-divergent"));
}

}  // namespace
}  // namespace icecache::bench
