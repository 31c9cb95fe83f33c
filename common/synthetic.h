// The realistic synthetic KV generator (DESIGN.md section 10). Deterministic
// for a seed. Reproduces what is known about real attention: RoPE, low-rank
// keys with outlier channels, attention sinks, topic segments, needles, a
// query/key distribution shift, peaked and flat heads, locality across decode
// steps and similarity across adjacent layers.
#ifndef ICECACHE_COMMON_SYNTHETIC_H_
#define ICECACHE_COMMON_SYNTHETIC_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/kv_dump.h"

namespace icecache {

struct SyntheticConfig {
  // Shape.
  int layers = 1;
  int kv_heads = 8;
  int q_heads = 32;
  int64_t tokens = 4096;
  int head_dim = 128;
  int steps = 16;
  // Content knobs (see synthetic.cc for the model).
  double rope_theta = 500000.0;
  int rank = 32;                 // effective rank of pre-RoPE keys
  int outlier_channels = 4;      // fixed channels with large magnitude
  float outlier_scale = 6.0f;
  int sink_tokens = 4;           // low-norm keys aligned with typical queries
  int64_t mean_segment = 512;    // mean topic segment length (tokens)
  int topics = 64;               // distinct topic centres per head
  int needles = 8;               // keys aligned with particular queries
  float query_shift = 1.0f;      // magnitude of the query mean shift
  float peaked_fraction = 0.5f;  // fraction of heads that are peaked
  float step_locality = 0.9f;    // correlation of a head's query across steps
  float layer_similarity = 0.7f; // correlation of adjacent layers' keys
  uint64_t seed = 42;
};

// Presets: "llama3-8b-like" (128-dim, GQA 4:1, theta 5e5), "mistral-7b-like"
// (128-dim, GQA 4:1, theta 1e6), "small" (64-dim, GQA 2:1; for fast tests).
// InvalidArgument for an unknown name (the message lists the known ones).
absl::StatusOr<SyntheticConfig> SyntheticPreset(std::string_view name);
std::vector<std::string> SyntheticPresetNames();

// InvalidArgument for a config out of range (names the field).
absl::StatusOr<KvDump> GenerateSynthetic(const SyntheticConfig& config);

}  // namespace icecache

#endif  // ICECACHE_COMMON_SYNTHETIC_H_
