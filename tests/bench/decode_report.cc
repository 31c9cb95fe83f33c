// The views of `icecache-bench decode`'s figures: the table a person reads,
// the JSON report (decode_results.h).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/output.h"
#include "server/index/kernels.h"
#include "server/index/pq_sketch.h"
#include "tests/bench/decode_results.h"
#include "tests/bench/machine_info.h"

namespace icecache::bench {
namespace {

// `f` is checked against the argument at compile time where the compiler
// can (clang), so it must be a literal.
std::string Fmt(const absl::FormatSpec<double>& f, double v) {
  return std::isfinite(v) ? absl::StrFormat(f, v) : std::string("-");
}

// JSON null for NaN (no figure), the number otherwise.
Json Num(double v) { return std::isfinite(v) ? Json(v) : Json(nullptr); }

std::string Where(const DecodeBenchOptions& o) {
  if (o.mode != "socket") return "in-process (the core library, no RPC)";
  return o.spawn.empty() ? "socket (a running icecached)" : "socket (icecached spawned)";
}

Json CostJson(const TokenCost& c) {
  return {{"tpot", Num(c.tpot)},     {"append", Num(c.append)}, {"select", Num(c.select)},
          {"gather", Num(c.gather)}, {"rpc", Num(c.rpc)},       {"attention", Num(c.attention)}};
}

Json MonitorJson(const MonitorSummary& m) {
  return {{"monitored", m.monitored},
          {"samples", m.samples},
          {"dropped", m.dropped},
          {"selection_ms", m.selection_ms},
          {"reference_cpu_ms", m.reference_cpu_ms},
          {"widths", m.widths},
          {"head_samples", m.head_samples},
          {"exact_heads", m.exact_heads},
          {"exact_selections", m.exact_selections},
          {"mean_mass_ratio", m.mean_mass_ratio},
          {"seeded_heads", m.seeded_heads},
          {"pooled_heads", m.pooled_heads},
          {"pool_width", m.pool_width},
          {"carrying_heads", m.carrying_heads},
          {"carry_stopped_heads", m.carry_stopped_heads},
          {"carried_selections", m.carried_selections},
          {"carry_stopped", m.carry_stopped},
          {"carry_pool_steps", m.carry_pool_steps},
          {"carry_shortened", m.carry_shortened}};
}

// The steps (after the first) whose selection took longest, per policy:
// where SELECT's tail comes from (every step's figures are in the JSON).
void PrintSlowestSelects(const ContextResult& c) {
  std::printf(
      "slowest SELECT steps (step: ms per token; the JSON's per_step_ms has every step):\n");
  for (const PolicyResult& p : c.policies) {
    std::vector<size_t> order;
    for (size_t s = 1; s < p.step_select_ms.size(); ++s) order.push_back(s);
    const size_t keep = std::min<size_t>(5, order.size());
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), [&](size_t a, size_t b) {
      return p.step_select_ms[a] > p.step_select_ms[b];
    });
    std::string line;
    for (size_t i = 0; i < keep; ++i) {
      absl::StrAppend(&line, " ", order[i], ": ", Fmt("%.1f", p.step_select_ms[order[i]]));
    }
    std::printf("  %-10s%s\n", p.policy.name.c_str(), line.c_str());
  }
}

