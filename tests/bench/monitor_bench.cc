#include "tests/bench/monitor_bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "server/session/session_manager.h"

namespace icecache::bench {
namespace {

struct RunResult {
  bool monitor = false;
  double select_p50_us = 0, select_mean_us = 0;
  SessionQualityInfo quality;
  QualitySamplerStats sampler;
  std::vector<int> last_change_step;  // per head; -1 = never changed
};

// AppendKv bytes (fp16) of tokens [first, first + n) of every head.
std::vector<uint8_t> Chunk(const KvDump& d, int64_t first, int64_t n) {
  const size_t row = static_cast<size_t>(d.head_dim);
  std::vector<uint8_t> out(2 * static_cast<size_t>(d.kv_heads) * n * row * 2);
  uint8_t* p = out.data();
  for (int kv = 0; kv < 2; ++kv) {
    for (int h = 0; h < d.kv_heads; ++h) {
      const float* src = (kv == 0 ? d.key(0, h) : d.value(0, h)) + first * row;
      FromFloat(DType::kF16, src, p, n * row);
      p += n * row * 2;
    }
  }
  return out;
}

struct Core {
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<BufferRegistry> buffers;
  std::unique_ptr<SessionManager> manager;
};

absl::StatusOr<Core> MakeCore(const MonitorBenchOptions& o, const KvDump& d, bool monitor) {
  Core core;
  PagePoolOptions po;
  // fp16 K+V per token and head, pages rounded up, twice over for slack.
  po.capacity_bytes =
      2 * static_cast<uint64_t>(d.tokens) * d.kv_heads * d.head_dim * 4 + (uint64_t{256} << 20);
  po.use_huge_pages = false;
  ASSIGN_OR_RETURN(core.pool, PagePool::Create(po));
  ASSIGN_OR_RETURN(core.buffers, BufferRegistry::Create(BufferRegistryOptions{}));
  SessionManagerOptions mo;
  mo.pool = core.pool.get();
  mo.buffers = core.buffers.get();
  mo.reaper_interval = absl::ZeroDuration();
  mo.max_ttl = absl::Hours(24);
  mo.default_ttl = absl::Hours(1);
  mo.decode_threads = 1;  // one thread: the select time is CPU time
  mo.build_threads = 2;
  mo.quality.enabled = monitor;
  mo.quality.sample_every = o.sample_every;
  mo.quality.warmup_samples = o.warmup;
  mo.quality.sampler.cpu_share = o.cpu_share;
  mo.quality.sampler.burst = absl::Milliseconds(o.burst_ms);
  ASSIGN_OR_RETURN(core.manager, SessionManager::Create(mo));
  return core;
}

SessionConfig SessionOf(const MonitorBenchOptions& o, const KvDump& d) {
  SessionConfig sc;
  sc.layers = 1;
  sc.kv_heads = d.kv_heads;
  sc.q_heads = d.q_heads;
  sc.head_dim = d.head_dim;
  sc.dtype = DType::kF16;
  sc.page_tokens = o.page_tokens;
  sc.selector = SelectorKind::kMdci;
  sc.target_mass_ratio = o.target;
  sc.default_select.budget_tokens = o.budget;
  return sc;
}

// The decode loop: append one token, select; the select is timed.
absl::StatusOr<RunResult> Run(const MonitorBenchOptions& o, const KvDump& d, bool monitor) {
  ASSIGN_OR_RETURN(Core core, MakeCore(o, d, monitor));
  const Caller caller{"bench", 0, false};
  ASSIGN_OR_RETURN(SessionInfo info, core.manager->CreateSession(caller, SessionOf(o, d)));
  const int64_t prefill = d.tokens - o.steps;
  RETURN_IF_ERROR(core.manager->AppendKv(caller, info.id, prefill, Chunk(d, 0, prefill)).status());
  RunResult r;
  r.monitor = monitor;
  r.last_change_step.assign(d.kv_heads, -1);
  std::vector<double> widths(d.kv_heads, 1.0);
  std::vector<double> us;
  SelectRequest req;
  for (int step = 0; step < o.steps; ++step) {
    RETURN_IF_ERROR(
        core.manager->AppendKv(caller, info.id, 1, Chunk(d, prefill + step, 1)).status());
    const float* q = d.query(step, 0, 0);
    req.queries.assign(q, q + static_cast<size_t>(d.q_heads) * d.head_dim);
    const auto t0 = std::chrono::steady_clock::now();
    RETURN_IF_ERROR(core.manager->SelectPages(caller, info.id, req).status());
    us.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    if (!monitor) continue;
    ASSIGN_OR_RETURN(SessionInfo now, core.manager->GetSession(caller, info.id));
    for (const HeadQualityInfo& h : now.quality.heads) {
      if (h.width != widths[h.kv_head]) r.last_change_step[h.kv_head] = step;
      widths[h.kv_head] = h.width;
    }
  }
  core.manager->WaitForQualitySamples();
  ASSIGN_OR_RETURN(SessionInfo done, core.manager->GetSession(caller, info.id));
  r.quality = done.quality;
  r.sampler = core.manager->QualityStats();
  std::vector<double> sorted = us;
  std::sort(sorted.begin(), sorted.end());
  r.select_p50_us = sorted[sorted.size() / 2];
  for (double v : us) r.select_mean_us += v / us.size();
  return r;
}

double Share(const SessionQualityInfo& q) {
  return q.selection_ns > 0 ? static_cast<double>(q.calibration_cpu_ns) / q.selection_ns : 0.0;
}

void PrintTable(const MonitorBenchOptions& o, const KvDump& d, const RunResult& off,
                const RunResult& on) {
  std::printf(
      "icecache-bench monitor: %s/%s, %lld tokens + %d decode steps, %d KV heads x G=%d, "
      "head_dim %d, budget %d, page %d, target %.3f, cpu_share %.3f, sample 1/%d after "
      "%d\n\n",
      o.preset.c_str(), o.family.c_str(), static_cast<long long>(d.tokens - o.steps), o.steps,
      d.kv_heads, d.group_size(), d.head_dim, o.budget, o.page_tokens, o.target, o.cpu_share,
      o.sample_every, o.warmup);
  std::printf("%-8s %14s %15s %16s %12s %9s %8s %6s %10s %12s %6s\n", "monitor", "select_p50_us",
              "select_mean_us", "measure_cpu_ms", "share_of_sel", "measured", "dropped", "stale",
              "mean_ratio", "recent_ratio", "topk");
  for (const RunResult* r : {&off, &on}) {
    const SessionQualityInfo& q = r->quality;
    std::printf("%-8s %14.1f %15.1f %16.1f %11.2f%% %9lld %8lld %6lld %10.4f %12.4f %6.3f\n",
                r->monitor ? "on" : "off", r->select_p50_us, r->select_mean_us,
                q.calibration_cpu_ns / 1e6, 100 * Share(q), static_cast<long long>(q.samples),
                static_cast<long long>(q.samples_dropped), static_cast<long long>(q.samples_stale),
                q.mean_mass_ratio, q.recent_mass_ratio, q.mean_topk_recall);
  }
  std::printf("\nselect p50 on/off: %.3f\n\n", on.select_p50_us / off.select_p50_us);
  std::printf("%-5s %7s %5s %6s %8s %8s %16s %12s\n", "head", "width", "fov", "cand", "changes",
              "samples", "last_change_step", "recent_ratio");
  for (const HeadQualityInfo& h : on.quality.heads) {
    std::printf("%-5d %7.2f %5d %6.1f %8lld %8lld %16d %12.4f\n", h.kv_head, h.width,
                h.field_of_view, h.candidate_factor, static_cast<long long>(h.width_changes),
                static_cast<long long>(h.samples), on.last_change_step[h.kv_head],
                h.recent_mass_ratio);
  }
}

Json RunJson(const RunResult& r) {
  const SessionQualityInfo& q = r.quality;
  Json j = {{"monitor", r.monitor},
            {"select_p50_us", r.select_p50_us},
            {"select_mean_us", r.select_mean_us},
            {"measure_cpu_ms", q.calibration_cpu_ns / 1e6},
            {"selection_ms", q.selection_ns / 1e6},
            {"share_of_selection", Share(q)},
            {"measured", q.samples},
            {"dropped", q.samples_dropped},
            {"stale", q.samples_stale},
            {"mean_mass_ratio", q.mean_mass_ratio},
            {"recent_mass_ratio", q.recent_mass_ratio},
            {"mean_topk_recall", q.mean_topk_recall}};
  Json heads = Json::array();
  for (const HeadQualityInfo& h : q.heads) {
    heads.push_back({{"kv_head", h.kv_head},
                     {"width", h.width},
                     {"field_of_view", h.field_of_view},
                     {"candidate_factor", h.candidate_factor},
                     {"width_changes", h.width_changes},
                     {"samples", h.samples},
                     {"last_change_step", r.last_change_step[h.kv_head]},
                     {"recent_mass_ratio", h.recent_mass_ratio}});
  }
  j["heads"] = std::move(heads);
  return j;
}

}  // namespace

void AddMonitorFlags(CLI::App* app, MonitorBenchOptions* o) {
  app->add_option("--preset", o->preset, "generator preset")->capture_default_str();
  app->add_option("--family", o->family, "generator family (icecache-bench select --families)")
      ->capture_default_str();
  app->add_option("--tokens", o->tokens, "prefill tokens")->capture_default_str();
  app->add_option("--kv-heads", o->kv_heads, "KV heads (one layer)")->capture_default_str();
  app->add_option("--steps", o->steps, "decode steps (append one token, select)")
      ->capture_default_str();
  app->add_option("--budget", o->budget, "budget tokens")->capture_default_str();
  app->add_option("--page-tokens", o->page_tokens, "tokens per page")->capture_default_str();
  app->add_option("--target", o->target, "target_mass_ratio (0 = fixed width)")
      ->capture_default_str();
  app->add_option("--cpu-share", o->cpu_share, "quality.cpu_share")->capture_default_str();
  app->add_option("--sample-every", o->sample_every, "quality.sample_every")->capture_default_str();
  app->add_option("--warmup", o->warmup, "quality.warmup_samples")->capture_default_str();
  app->add_option("--burst-ms", o->burst_ms, "quality.burst_ms")->capture_default_str();
  app->add_option("--seed", o->seed, "generator seed")->capture_default_str();
  app->add_flag("--json", o->json, "print JSON instead of the table");
}

absl::Status RunMonitorBench(const MonitorBenchOptions& o) {
  if (o.tokens < 1024 || o.steps < 1 || o.kv_heads < 1 || o.budget < 1) {
    return absl::InvalidArgumentError(
        "--tokens must be >= 1024, --steps, --kv-heads and --budget >= 1");
  }
  ASSIGN_OR_RETURN(SyntheticConfig c, SyntheticPreset(o.preset));
  RETURN_IF_ERROR(ApplySyntheticFamily(o.family, &c));
  const int group = c.q_heads / c.kv_heads;
  c.layers = 1;
  c.kv_heads = o.kv_heads;
  c.q_heads = o.kv_heads * group;
  c.tokens = o.tokens + o.steps;
  c.steps = o.steps;
  c.seed = o.seed;
  ASSIGN_OR_RETURN(KvDump d, GenerateSynthetic(c));
  ASSIGN_OR_RETURN(RunResult off, Run(o, d, false));
  ASSIGN_OR_RETURN(RunResult on, Run(o, d, true));
  if (o.json) {
    Json j = {{"preset", o.preset},
              {"family", o.family},
              {"tokens", o.tokens},
              {"steps", o.steps},
              {"kv_heads", o.kv_heads},
              {"budget", o.budget},
              {"target", o.target},
              {"cpu_share", o.cpu_share},
              {"sample_every", o.sample_every},
              {"warmup", o.warmup},
              {"runs", Json::array({RunJson(off), RunJson(on)})}};
    std::printf("%s\n", DumpJson(j, 2).c_str());
  } else {
    PrintTable(o, d, off, on);
  }
  return absl::OkStatus();
}

}  // namespace icecache::bench
