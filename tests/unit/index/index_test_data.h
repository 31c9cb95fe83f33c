// Test data for the index suite: one KV head with G queries. Until the
// synthetic generator (common/synthetic.h) is in the tree this is a small
// local model of realistic keys: topic segments around cluster centres (so
// semantic clusters exist but are not positional pages), low-norm sink
// tokens aligned with the queries' mean, and queries from a shifted
// distribution. Deterministic for a seed.
#ifndef ICECACHE_TESTS_UNIT_INDEX_INDEX_TEST_DATA_H_
#define ICECACHE_TESTS_UNIT_INDEX_INDEX_TEST_DATA_H_

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace icecache::testing {

struct HeadData {
  int64_t n = 0;
  int dim = 0;
  int num_queries = 0;        // G
  std::vector<float> keys;     // n x dim
  std::vector<float> values;   // n x dim
  std::vector<float> queries;  // steps x G x dim
  int steps = 0;
  const float* query(int step) const { return queries.data() + static_cast<size_t>(step) * num_queries * dim; }
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

}  // namespace icecache::testing

#endif  // ICECACHE_TESTS_UNIT_INDEX_INDEX_TEST_DATA_H_
