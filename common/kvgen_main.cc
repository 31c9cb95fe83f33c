// icecache-kvgen: writes a realistic synthetic KV dump (DESIGN.md section 10).
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

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "common/dtype.h"
#include "common/kv_dump.h"
#include "common/synthetic.h"

ABSL_FLAG(std::string, preset, "llama3-8b-like", "synthetic model preset");
ABSL_FLAG(int64_t, tokens, -1, "context tokens (-1: the preset's)");
ABSL_FLAG(int32_t, layers, -1, "layers (-1: the preset's)");
ABSL_FLAG(int32_t, steps, -1, "decode steps of queries (-1: the preset's)");
ABSL_FLAG(std::string, out, "", "output directory (created if missing); required");
ABSL_FLAG(uint64_t, seed, 42, "random seed");
ABSL_FLAG(std::string, dtype, "float16", "float16 or float32");
ABSL_FLAG(int32_t, kv_heads, -1,
          "KV heads (-1: the preset's); query heads scale with it to keep the preset's GQA ratio");
ABSL_FLAG(int32_t, threads, 0, "worker threads (0: automatic); the output does not depend on it");
ABSL_FLAG(bool, profile, false,
          "also print exact attention statistics of layer 0 (first and last step): sink mass, "
          "top-256 mass "
          "and entropy of peaked and flat heads");

namespace {

int Usage(const std::string& msg) {
  std::fprintf(stderr, "icecache-kvgen: %s\n(see --help)\n", msg.c_str());
  return 2;
}

// absl's parser exits with status 1 on an unknown flag or a bad value; this
// tool promises 2 for every flag problem, so flags are checked here first.
// Also accepts --kv-heads for --kv_heads (dashes in names become underscores).
// Returns an error message, or "" when the command line is fine.
std::string PrecheckFlags(int argc, char** argv, std::vector<std::string>* normalised) {
  struct Known {
    const char* name;
    char type;  // 's' string, 'i' signed, 'u' unsigned, 'b' bool-like (no value needed)
  };
  static const Known kKnown[] = {
      {"preset", 's'}, {"tokens", 'i'},   {"layers", 'i'},    {"steps", 'i'},   {"out", 's'},
      {"seed", 'u'},   {"dtype", 's'},    {"kv_heads", 'i'},  {"threads", 'i'}, {"profile", 'b'},
      {"help", 'b'},   {"helpfull", 'b'}, {"helpshort", 'b'}, {"version", 'b'}};
  normalised->assign(argv, argv + argc);
  for (int i = 1; i < argc; ++i) {
    std::string& arg = (*normalised)[i];
    if (arg == "--") break;
    if (arg.size() < 2 || arg[0] != '-') continue;
    const size_t start = arg[1] == '-' ? 2 : 1;
    const size_t eq = arg.find('=');
    std::string name = arg.substr(start, eq == std::string::npos ? std::string::npos : eq - start);
    for (char& ch : name) ch = ch == '-' ? '_' : ch;
    arg = "--" + name + (eq == std::string::npos ? "" : arg.substr(eq));
    const Known* k = nullptr;
    for (const Known& kn : kKnown) {
      if (name == kn.name) k = &kn;
    }
    if (k == nullptr) return "unknown flag --" + name;
    if (k->type == 'b') continue;
    std::string value;
    if (eq != std::string::npos) {
      value = arg.substr(arg.find('=') + 1);
    } else {
      if (i + 1 >= argc) return "flag --" + name + " needs a value";
      value = (*normalised)[++i];
    }
    if (k->type == 'i') {
      int64_t v;
      if (!absl::SimpleAtoi(value, &v))
        return "--" + name + " must be an integer, got '" + value + "'";
      if (name != "tokens" && (v < INT32_MIN || v > INT32_MAX))
        return "--" + name + " is out of range";
    } else if (k->type == 'u') {
      uint64_t v;
      if (!absl::SimpleAtoi(value, &v))
        return "--" + name + " must be a non-negative integer, got '" + value + "'";
    }
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
  absl::SetProgramUsageMessage(
      "writes a synthetic KV dump: icecache-kvgen --preset P --tokens N --layers L --steps S --out "
      "DIR "
      "[--seed X] [--dtype float16|float32] [--kv-heads H]");
  std::vector<std::string> args;
  const std::string bad = PrecheckFlags(argc, argv, &args);
  if (!bad.empty()) return Usage(bad);
  std::vector<char*> cargs;
  for (std::string& a : args) cargs.push_back(a.data());
  std::vector<char*> rest = absl::ParseCommandLine(static_cast<int>(cargs.size()), cargs.data());
  if (rest.size() > 1) {
    std::vector<std::string> extra(rest.begin() + 1, rest.end());
    return Usage("unexpected arguments: " + absl::StrJoin(extra, " "));
  }
  auto preset = icecache::SyntheticPreset(absl::GetFlag(FLAGS_preset));
  if (!preset.ok()) return Usage(std::string(preset.status().message()));
  icecache::SyntheticConfig c = *preset;
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) return Usage("--out DIR is required");
  auto dtype = icecache::ParseDType(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok() || (*dtype != icecache::DType::kF16 && *dtype != icecache::DType::kF32)) {
    return Usage("--dtype must be float16 or float32, got '" + absl::GetFlag(FLAGS_dtype) + "'");
  }
  if (absl::GetFlag(FLAGS_tokens) != -1) {
    if (absl::GetFlag(FLAGS_tokens) < 1) return Usage("--tokens must be >= 1");
    c.tokens = absl::GetFlag(FLAGS_tokens);
  }
  if (absl::GetFlag(FLAGS_layers) != -1) {
    if (absl::GetFlag(FLAGS_layers) < 1) return Usage("--layers must be >= 1");
    c.layers = absl::GetFlag(FLAGS_layers);
  }
  if (absl::GetFlag(FLAGS_steps) != -1) {
    if (absl::GetFlag(FLAGS_steps) < 1) return Usage("--steps must be >= 1");
    c.steps = absl::GetFlag(FLAGS_steps);
  }
  if (absl::GetFlag(FLAGS_kv_heads) != -1) {
    if (absl::GetFlag(FLAGS_kv_heads) < 1) return Usage("--kv-heads must be >= 1");
    const int group = c.q_heads / c.kv_heads;
    c.kv_heads = absl::GetFlag(FLAGS_kv_heads);
    c.q_heads = c.kv_heads * group;
  }
  if (absl::GetFlag(FLAGS_threads) < 0) return Usage("--threads must be >= 0");
  c.threads = absl::GetFlag(FLAGS_threads);
  c.seed = absl::GetFlag(FLAGS_seed);
  if (c.sink_tokens >= c.tokens) c.sink_tokens = static_cast<int>(c.tokens - 1);
  if (c.needles > c.tokens - c.sink_tokens) c.needles = static_cast<int>(c.tokens - c.sink_tokens);

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
  dump->model = "synthetic:" + absl::GetFlag(FLAGS_preset);
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
      absl::GetFlag(FLAGS_preset).c_str(), dump->layers, dump->kv_heads,
      static_cast<long long>(dump->tokens), dump->head_dim, dump->steps, dump->layers,
      dump->q_heads, dump->head_dim, std::string(icecache::DTypeName(*dtype)).c_str(),
      bytes / (1024.0 * 1024.0), std::chrono::duration<double>(t1 - t0).count(),
      std::chrono::duration<double>(t2 - t1).count(), out.c_str());
  if (absl::GetFlag(FLAGS_profile)) PrintProfile(*dump, truth, c);
  return 0;
}