Json PolicyJson(const PolicyResult& p) {
  return {{"policy", p.policy.name},
          {"selector", p.policy.selector},
          {"layer_reuse", p.policy.layer_reuse},
          {"tt2t_s", Num(p.tt2t_s)},
          {"prefill_s", Num(p.prefill_s)},
          {"first_step_s", Num(p.first_step_s)},
          {"per_token_ms", CostJson(p.cost)},
          {"per_token_ms_mean", CostJson(p.mean_cost)},
          {"per_token_ms_p99", CostJson(p.p99_cost)},
          {"per_step_ms",
           {{"append", p.step_append_ms},
            {"select", p.step_select_ms},
            {"gather", p.step_gather_ms},
            {"decode_steps", p.step_decode_ms}}},
          {"decode_step_message_us_p50", Num(p.message_us)},
          {"rpc_per_message_us_p50", Num(p.rpc_per_message_us)},
          {"paired_rpc_per_message_us_p50", Num(p.paired_rpc_per_message_us)},
          {"manager_rest_per_message_us_p50", Num(p.manager_rest_per_message_us)},
          {"companion_select_ms_per_token", Num(p.companion_select_ms)},
          {"companion_gather_ms_per_token", Num(p.companion_gather_ms)},
          {"messages_per_token", p.messages_per_token},
          {"pages_per_head", p.pages_per_head},
          {"tokens_per_head", p.tokens_per_head},
          {"mass_recall", p.mass},
          {"min_layer_mass_recall", p.min_layer_mass},
          {"output_rel_error", p.error},
          {"layer_mass_recall", p.layer_mass},
          {"prefill_daemon_cpu_s", Num(p.prefill_daemon_cpu_s)},
          {"prefill_daemon_system_s", Num(p.prefill_daemon_system_s)},
          {"prefill_client_cpu_s", Num(p.prefill_client_cpu_s)},
          {"decode_daemon_cpu_ms_per_token", Num(p.decode_daemon_cpu_ms)},
          {"decode_wall_s", p.decode_wall_s},
          {"decode_daemon_cores", Num(p.decode_daemon_cores)},
          {"layer_output_rel_error", p.layer_error},
          {"prefetch", p.policy.prefetch},
          {"in_place", p.policy.in_place},
          {"token_rows_copied_per_token", Num(p.rows_copied_per_token)},
          {"token_rows_kept_share", Num(p.rows_kept_share)},
          {"gather_ms_in_place_steps", Num(p.gather_in_place_ms)},
          {"gather_ms_whole_steps", Num(p.gather_whole_ms)},
          {"decode_steps_ms_per_token", Num(p.decode_ms)},
          {"first_layers_ms_per_token", Num(p.first_layers_ms)},
          {"later_layers_ms_per_token", Num(p.later_layers_ms)},
          {"later_layers_prefetched_share", Num(p.prefetched_share)},
          {"later_layers_ms_prefetch_on_steps", Num(p.later_on_ms)},
          {"later_layers_ms_prefetch_off_steps", Num(p.later_off_ms)},
          {"quality_monitor", MonitorJson(p.monitor)},
          {"companion_quality_monitor", MonitorJson(p.companion_monitor)}};
}

// A quality monitor's state after the steps, one line: the widths the
// calibrator settled on per (group, head), the exact fallbacks, the samples
// and the references' CPU against the selections'.
std::string MonitorLine(const MonitorSummary& m) {
  if (!m.monitored) return "not monitored (fixed width)";
  std::vector<double> w = m.widths;
  std::sort(w.begin(), w.end());
  const double share = m.selection_ms > 0 ? 100.0 * m.reference_cpu_ms / m.selection_ms : 0.0;
  // How the samples spread over the heads (at model scale the budget reaches
  // few of them): heads with one at least, and min / median / max per head.
  std::vector<int64_t> n = m.head_samples;
  std::sort(n.begin(), n.end());
  const int64_t sampled = std::count_if(n.begin(), n.end(), [](int64_t k) { return k > 0; });
  const std::string spread =
      n.empty() ? std::string()
                : absl::StrFormat(" on %lld of %d heads (%lld / %lld / %lld per head)",
                                  static_cast<long long>(sampled), static_cast<int>(n.size()),
                                  static_cast<long long>(n.front()),
                                  static_cast<long long>(n[n.size() / 2]),
                                  static_cast<long long>(n.back()));
  return absl::StrFormat(
      "width x%s..x%s (median x%s) over %d heads%s%s, %d exact (%lld exact selections); %lld "
      "samples%s (%lld dropped), mean ratio %.3f; references %.0f ms CPU = %.0f%% of the "
      "selections' %.0f ms; carry-over: %d of %d heads carry, %d stopped at least once, %lld "
      "selections carried%s",
      w.empty() ? "-" : absl::StrFormat("%.2g", w.front()),
      w.empty() ? "-" : absl::StrFormat("%.2g", w.back()),
      w.empty() ? "-" : absl::StrFormat("%.2g", w[w.size() / 2]), static_cast<int>(w.size()),
      m.seeded_heads > 0 ? absl::StrFormat(" (%d seeded from an earlier session)", m.seeded_heads)
                         : std::string(),
      m.pool_width > 0 ? absl::StrFormat(" (%d started from the session's pooled width, now x%.2g)",
                                         m.pooled_heads, m.pool_width)
                       : std::string(),
      m.exact_heads, static_cast<long long>(m.exact_selections), static_cast<long long>(m.samples),
      spread, static_cast<long long>(m.dropped), m.mean_mass_ratio, m.reference_cpu_ms, share,
      m.selection_ms, m.carrying_heads, static_cast<int>(w.size()), m.carry_stopped_heads,
      static_cast<long long>(m.carried_selections),
      m.carry_stopped ? " (the session's pooled judgement has it stopped)"
      : m.carry_pool_steps > 0
          ? absl::StrFormat(" (the pooled judgement allows %d step%s, shortened %lldx)",
                            m.carry_pool_steps, m.carry_pool_steps == 1 ? "" : "s",
                            static_cast<long long>(m.carry_shortened))
          : "");
}

