// Test data for the index suite: one KV head with G queries.
//  - MakeSyntheticHead: the realistic generator (common/synthetic.h, "small"
//    preset: 64-dim, RoPE, low-rank keys with outliers, sinks, topic segments,
//    needles, shifted queries), one layer and one KV head. Use this by default.
//  - MakeClusteredHead: a tiny independent model (Gaussian topic clusters,
//    low-norm sinks) for tests that must not depend on the generator.
// Both are deterministic for a seed.
#ifndef ICECACHE_TESTS_UNIT_INDEX_INDEX_TEST_DATA_H_
#define ICECACHE_TESTS_UNIT_INDEX_INDEX_TEST_DATA_H_

#include <cmath>
#include <cstdint>
#include <random>
#include <string_view>
#include <vector>

#include "common/synthetic.h"
#include "gtest/gtest.h"

namespace icecache::testing {

struct HeadData {
  int64_t n = 0;
  int dim = 0;
  int num_queries = 0;         // G
  std::vector<float> keys;     // n x dim
  std::vector<float> values;   // n x dim
  std::vector<float> queries;  // steps x G x dim
  int steps = 0;
  const float* query(int step) const {
    return queries.data() + static_cast<size_t>(step) * num_queries * dim;
  }
  const float* key(int64_t i) const { return keys.data() + i * dim; }
};

inline HeadData MakeClusteredHead(int64_t n, int dim, int num_queries, int steps, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::uniform_int_distribution<int> topic_of(0, 7);
  std::geometric_distribution<int> seg_len(1.0 / 48.0);
  HeadData h;
  h.n = n;
  h.dim = dim;
  h.num_queries = num_queries;
  h.steps = steps;
  std::vector<float> centres(8 * static_cast<size_t>(dim));
  for (auto& c : centres) c = 1.5f * g(rng);
  std::vector<float> mean_dir(dim);
  for (auto& m : mean_dir) m = g(rng);
  h.keys.resize(static_cast<size_t>(n) * dim);
  h.values.resize(h.keys.size());
  int64_t i = 0;
  while (i < n) {
    const int topic = topic_of(rng);
    const int64_t len = 1 + seg_len(rng);
    for (int64_t t = 0; t < len && i < n; ++t, ++i) {
      float* k = h.keys.data() + i * dim;
      for (int d = 0; d < dim; ++d) {
        k[d] = i < 4 ? 0.4f * mean_dir[d] + 0.05f * g(rng)  // sinks
                     : centres[topic * dim + d] + 0.8f * g(rng);
      }
    }
  }
  for (auto& v : h.values) v = g(rng);
  h.queries.resize(static_cast<size_t>(steps) * num_queries * dim);
  for (int s = 0; s < steps; ++s) {
    const int topic = topic_of(rng);
    for (int j = 0; j < num_queries; ++j) {
      float* q = h.queries.data() + (static_cast<size_t>(s) * num_queries + j) * dim;
      for (int d = 0; d < dim; ++d) {
        q[d] = 0.6f * mean_dir[d] + 0.8f * centres[topic * dim + d] + 0.5f * g(rng);
      }
    }
  }
  return h;
}

// n tokens of one KV head with G query heads and `steps` decode steps, from
// the "small" preset, with a robustness family (SyntheticFamilyNames()) when
// `family` is not empty. Fails the current test (and returns empty data) if
// the generator rejects the shape.
inline HeadData MakeSyntheticHead(int64_t n, int num_queries, int steps, uint64_t seed,
                                  std::string_view family = {}) {
  HeadData h;
  absl::StatusOr<SyntheticConfig> preset = SyntheticPreset("small");
  EXPECT_TRUE(preset.ok()) << preset.status();
  if (!preset.ok()) return h;
  SyntheticConfig c = *preset;
  if (!family.empty()) {
    const absl::Status applied = ApplySyntheticFamily(family, &c);
    EXPECT_TRUE(applied.ok()) << applied;
    if (!applied.ok()) return h;
  }
  c.layers = 1;
  c.kv_heads = 1;
  c.q_heads = num_queries;
  c.tokens = n;
  c.steps = steps;
  c.seed = seed;
  c.threads = 1;
  absl::StatusOr<KvDump> dump = GenerateSynthetic(c);
  EXPECT_TRUE(dump.ok()) << dump.status();
  if (!dump.ok()) return h;
  h.n = dump->tokens;
  h.dim = dump->head_dim;
  h.num_queries = num_queries;
  h.steps = steps;
  h.keys = std::move(dump->keys);
  h.values = std::move(dump->values);
  h.queries = std::move(dump->queries);
  return h;
}

}  // namespace icecache::testing

#endif  // ICECACHE_TESTS_UNIT_INDEX_INDEX_TEST_DATA_H_
