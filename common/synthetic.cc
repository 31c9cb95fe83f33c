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

namespace icecache {
namespace {

// ---- Random numbers --------------------------------------------------------

inline uint64_t Mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

enum Purpose : uint64_t {
  kHeadModel = 1,
  kTokens = 2,
  kSegment = 3,
  kSegments = 4,
  kQueries = 5,
  kNeedles = 6,
  kPeaked = 7,
};

// xoshiro256++ seeded through splitmix64 from (seed, purpose, a, b, c).
class Rng {
 public:
  Rng(uint64_t seed, uint64_t purpose, uint64_t a = 0, uint64_t b = 0, uint64_t c = 0) {
    uint64_t x = Mix64(seed);
    x = Mix64(x ^ (purpose * 0xd1342543de82ef95ull));
    x = Mix64(x ^ (a * 0x9e3779b97f4a7c15ull + 1));
    x = Mix64(x ^ (b * 0xc2b2ae3d27d4eb4full + 2));
    x = Mix64(x ^ (c * 0x165667b19e3779f9ull + 3));
    for (auto& w : s_) {
      x += 0x9e3779b97f4a7c15ull;
      w = Mix64(x);
    }
  }
  uint64_t Next() {
    const uint64_t result = Rotl(s_[0] + s_[3], 23) + s_[0];
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }
  // Uniform integer in [0, n).
  uint64_t Below(uint64_t n) {
    return static_cast<uint64_t>(Uniform() * static_cast<double>(n)) % n;
  }
  // Exact standard normal (Box-Muller); for the few parameters of the model.
  double Gauss() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = Uniform();
    while (u1 <= 0.0) u1 = Uniform();
    const double u2 = Uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * M_PI * u2);
    has_spare_ = true;
    return r * std::cos(2.0 * M_PI * u2);
  }
  // Fast approximate standard normal for the per-token noise: the sum of four
  // 16-bit uniforms (Irwin-Hall, tails cut at 3.46 sigma). One draw per value;
  // this is what keeps 131k tokens x 8 heads at a few seconds.
  float FastNormal() {
    const uint64_t r = Next();
    const uint32_t s = static_cast<uint32_t>((r & 0xffff) + ((r >> 16) & 0xffff) +
                                             ((r >> 32) & 0xffff) + (r >> 48));
    return (static_cast<float>(s) - 131070.0f) * kFastScale;
  }

 private:
  static constexpr float kFastScale = 1.7320508f / 65536.0f;  // sqrt(3) / 2^16
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
  double spare_ = 0;
  bool has_spare_ = false;
};

// ---- Fixed shape of the model (not user knobs) -----------------------------

constexpr double kTopicVar = 0.55;                          // latent variance between topic centres
constexpr double kSegVar = 0.15;                            // between segments of a topic
constexpr double kTokVar = 0.30;                            // between tokens of a segment
constexpr float kIsoNoise = 0.12f;                          // isotropic key noise per dim
constexpr float kKeyMean = 0.5f;                            // per-dim scale of the key mean
constexpr float kSinkNormFrac = 0.35f;                      // sink key norm / typical key norm
constexpr double kSinkShareLo = 0.15, kSinkShareHi = 0.45;  // base sink share per head
constexpr double kShareJitter = 0.8;   // std of the per-step sink share in logit space
constexpr float kPeakedBeta = 34.0f;   // semantic query magnitude, peaked heads
constexpr float kFlatBeta = 7.0f;      // semantic query magnitude, flat heads
constexpr double kFocusDrift = 0.35;   // std of a peaked head's latent around its focus
constexpr double kFocusSwitch = 0.03;  // chance per step that a peaked head changes focus
constexpr int kQueryNoiseRank = 8;
constexpr float kQueryNoise = 0.5f;  // per-dim RMS of the query's own low-rank part
constexpr float kQueryIso = 0.2f;
constexpr float kShiftNorm = 3.0f;  // |m_shift| per unit of query_shift
constexpr float kValueIso = 0.1f;
constexpr double kNeedleMargin = 3.0;  // needle logit above the best sampled ordinary key
constexpr int64_t kBlockTokens = 2048;

