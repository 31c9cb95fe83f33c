// Presets, robustness families and the attention profile of the synthetic
// generator (synthetic.h).
#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "common/synthetic_internal.h"

namespace icecache {
namespace {

// One property of real attention per family. Strengths come from what is
// reported of real models (sources in each comment), not from any selector.
struct Family {
  const char* name;
  void (*apply)(SyntheticConfig*);
};

const Family kFamilies[] = {
    {"baseline", [](SyntheticConfig*) {}},
    // GQA: one query head of a group retrieves a rare token (copy/retrieval
    // heads, Wu et al. 2024 "Retrieval Head") while the others follow topics.
    {"gqa-divergent", [](SyntheticConfig* c) { c->retrieval_fraction = 0.25f; }},
    // Per-head temperatures spread over more than an order of magnitude of
    // logit scale (entropy varies widely across heads in real models).
    {"temperature-spread", [](SyntheticConfig* c) { c->temperature_spread = 4.0f; }},
    // Queries far from the keys' distribution (RetrievalAttention, Liu et al.
    // 2024: out-of-distribution queries defeat nearest-neighbour indexes); the
    // shift as large as a peaked head's semantic part.
    {"shifted-queries", [](SyntheticConfig* c) { c->query_shift = 10.0f; }},
    // Low-norm sinks that take most of the attention (StreamingLLM; many
    // heads put > 50% on the first token).
    {"heavy-sinks",
     [](SyntheticConfig* c) {
       c->sink_share_lo = 0.5;
       c->sink_share_hi = 0.9;
       c->sink_norm_frac = 0.15f;
     }},
    // Local / positional heads attending to the last few hundred positions.
    {"local-heads", [](SyntheticConfig* c) { c->local_fraction = 0.25f; }},
    // Many needles, each retrieved at one step only.
    {"rare-needles", [](SyntheticConfig* c) { c->needles = 64; }},
    // Topics interleaved at a fine grain instead of long contiguous runs
    // (dialogue, code, tables, multi-document contexts).
    {"scattered-topics",
     [](SyntheticConfig* c) {
       c->mean_segment = 8;
       c->topics = 256;
     }},
    // Heavy-tailed key norms (a few tokens with large keys).
    {"heavy-tailed-norms", [](SyntheticConfig* c) { c->key_norm_sigma = 0.5f; }},
    // Decode queries that drift and switch focus from step to step.
    {"drifting-queries",
     [](SyntheticConfig* c) {
       c->step_locality = 0.5f;
       c->focus_switch = 0.3;
     }},
    // All of the above at once, each a little weaker: what one real model has.
    {"mixture",
     [](SyntheticConfig* c) {
       c->retrieval_fraction = 0.25f;
       c->temperature_spread = 2.0f;
       c->query_shift = 2.0f;
       c->sink_share_lo = 0.2;
       c->sink_share_hi = 0.7;
       c->local_fraction = 0.25f;
       c->needles = 32;
       c->mean_segment = 64;
       c->topics = 128;
       c->key_norm_sigma = 0.3f;
       c->step_locality = 0.7f;
       c->focus_switch = 0.1;
     }},
};

}  // namespace

std::vector<std::string> SyntheticFamilyNames() {
  std::vector<std::string> names;
  for (const Family& f : kFamilies) names.push_back(f.name);
  return names;
}

absl::Status ApplySyntheticFamily(std::string_view name, SyntheticConfig* config) {
  for (const Family& f : kFamilies) {
    if (name == f.name) {
      f.apply(config);
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown synthetic family '", std::string(name),
                   "'; known families: ", absl::StrJoin(SyntheticFamilyNames(), ", ")));
}

std::vector<std::string> SyntheticPresetNames() {
  std::vector<std::string> names = {"llama3-8b-like", "mistral-7b-like", "small"};
  for (const std::string& f : SyntheticFamilyNames()) names.push_back(f);
  return names;
}

absl::StatusOr<SyntheticConfig> SyntheticPreset(std::string_view name) {
  SyntheticConfig c;
  if (name == "llama3-8b-like") {
    c.layers = 32;
    c.kv_heads = 8;
    c.q_heads = 32;
    c.head_dim = 128;
    c.rope_theta = 500000.0;
    return c;
  }
  if (name == "mistral-7b-like") {
    c.layers = 32;
    c.kv_heads = 8;
    c.q_heads = 32;
    c.head_dim = 128;
    c.rope_theta = 1000000.0;
    c.rank = 40;
    c.outlier_channels = 3;
    c.outlier_scale = 5.0f;
    c.topics = 96;
    c.peaked_fraction = 0.4f;
    return c;
  }
  if (name == "small") {
    c.layers = 2;
    c.kv_heads = 2;
    c.q_heads = 4;
    c.head_dim = 64;
    c.tokens = 2048;
    c.steps = 8;
    c.rope_theta = 500000.0;
    c.rank = 16;
    c.outlier_channels = 2;
    c.sink_tokens = 4;
    c.mean_segment = 64;
    c.topics = 16;
    c.needles = 4;
    return c;
  }
  if (ApplySyntheticFamily(name, &c).ok()) {
    // A family on the llama3-8b-like shape.
    SyntheticConfig base = *SyntheticPreset("llama3-8b-like");
    RETURN_IF_ERROR(ApplySyntheticFamily(name, &base));
    return base;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown synthetic preset '", std::string(name),
                   "'; known presets: ", absl::StrJoin(SyntheticPresetNames(), ", ")));
}

