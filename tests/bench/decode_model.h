// The model `icecache-bench decode` serves (docs/architecture.md §10): the KV
// of every layer in float16 (what the daemon holds and what the CPU
// attention reads) and the fp32 queries of every decode step, from the
// synthetic generator (docs/architecture.md §11).
//
// Generated lazily, held little. The KV of a layer is made when it is
// streamed to the daemon (FillAppend of the prefill), deterministically from
// (seed, block of layers, KV head), and is not kept: the process holds the
// queries, the decode steps' tokens of every layer, and the whole fp16 KV
// of only the `quality_layers` layers the quality figures and the
// exact-token oracle read (keys(), values()). A 32-layer, 32768-token model
// is 4 GiB of fp16 KV; held whole it made the benchmark as large as the
// daemon (docs/bench/decode_32l.md).
//
// Generation by blocks of layers: each block of `block_layers` layers is one
// generator draw (seed + block); inside a block the layers are correlated as
// the generator makes them (what layer reuse relies on; blocks align with
// layer groups of up to `block_layers`); blocks are independent draws. A
// block is generated one KV head at a time (SyntheticConfig::kv_head_begin:
// each head exactly as in the whole block), so the fp32 arrays of one
// (block, head) exist at a time: 128 MiB at 4 layers x 32768 tokens. The
// generator spreads each call over its worker threads. The data are those
// of the whole-model generation this replaced, bit for bit.
//
// Token layout: the first `prefill_tokens()` = tokens - steps + 1 tokens are
// the prefill; decode step 0 queries them (the first decode step, part of
// the time to second token); step s >= 1 first appends token
// prefill_tokens() + s - 1, then queries the prefill_tokens() + s tokens held.
//
// Thread safety: const methods may run concurrently except FillAppend of the
// prefill (it generates into one scratch dump): one thread at a time.
#ifndef ICECACHE_TESTS_BENCH_DECODE_MODEL_H_
#define ICECACHE_TESTS_BENCH_DECODE_MODEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/kv_dump.h"
#include "common/synthetic.h"

namespace icecache::bench {

struct DecodeModelOptions {
  std::string preset = "llama3-8b-like";  // common/synthetic.h (shape: kv/q heads, head_dim)
  int layers = 32;
  int64_t tokens = 32768;  // prefill + steps
  int steps = 8;           // decode steps (one appended token and one query set each)
  uint64_t seed = 42;
  int block_layers = 4;  // layers per generator draw
  // Layers whose whole KV stays resident for the quality figures (evenly
  // spaced: QualityLayers()); >= layers: every layer.
  int quality_layers = 4;
};

// The `n` layers of `layers` whose quality is measured: one per stretch of
// layers/n, at offset (i mod 4) inside its stretch (where the stretch is
// long enough), so that with layer reuse r <= 4 both the layers that select
// and those that reuse a group's selection are among them (0, 9, 18, 27 of
// 32). n >= layers: every layer. Ascending.
std::vector<int> QualityLayers(int layers, int n);

class DecodeModel {
 public:
  // One pass of the generator over every block: keeps the queries, the
  // decode tokens and the quality layers. `progress(layers_done)` after each
  // block. InvalidArgument for a bad preset or shape (tokens <= steps,
  // layers < 1, block_layers < 1, quality_layers < 1), ResourceExhausted
  // when memory runs out.
  static absl::StatusOr<std::unique_ptr<DecodeModel>> Generate(
      const DecodeModelOptions& options, const std::function<void(int)>& progress = nullptr);

  int layers() const { return layers_; }
  int kv_heads() const { return kv_heads_; }
  int q_heads() const { return q_heads_; }
  int group() const { return q_heads_ / kv_heads_; }
  int head_dim() const { return head_dim_; }
  int64_t tokens() const { return tokens_; }
  int steps() const { return steps_; }
  int64_t prefill_tokens() const { return tokens_ - steps_ + 1; }
  // Tokens held at decode step `step`.
  int64_t tokens_at(int step) const { return prefill_tokens() + step; }
  const DecodeModelOptions& options() const { return options_; }

  // The layers whose KV is resident (QualityLayers), ascending.
  const std::vector<int>& quality_layers() const { return quality_; }
  bool is_quality_layer(int layer) const { return slot_[layer] >= 0; }
  // fp16 rows of (layer, kv head), token-major: tokens() x head_dim. Only
  // for a quality layer (nullptr otherwise).
  const uint16_t* keys(int layer, int kv_head) const;
  const uint16_t* values(int layer, int kv_head) const;
  // The q_heads x head_dim fp32 queries of `layer` at decode step `step`.
  absl::Span<const float> queries(int step, int layer) const;

  // Bytes of an AppendKv region of `n` tokens and `num_layers` layers.
  size_t AppendBytes(int64_t n, int num_layers) const;
  // Writes tokens [begin, end) of layers [first, first + count) in the
  // AppendKv layout (keys [layer][head][token][d], then values) to `out`,
  // which holds AppendBytes(end - begin, count) bytes. Either the prefill
  // (begin 0, end prefill_tokens()): generated here, block by block and
  // head by head (every block the layers touch); or decode tokens
  // (begin >= prefill_tokens()): from memory. InvalidArgument otherwise.
  absl::Status FillAppend(int64_t begin, int64_t end, int first, int count, uint8_t* out) const;
  // Seconds FillAppend of the prefill has spent generating so far.
  double generate_seconds() const { return generate_s_; }

  // Generates the whole prefill once and keeps it, fp16, per layer:
  // AppendBytes(prefill_tokens(), layers()) bytes (4 GiB at 32 layers x
  // 32768 tokens). FillAppend of the prefill then copies from it instead of
  // generating, so a prefill can be streamed the way a client holding its KV
  // streams it: no generation between the chunks, the next chunk sent while
  // the last one's trees build. The same bytes as FillAppend generates.
  // `progress(layers_done)` after each block. ResourceExhausted when the
  // memory is not there.
  absl::Status HoldPrefill(const std::function<void(int)>& progress = nullptr);
  bool prefill_held() const { return !held_k_.empty(); }
  // Seconds HoldPrefill took.
  double hold_seconds() const { return hold_s_; }

 private:
  DecodeModel() = default;
  // Generates KV head `head` of the block starting at layer `first` into
  // scratch_ (fp32, [layer in block][token][d]).
  absl::Status GenerateSlice(int first, int head) const;

  DecodeModelOptions options_;
  SyntheticConfig base_;
  int layers_ = 0, kv_heads_ = 0, q_heads_ = 0, head_dim_ = 0, steps_ = 0;
  int64_t tokens_ = 0;
  std::vector<int> quality_;
  std::vector<int> slot_;                  // [layer]: index into quality_, or -1
  std::vector<uint16_t> qk_, qv_;          // [slot][kv_head][token][d]
  std::vector<uint16_t> tail_k_, tail_v_;  // [layer][kv_head][decode token][d]
  std::vector<float> q_;                   // [step][layer][q_head][d]
  // HoldPrefill's KV: [layer] -> [kv_head][token][d] of the prefill tokens.
  std::vector<std::unique_ptr<uint16_t[]>> held_k_, held_v_;
  double hold_s_ = 0;
  mutable KvDump scratch_;  // one (block, head) slice
  mutable double generate_s_ = 0;
};

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_DECODE_MODEL_H_