// Where the prefill's and the steps' wall time went, for a spawned daemon
// (nothing where no policy has the figures).
void PrintDaemonCpu(const ContextResult& c) {
  bool any = false;
  for (const PolicyResult& p : c.policies) any = any || std::isfinite(p.prefill_daemon_cpu_s);
  if (!any) return;
  std::printf(
      "CPU time (the spawned daemon's user + system, /proc; this process's beside it; cores = "
      "CPU / wall):\n");
  for (const PolicyResult& p : c.policies) {
    if (!std::isfinite(p.prefill_daemon_cpu_s)) continue;
    std::printf(
        "  %-10s prefill: daemon %s s (%s of it system; %s cores), this process %s s; decode "
        "steps: daemon %s ms per token (%s cores)\n",
        p.policy.name.c_str(), Fmt("%.2f", p.prefill_daemon_cpu_s).c_str(),
        Fmt("%.2f", p.prefill_daemon_system_s).c_str(),
        Fmt("%.2f", p.prefill_daemon_cpu_s / p.prefill_s).c_str(),
        Fmt("%.2f", p.prefill_client_cpu_s).c_str(), Fmt("%.1f", p.decode_daemon_cpu_ms).c_str(),
        Fmt("%.2f", p.decode_daemon_cores).c_str());
  }
}

void PrintMonitors(const ContextResult& c) {
  bool any = false;
  for (const PolicyResult& p : c.policies) any |= std::isfinite(p.companion_select_ms);
  if (any) {
    std::printf(
        "the in-process companion's split (its first layers, scaled; its own calibration; "
        "PAIRED_US/MSG: the measured call over the companion's, the RPC figure before sel8; "
        "MANAGER_US/MSG: of RPC_US/MSG, the daemon's session manager beyond select + gather):\n");
    for (const PolicyResult& p : c.policies) {
      if (!std::isfinite(p.companion_select_ms)) continue;
      std::printf("  %-10s SELECT %s  GATHER %s  PAIRED_US/MSG %s  MANAGER_US/MSG %s\n",
                  p.policy.name.c_str(), Fmt("%.2f", p.companion_select_ms).c_str(),
                  Fmt("%.2f", p.companion_gather_ms).c_str(),
                  Fmt("%.0f", p.paired_rpc_per_message_us).c_str(),
                  Fmt("%.0f", p.manager_rest_per_message_us).c_str());
    }
  }
  any = false;
  for (const PolicyResult& p : c.policies) any |= p.monitor.monitored;
  if (!any) return;
  std::printf(
      "quality monitors after the decode steps (selection_ms: the session's selections, per "
      "head summed, wall; references: the sampler's exact scans, thread CPU):\n");
  for (const PolicyResult& p : c.policies) {
    if (!p.monitor.monitored && !p.companion_monitor.monitored) continue;
    std::printf("  %-10s measured: %s\n  %-10s companion: %s\n", p.policy.name.c_str(),
                MonitorLine(p.monitor).c_str(), "", MonitorLine(p.companion_monitor).c_str());
  }
}

