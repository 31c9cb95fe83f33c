#include "server/index/page_select.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "server/index/simd_avx2.h"

namespace icecache {

float PageMassScore(const float* logits, int num_queries, int fill, int stride, float scale) {
  float best = -std::numeric_limits<float>::infinity();
  if (fill <= 0) return best;
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int j = 0; j < num_queries; ++j) {
    const float* row = logits + static_cast<int64_t>(j) * stride;
    // log-sum-exp around the max: every term is <= 1, the sum is >= 1.
    __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int i = 0;
    for (; i + 8 <= fill; i += 8)
      vm = _mm256_max_ps(vm, _mm256_mul_ps(_mm256_loadu_ps(row + i), vscale));
    float m = simd::HMax256(vm);
    for (; i < fill; ++i) m = std::max(m, row[i] * scale);
    const __m256 vmax = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    i = 0;
    for (; i + 8 <= fill; i += 8) {
      // The sum takes each exp's last product in one FMA (as GCC contracted
      // the multiply and add before this was written out; the fused page
      // pass in kernels.cc does the same, so it gives these bits).
      __m256 poly, pow2;
      simd::Exp256Factors(_mm256_fmsub_ps(_mm256_loadu_ps(row + i), vscale, vmax), &poly, &pow2);
      vs = _mm256_fmadd_ps(poly, pow2, vs);
    }
    float s = simd::HSum256(vs);
    for (; i < fill; ++i) s += std::exp(row[i] * scale - m);
    const float score = m + std::log(s);
    if (score > best) best = score;
  }
  return best;
}

void PageQueryLogMass(const float* logits, int num_queries, int fill, int stride, float scale,
                      float* out) {
  for (int j = 0; j < num_queries; ++j) {
    out[j] = PageMassScore(logits + static_cast<int64_t>(j) * stride, 1, fill, stride, scale);
  }
}

float LogSumExp(const float* x, size_t n) {
  if (n == 0) return -std::numeric_limits<float>::infinity();
  __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  size_t i = 0;
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
  float m = simd::HMax256(vm);
  for (; i < n; ++i) m = std::max(m, x[i]);
  if (!std::isfinite(m)) return m;  // all -inf (or an inf/NaN that decides)
  const __m256 vmax = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  i = 0;
  for (; i + 8 <= n; i += 8)
    vs = _mm256_add_ps(vs, simd::Exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax)));
  float s = simd::HSum256(vs);
  for (; i < n; ++i) s += std::exp(x[i] - m);
  return m + std::log(s);
}

void AddExp(const float* x, float shift, size_t n, float* acc) {
  const __m256 vshift = _mm256_set1_ps(shift);
  const __m256 cap = _mm256_set1_ps(80.0f);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e =
        simd::Exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vshift), cap));
    _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), e));
  }
  for (; i < n; ++i) acc[i] += std::exp(std::min(x[i] - shift, 80.0f));
}

void TokenShares(const float* logits, uint32_t fill, const float* log_norm, int num_queries,
                 float scale, float* share) {
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 cap = _mm256_set1_ps(80.0f);
  uint32_t t = 0;
  for (; t + 8 <= fill; t += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int j = 0; j < num_queries; ++j) {
      __m256 x = _mm256_mul_ps(_mm256_loadu_ps(logits + static_cast<size_t>(j) * fill + t), vscale);
      // The product is rounded before the subtraction, as AddExp reads it
      // from memory: no contraction into one FMA (the same bits).
      asm("" : "+x"(x));
      acc = _mm256_add_ps(
          acc, simd::Exp256(_mm256_min_ps(_mm256_sub_ps(x, _mm256_set1_ps(log_norm[j])), cap)));
    }
    _mm256_storeu_ps(share + t, acc);
  }
  for (; t < fill; ++t) {
    float acc = 0.0f;
    for (int j = 0; j < num_queries; ++j) {
      float x = logits[static_cast<size_t>(j) * fill + t] * scale;
      asm("" : "+x"(x));
      acc += std::exp(std::min(x - log_norm[j], 80.0f));
    }
    share[t] = acc;
  }
}

float GroupPageScore(const float* page_lse, const float* log_norm, int num_queries) {
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < num_queries; ++j) m = std::max(m, page_lse[j] - log_norm[j]);
  if (!std::isfinite(m)) return m;
  float s = 0.0f;
  for (int j = 0; j < num_queries; ++j) s += std::exp(page_lse[j] - log_norm[j] - m);
  return m + std::log(s);
}

void QueryLogNorms(const float* page_lse, size_t num_pages, int num_queries, const float* rest,
                   float* log_norm) {
  for (int j = 0; j < num_queries; ++j) {
    float m = rest != nullptr ? rest[j] : -std::numeric_limits<float>::infinity();
    for (size_t p = 0; p < num_pages; ++p) m = std::max(m, page_lse[p * num_queries + j]);
    if (!std::isfinite(m)) {
      log_norm[j] = m;
      continue;
    }
    double s = rest != nullptr ? std::exp(static_cast<double>(rest[j]) - m) : 0.0;
    for (size_t p = 0; p < num_pages; ++p) {
      s += std::exp(static_cast<double>(page_lse[p * num_queries + j]) - m);
    }
    log_norm[j] = m + static_cast<float>(std::log(s));
  }
}

