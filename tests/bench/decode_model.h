// The model `icecache-bench decode` serves (docs/architecture.md §10): the KV
// of every layer in float16 (what the daemon holds and what the CPU
// attention reads) and the fp32 queries of every decode step, from the
// synthetic generator (docs/architecture.md §11).
//
// Generation by blocks of layers: each block of `block_layers` layers is one
// call of the generator (seed + block), converted to fp16 as soon as it is
// made, so the fp32 arrays of only one block exist at a time (32 layers x
// 32768 tokens in fp32 would be 8.6 GB). Inside a block the layers are
// correlated as the generator makes them (what layer reuse relies on; blocks
// align with layer groups of up to `block_layers`); blocks are independent
// draws. The generator spreads each block over its worker threads.
//
// Token layout: the first `prefill_tokens()` = tokens - steps + 1 tokens are
// the prefill; decode step 0 queries them (the first decode step, part of
// the time to second token); step s >= 1 first appends token
// prefill_tokens() + s - 1, then queries the prefill_tokens() + s tokens held.
//
// Thread safety: const after Generate(); const methods may run concurrently.
#ifndef ICECACHE_TESTS_BENCH_DECODE_MODEL_H_
#define ICECACHE_TESTS_BENCH_DECODE_MODEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace icecache::bench {

struct DecodeModelOptions {
  std::string preset = "llama3-8b-like";  // common/synthetic.h (shape: kv/q heads, head_dim)
  int layers = 32;
  int64_t tokens = 32768;  // prefill + steps
  int steps = 8;           // decode steps (one appended token and one query set each)
  uint64_t seed = 42;
  int block_layers = 4;  // layers per generator call
};

class DecodeModel {
 public:
  // `progress(layers_done)` is called after each block. InvalidArgument for
  // a bad preset or shape (tokens <= steps, layers < 1, block_layers < 1),
  // ResourceExhausted when memory runs out.
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

  // fp16 rows of (layer, kv head), token-major: tokens() x head_dim.
  const uint16_t* keys(int layer, int kv_head) const;
  const uint16_t* values(int layer, int kv_head) const;
  // The q_heads x head_dim fp32 queries of `layer` at decode step `step`.
  absl::Span<const float> queries(int step, int layer) const;

  // Bytes of an AppendKv region of `n` tokens and `num_layers` layers.
  size_t AppendBytes(int64_t n, int num_layers) const;
  // Writes tokens [begin, end) of layers [first, first + count) in the
  // AppendKv layout (keys [layer][head][token][d], then values) to `out`,
  // which holds AppendBytes(end - begin, count) bytes.
  void FillAppend(int64_t begin, int64_t end, int first, int count, uint8_t* out) const;

 private:
  DecodeModel() = default;
  size_t RowIndex(int layer, int kv_head, int64_t token) const;

  DecodeModelOptions options_;
  int layers_ = 0, kv_heads_ = 0, q_heads_ = 0, head_dim_ = 0, steps_ = 0;
  int64_t tokens_ = 0;
  std::vector<uint16_t> k_, v_;  // [layer][kv_head][token][d]
  std::vector<float> q_;         // [step][layer][q_head][d]
};

}  // namespace icecache::bench

#endif  // ICECACHE_TESTS_BENCH_DECODE_MODEL_H_
