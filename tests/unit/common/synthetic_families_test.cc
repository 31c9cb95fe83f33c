// One statistical test per property the robustness families vary
// (SyntheticFamilyNames()), on the small shape: each checks that the family
// has the property, and where the base model has some of it, clearly more.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "common/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

SyntheticConfig Small(const std::string& family, int q_heads = 4) {
  SyntheticConfig c = *SyntheticPreset("small");
  c.tokens = 2048;
  c.layers = 2;
  c.steps = 16;
  c.q_heads = q_heads;
  c.threads = 1;
  EXPECT_THAT(ApplySyntheticFamily(family, &c), IsOk());
  return c;
}

const float* Query(const KvDump& d, int s, int l, int qh) {
  return d.queries.data() + ((static_cast<size_t>(s) * d.layers + l) * d.q_heads + qh) * d.head_dim;
}

std::vector<double> Logits(const KvDump& d, int s, int l, int qh) {
  const int dim = d.head_dim;
  const float* q = Query(d, s, l, qh);
  const float* keys = d.key(l, qh / d.group_size());
  std::vector<double> out(d.tokens);
  for (int64_t t = 0; t < d.tokens; ++t) {
    double x = 0;
    for (int i = 0; i < dim; ++i) x += static_cast<double>(q[i]) * keys[t * dim + i];
    out[t] = x / std::sqrt(static_cast<double>(dim));
  }
  return out;
}

std::vector<double> Probs(const KvDump& d, int s, int l, int qh) {
  std::vector<double> p = Logits(d, s, l, qh);
  const double mx = *std::max_element(p.begin(), p.end());
  double z = 0;
  for (double& x : p) z += (x = std::exp(x - mx));
  for (double& x : p) x /= z;
  return p;
}

// The k highest-probability positions at or after `from`.
std::set<int64_t> TopK(const std::vector<double>& p, int k, int64_t from) {
  std::vector<int64_t> idx(p.size() - from);
  std::iota(idx.begin(), idx.end(), from);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int64_t a, int64_t b) { return p[a] > p[b]; });
  return std::set<int64_t>(idx.begin(), idx.begin() + k);
}

double Jaccard(const std::set<int64_t>& a, const std::set<int64_t>& b) {
  int inter = 0;
  for (int64_t x : a) inter += b.count(x);
  return static_cast<double>(inter) / static_cast<double>(a.size() + b.size() - inter);
}

double Quantile(std::vector<double> v, double q) {
  const size_t i = static_cast<size_t>(q * (v.size() - 1));
  std::nth_element(v.begin(), v.begin() + i, v.end());
  return v[i];
}

TEST(SyntheticFamiliesTest, NamedSelectableAndValidated) {
  const auto names = SyntheticFamilyNames();
  EXPECT_GE(names.size(), 7u);
  const auto presets = SyntheticPresetNames();
  for (const auto& n : names) {
    EXPECT_NE(std::find(presets.begin(), presets.end(), n), presets.end()) << n;
    auto c = SyntheticPreset(n);
    ASSERT_THAT(c, IsOk()) << n;
    EXPECT_EQ(c->head_dim, 128) << n;  // the llama3-8b-like shape
  }
  SyntheticConfig c;
  EXPECT_THAT(ApplySyntheticFamily("nope", &c),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("gqa-divergent")));
  c = Small("baseline");
  c.temperature_spread = 0.5f;
  EXPECT_THAT(GenerateSynthetic(c).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("temperature_spread")));
  c = Small("baseline");
  c.tokens = 100;  // the families' sizes are not checked while they are off
  EXPECT_THAT(GenerateSynthetic(c).status(), IsOk());
  c = Small("local-heads");
  c.local_window = c.tokens;
  EXPECT_THAT(GenerateSynthetic(c).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("local_window")));
}

