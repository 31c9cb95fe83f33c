// The indices of the largest scores among many: mdci's candidate pages from
// the product-quantised scan's estimates (a few hundred of 2048-8192 pages
// per select). A threshold from an even sample of 512 scores, set below the
// boundary the sample predicts; one branch-free pass collects the scores
// that clear it (about 1.75x as many as wanted), and only those are ordered.
// It replaces an nth_element over every (score, page) pair: in a profile of
// a select at 131072 tokens that step fell from 0.29 to 0.09 of the scan's
// samples (docs/bench/topk47.md).
#ifndef ICECACHE_SERVER_INDEX_TOP_SCORES_H_
#define ICECACHE_SERVER_INDEX_TOP_SCORES_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace icecache {

// Buffers TopPositiveScores reuses between calls (one per thread).
struct TopScoresScratch {
  std::vector<float> sample;   // the sampled scores
  std::vector<uint32_t> kept;  // indices of the scores that clear the threshold
};

// Appends to `out` the indices i < n of the min(want, positives) largest
// scores[i] > 0 (zero, negative and NaN scores are never taken), in no
// particular order. Equal scores at the boundary go to the lower index, so
// the set is a function of the scores alone.
void TopPositiveScores(const float* scores, uint32_t n, size_t want, TopScoresScratch* scratch,
                       std::vector<uint32_t>* out);

}  // namespace icecache

#endif  // ICECACHE_SERVER_INDEX_TOP_SCORES_H_
