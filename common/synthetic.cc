// The realistic synthetic KV generator. The model, per (layer, KV head):
//
//   pre-RoPE key  k = k_mean + B z + outliers + iso noise,   z = c_topic + d_seg + e_tok
//
// B (head_dim x rank) is a low-rank basis whose rows are weighted towards the
// low-frequency RoPE pairs (where semantic matching survives rotation, as in
// real models); its column norms decay, so the spectrum is not flat. Topic
// centres c_j are shared by all segments of topic j; segments are runs of
// tokens (exponential lengths, mean `mean_segment`) whose topic is drawn from
// a skewed popularity, never the previous one, so a topic recurs in many
// places far apart. A few fixed outlier channels carry a large, almost
// constant magnitude. The first `sink_tokens` keys have a small norm and live
// in the lowest-frequency pairs ("sink dims"), aligned with a large mean
// component every query of the head has there, so they take a large share of
// attention whatever the context. The size of that mean component is solved
// per query and step, exactly over all keys, so that the sinks take a target
// share: a base share per head in [0.15, 0.45] that wanders from step to step
// (AR(1) in logit space), like heads going more or less dormant. Keys are
// rotated by RoPE (rotate-half pairing, as in Llama) at their position.
//
// Queries: q = A u_sink + m_shift + beta unit(B l_s) + Bq eta_s + noise, rotated
// at position tokens + step. A peaked head's latent l_s sits on one of its two
// focus topics with an AR(1) drift (low-entropy attention concentrated on a
// few hundred tokens); a flat head's l_s is an AR(1) random latent with a
// small beta (mass spread). Bq has a different (high-frequency-weighted)
// covariance and m_shift is a mean the keys lack: the query/key shift that
// breaks naive nearest-neighbour search.
//
// Layers: B, c, k_mean, d_seg and e_tok of layer l+1 are AR(1) of layer l's
// with coefficient `layer_similarity`. Values: low-rank Gaussian around topic
// value centres; sink values are near zero. Needles: after generation, a few
// keys are replaced by keys aligned (after RoPE) with the specific part of one
// query at one step, a few logits above the best ordinary key.
//
// Every random stream is keyed by (seed, purpose, indices), so the output is
// the same for any thread count.
#include "common/synthetic.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "common/synthetic_internal.h"

