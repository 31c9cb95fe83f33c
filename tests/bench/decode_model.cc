#include "tests/bench/decode_model.h"

#include <algorithm>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "common/synthetic.h"

namespace icecache::bench {

size_t DecodeModel::RowIndex(int layer, int kv_head, int64_t token) const {
  return ((static_cast<size_t>(layer) * kv_heads_ + kv_head) * tokens_ + token) * head_dim_;
}

const uint16_t* DecodeModel::keys(int layer, int kv_head) const {
  return k_.data() + RowIndex(layer, kv_head, 0);
}
const uint16_t* DecodeModel::values(int layer, int kv_head) const {
  return v_.data() + RowIndex(layer, kv_head, 0);
}

absl::Span<const float> DecodeModel::queries(int step, int layer) const {
  const size_t n = static_cast<size_t>(q_heads_) * head_dim_;
  return absl::MakeConstSpan(q_.data() + (static_cast<size_t>(step) * layers_ + layer) * n, n);
}

size_t DecodeModel::AppendBytes(int64_t n, int num_layers) const {
  return 2 * static_cast<size_t>(num_layers) * kv_heads_ * n * head_dim_ * sizeof(uint16_t);
}

void DecodeModel::FillAppend(int64_t begin, int64_t end, int first, int count, uint8_t* out) const {
  const size_t run = static_cast<size_t>(end - begin) * head_dim_ * sizeof(uint16_t);
  uint8_t* k_out = out;
  uint8_t* v_out = out + AppendBytes(end - begin, count) / 2;
  for (int l = first; l < first + count; ++l) {
    for (int h = 0; h < kv_heads_; ++h) {
      std::memcpy(k_out, k_.data() + RowIndex(l, h, begin), run);
      std::memcpy(v_out, v_.data() + RowIndex(l, h, begin), run);
      k_out += run;
      v_out += run;
    }
  }
}

absl::StatusOr<std::unique_ptr<DecodeModel>> DecodeModel::Generate(
    const DecodeModelOptions& options, const std::function<void(int)>& progress) {
  if (options.layers < 1 || options.block_layers < 1) {
    return absl::InvalidArgumentError("decode model: layers and block_layers must be >= 1");
  }
  if (options.steps < 1 || options.tokens <= options.steps) {
    return absl::InvalidArgumentError(absl::StrCat("decode model: tokens (", options.tokens,
                                                   ") must exceed steps (", options.steps, ")"));
  }
  ASSIGN_OR_RETURN(SyntheticConfig base, SyntheticPreset(options.preset));
  std::unique_ptr<DecodeModel> m(new DecodeModel());
  m->options_ = options;
  m->layers_ = options.layers;
  m->kv_heads_ = base.kv_heads;
  m->q_heads_ = base.q_heads;
  m->head_dim_ = base.head_dim;
  m->steps_ = options.steps;
  m->tokens_ = options.tokens;
  const size_t layer_elems = static_cast<size_t>(m->kv_heads_) * m->tokens_ * m->head_dim_;
  const size_t q_layer = static_cast<size_t>(m->q_heads_) * m->head_dim_;
  try {
    m->k_.resize(layer_elems * m->layers_);
    m->v_.resize(layer_elems * m->layers_);
    m->q_.resize(q_layer * m->layers_ * m->steps_);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        absl::StrCat("decode model: cannot allocate ", 4 * layer_elems * m->layers_ >> 20,
                     " MiB for the fp16 keys and values of ", m->layers_, " layers"));
  }
  for (int first = 0; first < m->layers_; first += options.block_layers) {
    SyntheticConfig c = base;
    c.layers = std::min(options.block_layers, m->layers_ - first);
    c.tokens = options.tokens;
    c.steps = options.steps;
    c.seed = options.seed + 1000003ull * static_cast<uint64_t>(first / options.block_layers);
    ASSIGN_OR_RETURN(KvDump block, GenerateSynthetic(c));
    const size_t off = layer_elems * first;
    FloatToHalf(block.keys.data(), m->k_.data() + off, block.keys.size());
    FloatToHalf(block.values.data(), m->v_.data() + off, block.values.size());
    for (int s = 0; s < m->steps_; ++s) {
      for (int l = 0; l < c.layers; ++l) {
        std::memcpy(m->q_.data() + (static_cast<size_t>(s) * m->layers_ + first + l) * q_layer,
                    block.queries.data() + (static_cast<size_t>(s) * c.layers + l) * q_layer,
                    q_layer * sizeof(float));
      }
    }
    if (progress) progress(first + c.layers);
  }
  return m;
}

}  // namespace icecache::bench
