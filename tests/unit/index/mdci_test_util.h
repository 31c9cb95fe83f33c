// Helpers of the mdci/DCI tests: a minimal frame owner (PageKeys) that applies
// Placements, clustered Gaussian keys, and exact attention mass of a token set.
#ifndef ICECACHE_TESTS_UNIT_INDEX_MDCI_TEST_UTIL_H_
#define ICECACHE_TESTS_UNIT_INDEX_MDCI_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "server/index/selector.h"

namespace icecache::mdci_test {

// Stores keys per page in `dtype`, written where Placements say.
class TestPageKeys : public PageKeys {
 public:
  TestPageKeys(int dim, int page_tokens, DType dtype)
      : dim_(dim), page_tokens_(page_tokens), dtype_(dtype) {}
  void Apply(const float* keys, const std::vector<Placement>& placements) {
    const size_t row = static_cast<size_t>(dim_) * DTypeSize(dtype_);
    for (size_t i = 0; i < placements.size(); ++i) {
      const Placement& p = placements[i];
      if (p.page >= pages_.size()) pages_.resize(p.page + 1);
      auto& page = pages_[p.page];
      if (page.empty()) page.assign(row * page_tokens_, 0);
      FromFloat(dtype_, keys + i * dim_, page.data() + row * p.slot, dim_);
    }
  }
  const void* page_keys(uint32_t page) const override {
    return page < pages_.size() ? pages_[page].data() : nullptr;
  }

 private:
  int dim_, page_tokens_;
  DType dtype_;
  std::vector<std::vector<uint8_t>> pages_;
};

// n keys around `clusters` random centres (spread `noise`), in shuffled
// cluster order so clusters are not positional; norms vary by cluster.
inline std::vector<float> ClusteredKeys(int64_t n, int dim, int clusters, float noise,
                                        uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> centres(static_cast<size_t>(clusters) * dim);
  for (int c = 0; c < clusters; ++c) {
    const float scale = 0.5f + 1.5f * (c % 5) / 4.0f;
    for (int k = 0; k < dim; ++k) centres[c * dim + k] = g(rng) * scale;
  }
  std::uniform_int_distribution<int> pick(0, clusters - 1);
  std::vector<float> keys(static_cast<size_t>(n) * dim);
  for (int64_t i = 0; i < n; ++i) {
    const int c = pick(rng);
    for (int k = 0; k < dim; ++k) keys[i * dim + k] = centres[c * dim + k] + noise * g(rng);
  }
  return keys;
}

inline std::vector<float> GaussianRows(int64_t n, int dim, float scale, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n) * dim);
  for (auto& x : v) x = g(rng);
  return v;
}

// Mean over queries of the softmax(q.K / sqrt(d)) mass of `positions`.
// from > 0: the share of the mass of positions from.. n - 1 that the
// selected ones among them hold.
inline double MassOf(const float* keys, int64_t n, int dim, const float* queries, int nq,
                     const std::vector<int32_t>& positions, int64_t from = 0) {
  double total = 0.0;
  std::vector<double> logit(n);
  for (int j = 0; j < nq; ++j) {
    double m = -1e300;
    for (int64_t i = 0; i < n; ++i) {
      double s = 0.0;
      for (int k = 0; k < dim; ++k)
        s += static_cast<double>(queries[j * dim + k]) * keys[i * dim + k];
      logit[i] = s / std::sqrt(static_cast<double>(dim));
      m = std::max(m, logit[i]);
    }
    double z = 0.0;
    for (int64_t i = from; i < n; ++i) z += std::exp(logit[i] - m);
    double sel = 0.0;
    for (int32_t p : positions) sel += p >= from ? std::exp(logit[p] - m) : 0.0;
    total += sel / z;
  }
  return total / nq;
}

// Positions of every selected page, concatenated.
inline std::vector<int32_t> SelectedPositions(const Selector& s, const Selection& sel) {
  std::vector<int32_t> out;
  for (uint32_t page : sel.pages) {
    const int32_t* p = s.positions(page);
    out.insert(out.end(), p, p + s.fill(page));
  }
  return out;
}

// A selector of `config` and the frames it reads.
// An mdci config of `dim` x fp16 keys, `page_tokens` pages and 4 query
// heads, with product-quantised codes when pq_factor > 0.
inline SelectorConfig MdciConfig(int dim, int page_tokens, float pq_factor) {
  SelectorConfig c;
  c.kind = SelectorKind::kMdci;
  c.head_dim = dim;
  c.page_tokens = page_tokens;
  c.num_query_heads = 4;
  c.dtype = DType::kF16;
  c.mdci.pq_factor = pq_factor;
  return c;
}

struct BuiltSelector {
  std::unique_ptr<TestPageKeys> keys;
  std::unique_ptr<Selector> sel;
};

// Bulk build of the first `n` of `keys` (config.head_dim floats each), then
// `inserts` decode tokens one at a time, the frames kept in config.dtype.
inline BuiltSelector BuildWithInserts(const SelectorConfig& config, const std::vector<float>& keys,
                                      int64_t n, int64_t inserts) {
  BuiltSelector b;
  const int dim = config.head_dim;
  b.keys = std::make_unique<TestPageKeys>(dim, config.page_tokens, config.dtype);
  auto s = Selector::Create(config, b.keys.get());
  EXPECT_TRUE(s.ok()) << s.status();
  if (!s.ok()) return b;
  b.sel = std::move(s).value();
  std::vector<Placement> pl;
  EXPECT_TRUE(b.sel->Build(keys.data(), n, &pl).ok());
  b.keys->Apply(keys.data(), pl);
  for (int64_t i = n; i < n + inserts; ++i) {
    EXPECT_TRUE(b.sel->Insert(&keys[i * dim], 1, &pl).ok());
    b.keys->Apply(&keys[i * dim], pl);
  }
  return b;
}

}  // namespace icecache::mdci_test

#endif  // ICECACHE_TESTS_UNIT_INDEX_MDCI_TEST_UTIL_H_
