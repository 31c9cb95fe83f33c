// The properties the robustness families vary (synthetic.h): query-head roles
// (retrieval, local), temperatures, the positional code local heads read, the
// rare tokens retrieval heads look for, and the share calibration shared with
// the sinks. Every draw comes from the kFamily streams, so a config with the
// families' knobs at their defaults generates exactly the base model.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "common/synthetic_internal.h"

namespace icecache::synthetic_internal {
namespace {

// Sub-streams of kFamily.
enum FamilyStream : uint64_t {
  kRoles = 1,
  kTemperature = 2,
  kPositionalCode = 3,
  kRare = 4,
};

constexpr float kPosCodeRms = 2.0f;    // per-dim RMS of the positional code
constexpr float kRareKeyScale = 0.5f;  // rare direction's share of a typical key norm

double LogAddExp(double x, double y) {
  if (x == -std::numeric_limits<double>::infinity()) return y;
  if (y == -std::numeric_limits<double>::infinity()) return x;
  const double m = std::max(x, y);
  return m + std::log(std::exp(x - m) + std::exp(y - m));
}

int RetrievalPerGroup(const SyntheticConfig& c) {
  const int group = c.q_heads / c.kv_heads;
  return std::max(0,
                  std::min(group - 1, static_cast<int>(std::lround(c.retrieval_fraction * group))));
}

}  // namespace

double LogSumExp(const float* a, const float* b, int64_t from, int64_t to, double amp) {
  if (from >= to) return -std::numeric_limits<double>::infinity();
  const float famp = static_cast<float>(amp);
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t t = from; t < to; ++t) mx = std::max(mx, a[t] + famp * b[t]);
  double s = 0;
  for (int64_t t = from; t < to; ++t)
    s += std::exp(a[t] + famp * b[t] - mx);  // float exp: fast enough, exact enough
  return mx + std::log(s);
}

float CalibrateAmplitude(const float* a, const float* b, int64_t n, int64_t lo, int64_t hi,
                         double share, double start, int rounds) {
  if (hi <= lo || (lo <= 0 && hi >= n)) return 0.0f;
  double amp = start;
  for (int round = 0; round < rounds; ++round) {
    const double others = LogAddExp(LogSumExp(a, b, 0, lo, amp), LogSumExp(a, b, hi, n, amp));
    const double target = others + Logit(share);
    double low = 0, high = 1;
    while (LogSumExp(a, b, lo, hi, high) < target && high < 1e6) high *= 2;
    for (int it = 0; it < 60; ++it) {
      const double mid = 0.5 * (low + high);
      (LogSumExp(a, b, lo, hi, mid) < target ? low : high) = mid;
    }
    amp = 0.5 * (low + high);
  }
  return static_cast<float>(amp);
}

float CalibrateShare(const float* a, const float* b, int64_t n, int64_t lo, int64_t hi,
                     double share, double hint, double max_amp) {
  if (hi <= lo || (lo <= 0 && hi >= n) || !(max_amp > 0)) return 0.0f;
  const double goal = Logit(share);
  auto excess = [&](double amp) {
    return LogSumExp(a, b, lo, hi, amp) -
           LogAddExp(LogSumExp(a, b, 0, lo, amp), LogSumExp(a, b, hi, n, amp)) - goal;
  };
  if (excess(0) >= 0) return 0.0f;
  double low = 0, high = std::min(max_amp, std::max(1.0, 2 * hint));
  while (excess(high) < 0) {
    if (high >= max_amp) return static_cast<float>(max_amp);
    low = high;
    high = std::min(max_amp, 2 * high);
  }
  // 24 halvings: the share to well under 1% of the bracket.
  for (int it = 0; it < 24; ++it) {
    const double mid = 0.5 * (low + high);
    (excess(mid) < 0 ? low : high) = mid;
  }
  return static_cast<float>(0.5 * (low + high));
}

HeadRoles AssignRoles(const SyntheticConfig& c) {
  const int group = c.q_heads / c.kv_heads;
  const size_t n = static_cast<size_t>(c.layers) * c.q_heads;
  HeadRoles r;
  r.retrieval.assign(n, 0);
  r.local.assign(n, 0);
  r.temperature.assign(n, 1.0f);
  const int n_ret = RetrievalPerGroup(c);
  const int n_loc =
      std::max(0, std::min(group - n_ret, static_cast<int>(std::lround(c.local_fraction * group))));
  if (n_ret + n_loc > 0) {
    std::vector<int> perm(group);
    for (int l = 0; l < c.layers; ++l) {
      for (int h = 0; h < c.kv_heads; ++h) {
        Rng rng(c.seed, kFamily, l, h, kRoles);
        std::iota(perm.begin(), perm.end(), 0);
        for (int i = group - 1; i > 0; --i) std::swap(perm[i], perm[rng.Below(i + 1)]);
        const size_t base = static_cast<size_t>(l) * c.q_heads + static_cast<size_t>(h) * group;
        for (int i = 0; i < n_ret; ++i) r.retrieval[base + perm[i]] = 1;
        for (int i = n_ret; i < n_ret + n_loc; ++i) r.local[base + perm[i]] = 1;
      }
    }
  }
  if (c.temperature_spread > 1.0f) {
    const double span = std::log(static_cast<double>(c.temperature_spread));
    for (int l = 0; l < c.layers; ++l) {
      for (int qh = 0; qh < c.q_heads; ++qh) {
        Rng rng(c.seed, kFamily, l, qh, kTemperature);
        r.temperature[static_cast<size_t>(l) * c.q_heads + qh] =
            static_cast<float>(std::exp((2.0 * rng.Uniform() - 1.0) * span));
      }
    }
  }
  return r;
}

