#include "tests/bench/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/dtype.h"
#include "server/index/kernels.h"

namespace icecache::bench {
namespace {

// out[0..d) += w * row (fp32).
void Axpy(float w, const float* row, int d, float* out) {
  for (int i = 0; i < d; ++i) out[i] += w * row[i];
}

// Softmax of `n` logits in place (fp32); returns the log-sum-exp.
float SoftmaxInPlace(float* logits, int64_t n) {
  const float mx = *std::max_element(logits, logits + n);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    logits[i] = std::exp(logits[i] - mx);
    sum += logits[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) logits[i] *= inv;
  return mx + std::log(sum);
}

// The exact-token oracle from the probabilities (g x n): sinks, then the
// best by max over the queries, ascending.
void OracleTokens(const float* probs, int64_t n, int g, int top, int sinks,
                  std::vector<int32_t>* oracle, std::vector<float>* best) {
  best->assign(n, 0.0f);
  for (int j = 0; j < g; ++j) {
    for (int64_t i = 0; i < n; ++i) (*best)[i] = std::max((*best)[i], probs[j * n + i]);
  }
  const int64_t s = std::min<int64_t>({sinks, top, n});
  for (int64_t i = 0; i < s; ++i) (*best)[i] = std::numeric_limits<float>::infinity();
  std::vector<int32_t>& o = *oracle;
  o.resize(n);
  std::iota(o.begin(), o.end(), 0);
  const int64_t k = std::min<int64_t>(top, n);
  std::nth_element(o.begin(), o.begin() + (k - 1), o.end(), [&](int32_t a, int32_t b) {
    return (*best)[a] != (*best)[b] ? (*best)[a] > (*best)[b] : a < b;
  });
  o.resize(k);
  std::sort(o.begin(), o.end());
}

}  // namespace

void FullAttention(const uint16_t* keys, const uint16_t* values, int64_t n, int d,
                   const float* queries, int g, float* out, float* lse, int top_tokens, int sinks,
                   std::vector<int32_t>* oracle, AttentionScratch* scratch) {
  std::vector<float>& logits = scratch->logits;
  logits.resize(static_cast<size_t>(g) * n);
  DotRowsMulti(DType::kF16, keys, n, d, queries, g, logits.data());
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (float& x : logits) x *= scale;
  for (int j = 0; j < g; ++j) lse[j] = SoftmaxInPlace(logits.data() + j * n, n);
  std::fill(out, out + static_cast<size_t>(g) * d, 0.0f);
  scratch->row.resize(d);
  for (int64_t i = 0; i < n; ++i) {
    HalfToFloat(values + i * d, scratch->row.data(), d);
    for (int j = 0; j < g; ++j) Axpy(logits[j * n + i], scratch->row.data(), d, out + j * d);
  }
  if (top_tokens > 0) {
    std::vector<float> best;
    OracleTokens(logits.data(), n, g, top_tokens, sinks, oracle, &best);
  }
}

void RowsAttention(absl::Span<const uint16_t* const> k_rows,
                   absl::Span<const uint16_t* const> v_rows, int d, const float* queries, int g,
                   float* out, AttentionScratch* scratch) {
  const int64_t n = static_cast<int64_t>(k_rows.size());
  std::fill(out, out + static_cast<size_t>(g) * d, 0.0f);
  if (n == 0) return;
  std::vector<float>& logits = scratch->logits;
  logits.resize(static_cast<size_t>(g) * n);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < g; ++j) logits[j * n + i] = DotF16(queries + j * d, k_rows[i], d) * scale;
  }
  for (int j = 0; j < g; ++j) SoftmaxInPlace(logits.data() + j * n, n);
  scratch->row.resize(d);
  for (int64_t i = 0; i < n; ++i) {
    HalfToFloat(v_rows[i], scratch->row.data(), d);
    for (int j = 0; j < g; ++j) Axpy(logits[j * n + i], scratch->row.data(), d, out + j * d);
  }
}

double MassRecall(const uint16_t* keys, int d, absl::Span<const int32_t> positions,
                  const float* queries, int g, const float* lse, AttentionScratch* scratch) {
  (void)scratch;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  double total = 0;
  for (int j = 0; j < g; ++j) {
    double mass = 0;
    for (int32_t p : positions) {
      mass += std::exp(
          static_cast<double>(DotF16(queries + j * d, keys + int64_t{p} * d, d)) * scale - lse[j]);
    }
    total += mass;
  }
  return total / g;
}

double OutputRelError(const float* out, const float* ref, int g, int d) {
  double total = 0;
  for (int j = 0; j < g; ++j) {
    double diff = 0, norm = 0;
    for (int i = 0; i < d; ++i) {
      const double e = static_cast<double>(out[j * d + i]) - ref[j * d + i];
      diff += e * e;
      norm += static_cast<double>(ref[j * d + i]) * ref[j * d + i];
    }
    total += norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
  }
  return total / g;
}

}  // namespace icecache::bench