struct Geometry {
  int d = 0;      // head_dim
  int pairs = 0;  // d / 2
  int sink_pairs = 0;
  std::vector<double> inv_freq;  // [pairs]
  std::vector<int> sink_dims;    // dims of the lowest-frequency pairs
  std::vector<int> outlier_dims;
  std::vector<float> key_profile;    // per-dim weight of the semantic basis
  std::vector<float> query_profile;  // per-dim weight of the query's own basis
};

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
  return g;
}

// Rotates one row in place by RoPE at the angles given by (cos, sin) per pair.
inline void RotateRow(const float* in, const float* cs, const float* sn, int pairs, float* out) {
  for (int i = 0; i < pairs; ++i) {
    const float a = in[i], b = in[i + pairs];
    out[i] = a * cs[i] - b * sn[i];
    out[i + pairs] = a * sn[i] + b * cs[i];
  }
}

void Angles(const Geometry& g, double pos, float* cs, float* sn) {
  for (int i = 0; i < g.pairs; ++i) {
    const double a = pos * g.inv_freq[i];
    cs[i] = static_cast<float>(std::cos(a));
    sn[i] = static_cast<float>(std::sin(a));
  }
}

void RotateAt(const Geometry& g, double pos, const float* in, float* out) {
  std::vector<float> cs(g.pairs), sn(g.pairs);
  Angles(g, pos, cs.data(), sn.data());
  RotateRow(in, cs.data(), sn.data(), g.pairs, out);
}

float Norm(const float* v, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += static_cast<double>(v[i]) * v[i];
  return static_cast<float>(std::sqrt(s));
}

// Eight partial sums so the compiler vectorises without -ffast-math.
float Dot(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

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

inline double Logit(double p) { return std::log(p / (1.0 - p)); }

double LogSumExp(const float* a, const float* b, int64_t from, int64_t to, double amp) {
  const float famp = static_cast<float>(amp);
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = from; t < to; ++t) mx = std::max(mx, a[t] + famp * b[t]);
  double s = 0;
  for (int64_t t = from; t < to; ++t)
    s += std::exp(a[t] + famp * b[t] - mx);  // float exp: fast enough, exact enough
  return mx + std::log(s);
}

