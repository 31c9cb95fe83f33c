// icecache-kvgen: writes a realistic synthetic KV dump (docs/architecture.md).
//
//   icecache-kvgen --preset llama3-8b-like --tokens 131072 --layers 1 --steps 16
//                  --out /tmp/dump [--seed 42] [--dtype float16|float32] [--kv-heads 8]
//
// Exit codes: 0 done, 2 bad flags, 1 generation or I/O failure.
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/cli.h"
#include "common/dtype.h"
#include "common/kv_dump.h"
#include "common/synthetic.h"

namespace {

struct KvgenFlags {
  std::string preset = "llama3-8b-like";
  int64_t tokens = -1;
  int32_t layers = -1;
  int32_t steps = -1;
  std::string out;
  uint64_t seed = 42;
  std::string dtype = "float16";
  int32_t kv_heads = -1;
  int32_t threads = 0;
  bool profile = false;
};

void AddFlags(CLI::App& app, KvgenFlags* f) {
  app.add_option("--preset", f->preset, "synthetic model preset");
  app.add_option("--tokens", f->tokens, "context tokens (-1: the preset's)");
  app.add_option("--layers", f->layers, "layers (-1: the preset's)");
  app.add_option("--steps", f->steps, "decode steps of queries (-1: the preset's)");
  app.add_option("--out", f->out, "output directory (created if missing); required")
      ->type_name("DIR");
  app.add_option("--seed", f->seed, "random seed");
  app.add_option("--dtype", f->dtype, "float16 or float32");
  app.add_option("--kv-heads,--kv_heads", f->kv_heads,
                 "KV heads (-1: the preset's); query heads scale with it to keep the preset's GQA "
                 "ratio");
  app.add_option("--threads", f->threads,
                 "worker threads (0: automatic); the output does not depend on it");
  app.add_flag("--profile", f->profile,
               "also print exact attention statistics of layer 0 (first and last step): sink "
               "mass, top-256 mass and entropy of peaked and flat heads");
}

int Usage(const std::string& msg) {
  std::fprintf(stderr, "icecache-kvgen: %s\n(run icecache-kvgen --help for usage)\n", msg.c_str());
  return icecache::cli::kExitUsage;
}

// The preset with the flags applied; "" or the message of a flag problem.
std::string ApplyFlags(const KvgenFlags& f, icecache::SyntheticConfig* c) {
  if (f.tokens != -1) {
    if (f.tokens < 1) return "--tokens must be >= 1";
    c->tokens = f.tokens;
  }
  if (f.layers != -1) {
    if (f.layers < 1) return "--layers must be >= 1";
    c->layers = f.layers;
  }
  if (f.steps != -1) {
    if (f.steps < 1) return "--steps must be >= 1";
    c->steps = f.steps;
  }
  if (f.kv_heads != -1) {
    if (f.kv_heads < 1) return "--kv-heads must be >= 1";
    const int group = c->q_heads / c->kv_heads;
    c->kv_heads = f.kv_heads;
    c->q_heads = c->kv_heads * group;
  }
  if (f.threads < 0) return "--threads must be >= 0";
  c->threads = f.threads;
  c->seed = f.seed;
  if (c->sink_tokens >= c->tokens) c->sink_tokens = static_cast<int>(c->tokens - 1);
  if (c->needles > c->tokens - c->sink_tokens) {
    c->needles = static_cast<int>(c->tokens - c->sink_tokens);
  }
  return "";
}

void PrintProfile(const icecache::KvDump& dump, const icecache::SyntheticTruth& truth,
                  const icecache::SyntheticConfig& c) {
  for (int step : {0, dump.steps - 1}) {
    double sink[2] = {0, 0}, top[2] = {0, 0}, ent[2] = {0, 0}, max_logit[2] = {0, 0};
    int n[2] = {0, 0};
    for (int qh = 0; qh < dump.q_heads; ++qh) {
      auto p = icecache::ProfileAttention(dump, step, 0, qh, c.sink_tokens, 256);
      if (!p.ok()) continue;
      const int kind = truth.peaked[qh] ? 1 : 0;
      sink[kind] += p->sink_mass;
      top[kind] += p->topk_mass;
      ent[kind] += p->entropy;
      max_logit[kind] += p->max_logit;
      ++n[kind];
    }
    for (int kind : {1, 0}) {
      if (n[kind] == 0) continue;
      std::printf(
          "  layer 0 step %d %s heads (%d): sink mass %.3f, top-256 mass %.3f, entropy %.2f nats, "
          "max logit %.1f\n",
          step, kind ? "peaked" : "flat", n[kind], sink[kind] / n[kind], top[kind] / n[kind],
          ent[kind] / n[kind], max_logit[kind] / n[kind]);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app(
      "Writes a synthetic KV dump: icecache-kvgen --preset P --tokens N --layers L --steps S "
      "--out DIR [--seed X] [--dtype float16|float32] [--kv-heads H]",
      "icecache-kvgen");
  icecache::cli::Configure(app);
  KvgenFlags f;
  AddFlags(app, &f);
  if (auto code = icecache::cli::Parse(app, argc, argv)) return *code;
  auto preset = icecache::SyntheticPreset(f.preset);
  if (!preset.ok()) return Usage(std::string(preset.status().message()));
  icecache::SyntheticConfig c = *preset;
  if (f.out.empty()) return Usage("--out DIR is required");
  auto dtype = icecache::ParseDType(f.dtype);
  if (!dtype.ok() || (*dtype != icecache::DType::kF16 && *dtype != icecache::DType::kF32)) {
    return Usage("--dtype must be float16 or float32, got '" + f.dtype + "'");
  }
  if (const std::string bad = ApplyFlags(f, &c); !bad.empty()) return Usage(bad);

  const auto t0 = std::chrono::steady_clock::now();
  icecache::SyntheticTruth truth;
  auto dump = icecache::GenerateSynthetic(c, &truth);
  if (!dump.ok()) {
    // A config out of range is a flag problem; anything else (memory) is not.
    if (dump.status().code() == absl::StatusCode::kInvalidArgument) {
      return Usage(std::string(dump.status().message()));
    }
    std::fprintf(stderr, "icecache-kvgen: %s\n", dump.status().ToString().c_str());
    return 1;
  }
  const auto t1 = std::chrono::steady_clock::now();
  dump->model = "synthetic:" + f.preset;
  const std::string& out = f.out;
  absl::Status s = icecache::WriteKvDump(*dump, out, *dtype);
  if (!s.ok()) {
    std::fprintf(stderr, "icecache-kvgen: writing %s: %s\n", out.c_str(), s.ToString().c_str());
    return 1;
  }
  const auto t2 = std::chrono::steady_clock::now();
  const double bytes = static_cast<double>(dump->keys.size() * 2 + dump->queries.size()) *
                       static_cast<double>(icecache::DTypeSize(*dtype));
  std::printf(
      "icecache-kvgen: %s keys/values [%d, %d, %lld, %d] queries [%d, %d, %d, %d] %s, %.1f MiB, "
      "generated in %.2f s, written in %.2f s to %s\n",
      f.preset.c_str(), dump->layers, dump->kv_heads, static_cast<long long>(dump->tokens),
      dump->head_dim, dump->steps, dump->layers, dump->q_heads, dump->head_dim,
      std::string(icecache::DTypeName(*dtype)).c_str(), bytes / (1024.0 * 1024.0),
      std::chrono::duration<double>(t1 - t0).count(),
      std::chrono::duration<double>(t2 - t1).count(), out.c_str());
  if (f.profile) PrintProfile(*dump, truth, c);
  return 0;
}
