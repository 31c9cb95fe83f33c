#include "tests/bench/decode_policy_run.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "tests/bench/decode_attention.h"
#include "tests/bench/process_cpu.h"

namespace icecache::bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double MsSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double Mean(const std::vector<double>& v) {
  if (v.empty()) return kNaN;
  double sum = 0.0;
  for (double x : v) sum += x;
  return sum / static_cast<double>(v.size());
}

double Median(std::vector<double> v) {
  if (v.empty()) return kNaN;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The 99th percentile (nearest rank).
double P99(std::vector<double> v) {
  if (v.empty()) return kNaN;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(std::ceil(0.99 * static_cast<double>(v.size()))) - 1];
}

// Per step and per layer accumulators of one policy.
struct Tally {
  explicit Tally(int steps, int layers)
      : append(steps, 0),
        decode(steps, 0),
        attention(steps, 0),
        select(steps, 0),
        gather(steps, 0),
        own_select(steps, 0),
        own_gather(steps, 0),
        first(steps, 0),
        later(steps, 0),
        prefetch_on(steps, 0),
        mass(layers, 0),
        error(layers, 0),
        cells(layers, 0),
        rows_copied(steps, 0),
        rows_kept(steps, 0) {}
  std::vector<double> append, decode, attention, select, gather;  // ms per step
  // The measured backend's own select / gather time inside its DecodeStep
  // calls (StepOutcome::select_ms / gather_ms), ms per step, every layer.
  std::vector<double> own_select, own_gather;
  std::vector<double> overhead_us;   // per call: round trip beyond its own select + gather
  std::vector<double> manager_us;    // per call: the session manager's rest (step - both)
  std::vector<double> first, later;  // DecodeStep ms per step: groups' first / later layers
  std::vector<char> prefetch_on;     // "+pf" policies: the steps that asked for prefetch
  int64_t later_calls = 0, prefetched = 0;
  std::vector<double> message_ms, paired_us;
  std::vector<double> mass, error;
  std::vector<int> cells;
  double pages = 0, tokens = 0;
  int64_t heads = 0;
  // Token rows per step over every call (StepOutcome).
  std::vector<double> rows_copied, rows_kept;
};

// Attention of every KV head of `layer` from the pages the step fetched into
// `output` (timed: the CPU stand-in), then its quality against the
// reference (untimed). Returns the attention time in ms.
double LayerAttention(const DecodeContext& ctx, int step, int layer, const StepOutcome& outcome,
                      const uint8_t* output, Tally* t) {
  const DecodeModel& m = *ctx.model;
  const int d = m.head_dim(), g = m.group(), pt = ctx.options->page_tokens;
  const size_t row = static_cast<size_t>(d) * sizeof(uint16_t);
  std::vector<const uint16_t*> k_rows, v_rows;
  std::vector<float> out(static_cast<size_t>(g) * d);
  AttentionScratch scratch;
  double ms = 0;
  for (size_t h = 0; h < outcome.heads.size(); ++h) {
    const StepHead& head = outcome.heads[h];
    const float* q = m.queries(step, layer).data() + h * g * d;
    const auto t0 = Clock::now();
    k_rows.clear();
    v_rows.clear();
    for (size_t i = 0; i < head.k_offsets.size(); ++i) {
      const uint8_t* k = output + head.k_offsets[i];
      for (uint32_t r = 0; r < head.fills[i]; ++r) {
        k_rows.push_back(reinterpret_cast<const uint16_t*>(k + r * row));
        v_rows.push_back(reinterpret_cast<const uint16_t*>(k + (pt + r) * row));
      }
    }
    RowsAttention(k_rows, v_rows, d, q, g, out.data(), &scratch);
    ms += MsSince(t0);
    const int hh = static_cast<int>(h);
    if (m.is_quality_layer(layer)) {  // the model holds its keys; the reference covers it
      t->mass[layer] += MassRecall(m.keys(layer, hh), d, head.positions, q, g,
                                   ctx.reference->Lse(step, layer, hh), &scratch);
      t->error[layer] += OutputRelError(out.data(), ctx.reference->Out(step, layer, hh), g, d);
      ++t->cells[layer];
    }
    // Slots written (pages, or slots packed with tokens at token granularity).
    t->pages += static_cast<double>(head.k_offsets.size());
    t->tokens += static_cast<double>(k_rows.size());
    ++t->heads;
  }
  return ms;
}

