// Unit tests of the decode benchmark's pieces that the smoke test cannot
// pin down: policy names, context lists, and the CPU attention and quality
// measures against their definitions.
#include "tests/bench/decode_bench.h"

#include <cmath>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/bench/decode_attention.h"
#include "tests/bench/decode_flags.h"
#include "tests/support/status_matchers.h"

namespace icecache::bench {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(DecodePolicyTest, SelectorWithLayerReuse) {
  auto p = ParseDecodePolicy("mdci-r4");
  ASSERT_THAT(p, IsOk());
  EXPECT_EQ(p->kind, DecodePolicy::Kind::kSelector);
  EXPECT_EQ(p->selector, "mdci");
  EXPECT_EQ(p->layer_reuse, 4);
  auto q = ParseDecodePolicy("exact-mdci");
  ASSERT_THAT(q, IsOk());
  EXPECT_EQ(q->selector, "exact-mdci");
  EXPECT_EQ(q->layer_reuse, 1);
  EXPECT_EQ(ParseDecodePolicy("full")->kind, DecodePolicy::Kind::kFull);
  EXPECT_EQ(ParseDecodePolicy("exact-token")->kind, DecodePolicy::Kind::kExactToken);
}

TEST(DecodePolicyTest, PrefetchSuffixNeedsLayerReuse) {
  auto p = ParseDecodePolicy("mdci-r4+pf");
  ASSERT_THAT(p, IsOk());
  EXPECT_EQ(p->selector, "mdci");
  EXPECT_EQ(p->layer_reuse, 4);
  EXPECT_TRUE(p->prefetch);
  EXPECT_EQ(p->name, "mdci-r4+pf");
  EXPECT_FALSE(ParseDecodePolicy("mdci-r4")->prefetch);
  EXPECT_THAT(ParseDecodePolicy("mdci+pf"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("needs layer reuse")));
}

TEST(DecodePolicyTest, BadReuseNamesThePolicy) {
  EXPECT_THAT(ParseDecodePolicy("mdci-r0"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("mdci-r0")));
  EXPECT_THAT(ParseDecodePolicy("-r2"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no selector")));
}

TEST(DecodeFlagsTest, ContextsTakeKSuffixes) {
  auto c = ParseContexts("8k,16K,32768");
  ASSERT_THAT(c, IsOk());
  EXPECT_THAT(*c, ElementsAre(8192, 16384, 32768));
  EXPECT_THAT(ParseContexts("12x"), StatusIs(absl::StatusCode::kInvalidArgument,
                                             HasSubstr("'12x' is not a token count")));
  EXPECT_THAT(ParseContexts(""), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(DecodeFlagsTest, DefaultsAreTheModelScaleRun) {
  CLI::App app;
  DecodeFlags flags(&app);
  ASSERT_THAT(cli::ParseArgs(app, {}), IsOk());
  auto o = flags.Options();
  ASSERT_THAT(o, IsOk());
  EXPECT_EQ(o->layers, 32);
  EXPECT_THAT(o->contexts, ElementsAre(32768));
  EXPECT_THAT(o->batch, ElementsAre(1));
  EXPECT_EQ(o->policies.size(), 8u);
  ASSERT_THAT(cli::ParseArgs(app, {"--mode", "in-process", "--spawn", "x"}), IsOk());
  EXPECT_THAT(flags.Options(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--spawn")));
}

struct Rows {
  int n, d, g;
  std::vector<uint16_t> k, v;
  std::vector<float> q;
};

Rows MakeRows(int n, int d, int g) {
  Rows r{n, d, g, {}, {}, {}};
  std::mt19937 rng(7);
  std::normal_distribution<float> z(0.0f, 1.0f);
  for (int i = 0; i < n * d; ++i) r.k.push_back(FloatToHalf(z(rng)));
  for (int i = 0; i < n * d; ++i) r.v.push_back(FloatToHalf(z(rng)));
  for (int i = 0; i < g * d; ++i) r.q.push_back(2.0f * z(rng));
  return r;
}

TEST(DecodeAttentionTest, AllRowsGiveFullAttentionAndAllTheMass) {
  const Rows r = MakeRows(300, 64, 4);
  std::vector<float> full(r.g * r.d), lse(r.g), rows_out(r.g * r.d);
  std::vector<int32_t> oracle;
  AttentionScratch scratch;
  FullAttention(r.k.data(), r.v.data(), r.n, r.d, r.q.data(), r.g, full.data(), lse.data(), 0, 0,
                &oracle, &scratch);
  std::vector<const uint16_t*> kp, vp;
  std::vector<int32_t> all;
  for (int i = 0; i < r.n; ++i) {
    kp.push_back(r.k.data() + i * r.d);
    vp.push_back(r.v.data() + i * r.d);
    all.push_back(i);
  }
  RowsAttention(kp, vp, r.d, r.q.data(), r.g, rows_out.data(), &scratch);
  EXPECT_LT(OutputRelError(rows_out.data(), full.data(), r.g, r.d), 1e-5);
  EXPECT_NEAR(MassRecall(r.k.data(), r.d, all, r.q.data(), r.g, lse.data(), &scratch), 1.0, 1e-5);
  // Half of the rows hold less than all of the mass, and their attention
  // differs from the full one.
  all.resize(r.n / 2);
  const double half = MassRecall(r.k.data(), r.d, all, r.q.data(), r.g, lse.data(), &scratch);
  EXPECT_GT(half, 0.0);
  EXPECT_LT(half, 0.99);
}

TEST(DecodeAttentionTest, OracleTakesSinksThenTheHeaviestTokens) {
  const Rows r = MakeRows(200, 32, 2);
  std::vector<float> out(r.g * r.d), lse(r.g);
  std::vector<int32_t> oracle;
  AttentionScratch scratch;
  FullAttention(r.k.data(), r.v.data(), r.n, r.d, r.q.data(), r.g, out.data(), lse.data(), 20, 4,
                &oracle, &scratch);
  ASSERT_EQ(oracle.size(), 20u);
  EXPECT_THAT(std::vector<int32_t>(oracle.begin(), oracle.begin() + 4), ElementsAre(0, 1, 2, 3));
  // No token outside the oracle has more mass (for any query) than every
  // non-sink token inside it: the oracle's 16 best beat 16 random others.
  std::vector<int32_t> others;
  for (int i = 4; i < r.n && others.size() < 16; ++i) {
    if (std::find(oracle.begin(), oracle.end(), i) == oracle.end()) others.push_back(i);
  }
  const std::vector<int32_t> best(oracle.begin() + 4, oracle.end());
  EXPECT_GT(MassRecall(r.k.data(), r.d, best, r.q.data(), r.g, lse.data(), &scratch),
            MassRecall(r.k.data(), r.d, others, r.q.data(), r.g, lse.data(), &scratch));
}

}  // namespace
}  // namespace icecache::bench
