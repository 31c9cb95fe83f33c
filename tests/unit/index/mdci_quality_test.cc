// Quality of the mdci selector on the realistic synthetic generator
// (llama3-8b-like preset, 16384 tokens): attention mass against exact-mdci
// (the best on the same layout) and exact positional pages, and bulk against
// incremental builds.
#include <memory>
#include <vector>

#include "common/synthetic.h"
#include "gtest/gtest.h"
#include "server/index/mdci_selector.h"
#include "server/index/owned_page_keys.h"
#include "server/index/quality.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;

struct Built {
  std::unique_ptr<OwnedPageKeys> keys;
  std::unique_ptr<Selector> sel;
};

Built BuildSelector(SelectorKind kind, const KvDump& dump, int head, bool incremental,
                    float decode_slack = 1.5f) {
  SelectorConfig c;
  c.mdci.decode_slack = decode_slack;
  c.kind = kind;
  c.head_dim = dump.head_dim;
  c.page_tokens = 16;
  c.num_query_heads = dump.group_size();
  c.dtype = DType::kF16;
  Built b;
  auto keys = OwnedPageKeys::ForSelector(c);
  EXPECT_THAT(keys, IsOk());
  b.keys = std::move(keys).value();
  auto sel = Selector::Create(c, b.keys.get());
  EXPECT_THAT(sel, IsOk());
  b.sel = std::move(sel).value();
  const float* k = dump.key(0, head);
  std::vector<Placement> pl;
  if (!incremental) {
    EXPECT_THAT(b.sel->Build(k, dump.tokens, &pl), IsOk());
    EXPECT_THAT(b.keys->Apply(pl, k), IsOk());
  } else {
    // A short prefill, then decode chunks of 64.
    EXPECT_THAT(b.sel->Build(k, 1024, &pl), IsOk());
    EXPECT_THAT(b.keys->Apply(pl, k), IsOk());
    for (int64_t i = 1024; i < dump.tokens; i += 64) {
      const int64_t n = std::min<int64_t>(64, dump.tokens - i);
      EXPECT_THAT(b.sel->Insert(k + i * dump.head_dim, n, &pl), IsOk());
      EXPECT_THAT(b.keys->Apply(pl, k + i * dump.head_dim), IsOk());
    }
  }
  return b;
}

class MdciQualityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto cfg = SyntheticPreset("llama3-8b-like");
    ASSERT_THAT(cfg, IsOk());
    cfg->tokens = 16384;
    cfg->layers = 1;
    cfg->q_heads = cfg->q_heads / cfg->kv_heads * 3;
    cfg->kv_heads = 3;
    cfg->steps = 4;
    auto dump = GenerateSynthetic(*cfg);
    ASSERT_THAT(dump, IsOk());
    dump_ = new KvDump(std::move(dump).value());
  }
  static void TearDownTestSuite() {
    delete dump_;
    dump_ = nullptr;
  }
  // Mean attention-mass recall of `sel` over every head and step.
  static double MeanMass(const std::vector<Built>& per_head, uint64_t* touched = nullptr) {
    const KvDump& d = *dump_;
    double sum = 0.0;
    int count = 0;
    for (int h = 0; h < d.kv_heads; ++h) {
      for (int s = 0; s < d.steps; ++s) {
        auto exact = ComputeExactAttention(d.key(0, h), nullptr, d.tokens, d.head_dim,
                                           d.query(s, 0, h), d.group_size());
        EXPECT_THAT(exact, IsOk());
        SelectParams sp;
        sp.budget_tokens = 256;
        Selection sel;
        EXPECT_THAT(per_head[h].sel->Select(d.query(s, 0, h), d.group_size(), sp, &sel), IsOk());
        if (touched != nullptr) *touched = std::max(*touched, sel.keys_touched);
        auto r = EvaluateSelection(*exact, nullptr, *per_head[h].sel, sel, 256);
        EXPECT_THAT(r, IsOk());
        sum += r->mass_recall;
        ++count;
      }
    }
    return sum / count;
  }
  static std::vector<Built> BuildAll(SelectorKind kind, bool incremental = false,
                                     float decode_slack = 1.5f) {
    std::vector<Built> v;
    for (int h = 0; h < dump_->kv_heads; ++h) {
      v.push_back(BuildSelector(kind, *dump_, h, incremental, decode_slack));
    }
    return v;
  }
  static double MeanFill(const std::vector<Built>& v) {
    double f = 0.0;
    for (const auto& b : v) f += static_cast<const MdciSelector*>(b.sel.get())->mean_page_fill();
    return f / v.size();
  }
  static KvDump* dump_;
};
KvDump* MdciQualityTest::dump_ = nullptr;

TEST_F(MdciQualityTest, MdciMassWithinReachOfExactMdciWhichBeatsPositional) {
  uint64_t touched = 0;
  const double mdci = MeanMass(BuildAll(SelectorKind::kMdci), &touched);
  const double exact_mdci = MeanMass(BuildAll(SelectorKind::kExactMdci));
  const double positional = MeanMass(BuildAll(SelectorKind::kExact));
  RecordProperty("mass_mdci", std::to_string(mdci));
  RecordProperty("mass_exact_mdci", std::to_string(exact_mdci));
  RecordProperty("mass_exact_positional", std::to_string(positional));
  std::printf(
      "mass: mdci %.4f exact-mdci %.4f exact positional %.4f (max keys touched %llu of %lld)\n",
      mdci, exact_mdci, positional, static_cast<unsigned long long>(touched),
      static_cast<long long>(dump_->tokens));
  EXPECT_GE(mdci, exact_mdci - 0.05);
  EXPECT_GT(exact_mdci, positional);
  EXPECT_LT(touched, static_cast<uint64_t>(dump_->tokens) * 4 / 10);
}

TEST_F(MdciQualityTest, BulkBuildSelectsAsWellAsIncremental) {
  const double bulk = MeanMass(BuildAll(SelectorKind::kMdci));
  for (float slack : {1.0f, 1.5f, 3.0f}) {
    auto inc = BuildAll(SelectorKind::kMdci, /*incremental=*/true, slack);
    const double incremental = MeanMass(inc);
    std::printf("mass: mdci bulk %.4f incremental %.4f (decode_slack %.1f, mean fill %.3f)\n", bulk,
                incremental, slack, MeanFill(inc));
    EXPECT_GE(bulk, incremental - 0.02);
  }
}

}  // namespace
}  // namespace icecache