absl::StatusOr<AttentionProfile> ProfileAttention(const KvDump& dump, int step, int layer,
                                                  int q_head, int sink_tokens, int top_k) {
  if (step < 0 || step >= dump.steps || layer < 0 || layer >= dump.layers || q_head < 0 ||
      q_head >= dump.q_heads || dump.kv_heads <= 0 || dump.q_heads % dump.kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ProfileAttention: (step ", step, ", layer ", layer, ", q_head ", q_head,
                     ") out of range for a dump of ", dump.steps, " steps, ", dump.layers,
                     " layers, ", dump.q_heads, " query heads"));
  }
  if (top_k < 1 || sink_tokens < 0) {
    return absl::InvalidArgumentError("ProfileAttention: top_k must be >= 1 and sink_tokens >= 0");
  }
  const int d = dump.head_dim;
  const size_t need_kv = static_cast<size_t>(dump.layers) * dump.kv_heads * dump.tokens * d;
  const size_t need_q = static_cast<size_t>(dump.steps) * dump.layers * dump.q_heads * d;
  if (dump.keys.size() != need_kv || dump.queries.size() != need_q) {
    return absl::InvalidArgumentError("ProfileAttention: dump arrays do not match its shape");
  }
  const int kv_head = q_head / dump.group_size();
  const float* q = dump.queries.data() +
                   ((static_cast<size_t>(step) * dump.layers + layer) * dump.q_heads + q_head) * d;
  const float* keys = dump.key(layer, kv_head);
  const int64_t n = dump.tokens;
  std::vector<double> logits(n);
  const double inv = 1.0 / std::sqrt(static_cast<double>(d));
  double mx = -1e300, sum = 0, sq = 0;
  for (int64_t t = 0; t < n; ++t) {
    logits[t] = synthetic_internal::Dot(q, keys + t * d, d) * inv;
    mx = std::max(mx, logits[t]);
    sum += logits[t];
    sq += logits[t] * logits[t];
  }
  AttentionProfile p;
  p.max_logit = mx;
  const double mean = sum / n;
  p.logit_std = std::sqrt(std::max(0.0, sq / n - mean * mean));
  double z = 0;
  for (int64_t t = 0; t < n; ++t) z += std::exp(logits[t] - mx);
  std::vector<double> probs(n);
  double ent = 0;
  for (int64_t t = 0; t < n; ++t) {
    probs[t] = std::exp(logits[t] - mx) / z;
    if (probs[t] > 0) ent -= probs[t] * std::log(probs[t]);
    if (t < sink_tokens) p.sink_mass += probs[t];
  }
  p.entropy = ent;
  const int64_t k = std::min<int64_t>(top_k, n);
  std::nth_element(probs.begin(), probs.begin() + (k - 1), probs.end(), std::greater<double>());
  for (int64_t i = 0; i < k; ++i) p.topk_mass += probs[i];
  return p;
}

}  // namespace icecache