namespace icecache {
namespace {

using synthetic_internal::Angles;
using synthetic_internal::CalibrateAmplitude;
using synthetic_internal::Dot;
using synthetic_internal::Geometry;
using synthetic_internal::HeadRoles;
using synthetic_internal::kFamily;
using synthetic_internal::kHeadModel;
using synthetic_internal::kNeedles;
using synthetic_internal::kPeaked;
using synthetic_internal::kQueries;
using synthetic_internal::kSegment;
using synthetic_internal::kSegments;
using synthetic_internal::kTokens;
using synthetic_internal::Logit;
using synthetic_internal::MakeGeometry;
using synthetic_internal::Norm;
using synthetic_internal::RareTokens;
using synthetic_internal::Rng;
using synthetic_internal::RotateAt;
using synthetic_internal::RotateRow;

// ---- Fixed shape of the model (not user knobs) -----------------------------

constexpr double kTopicVar = 0.55;       // latent variance between topic centres
constexpr double kSegVar = 0.15;         // between segments of a topic
constexpr double kTokVar = 0.30;         // between tokens of a segment
constexpr float kIsoNoise = 0.12f;       // isotropic key noise per dim
constexpr float kKeyMean = 0.5f;         // per-dim scale of the key mean
constexpr double kShareJitter = 0.8;     // std of the per-step sink share in logit space
constexpr float kPeakedBeta = 34.0f;     // semantic query magnitude, peaked heads
constexpr float kFlatBeta = 7.0f;        // semantic query magnitude, flat heads
constexpr float kRetrievalBeta = 17.0f;  // rare-direction query magnitude, retrieval heads
constexpr double kFocusDrift = 0.35;     // std of a peaked head's latent around its focus
constexpr int kQueryNoiseRank = 8;
constexpr float kQueryNoise = 0.5f;  // per-dim RMS of the query's own low-rank part
constexpr float kQueryIso = 0.2f;
constexpr float kShiftNorm = 3.0f;  // |m_shift| per unit of query_shift
constexpr float kValueIso = 0.1f;
constexpr double kNeedleMargin = 3.0;  // needle logit above the best sampled ordinary key
constexpr int64_t kBlockTokens = 2048;

}  // namespace

namespace synthetic_internal {

Geometry MakeGeometry(const SyntheticConfig& c) {
  Geometry g;
  g.d = c.head_dim;
  g.pairs = c.head_dim / 2;
  g.sink_pairs = std::max(1, std::min(4, g.pairs / 8));
  g.inv_freq.resize(g.pairs);
  for (int i = 0; i < g.pairs; ++i) {
    g.inv_freq[i] = std::pow(c.rope_theta, -2.0 * i / g.d);
  }
  for (int i = g.pairs - g.sink_pairs; i < g.pairs; ++i) {
    g.sink_dims.push_back(i);
    g.sink_dims.push_back(i + g.pairs);
  }
  // Outliers sit in the low-frequency pairs just below the sink pairs, one
  // channel per pair, as the massive key channels of real models do.
  for (int k = 0; k < c.outlier_channels; ++k) {
    g.outlier_dims.push_back(g.pairs - g.sink_pairs - 1 - k);
  }
  g.key_profile.resize(g.d);
  g.query_profile.resize(g.d);
  for (int dim = 0; dim < g.d; ++dim) {
    const int pair = dim % g.pairs;
    const double lowness = g.pairs > 1 ? static_cast<double>(pair) / (g.pairs - 1) : 1.0;
    const bool sink = pair >= g.pairs - g.sink_pairs;
    g.key_profile[dim] = sink ? 0.03f : static_cast<float>(0.35 + 0.65 * lowness);
    g.query_profile[dim] = sink ? 0.03f : static_cast<float>(1.0 - 0.6 * lowness);
  }
  g.local_pairs = synthetic_internal::LocalPairs(c, g);
  return g;
}

}  // namespace synthetic_internal

namespace {

// The model of one (layer, KV head).
struct HeadModel {
  std::vector<float> basis;         // [rank][d] semantic key basis
  std::vector<float> value_basis;   // [rank][d]
  std::vector<float> key_mean;      // [d]
  std::vector<float> outlier_mean;  // [outlier_channels]
  std::vector<float> topics;        // [topics][rank]
  std::vector<float> value_topics;  // [topics][rank]
  std::vector<float> sink_dir;      // [d], unit, in the sink dims
  float typical_key_norm = 0;
};

// A random basis with `rank` columns of decaying norm whose squares sum to d,
// each row weighted by `profile`. Stored column-major as [rank][d].
std::vector<float> RandomBasis(Rng& rng, int rank, int d, const std::vector<float>* profile) {
  std::vector<float> b(static_cast<size_t>(rank) * d);
  std::vector<double> w(rank);
  const double knee = std::max(1.0, rank / 4.0);
  for (int k = 0; k < rank; ++k) w[k] = 1.0 / (1.0 + k / knee);
  const double wsum = std::accumulate(w.begin(), w.end(), 0.0);
  for (int k = 0; k < rank; ++k) {
    float* col = &b[static_cast<size_t>(k) * d];
    for (int i = 0; i < d; ++i) {
      col[i] = static_cast<float>(rng.Gauss()) * (profile ? (*profile)[i] : 1.0f);
    }
    const float n = Norm(col, d);
    const float target = static_cast<float>(std::sqrt(d * w[k] / wsum));
    for (int i = 0; i < d; ++i) col[i] *= n > 0 ? target / n : 0.0f;
  }
  return b;
}

void ArMix(std::vector<float>& prev_in_next_out, const std::vector<float>& fresh, double rho) {
  const float a = static_cast<float>(rho), s = static_cast<float>(std::sqrt(1.0 - rho * rho));
  for (size_t i = 0; i < fresh.size(); ++i)
    prev_in_next_out[i] = a * prev_in_next_out[i] + s * fresh[i];
}

std::vector<float> GaussVector(Rng& rng, size_t n, double scale) {
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(rng.Gauss() * scale);
  return v;
}

HeadModel FreshHeadModel(const SyntheticConfig& c, const Geometry& g, Rng& rng) {
  HeadModel m;
  m.basis = RandomBasis(rng, c.rank, g.d, &g.key_profile);
  m.value_basis = RandomBasis(rng, c.rank, g.d, nullptr);
  m.key_mean.resize(g.d);
  for (int i = 0; i < g.d; ++i)
    m.key_mean[i] = static_cast<float>(rng.Gauss()) * kKeyMean * g.key_profile[i];
  m.outlier_mean.resize(c.outlier_channels);
  for (auto& o : m.outlier_mean) {
    o = static_cast<float>((rng.Uniform() < 0.5 ? -1.0 : 1.0) * c.outlier_scale *
                           (0.7 + 0.6 * rng.Uniform()));
  }
  m.topics = GaussVector(rng, static_cast<size_t>(c.topics) * c.rank, std::sqrt(kTopicVar));
  m.value_topics = GaussVector(rng, static_cast<size_t>(c.topics) * c.rank, std::sqrt(0.5));
  return m;
}

// Layer 0 fresh; layer l+1 an AR(1) step of layer l. The sink direction and
// the outlier signs stay fixed per head (they are properties of the head).
std::vector<HeadModel> MakeHeadModels(const SyntheticConfig& c, const Geometry& g) {
  std::vector<HeadModel> models(static_cast<size_t>(c.layers) * c.kv_heads);
  const double rho = c.layer_similarity;
  for (int h = 0; h < c.kv_heads; ++h) {
    Rng sink_rng(c.seed, kHeadModel, h, 0xffff);
    std::vector<float> sink_dir(g.d, 0.0f);
    for (size_t k = 0; k < g.sink_dims.size(); ++k) {
      // Weighted to the lowest pair, which rotates least over the context.
      const int pair_rank = static_cast<int>(k / 2);
      sink_dir[g.sink_dims[k]] =
          static_cast<float>(std::fabs(sink_rng.Gauss()) + 0.5) * (1.0f + pair_rank);
    }
    const float sn = Norm(sink_dir.data(), g.d);
    for (auto& x : sink_dir) x /= sn;
    for (int l = 0; l < c.layers; ++l) {
      Rng rng(c.seed, kHeadModel, h, l);
      HeadModel fresh = FreshHeadModel(c, g, rng);
      HeadModel& m = models[static_cast<size_t>(l) * c.kv_heads + h];
      if (l == 0) {
        m = std::move(fresh);
      } else {
        m = models[static_cast<size_t>(l - 1) * c.kv_heads + h];
        ArMix(m.basis, fresh.basis, rho);
        ArMix(m.value_basis, fresh.value_basis, rho);
        ArMix(m.key_mean, fresh.key_mean, rho);
        ArMix(m.topics, fresh.topics, rho);
        ArMix(m.value_topics, fresh.value_topics, rho);
      }
      m.sink_dir = sink_dir;
      double sq = 0;
      for (float x : m.key_mean) sq += static_cast<double>(x) * x;
      for (float o : m.outlier_mean) sq += static_cast<double>(o) * o * (1.0 + 0.0625);
      sq += g.d * (1.0 + static_cast<double>(kIsoNoise) * kIsoNoise);
      m.typical_key_norm = static_cast<float>(std::sqrt(sq));
    }
  }
  return models;
}

struct Segments {
  std::vector<int64_t> starts;
  std::vector<int32_t> topics;
};

Segments MakeSegments(const SyntheticConfig& c) {
  Segments s;
  Rng rng(c.seed, kSegments);
  // Skewed topic popularity (Zipf-like, exponent 0.7) in a random order.
  std::vector<int> order(c.topics);
  std::iota(order.begin(), order.end(), 0);
  for (int i = c.topics - 1; i > 0; --i) std::swap(order[i], order[rng.Below(i + 1)]);
  std::vector<double> cdf(c.topics);
  double acc = 0;
  for (int j = 0; j < c.topics; ++j) cdf[j] = (acc += std::pow(j + 1.0, -0.7));
  for (auto& x : cdf) x /= acc;
  int64_t pos = c.sink_tokens;
  int prev = -1;
  while (pos < c.tokens) {
    int topic;
    do {
      const double u = rng.Uniform();
      const int idx = static_cast<int>(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
      topic = order[std::min(idx, c.topics - 1)];
    } while (topic == prev && c.topics > 1);
    double u = rng.Uniform();
    if (u <= 0) u = 1e-12;
    const int64_t len = std::max<int64_t>(4, std::llround(-std::log(u) * c.mean_segment));
    s.starts.push_back(pos);
    s.topics.push_back(topic);
    prev = topic;
    pos += len;
  }
  return s;
}

struct QueryHeadState {
  bool peaked = false;
  float sink_amp = 0;
  std::vector<float> mean_dir;   // sink part direction (unit)
  std::vector<float> shift;      // m_shift
  std::vector<float> own_basis;  // [kQueryNoiseRank][d]
  int focus[2] = {0, 0};
};

absl::Status ValidateFamilyKnobs(const SyntheticConfig& c) {
  auto bad = [](std::string_view field, const std::string& why) {
    return absl::InvalidArgumentError(
        absl::StrCat("synthetic config: ", std::string(field), " ", why));
  };
  if (!(c.sink_share_lo > 0 && c.sink_share_lo <= c.sink_share_hi && c.sink_share_hi < 1)) {
    return bad("sink_share_lo/sink_share_hi",
               absl::StrCat("must satisfy 0 < lo <= hi < 1, got ", c.sink_share_lo, " and ",
                            c.sink_share_hi));
  }
  if (!(c.sink_norm_frac > 0.0f && c.sink_norm_frac <= 10.0f))
    return bad("sink_norm_frac", absl::StrCat("must be in (0, 10], got ", c.sink_norm_frac));
  if (!(c.focus_switch >= 0.0f && c.focus_switch <= 1.0f))
    return bad("focus_switch", absl::StrCat("must be in [0, 1], got ", c.focus_switch));
  if (!(c.temperature_spread >= 1.0f && c.temperature_spread <= 100.0f)) {
    return bad("temperature_spread",
               absl::StrCat("must be in [1, 100], got ", c.temperature_spread));
  }
  if (!(c.retrieval_fraction >= 0.0f && c.retrieval_fraction <= 1.0f))
    return bad("retrieval_fraction", absl::StrCat("must be in [0, 1], got ", c.retrieval_fraction));
  if (!(c.local_fraction >= 0.0f && c.local_fraction <= 1.0f))
    return bad("local_fraction", absl::StrCat("must be in [0, 1], got ", c.local_fraction));
  // The sizes below only matter (and are only checked) when their family
  // knob is on, so that any context length works with the defaults.
  if (c.retrieval_fraction > 0.0f &&
      (c.rare_tokens < 1 || c.rare_tokens > 1024 || c.rare_tokens > c.tokens - c.sink_tokens)) {
    return bad("rare_tokens", absl::StrCat("must be in [1, min(1024, tokens - sink_tokens)], got ",
                                           c.rare_tokens));
  }
  if (c.retrieval_dwell < 1)
    return bad("retrieval_dwell", absl::StrCat("must be >= 1, got ", c.retrieval_dwell));
  if (c.local_fraction > 0.0f &&
      (c.local_window < 1 || c.local_window >= c.tokens - c.sink_tokens)) {
    return bad("local_window",
               absl::StrCat("must be in [1, tokens - sink_tokens), got ", c.local_window));
  }
  if (!(c.local_share > 0.0f && c.local_share < 1.0f))
    return bad("local_share", absl::StrCat("must be in (0, 1), got ", c.local_share));
  if (!(c.key_norm_sigma >= 0.0f && c.key_norm_sigma <= 3.0f))
    return bad("key_norm_sigma", absl::StrCat("must be in [0, 3], got ", c.key_norm_sigma));
  return absl::OkStatus();
}

absl::Status Validate(const SyntheticConfig& c) {
  auto bad = [](std::string_view field, const std::string& why) {
    return absl::InvalidArgumentError(
        absl::StrCat("synthetic config: ", std::string(field), " ", why));
  };
  if (c.layers < 1 || c.layers > 1024)
    return bad("layers", absl::StrCat("must be in [1, 1024], got ", c.layers));
  if (c.kv_heads < 1 || c.kv_heads > 1024)
    return bad("kv_heads", absl::StrCat("must be in [1, 1024], got ", c.kv_heads));
  if (c.q_heads < c.kv_heads || c.q_heads % c.kv_heads != 0 || c.q_heads > 8192) {
    return bad("q_heads", absl::StrCat("must be a positive multiple of kv_heads (", c.kv_heads,
                                       "), at most 8192; got ", c.q_heads));
  }
  if (c.tokens < 1 || c.tokens > (int64_t{1} << 24)) {
    return bad("tokens", absl::StrCat("must be in [1, 16777216], got ", c.tokens));
  }
  if (c.head_dim < 16 || c.head_dim > 1024 || c.head_dim % 2 != 0) {
    return bad("head_dim", absl::StrCat("must be even and in [16, 1024], got ", c.head_dim));
  }
  if (c.steps < 1 || c.steps > 1000000)
    return bad("steps", absl::StrCat("must be in [1, 1000000], got ", c.steps));
  if (!(c.rope_theta > 1.0) || !std::isfinite(c.rope_theta)) {
    return bad("rope_theta", absl::StrCat("must be finite and > 1, got ", c.rope_theta));
  }
  if (c.rank < 1 || c.rank > c.head_dim) {
    return bad("rank", absl::StrCat("must be in [1, head_dim=", c.head_dim, "], got ", c.rank));
  }
  const int sink_pairs = std::max(1, std::min(4, c.head_dim / 16));
  const int max_outliers = c.head_dim / 2 - sink_pairs - 1;
  if (c.outlier_channels < 0 || c.outlier_channels > max_outliers) {
    return bad("outlier_channels", absl::StrCat("must be in [0, ", max_outliers, "] for head_dim ",
                                                c.head_dim, ", got ", c.outlier_channels));
  }
  if (!(c.outlier_scale >= 0.0f) || !std::isfinite(c.outlier_scale) || c.outlier_scale > 1000.0f) {
    return bad("outlier_scale", "must be finite and in [0, 1000]");
  }
  if (c.sink_tokens < 0 || c.sink_tokens >= c.tokens) {
    return bad("sink_tokens", absl::StrCat("must be in [0, tokens), got ", c.sink_tokens));
  }
  if (c.mean_segment < 1)
    return bad("mean_segment", absl::StrCat("must be >= 1, got ", c.mean_segment));
  if (c.topics < 1 || c.topics > 1000000)
    return bad("topics", absl::StrCat("must be in [1, 1000000], got ", c.topics));
  if (c.needles < 0 || c.needles > c.tokens - c.sink_tokens || c.needles > 1024) {
    return bad("needles",
               absl::StrCat("must be in [0, min(1024, tokens - sink_tokens)], got ", c.needles));
  }
  if (!(c.query_shift >= 0.0f) || !std::isfinite(c.query_shift) || c.query_shift > 1000.0f) {
    return bad("query_shift", "must be finite and in [0, 1000]");
  }
  auto unit = [&](std::string_view field, float v) -> absl::Status {
    if (!(v >= 0.0f && v <= 1.0f)) return bad(field, absl::StrCat("must be in [0, 1], got ", v));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(unit("peaked_fraction", c.peaked_fraction));
  RETURN_IF_ERROR(unit("step_locality", c.step_locality));
  RETURN_IF_ERROR(unit("layer_similarity", c.layer_similarity));
  RETURN_IF_ERROR(ValidateFamilyKnobs(c));
  if (c.threads < 0 || c.threads > 1024) return bad("threads", "must be in [0, 1024]");
  const double elems = static_cast<double>(c.layers) * c.kv_heads * c.tokens * c.head_dim;
  if (elems > static_cast<double>(int64_t{1} << 33)) {
    return bad("layers x kv_heads x tokens x head_dim",
               absl::StrCat("is ", elems, " elements per array; the limit is 2^33"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<KvDump> GenerateSynthetic(const SyntheticConfig& config) {
  return GenerateSynthetic(config, nullptr);
}

absl::StatusOr<KvDump> GenerateSynthetic(const SyntheticConfig& config, SyntheticTruth* truth) {
  KvDump dump;
  RETURN_IF_ERROR(GenerateSyntheticInto(config, truth, &dump));
  return dump;
}

absl::Status GenerateSyntheticInto(const SyntheticConfig& config, SyntheticTruth* truth,
                                   KvDump* out) {
  RETURN_IF_ERROR(Validate(config));
  const SyntheticConfig& c = config;
  const Geometry g = MakeGeometry(c);
  const int d = g.d, r = c.rank, group = c.q_heads / c.kv_heads;
  const int64_t T = c.tokens;
  const double rho_l = c.layer_similarity;
  // The slice of KV heads generated (SyntheticConfig::kv_head_begin).
  const int hb = c.kv_head_begin, hn = c.kv_head_count > 0 ? c.kv_head_count : c.kv_heads - hb;
  if (hb < 0 || hn < 1 || hb + hn > c.kv_heads || c.kv_head_count < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("synthetic: kv_head_begin ", hb, " and kv_head_count ", c.kv_head_count,
                     " must name heads inside [0, ", c.kv_heads, ")"));
  }
  if (truth != nullptr && hn != c.kv_heads) {
    return absl::InvalidArgumentError("synthetic: a slice of the KV heads gives no truth");
  }
  const int qn = hn * group;  // query heads of the slice
  // Element offset of (layer l, KV head h) in the dump's keys and values.
  auto kv_at = [&](int l, int h) -> size_t {
    return (static_cast<size_t>(l) * hn + (h - hb)) * static_cast<size_t>(c.tokens) * g.d;
  };
  const float lam = static_cast<float>(rho_l),
              lam_s = static_cast<float>(std::sqrt(1.0 - rho_l * rho_l));

  KvDump& dump = *out;
  dump.layers = c.layers;
  dump.kv_heads = hn;
  dump.q_heads = qn;
  dump.tokens = T;
  dump.head_dim = d;
  dump.steps = c.steps;
  dump.rope_theta = c.rope_theta;
  dump.model = "synthetic";
  const size_t kv_elems = static_cast<size_t>(c.layers) * hn * T * d;
  const bool want_pre = truth != nullptr && truth->want_pre_rope_keys;
  try {
    // assign: a dump passed again keeps its capacity (no fresh pages to fault in).
    dump.keys.assign(kv_elems, 0.0f);
    dump.values.assign(kv_elems, 0.0f);
    dump.queries.assign(static_cast<size_t>(c.steps) * c.layers * qn * d, 0.0f);
    if (truth != nullptr) {
      truth->pre_rope_keys.clear();
      if (want_pre) truth->pre_rope_keys.resize(kv_elems);
      truth->token_topic.assign(T, -1);
      truth->rare_tokens.clear();
    }
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat("synthetic: cannot allocate ", kv_elems,
                                                     " x 2 fp32 elements for keys and values"));
  }

  const std::vector<HeadModel> models = MakeHeadModels(c, g);
  const Segments segs = MakeSegments(c);
  auto model = [&](int l, int h) -> const HeadModel& {
    return models[static_cast<size_t>(l) * c.kv_heads + h];
  };

  std::vector<std::vector<float>> pos_code(c.kv_heads);
  for (int h = 0; h < c.kv_heads; ++h) pos_code[h] = synthetic_internal::PositionalCode(c, g, h);

  // ---- Keys and values -----------------------------------------------------
  const int64_t blocks = (T + kBlockTokens - 1) / kBlockTokens;
  const int max_threads =
      c.threads > 0
          ? c.threads
          : static_cast<int>(std::min(8u, std::max(1u, std::thread::hardware_concurrency())));
  const int threads = static_cast<int>(std::min<int64_t>(max_threads, blocks));
  std::atomic<int64_t> next_block{0};
  const float seg_sd = static_cast<float>(std::sqrt(kSegVar)),
              tok_sd = static_cast<float>(std::sqrt(kTokVar));
  auto worker = [&]() {
    std::vector<float> cs(kBlockTokens * g.pairs), sn(kBlockTokens * g.pairs);
    std::vector<float> seg_off(static_cast<size_t>(c.layers) * r);
    std::vector<float> e(r), ev(r), z(r), zv(r), row(d);
    for (;;) {
      const int64_t b = next_block.fetch_add(1);
      if (b >= blocks) break;
      const int64_t t0 = b * kBlockTokens, t1 = std::min(T, t0 + kBlockTokens);
      for (int64_t t = t0; t < t1; ++t)
        Angles(g, static_cast<double>(t), &cs[(t - t0) * g.pairs], &sn[(t - t0) * g.pairs]);
      for (int h = hb; h < hb + hn; ++h) {
        Rng rng(c.seed, kTokens, h, b);
        int64_t seg = -1;
        for (int64_t t = t0; t < t1; ++t) {
          const float* ct = &cs[(t - t0) * g.pairs];
          const float* st = &sn[(t - t0) * g.pairs];
          if (t < c.sink_tokens) {
            for (int l = 0; l < c.layers; ++l) {
              const HeadModel& m = model(l, h);
              const size_t off = kv_at(l, h) + static_cast<size_t>(t) * d;
              const float norm =
                  c.sink_norm_frac * m.typical_key_norm * (1.0f - 0.1f * static_cast<float>(t % 4));
              for (int i = 0; i < d; ++i) row[i] = norm * m.sink_dir[i] + 0.05f * rng.FastNormal();
              if (want_pre) std::memcpy(&truth->pre_rope_keys[off], row.data(), d * sizeof(float));
              RotateRow(row.data(), ct, st, g.pairs, &dump.keys[off]);
              for (int i = 0; i < d; ++i) dump.values[off + i] = 0.05f * rng.FastNormal();
            }
            continue;
          }
          const int64_t s_idx =
              std::upper_bound(segs.starts.begin(), segs.starts.end(), t) - segs.starts.begin() - 1;
          if (s_idx != seg) {
            seg = s_idx;
            Rng srng(c.seed, kSegment, h, static_cast<uint64_t>(seg));
            for (int l = 0; l < c.layers; ++l) {
              for (int k = 0; k < r; ++k) {
                const float fresh = seg_sd * static_cast<float>(srng.Gauss());
                seg_off[l * r + k] =
                    l == 0 ? fresh : lam * seg_off[(l - 1) * r + k] + lam_s * fresh;
              }
            }
          }
          const int topic = segs.topics[seg];
          if (truth != nullptr && h == 0) truth->token_topic[t] = topic;
          // Heavy-tailed norms: one scale per token, the same in every layer.
          const float norm_scale =
              c.key_norm_sigma > 0.0f
                  ? std::exp(c.key_norm_sigma *
                             static_cast<float>(Rng(c.seed, kFamily, h, t, 5).Gauss()))
                  : 1.0f;
          for (int l = 0; l < c.layers; ++l) {
            const HeadModel& m = model(l, h);
            for (int k = 0; k < r; ++k) {
              const float fe = tok_sd * rng.FastNormal();
              const float fv = 0.7071f * rng.FastNormal();
              e[k] = l == 0 ? fe : lam * e[k] + lam_s * fe;
              ev[k] = l == 0 ? fv : lam * ev[k] + lam_s * fv;
              z[k] = m.topics[static_cast<size_t>(topic) * r + k] + seg_off[l * r + k] + e[k];
              zv[k] = m.value_topics[static_cast<size_t>(topic) * r + k] + ev[k];
            }
            const size_t off = kv_at(l, h) + static_cast<size_t>(t) * d;
            for (int i = 0; i < d; ++i) row[i] = m.key_mean[i] + kIsoNoise * rng.FastNormal();
            for (int k = 0; k < r; ++k) {
              const float* col = &m.basis[static_cast<size_t>(k) * d];
              const float zk = z[k];
              for (int i = 0; i < d; ++i) row[i] += zk * col[i];
            }
            for (size_t o = 0; o < g.outlier_dims.size(); ++o) {
              row[g.outlier_dims[o]] += m.outlier_mean[o] * (1.0f + 0.25f * rng.FastNormal());
            }
            if (norm_scale != 1.0f) {
              for (int i = 0; i < d; ++i) row[i] *= norm_scale;
            }
            const std::vector<float>& code = pos_code[h];
            for (size_t i = 0; i < code.size(); ++i) row[i] += code[i];
            if (want_pre) std::memcpy(&truth->pre_rope_keys[off], row.data(), d * sizeof(float));
            RotateRow(row.data(), ct, st, g.pairs, &dump.keys[off]);
            float* v = &dump.values[off];
            for (int i = 0; i < d; ++i) v[i] = kValueIso * rng.FastNormal();
            for (int k = 0; k < r; ++k) {
              const float* col = &m.value_basis[static_cast<size_t>(k) * d];
              const float zk = zv[k];
              for (int i = 0; i < d; ++i) v[i] += zk * col[i];
            }
          }
        }
      }
    }
  };
  if (threads <= 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    for (int i = 0; i < threads; ++i) pool.emplace_back(worker);
    for (auto& th : pool) th.join();
  }

  const RareTokens rare = synthetic_internal::MakeRareTokens(c, g);
  {
    std::vector<float> key_scale;
    for (const HeadModel& m : models) key_scale.push_back(m.typical_key_norm);
    synthetic_internal::PlantRareKeys(c, g, rare, key_scale, &dump, truth);
  }
  const HeadRoles roles = synthetic_internal::AssignRoles(c);
  if (truth != nullptr && rare.per_head > 0) {
    truth->retrieval_target.assign(static_cast<size_t>(c.steps) * c.layers * c.q_heads, -1);
  }

  // ---- Queries -------------------------------------------------------------
  std::vector<uint8_t> peaked(static_cast<size_t>(c.layers) * c.q_heads, 0);
  {
    const int n_peaked = static_cast<int>(std::lround(c.peaked_fraction * c.q_heads));
    for (int l = 0; l < c.layers; ++l) {
      Rng prng(c.seed, kPeaked, l);
      std::vector<int> perm(c.q_heads);
      std::iota(perm.begin(), perm.end(), 0);
      for (int i = c.q_heads - 1; i > 0; --i) std::swap(perm[i], perm[prng.Below(i + 1)]);
      for (int i = 0; i < n_peaked; ++i) peaked[static_cast<size_t>(l) * c.q_heads + perm[i]] = 1;
    }
  }
  const float rho_s = c.step_locality, rho_s_c = std::sqrt(1.0f - rho_s * rho_s);
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(d));
  // spec_q: the head-specific part of each query (semantic + own noise), after RoPE.
  std::vector<float> spec_q(dump.queries.size());
  // One job per (layer, KV head): its G query heads advance step by step
  // together so each step reads the head's keys once for all of them. Every
  // query head keeps its own random stream.
  struct QueryState {
    Rng rng;
    bool is_peaked = false;
    double base_share = 0;
    double share_noise = 0;
    float sink_amp = 0;
    int focus[2] = {0, 0};
    int cur = 0;
    std::vector<float> mean_dir, shift, own, drift, eta;
    // The families' parts (defaults: none).
    Rng frng;
    bool retrieval = false, local = false;
    float tau = 1.0f;
    int rare_cur = 0;
    float local_amp = 0;
    QueryState(Rng r, Rng f) : rng(r), frng(f) {}
  };
  auto query_job = [&](int l, int h, std::vector<float>& logit_a, std::vector<float>& logit_b,
                       std::vector<float>& logit_c) {
    const HeadModel& m = model(l, h);
    std::vector<QueryState> qs;
    for (int j = 0; j < group; ++j) {
      const int qh = h * group + j;
      qs.emplace_back(Rng(c.seed, kQueries, l, qh), Rng(c.seed, kFamily, l, qh, 6));
      QueryState& q = qs.back();
      Rng& rng = q.rng;
      const size_t role = static_cast<size_t>(l) * c.q_heads + qh;
      q.retrieval = roles.retrieval[role] != 0 && rare.per_head > 0;
      q.local = roles.local[role] != 0 && !pos_code[h].empty();
      q.tau = roles.temperature[role];
      if (q.retrieval) q.rare_cur = static_cast<int>(q.frng.Below(rare.per_head));
      q.is_peaked = peaked[static_cast<size_t>(l) * c.q_heads + qh] != 0;
      // Mean part: the head's sink direction, slightly perturbed per query head.
      q.mean_dir.assign(d, 0.0f);
      for (int dim : g.sink_dims)
        q.mean_dir[dim] = m.sink_dir[dim] * (1.0f + 0.25f * static_cast<float>(rng.Gauss()));
      const float mn = Norm(q.mean_dir.data(), d);
      for (auto& x : q.mean_dir) x /= mn;
      q.base_share = c.sink_share_lo + (c.sink_share_hi - c.sink_share_lo) * rng.Uniform();
      std::vector<float> sdir = GaussVector(rng, d, 1.0);
      for (int dim : g.sink_dims) sdir[dim] = 0.0f;
      const float sn = Norm(sdir.data(), d);
      q.shift.resize(d);
      for (int i = 0; i < d; ++i) q.shift[i] = sdir[i] / sn * kShiftNorm * c.query_shift;
      q.own = RandomBasis(rng, kQueryNoiseRank, d, &g.query_profile);
      for (auto& x : q.own) x *= kQueryNoise;
      q.focus[0] = static_cast<int>(rng.Below(c.topics));
      q.focus[1] = static_cast<int>(rng.Below(c.topics));
      q.drift.resize(r);
      q.eta.resize(kQueryNoiseRank);
      for (int k = 0; k < r; ++k) q.drift[k] = static_cast<float>(rng.Gauss());
      for (int k = 0; k < kQueryNoiseRank; ++k) q.eta[k] = static_cast<float>(rng.Gauss());
      q.share_noise = rng.Gauss();
    }
    std::vector<float> lat(r), sem(d), rest(d), spec(d);
    std::vector<float> rest_rot(static_cast<size_t>(group) * d),
        md_rot(static_cast<size_t>(group) * d);
    std::vector<float> specs(static_cast<size_t>(group) * d);
    std::vector<float> local_dir(pos_code[h]), local_rot(static_cast<size_t>(group) * d);
    if (!local_dir.empty()) {
      const float ln = Norm(local_dir.data(), d);
      for (auto& x : local_dir) x /= ln;
    }
    bool any_local = false;
    for (const QueryState& q : qs) any_local |= q.local;
    const float* keys = &dump.keys[kv_at(l, h)];
    for (int s = 0; s < c.steps; ++s) {
      const double pos = static_cast<double>(T + s);
      for (int j = 0; j < group; ++j) {
        QueryState& q = qs[j];
        Rng& rng = q.rng;
        if (s > 0) {
          for (int k = 0; k < r; ++k)
            q.drift[k] = rho_s * q.drift[k] + rho_s_c * static_cast<float>(rng.Gauss());
          for (int k = 0; k < kQueryNoiseRank; ++k)
            q.eta[k] = rho_s * q.eta[k] + rho_s_c * static_cast<float>(rng.Gauss());
          q.share_noise = rho_s * q.share_noise + rho_s_c * rng.Gauss();
          if (rng.Uniform() < c.focus_switch) q.cur ^= 1;
        }
        for (int k = 0; k < r; ++k) {
          lat[k] = q.is_peaked ? m.topics[static_cast<size_t>(q.focus[q.cur]) * r + k] +
                                     static_cast<float>(kFocusDrift) * q.drift[k]
                               : q.drift[k];
        }
        std::fill(sem.begin(), sem.end(), 0.0f);
        for (int k = 0; k < r; ++k) {
          const float* col = &m.basis[static_cast<size_t>(k) * d];
          for (int i = 0; i < d; ++i) sem[i] += lat[k] * col[i];
        }
        float sem_n = Norm(sem.data(), d);
        float beta = q.is_peaked ? kPeakedBeta : kFlatBeta;
        if (q.retrieval) {
          // A retrieval head looks for one rare token instead of a topic.
          if (s > 0 && rare.per_head > 1 && q.frng.Uniform() < 1.0 / c.retrieval_dwell) {
            q.rare_cur = static_cast<int>((q.rare_cur + 1 + q.frng.Below(rare.per_head - 1)) %
                                          rare.per_head);
          }
          std::memcpy(sem.data(), rare.dir(h, q.rare_cur), d * sizeof(float));
          sem_n = 1.0f;
          beta = kRetrievalBeta;
          if (truth != nullptr) {
            truth->retrieval_target[(static_cast<size_t>(s) * c.layers + l) * c.q_heads +
                                    h * group + j] =
                rare.positions[static_cast<size_t>(h) * rare.per_head + q.rare_cur];
          }
        }
        for (int i = 0; i < d; ++i) {
          spec[i] = (sem_n > 0 ? beta * sem[i] / sem_n : 0.0f) +
                    kQueryIso * static_cast<float>(rng.Gauss());
        }
        for (int k = 0; k < kQueryNoiseRank; ++k) {
          const float* col = &q.own[static_cast<size_t>(k) * d];
          for (int i = 0; i < d; ++i) spec[i] += q.eta[k] * col[i];
        }
        for (int i = 0; i < d; ++i) rest[i] = q.tau * (q.shift[i] + spec[i]);
        RotateAt(g, pos, rest.data(), &rest_rot[static_cast<size_t>(j) * d]);
        if (q.local) RotateAt(g, pos, local_dir.data(), &local_rot[static_cast<size_t>(j) * d]);
        RotateAt(g, pos, q.mean_dir.data(), &md_rot[static_cast<size_t>(j) * d]);
        RotateAt(g, pos, spec.data(), &specs[static_cast<size_t>(j) * d]);
      }
      // Size each query's mean part so that the sinks take this step's share
      // of its attention, computed exactly over all keys. The share wanders
      // (AR(1) in logit space) around the head's base share, as real heads go
      // more or less "dormant" from token to token.
      for (int64_t t = 0; t < T; ++t) {
        const float* k = keys + t * d;
        for (int j = 0; j < group; ++j) {
          logit_a[static_cast<size_t>(j) * T + t] =
              Dot(&rest_rot[static_cast<size_t>(j) * d], k, d) * inv_sqrt_d;
          float bt = 0;
          for (int dim : g.sink_dims) bt += md_rot[static_cast<size_t>(j) * d + dim] * k[dim];
          logit_b[static_cast<size_t>(j) * T + t] = bt * inv_sqrt_d;
          if (qs[j].local) {
            logit_c[static_cast<size_t>(j) * T + t] =
                Dot(&local_rot[static_cast<size_t>(j) * d], k, d) * inv_sqrt_d;
          }
        }
      }
      // A local head reads the keys' positional code so that the last
      // local_window positions take local_share of its attention (before
      // the sinks take theirs).
      for (int j = 0; any_local && j < group; ++j) {
        QueryState& q = qs[j];
        if (!q.local) continue;
        float* a = &logit_a[static_cast<size_t>(j) * T];
        const float* lc = &logit_c[static_cast<size_t>(j) * T];
        // At most 30 logits of positional preference: where the share cannot
        // be reached the head stays local instead of collapsing on a token.
        const float peak = *std::max_element(lc, lc + T);
        q.local_amp =
            synthetic_internal::CalibrateShare(a, lc, T, T - c.local_window, T, c.local_share,
                                               q.local_amp, peak > 0 ? 30.0 / peak : 0.0);
        for (int64_t t = 0; t < T; ++t) a[t] += q.local_amp * lc[t];
        for (int i = 0; i < d; ++i) {
          rest_rot[static_cast<size_t>(j) * d + i] +=
              q.local_amp * local_rot[static_cast<size_t>(j) * d + i];
        }
      }
      for (int j = 0; j < group; ++j) {
        QueryState& q = qs[j];
        const double share =
            1.0 / (1.0 + std::exp(-(Logit(q.base_share) + kShareJitter * q.share_noise)));
        q.sink_amp = CalibrateAmplitude(&logit_a[static_cast<size_t>(j) * T],
                                        &logit_b[static_cast<size_t>(j) * T], T, 0, c.sink_tokens,
                                        share, q.sink_amp, s == 0 ? 3 : 2);
        const int qh = h * group + j;
        const size_t off = ((static_cast<size_t>(s) * c.layers + l) * qn + (qh - hb * group)) * d;
        for (int i = 0; i < d; ++i) {
          dump.queries[off + i] = rest_rot[static_cast<size_t>(j) * d + i] +
                                  q.sink_amp * md_rot[static_cast<size_t>(j) * d + i];
        }
        std::memcpy(&spec_q[off], &specs[static_cast<size_t>(j) * d], d * sizeof(float));
      }
    }
  };
  {
    const int64_t jobs = static_cast<int64_t>(c.layers) * hn;
    std::atomic<int64_t> next_job{0};
    auto qworker = [&]() {
      std::vector<float> logit_a(static_cast<size_t>(group) * T),
          logit_b(static_cast<size_t>(group) * T),
          logit_c(c.local_fraction > 0.0f ? static_cast<size_t>(group) * T : 0);
      for (;;) {
        const int64_t j = next_job.fetch_add(1);
        if (j >= jobs) break;
        query_job(static_cast<int>(j / hn), hb + static_cast<int>(j % hn), logit_a, logit_b,
                  logit_c);
      }
    };
    const int qthreads = static_cast<int>(std::min<int64_t>(max_threads, jobs));
    if (qthreads <= 1) {
      qworker();
    } else {
      std::vector<std::thread> pool;
      for (int i = 0; i < qthreads; ++i) pool.emplace_back(qworker);
      for (auto& th : pool) th.join();
    }
  }

  // ---- Needles ---------------------------------------------------------------
  std::vector<SyntheticNeedle> needles;
  if (c.needles > 0) {
    std::vector<float> row(d), logits;
    for (int l = 0; l < c.layers; ++l) {
      for (int h = hb; h < hb + hn; ++h) {
        Rng rng(c.seed, kNeedles, l, h);
        std::vector<int64_t> used;
        for (int n = 0; n < c.needles; ++n) {
          int64_t tok;
          do {
            tok = c.sink_tokens +
                  static_cast<int64_t>(rng.Below(static_cast<uint64_t>(T - c.sink_tokens)));
          } while (std::find(used.begin(), used.end(), tok) != used.end());
          used.push_back(tok);
          SyntheticNeedle nd;
          nd.layer = l;
          nd.kv_head = h;
          nd.q_head = h * group + static_cast<int>(rng.Below(group));
          // A local head's best logits are positional: a needle aligned with
          // it would need a huge key. The next head of the group takes it.
          for (int k = 0; k < group && roles.local[static_cast<size_t>(l) * c.q_heads + nd.q_head];
               ++k) {
            nd.q_head = h * group + (nd.q_head - h * group + 1) % group;
          }
          nd.step = static_cast<int>(rng.Below(c.steps));
          nd.token = tok;
          const size_t qoff =
              ((static_cast<size_t>(nd.step) * c.layers + l) * qn + (nd.q_head - hb * group)) * d;
          const float* q = &dump.queries[qoff];
          // The best ordinary logit of this query over a sample of keys.
          const float* keys = &dump.keys[kv_at(l, h)];
          const int64_t samples = std::min<int64_t>(T - c.sink_tokens, 2048);
          float best = -1e30f;
          for (int64_t i = 0; i < samples; ++i) {
            const int64_t t =
                c.sink_tokens +
                static_cast<int64_t>(rng.Below(static_cast<uint64_t>(T - c.sink_tokens)));
            best = std::max(best, Dot(q, keys + t * d, d));
          }
          const double target = best * inv_sqrt_d + kNeedleMargin;
          // k = 0.3 k_orig + eta * unit(spec): raise eta until q.k/sqrt(d) hits the target.
          const float* spec = &spec_q[qoff];
          const float spec_n = Norm(spec, d);
          float* k = &dump.keys[kv_at(l, h) + static_cast<size_t>(tok) * d];
          for (int i = 0; i < d; ++i) row[i] = 0.3f * k[i];
          const double base = Dot(q, row.data(), d) * inv_sqrt_d;
          const double per_eta = spec_n > 0 ? Dot(q, spec, d) / spec_n * inv_sqrt_d : 0.0;
          const double eta = per_eta > 1e-6 ? std::max(0.0, (target - base) / per_eta) : 0.0;
          for (int i = 0; i < d; ++i) k[i] = row[i] + static_cast<float>(eta) * spec[i] / spec_n;
          if (want_pre) {
            // The stored pre-RoPE key must rotate into the new key at `tok`.
            RotateAt(
                g, -static_cast<double>(tok), k,
                &truth->pre_rope_keys[((static_cast<size_t>(l) * c.kv_heads + h) * T + tok) * d]);
          }
          needles.push_back(nd);
        }
      }
    }
  }

  if (truth != nullptr) {
    truth->segment_starts = segs.starts;
    truth->segment_topics = segs.topics;
    truth->peaked = std::move(peaked);
    truth->outlier_dims = g.outlier_dims;
    truth->sink_dims = g.sink_dims;
    truth->needles = std::move(needles);
    truth->retrieval = roles.retrieval;
    truth->local = roles.local;
    truth->temperature = roles.temperature;
  }
  return absl::OkStatus();
}

}  // namespace icecache
