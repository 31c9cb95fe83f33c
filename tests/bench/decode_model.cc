#include "tests/bench/decode_model.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status_macros.h"

namespace icecache::bench {

std::vector<int> QualityLayers(int layers, int n) {
  std::vector<int> out;
  if (n >= layers) {
    for (int l = 0; l < layers; ++l) out.push_back(l);
    return out;
  }
  for (int i = 0; i < n; ++i) {
    const int start = static_cast<int>(static_cast<int64_t>(i) * layers / n);
    const int end = static_cast<int>(static_cast<int64_t>(i + 1) * layers / n);
    out.push_back(start + std::min(i % 4, end - start - 1));
  }
  return out;
}

const uint16_t* DecodeModel::keys(int layer, int kv_head) const {
  const int slot = slot_[layer];
  if (slot < 0) return nullptr;
  return qk_.data() + (static_cast<size_t>(slot) * kv_heads_ + kv_head) * tokens_ * head_dim_;
}
const uint16_t* DecodeModel::values(int layer, int kv_head) const {
  const int slot = slot_[layer];
  if (slot < 0) return nullptr;
  return qv_.data() + (static_cast<size_t>(slot) * kv_heads_ + kv_head) * tokens_ * head_dim_;
}

absl::Span<const float> DecodeModel::queries(int step, int layer) const {
  const size_t n = static_cast<size_t>(q_heads_) * head_dim_;
  return absl::MakeConstSpan(q_.data() + (static_cast<size_t>(step) * layers_ + layer) * n, n);
}

size_t DecodeModel::AppendBytes(int64_t n, int num_layers) const {
  return 2 * static_cast<size_t>(num_layers) * kv_heads_ * n * head_dim_ * sizeof(uint16_t);
}

absl::Status DecodeModel::GenerateSlice(int first, int head) const {
  const auto t0 = std::chrono::steady_clock::now();
  SyntheticConfig c = base_;
  c.layers = std::min(options_.block_layers, layers_ - first);
  c.tokens = tokens_;
  c.steps = steps_;
  c.seed = options_.seed + 1000003ull * static_cast<uint64_t>(first / options_.block_layers);
  c.kv_head_begin = head;
  c.kv_head_count = 1;
  RETURN_IF_ERROR(GenerateSyntheticInto(c, nullptr, &scratch_));
  generate_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return absl::OkStatus();
}

absl::Status DecodeModel::FillAppend(int64_t begin, int64_t end, int first, int count,
                                     uint8_t* out) const {
  const size_t d = static_cast<size_t>(head_dim_);
  if (first < 0 || count < 1 || first + count > layers_ || begin >= end || end > tokens_) {
    return absl::InvalidArgumentError(absl::StrCat("decode model: FillAppend of tokens ", begin,
                                                   "..", end, " of layers ", first, "+", count));
  }
  const int64_t n = end - begin;
  uint16_t* k_out = reinterpret_cast<uint16_t*>(out);
  uint16_t* v_out = k_out + AppendBytes(n, count) / 2 / sizeof(uint16_t);
  const size_t run = static_cast<size_t>(n) * d;  // elements of one (layer, head)
  if (begin >= prefill_tokens()) {
    const int64_t tail = tokens_ - prefill_tokens();
    for (int l = first; l < first + count; ++l) {
      for (int h = 0; h < kv_heads_; ++h) {
        const size_t from =
            ((static_cast<size_t>(l) * kv_heads_ + h) * tail + (begin - prefill_tokens())) * d;
        std::memcpy(k_out, tail_k_.data() + from, run * sizeof(uint16_t));
        std::memcpy(v_out, tail_v_.data() + from, run * sizeof(uint16_t));
        k_out += run;
        v_out += run;
      }
    }
    return absl::OkStatus();
  }
  if (begin != 0 || end != prefill_tokens()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "decode model: FillAppend generates the whole prefill (tokens 0..", prefill_tokens(),
        ") or copies decode tokens; asked tokens ", begin, "..", end));
  }
  if (prefill_held()) {
    for (int l = first; l < first + count; ++l) {
      const size_t at = static_cast<size_t>(l - first) * kv_heads_ * run;
      std::memcpy(k_out + at, held_k_[l].get(), kv_heads_ * run * sizeof(uint16_t));
      std::memcpy(v_out + at, held_v_[l].get(), kv_heads_ * run * sizeof(uint16_t));
    }
    return absl::OkStatus();
  }
  // Every block the layers touch (a range that starts or ends inside a block
  // generates the whole block: a chunk aligned with the blocks wastes none).
  for (int b = first - first % options_.block_layers; b < first + count;
       b += options_.block_layers) {
    const int in_block = std::min(options_.block_layers, layers_ - b);
    for (int h = 0; h < kv_heads_; ++h) {
      RETURN_IF_ERROR(GenerateSlice(b, h));
      for (int j = std::max(0, first - b); j < in_block && b + j < first + count; ++j) {
        const size_t at = (static_cast<size_t>(b + j - first) * kv_heads_ + h) * run;
        const size_t from = static_cast<size_t>(j) * tokens_ * d;  // the slice's layer j
        FloatToHalf(scratch_.keys.data() + from, k_out + at, run);
        FloatToHalf(scratch_.values.data() + from, v_out + at, run);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status DecodeModel::HoldPrefill(const std::function<void(int)>& progress) {
  if (prefill_held()) return absl::OkStatus();
  const auto t0 = std::chrono::steady_clock::now();
  const double streamed_s = generate_s_;  // GenerateSlice counts FillAppend's
  const size_t d = static_cast<size_t>(head_dim_);
  const size_t run = static_cast<size_t>(prefill_tokens()) * d;
  std::vector<std::unique_ptr<uint16_t[]>> k(layers_), v(layers_);
  for (int l = 0; l < layers_; ++l) {
    k[l].reset(new (std::nothrow) uint16_t[kv_heads_ * run]);
    v[l].reset(new (std::nothrow) uint16_t[kv_heads_ * run]);
    if (k[l] == nullptr || v[l] == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("decode model: no memory to hold the prefill (",
                       AppendBytes(prefill_tokens(), layers_) >> 20, " MiB)"));
    }
  }
  for (int b = 0; b < layers_; b += options_.block_layers) {
    const int in_block = std::min(options_.block_layers, layers_ - b);
    for (int h = 0; h < kv_heads_; ++h) {
      RETURN_IF_ERROR(GenerateSlice(b, h));
      for (int j = 0; j < in_block; ++j) {
        const size_t from = static_cast<size_t>(j) * tokens_ * d;  // the slice's layer j
        FloatToHalf(scratch_.keys.data() + from, k[b + j].get() + h * run, run);
        FloatToHalf(scratch_.values.data() + from, v[b + j].get() + h * run, run);
      }
    }
    if (progress) progress(b + in_block);
  }
  generate_s_ = streamed_s;
  held_k_ = std::move(k);
  held_v_ = std::move(v);
  hold_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DecodeModel>> DecodeModel::Generate(
    const DecodeModelOptions& options, const std::function<void(int)>& progress) {
  if (options.layers < 1 || options.block_layers < 1 || options.quality_layers < 1) {
    return absl::InvalidArgumentError(
        "decode model: layers, block_layers and quality_layers must be >= 1");
  }
  if (options.steps < 1 || options.tokens <= options.steps) {
    return absl::InvalidArgumentError(absl::StrCat("decode model: tokens (", options.tokens,
                                                   ") must exceed steps (", options.steps, ")"));
  }
  ASSIGN_OR_RETURN(SyntheticConfig base, SyntheticPreset(options.preset));
  std::unique_ptr<DecodeModel> m(new DecodeModel());
  m->options_ = options;
  m->base_ = base;
  m->layers_ = options.layers;
  m->kv_heads_ = base.kv_heads;
  m->q_heads_ = base.q_heads;
  m->head_dim_ = base.head_dim;
  m->steps_ = options.steps;
  m->tokens_ = options.tokens;
  m->quality_ = QualityLayers(m->layers_, options.quality_layers);
  m->slot_.assign(m->layers_, -1);
  for (size_t i = 0; i < m->quality_.size(); ++i) m->slot_[m->quality_[i]] = static_cast<int>(i);
  const size_t d = static_cast<size_t>(m->head_dim_);
  const size_t head_elems = static_cast<size_t>(m->tokens_) * d;
  const int64_t tail = m->tokens_ - m->prefill_tokens();
  const int group = m->q_heads_ / m->kv_heads_;
  const size_t q_layer = static_cast<size_t>(m->q_heads_) * d;
  try {
    m->qk_.resize(m->quality_.size() * m->kv_heads_ * head_elems);
    m->qv_.resize(m->quality_.size() * m->kv_heads_ * head_elems);
    m->tail_k_.resize(static_cast<size_t>(m->layers_) * m->kv_heads_ * tail * d);
    m->tail_v_.resize(m->tail_k_.size());
    m->q_.resize(q_layer * m->layers_ * m->steps_);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat("decode model: cannot allocate ",
                                                     4 * m->qk_.size() >> 20,
                                                     " MiB for the fp16 keys and "
                                                     "values of ",
                                                     m->quality_.size(), " quality layers"));
  }
  for (int first = 0; first < m->layers_; first += options.block_layers) {
    const int in_block = std::min(options.block_layers, m->layers_ - first);
    for (int h = 0; h < m->kv_heads_; ++h) {
      RETURN_IF_ERROR(m->GenerateSlice(first, h));
      const KvDump& s = m->scratch_;
      for (int j = 0; j < in_block; ++j) {
        const int l = first + j;
        const float* k = s.keys.data() + static_cast<size_t>(j) * head_elems;
        const float* v = s.values.data() + static_cast<size_t>(j) * head_elems;
        const size_t to = ((static_cast<size_t>(l) * m->kv_heads_ + h) * tail) * d;
        FloatToHalf(k + m->prefill_tokens() * d, m->tail_k_.data() + to, tail * d);
        FloatToHalf(v + m->prefill_tokens() * d, m->tail_v_.data() + to, tail * d);
        if (const int slot = m->slot_[l]; slot >= 0) {
          const size_t at = (static_cast<size_t>(slot) * m->kv_heads_ + h) * head_elems;
          FloatToHalf(k, m->qk_.data() + at, head_elems);
          FloatToHalf(v, m->qv_.data() + at, head_elems);
        }
        // The slice's queries: [step][layer j][its `group` query heads][d].
        for (int st = 0; st < m->steps_; ++st) {
          std::memcpy(
              m->q_.data() + (static_cast<size_t>(st) * m->layers_ + l) * q_layer + h * group * d,
              s.queries.data() + (static_cast<size_t>(st) * in_block + j) * group * d,
              group * d * sizeof(float));
        }
      }
    }
    if (progress) progress(first + in_block);
  }
  m->generate_s_ = 0;  // FillAppend's from here on
  return m;
}

}  // namespace icecache::bench
