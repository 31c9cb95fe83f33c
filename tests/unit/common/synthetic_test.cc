#include "common/synthetic.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <numeric>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

SyntheticConfig SmallConfig() {
  SyntheticConfig c = *SyntheticPreset("small");
  c.tokens = 2048;
  c.layers = 2;
  c.steps = 8;
  c.threads = 1;
  return c;
}

double Dot(const float* a, const float* b, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}
double Norm(const float* a, int n) { return std::sqrt(Dot(a, a, n)); }

// Eigenvalues (descending) of a symmetric matrix (row-major, n x n) by cyclic
// Jacobi; with `vectors`, also the matching unit eigenvectors (one per row).
std::vector<double> SymmetricEigen(std::vector<double> a, int n, std::vector<double>* vectors) {
  std::vector<double> v(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) v[i * n + i] = 1.0;
  for (int sweep = 0; sweep < 30; ++sweep) {
    double off = 0;
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) off += a[p * n + q] * a[p * n + q];
    if (off < 1e-18) break;
    for (int p = 0; p < n; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const double apq = a[p * n + q];
        if (std::fabs(apq) < 1e-300) continue;
        const double theta = (a[q * n + q] - a[p * n + p]) / (2 * apq);
        const double t =
            (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < n; ++k) {  // columns p, q
          const double akp = a[k * n + p], akq = a[k * n + q];
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {  // rows p, q
          const double apk = a[p * n + k], aqk = a[q * n + k];
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
        for (int k = 0; k < n; ++k) {  // eigenvectors are the columns of v
          const double vkp = v[k * n + p], vkq = v[k * n + q];
          v[k * n + p] = c * vkp - s * vkq;
          v[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int x, int y) { return a[x * n + x] > a[y * n + y]; });
  std::vector<double> ev(n);
  for (int i = 0; i < n; ++i) ev[i] = a[order[i] * n + order[i]];
  if (vectors != nullptr) {
    vectors->assign(static_cast<size_t>(n) * n, 0.0);
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < n; ++k) (*vectors)[i * n + k] = v[k * n + order[i]];
  }
  return ev;
}

std::vector<double> SymmetricEigenvalues(std::vector<double> a, int n) {
  return SymmetricEigen(std::move(a), n, nullptr);
}

// Share of the variance of `cov` (n x n) inside the span of the unit rows
// `basis[0..k)`.
double VarianceShareIn(const std::vector<double>& cov, int n, const std::vector<double>& basis,
                       int k) {
  double total = 0, inside = 0;
  for (int i = 0; i < n; ++i) total += cov[i * n + i];
  for (int j = 0; j < k; ++j) {
    const double* u = &basis[static_cast<size_t>(j) * n];
    for (int a = 0; a < n; ++a)
      for (int b = 0; b < n; ++b) inside += u[a] * cov[a * n + b] * u[b];
  }
  return inside / total;
}

// Covariance (n x n) of `rows` rows of `n` values.
std::vector<double> Covariance(const float* rows, int64_t count, int n) {
  std::vector<double> mean(n, 0.0), cov(static_cast<size_t>(n) * n, 0.0);
  for (int64_t t = 0; t < count; ++t)
    for (int i = 0; i < n; ++i) mean[i] += rows[t * n + i];
  for (auto& m : mean) m /= count;
  for (int64_t t = 0; t < count; ++t) {
    for (int i = 0; i < n; ++i) {
      const double xi = rows[t * n + i] - mean[i];
      for (int j = 0; j < n; ++j) cov[i * n + j] += xi * (rows[t * n + j] - mean[j]);
    }
  }
  for (auto& x : cov) x /= count;
  return cov;
}

TEST(SyntheticTest, PresetsAndValidation) {
  for (const std::string& name : SyntheticPresetNames()) {
    ASSERT_THAT(SyntheticPreset(name), IsOk()) << name;
  }
  auto llama = *SyntheticPreset("llama3-8b-like");
  EXPECT_EQ(llama.head_dim, 128);
  EXPECT_EQ(llama.kv_heads, 8);
  EXPECT_EQ(llama.q_heads, 32);
  EXPECT_EQ(llama.rope_theta, 500000.0);
  EXPECT_THAT(SyntheticPreset("gpt-9"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::AllOf(HasSubstr("gpt-9"), HasSubstr("llama3-8b-like"),
                                        HasSubstr("small"))));

  struct Bad {
    const char* field;
    void (*mutate)(SyntheticConfig&);
  };
  const Bad bads[] = {
      {"q_heads", [](SyntheticConfig& c) { c.q_heads = 3; }},
      {"head_dim", [](SyntheticConfig& c) { c.head_dim = 63; }},
      {"tokens", [](SyntheticConfig& c) { c.tokens = 0; }},
      {"layers", [](SyntheticConfig& c) { c.layers = 0; }},
      {"rank", [](SyntheticConfig& c) { c.rank = 0; }},
      {"rope_theta", [](SyntheticConfig& c) { c.rope_theta = std::nan(""); }},
      {"outlier_channels", [](SyntheticConfig& c) { c.outlier_channels = 1000; }},
      {"sink_tokens", [](SyntheticConfig& c) { c.sink_tokens = -1; }},
      {"needles", [](SyntheticConfig& c) { c.needles = 1 << 30; }},
      {"needles", [](SyntheticConfig& c) { c.needles = 2000; }},
      {"step_locality", [](SyntheticConfig& c) { c.step_locality = 1.5f; }},
      {"peaked_fraction", [](SyntheticConfig& c) { c.peaked_fraction = std::nanf(""); }},
      {"mean_segment", [](SyntheticConfig& c) { c.mean_segment = 0; }},
      {"steps", [](SyntheticConfig& c) { c.steps = 0; }},
  };
  for (const Bad& b : bads) {
    SyntheticConfig c = SmallConfig();
    b.mutate(c);
    EXPECT_THAT(GenerateSynthetic(c),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(b.field)))
        << b.field;
  }
}

TEST(SyntheticTest, ShapesAndLongContextsAreAllowed) {
  SyntheticConfig c;
  c.layers = 1;
  c.kv_heads = 1;
  c.q_heads = 2;
  c.head_dim = 16;
  c.rank = 4;
  c.outlier_channels = 1;
  c.tokens = 262144;
  c.steps = 2;
  c.topics = 8;
  c.needles = 2;
  auto dump = GenerateSynthetic(c);
  ASSERT_THAT(dump, IsOk());
  EXPECT_EQ(dump->tokens, 262144);
  EXPECT_EQ(dump->keys.size(), size_t{262144} * 16);
  EXPECT_EQ(dump->values.size(), dump->keys.size());
  EXPECT_EQ(dump->queries.size(), size_t{2} * 2 * 16);
  EXPECT_EQ(dump->rope_theta, c.rope_theta);
  for (float x : dump->keys) ASSERT_TRUE(std::isfinite(x));
  for (float x : dump->queries) ASSERT_TRUE(std::isfinite(x));
}

TEST(SyntheticTest, DeterministicForSeedAndThreadCount) {
  SyntheticConfig c = SmallConfig();
  c.tokens = 5000;  // three blocks of keys, so key generation is split too
  auto a = GenerateSynthetic(c);
  c.threads = 3;
  auto b = GenerateSynthetic(c);
  ASSERT_THAT(a, IsOk());
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(a->keys, b->keys);
  EXPECT_EQ(a->values, b->values);
  EXPECT_EQ(a->queries, b->queries);
  c.seed = 43;
  auto other = GenerateSynthetic(c);
  ASSERT_THAT(other, IsOk());
  size_t differ = 0;
  for (size_t i = 0; i < a->keys.size(); ++i) differ += a->keys[i] != other->keys[i];
  EXPECT_GT(differ, a->keys.size() * 9 / 10);
  EXPECT_NE(a->queries, other->queries);
}

// A slice of the KV heads is exactly those heads of the whole dump: keys,
// values (needles and rare keys planted in them included) and their query
// heads. The decode benchmark builds a model a head at a time this way.
TEST(SyntheticTest, HeadSliceEqualsThoseHeadsOfTheWholeDump) {
  for (const char* family : {"baseline", "mixture"}) {
    SCOPED_TRACE(family);
    SyntheticConfig c = SmallConfig();
    c.kv_heads = 4;
    c.q_heads = 8;
    c.tokens = 1500;
    c.steps = 3;
    ASSERT_THAT(ApplySyntheticFamily(family, &c), IsOk());
    auto whole = GenerateSynthetic(c);
    ASSERT_THAT(whole, IsOk());
    const int d = c.head_dim, group = c.q_heads / c.kv_heads;
    const size_t rows = static_cast<size_t>(c.tokens) * d;
    for (int begin : {0, 1, 3}) {
      SyntheticConfig sc = c;
      sc.kv_head_begin = begin;
      sc.kv_head_count = begin == 1 ? 2 : 1;
      sc.threads = 2;
      auto slice = GenerateSynthetic(sc);
      ASSERT_THAT(slice, IsOk());
      const int n = sc.kv_head_count;
      ASSERT_EQ(slice->kv_heads, n);
      ASSERT_EQ(slice->q_heads, n * group);
      for (int l = 0; l < c.layers; ++l) {
        for (int i = 0; i < n; ++i) {
          const size_t from = (static_cast<size_t>(l) * c.kv_heads + begin + i) * rows;
          const size_t to = (static_cast<size_t>(l) * n + i) * rows;
          EXPECT_TRUE(std::equal(whole->keys.begin() + from, whole->keys.begin() + from + rows,
                                 slice->keys.begin() + to))
              << "keys of layer " << l << " head " << begin + i;
          EXPECT_TRUE(std::equal(whole->values.begin() + from, whole->values.begin() + from + rows,
                                 slice->values.begin() + to))
              << "values of layer " << l << " head " << begin + i;
        }
        for (int s = 0; s < c.steps; ++s) {
          const size_t qrow = static_cast<size_t>(n) * group * d;
          const size_t from =
              ((static_cast<size_t>(s) * c.layers + l) * c.q_heads + begin * group) * d;
          const size_t to = (static_cast<size_t>(s) * c.layers + l) * qrow;
          EXPECT_TRUE(std::equal(whole->queries.begin() + from,
                                 whole->queries.begin() + from + qrow, slice->queries.begin() + to))
              << "queries of step " << s << " layer " << l;
        }
      }
    }
    SyntheticConfig bad = c;
    bad.kv_head_begin = 3;
    bad.kv_head_count = 2;
    EXPECT_THAT(GenerateSynthetic(bad), StatusIs(absl::StatusCode::kInvalidArgument));
    bad.kv_head_count = 1;
    SyntheticTruth truth;
    EXPECT_THAT(GenerateSynthetic(bad, &truth), StatusIs(absl::StatusCode::kInvalidArgument));
  }
}

TEST(SyntheticTest, SinksTakeLargeMassWithSmallNorm) {
  SyntheticConfig c = SmallConfig();
  auto dump = GenerateSynthetic(c);
  ASSERT_THAT(dump, IsOk());
  const int d = c.head_dim;
  double sink_mass = 0;
  int n = 0;
  for (int l = 0; l < c.layers; ++l) {
    for (int qh = 0; qh < c.q_heads; ++qh) {
      for (int s = 0; s < c.steps; ++s) {
        auto p = ProfileAttention(*dump, s, l, qh, c.sink_tokens, 256);
        ASSERT_THAT(p, IsOk());
        sink_mass += p->sink_mass;
        ++n;
      }
    }
    for (int h = 0; h < c.kv_heads; ++h) {
      std::vector<double> norms;
      for (int64_t t = 0; t < c.tokens; ++t) norms.push_back(Norm(dump->key(l, h) + t * d, d));
      std::vector<double> sorted = norms;
      std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
      const double median = sorted[sorted.size() / 2];
      for (int t = 0; t < c.sink_tokens; ++t) EXPECT_LT(norms[t], 0.6 * median) << "sink " << t;
    }
  }
  sink_mass /= n;
  // 4 of 2048 tokens (0.2%) take more than a tenth of the mass on average.
  EXPECT_GT(sink_mass, 0.10);
  EXPECT_LT(sink_mass, 0.9);
}

TEST(SyntheticTest, PreRopeKeysAreLowRankWithOutlierChannels) {
  SyntheticConfig c = SmallConfig();
  c.layers = 1;
  SyntheticTruth truth;
  truth.want_pre_rope_keys = true;
  auto dump = GenerateSynthetic(c, &truth);
  ASSERT_THAT(dump, IsOk());
  ASSERT_EQ(truth.pre_rope_keys.size(), dump->keys.size());
  ASSERT_EQ(static_cast<int>(truth.outlier_dims.size()), c.outlier_channels);
  const int d = c.head_dim;
  for (int h = 0; h < c.kv_heads; ++h) {
    const float* pre = truth.pre_rope_keys.data() + static_cast<size_t>(h) * c.tokens * d;
    const int64_t first = c.sink_tokens;
    auto ev = SymmetricEigenvalues(Covariance(pre + first * d, c.tokens - first, d), d);
    const double total = std::accumulate(ev.begin(), ev.end(), 0.0);
    const int k = c.rank + c.outlier_channels;
    const double top = std::accumulate(ev.begin(), ev.begin() + k, 0.0);
    EXPECT_GT(top / total, 0.90) << "head " << h;
    // And clearly not full rank: the bottom half holds almost nothing.
    const double bottom = std::accumulate(ev.begin() + d / 2, ev.end(), 0.0);
    EXPECT_LT(bottom / total, 0.05);

    std::vector<double> mag(d, 0.0);
    for (int64_t t = first; t < c.tokens; ++t)
      for (int i = 0; i < d; ++i) mag[i] += std::fabs(pre[t * d + i]);
    double others = 0;
    int n_others = 0;
    for (int i = 0; i < d; ++i) {
      if (std::find(truth.outlier_dims.begin(), truth.outlier_dims.end(), i) !=
          truth.outlier_dims.end())
        continue;
      others += mag[i];
      ++n_others;
    }
    others /= n_others;
    for (int od : truth.outlier_dims) EXPECT_GT(mag[od], 3.0 * others) << "outlier dim " << od;
  }
}

TEST(SyntheticTest, QueriesComeFromAShiftedDistribution) {
  SyntheticConfig c = SmallConfig();
  c.layers = 1;
  c.steps = 64;
  auto dump = GenerateSynthetic(c);
  ASSERT_THAT(dump, IsOk());
  const int d = c.head_dim, g = c.q_heads / c.kv_heads;
  for (int h = 0; h < c.kv_heads; ++h) {
    std::vector<double> kmean(d, 0.0), qmean(d, 0.0);
    double kvar = 0;
    for (int64_t t = 0; t < c.tokens; ++t)
      for (int i = 0; i < d; ++i) kmean[i] += dump->key(0, h)[t * d + i] / c.tokens;
    for (int64_t t = 0; t < c.tokens; ++t)
      for (int i = 0; i < d; ++i) {
        const double x = dump->key(0, h)[t * d + i] - kmean[i];
        kvar += x * x / c.tokens;
      }
    for (int s = 0; s < c.steps; ++s)
      for (int j = 0; j < g; ++j)
        for (int i = 0; i < d; ++i) qmean[i] += dump->query(s, 0, h)[j * d + i] / (c.steps * g);
    double dist = 0;
    for (int i = 0; i < d; ++i) dist += (qmean[i] - kmean[i]) * (qmean[i] - kmean[i]);
    // The means are further apart than the keys' own spread.
    EXPECT_GT(std::sqrt(dist), std::sqrt(kvar)) << "head " << h;
    // Different covariance: the top principal subspace of the keys holds
    // most of the keys' variance but much less of the queries' variation
    // (each query head centred on its own mean across steps).
    std::vector<float> qrows;
    for (int j = 0; j < g; ++j) {
      std::vector<double> m(d, 0.0);
      for (int s = 0; s < c.steps; ++s)
        for (int i = 0; i < d; ++i) m[i] += dump->query(s, 0, h)[j * d + i] / c.steps;
      for (int s = 0; s < c.steps; ++s)
        for (int i = 0; i < d; ++i)
          qrows.push_back(static_cast<float>(dump->query(s, 0, h)[j * d + i] - m[i]));
    }
    auto kcov = Covariance(dump->key(0, h) + c.sink_tokens * d, c.tokens - c.sink_tokens, d);
    auto qcov = Covariance(qrows.data(), static_cast<int64_t>(qrows.size() / d), d);
    std::vector<double> kvec;
    SymmetricEigen(kcov, d, &kvec);
    const int k = c.rank + c.outlier_channels;
    const double k_share = VarianceShareIn(kcov, d, kvec, k);
    const double q_share = VarianceShareIn(qcov, d, kvec, k);
    std::printf("head %d: key top-%d subspace holds %.3f of key variance, %.3f of query variance\n",
                h, k, k_share, q_share);
    EXPECT_LT(q_share, k_share - 0.1) << "head " << h;
  }
}

TEST(SyntheticTest, PeakedHeadsHaveLowerEntropyThanFlatHeads) {
  SyntheticConfig c = SmallConfig();
  c.q_heads = 8;
  SyntheticTruth truth;
  auto dump = GenerateSynthetic(c, &truth);
  ASSERT_THAT(dump, IsOk());
  double ent[2] = {0, 0}, top[2] = {0, 0};
  int n[2] = {0, 0};
  for (int l = 0; l < c.layers; ++l) {
    for (int qh = 0; qh < c.q_heads; ++qh) {
      const int kind = truth.peaked[l * c.q_heads + qh];
      for (int s = 0; s < c.steps; ++s) {
        auto p = ProfileAttention(*dump, s, l, qh, c.sink_tokens, 64);
        ASSERT_THAT(p, IsOk());
        ent[kind] += p->entropy;
        top[kind] += p->topk_mass;
        ++n[kind];
      }
    }
  }
  ASSERT_GT(n[0], 0);
  ASSERT_GT(n[1], 0);
  EXPECT_LT(ent[1] / n[1], ent[0] / n[0] - 1.0);
  EXPECT_GT(top[1] / n[1], top[0] / n[0] + 0.1);
  EXPECT_GT(top[1] / n[1], 0.8);  // peaked: 64 of 2048 tokens hold most of the mass
}

// Centred cosine similarity of the queries of one head between steps.
double QueryLagSimilarity(const KvDump& dump, int layer, int q_head, int lag) {
  const int d = dump.head_dim;
  std::vector<double> mean(d, 0.0);
  auto q = [&](int s) {
    return dump.queries.data() +
           ((static_cast<size_t>(s) * dump.layers + layer) * dump.q_heads + q_head) * d;
  };
  for (int s = 0; s < dump.steps; ++s)
    for (int i = 0; i < d; ++i) mean[i] += q(s)[i] / dump.steps;
  double sum = 0;
  int n = 0;
  for (int s = 0; s + lag < dump.steps; ++s) {
    double ab = 0, aa = 0, bb = 0;
    for (int i = 0; i < d; ++i) {
      const double a = q(s)[i] - mean[i], b = q(s + lag)[i] - mean[i];
      ab += a * b;
      aa += a * a;
      bb += b * b;
    }
    sum += ab / std::sqrt(aa * bb);
    ++n;
  }
  return sum / n;
}

TEST(SyntheticTest, QueriesAreLocalAcrossSteps) {
  SyntheticConfig c = SmallConfig();
  c.layers = 1;
  c.steps = 48;
  auto dump = GenerateSynthetic(c);
  ASSERT_THAT(dump, IsOk());
  double near = 0, far = 0;
  for (int qh = 0; qh < c.q_heads; ++qh) {
    near += QueryLagSimilarity(*dump, 0, qh, 1);
    far += QueryLagSimilarity(*dump, 0, qh, 24);
  }
  near /= c.q_heads;
  far /= c.q_heads;
  EXPECT_GT(near, 0.4);
  EXPECT_GT(near, far + 0.3);

  // Without locality the next step is as unrelated as a distant one.
  c.step_locality = 0.0f;
  auto loose = GenerateSynthetic(c);
  ASSERT_THAT(loose, IsOk());
  double loose_near = 0;
  for (int qh = 0; qh < c.q_heads; ++qh) loose_near += QueryLagSimilarity(*loose, 0, qh, 1);
  EXPECT_LT(loose_near / c.q_heads, near - 0.2);
}

// Mean Pearson correlation between the centred keys of layers a and b, for the
// same token (perm = identity) or for shuffled tokens.
double LayerKeyCorrelation(const KvDump& dump, int h, int la, int lb, bool shuffle) {
  const int d = dump.head_dim;
  const int64_t n = dump.tokens;
  std::vector<double> ma(d, 0.0), mb(d, 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int i = 0; i < d; ++i) {
      ma[i] += dump.key(la, h)[t * d + i] / n;
      mb[i] += dump.key(lb, h)[t * d + i] / n;
    }
  double sum = 0;
  for (int64_t t = 8; t < n; ++t) {
    const int64_t u = shuffle ? 8 + (t * 7919 + 13) % (n - 8) : t;
    double ab = 0, aa = 0, bb = 0;
    for (int i = 0; i < d; ++i) {
      const double a = dump.key(la, h)[t * d + i] - ma[i], b = dump.key(lb, h)[u * d + i] - mb[i];
      ab += a * b;
      aa += a * a;
      bb += b * b;
    }
    sum += ab / std::sqrt(aa * bb);
  }
  return sum / (n - 8);
}

TEST(SyntheticTest, AdjacentLayersHaveCorrelatedKeys) {
  SyntheticConfig c = SmallConfig();
  c.layers = 3;
  auto dump = GenerateSynthetic(c);
  ASSERT_THAT(dump, IsOk());
  for (int h = 0; h < c.kv_heads; ++h) {
    const double same = LayerKeyCorrelation(*dump, h, 0, 1, false);
    const double shuffled = LayerKeyCorrelation(*dump, h, 0, 1, true);
    EXPECT_GT(same, shuffled + 0.25) << "head " << h;
    // Further apart, less alike.
    EXPECT_GT(same, LayerKeyCorrelation(*dump, h, 0, 2, false) + 0.05) << "head " << h;
  }
  c.layer_similarity = 0.0f;
  auto indep = GenerateSynthetic(c);
  ASSERT_THAT(indep, IsOk());
  EXPECT_LT(LayerKeyCorrelation(*indep, 0, 0, 1, false),
            LayerKeyCorrelation(*dump, 0, 0, 1, false) - 0.2);
}

TEST(SyntheticTest, TopicsRecurFarApartAndClusterAcrossPositions) {
  SyntheticConfig c = SmallConfig();
  c.layers = 1;
  c.tokens = 4096;
  c.mean_segment = 48;
  c.topics = 8;
  SyntheticTruth truth;
  truth.want_pre_rope_keys = true;
  auto dump = GenerateSynthetic(c, &truth);
  ASSERT_THAT(dump, IsOk());
  ASSERT_EQ(truth.segment_starts.size(), truth.segment_topics.size());
  ASSERT_GT(truth.segment_starts.size(), 20u);
  // Segments of one topic are not contiguous: consecutive segments differ
  // in topic, and frequent topics recur more than 1000 tokens apart.
  std::map<int, std::vector<int64_t>> starts_of;
  for (size_t i = 0; i < truth.segment_starts.size(); ++i) {
    if (i > 0) {
      EXPECT_NE(truth.segment_topics[i], truth.segment_topics[i - 1]);
    }
    starts_of[truth.segment_topics[i]].push_back(truth.segment_starts[i]);
  }
  int recurring = 0;
  for (auto& [topic, starts] : starts_of) {
    if (starts.size() >= 3 && starts.back() - starts.front() > 1000) ++recurring;
  }
  EXPECT_GE(recurring, 4);
  for (int64_t t = 0; t < c.tokens; ++t) {
    if (t < c.sink_tokens) {
      EXPECT_EQ(truth.token_topic[t], -1);
    } else {
      ASSERT_GE(truth.token_topic[t], 0);
      ASSERT_LT(truth.token_topic[t], c.topics);
    }
  }
  // Semantic clusters: same-topic tokens far apart are closer (centred
  // pre-RoPE cosine) than different-topic tokens right next to each other.
  const int d = c.head_dim;
  const float* pre = truth.pre_rope_keys.data();
  std::vector<double> mean(d, 0.0);
  for (int64_t t = c.sink_tokens; t < c.tokens; ++t)
    for (int i = 0; i < d; ++i) mean[i] += pre[t * d + i] / (c.tokens - c.sink_tokens);
  auto cosine = [&](int64_t a, int64_t b) {
    double ab = 0, aa = 0, bb = 0;
    for (int i = 0; i < d; ++i) {
      const double x = pre[a * d + i] - mean[i], y = pre[b * d + i] - mean[i];
      ab += x * y;
      aa += x * x;
      bb += y * y;
    }
    return ab / std::sqrt(aa * bb);
  };
  double same_far = 0, diff_near = 0;
  int n_same = 0, n_diff = 0;
  for (size_t i = 1; i < truth.segment_starts.size(); ++i) {
    const int64_t b = truth.segment_starts[i];
    if (b >= c.tokens) continue;
    diff_near += cosine(b - 1, b);  // across a segment boundary: adjacent, different topics
    ++n_diff;
    for (size_t j = i + 5; j < truth.segment_starts.size(); ++j) {
      if (truth.segment_topics[j] == truth.segment_topics[i] && truth.segment_starts[j] - b > 500) {
        same_far += cosine(b, truth.segment_starts[j]);
        ++n_same;
        break;
      }
    }
  }
  ASSERT_GT(n_same, 5);
  same_far /= n_same;
  diff_near /= n_diff;
  EXPECT_GT(same_far, diff_near + 0.3);
}

// Mean of <x_t, x_{t+lag}> / mean |x_t|^2 over the 2-d subvectors of RoPE pair
// `pair` (dims pair and pair + d/2).
double PairAutocorrelation(const float* keys, int64_t from, int64_t to, int d, int pair, int lag) {
  double num = 0, den = 0;
  for (int64_t t = from; t + lag < to; ++t) {
    const float* a = keys + t * d;
    const float* b = keys + (t + lag) * d;
    num += a[pair] * b[pair] + a[pair + d / 2] * b[pair + d / 2];
    den += a[pair] * a[pair] + a[pair + d / 2] * a[pair + d / 2];
  }
  return num / den;
}

TEST(SyntheticTest, RopeRotatesKeysAndPreservesNorms) {
  SyntheticConfig c = SmallConfig();
  c.layers = 1;
  c.needles = 0;
  SyntheticTruth truth;
  truth.want_pre_rope_keys = true;
  auto dump = GenerateSynthetic(c, &truth);
  ASSERT_THAT(dump, IsOk());
  const int d = c.head_dim;
  for (size_t row = 0; row < dump->keys.size() / d; ++row) {
    const double post = Norm(dump->keys.data() + row * d, d);
    const double pre = Norm(truth.pre_rope_keys.data() + row * d, d);
    ASSERT_NEAR(post, pre, 1e-4 * pre + 1e-6) << "row " << row;
  }
  // Token 0 is not rotated at all; later tokens are.
  for (int i = 0; i < d; ++i) EXPECT_FLOAT_EQ(dump->keys[i], truth.pre_rope_keys[i]);
  EXPECT_GT(std::fabs(dump->keys[100 * d] - truth.pre_rope_keys[100 * d]), 1e-3);

  // Pair 4 turns by ~0.19 rad per token (theta 5e5, d 64): neighbours stay
  // correlated, tokens 100-300 apart are decorrelated after RoPE but not
  // before it. The lowest-frequency non-sink pair barely turns.
  const int high = 4;
  const float* post = dump->keys.data();
  const float* pre = truth.pre_rope_keys.data();
  const int64_t from = c.sink_tokens, to = c.tokens;
  const double near = PairAutocorrelation(post, from, to, d, high, 1);
  double far_post = 0, far_pre = 0;
  int n = 0;
  for (int lag = 100; lag <= 300; lag += 7, ++n) {
    far_post += PairAutocorrelation(post, from, to, d, high, lag);
    far_pre += PairAutocorrelation(pre, from, to, d, high, lag);
  }
  far_post /= n;
  far_pre /= n;
  std::printf("pair %d: lag-1 %.3f, lags 100-300 after RoPE %.3f, before %.3f\n", high, near,
              far_post, far_pre);
  EXPECT_GT(near, 0.4);
  EXPECT_LT(std::fabs(far_post), 0.05);
  EXPECT_GT(far_pre, 0.08);
  const int low = truth.outlier_dims.front();
  EXPECT_GT(PairAutocorrelation(post, from, to, d, low, 200),
            0.8 * PairAutocorrelation(pre, from, to, d, low, 200));
}

TEST(SyntheticTest, NeedlesStandOutForTheirQuery) {
  SyntheticConfig c = SmallConfig();
  SyntheticTruth truth;
  auto dump = GenerateSynthetic(c, &truth);
  ASSERT_THAT(dump, IsOk());
  ASSERT_EQ(truth.needles.size(), static_cast<size_t>(c.layers * c.kv_heads * c.needles));
  const int d = c.head_dim;
  int top5 = 0;
  for (const SyntheticNeedle& nd : truth.needles) {
    ASSERT_EQ(nd.q_head / (c.q_heads / c.kv_heads), nd.kv_head);
    const float* q =
        dump->queries.data() +
        ((static_cast<size_t>(nd.step) * c.layers + nd.layer) * c.q_heads + nd.q_head) * d;
    const double needle = Dot(q, dump->key(nd.layer, nd.kv_head) + nd.token * d, d);
    int above = 0;
    for (int64_t t = c.sink_tokens; t < c.tokens; ++t) {
      above += Dot(q, dump->key(nd.layer, nd.kv_head) + t * d, d) > needle;
    }
    top5 += above < 5;
  }
  // Every needle is among the top few ordinary keys of its query.
  EXPECT_EQ(top5, static_cast<int>(truth.needles.size()));
}

TEST(SyntheticTest, ProfileAttentionOnAHandMadeDump) {
  KvDump dump;
  dump.layers = 1;
  dump.kv_heads = 1;
  dump.q_heads = 1;
  dump.tokens = 3;
  dump.head_dim = 4;
  dump.steps = 1;
  dump.keys = {2, 0, 0, 0, 0, 0, 0, 0, -2, 0, 0, 0};
  dump.values.assign(12, 0.0f);
  dump.queries = {1, 0, 0, 0};  // logits 1, 0, -1 (q.k / sqrt(4))
  auto p = ProfileAttention(dump, 0, 0, 0, 1, 2);
  ASSERT_THAT(p, IsOk());
  const double z = std::exp(1.0) + 1.0 + std::exp(-1.0);
  EXPECT_NEAR(p->sink_mass, std::exp(1.0) / z, 1e-9);
  EXPECT_NEAR(p->topk_mass, (std::exp(1.0) + 1.0) / z, 1e-9);
  EXPECT_NEAR(p->max_logit, 1.0, 1e-9);
  double ent = 0;
  for (double l : {1.0, 0.0, -1.0}) ent -= std::exp(l) / z * std::log(std::exp(l) / z);
  EXPECT_NEAR(p->entropy, ent, 1e-9);
  EXPECT_THAT(ProfileAttention(dump, 1, 0, 0, 1, 2), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ProfileAttention(dump, 0, 0, 0, 1, 0), StatusIs(absl::StatusCode::kInvalidArgument));
  dump.keys.pop_back();
  EXPECT_THAT(ProfileAttention(dump, 0, 0, 0, 1, 2), StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace icecache