// The layer-group split of the policies with layer reuse, each "+pf" policy
// beside its twin without prefetch (same run, same data).
void PrintPrefetch(const ContextResult& c) {
  TextTable t({"POLICY", "DECODE_MS", "FIRST_LAYERS", "LATER_LAYERS", "LATER_PF_OFF", "LATER_PF_ON",
               "ON/OFF", "PREFETCHED", "PF_ON/TWIN"});
  bool any = false;
  auto ratio = [](double on, double off) {
    if (!std::isfinite(on) || !std::isfinite(off) || off <= 0) return std::string("-");
    return absl::StrFormat("%.2fx (%.0f%% hidden)", on / off, 100.0 * (1.0 - on / off));
  };
  for (const PolicyResult& p : c.policies) {
    if (p.policy.layer_reuse < 2 || !std::isfinite(p.decode_ms)) continue;
    any = true;
    std::string twin = "-";
    for (const PolicyResult& q : c.policies) {
      if (p.policy.prefetch && !q.policy.prefetch && q.policy.selector == p.policy.selector &&
          q.policy.layer_reuse == p.policy.layer_reuse) {
        twin = ratio(p.later_on_ms, q.later_layers_ms);
      }
    }
    const bool pf = p.policy.prefetch;
    t.AddRow({p.policy.name, Fmt("%.2f", p.decode_ms), Fmt("%.2f", p.first_layers_ms),
              Fmt("%.2f", p.later_layers_ms),
              pf && std::isfinite(p.later_off_ms) ? Fmt("%.2f", p.later_off_ms) : "-",
              pf ? Fmt("%.2f", p.later_on_ms) : "-",
              pf ? ratio(p.later_on_ms, p.later_off_ms) : "-",
              pf ? Fmt("%.0f%%", 100.0 * p.prefetched_share) : "-", twin});
  }
  if (!any) return;
  std::printf(
      "layer groups (select + gather + RPC per token, ms: the DecodeStep calls of the groups' "
      "first layers and of their later layers; +pf policies ask for the later layers to be "
      "written in the background after the first layer's selection, on every step, or with "
      "--prefetch-ab on odd steps only: then LATER_PF_OFF / LATER_PF_ON are the later layers' "
      "medians over the even / odd steps of the same session, interleaved; PREFETCHED = "
      "later-layer calls of the prefetching steps that found their layer written; PF_ON/TWIN = "
      "LATER_PF_ON against the policy without +pf, run before or after it):\n%s",
      t.Render().c_str());
}

}  // namespace

// The "+ip" policies: how many token rows each step wrote and kept in place,
// beside the same policy without it (GATHER in the table above).
void PrintInPlace(const ContextResult& c) {
  bool any = false;
  for (const PolicyResult& p : c.policies) any |= p.policy.in_place;
  if (!any) return;
  std::printf(
      "in-place writes (+ip: each layer's region kept between steps; only the rows of tokens "
      "not written there at the previous step are copied; rows per token of the model, steps "
      "after the first):\n");
  for (const PolicyResult& p : c.policies) {
    if (!std::isfinite(p.rows_kept_share)) continue;  // no token rows (pages)
    std::printf("  %-14s rows copied %s, kept in place %s, GATHER %s ms", p.policy.name.c_str(),
                Fmt("%.0f", p.rows_copied_per_token).c_str(),
                Fmt("%.1f%%", 100.0 * p.rows_kept_share).c_str(),
                Fmt("%.2f", p.cost.gather).c_str());
    if (std::isfinite(p.gather_in_place_ms)) {
      std::printf(" (--in-place-ab: in-place steps %s ms, whole steps %s ms, %s)",
                  Fmt("%.2f", p.gather_in_place_ms).c_str(), Fmt("%.2f", p.gather_whole_ms).c_str(),
                  Fmt("%.2fx", p.gather_whole_ms / p.gather_in_place_ms).c_str());
    }
    std::printf("\n");
  }
}

