// MagicPIG (Chen et al., "MagicPIG: LSH Sampling for Efficient LLM
// Generation", ICLR 2025; github.com/Infini-AI-Lab/MagicPIG): keys are
// centred (the mean key of the prefill, past the 4 sink tokens, is
// subtracted: a common offset would put every key in the same buckets; the
// softmax is unchanged) and hashed
// with SimHash into L tables of K sign bits each (defaults K = 10, L = 150,
// the paper's main setting); a key is SAMPLED for a query when it collides
// with the query in at least 2 tables. Its sampling probability follows from
// the angle theta between q and k: with u = 1 - theta / pi a table collides
// with probability p = u^K and P(sampled) = 1 - sum_{c < 2} C(L, c) p^c
// (1 - p)^(L - c). The attention output is estimated by importance
// sampling, self-normalised: out = sum_S w_i v_i / sum_S w_i with
// w_i = exp(q.k_i / sqrt(d)) / P_i over the sampled keys S, plus the static
// tokens (sinks, recent) with P = 1. MagicPIG runs hashing, sampling and the
// estimate on the CPU, as here.
//
// It is an estimator, not a token set (AttentionEstimator::EstimateOutput):
// judge it by output error and cost. Select() answers with the pages of the
// sampled tokens, ranked by each token's estimated share for the group
// (sum over the G queries of w_ij / sum_i w_ij over that query's samples),
// then pages without samples; the client computes plain attention over
// those pages, which drops the 1/P weights (docs/architecture.md §3.9).
// Cost: the collision counts read L x 2 bytes per key (L / head_dim
// key-equivalents in fp16), plus one exact dot per sampled key.
#include <math.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/index/baseline_selectors.h"
#include "server/index/byte_image.h"
#include "server/index/headroom.h"
#include "server/index/kernels.h"
#include "server/index/page_select.h"
#include "server/index/positional_layout.h"

namespace icecache {
namespace {

constexpr int64_t kSinkKeys = 4;  // left out of the mean key

// log |Gamma(x)|. std::lgamma writes the process-wide `signgam`, a data
// race when two KV heads select at once (ThreadSanitizer found it once the
// decode lanes ran the heads side by side); lgamma_r keeps the sign here.
double LogGamma(double x) {
  int sign = 0;
  return ::lgamma_r(x, &sign);
}

// P(at least t of L tables collide) when one table collides with prob. p.
double SampleProbability(double p, int tables, int t) {
  if (p >= 1.0) return 1.0;
  if (p <= 0.0) return 0.0;
  double below = 0.0;
  for (int c = 0; c < t; ++c) {
    const double log_term = LogGamma(tables + 1.0) - LogGamma(c + 1.0) -
                            LogGamma(tables - c + 1.0) + c * std::log(p) +
                            (tables - c) * std::log1p(-p);
    below += std::exp(log_term);
  }
  return std::max(0.0, 1.0 - below);
}

class MagicpigSelector final : public TokenScoringSelector, public AttentionEstimator {
 public:
  MagicpigSelector(const SelectorConfig& config, const PageKeys* keys)
      : TokenScoringSelector(config, keys),
        bits_(config.baseline.magicpig_bits),
        tables_(config.baseline.magicpig_tables),
        min_hits_(config.baseline.magicpig_min_collisions) {
    planes_.resize(static_cast<size_t>(bits_) * tables_ * dim_);
    std::mt19937_64 rng(config.baseline.seed);
    std::normal_distribution<float> g(0.0f, 1.0f);
    for (float& x : planes_) x = g(rng);
  }

  absl::Status EstimateOutput(const float* queries, int num_queries, const SelectParams& params,
                              const float* values, float* out, int64_t* sampled) const override;

  bool has_image() const override { return true; }

  size_t index_bytes() const override {
    return layout_bytes() + codes_.size() * sizeof(uint16_t) +
           (norms_.size() + planes_.size() + center_.size()) * sizeof(float);
  }

