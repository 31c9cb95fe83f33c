// icecache-demo: prefill + decode against a running icecached (or one it
// spawns with --spawn PATH), verifying that every fetched page is
// byte-identical to what was appended and printing per-step latency and
// attention-mass recall. Exit status 0 only when every check passed.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/client.h"
#include "client/daemon_process.h"
#include "client/output.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "server/index/quality.h"

namespace icecache {
namespace {

const char kUsage[] = R"(usage: icecache-demo [flags]
Runs a synthetic model's prefill and decode loop through icecached.
  --spawn PATH        start the icecached binary at PATH on a temporary socket
                      (stopped again at the end); otherwise connect to
  --socket PATH       a running daemon (default: $ICECACHE_SOCKET / the
                      daemon's default socket)
  --preset NAME       synthetic model preset [llama3-8b-like]
  --layers N          layers to simulate [4]
  --tokens N          context tokens at the end of the run [4096]
  --steps N           decode steps [8]; each appends --append tokens first
  --append N          tokens appended per decode step [16]
  --budget N          selected tokens per KV head [256]
  --page_tokens N     tokens per page [16]
  --selector NAME     mdci | exact-mdci | exact | quest | streaming [mdci]
  --seed N            generator seed [42]
)";

struct DemoFlags {
  std::string spawn;
  std::string socket;
  std::string preset = "llama3-8b-like";
  int layers = 4;
  int64_t tokens = 4096;
  int steps = 8;
  int append = 16;
  int budget = 256;
  int page_tokens = 16;
  std::string selector = "mdci";
  uint64_t seed = 42;
};

absl::StatusOr<DemoFlags> ParseFlags(int argc, char** argv) {
  DemoFlags f;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    std::string v;
    const size_t eq = a.find('=');
    if (eq != std::string::npos) {
      v = a.substr(eq + 1);
      a = a.substr(0, eq);
    } else if (a != "-h" && a != "--help") {
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(a, " needs a value"));
      v = argv[++i];
    }
    auto num = [&](auto* out) -> absl::Status {
      if (!absl::SimpleAtoi(v, out) || *out <= 0) {
        return absl::InvalidArgumentError(absl::StrCat(a, ": '", v, "' is not a positive integer"));
      }
      return absl::OkStatus();
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (a == "--spawn") {
      f.spawn = v;
    } else if (a == "--socket") {
      f.socket = v;
    } else if (a == "--preset") {
      f.preset = v;
    } else if (a == "--selector") {
      f.selector = v;
    } else if (a == "--layers") {
      RETURN_IF_ERROR(num(&f.layers));
    } else if (a == "--tokens") {
      RETURN_IF_ERROR(num(&f.tokens));
    } else if (a == "--steps") {
      RETURN_IF_ERROR(num(&f.steps));
    } else if (a == "--append") {
      RETURN_IF_ERROR(num(&f.append));
    } else if (a == "--budget") {
      RETURN_IF_ERROR(num(&f.budget));
    } else if (a == "--page_tokens") {
      RETURN_IF_ERROR(num(&f.page_tokens));
    } else if (a == "--seed") {
      RETURN_IF_ERROR(num(&f.seed));
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag ", a));
    }
  }
  if (f.tokens <= static_cast<int64_t>(f.steps) * f.append) {
    return absl::InvalidArgumentError("--tokens must exceed --steps x --append (the prefill)");
  }
  return f;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

// The model's KV in fp16, as the client would hold it: [layers][kv][tokens][d].
struct Kv16 {
  int layers, kv_heads, head_dim;
  int64_t tokens;
  std::vector<uint16_t> k, v;
  const uint16_t* krow(int l, int h, int64_t t) const {
    return k.data() + ((static_cast<size_t>(l) * kv_heads + h) * tokens + t) * head_dim;
  }
  const uint16_t* vrow(int l, int h, int64_t t) const {
    return v.data() + ((static_cast<size_t>(l) * kv_heads + h) * tokens + t) * head_dim;
  }
};

// Writes the AppendKv chunk of tokens [begin, end) into `out`.
void FillChunk(const Kv16& kv, int64_t begin, int64_t end, uint8_t* out) {
  const size_t row = static_cast<size_t>(kv.head_dim) * sizeof(uint16_t);
  const size_t n = static_cast<size_t>(end - begin);
  uint8_t* p = out;
  for (int pass = 0; pass < 2; ++pass) {
    for (int l = 0; l < kv.layers; ++l) {
      for (int h = 0; h < kv.kv_heads; ++h) {
        const uint16_t* src = pass == 0 ? kv.krow(l, h, begin) : kv.vrow(l, h, begin);
        std::memcpy(p, src, n * row);
        p += n * row;
      }
    }
  }
}

// Checks every fetched block of one layer against the appended bytes; returns
// the number of pages checked, or an error naming the first mismatch.
absl::StatusOr<int64_t> VerifyLayer(const Kv16& kv, int layer, int64_t tokens,
                                    const StepResult& step, const ShmBuffer& buffer) {
  const FetchLayout& lay = step.layout;
  const size_t row = static_cast<size_t>(kv.head_dim) * sizeof(uint16_t);
  const size_t block = static_cast<size_t>(lay.page_tokens) * row;
  if (lay.page_bytes != 2 * block) {
    return absl::InternalError(absl::StrCat("layout page_bytes ", lay.page_bytes, " != 2 x ", block));
  }
  int64_t pages = 0;
  for (size_t hi = 0; hi < lay.heads.size(); ++hi) {
    const HeadLayout& h = lay.heads[hi];
    const std::vector<int32_t>& pos =
        !h.positions.empty() ? h.positions : step.heads.at(hi).positions;
    size_t cursor = 0;
    for (size_t i = 0; i < h.pages.size(); ++i) {
      const uint8_t* kblk = buffer.data() + h.byte_offsets[i];
      const uint8_t* vblk = kblk + block;
      if (h.byte_offsets[i] + 2 * block > buffer.size()) {
        return absl::InternalError("layout points past the buffer");
      }
      for (uint32_t s = 0; s < lay.page_tokens; ++s) {
        if (s < h.fills[i]) {
          if (cursor >= pos.size()) return absl::InternalError("fewer positions than fills");
          const int32_t p = pos[cursor++];
          if (p < 0 || p >= tokens) {
            return absl::InternalError(absl::StrCat("position ", p, " outside [0, ", tokens, ")"));
          }
          if (std::memcmp(kblk + s * row, kv.krow(layer, h.kv_head, p), row) != 0 ||
              std::memcmp(vblk + s * row, kv.vrow(layer, h.kv_head, p), row) != 0) {
            return absl::DataLossError(absl::StrCat("layer ", layer, " head ", h.kv_head, " page ",
                                                    h.pages[i], " slot ", s, " (position ", p,
                                                    "): fetched bytes differ from appended"));
          }
        } else {
          for (size_t b = 0; b < row; ++b) {
            if (kblk[s * row + b] != 0 || vblk[s * row + b] != 0) {
              return absl::DataLossError(absl::StrCat("layer ", layer, " head ", h.kv_head,
                                                      " page ", h.pages[i], " slot ", s,
                                                      " past fill is not zero"));
            }
          }
        }
      }
      ++pages;
    }
  }
  return pages;
}

absl::Status RunDemo(const DemoFlags& f) {
  std::unique_ptr<DaemonProcess> daemon;
  ClientOptions options;
  options.socket_path = f.socket;
  if (!f.spawn.empty()) {
    DaemonOptions d;
    d.binary = f.spawn;
    ASSIGN_OR_RETURN(daemon, DaemonProcess::Start(d));
    options.socket_path = daemon->socket_path();
    std::cout << "spawned icecached pid " << daemon->pid() << " on " << daemon->socket_path() << "\n";
  }
  ASSIGN_OR_RETURN(auto client, Client::Create(options));
  ASSIGN_OR_RETURN(bool serving, client->Health());
  if (!serving) return absl::UnavailableError("daemon health is NOT_SERVING");

  ASSIGN_OR_RETURN(SyntheticConfig sc, SyntheticPreset(f.preset));
  sc.layers = f.layers;
  sc.tokens = f.tokens;
  sc.steps = f.steps;
  sc.seed = f.seed;
  const absl::Time gen_start = absl::Now();
  ASSIGN_OR_RETURN(KvDump dump, GenerateSynthetic(sc));
  Kv16 kv{dump.layers, dump.kv_heads, dump.head_dim, dump.tokens, {}, {}};
  kv.k.resize(dump.keys.size());
  kv.v.resize(dump.values.size());
  FloatToHalf(dump.keys.data(), kv.k.data(), kv.k.size());
  FloatToHalf(dump.values.data(), kv.v.data(), kv.v.size());
  // What the daemon holds is fp16: judge recall against the same numbers.
  HalfToFloat(kv.k.data(), dump.keys.data(), kv.k.size());
  HalfToFloat(kv.v.data(), dump.values.data(), kv.v.size());
  std::cout << absl::StrFormat(
      "model %s: layers=%d kv_heads=%d q_heads=%d head_dim=%d dtype=float16 tokens=%d "
      "(generated in %.0f ms)\n",
      f.preset, dump.layers, dump.kv_heads, dump.q_heads, dump.head_dim, dump.tokens,
      absl::ToDoubleMilliseconds(absl::Now() - gen_start));

  SessionSpec spec;
  spec.layers = dump.layers;
  spec.kv_heads = dump.kv_heads;
  spec.q_heads = dump.q_heads;
  spec.head_dim = dump.head_dim;
  spec.dtype = DType::kF16;
  spec.page_tokens = f.page_tokens;
  ASSIGN_OR_RETURN(spec.selector, ParseSelectorType(f.selector));
  spec.layer_reuse = 1;
  spec.ttl = absl::Seconds(120);
  ASSIGN_OR_RETURN(SessionInfo session, client->CreateSession(spec));
  std::cout << "session " << session.id << " (tenant " << session.tenant << ", selector "
            << SelectorTypeName(session.spec.selector) << ", page_tokens "
            << session.spec.page_tokens << ")\n";

  const int64_t prefill = f.tokens - static_cast<int64_t>(f.steps) * f.append;
  const uint32_t sink = 4;
  const size_t page_bytes = 2 * static_cast<size_t>(f.page_tokens) * dump.head_dim * 2;
  const size_t fetch_bytes =
      static_cast<size_t>(dump.kv_heads) * (f.budget + sink + f.page_tokens) * page_bytes;
  const size_t kv_bytes = std::max(spec.ChunkBytes(prefill), spec.ChunkBytes(f.append));
  ASSIGN_OR_RETURN(ShmBuffer kv_buf, client->CreateShmBuffer(kv_bytes));
  ASSIGN_OR_RETURN(ShmBuffer out_buf, client->CreateShmBuffer(fetch_bytes));

  absl::Time t0 = absl::Now();
  FillChunk(kv, 0, prefill, kv_buf.data());
  ASSIGN_OR_RETURN(uint64_t have,
                   client->AppendKv(session.id, kv_buf, 0, spec.ChunkBytes(prefill),
                                    static_cast<uint32_t>(prefill)));
  std::cout << absl::StrFormat("prefill: %d tokens, %s through shm in %.1f ms (index built)\n",
                               have, HumanBytes(static_cast<int64_t>(spec.ChunkBytes(prefill))),
                               absl::ToDoubleMilliseconds(absl::Now() - t0));

  SelectOptions sel;
  sel.budget_tokens = static_cast<uint32_t>(f.budget);
  sel.sink_tokens = sink;
  sel.want_positions = true;
  TextTable table({"STEP", "TOKENS", "APPEND_MS", "LAYER_P50_MS", "LAYER_MAX_MS", "MASS_MEAN",
                   "MASS_MIN", "PAGES", "VERIFIED"});
  std::vector<double> all_lat, all_mass;
  int64_t verified_pages = 0;
  int64_t tokens = static_cast<int64_t>(have);
  for (int step = 0; step < f.steps; ++step) {
    t0 = absl::Now();
    FillChunk(kv, tokens, tokens + f.append, kv_buf.data());
    ASSIGN_OR_RETURN(have, client->AppendKv(session.id, kv_buf, 0, spec.ChunkBytes(f.append),
                                            static_cast<uint32_t>(f.append)));
    const double append_ms = absl::ToDoubleMilliseconds(absl::Now() - t0);
    tokens = static_cast<int64_t>(have);
    std::vector<double> lat, mass;
    int64_t pages = 0;
    for (int layer = 0; layer < dump.layers; ++layer) {
      const float* q = dump.query(step, layer, 0);
      const size_t qn = static_cast<size_t>(dump.q_heads) * dump.head_dim;
      t0 = absl::Now();
      ASSIGN_OR_RETURN(StepResult r, client->DecodeStep(session.id, layer, absl::MakeConstSpan(q, qn),
                                                        out_buf.buffer_id(), 0, sel));
      lat.push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
      ASSIGN_OR_RETURN(int64_t checked, VerifyLayer(kv, layer, tokens, r, out_buf));
      pages += checked;
      const int g = dump.group_size();
      for (const HeadSelection& h : r.heads) {
        // Exact attention over the tokens appended so far (rows 0..tokens).
        std::vector<float> keys(static_cast<size_t>(tokens) * dump.head_dim);
        std::memcpy(keys.data(), dump.key(layer, h.kv_head), keys.size() * sizeof(float));
        ASSIGN_OR_RETURN(ExactAttention ex,
                         ComputeExactAttention(keys.data(), nullptr, tokens, dump.head_dim,
                                               dump.query(step, layer, h.kv_head), g));
        ASSIGN_OR_RETURN(double m, MassRecall(ex, h.positions));
        mass.push_back(m);
      }
    }
    verified_pages += pages;
    double mean = 0;
    for (double m : mass) mean += m;
    mean /= std::max<size_t>(1, mass.size());
    table.AddRow({absl::StrCat(step), absl::StrCat(tokens), absl::StrFormat("%.2f", append_ms),
                  absl::StrFormat("%.3f", Percentile(lat, 0.5)),
                  absl::StrFormat("%.3f", *std::max_element(lat.begin(), lat.end())),
                  absl::StrFormat("%.4f", mean),
                  absl::StrFormat("%.4f", *std::min_element(mass.begin(), mass.end())),
                  absl::StrCat(pages), "ok"});
    all_lat.insert(all_lat.end(), lat.begin(), lat.end());
    all_mass.insert(all_mass.end(), mass.begin(), mass.end());
  }
  std::cout << "\n" << table.Render() << "\n";
  double mean = 0;
  for (double m : all_mass) mean += m;
  mean /= std::max<size_t>(1, all_mass.size());
  std::cout << absl::StrFormat(
      "summary: %d steps x %d layers over the Unix socket; DecodeStep per layer p50 %.3f ms, "
      "p99 %.3f ms; attention-mass recall mean %.4f (budget %d of %d tokens); %d fetched pages "
      "byte-identical to what was appended\n",
      f.steps, dump.layers, Percentile(all_lat, 0.5), Percentile(all_lat, 0.99), mean, f.budget,
      tokens, verified_pages);
  RETURN_IF_ERROR(client->DropSession(session.id));
  return absl::OkStatus();
}

}  // namespace
}  // namespace icecache

int main(int argc, char** argv) {
  auto flags = icecache::ParseFlags(argc, argv);
  if (!flags.ok()) {
    std::cerr << "icecache-demo: " << flags.status().message() << "\n" << icecache::kUsage;
    return 2;
  }
  absl::Status s = icecache::RunDemo(*flags);
  if (!s.ok()) {
    std::cerr << "icecache-demo: FAILED: " << s << "\n";
    return 1;
  }
  return 0;
}