// One query head of a group retrieves a rare token while the others follow
// topics: they attend to different tokens.
TEST(SyntheticFamiliesTest, GqaDivergentGroupsAttendToDifferentTokens) {
  SyntheticConfig c = Small("gqa-divergent", 8);
  SyntheticTruth truth;
  auto d = GenerateSynthetic(c, &truth);
  ASSERT_THAT(d, IsOk());
  const int g = c.q_heads / c.kv_heads;
  int hits = 0, retrieval_steps = 0;
  double own_mass = 0, others_mass = 0, jaccard = 0;
  int others = 0;
  for (int l = 0; l < c.layers; ++l) {
    for (int h = 0; h < c.kv_heads; ++h) {
      int r = -1;
      for (int j = 0; j < g; ++j) r = truth.retrieval[l * c.q_heads + h * g + j] ? h * g + j : r;
      ASSERT_GE(r, 0) << "every group has a retrieval head";
      for (int s = 0; s < c.steps; ++s) {
        const int64_t target = truth.retrieval_target[(s * c.layers + l) * c.q_heads + r];
        ASSERT_GE(target, c.sink_tokens);
        const auto pr = Probs(*d, s, l, r);
        hits += TopK(pr, 4, c.sink_tokens).count(target);
        own_mass += pr[target];
        ++retrieval_steps;
        const auto top_r = TopK(pr, 32, c.sink_tokens);
        for (int j = 0; j < g; ++j) {
          if (h * g + j == r) continue;
          const auto po = Probs(*d, s, l, h * g + j);
          others_mass += po[target];
          jaccard += Jaccard(top_r, TopK(po, 32, c.sink_tokens));
          ++others;
        }
      }
    }
  }
  EXPECT_GE(hits, retrieval_steps * 8 / 10);
  EXPECT_GT(own_mass / retrieval_steps, 0.2);
  EXPECT_LT(others_mass / others, 0.01);
  EXPECT_LT(jaccard / others, 0.15);
}

// Temperatures spread over a wide range, and act on the logits: a head's
// ordinary logits scale with its factor against the same head without it.
TEST(SyntheticFamiliesTest, TemperatureSpreadScalesEachHeadsLogits) {
  SyntheticConfig c = Small("temperature-spread");
  SyntheticTruth truth;
  auto d = GenerateSynthetic(c, &truth);
  auto base = GenerateSynthetic(Small("baseline"));
  ASSERT_THAT(d, IsOk());
  ASSERT_THAT(base, IsOk());
  const auto [lo, hi] = std::minmax_element(truth.temperature.begin(), truth.temperature.end());
  EXPECT_GE(*hi / *lo, 3.0f);
  auto spread = [&](const KvDump& dump, int l, int qh) {
    auto x = Logits(dump, 0, l, qh);
    x.erase(x.begin(), x.begin() + c.sink_tokens);
    double m = 0, v = 0;
    for (double y : x) m += y / x.size();
    for (double y : x) v += (y - m) * (y - m) / x.size();
    return std::sqrt(v);
  };
  for (int l = 0; l < c.layers; ++l) {
    for (int qh = 0; qh < c.q_heads; ++qh) {
      const double ratio = spread(*d, l, qh) / spread(*base, l, qh);
      EXPECT_NEAR(ratio, truth.temperature[l * c.q_heads + qh], 0.1 * ratio) << l << "/" << qh;
    }
  }
}

// Distance between the mean query and the mean key, in units of the keys' spread.
// Distance between each query head's mean query (over steps) and the mean
// key, outside the sink dims (where every query has its large sink part), in
// units of the keys' spread; averaged over query heads.
double QueryKeyGap(const KvDump& d, int sinks, const std::vector<int>& sink_dims) {
  const int dim = d.head_dim, g = d.group_size();
  double gap = 0;
  for (int h = 0; h < d.kv_heads; ++h) {
    std::vector<double> km(dim, 0.0);
    double kvar = 0;
    const int64_t n = d.tokens - sinks;
    for (int64_t t = sinks; t < d.tokens; ++t)
      for (int i = 0; i < dim; ++i) km[i] += d.key(0, h)[t * dim + i] / n;
    for (int64_t t = sinks; t < d.tokens; ++t)
      for (int i = 0; i < dim; ++i) kvar += std::pow(d.key(0, h)[t * dim + i] - km[i], 2) / n;
    for (int j = 0; j < g; ++j) {
      std::vector<double> qm(dim, 0.0);
      for (int s = 0; s < d.steps; ++s)
        for (int i = 0; i < dim; ++i) qm[i] += d.query(s, 0, h)[j * dim + i] / d.steps;
      double dist = 0;
      for (int i = 0; i < dim; ++i) {
        const bool sink = std::find(sink_dims.begin(), sink_dims.end(), i) != sink_dims.end();
        if (!sink) dist += (qm[i] - km[i]) * (qm[i] - km[i]);
      }
      gap += std::sqrt(dist / kvar) / (d.kv_heads * g);
    }
  }
  return gap;
}

TEST(SyntheticFamiliesTest, ShiftedQueriesLieFurtherFromTheKeys) {
  SyntheticConfig c = Small("shifted-queries");
  SyntheticTruth truth;
  auto d = GenerateSynthetic(c, &truth);
  auto base = GenerateSynthetic(Small("baseline"));
  ASSERT_THAT(d, IsOk());
  ASSERT_THAT(base, IsOk());
  const double gap = QueryKeyGap(*d, c.sink_tokens, truth.sink_dims),
               base_gap = QueryKeyGap(*base, c.sink_tokens, truth.sink_dims);
  std::printf("query-key gap: shifted %.2f, baseline %.2f key spreads\n", gap, base_gap);
  EXPECT_GT(gap, 1.3 * base_gap);
}

