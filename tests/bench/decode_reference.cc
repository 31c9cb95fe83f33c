#include "tests/bench/decode_reference.h"

#include <chrono>

#include "tests/bench/decode_attention.h"

namespace icecache::bench {

DecodeReference ComputeReference(const DecodeModel& m, int budget, int sinks,
                                 const std::function<void(int)>& progress) {
  DecodeReference r;
  r.layers = m.layers();
  r.kv_heads = m.kv_heads();
  r.group = m.group();
  r.head_dim = m.head_dim();
  const size_t cells = static_cast<size_t>(m.steps()) * r.layers * r.kv_heads;
  r.lse.resize(cells * r.group);
  r.out.resize(cells * r.group * r.head_dim);
  r.oracle.resize(cells);
  AttentionScratch scratch;
  for (int s = 0; s < m.steps(); ++s) {
    const int64_t n = m.tokens_at(s);
    double ms = 0;
    for (int l = 0; l < r.layers; ++l) {
      const float* q = m.queries(s, l).data();
      for (int h = 0; h < r.kv_heads; ++h) {
        const size_t i = r.Index(s, l, h);
        // The oracle's top-k rides along the softmax; it is a little extra
        // work inside the timed region (nth_element over n), as a GPU
        // would not do it: the time is full attention plus under 5%.
        const auto t0 = std::chrono::steady_clock::now();
        FullAttention(m.keys(l, h), m.values(l, h), n, r.head_dim,
                      q + static_cast<size_t>(h) * r.group * r.head_dim, r.group,
                      r.out.data() + i * r.group * r.head_dim, r.lse.data() + i * r.group, budget,
                      sinks, &r.oracle[i], &scratch);
        ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                  .count();
      }
    }
    r.step_ms.push_back(ms);
    if (progress) progress(s + 1);
  }
  return r;
}

}  // namespace icecache::bench