std::vector<int> LocalPairs(const SyntheticConfig& c, const Geometry& g) {
  std::vector<int> pairs;
  if (!(c.local_fraction > 0.0f)) return pairs;
  // Angles between 1/(4W) and 4/W radians per position: the code's dot
  // product over these pairs (equal weights) is large within a fraction of W
  // and averages out beyond; with this many incommensurate pairs it does not
  // realign far away.
  const int last = g.pairs - g.sink_pairs - c.outlier_channels;
  const double w = static_cast<double>(c.local_window);
  for (int i = 0; i < last; ++i) {
    if (g.inv_freq[i] >= 0.25 / w && g.inv_freq[i] <= 4.0 / w) pairs.push_back(i);
  }
  if (pairs.size() < 2) {
    // Too few pairs in the band: the ones nearest to it in log-frequency.
    std::vector<int> all(std::max(0, last));
    std::iota(all.begin(), all.end(), 0);
    auto dist = [&](int i) { return std::fabs(std::log(g.inv_freq[i] * w / 2.0)); };
    std::sort(all.begin(), all.end(), [&](int x, int y) { return dist(x) < dist(y); });
    all.resize(std::min<size_t>(all.size(), 2));
    pairs = all;
    std::sort(pairs.begin(), pairs.end());
  }
  return pairs;
}

std::vector<float> PositionalCode(const SyntheticConfig& c, const Geometry& g, int h) {
  std::vector<float> code;
  if (g.local_pairs.empty()) return code;
  code.assign(g.d, 0.0f);
  Rng rng(c.seed, kFamily, h, 0, kPositionalCode);
  for (int i : g.local_pairs) {
    const double phase = 2 * M_PI * rng.Uniform();
    code[i] = static_cast<float>(std::cos(phase));
    code[i + g.pairs] = static_cast<float>(std::sin(phase));
  }
  const float n = Norm(code.data(), g.d);
  const float target = kPosCodeRms * std::sqrt(2.0f * static_cast<float>(g.local_pairs.size()));
  for (auto& x : code) x *= n > 0 ? target / n : 0.0f;
  return code;
}

RareTokens MakeRareTokens(const SyntheticConfig& c, const Geometry& g) {
  RareTokens rare;
  if (RetrievalPerGroup(c) == 0) return rare;
  rare.per_head = c.rare_tokens;
  const int d = g.d;
  for (int h = 0; h < c.kv_heads; ++h) {
    Rng rng(c.seed, kFamily, h, 0, kRare);
    std::vector<int64_t> pos;
    while (static_cast<int>(pos.size()) < c.rare_tokens) {
      const int64_t t =
          c.sink_tokens +
          static_cast<int64_t>(rng.Below(static_cast<uint64_t>(c.tokens - c.sink_tokens)));
      if (std::find(pos.begin(), pos.end(), t) == pos.end()) pos.push_back(t);
    }
    std::sort(pos.begin(), pos.end());
    rare.positions.insert(rare.positions.end(), pos.begin(), pos.end());
    for (int i = 0; i < c.rare_tokens; ++i) {
      std::vector<float> dir(d);
      for (int k = 0; k < d; ++k) dir[k] = static_cast<float>(rng.Gauss()) * g.key_profile[k];
      const float n = Norm(dir.data(), d);
      for (auto& x : dir) x /= n;
      rare.dirs.insert(rare.dirs.end(), dir.begin(), dir.end());
    }
  }
  return rare;
}

void PlantRareKeys(const SyntheticConfig& c, const Geometry& g, const RareTokens& rare,
                   const std::vector<float>& key_scale, KvDump* dump, SyntheticTruth* truth) {
  if (rare.per_head == 0) return;
  const int d = g.d;
  const int64_t T = c.tokens;
  const bool want_pre = truth != nullptr && truth->want_pre_rope_keys;
  std::vector<float> rot(d);
  // The dump holds KV heads [hb, hb + hn) (SyntheticConfig::kv_head_begin).
  const int hb = c.kv_head_begin, hn = dump->kv_heads;
  for (int l = 0; l < c.layers; ++l) {
    for (int h = hb; h < hb + hn; ++h) {
      const float scale = kRareKeyScale * key_scale[static_cast<size_t>(l) * c.kv_heads + h];
      for (int i = 0; i < rare.per_head; ++i) {
        const int64_t tok = rare.positions[static_cast<size_t>(h) * rare.per_head + i];
        // Aligned after RoPE with the direction at the queries' positions, as
        // the needles are: the retrieval matches at any distance.
        RotateAt(g, static_cast<double>(T), rare.dir(h, i), rot.data());
        const size_t off = ((static_cast<size_t>(l) * hn + (h - hb)) * T + tok) * d;
        float* k = &dump->keys[off];
        for (int j = 0; j < d; ++j) k[j] = 0.5f * k[j] + scale * rot[j];
        if (want_pre) RotateAt(g, -static_cast<double>(tok), k, &truth->pre_rope_keys[off]);
        if (truth != nullptr) truth->rare_tokens.push_back(tok);
      }
    }
  }
}

}  // namespace icecache::synthetic_internal
