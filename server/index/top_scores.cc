#include "server/index/top_scores.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

namespace icecache {
namespace {

// Below this many scores, or wanting this large a share of them, a sample
// says little: every positive score is a candidate.
constexpr uint32_t kMinSampled = 1024;
constexpr uint32_t kSample = 512;

// Appends every i < n with scores[i] >= t (t > 0, so never a zero, negative
// or NaN score) to `buf`, returning how many. Branch-free: each index is
// written and the count moves only for the ones kept.
size_t CollectAtLeast(const float* scores, uint32_t n, float t, std::vector<uint32_t>* buf) {
  buf->resize(static_cast<size_t>(n) + 1);
  uint32_t* __restrict b = buf->data();
  size_t k = 0;
  for (uint32_t i = 0; i < n; ++i) {
    b[k] = i;
    k += scores[i] >= t ? 1 : 0;
  }
  return k;
}

}  // namespace

void TopPositiveScores(const float* scores, uint32_t n, size_t want, TopScoresScratch* scratch,
                       std::vector<uint32_t>* out) {
  if (want == 0 || n == 0) return;
  constexpr float kTiny = std::numeric_limits<float>::denorm_min();
  std::vector<uint32_t>& got = scratch->kept;
  size_t k = 0;
  bool found = false;
  if (n >= kMinSampled && want * 8 <= n) {
    // A threshold from an even sample of the scores, below the boundary the
    // sample predicts (1.5x its rank, plus 4), so that at least `want`
    // scores clear it; if too few do (the sample put half as many again as
    // expected above the boundary), a lower one, then every positive score.
    std::vector<float>& sample = scratch->sample;
    sample.resize(kSample);
    const uint32_t stride = n / kSample;
    for (uint32_t j = 0; j < kSample; ++j) sample[j] = scores[static_cast<size_t>(j) * stride];
    const double expect = static_cast<double>(want) * kSample / n;
    for (double r : {1.5 * expect + 4.0, 4.0 * expect + 16.0}) {
      const auto rank = static_cast<size_t>(std::min<double>(kSample - 1, r));
      std::nth_element(sample.begin(), sample.begin() + static_cast<std::ptrdiff_t>(rank),
                       sample.end(), std::greater<float>());
      const float t = sample[rank];
      if (!(t > 0.0f)) break;  // the sample runs out of positive scores here
      k = CollectAtLeast(scores, n, t, &got);
      if (k >= want) {
        found = true;
        break;
      }
    }
  }
  if (!found) k = CollectAtLeast(scores, n, kTiny, &got);  // every positive score
  if (k > want) {
    // Larger first; equal scores: the lower index first (the set is then a
    // function of the scores alone, whatever threshold collected them).
    auto better = [scores](uint32_t x, uint32_t y) {
      return scores[x] > scores[y] || (scores[x] == scores[y] && x < y);
    };
    std::nth_element(got.begin(), got.begin() + static_cast<std::ptrdiff_t>(want),
                     got.begin() + static_cast<std::ptrdiff_t>(k), better);
    k = want;
  }
  out->insert(out->end(), got.begin(), got.begin() + static_cast<std::ptrdiff_t>(k));
}

}  // namespace icecache
