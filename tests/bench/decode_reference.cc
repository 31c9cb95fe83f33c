#include "tests/bench/decode_reference.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

#include "tests/bench/decode_attention.h"

namespace icecache::bench {

namespace {

// Full attention of every (quality layer, head) of step `s`, the cells
// spread over `threads` threads; returns the sum of the cells' times (what
// one thread would take).
double ReferenceStep(const DecodeModel& m, int s, int budget, int sinks, int threads,
                     DecodeReference* r) {
  const int64_t n = m.tokens_at(s);
  const std::vector<int>& layers = m.quality_layers();
  const int cells = static_cast<int>(layers.size()) * r->kv_heads;
  std::atomic<int> next{0};
  std::vector<double> ms(threads, 0.0);
  auto worker = [&](int w) {
    AttentionScratch scratch;
    for (int c = next++; c < cells; c = next++) {
      const int l = layers[c / r->kv_heads], h = c % r->kv_heads;
      const size_t i = r->Index(s, l, h);
      const float* q = m.queries(s, l).data() + static_cast<size_t>(h) * r->group * r->head_dim;
      // The oracle's top-k rides along the softmax: a little extra work
      // inside the timed region (nth_element over n, under 5% of it).
      const auto t0 = std::chrono::steady_clock::now();
      FullAttention(m.keys(l, h), m.values(l, h), n, r->head_dim, q, r->group,
                    r->out.data() + i * r->group * r->head_dim, r->lse.data() + i * r->group,
                    budget, sinks, &r->oracle[i], &scratch);
      ms[w] +=
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    }
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < threads; ++w) pool.emplace_back(worker, w);
  worker(0);
  for (std::thread& t : pool) t.join();
  double total = 0;
  for (double x : ms) total += x;
  return total;
}

}  // namespace

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
  const int threads =
      static_cast<int>(std::max(1u, std::min(8u, std::thread::hardware_concurrency())));
  // Measured on the quality layers, scaled to every layer (each layer's
  // full attention costs the same: same tokens, heads and dimension).
  const double scale = static_cast<double>(m.layers()) / m.quality_layers().size();
  for (int s = 0; s < m.steps(); ++s) {
    r.step_ms.push_back(scale * ReferenceStep(m, s, budget, sinks, threads, &r));
    if (progress) progress(s + 1);
  }
  return r;
}

}  // namespace icecache::bench