TEST(SyntheticFamiliesTest, HeavySinksTakeMostMassWithTinyNorm) {
  SyntheticConfig c = Small("heavy-sinks");
  auto d = GenerateSynthetic(c);
  ASSERT_THAT(d, IsOk());
  double mass = 0;
  int n = 0;
  for (int l = 0; l < c.layers; ++l) {
    for (int qh = 0; qh < c.q_heads; ++qh) {
      for (int s = 0; s < c.steps; ++s) {
        auto p = ProfileAttention(*d, s, l, qh, c.sink_tokens, 64);
        ASSERT_THAT(p, IsOk());
        mass += p->sink_mass;
        ++n;
      }
    }
  }
  EXPECT_GT(mass / n, 0.5);
  const int dim = c.head_dim;
  for (int h = 0; h < c.kv_heads; ++h) {
    std::vector<double> norms;
    for (int64_t t = c.sink_tokens; t < c.tokens; ++t) {
      double x = 0;
      for (int i = 0; i < dim; ++i) x += std::pow(d->key(0, h)[t * dim + i], 2);
      norms.push_back(std::sqrt(x));
    }
    const double median = Quantile(norms, 0.5);
    for (int t = 0; t < c.sink_tokens; ++t) {
      double x = 0;
      for (int i = 0; i < dim; ++i) x += std::pow(d->key(0, h)[t * dim + i], 2);
      EXPECT_LT(std::sqrt(x), 0.25 * median) << "sink " << t;
    }
  }
}

// Local heads put a large share on the last positions, decaying with
// distance; the other heads do not.
TEST(SyntheticFamiliesTest, LocalHeadsAttendToRecentPositions) {
  SyntheticConfig c = Small("local-heads", 8);
  c.local_window = 64;
  SyntheticTruth truth;
  auto d = GenerateSynthetic(c, &truth);
  ASSERT_THAT(d, IsOk());
  double local_recent = 0, local_before = 0, other_recent = 0;
  int nl = 0, no = 0;
  const int64_t T = c.tokens, W = c.local_window;
  for (int l = 0; l < c.layers; ++l) {
    for (int qh = 0; qh < c.q_heads; ++qh) {
      for (int s = 0; s < c.steps; s += 3) {
        const auto p = Probs(*d, s, l, qh);
        const double recent = std::accumulate(p.end() - W, p.end(), 0.0);
        if (truth.local[l * c.q_heads + qh]) {
          local_recent += recent;
          local_before += std::accumulate(p.end() - 4 * W, p.end() - 3 * W, 0.0);
          ++nl;
        } else {
          other_recent += recent;
          ++no;
        }
      }
    }
  }
  ASSERT_GT(nl, 0);
  ASSERT_GT(no, 0);
  EXPECT_GT(local_recent / nl, 0.25);
  EXPECT_GT(local_recent, 5 * local_before);
  EXPECT_LT(other_recent / no, 0.1);
  EXPECT_LT(static_cast<double>(W) / T, 0.05);
}

// Each needle stands out for its query at its step and is rarely among the
// same head's top tokens at the other steps.
TEST(SyntheticFamiliesTest, RareNeedlesAreRetrievedOnlyNowAndThen) {
  SyntheticConfig c = Small("rare-needles");
  SyntheticTruth truth;
  auto d = GenerateSynthetic(c, &truth);
  ASSERT_THAT(d, IsOk());
  ASSERT_EQ(static_cast<int>(truth.needles.size()), c.layers * c.kv_heads * c.needles);
  int at_step = 0, stands_out = 0, checked = 0;
  for (size_t i = 0; i < truth.needles.size(); i += 4, ++checked) {
    const SyntheticNeedle& nd = truth.needles[i];
    std::vector<double> other;
    double at = 0;
    for (int s = 0; s < c.steps; ++s) {
      const auto p = Probs(*d, s, nd.layer, nd.q_head);
      if (s == nd.step) {
        at = p[nd.token];
        at_step += TopK(p, 32, c.sink_tokens).count(nd.token);
      } else {
        other.push_back(p[nd.token]);
      }
    }
    stands_out += at > 3 * Quantile(other, 0.5);
  }
  EXPECT_GE(at_step, checked * 9 / 10);
  EXPECT_GE(stands_out, checked * 8 / 10);
}

