// The realistic synthetic KV generator (docs/architecture.md §11). Deterministic
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
  int rank = 32;             // effective rank of pre-RoPE keys
  int outlier_channels = 4;  // fixed channels with large magnitude
  float outlier_scale = 6.0f;
  int sink_tokens = 4;         // low-norm keys aligned with typical queries
  int64_t mean_segment = 512;  // mean topic segment length (tokens)
  int topics = 64;             // distinct topic centres per head
  int needles = 8;  // per (layer, KV head), <= 1024: keys aligned with one query at one step
  float query_shift = 1.0f;       // magnitude of the query mean shift
  float peaked_fraction = 0.5f;   // fraction of heads that are peaked
  float step_locality = 0.9f;     // correlation of a head's query across steps
  float layer_similarity = 0.7f;  // correlation of adjacent layers' keys
  // --- Properties the robustness families vary (SyntheticFamilyNames()).
  // The defaults reproduce the base model exactly. ---
  double sink_share_lo = 0.15;   // base sink share of a query head: uniform in
  double sink_share_hi = 0.45;   // [lo, hi], wandering per step around it
  float sink_norm_frac = 0.35f;  // sink key norm / typical key norm
  double focus_switch = 0.03;    // chance per step that a peaked head changes focus topic
  // Per query head, the non-sink part of the query is scaled by a factor
  // log-uniform in [1/s, s] (s >= 1): a spread of softmax temperatures.
  float temperature_spread = 1.0f;
  // Fraction of each GQA group's query heads (at most G-1 of them, rounded)
  // that retrieve rare tokens: each step such a head looks for one of
  // `rare_tokens` scattered keys of its KV head (staying on it for
  // `retrieval_dwell` steps on average) while the rest of its group follows
  // topics.
  float retrieval_fraction = 0.0f;
  int rare_tokens = 16;
  int retrieval_dwell = 8;
  // Fraction of each group's other query heads that are local (positional):
  // keys carry a RoPE-rotated positional code in mid-frequency pairs, and a
  // local head reads it so that the last `local_window` positions take
  // `local_share` of its non-sink attention.
  float local_fraction = 0.0f;
  int64_t local_window = 256;
  float local_share = 0.5f;
  // > 0: every ordinary token's key is scaled by exp(sigma N(0,1)) (the same
  // token in every layer): heavy-tailed key norms.
  float key_norm_sigma = 0.0f;
  uint64_t seed = 42;
  // A slice of the KV heads: generate only heads [kv_head_begin,
  // kv_head_begin + kv_head_count) (count 0 = every head from begin on). Each
  // head's keys, values and query heads are exactly those of the whole dump
  // (every random stream is keyed by head), so a caller can build a large
  // dump one head at a time: the dump then has kv_heads = the slice's heads
  // and q_heads = those heads' query heads, in order. Not with a truth.
  int kv_head_begin = 0;
  int kv_head_count = 0;
  // Worker threads; 0 = min(hardware concurrency, 8). The output does not
  // depend on it (every random stream is keyed by what it generates).
  int threads = 0;
};

// A needle: the key at `token` of (layer, kv_head) was built to align with
// the query of `q_head` (global query-head index) at decode `step`.
struct SyntheticNeedle {
  int layer = 0;
  int kv_head = 0;
  int q_head = 0;
  int step = 0;
  int64_t token = 0;
};

// Ground truth of a generated dump, for tests, benchmarks and diagnostics.
struct SyntheticTruth {
  // Set to true before the call to also get the keys before RoPE (same
  // layout and size as KvDump::keys; doubles the memory).
  bool want_pre_rope_keys = false;
  std::vector<float> pre_rope_keys;
  std::vector<int32_t> token_topic;     // [tokens]; -1 for sink tokens
  std::vector<int64_t> segment_starts;  // first token of each topic segment
  std::vector<int32_t> segment_topics;  // topic of each segment
  std::vector<uint8_t> peaked;          // [layers * q_heads]; 1 = peaked head
  std::vector<int> outlier_dims;        // the fixed outlier channels
  std::vector<int> sink_dims;           // the low-frequency dims sinks live in
  std::vector<SyntheticNeedle> needles;
  // [layers * q_heads]: 1 = retrieval head, 1 = local head; the temperature
  // factor of each query head.
  std::vector<uint8_t> retrieval;
  std::vector<uint8_t> local;
  std::vector<float> temperature;
  // [layers * kv_heads * rare_tokens]: positions of the rare tokens (empty
  // without retrieval heads).
  std::vector<int64_t> rare_tokens;
  // [steps * layers * q_heads]: the rare token a retrieval head looks for at
  // that step; -1 for other heads.
  std::vector<int64_t> retrieval_target;
};

// Presets: "llama3-8b-like" (128-dim, GQA 4:1, theta 5e5), "mistral-7b-like"
// (128-dim, GQA 4:1, theta 1e6), "small" (64-dim, GQA 2:1; for fast tests),
// and every family below on the llama3-8b-like shape.
// InvalidArgument for an unknown name (the message lists the known ones).
absl::StatusOr<SyntheticConfig> SyntheticPreset(std::string_view name);
std::vector<std::string> SyntheticPresetNames();

// The robustness families: each varies one property of real attention that a
// single generator under-represents (synthetic_presets.cc says which), and
// "mixture" has all of them at once. They were set from what is reported of
// real models, not tuned to any selector. "baseline" changes nothing.
std::vector<std::string> SyntheticFamilyNames();
// Applies family `name` to `config` (its shape, size and seed stay).
// InvalidArgument for an unknown name (the message lists the known ones).
absl::Status ApplySyntheticFamily(std::string_view name, SyntheticConfig* config);

// InvalidArgument for a config out of range (names the field).
absl::StatusOr<KvDump> GenerateSynthetic(const SyntheticConfig& config);
// Same, and fills `*truth` (not owned; may be null). ResourceExhausted when
// the arrays cannot be allocated.
absl::StatusOr<KvDump> GenerateSynthetic(const SyntheticConfig& config, SyntheticTruth* truth);
// Same, into `*out` (every field replaced): a dump passed again keeps the
// capacity of its arrays, so generating many dumps of one size in turn
// faults in no fresh memory after the first.
absl::Status GenerateSyntheticInto(const SyntheticConfig& config, SyntheticTruth* truth,
                                   KvDump* out);

// Exact attention of one query head over all keys of its KV head (softmax of
// q.k / sqrt(head_dim)), summarised. For checking that a dump looks like real
// attention. InvalidArgument for indices out of range or top_k < 1.
struct AttentionProfile {
  double sink_mass = 0;  // softmax mass of tokens [0, sink_tokens)
  double topk_mass = 0;  // mass of the top_k tokens
  double entropy = 0;    // nats
  double max_logit = 0;
  double logit_std = 0;
};
absl::StatusOr<AttentionProfile> ProfileAttention(const KvDump& dump, int step, int layer,
                                                  int q_head, int sink_tokens, int top_k);

}  // namespace icecache

#endif  // ICECACHE_COMMON_SYNTHETIC_H_
