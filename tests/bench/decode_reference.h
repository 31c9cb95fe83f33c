// Full attention of every decode step, quality layer and KV head of a
// DecodeModel (DecodeModel::quality_layers(): the layers whose KV it keeps):
// the reference every policy's quality is measured against, the exact-token
// oracle's positions, and the time of full attention itself (the "full"
// policy's TPOT on the CPU stand-in, measured on those layers and scaled to
// every layer). Entries of other layers stay empty. Internal to
// `icecache-bench decode`.
#ifndef ICECACHE_TESTS_BENCH_DECODE_REFERENCE_H_
#define ICECACHE_TESTS_BENCH_DECODE_REFERENCE_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "tests/bench/decode_model.h"

namespace icecache::bench {

struct DecodeReference {
  int layers = 0, kv_heads = 0, group = 0, head_dim = 0;
  std::vector<float> lse;                    // [step][layer][head][group]
  std::vector<float> out;                    // [step][layer][head][group][head_dim]
  std::vector<std::vector<int32_t>> oracle;  // [step][layer][head]: exact-token positions
  // Full attention of all layers per step: the sum of the (quality layer,
  // head) cells' times, i.e. one thread's time (the cells run on every
  // core), x layers / quality layers.
  std::vector<double> step_ms;

  size_t Index(int step, int layer, int head) const {
    return (static_cast<size_t>(step) * layers + layer) * kv_heads + head;
  }
  const float* Lse(int step, int layer, int head) const {
    return lse.data() + Index(step, layer, head) * group;
  }
  const float* Out(int step, int layer, int head) const {
    return out.data() + Index(step, layer, head) * group * head_dim;
  }
};

// Step s covers the model's tokens_at(s) tokens. The oracle takes `budget`
// tokens with `sinks` forced in. `progress(steps_done)` after each step.
DecodeReference ComputeReference(const DecodeModel& m, int budget, int sinks,
                                 const std::function<void(int)>& progress);

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_DECODE_REFERENCE_H_
