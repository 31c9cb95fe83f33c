// Unit tests of the decode benchmark's pieces that the smoke test cannot
// pin down: policy names, context lists, and the CPU attention and quality
// measures against their definitions.
#include "tests/bench/decode_bench.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/bench/decode_attention.h"
#include "tests/bench/decode_flags.h"
#include "tests/bench/decode_model.h"
#include "tests/bench/process_cpu.h"
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

TEST(DecodePolicyTest, InPlaceSuffixWithOrWithoutReuseAndPrefetch) {
  auto p = ParseDecodePolicy("mdci+ip");
  ASSERT_THAT(p, IsOk());
  EXPECT_EQ(p->selector, "mdci");
  EXPECT_TRUE(p->in_place);
  EXPECT_FALSE(p->prefetch);
  for (const char* name : {"mdci-r4+pf+ip", "mdci-r4+ip+pf"}) {
    auto q = ParseDecodePolicy(name);
    ASSERT_THAT(q, IsOk()) << name;
    EXPECT_EQ(q->selector, "mdci") << name;
    EXPECT_EQ(q->layer_reuse, 4) << name;
    EXPECT_TRUE(q->in_place && q->prefetch) << name;
  }
  EXPECT_FALSE(ParseDecodePolicy("mdci-r4")->in_place);
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
  EXPECT_EQ(o->budget, 256);  // what a session gets from icecached by default
  ASSERT_THAT(cli::ParseArgs(app, {"--mode", "in-process", "--spawn", "x"}), IsOk());
  EXPECT_THAT(flags.Options(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--spawn")));
}

// Arguments appended to a preset command line override it: the demo
// (deploy/dev.sh demo) passes --layers, --tokens and --policies and the
// README suggests `deploy/dev.sh demo --tokens 8k`.
TEST(DecodeFlagsTest, AFlagGivenTwiceTakesItsLastValue) {
  CLI::App app;
  DecodeFlags flags(&app);
  ASSERT_THAT(cli::ParseArgs(app, {"--layers", "32", "--tokens", "32768", "--policies", "mdci",
                                   "--tokens", "8k", "--layers", "4", "--policies", "quest"}),
              IsOk());
  auto o = flags.Options();
  ASSERT_THAT(o, IsOk());
  EXPECT_EQ(o->layers, 4);
  EXPECT_THAT(o->contexts, ElementsAre(8192));
  ASSERT_EQ(o->policies.size(), 1u);
  EXPECT_EQ(o->policies[0], "quest");
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

TEST(DecodeModelTest, QualityLayersAreSpreadAndCoverEveryPlaceInAGroup) {
  EXPECT_THAT(QualityLayers(32, 4), ElementsAre(0, 9, 18, 27));
  EXPECT_THAT(QualityLayers(32, 2), ElementsAre(0, 17));
  EXPECT_THAT(QualityLayers(8, 4), ElementsAre(0, 3, 5, 7));
  EXPECT_THAT(QualityLayers(3, 4), ElementsAre(0, 1, 2));
  EXPECT_THAT(QualityLayers(5, 1), ElementsAre(0));
}

// The lazy model gives, bit for bit, the fp16 KV and queries of the
// whole-model generation it replaced (one generator draw per block of
// layers, converted to fp16): the prefill generated chunk by chunk, the
// decode tokens from memory, the quality layers' KV.
TEST(DecodeModelTest, LazyPrefillEqualsTheWholeBlockGeneration) {
  DecodeModelOptions mo;
  mo.preset = "small";
  mo.layers = 6;  // blocks of 4 and 2
  mo.tokens = 700;
  mo.steps = 3;
  mo.block_layers = 4;
  mo.quality_layers = 2;
  auto model = DecodeModel::Generate(mo);
  ASSERT_THAT(model, IsOk());
  const DecodeModel& m = **model;
  ASSERT_THAT(m.quality_layers(), ElementsAre(0, 4));
  EXPECT_TRUE(m.is_quality_layer(4));
  EXPECT_FALSE(m.is_quality_layer(1));
  EXPECT_EQ(m.keys(1, 0), nullptr);
  const int H = m.kv_heads(), d = m.head_dim(), G = m.group();
  const int64_t T = m.tokens(), n = m.prefill_tokens();
  for (int first : {0, 4}) {
    SyntheticConfig c = *SyntheticPreset("small");
    c.layers = first == 0 ? 4 : 2;
    c.tokens = T;
    c.steps = mo.steps;
    c.seed = mo.seed + 1000003ull * static_cast<uint64_t>(first / 4);
    auto whole = GenerateSynthetic(c);
    ASSERT_THAT(whole, IsOk());
    // The prefill of the block's layers, as streamed (chunks 0..3 and 4..5),
    // and a chunk that starts inside the block (layer first + 1 alone).
    std::vector<uint8_t> buf(m.AppendBytes(n, c.layers));
    ASSERT_THAT(m.FillAppend(0, n, first, c.layers, buf.data()), IsOk());
    const uint16_t* k = reinterpret_cast<const uint16_t*>(buf.data());
    const uint16_t* v = k + buf.size() / 4;
    std::vector<uint8_t> one(m.AppendBytes(n, 1));
    ASSERT_THAT(m.FillAppend(0, n, first + 1, 1, one.data()), IsOk());
    for (int l = 0; l < c.layers; ++l) {
      for (int h = 0; h < H; ++h) {
        const float* wk = whole->key(l, h);
        const float* wv = whole->value(l, h);
        const size_t at = (static_cast<size_t>(l) * H + h) * n * d;
        for (int64_t i = 0; i < n * d; i += 97) {
          ASSERT_EQ(k[at + i], FloatToHalf(wk[i])) << "layer " << first + l << " head " << h;
          ASSERT_EQ(v[at + i], FloatToHalf(wv[i])) << "layer " << first + l << " head " << h;
        }
        if (l == 1) {
          EXPECT_EQ(std::memcmp(one.data() + h * n * d * 2, k + at, n * d * 2), 0);
        }
        // The decode tokens.
        std::vector<uint8_t> tok(m.AppendBytes(1, 1));
        ASSERT_THAT(m.FillAppend(n + 1, n + 2, first + l, 1, tok.data()), IsOk());
        const uint16_t* tk = reinterpret_cast<const uint16_t*>(tok.data());
        for (int i = 0; i < d; ++i) {
          ASSERT_EQ(tk[h * d + i], FloatToHalf(wk[(n + 1) * d + i]));
          ASSERT_EQ(tk[H * d + h * d + i], FloatToHalf(wv[(n + 1) * d + i]));
        }
        if (m.is_quality_layer(first + l)) {
          for (int64_t i = 0; i < T * d; i += 31) {
            ASSERT_EQ(m.keys(first + l, h)[i], FloatToHalf(wk[i]));
            ASSERT_EQ(m.values(first + l, h)[i], FloatToHalf(wv[i]));
          }
        }
      }
      for (int s = 0; s < mo.steps; ++s) {
        const float* wq =
            whole->queries.data() + (static_cast<size_t>(s) * c.layers + l) * whole->q_heads * d;
        const absl::Span<const float> q = m.queries(s, first + l);
        ASSERT_EQ(q.size(), static_cast<size_t>(H) * G * d);
        EXPECT_TRUE(std::equal(q.begin(), q.end(), wq)) << "queries of layer " << first + l;
      }
    }
  }
  std::vector<uint8_t> buf(m.AppendBytes(10, 1));
  EXPECT_THAT(m.FillAppend(5, 15, 0, 1, buf.data()), StatusIs(absl::StatusCode::kInvalidArgument));
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

TEST(ProcessCpuTest, StatTicksAreUtimePlusStimeCountedFromTheLastParenthesis) {
  // A command name with spaces and parentheses: fields count from the last ')'.
  long long system = -1;
  EXPECT_EQ(StatCpuTicks("4242 (icecached (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 "
                         "1234 56 0 0 20 0 9 0 77 1000 200",
                         &system),
            1234 + 56);
  EXPECT_EQ(system, 56);
  EXPECT_EQ(StatCpuTicks("4242 (icecached) S 1 2 3"), -1);  // too few fields
  EXPECT_EQ(StatCpuTicks("no parenthesis"), -1);
  EXPECT_EQ(StatCpuTicks("1 (a) S 1 1 1 0 -1 0 0 0 0 0 x 3"), -1);  // not a number
}

TEST(ProcessCpuTest, ThisProcessCountsItsOwnWorkAndAMissingOneIsNaN) {
  const double before = ProcessCpuSeconds();
  const double proc_before = ProcessCpuSeconds(getpid());
  // Work for about 50 ms of CPU (clock ticks are 10 ms).
  const auto t0 = std::chrono::steady_clock::now();
  volatile double sink = 0;
  while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(50)) sink = sink + 1.0;
  EXPECT_GT(ProcessCpuSeconds(), before);
  ASSERT_TRUE(std::isfinite(proc_before));
  EXPECT_GE(ProcessCpuSeconds(getpid()), proc_before);
  EXPECT_TRUE(std::isnan(ProcessCpuSeconds(pid_t{0})));
  EXPECT_TRUE(std::isnan(ProcessCpuSeconds(pid_t{-1})));
  const CpuTimes t = ProcessCpuTimes(getpid());
  EXPECT_GE(t.system, 0.0);
  EXPECT_LE(t.system, t.total);
}

}  // namespace
}  // namespace icecache::bench