void PrintContext(const DecodeBenchOptions& o, const ContextResult& c) {
  const std::string prefill =
      c.prefill_held
          ? absl::StrFormat("prefill generated in %.0f s and held: streamed pipelined", c.hold_s)
          : absl::StrFormat("prefill regenerated while streamed in %.0f s: chunks serial",
                            c.regenerate_s);
  std::printf(
      "\n== %lld tokens, %d layers run (generated in %.0f s, %s): per-token figures for %d "
      "layers%s, ms (medians over %d decode steps after the first); quality of layers %s ==\n",
      static_cast<long long>(c.tokens), c.layers, c.generate_s, prefill.c_str(), o.layers,
      c.scale > 1.0 ? absl::StrFormat(" (SCALED x%.1f from %d layers)", c.scale, c.layers).c_str()
                    : "",
      o.steps - 1,
      c.quality_layers.size() == static_cast<size_t>(c.layers)
          ? "all"
          : absl::StrJoin(c.quality_layers, ",").c_str());
  TextTable t({"POLICY", "TT2T_S", "PREFILL_S", "TPOT_MS", "APPEND", "SELECT", "GATHER", "RPC",
               "ATTN*", "RPC_US/MSG", "MASS", "MIN_LAYER", "OUT_ERR"});
  for (const PolicyResult& p : c.policies) {
    t.AddRow({p.policy.name, Fmt("%.2f", p.tt2t_s), Fmt("%.2f", p.prefill_s),
              Fmt("%.1f", p.cost.tpot), Fmt("%.2f", p.cost.append), Fmt("%.2f", p.cost.select),
              Fmt("%.2f", p.cost.gather), Fmt("%.2f", p.cost.rpc), Fmt("%.1f", p.cost.attention),
              Fmt("%.0f", p.rpc_per_message_us), Fmt("%.3f", p.mass), Fmt("%.3f", p.min_layer_mass),
              Fmt("%.3f", p.error)});
  }
  // The paper's figures beside ours (Llama-3.1-8B at 36k tokens on an H100
  // with 64 CPU threads; the paper gives no split beyond DCI selection).
  t.AddRow({"paper: IceCache", "7.6", "-", "110", "-", "50", "-", "-", "-", "-", "-", "-", "-"});
  t.AddRow({"paper: IceCache(r)", "5.9", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-"});
  std::printf("%s", t.Render().c_str());
  std::printf(
      "ATTN* = attention on the CPU from the fetched pages (fp32 accumulation, 1 thread): the "
      "stand-in for the GPU's. TT2T = prefill (KV ingest + index builds; no model compute) + "
      "the first decode step. SELECT, GATHER = the daemon's own time in its DecodeStep calls "
      "(kv.proto select_ns, gather_ns); RPC = the calls beyond it; RPC_US/MSG = median per "
      "layer message of the call beyond the daemon's select + gather.\n");
  std::printf("means over the same steps (the throughput's; the table gives medians):\n");
  for (const PolicyResult& p : c.policies) {
    std::printf("  %-10s TPOT %s  APPEND %s  SELECT %s  GATHER %s  RPC %s\n", p.policy.name.c_str(),
                Fmt("%.1f", p.mean_cost.tpot).c_str(), Fmt("%.2f", p.mean_cost.append).c_str(),
                Fmt("%.2f", p.mean_cost.select).c_str(), Fmt("%.2f", p.mean_cost.gather).c_str(),
                Fmt("%.2f", p.mean_cost.rpc).c_str());
  }
  std::printf("99th percentiles over the same steps (each figure's own):\n");
  for (const PolicyResult& p : c.policies) {
    std::printf("  %-10s TPOT %s  APPEND %s  SELECT %s  GATHER %s\n", p.policy.name.c_str(),
                Fmt("%.1f", p.p99_cost.tpot).c_str(), Fmt("%.2f", p.p99_cost.append).c_str(),
                Fmt("%.2f", p.p99_cost.select).c_str(), Fmt("%.2f", p.p99_cost.gather).c_str());
  }
  PrintSlowestSelects(c);
  PrintDaemonCpu(c);
  PrintMonitors(c);
  PrintPrefetch(c);
  PrintInPlace(c);
  if (!c.batches.empty()) {
    TextTable b({"BATCH", "STEP_MS", "TOKENS_PER_S", "VS_BATCH_1", "DAEMON_CORES"});
    for (const BatchResult& r : c.batches) {
      b.AddRow({absl::StrCat(r.batch), Fmt("%.1f", r.step_ms), Fmt("%.1f", r.tokens_per_s),
                Fmt("%.2fx", r.speedup), Fmt("%.2f", r.daemon_cores)});
    }
    std::printf(
        "batched decode (%s, %d layers per session, scaled to %d; select + gather + RPC, "
        "no attention; DAEMON_CORES: the spawned daemon's CPU time over the steps' wall, of "
        "%u cores):\n%s",
        c.batch_policy.c_str(), c.batch_layers, o.layers, std::thread::hardware_concurrency(),
        b.Render().c_str());
  }
  std::printf(
      "paper rows: Llama-3.1-8B at 36k tokens on an H100 + 64 CPU threads (TPOT 110 ms of which "
      "DCI selection 50 ms; TT2T 7.6 s, 5.9 s with layer reuse). Here: %u cores, %s.\n",
      std::thread::hardware_concurrency(), Where(o).c_str());
  std::fflush(stdout);
}

Json DecodeReportJson(const DecodeBenchOptions& o, const std::vector<ContextResult>& contexts) {
  Json report = Json::object();
  report["benchmark"] = "decode";
  report["machine"] = {{"cpu_model", CpuModel()},
                       {"cores", std::thread::hardware_concurrency()},
                       {"l2_size", L2Size()},
                       {"l3_size", L3Size()},
                       {"kernel_isa", KernelIsa()},
                       {"pq_scan_kernel", PqSketch::ScanKernel()},
                       {"git_commit", BuildCommit().empty() ? "unknown" : BuildCommit()}};
  const std::string head = HeadCommitNow();
  if (!head.empty() && head != BuildCommit()) report["machine"]["git_head_at_run"] = head;
  report["config"] = {{"mode", o.mode},
                      {"where", Where(o)},
                      {"preset", o.preset},
                      {"seed", o.seed},
                      {"layers", o.layers},
                      {"steps", o.steps},
                      {"budget_tokens", o.budget},
                      {"sink_tokens", o.sink_tokens},
                      {"recent_tokens", o.recent_tokens},
                      {"page_tokens", o.page_tokens},
                      {"reference_layers", o.reference_layers},
                      {"quality_layers", o.quality_layers},
                      {"daemon_prefault", o.daemon_prefault},
                      {"hold_prefill", o.hold_prefill},
                      {"daemon_config", o.daemon_config},
                      {"companion_quality", o.companion_quality},
                      {"in_place_ab", o.in_place_ab},
                      {"prefetch_ab", o.prefetch_ab},
                      {"mdci_pq_factor", o.mdci_pq},
                      {"mdci_carry_keep_factor", o.mdci_carry_keep},
                      {"policies", o.policies},
                      {"batch", o.batch},
                      {"batch_policy", o.batch_policy}};
  report["units"] = {
      {"per_token_ms",
       "ms per generated token over all layers of the model (scaled when the "
       "context ran with fewer layers); medians over the steps after the first"},
      {"attention", "CPU stand-in for the GPU: fp32 accumulation over the fetched fp16 pages"},
      {"tt2t_s",
       "prefill (KV ingest + index builds, no model compute; each chunk's builds waited for "
       "before the next chunk is generated) + first decode step"},
      {"layer_mass_recall",
       "per quality layer (contexts[].quality_layers), mean over steps "
       "and KV heads"}};
  report["contexts"] = Json::array();
  for (const ContextResult& c : contexts) {
    Json policies = Json::array();
    for (const PolicyResult& p : c.policies) policies.push_back(PolicyJson(p));
    Json batches = Json::array();
    for (const BatchResult& b : c.batches) {
      batches.push_back({{"batch", b.batch},
                         {"step_ms", b.step_ms},
                         {"tokens_per_s", b.tokens_per_s},
                         {"vs_batch_1", b.speedup},
                         {"daemon_cores", Num(b.daemon_cores)},
                         {"wall_ms", b.wall_ms}});
    }
    report["contexts"].push_back({{"tokens", c.tokens},
                                  {"layers_run", c.layers},
                                  {"scaled", c.scale > 1.0},
                                  {"scale", c.scale},
                                  {"generate_s", c.generate_s},
                                  {"regenerate_s", c.regenerate_s},
                                  {"prefill_held", c.prefill_held},
                                  {"hold_s", c.hold_s},
                                  {"quality_layers", c.quality_layers},
                                  {"full_attention_ms", c.full_attention_ms},
                                  {"policies", std::move(policies)},
                                  {"batch_policy", c.batch_policy},
                                  {"batch_layers", c.batch_layers},
                                  {"batches", std::move(batches)}});
  }
  return report;
}

}  // namespace icecache::bench