 private:
  // The sampled keys of one call: for each (token, query) with enough
  // collisions, the exact scaled logit and the sampling probability.
  struct Samples {
    std::vector<int32_t> tokens;  // union over the queries, ascending
    std::vector<float> logits;    // G x tokens.size(), scaled
    std::vector<float> prob;      // G x tokens.size(); 0 = not sampled for that query
    uint64_t touched = 0;
  };

  // Image: the parameters that shaped the hash (the planes are drawn from
  // the seed again), then the centre, the codes and the norms.
  void SaveState(ByteWriter* w) const override;
  absl::Status LoadState(ByteReader* r, int64_t n) override;

  void Hash(const float* x, uint16_t* codes) const {
    thread_local std::vector<float> proj;
    proj.resize(static_cast<size_t>(bits_) * tables_);
    DotRows(DType::kF32, planes_.data(), static_cast<int64_t>(bits_) * tables_, dim_, x,
            proj.data());
    for (int l = 0; l < tables_; ++l) {
      uint16_t c = 0;
      for (int b = 0; b < bits_; ++b) c |= static_cast<uint16_t>(proj[l * bits_ + b] > 0.0f) << b;
      codes[l] = c;
    }
  }

  absl::Status OnAppend(const float* keys, int64_t n, bool) override {
    if (center_.empty()) {
      // The mean of the first keys, past the attention sinks when there are
      // more (the sinks are static tokens, never sampled for their hash).
      const int64_t skip = n > kSinkKeys ? kSinkKeys : 0;
      center_.assign(dim_, 0.0f);
      for (int64_t i = skip; i < n; ++i) {
        for (int d = 0; d < dim_; ++d) center_[d] += keys[i * dim_ + d];
      }
      for (float& c : center_) c /= static_cast<float>(n - skip);
    }
    const size_t before = codes_.size();
    codes_.resize(before + static_cast<size_t>(n) * tables_);
    ReserveGeometric(&norms_, norms_.size() + n);
    std::vector<float> centred(dim_);
    for (int64_t i = 0; i < n; ++i) {
      for (int d = 0; d < dim_; ++d) centred[d] = keys[i * dim_ + d] - center_[d];
      Hash(centred.data(), codes_.data() + before + static_cast<size_t>(i) * tables_);
      norms_.push_back(std::sqrt(DotF32(centred.data(), centred.data(), dim_)));
    }
    return absl::OkStatus();
  }

  absl::Status RankTokens(const float* queries, int nq, const SelectParams& params,
                          std::vector<ScoredToken>* tokens, uint64_t* touched) const override {
    thread_local Samples s;
    RETURN_IF_ERROR(Sample(queries, nq, &s));
    GroupShares(s, nq, tokens);
    *touched = s.touched;
    return absl::OkStatus();
  }
  absl::Status Sample(const float* queries, int nq, Samples* s) const;
  void GroupShares(const Samples& s, int nq, std::vector<ScoredToken>* tokens) const;

