// The KV dump: interchange format between real models and IceCache
// (docs/architecture.md). A directory with
//   keys.npy     [layers, kv_heads, tokens, head_dim]
//   values.npy   [layers, kv_heads, tokens, head_dim]
//   queries.npy  [steps, layers, q_heads, head_dim]
// dtype float16 or float32, C order, plus optional meta.json.
// In memory everything is fp32.
#ifndef ICECACHE_COMMON_KV_DUMP_H_
#define ICECACHE_COMMON_KV_DUMP_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/dtype.h"

namespace icecache {

struct KvDump {
  int layers = 0;
  int kv_heads = 0;
  int q_heads = 0;  // multiple of kv_heads; group size G = q_heads / kv_heads
  int64_t tokens = 0;
  int head_dim = 0;
  int steps = 0;
  double rope_theta = 0;  // 0 when unknown
  std::string model;      // free text from meta.json

  std::vector<float> keys;     // [layers, kv_heads, tokens, head_dim]
  std::vector<float> values;   // [layers, kv_heads, tokens, head_dim]
  std::vector<float> queries;  // [steps, layers, q_heads, head_dim]

  int group_size() const { return kv_heads > 0 ? q_heads / kv_heads : 0; }
  // Start of the keys/values of (layer, kv_head): tokens x head_dim rows.
  const float* key(int layer, int kv_head) const {
    return keys.data() + ((static_cast<size_t>(layer) * kv_heads + kv_head) * tokens) * head_dim;
  }
  const float* value(int layer, int kv_head) const {
    return values.data() + ((static_cast<size_t>(layer) * kv_heads + kv_head) * tokens) * head_dim;
  }
  // The G queries (G x head_dim rows) of `kv_head` at decode `step`.
  const float* query(int step, int layer, int kv_head) const {
    return queries.data() + ((static_cast<size_t>(step) * layers + layer) * q_heads +
                             static_cast<size_t>(kv_head) * group_size()) *
                                head_dim;
  }
};

// Writes `dump` to `dir` (created if missing) in `dtype` (kF16 or kF32).
absl::Status WriteKvDump(const KvDump& dump, const std::string& dir, DType dtype);
// Reads a dump; `max_tokens` > 0 truncates the context. InvalidArgument (with
// the file name and what is wrong) for missing files, bad headers, truncated
// data or shapes that disagree between files; NotFound for a missing dir.
absl::StatusOr<KvDump> ReadKvDump(const std::string& dir, int64_t max_tokens = -1);

}  // namespace icecache

#endif  // ICECACHE_COMMON_KV_DUMP_H_
