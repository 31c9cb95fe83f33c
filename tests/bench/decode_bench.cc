#include "tests/bench/decode_bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <string_view>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "tests/bench/decode_policy_run.h"
#include "tests/bench/decode_rpc_overhead.h"
#include "tests/bench/machine_info.h"

namespace icecache::bench {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// fp16 K and V bytes of one layer at `tokens`.
double LayerBytes(int kv_heads, int head_dim, int64_t tokens) {
  return 2.0 * kv_heads * static_cast<double>(tokens) * head_dim * 2.0;
}

int MaxReuse(const std::vector<DecodePolicy>& policies) {
  int r = 1;
  for (const DecodePolicy& p : policies) r = std::max(r, p.layer_reuse);
  return r;
}

// Layers a context runs with: all of them when the daemon's copy fits the
// budget next to this process's companion, quality layers and one prefill
// chunk (the model keeps no other layer: decode_model.h), else fewer (a
// multiple of the largest layer reuse).
int LayersFor(const DecodeBenchOptions& o, int kv_heads, int head_dim, int64_t tokens, int reuse) {
  const double layer = LayerBytes(kv_heads, head_dim, tokens);
  const double fixed =
      (o.reference_layers + std::min(o.quality_layers, o.layers) + std::max(4, reuse)) * layer;
  const double room = o.memory_gib * kGiB - fixed;
  int layers = std::min<int>(o.layers, static_cast<int>(std::max(0.0, room / layer)));
  layers -= layers % reuse;
  return std::max(layers, std::min(o.layers, std::max(reuse, o.reference_layers)));
}

// Pool bytes of the largest session (page slack and index overhead
// included generously): the arena is mapped once, untouched until used.
uint64_t PoolBytes(const DecodeBenchOptions& o, int kv_heads, int head_dim) {
  double most = 0;
  for (int64_t t : o.contexts) {
    const int layers = LayersFor(o, kv_heads, head_dim, t, 4);
    const int bmax = *std::max_element(o.batch.begin(), o.batch.end());
    const double batch = bmax > 1 ? bmax * std::min(layers, o.batch_layers) : 0;
    most = std::max(most, std::max<double>(layers, batch) * LayerBytes(kv_heads, head_dim, t));
  }
  // A prefaulted pool is touched whole: the KV (whole pages: a page per head
  // more for the decode steps' tokens, 2% covers it) and a little room, no
  // more. Untouched, a generous arena costs nothing.
  if (o.daemon_prefault) return static_cast<uint64_t>(most * 1.02) + (uint64_t{64} << 20);
  return static_cast<uint64_t>(most * 1.5) + (uint64_t{512} << 20);
}

size_t InPlaceRegionBytes(const DecodeBenchOptions& o, const DecodeModel& m) {
  const int pt = o.page_tokens;
  const int64_t slots = (o.budget + o.sink_tokens + o.recent_tokens + pt - 1) / pt + 1;
  return static_cast<size_t>(slots) * m.kv_heads() * 2 * pt * m.head_dim() * sizeof(uint16_t);
}

bool AnyInPlace(const std::vector<DecodePolicy>& policies) {
  return std::any_of(policies.begin(), policies.end(),
                     [](const DecodePolicy& p) { return p.in_place; });
}

size_t LayerOutputBytes(const DecodeBenchOptions& o, const DecodeModel& m) {
  const int pt = o.page_tokens;
  const int64_t pages = std::min<int64_t>((m.tokens() + pt - 1) / pt + 1,
                                          o.budget + (o.sink_tokens + o.recent_tokens) / pt + 4);
  return static_cast<size_t>(pages) * m.kv_heads() * 2 * pt * m.head_dim() * sizeof(uint16_t);
}

absl::StatusOr<ContextResult> RunContext(const DecodeBenchOptions& o,
                                         const std::vector<DecodePolicy>& policies, int64_t tokens,
                                         DecodeBackend& main, DecodeBackend& companion) {
  ASSIGN_OR_RETURN(SyntheticConfig shape, SyntheticPreset(o.preset));
  ContextResult c;
  c.tokens = tokens;
  c.layers = LayersFor(o, shape.kv_heads, shape.head_dim, tokens, MaxReuse(policies));
  c.scale = static_cast<double>(o.layers) / c.layers;
  DecodeModelOptions mo;
  mo.preset = o.preset;
  mo.layers = c.layers;
  mo.tokens = tokens;
  mo.steps = o.steps;
  mo.seed = o.seed;
  mo.block_layers = std::min(4, c.layers);
  mo.quality_layers = o.quality_layers;
  std::unique_ptr<DecodeModel> model;
  {
    ProgressLine bar(o.progress, absl::StrCat("generate ", tokens, " tokens"), c.layers);
    const auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(model, DecodeModel::Generate(mo, [&](int done) { bar.Set(done, "layers"); }));
    c.generate_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  c.quality_layers = model->quality_layers();
  // Held, the prefill is a second copy of the daemon's KV in this process
  // (next to what LayersFor counts).
  const double layer = LayerBytes(shape.kv_heads, shape.head_dim, tokens);
  const double held_room = (o.reference_layers + std::min(o.quality_layers, o.layers) +
                            std::max(4, MaxReuse(policies)) + 2 * c.layers) *
                           layer;
  if (o.hold_prefill == "on" || (o.hold_prefill == "auto" && held_room <= o.memory_gib * kGiB)) {
    ProgressLine bar(o.progress, "hold the prefill", c.layers);
    RETURN_IF_ERROR(model->HoldPrefill([&](int done) { bar.Set(done, "layers"); }));
    c.prefill_held = true;
    c.hold_s = model->hold_seconds();
  }
  DecodeReference ref;
  {
    ProgressLine bar(o.progress, "full attention (reference)", o.steps);
    ref = ComputeReference(*model, o.budget, o.sink_tokens, [&](int s) { bar.Set(s, "steps"); });
  }
  DecodeContext ctx;
  ctx.options = &o;
  ctx.model = model.get();
  ctx.reference = &ref;
  ctx.main = &main;
  ctx.companion = &companion;
  ctx.reference_layers = std::min(o.reference_layers, c.layers);
  ctx.scale = c.scale;
  ctx.layer_output_bytes = LayerOutputBytes(o, *model);
  ctx.in_place_region_bytes = InPlaceRegionBytes(o, *model);
  const int bmax = *std::max_element(o.batch.begin(), o.batch.end());
  // A group's layers land side by side (where a prefetch writes them); with
  // "+ip" every layer has its own region, kept between steps.
  const size_t in_place_bytes =
      AnyInPlace(policies)
          ? ctx.in_place_region_bytes * c.layers + ctx.layer_output_bytes * MaxReuse(policies)
          : 0;
  RETURN_IF_ERROR(main.Reserve(
      model->AppendBytes(model->prefill_tokens(), 4),
      std::max(in_place_bytes, ctx.layer_output_bytes * std::max(bmax, MaxReuse(policies)))));
  RETURN_IF_ERROR(companion.Reserve(
      model->AppendBytes(model->prefill_tokens(), ctx.reference_layers), ctx.layer_output_bytes));
  for (const DecodePolicy& p : policies) {
    if (p.kind != DecodePolicy::Kind::kSelector) {
      c.policies.push_back(RunCpuPolicy(ctx, p));
      continue;
    }
    absl::StatusOr<PolicyResult> r = RunSelectorPolicy(ctx, p);
    if (!r.ok()) {
      return absl::Status(r.status().code(), absl::StrCat("policy ", p.name, " at ", tokens,
                                                          " tokens: ", r.status().message()));
    }
    c.policies.push_back(*std::move(r));
  }
  std::vector<double> full = ref.step_ms;
  std::sort(full.begin(), full.end());
  c.full_attention_ms = full[full.size() / 2] * c.scale;
  if (bmax > 1) {
    c.batch_policy = o.batch_policy;
    c.batch_layers = std::min(c.layers, o.batch_layers);
    ASSIGN_OR_RETURN(c.batches, RunBatches(ctx, c.batch_layers));
  }
  c.regenerate_s = model->generate_seconds();
  return c;
}

}  // namespace

absl::StatusOr<DecodePolicy> ParseDecodePolicy(const std::string& name) {
  DecodePolicy p;
  p.name = name;
  if (name == "full") {
    p.kind = DecodePolicy::Kind::kFull;
    return p;
  }
  if (name == "exact-token") {
    p.kind = DecodePolicy::Kind::kExactToken;
    return p;
  }
  std::string base = name;
  const auto strip = [&base](std::string_view suffix) {
    if (base.size() <= suffix.size() ||
        base.compare(base.size() - suffix.size(), suffix.size(), suffix) != 0) {
      return false;
    }
    base.resize(base.size() - suffix.size());
    return true;
  };
  // "+pf" and "+ip", in either order.
  for (bool more = true; more;) {
    more = false;
    if (!p.in_place && strip("+ip")) more = p.in_place = true;
    if (!p.prefetch && strip("+pf")) more = p.prefetch = true;
  }
  p.selector = base;
  const size_t dash = base.rfind("-r");
  if (dash != std::string::npos && dash + 2 < base.size() &&
      base.find_first_not_of("0123456789", dash + 2) == std::string::npos) {
    int r = 0;
    if (!absl::SimpleAtoi(base.substr(dash + 2), &r) || r < 1 || r > 64) {
      return absl::InvalidArgumentError(
          absl::StrCat("policy '", name, "': layer reuse -r<k> needs k in 1..64"));
    }
    p.selector = base.substr(0, dash);
    p.layer_reuse = r;
  }
  if (p.prefetch && p.layer_reuse < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "policy '", name, "': +pf (layer-group prefetch) needs layer reuse -r<k> with k >= 2"));
  }
  if (p.selector.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("policy '", name, "': no selector name"));
  }
  return p;
}