// Waits until the trees of layers [0, layers) of `id` are built (trees of
// whole layer groups: the total x layers / all layers).
absl::Status WaitForTrees(DecodeBackend& b, const std::string& id, int layers, int all_layers) {
  const auto t0 = Clock::now();
  for (;;) {
    ASSIGN_OR_RETURN(auto trees, b.Trees(id));
    const int64_t need = static_cast<int64_t>(trees.second) * layers / all_layers;
    if (trees.first >= need) return absl::OkStatus();
    if (MsSince(t0) > 30 * 60 * 1000.0) {
      return absl::DeadlineExceededError(
          absl::StrCat("prefill: ", trees.first, " of ", need, " trees built after 30 minutes"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// Streams the prefill in chunks of `chunk_layers` layers; returns the
// seconds timed.
//
// With the prefill held (DecodeModel::HoldPrefill), as a client holding its
// KV streams it: each chunk is copied into the staging buffer and sent while
// the daemon builds the last chunk's trees (one chunk in flight beyond the
// one building: the next call is sent once the chunk before the last is
// built), and the clock runs from the first copy to the last tree built.
//
// Otherwise each chunk is generated first (FillAppend; not timed), then sent,
// and its trees waited for (timed): the daemon's builds never run during the
// generation, so the time is the ingest and index builds alone, without the
// overlap of one chunk's builds with the next chunk's transfer (an upper
// bound by that transfer time).
absl::StatusOr<double> Prefill(const DecodeContext& ctx, DecodeBackend& b, const std::string& id,
                               int layers, int chunk_layers, ProgressLine* progress) {
  const DecodeModel& m = *ctx.model;
  const int64_t n = m.prefill_tokens();
  const auto show = [&](int done) -> absl::Status {
    if (progress != nullptr) {
      ASSIGN_OR_RETURN(auto trees, b.Trees(id));
      progress->Set(done, absl::StrFormat("layers, %d/%d trees", trees.first, trees.second));
    }
    return absl::OkStatus();
  };
  if (m.prefill_held()) {
    const auto t0 = Clock::now();
    int sent = 0;  // layers sent so far
    for (int first = 0; first < layers; first += chunk_layers) {
      const int count = std::min(chunk_layers, layers - first);
      RETURN_IF_ERROR(m.FillAppend(0, n, first, count, b.staging()));
      RETURN_IF_ERROR(b.Append(id, n, first, count));
      if (first > 0) {
        RETURN_IF_ERROR(WaitForTrees(b, id, sent, layers));
        RETURN_IF_ERROR(show(sent));
      }
      sent = first + count;
    }
    RETURN_IF_ERROR(WaitForTrees(b, id, layers, layers));
    const double ms = MsSince(t0);
    RETURN_IF_ERROR(show(layers));
    return ms / 1000.0;
  }
  double ms = 0;
  for (int first = 0; first < layers; first += chunk_layers) {
    const int count = std::min(chunk_layers, layers - first);
    RETURN_IF_ERROR(m.FillAppend(0, n, first, count, b.staging()));
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(b.Append(id, n, first, count));
    RETURN_IF_ERROR(WaitForTrees(b, id, first + count, layers));
    ms += MsSince(t0);
    RETURN_IF_ERROR(show(first + count));
  }
  return ms / 1000.0;
}

DecodeSelect SelectFor(const DecodeBenchOptions& o, const DecodePolicy& p, int layer) {
  DecodeSelect s;
  s.budget_tokens = o.budget;
  s.sink_tokens = o.sink_tokens;
  s.recent_tokens = o.recent_tokens;
  s.reuse_group_selection = layer % p.layer_reuse != 0;
  s.in_place = p.in_place;
  return s;
}

// The companion's select + gather and its DecodeStep for the same layer and
// step, in alternating order.
absl::Status CompanionLayer(const DecodeContext& ctx, const std::string& id, int step, int layer,
                            const DecodeSelect& sel, double main_ms, Tally* t) {
  const absl::Span<const float> q =
      sel.reuse_group_selection ? absl::Span<const float>() : ctx.model->queries(step, layer);
  double select_ms = 0, fetch_ms = 0, decode_ms = 0;
  auto split = [&]() {
    return ctx.companion->SelectThenFetch(id, layer, q, 0, sel, &select_ms, &fetch_ms).status();
  };
  auto whole = [&]() -> absl::Status {
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(ctx.companion->DecodeStep(id, layer, q, 0, sel).status());
    decode_ms = MsSince(t0);
    return absl::OkStatus();
  };
  if (step % 2 == 0) {
    RETURN_IF_ERROR(split());
    RETURN_IF_ERROR(whole());
  } else {
    RETURN_IF_ERROR(whole());
    RETURN_IF_ERROR(split());
  }
  t->select[step] += select_ms;
  t->gather[step] += fetch_ms;
  t->paired_us.push_back((main_ms - decode_ms) * 1000.0);
  return absl::OkStatus();
}

// One decode step of every layer: append (s >= 1), DecodeStep and attention
// per layer, then the companion's split on its layers.
absl::Status DecodeOneStep(const DecodeContext& ctx, const DecodePolicy& p, const std::string& id,
                           const std::string& companion_id, int step, Tally* t) {
  const DecodeModel& m = *ctx.model;
  if (step > 0) {
    const int64_t tok = m.tokens_at(step) - 1;
    RETURN_IF_ERROR(m.FillAppend(tok, tok + 1, 0, m.layers(), ctx.main->staging()));
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(ctx.main->Append(id, 1, 0, 0));
    t->append[step] = MsSince(t0);
    RETURN_IF_ERROR(m.FillAppend(tok, tok + 1, 0, ctx.reference_layers, ctx.companion->staging()));
    RETURN_IF_ERROR(ctx.companion->Append(companion_id, 1, 0, 0));
  }
  uint64_t stride = 0;  // of the group's first layer: the group's layers lie side by side
  struct CompanionCall {
    int layer;
    DecodeSelect sel;
    double main_ms;
  };
  std::vector<CompanionCall> companion;
  // "+pf": prefetch on every step; with --prefetch-ab on odd steps and off
  // on even ones, so on and off are measured interleaved on the same
  // session, data and load.
  t->prefetch_on[step] = p.prefetch && (!ctx.options->prefetch_ab || step % 2 == 1);
  for (int l = 0; l < m.layers(); ++l) {
    DecodeSelect sel = SelectFor(*ctx.options, p, l);
    if (ctx.options->in_place_ab) sel.in_place = p.in_place && step % 2 == 1;
    const bool first = l % p.layer_reuse == 0;
    sel.prefetch_group = t->prefetch_on[step] && first;
    // "+ip": each group's layers side by side in the group's own region,
    // the same every step; otherwise every group at 0.
    const uint64_t base =
        p.in_place ? static_cast<uint64_t>(l - l % p.layer_reuse) * ctx.in_place_region_bytes : 0;
    const uint64_t offset = base + (first ? 0 : (l % p.layer_reuse) * stride);
    const absl::Span<const float> q =
        sel.reuse_group_selection ? absl::Span<const float>() : m.queries(step, l);
    const auto t0 = Clock::now();
    absl::StatusOr<StepOutcome> outcome = ctx.main->DecodeStep(id, l, q, offset, sel);
    // The daemon builds a prefill's trees in the background and answers
    // UNAVAILABLE when a layer's group is still building past its wait: the
    // first step waits as a client would, and the wait counts in TT2T.
    for (int tries = 0; step == 0 && absl::IsUnavailable(outcome.status()) && tries < 60; ++tries) {
      outcome = ctx.main->DecodeStep(id, l, q, offset, sel);
    }
    RETURN_IF_ERROR(outcome.status());
    const double ms = MsSince(t0);
    t->decode[step] += ms;
    t->own_select[step] += outcome->select_ms;
    t->own_gather[step] += outcome->gather_ms;
    t->overhead_us.push_back((ms - outcome->select_ms - outcome->gather_ms) * 1000.0);
    t->manager_us.push_back((outcome->step_ms - outcome->select_ms - outcome->gather_ms) * 1000.0);
    if (first) {
      stride = outcome->layer_stride;
      t->first[step] += ms;
    } else {
      t->later[step] += ms;
      if (t->prefetch_on[step]) {
        ++t->later_calls;
        t->prefetched += outcome->prefetched ? 1 : 0;
      }
    }
    t->message_ms.push_back(ms);
    t->rows_copied[step] += static_cast<double>(outcome->rows_copied);
    t->rows_kept[step] += static_cast<double>(outcome->rows_kept);
    t->attention[step] += LayerAttention(ctx, step, l, *outcome, ctx.main->output(), t);
    if (l < ctx.reference_layers) companion.push_back({l, sel, ms});
  }
  // The companion's layers once the step's calls are done: run between
  // them, its in-process selections (and its lanes watching after them)
  // took the CPU from the measured daemon's next layer and let its lane
  // helper fall asleep, which a serving client's GPU work between layers
  // does not (docs/bench/defer61.md).
  for (const CompanionCall& c : companion) {
    RETURN_IF_ERROR(CompanionLayer(ctx, companion_id, step, c.layer, c.sel, c.main_ms, t));
  }
  return absl::OkStatus();
}

// Medians over the steps after the first, per token of the whole model.
void Summarize(const DecodeContext& ctx, const Tally& t, PolicyResult* r) {
  const int steps = static_cast<int>(t.decode.size());
  const double layer_scale = ctx.scale;
  const double companion_scale =
      static_cast<double>(ctx.options->layers) / std::max(1, ctx.reference_layers);
  std::vector<double> tpot, decode;
  for (int s = 1; s < steps; ++s) {
    tpot.push_back((t.append[s] + t.decode[s] + t.attention[s]) * layer_scale);
    decode.push_back(t.decode[s] * layer_scale);
  }
  const auto tail_of = [&](const std::vector<double>& v, double scale) {
    std::vector<double> out;
    for (int s = 1; s < steps; ++s) out.push_back(v[s] * scale);
    return out;
  };
  const auto tail = [&](const std::vector<double>& v, double scale) {
    return Median(tail_of(v, scale));
  };
  r->mean_cost.append = Mean(tail_of(t.append, layer_scale));
  r->mean_cost.select = Mean(tail_of(t.own_select, layer_scale));
  r->mean_cost.gather = Mean(tail_of(t.own_gather, layer_scale));
  r->mean_cost.attention = Mean(tail_of(t.attention, layer_scale));
  r->mean_cost.rpc = Mean(decode) - r->mean_cost.select - r->mean_cost.gather;
  r->mean_cost.tpot = Mean(tpot);
  // The steps' tail: each column's own 99th percentile (not one step's split).
  r->p99_cost.append = P99(tail_of(t.append, layer_scale));
  r->p99_cost.select = P99(tail_of(t.own_select, layer_scale));
  r->p99_cost.gather = P99(tail_of(t.own_gather, layer_scale));
  r->p99_cost.attention = P99(tail_of(t.attention, layer_scale));
  r->p99_cost.rpc = kNaN;  // a difference of two tails is not a tail
  r->p99_cost.tpot = P99(tpot);
  const auto scaled = [&](const std::vector<double>& v) {
    std::vector<double> out(v.size());
    for (size_t s = 0; s < v.size(); ++s) out[s] = v[s] * layer_scale;
    return out;
  };
  r->step_append_ms = scaled(t.append);
  r->step_select_ms = scaled(t.own_select);
  r->step_gather_ms = scaled(t.own_gather);
  r->step_decode_ms = scaled(t.decode);
  r->cost.append = tail(t.append, layer_scale);
  // Select and gather: the measured backend's own time inside its calls
  // (the daemon's, at its calibrated widths, beside its references); RPC:
  // the calls beyond it. The companion's split (in-process, its own
  // calibration) is kept beside it.
  r->cost.select = tail(t.own_select, layer_scale);
  r->cost.gather = tail(t.own_gather, layer_scale);
  r->cost.attention = tail(t.attention, layer_scale);
  r->cost.rpc = Median(decode) - r->cost.select - r->cost.gather;
  r->companion_select_ms = tail(t.select, companion_scale);
  r->companion_gather_ms = tail(t.gather, companion_scale);
  r->cost.tpot = Median(tpot);
  r->decode_ms = Median(decode);
  r->first_layers_ms = tail(t.first, layer_scale);
  r->later_layers_ms = tail(t.later, layer_scale);
  r->prefetched_share =
      t.later_calls > 0 ? static_cast<double>(t.prefetched) / t.later_calls : kNaN;
  std::vector<double> on, off;
  for (int s = 1; s < steps; ++s) (t.prefetch_on[s] ? on : off).push_back(t.later[s] * layer_scale);
  r->later_on_ms = Median(on);
  r->later_off_ms = Median(off);
  double copied = 0, kept = 0;
  for (int s = 1; s < steps; ++s) {
    copied += t.rows_copied[s];
    kept += t.rows_kept[s];
  }
  r->rows_copied_per_token = steps > 1 ? copied * layer_scale / (steps - 1) : kNaN;
  if (ctx.options->in_place_ab && r->policy.in_place) {
    std::vector<double> ip_on, ip_off;
    for (int s = 1; s < steps; ++s) (s % 2 == 1 ? ip_on : ip_off).push_back(t.own_gather[s]);
    r->gather_in_place_ms = Median(ip_on) * layer_scale;
    r->gather_whole_ms = Median(ip_off) * layer_scale;
  }
  r->rows_kept_share = copied + kept > 0 ? kept / (copied + kept) : kNaN;
  r->first_step_s = (t.decode[0] + t.attention[0]) * layer_scale / 1000.0;
  r->tt2t_s = r->prefill_s + r->first_step_s;
  r->message_us = Median(t.message_ms) * 1000.0;
  r->rpc_per_message_us = Median(t.overhead_us);
  r->paired_rpc_per_message_us = Median(t.paired_us);
  r->manager_rest_per_message_us = Median(t.manager_us);
  r->pages_per_head = t.heads ? t.pages / t.heads : 0;
  r->tokens_per_head = t.heads ? t.tokens / t.heads : 0;
  // Quality of the quality layers (DecodeModel::quality_layers), in order.
  double mass = 0, error = 0;
  r->min_layer_mass = 1.0;
  for (int l : ctx.model->quality_layers()) {
    const double c = std::max(1, t.cells[l]);
    r->layer_mass.push_back(t.mass[l] / c);
    r->layer_error.push_back(t.error[l] / c);
    mass += t.mass[l] / c;
    error += t.error[l] / c;
    r->min_layer_mass = std::min(r->min_layer_mass, t.mass[l] / c);
  }
  r->mass = mass / std::max<size_t>(1, r->layer_mass.size());
  r->error = error / std::max<size_t>(1, r->layer_mass.size());
}

}  // namespace

ProgressLine::ProgressLine(bool on, std::string label, int total)
    : on_(on), label_(std::move(label)), total_(std::max(1, total)) {
  Set(0);
}
ProgressLine::~ProgressLine() {
  if (on_) std::fprintf(stderr, "\n");
}
void ProgressLine::Set(int done, const std::string& extra) {
  if (!on_) return;
  constexpr int kWidth = 24;
  const int bar = std::min(kWidth, done * kWidth / total_);
  std::fprintf(stderr, "\r%-28s [%s%s] %d/%d %s   ", label_.c_str(), std::string(bar, '#').c_str(),
               std::string(kWidth - bar, ' ').c_str(), done, total_, extra.c_str());
  std::fflush(stderr);
}

PolicyResult RunCpuPolicy(const DecodeContext& ctx, const DecodePolicy& policy) {
  const DecodeModel& m = *ctx.model;
  const DecodeReference& ref = *ctx.reference;
  PolicyResult r;
  r.policy = policy;
  r.prefill_s = kNaN;
  r.cost = TokenCost{kNaN, kNaN, kNaN, kNaN, 0, 0};
  r.rpc_per_message_us = r.paired_rpc_per_message_us = r.manager_rest_per_message_us = kNaN;
  r.message_us = kNaN;
  Tally t(m.steps(), m.layers());
  if (policy.kind == DecodePolicy::Kind::kFull) {
    for (int s = 0; s < m.steps(); ++s) t.attention[s] = ref.step_ms[s];
    for (int l : m.quality_layers()) t.mass[l] = 1.0, t.cells[l] = 1;
    t.tokens = static_cast<double>(m.tokens());
    t.heads = 1;
  } else {
    // The oracle's tokens, attended like fetched pages: on the quality
    // layers (the model holds their KV), the time scaled to every layer.
    const double scale = static_cast<double>(m.layers()) / m.quality_layers().size();
    const int d = m.head_dim(), g = m.group();
    const size_t row = static_cast<size_t>(d);
    std::vector<const uint16_t*> k_rows, v_rows;
    std::vector<float> out(static_cast<size_t>(g) * d);
    AttentionScratch scratch;
    for (int s = 0; s < m.steps(); ++s) {
      for (int l : m.quality_layers()) {
        for (int h = 0; h < m.kv_heads(); ++h) {
          const std::vector<int32_t>& pos = ref.oracle[ref.Index(s, l, h)];
          const float* q = m.queries(s, l).data() + static_cast<size_t>(h) * g * d;
          const auto t0 = Clock::now();
          k_rows.clear();
          v_rows.clear();
          for (int32_t p : pos) {
            k_rows.push_back(m.keys(l, h) + p * row);
            v_rows.push_back(m.values(l, h) + p * row);
          }
          RowsAttention(k_rows, v_rows, d, q, g, out.data(), &scratch);
          t.attention[s] += MsSince(t0) * scale;
          t.mass[l] += MassRecall(m.keys(l, h), d, pos, q, g, ref.Lse(s, l, h), &scratch);
          t.error[l] += OutputRelError(out.data(), ref.Out(s, l, h), g, d);
          ++t.cells[l];
          t.tokens += static_cast<double>(pos.size());
          ++t.heads;
        }
      }
    }
  }
  Summarize(ctx, t, &r);
  r.cost.append = r.cost.select = r.cost.gather = r.cost.rpc = kNaN;
  r.tt2t_s = kNaN;
  r.rpc_per_message_us = r.paired_rpc_per_message_us = r.manager_rest_per_message_us = kNaN;
  r.companion_select_ms = r.companion_gather_ms = kNaN;
  return r;
}

absl::StatusOr<PolicyResult> RunSelectorPolicy(const DecodeContext& ctx,
                                               const DecodePolicy& policy) {
  const DecodeModel& m = *ctx.model;
  const DecodeBenchOptions& o = *ctx.options;
  DecodeSessionSpec spec;
  spec.layers = m.layers();
  spec.kv_heads = m.kv_heads();
  spec.q_heads = m.q_heads();
  spec.head_dim = m.head_dim();
  spec.page_tokens = o.page_tokens;
  spec.selector = policy.selector;
  spec.layer_reuse = policy.layer_reuse;
  spec.mdci_sketch = o.mdci_sketch;
  spec.mdci_pq = spec.selector == "mdci" ? o.mdci_pq : 0.0f;
  spec.mdci_carry_keep = o.mdci_carry_keep;
  ASSIGN_OR_RETURN(std::string id, ctx.main->CreateSession(spec));
  DecodeSessionSpec cspec = spec;
  cspec.layers = ctx.reference_layers;
  cspec.layer_reuse = std::min(policy.layer_reuse, ctx.reference_layers);
  ASSIGN_OR_RETURN(std::string cid, ctx.companion->CreateSession(cspec));
  PolicyResult r;
  r.policy = policy;
  r.messages_per_token = m.layers();
  // The companion first, its builds waited for: built after the main
  // prefill, it ran (unmeasured) while the daemon finished the main
  // session's background builds, so the first step found them done and TT2T
  // missed their tail.
  // Its prefill-sized staging is held only for its prefill (this process's
  // peak memory); the measured backend keeps its own (the daemon maps it
  // once, as a client that registers its staging buffer once).
  RETURN_IF_ERROR(
      ctx.companion->Reserve(m.AppendBytes(m.prefill_tokens(), ctx.reference_layers), 0));
  RETURN_IF_ERROR(
      Prefill(ctx, *ctx.companion, cid, ctx.reference_layers, ctx.reference_layers, nullptr)
          .status());
  RETURN_IF_ERROR(ctx.companion->ShrinkStaging(m.AppendBytes(1, ctx.reference_layers)));
  // Whole layer groups per call, at least 4 layers (a multiple of the
  // model's generator blocks: DecodeModel::FillAppend).
  const int chunk = std::max(1, 4 / policy.layer_reuse) * policy.layer_reuse;
  {
    ProgressLine bar(o.progress, absl::StrCat(policy.name, " prefill"), m.layers());
    const CpuTimes daemon0 = ctx.main->DaemonCpu();
    const double client0 = ProcessCpuSeconds();
    ASSIGN_OR_RETURN(const double seconds, Prefill(ctx, *ctx.main, id, m.layers(), chunk, &bar));
    r.prefill_s = seconds * ctx.scale;
    const CpuTimes daemon1 = ctx.main->DaemonCpu();
    r.prefill_daemon_cpu_s = (daemon1.total - daemon0.total) * ctx.scale;
    r.prefill_daemon_system_s = (daemon1.system - daemon0.system) * ctx.scale;
    r.prefill_client_cpu_s = (ProcessCpuSeconds() - client0) * ctx.scale;
  }
  Tally t(m.steps(), m.layers());
  {
    ProgressLine bar(o.progress, absl::StrCat(policy.name, " decode"), m.steps());
    const double daemon0 = ctx.main->DaemonCpu().total;
    const auto t0 = Clock::now();
    for (int s = 0; s < m.steps(); ++s) {
      RETURN_IF_ERROR(DecodeOneStep(ctx, policy, id, cid, s, &t));
      bar.Set(s + 1, "steps");
    }
    const double wall_s = std::chrono::duration<double>(Clock::now() - t0).count();
    const double daemon_s = ctx.main->DaemonCpu().total - daemon0;
    r.decode_daemon_cpu_ms = daemon_s * 1000.0 * ctx.scale / std::max(1, m.steps());
    r.decode_wall_s = wall_s;
    r.decode_daemon_cores = CoresOver(daemon_s, wall_s);
  }
  ASSIGN_OR_RETURN(r.monitor, ctx.main->Monitor(id));
  ASSIGN_OR_RETURN(r.companion_monitor, ctx.companion->Monitor(cid));
  RETURN_IF_ERROR(ctx.main->Drop(id));
  RETURN_IF_ERROR(ctx.companion->Drop(cid));
  Summarize(ctx, t, &r);
  return r;
}

}  // namespace icecache::bench
