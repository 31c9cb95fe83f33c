// Internals of the synthetic generator shared by its files (synthetic.cc,
// synthetic_roles.cc): the keyed random streams, the RoPE geometry and small
// vector helpers. Not part of the public API.
#ifndef ICECACHE_COMMON_SYNTHETIC_INTERNAL_H_
#define ICECACHE_COMMON_SYNTHETIC_INTERNAL_H_

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/kv_dump.h"
#include "common/synthetic.h"

namespace icecache::synthetic_internal {

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
  kFamily = 8,  // the families' own draws: the base model's streams stay unchanged
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

struct Geometry {
  int d = 0;      // head_dim
  int pairs = 0;  // d / 2
  int sink_pairs = 0;
  std::vector<double> inv_freq;  // [pairs]
  std::vector<int> sink_dims;    // dims of the lowest-frequency pairs
  std::vector<int> outlier_dims;
  std::vector<float> key_profile;    // per-dim weight of the semantic basis
  std::vector<float> query_profile;  // per-dim weight of the query's own basis
  std::vector<int> local_pairs;      // pairs holding the positional code (local heads)
};

// The RoPE geometry, the sink and outlier dims and the key/query profiles.
Geometry MakeGeometry(const SyntheticConfig& c);

// Rotates one row in place by RoPE at the angles given by (cos, sin) per pair.
inline void RotateRow(const float* in, const float* cs, const float* sn, int pairs, float* out) {
  for (int i = 0; i < pairs; ++i) {
    const float a = in[i], b = in[i + pairs];
    out[i] = a * cs[i] - b * sn[i];
    out[i + pairs] = a * sn[i] + b * cs[i];
  }
}

inline void Angles(const Geometry& g, double pos, float* cs, float* sn) {
  for (int i = 0; i < g.pairs; ++i) {
    const double a = pos * g.inv_freq[i];
    cs[i] = static_cast<float>(std::cos(a));
    sn[i] = static_cast<float>(std::sin(a));
  }
}

inline void RotateAt(const Geometry& g, double pos, const float* in, float* out) {
  std::vector<float> cs(g.pairs), sn(g.pairs);
  Angles(g, pos, cs.data(), sn.data());
  RotateRow(in, cs.data(), sn.data(), g.pairs, out);
}

inline float Norm(const float* v, int n) {
  double s = 0;
  for (int i = 0; i < n; ++i) s += static_cast<double>(v[i]) * v[i];
  return static_cast<float>(std::sqrt(s));
}

// Eight partial sums so the compiler vectorises without -ffast-math.
inline float Dot(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline double Logit(double p) { return std::log(p / (1.0 - p)); }

// log sum_{t in [from, to)} exp(a_t + amp b_t); -inf for an empty range.
double LogSumExp(const float* a, const float* b, int64_t from, int64_t to, double amp);

// The amplitude A >= 0 such that tokens [lo, hi) take `share` of softmax(a +
// A b) over n tokens (b large and positive on [lo, hi)); bisection, re-centred
// on the other tokens' log-mass `rounds` times, starting from `start`.
float CalibrateAmplitude(const float* a, const float* b, int64_t n, int64_t lo, int64_t hi,
                         double share, double start, int rounds);

// The same, solved directly (bisection on the share itself) for a b that is
// also large outside [lo, hi), so that the others' log-mass moves with A too.
// The bracket starts at 2 x `hint`; the result is at most `max_amp` (which
// it is when the share cannot be reached below it).
float CalibrateShare(const float* a, const float* b, int64_t n, int64_t lo, int64_t hi,
                     double share, double hint, double max_amp);

// ---- The robustness families' properties (synthetic_roles.cc) --------------

// Which query heads are retrieval heads, which are local, and each query
// head's temperature factor; [layers * q_heads] each.
struct HeadRoles {
  std::vector<uint8_t> retrieval;
  std::vector<uint8_t> local;
  std::vector<float> temperature;
};
HeadRoles AssignRoles(const SyntheticConfig& c);

// The pairs whose RoPE wavelength is about the local window, clear of the
// sink and outlier pairs (empty without local heads).
std::vector<int> LocalPairs(const SyntheticConfig& c, const Geometry& g);
// KV head h's positional code: a constant pre-RoPE vector in the local pairs
// added to every ordinary key ([d]; empty without local heads).
std::vector<float> PositionalCode(const SyntheticConfig& c, const Geometry& g, int h);

// The rare tokens retrieval heads look for: per KV head, positions and unit
// pre-RoPE directions (empty without retrieval heads).
struct RareTokens {
  int per_head = 0;
  std::vector<int64_t> positions;  // [kv_heads][per_head], ascending per head
  std::vector<float> dirs;         // [kv_heads][per_head][d]
  const float* dir(int h, int i) const {
    return dirs.data() + (static_cast<size_t>(h) * per_head + i) * (dirs.size() / positions.size());
  }
};
RareTokens MakeRareTokens(const SyntheticConfig& c, const Geometry& g);
// Replaces the keys of the rare tokens (every layer) by half the ordinary key
// plus `key_scale[l * kv_heads + h]` x the direction rotated to the query
// position `tokens`; keeps the pre-RoPE truth in step when it is kept.
void PlantRareKeys(const SyntheticConfig& c, const Geometry& g, const RareTokens& rare,
                   const std::vector<float>& key_scale, KvDump* dump, SyntheticTruth* truth);

}  // namespace icecache::synthetic_internal

#endif  // ICECACHE_COMMON_SYNTHETIC_INTERNAL_H_