namespace {

// The 1-minute load average (the machine is shared: it says how far the
// times are inflated); -1 when unreadable.
double LoadAverage() {
  absl::StatusOr<std::string> text = ReadFileToString("/proc/loadavg");
  double load = -1;
  if (text.ok()) std::sscanf(text->c_str(), "%lf", &load);
  return load;
}

}  // namespace

absl::Status RunDecodeBench(const DecodeBenchOptions& o) {
  if (o.rpc_overhead) return RunRpcOverhead(o);
  const double load_start = LoadAverage();
  std::printf("icecache-bench decode: %s shape, %d layers, contexts", o.preset.c_str(), o.layers);
  for (int64_t t : o.contexts) std::printf(" %lld", static_cast<long long>(t));
  std::printf(
      "; budget %d tokens per KV head (sink %d, recent %d), page %d; %d decode steps; "
      "load average %.1f at start%s\nmachine: %s\n",
      o.budget, o.sink_tokens, o.recent_tokens, o.page_tokens, o.steps, load_start,
      o.mdci_pq > 0
          ? absl::StrFormat("; mdci: the PQ scan (pq_factor %g) and the method duel", o.mdci_pq)
                .c_str()
          : "",
      MachineLine().c_str());
  std::vector<DecodePolicy> policies;
  for (const std::string& name : o.policies) {
    ASSIGN_OR_RETURN(DecodePolicy p, ParseDecodePolicy(name));
    if (p.layer_reuse > 1 && o.reference_layers % p.layer_reuse != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("policy ", name, ": --reference-layers (", o.reference_layers,
                       ") must be a multiple of its layer reuse ", p.layer_reuse));
    }
    policies.push_back(p);
  }
  ASSIGN_OR_RETURN(SyntheticConfig shape, SyntheticPreset(o.preset));
  const uint64_t pool = PoolBytes(o, shape.kv_heads, shape.head_dim);
  std::unique_ptr<DecodeBackend> main;
  if (o.mode == "socket") {
    if (o.daemon_prefault && o.spawn.empty()) {
      return absl::InvalidArgumentError("--daemon-prefault is for a daemon it starts (--spawn)");
    }
    if (!o.daemon_config.empty() && o.spawn.empty()) {
      return absl::InvalidArgumentError("--daemon-config is for a daemon it starts (--spawn)");
    }
    // A held prefill is streamed with up to three chunks of 4 layers in the
    // daemon at once (one building, one queued, one being copied in): the
    // staging it faults in at start holds them (pool.staging_reserve_bytes).
    const int64_t longest_context = *std::max_element(o.contexts.begin(), o.contexts.end());
    const uint64_t reserve = std::min<uint64_t>(
        pool / 2,
        static_cast<uint64_t>(3 * 4 * LayerBytes(shape.kv_heads, shape.head_dim, longest_context)));
    ASSIGN_OR_RETURN(
        main,
        MakeSocketBackend(
            o.spawn, o.socket, pool,
            absl::StrCat(
                o.daemon_prefault
                    ? absl::StrCat("pool { prefault: true staging_reserve_bytes: ", reserve, " }\n")
                    : "",
                o.daemon_config, "\n"),
            RingSpin(o)));
  } else {
    ASSIGN_OR_RETURN(main, MakeInProcessBackend(pool, /*quality=*/true));
  }
  const int64_t longest = *std::max_element(o.contexts.begin(), o.contexts.end());
  const uint64_t companion_pool =
      static_cast<uint64_t>(1.5 * o.reference_layers *
                            LayerBytes(shape.kv_heads, shape.head_dim, longest)) +
      (uint64_t{256} << 20);
  ASSIGN_OR_RETURN(std::unique_ptr<DecodeBackend> companion,
                   MakeInProcessBackend(companion_pool, o.companion_quality));
  std::vector<ContextResult> results;
  for (int64_t tokens : o.contexts) {
    ASSIGN_OR_RETURN(ContextResult c, RunContext(o, policies, tokens, *main, *companion));
    PrintContext(o, c);
    results.push_back(std::move(c));
  }
  if (!o.plot.empty()) RETURN_IF_ERROR(WriteFileAtomically(o.plot, DecodePlotSvg(o, results)));
  const double load_end = LoadAverage();
  std::printf("load average %.1f at the end\n", load_end);
  if (!o.json.empty()) {
    Json report = DecodeReportJson(o, results);
    report["machine"]["loadavg_start"] = load_start;
    report["machine"]["loadavg_end"] = load_end;
    RETURN_IF_ERROR(WriteFileAtomically(o.json, DumpJson(report, 1) + "\n"));
  }
  return absl::OkStatus();
}

}  // namespace icecache::bench