TEST(SyntheticFamiliesTest, ScatteredTopicsInterleaveInShortRuns) {
  auto runs = [](const SyntheticConfig& c, double* distinct_per_window) {
    SyntheticTruth truth;
    auto d = GenerateSynthetic(c, &truth);
    EXPECT_THAT(d, IsOk());
    const auto& tt = truth.token_topic;
    int count = 0;
    for (size_t t = c.sink_tokens; t < tt.size(); ++t) count += t == 0 || tt[t] != tt[t - 1];
    double distinct = 0;
    int windows = 0;
    for (size_t w = c.sink_tokens; w + 256 <= tt.size(); w += 256, ++windows) {
      distinct += std::set<int32_t>(tt.begin() + w, tt.begin() + w + 256).size();
    }
    *distinct_per_window = distinct / windows;
    return static_cast<double>(tt.size() - c.sink_tokens) / count;
  };
  double distinct = 0, base_distinct = 0;
  const double run = runs(Small("scattered-topics"), &distinct);
  const double base_run = runs(Small("baseline"), &base_distinct);
  std::printf("mean topic run %.1f (baseline %.1f); topics per 256 tokens %.1f (baseline %.1f)\n",
              run, base_run, distinct, base_distinct);
  EXPECT_LT(run, 16);
  EXPECT_GT(distinct, 16);
  EXPECT_GT(distinct, 3 * base_distinct);
}

double NormTail(const KvDump& d, int sinks) {
  const int dim = d.head_dim;
  std::vector<double> norms;
  for (int h = 0; h < d.kv_heads; ++h) {
    for (int64_t t = sinks; t < d.tokens; ++t) {
      double x = 0;
      for (int i = 0; i < dim; ++i) x += std::pow(d.key(0, h)[t * dim + i], 2);
      norms.push_back(std::sqrt(x));
    }
  }
  return Quantile(norms, 0.99) / Quantile(norms, 0.5);
}

TEST(SyntheticFamiliesTest, HeavyTailedKeyNorms) {
  SyntheticConfig c = Small("heavy-tailed-norms");
  auto d = GenerateSynthetic(c);
  auto base = GenerateSynthetic(Small("baseline"));
  ASSERT_THAT(d, IsOk());
  ASSERT_THAT(base, IsOk());
  const double tail = NormTail(*d, c.sink_tokens), base_tail = NormTail(*base, c.sink_tokens);
  std::printf("key norm p99/p50: %.2f (baseline %.2f)\n", tail, base_tail);
  EXPECT_GT(tail, 2.0);
  EXPECT_GT(tail, 1.6 * base_tail);
}

// Consecutive decode steps share fewer of their top tokens.
double StepOverlap(const KvDump& d, int sinks) {
  double j = 0;
  int n = 0;
  for (int qh = 0; qh < d.q_heads; ++qh) {
    for (int s = 0; s + 1 < d.steps; ++s) {
      j += Jaccard(TopK(Probs(d, s, 0, qh), 32, sinks), TopK(Probs(d, s + 1, 0, qh), 32, sinks));
      ++n;
    }
  }
  return j / n;
}

TEST(SyntheticFamiliesTest, DriftingQueriesChangeFocusFromStepToStep) {
  SyntheticConfig c = Small("drifting-queries");
  c.layers = 1;
  SyntheticConfig b = Small("baseline");
  b.layers = 1;
  auto d = GenerateSynthetic(c);
  auto base = GenerateSynthetic(b);
  ASSERT_THAT(d, IsOk());
  ASSERT_THAT(base, IsOk());
  const double o = StepOverlap(*d, c.sink_tokens), base_o = StepOverlap(*base, c.sink_tokens);
  std::printf("top-32 overlap of consecutive steps: %.3f (baseline %.3f)\n", o, base_o);
  EXPECT_LT(o, 0.7 * base_o);
}

TEST(SyntheticFamiliesTest, MixtureHasEveryRole) {
  SyntheticConfig c = Small("mixture", 8);
  c.local_window = 64;
  SyntheticTruth truth;
  auto d = GenerateSynthetic(c, &truth);
  ASSERT_THAT(d, IsOk());
  EXPECT_GT(std::count(truth.retrieval.begin(), truth.retrieval.end(), 1), 0);
  EXPECT_GT(std::count(truth.local.begin(), truth.local.end(), 1), 0);
  const auto [lo, hi] = std::minmax_element(truth.temperature.begin(), truth.temperature.end());
  EXPECT_GT(*hi / *lo, 1.2f);
  EXPECT_FALSE(truth.rare_tokens.empty());
}

}  // namespace
}  // namespace icecache