  const int bits_;
  const int tables_;
  const int min_hits_;
  std::vector<float> planes_;    // (L x K) x dim, Gaussian hyperplanes
  std::vector<uint16_t> codes_;  // n x L, one K-bit code per table
  std::vector<float> norms_;     // n norms of the centred keys (collision probability)
  std::vector<float> center_;    // the mean key of the first append (MagicPIG centres keys)
};

constexpr uint32_t kMagicpigImageAlgorithm = 1;  // bump when the hashing or centring changes

void MagicpigSelector::SaveState(ByteWriter* w) const {
  w->Put<uint32_t>(kMagicpigImageAlgorithm);
  w->Put<int32_t>(bits_);
  w->Put<int32_t>(tables_);
  w->Put<uint64_t>(config_.baseline.seed);
  w->PutArray(center_);
  w->PutArray(codes_);
  w->PutArray(norms_);
}

absl::Status MagicpigSelector::LoadState(ByteReader* r, int64_t n) {
  uint32_t algorithm = 0;
  int32_t bits = 0, tables = 0;
  uint64_t seed = 0;
  if (!r->Get(&algorithm) || !r->Get(&bits) || !r->Get(&tables) || !r->Get(&seed)) {
    return absl::DataLossError("magicpig image: truncated header");
  }
  if (algorithm != kMagicpigImageAlgorithm || bits != bits_ || tables != tables_ ||
      seed != config_.baseline.seed) {
    return absl::FailedPreconditionError(
        "magicpig image of another algorithm or other parameters (bits, tables, seed)");
  }
  if (!r->GetArray(&center_, static_cast<uint64_t>(dim_)) ||
      !r->GetArray(&codes_, static_cast<uint64_t>(n) * tables_) ||
      !r->GetArray(&norms_, static_cast<uint64_t>(n))) {
    return absl::DataLossError("magicpig image: truncated, or its counts disagree");
  }
  for (float v : center_) {
    if (!std::isfinite(v)) return absl::DataLossError("magicpig image: a non-finite centre");
  }
  for (float v : norms_) {
    if (!(v >= 0.0f) || !std::isfinite(v)) {
      return absl::DataLossError("magicpig image: a bad key norm");
    }
  }
  for (uint16_t c : codes_) {
    if (bits_ < 16 && c >= (1u << bits_)) {
      return absl::DataLossError("magicpig image: a code past its bits");
    }
  }
  return absl::OkStatus();
}

absl::Status MagicpigSelector::Sample(const float* queries, int nq, Samples* s) const {
  const int64_t n = num_tokens();
  thread_local std::vector<uint16_t> qcodes;
  thread_local std::vector<uint8_t> hit;  // n x G
  qcodes.resize(static_cast<size_t>(nq) * tables_);
  for (int j = 0; j < nq; ++j) Hash(queries + static_cast<int64_t>(j) * dim_, &qcodes[j * tables_]);
  hit.assign(static_cast<size_t>(n) * nq, 0);
  s->tokens.clear();
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* kc = codes_.data() + static_cast<size_t>(i) * tables_;
    bool any = false;
    for (int j = 0; j < nq; ++j) {
      const uint16_t* qc = qcodes.data() + static_cast<size_t>(j) * tables_;
      int c = 0;
      for (int l = 0; l < tables_; ++l) c += kc[l] == qc[l];
      hit[static_cast<size_t>(i) * nq + j] = c >= min_hits_;
      any |= c >= min_hits_;
    }
    if (any) s->tokens.push_back(static_cast<int32_t>(i));
  }
  const int64_t m = static_cast<int64_t>(s->tokens.size());
  s->logits.resize(static_cast<size_t>(nq) * m);
  s->prob.assign(static_cast<size_t>(nq) * m, 0.0f);
  RETURN_IF_ERROR(TokenLogits(s->tokens.data(), m, queries, nq, s->logits.data()));
  for (int j = 0; j < nq; ++j) {
    const float* q = queries + static_cast<int64_t>(j) * dim_;
    const double qn = std::sqrt(static_cast<double>(DotF32(q, q, dim_)));
    const double q_center = DotF32(q, center_.data(), dim_);  // q.k - q.mean = q.(k - mean)
    for (int64_t t = 0; t < m; ++t) {
      const int32_t i = s->tokens[t];
      float& l = s->logits[static_cast<size_t>(j) * m + t];
      const double denom = qn * norms_[i];
      const double cosine = denom > 0 ? std::clamp((l - q_center) / denom, -1.0, 1.0) : 1.0;
      if (hit[static_cast<size_t>(i) * nq + j]) {
        const double u = 1.0 - std::acos(cosine) / M_PI;
        const double p = SampleProbability(std::pow(u, bits_), tables_, min_hits_);
        s->prob[static_cast<size_t>(j) * m + t] = static_cast<float>(std::max(p, 1e-30));
      }
      l *= scale_;
    }
  }
  s->touched = static_cast<uint64_t>(m + (n * tables_ + dim_ - 1) / dim_);
  return absl::OkStatus();
}

void MagicpigSelector::GroupShares(const Samples& s, int nq,
                                   std::vector<ScoredToken>* tokens) const {
  const int64_t m = static_cast<int64_t>(s.tokens.size());
  std::vector<double> share(m, 0.0);
  for (int j = 0; j < nq; ++j) {
    const float* l = s.logits.data() + static_cast<size_t>(j) * m;
    const float* p = s.prob.data() + static_cast<size_t>(j) * m;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < m; ++t) {
      if (p[t] > 0) mx = std::max(mx, l[t]);
    }
    double total = 0.0;
    for (int64_t t = 0; t < m; ++t) {
      if (p[t] > 0) total += std::exp(static_cast<double>(l[t]) - mx) / p[t];
    }
    if (!(total > 0)) continue;
    for (int64_t t = 0; t < m; ++t) {
      if (p[t] > 0) share[t] += std::exp(static_cast<double>(l[t]) - mx) / p[t] / total;
    }
  }
  tokens->resize(m);
  for (int64_t t = 0; t < m; ++t) {
    (*tokens)[t] = {
        share[t] > 0 ? static_cast<float>(std::log(share[t])) : -std::numeric_limits<float>::max(),
        s.tokens[t]};
  }
}

