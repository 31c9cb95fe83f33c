// Batched decode in `icecache-bench decode --batch`: B sessions holding the
// same prefill decode one token each per step, one request per layer for
// all of them (DecodeStep's batch), against batch 1 (one session, plain
// DecodeStep). Aggregate throughput = B tokens per step time. Timing
// starts only once every session's trees are built and every session has
// decoded some warm-up steps (as the largest batch), so no batch size pays
// for another session's background builds or first self-calibration.
#include <algorithm>
#include <chrono>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "tests/bench/decode_policy_run.h"
#include "tests/bench/process_cpu.h"

namespace icecache::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Steps of the largest batch before any timing: the sessions' self-calibration
// (architecture §5.1) settles in a few dozen sampled steps.
constexpr int kWarmupSteps = 24;

double MsSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// One token of the first `b` sessions: every layer, one request each.
absl::Status BatchStep(const DecodeContext& ctx, const DecodePolicy& p,
                       const std::vector<std::string>& ids, int b, int layers, int step) {
  const DecodeBenchOptions& o = *ctx.options;
  for (int l = 0; l < layers; ++l) {
    DecodeSelect sel;
    sel.budget_tokens = o.budget;
    sel.sink_tokens = o.sink_tokens;
    sel.recent_tokens = o.recent_tokens;
    sel.reuse_group_selection = l % p.layer_reuse != 0;
    const absl::Span<const float> q =
        sel.reuse_group_selection ? absl::Span<const float>() : ctx.model->queries(step, l);
    if (b == 1) {
      RETURN_IF_ERROR(ctx.main->DecodeStep(ids[0], l, q, 0, sel).status());
      continue;
    }
    std::vector<BatchItem> items(b);
    for (int i = 0; i < b; ++i) {
      items[i].session_id = ids[i];
      items[i].queries = q;
      items[i].out_offset = static_cast<uint64_t>(i) * ctx.layer_output_bytes;
    }
    RETURN_IF_ERROR(ctx.main->DecodeBatch(l, items, sel));
  }
  return absl::OkStatus();
}

// Waits until every session's index trees are built (background builds).
absl::Status AwaitTrees(DecodeBackend& b, const std::vector<std::string>& ids) {
  for (const std::string& id : ids) {
    for (int tries = 0;; ++tries) {
      ASSIGN_OR_RETURN(auto trees, b.Trees(id));
      if (trees.first >= trees.second) break;
      if (tries > 60000) {
        return absl::DeadlineExceededError(
            absl::StrCat("batch sweep: session ", id, "'s index builds did not finish in 10 min"));
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<BatchResult>> RunBatches(const DecodeContext& ctx, int layers) {
  const DecodeBenchOptions& o = *ctx.options;
  ASSIGN_OR_RETURN(DecodePolicy p, ParseDecodePolicy(o.batch_policy));
  if (p.kind != DecodePolicy::Kind::kSelector) {
    return absl::InvalidArgumentError(
        absl::StrCat("--batch-policy ", o.batch_policy, ": batches need a selector policy"));
  }
  const int bmax = *std::max_element(o.batch.begin(), o.batch.end());
  DecodeSessionSpec spec;
  spec.layers = layers;
  spec.kv_heads = ctx.model->kv_heads();
  spec.q_heads = ctx.model->q_heads();
  spec.head_dim = ctx.model->head_dim();
  spec.page_tokens = o.page_tokens;
  spec.selector = p.selector;
  spec.layer_reuse = std::min(p.layer_reuse, layers);
  p.layer_reuse = spec.layer_reuse;
  std::vector<std::string> ids;
  {
    ProgressLine bar(o.progress, absl::StrCat("batch ", o.batch_policy, " prefill"), bmax);
    for (int i = 0; i < bmax; ++i) {
      ASSIGN_OR_RETURN(std::string id, ctx.main->CreateSession(spec));
      const int64_t n = ctx.model->prefill_tokens();
      RETURN_IF_ERROR(ctx.model->FillAppend(0, n, 0, layers, ctx.main->staging()));
      RETURN_IF_ERROR(ctx.main->Append(id, n, 0, 0));
      ids.push_back(id);
      bar.Set(i + 1, "sessions");
    }
  }
  RETURN_IF_ERROR(AwaitTrees(*ctx.main, ids));
  const int warmup = std::min(ctx.model->steps(), kWarmupSteps);
  for (int s = 0; s < warmup; ++s) RETURN_IF_ERROR(BatchStep(ctx, p, ids, bmax, layers, s));
  std::vector<BatchResult> out;
  ProgressLine bar(o.progress, absl::StrCat("batch ", o.batch_policy, " decode"),
                   static_cast<int>(o.batch.size()));
  for (int b : o.batch) {
    RETURN_IF_ERROR(BatchStep(ctx, p, ids, b, layers, 0));  // warm-up
    std::vector<double> ms;
    const double daemon0 = ctx.main->DaemonCpu().total;
    for (int s = 0; s < ctx.model->steps(); ++s) {
      const auto t0 = Clock::now();
      RETURN_IF_ERROR(BatchStep(ctx, p, ids, b, layers, s));
      ms.push_back(MsSince(t0));
    }
    BatchResult r;
    double wall_ms = 0;
    for (double x : ms) wall_ms += x;
    r.wall_ms = wall_ms;
    r.daemon_cores = CoresOver(ctx.main->DaemonCpu().total - daemon0, wall_ms / 1000.0);
    std::sort(ms.begin(), ms.end());
    r.batch = b;
    r.step_ms = ms[ms.size() / 2] * o.layers / layers;
    r.tokens_per_s = b / (r.step_ms / 1000.0);
    r.speedup = out.empty() ? 1.0 : r.tokens_per_s / out.front().tokens_per_s;
    out.push_back(r);
    bar.Set(static_cast<int>(out.size()), absl::StrCat("batch sizes"));
  }
  for (const std::string& id : ids) RETURN_IF_ERROR(ctx.main->Drop(id));
  return out;
}

}  // namespace icecache::bench