void TakePages(const Selector& selector, const std::vector<uint32_t>& forced,
               std::vector<std::pair<float, uint32_t>>* scored, const SelectParams& params,
               Selection* out) {
  out->pages.clear();
  out->fills.clear();
  out->scores.clear();
  out->positions.clear();
  int64_t tokens = 0;
  auto add = [&](uint32_t page, float score) {
    const uint32_t fill = selector.fill(page);
    out->pages.push_back(page);
    out->fills.push_back(fill);
    out->scores.push_back(score);
    tokens += fill;
    if (params.want_positions) {
      const int32_t* pos = selector.positions(page);
      out->positions.insert(out->positions.end(), pos, pos + fill);
    }
  };
  for (uint32_t page : forced) add(page, std::numeric_limits<float>::infinity());

  // A NaN score would break the strict weak ordering of the sort; rank it last.
  for (auto& e : *scored) {
    if (std::isnan(e.first)) e.first = -std::numeric_limits<float>::infinity();
  }
  // Descending score, ties by ascending page id so selections are deterministic.
  auto better = [](const std::pair<float, uint32_t>& a, const std::pair<float, uint32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  // Only the head of the ranking is ever needed: sort it in chunks (sized for
  // the budget in full pages, doubling) instead of sorting every page.
  const int64_t page_tokens = std::max(1, selector.config().page_tokens);
  size_t chunk = static_cast<size_t>(
      std::max<int64_t>(16, params.budget_tokens / page_tokens + 1 + forced.size()));
  auto& v = *scored;
  size_t begin = 0;
  while (tokens < params.budget_tokens && begin < v.size()) {
    const size_t end = std::min(v.size(), begin + chunk);
    std::partial_sort(v.begin() + begin, v.begin() + end, v.end(), better);
    for (size_t i = begin; i < end && tokens < params.budget_tokens; ++i) {
      if (std::binary_search(forced.begin(), forced.end(), v[i].second)) continue;
      add(v[i].second, v[i].first);
    }
    begin = end;
    chunk *= 2;
  }
}

absl::Status CheckFinite(const float* data, int64_t rows, int dim, const char* what) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = data + r * dim;
    // A test of the exponent bits is branch-free and vectorises (a float sum
    // would not: its additions are ordered); only a row with a hit needs
    // the element search.
    uint32_t any = 0;
    for (int c = 0; c < dim; ++c) {
      uint32_t bits;
      std::memcpy(&bits, row + c, sizeof(bits));
      any |= (bits & 0x7f800000u) == 0x7f800000u ? 1u : 0u;
    }
    if (any == 0) continue;
    for (int c = 0; c < dim; ++c) {
      if (!std::isfinite(row[c])) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, " row ", r, " column ", c, " is not finite (", row[c], ")"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateKeysToAdd(const float* keys, int64_t n, int head_dim, int64_t num_tokens,
                               const std::vector<Placement>* placements, bool scan) {
  if (placements == nullptr) return absl::InvalidArgumentError("placements must not be null");
  if (n <= 0) return absl::InvalidArgumentError(absl::StrCat("key count must be > 0, got ", n));
  if (keys == nullptr) return absl::InvalidArgumentError("keys must not be null");
  constexpr int64_t kMaxTokens = std::numeric_limits<int32_t>::max();
  if (n > kMaxTokens - num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("adding ", n, " keys to ", num_tokens,
                                                   " would exceed ", kMaxTokens, " tokens"));
  }
  return scan ? CheckFinite(keys, n, head_dim, "key") : absl::OkStatus();
}

absl::Status ValidateSelect(const Selector& selector, const float* queries, int num_queries,
                            const SelectParams& params, const Selection* out) {
  if (out == nullptr) return absl::InvalidArgumentError("output selection must not be null");
  if (queries == nullptr) return absl::InvalidArgumentError("queries must not be null");
  if (num_queries < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_queries must be >= 1, got ", num_queries));
  }
  if (params.budget_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("budget_tokens must be > 0, got ", params.budget_tokens));
  }
  if (params.field_of_view < 0 || !(params.candidate_factor >= 0.0f) ||
      !std::isfinite(params.candidate_factor)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "field_of_view (", params.field_of_view, ") and candidate_factor (",
        params.candidate_factor, ") must be >= 0 (0: the selector's configured width)"));
  }
  if (!(params.pq_factor >= 0.0f) || !std::isfinite(params.pq_factor)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pq_factor must be finite and >= 0 (0: the selector's), got ", params.pq_factor));
  }
  if (params.sink_tokens < 0 || params.recent_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("sink_tokens (", params.sink_tokens,
                                                   ") and recent_tokens (", params.recent_tokens,
                                                   ") must be >= 0"));
  }
  if (selector.num_tokens() == 0) {
    return absl::FailedPreconditionError("select on an empty index: Build() it first");
  }
  if (params.budget_tokens > selector.num_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("budget_tokens ", params.budget_tokens,
                                                   " exceeds the ", selector.num_tokens(),
                                                   " tokens in the index"));
  }
  return CheckFinite(queries, num_queries, selector.config().head_dim, "query");
}

}  // namespace icecache