absl::Status MagicpigSelector::EstimateOutput(const float* queries, int nq,
                                              const SelectParams& params, const float* values,
                                              float* out, int64_t* sampled) const {
  if (values == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("values and out must not be null");
  }
  Selection probe;
  RETURN_IF_ERROR(ValidateSelect(*this, queries, nq, params, &probe));
  Samples s;
  RETURN_IF_ERROR(Sample(queries, nq, &s));
  const int64_t n = num_tokens();
  const int64_t sink_end = std::min<int64_t>(params.sink_tokens, n);
  const int64_t recent_begin = std::max<int64_t>(sink_end, n - params.recent_tokens);
  const auto is_static = [&](int64_t i) { return i < sink_end || i >= recent_begin; };
  std::vector<int32_t> statics;
  for (int64_t i = 0; i < n; ++i) {
    if (is_static(i)) statics.push_back(static_cast<int32_t>(i));
  }
  std::vector<float> slog(static_cast<size_t>(nq) * statics.size());
  RETURN_IF_ERROR(
      TokenLogits(statics.data(), static_cast<int64_t>(statics.size()), queries, nq, slog.data()));
  const int64_t m = static_cast<int64_t>(s.tokens.size());
  int64_t read = 0;
  std::vector<double> acc(dim_);
  for (int j = 0; j < nq; ++j) {
    // (log-weight, position) of every term: statics with P = 1, samples with 1/P.
    std::vector<std::pair<double, int32_t>> terms;
    for (size_t t = 0; t < statics.size(); ++t) {
      terms.emplace_back(static_cast<double>(slog[j * statics.size() + t]) * scale_, statics[t]);
    }
    for (int64_t t = 0; t < m; ++t) {
      const float p = s.prob[static_cast<size_t>(j) * m + t];
      if (p <= 0 || is_static(s.tokens[t])) continue;
      terms.emplace_back(s.logits[static_cast<size_t>(j) * m + t] - std::log(p), s.tokens[t]);
    }
    read += static_cast<int64_t>(terms.size());
    double mx = -std::numeric_limits<double>::infinity();
    for (const auto& e : terms) mx = std::max(mx, e.first);
    std::fill(acc.begin(), acc.end(), 0.0);
    double total = 0.0;
    for (const auto& e : terms) {
      const double w = std::exp(e.first - mx);
      total += w;
      const float* v = values + static_cast<int64_t>(e.second) * dim_;
      for (int d = 0; d < dim_; ++d) acc[d] += w * v[d];
    }
    for (int d = 0; d < dim_; ++d) {
      out[j * dim_ + d] = total > 0 ? static_cast<float>(acc[d] / total) : 0.0f;
    }
  }
  if (sampled != nullptr) *sampled = read;
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<Selector> NewMagicpigSelector(const SelectorConfig& config, const PageKeys* keys) {
  return std::make_unique<MagicpigSelector>(config, keys);
}

}  // namespace icecache