// The amplitude A >= 0 of the query's mean part such that the first `sinks`
// tokens take `share` of the softmax of a + A b (logits of the rest of the
// query, and of its unit mean part). Sink b's are large and positive, so the
// sinks' log-mass grows with A; bisection on it, re-centred on the ordinary
// tokens' log-mass a few times.
float CalibrateSinkAmplitude(const float* a, const float* b, int64_t n, int sinks, double share,
                             double start, int rounds) {
  if (sinks <= 0 || sinks >= n) return 0.0f;
  double amp = start;
  for (int round = 0; round < rounds; ++round) {
    const double target = LogSumExp(a, b, sinks, n, amp) + Logit(share);
    double lo = 0, hi = 1;
    while (LogSumExp(a, b, 0, sinks, hi) < target && hi < 1e6) hi *= 2;
    for (int it = 0; it < 60; ++it) {
      const double mid = 0.5 * (lo + hi);
      (LogSumExp(a, b, 0, sinks, mid) < target ? lo : hi) = mid;
    }
    amp = 0.5 * (lo + hi);
  }
  return static_cast<float>(amp);
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
  if (c.threads < 0 || c.threads > 1024) return bad("threads", "must be in [0, 1024]");
  const double elems = static_cast<double>(c.layers) * c.kv_heads * c.tokens * c.head_dim;
  if (elems > static_cast<double>(int64_t{1} << 33)) {
    return bad("layers x kv_heads x tokens x head_dim",
               absl::StrCat("is ", elems, " elements per array; the limit is 2^33"));
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<std::string> SyntheticPresetNames() {
  return {"llama3-8b-like", "mistral-7b-like", "small"};
}

absl::StatusOr<SyntheticConfig> SyntheticPreset(std::string_view name) {
  SyntheticConfig c;
  if (name == "llama3-8b-like") {
    c.layers = 32;
    c.kv_heads = 8;
    c.q_heads = 32;
    c.head_dim = 128;
    c.rope_theta = 500000.0;
    return c;
  }
  if (name == "mistral-7b-like") {
    c.layers = 32;
    c.kv_heads = 8;
    c.q_heads = 32;
    c.head_dim = 128;
    c.rope_theta = 1000000.0;
    c.rank = 40;
    c.outlier_channels = 3;
    c.outlier_scale = 5.0f;
    c.topics = 96;
    c.peaked_fraction = 0.4f;
    return c;
  }
  if (name == "small") {
    c.layers = 2;
    c.kv_heads = 2;
    c.q_heads = 4;
    c.head_dim = 64;
    c.tokens = 2048;
    c.steps = 8;
    c.rope_theta = 500000.0;
    c.rank = 16;
    c.outlier_channels = 2;
    c.sink_tokens = 4;
    c.mean_segment = 64;
    c.topics = 16;
    c.needles = 4;
    return c;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown synthetic preset '", std::string(name),
                   "'; known presets: ", absl::StrJoin(SyntheticPresetNames(), ", ")));
}

absl::StatusOr<KvDump> GenerateSynthetic(const SyntheticConfig& config) {
  return GenerateSynthetic(config, nullptr);
}

absl::StatusOr<KvDump> GenerateSynthetic(const SyntheticConfig& config, SyntheticTruth* truth) {
  RETURN_IF_ERROR(Validate(config));
  const SyntheticConfig& c = config;
  const Geometry g = MakeGeometry(c);
  const int d = g.d, r = c.rank, group = c.q_heads / c.kv_heads;
  const int64_t T = c.tokens;
  const double rho_l = c.layer_similarity;
  const float lam = static_cast<float>(rho_l),
              lam_s = static_cast<float>(std::sqrt(1.0 - rho_l * rho_l));

  KvDump dump;
  dump.layers = c.layers;
  dump.kv_heads = c.kv_heads;
  dump.q_heads = c.q_heads;
  dump.tokens = T;
  dump.head_dim = d;
  dump.steps = c.steps;
  dump.rope_theta = c.rope_theta;
  dump.model = "synthetic";
  const size_t kv_elems = static_cast<size_t>(c.layers) * c.kv_heads * T * d;
  const bool want_pre = truth != nullptr && truth->want_pre_rope_keys;
  try {
    dump.keys.resize(kv_elems);
    dump.values.resize(kv_elems);
    dump.queries.resize(static_cast<size_t>(c.steps) * c.layers * c.q_heads * d);
    if (truth != nullptr) {
      truth->pre_rope_keys.clear();
      if (want_pre) truth->pre_rope_keys.resize(kv_elems);
      truth->token_topic.assign(T, -1);
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
      for (int h = 0; h < c.kv_heads; ++h) {
        Rng rng(c.seed, kTokens, h, b);
        int64_t seg = -1;
        for (int64_t t = t0; t < t1; ++t) {
          const float* ct = &cs[(t - t0) * g.pairs];
          const float* st = &sn[(t - t0) * g.pairs];
          if (t < c.sink_tokens) {
            for (int l = 0; l < c.layers; ++l) {
              const HeadModel& m = model(l, h);
              const size_t off = ((static_cast<size_t>(l) * c.kv_heads + h) * T + t) * d;
              const float norm =
                  kSinkNormFrac * m.typical_key_norm * (1.0f - 0.1f * static_cast<float>(t % 4));
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
            const size_t off = ((static_cast<size_t>(l) * c.kv_heads + h) * T + t) * d;
            for (int i = 0; i < d; ++i) row[i] = m.key_mean[i] + kIsoNoise * rng.FastNormal();
            for (int k = 0; k < r; ++k) {
              const float* col = &m.basis[static_cast<size_t>(k) * d];
              const float zk = z[k];
              for (int i = 0; i < d; ++i) row[i] += zk * col[i];
            }
            for (size_t o = 0; o < g.outlier_dims.size(); ++o) {
              row[g.outlier_dims[o]] += m.outlier_mean[o] * (1.0f + 0.25f * rng.FastNormal());
            }
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
    explicit QueryState(Rng r) : rng(r) {}
  };
  auto query_job = [&](int l, int h, std::vector<float>& logit_a, std::vector<float>& logit_b) {
    const HeadModel& m = model(l, h);
    std::vector<QueryState> qs;
    for (int j = 0; j < group; ++j) {
      const int qh = h * group + j;
      qs.emplace_back(Rng(c.seed, kQueries, l, qh));
      QueryState& q = qs.back();
      Rng& rng = q.rng;
      q.is_peaked = peaked[static_cast<size_t>(l) * c.q_heads + qh] != 0;
      // Mean part: the head's sink direction, slightly perturbed per query head.
      q.mean_dir.assign(d, 0.0f);
      for (int dim : g.sink_dims)
        q.mean_dir[dim] = m.sink_dir[dim] * (1.0f + 0.25f * static_cast<float>(rng.Gauss()));
      const float mn = Norm(q.mean_dir.data(), d);
      for (auto& x : q.mean_dir) x /= mn;
      q.base_share = kSinkShareLo + (kSinkShareHi - kSinkShareLo) * rng.Uniform();
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
    const float* keys = &dump.keys[(static_cast<size_t>(l) * c.kv_heads + h) * T * d];
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
          if (rng.Uniform() < kFocusSwitch) q.cur ^= 1;
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
        const float sem_n = Norm(sem.data(), d);
        const float beta = q.is_peaked ? kPeakedBeta : kFlatBeta;
        for (int i = 0; i < d; ++i) {
          spec[i] = (sem_n > 0 ? beta * sem[i] / sem_n : 0.0f) +
                    kQueryIso * static_cast<float>(rng.Gauss());
        }
        for (int k = 0; k < kQueryNoiseRank; ++k) {
          const float* col = &q.own[static_cast<size_t>(k) * d];
          for (int i = 0; i < d; ++i) spec[i] += q.eta[k] * col[i];
        }
        for (int i = 0; i < d; ++i) rest[i] = q.shift[i] + spec[i];
        RotateAt(g, pos, rest.data(), &rest_rot[static_cast<size_t>(j) * d]);
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
        }
      }
      for (int j = 0; j < group; ++j) {
        QueryState& q = qs[j];
        const double share =
            1.0 / (1.0 + std::exp(-(Logit(q.base_share) + kShareJitter * q.share_noise)));
        q.sink_amp = CalibrateSinkAmplitude(&logit_a[static_cast<size_t>(j) * T],
                                            &logit_b[static_cast<size_t>(j) * T], T, c.sink_tokens,
                                            share, q.sink_amp, s == 0 ? 3 : 2);
        const int qh = h * group + j;
        const size_t off = ((static_cast<size_t>(s) * c.layers + l) * c.q_heads + qh) * d;
        for (int i = 0; i < d; ++i) {
          dump.queries[off + i] = rest_rot[static_cast<size_t>(j) * d + i] +
                                  q.sink_amp * md_rot[static_cast<size_t>(j) * d + i];
        }
        std::memcpy(&spec_q[off], &specs[static_cast<size_t>(j) * d], d * sizeof(float));
      }
    }
  };
  {
    const int64_t jobs = static_cast<int64_t>(c.layers) * c.kv_heads;
    std::atomic<int64_t> next_job{0};
    auto qworker = [&]() {
      std::vector<float> logit_a(static_cast<size_t>(group) * T),
          logit_b(static_cast<size_t>(group) * T);
      for (;;) {
        const int64_t j = next_job.fetch_add(1);
        if (j >= jobs) break;
        query_job(static_cast<int>(j / c.kv_heads), static_cast<int>(j % c.kv_heads), logit_a,
                  logit_b);
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
      for (int h = 0; h < c.kv_heads; ++h) {
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
          nd.step = static_cast<int>(rng.Below(c.steps));
          nd.token = tok;
          const size_t qoff =
              ((static_cast<size_t>(nd.step) * c.layers + l) * c.q_heads + nd.q_head) * d;
          const float* q = &dump.queries[qoff];
          // The best ordinary logit of this query over a sample of keys.
          const float* keys = &dump.keys[((static_cast<size_t>(l) * c.kv_heads + h) * T) * d];
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
          float* k = &dump.keys[((static_cast<size_t>(l) * c.kv_heads + h) * T + tok) * d];
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
  }
  return dump;
}

absl::StatusOr<AttentionProfile> ProfileAttention(const KvDump& dump, int step, int layer,
                                                  int q_head, int sink_tokens, int top_k) {
  if (step < 0 || step >= dump.steps || layer < 0 || layer >= dump.layers || q_head < 0 ||
      q_head >= dump.q_heads || dump.kv_heads <= 0 || dump.q_heads % dump.kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ProfileAttention: (step ", step, ", layer ", layer, ", q_head ", q_head,
                     ") out of range for a dump of ", dump.steps, " steps, ", dump.layers,
                     " layers, ", dump.q_heads, " query heads"));
  }
  if (top_k < 1 || sink_tokens < 0) {
    return absl::InvalidArgumentError("ProfileAttention: top_k must be >= 1 and sink_tokens >= 0");
  }
  const int d = dump.head_dim;
  const size_t need_kv = static_cast<size_t>(dump.layers) * dump.kv_heads * dump.tokens * d;
  const size_t need_q = static_cast<size_t>(dump.steps) * dump.layers * dump.q_heads * d;
  if (dump.keys.size() != need_kv || dump.queries.size() != need_q) {
    return absl::InvalidArgumentError("ProfileAttention: dump arrays do not match its shape");
  }
  const int kv_head = q_head / dump.group_size();
  const float* q = dump.queries.data() +
                   ((static_cast<size_t>(step) * dump.layers + layer) * dump.q_heads + q_head) * d;
  const float* keys = dump.key(layer, kv_head);
  const int64_t n = dump.tokens;
  std::vector<double> logits(n);
  const double inv = 1.0 / std::sqrt(static_cast<double>(d));
  double mx = -1e300, sum = 0, sq = 0;
  for (int64_t t = 0; t < n; ++t) {
    logits[t] = Dot(q, keys + t * d, d) * inv;
    mx = std::max(mx, logits[t]);
    sum += logits[t];
    sq += logits[t] * logits[t];
  }
  AttentionProfile p;
  p.max_logit = mx;
  const double mean = sum / n;
  p.logit_std = std::sqrt(std::max(0.0, sq / n - mean * mean));
  double z = 0;
  for (int64_t t = 0; t < n; ++t) z += std::exp(logits[t] - mx);
  std::vector<double> probs(n);
  double ent = 0;
  for (int64_t t = 0; t < n; ++t) {
    probs[t] = std::exp(logits[t] - mx) / z;
    if (probs[t] > 0) ent -= probs[t] * std::log(probs[t]);
    if (t < sink_tokens) p.sink_mass += probs[t];
  }
  p.entropy = ent;
  const int64_t k = std::min<int64_t>(top_k, n);
  std::nth_element(probs.begin(), probs.begin() + (k - 1), probs.end(), std::greater<double>());
  for (int64_t i = 0; i < k; ++i) p.topk_mass += probs[i];
  return p;
}

}  // namespace icecache
