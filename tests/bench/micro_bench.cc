// Google Benchmark micro-benchmarks of the selection hot paths:
//  - fp16 / bf16 / fp32 dot products (DotF16, DotRows, DotRowsMulti);
//  - projection of a query on the m x L DCI directions (a dense fp32
//    DotRows over the augmented dimension, as the tree does per level);
//  - page scoring (PageMassScore of one page's logits for G queries);
//  - tree walk: Prioritized DCI queries, and whole selections per head
//    (BM_Select_<Kind>/<tokens>) on the realistic synthetic generator.
// Figures are printed, never asserted. Run:
//   build-bench/tests/bench/icecache-microbench --benchmark_filter=Select
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "server/index/dci_prioritized.h"
#include "server/index/kernels.h"
#include "server/index/owned_page_keys.h"
#include "server/index/page_select.h"
#include "server/index/pq_sketch.h"
#include "server/index/query_basis.h"
#include "server/index/selector.h"
#include "server/index/top_scores.h"
#include "server/transfer/gather.h"

namespace icecache {
namespace {

std::vector<float> RandomFloats(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

constexpr int kDim = 128;

// One fp16 row dot product (the innermost kernel).
void BM_DotF16(benchmark::State& state) {
  const int dim = static_cast<int>(state.range(0));
  const auto q = RandomFloats(dim, 1);
  const auto kf = RandomFloats(dim, 2);
  std::vector<uint16_t> k(dim);
  FloatToHalf(kf.data(), k.data(), dim);
  for (auto _ : state) {
    benchmark::DoNotOptimize(DotF16(q.data(), k.data(), dim));
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(KernelIsa());
}
BENCHMARK(BM_DotF16)->Arg(64)->Arg(128)->Arg(256);

// A dense scan of n keys for one query: the exact scan's inner loop.
void BM_DotRows(benchmark::State& state, DType dtype) {
  const int64_t n = state.range(0);
  const auto q = RandomFloats(kDim, 3);
  const auto kf = RandomFloats(static_cast<size_t>(n) * kDim, 4);
  std::vector<uint8_t> rows(static_cast<size_t>(n) * kDim * DTypeSize(dtype));
  FromFloat(dtype, kf.data(), rows.data(), kf.size());
  std::vector<float> out(n);
  for (auto _ : state) {
    DotRows(dtype, rows.data(), n, kDim, q.data(), out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(rows.size()));
  state.SetLabel(KernelIsa());
}
BENCHMARK_CAPTURE(BM_DotRows, f16, DType::kF16)->Arg(16)->Arg(4096)->Arg(131072);
BENCHMARK_CAPTURE(BM_DotRows, bf16, DType::kBF16)->Arg(4096)->Arg(131072);
BENCHMARK_CAPTURE(BM_DotRows, f32, DType::kF32)->Arg(4096)->Arg(131072);

// G queries per row read (GQA): the exact selector's page scoring scan.
void BM_DotRowsMultiF16(benchmark::State& state) {
  const int64_t n = state.range(0);
  const int nq = static_cast<int>(state.range(1));
  const auto q = RandomFloats(static_cast<size_t>(nq) * kDim, 5);
  const auto kf = RandomFloats(static_cast<size_t>(n) * kDim, 6);
  std::vector<uint16_t> rows(kf.size());
  FloatToHalf(kf.data(), rows.data(), kf.size());
  std::vector<float> out(static_cast<size_t>(n) * nq);
  for (auto _ : state) {
    DotRowsMulti(DType::kF16, rows.data(), n, kDim, q.data(), nq, out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * n * kDim * 2);
  state.SetLabel(KernelIsa());
}
BENCHMARK(BM_DotRowsMultiF16)->Args({16, 4})->Args({4096, 4})->Args({131072, 4})->Args({131072, 1});

// Projection of an augmented query (dim + 1) on m x L random directions.
void BM_Projection(benchmark::State& state) {
  const int directions = static_cast<int>(state.range(0));
  const int dim = kDim + 1;
  const auto dirs = RandomFloats(static_cast<size_t>(directions) * dim, 7);
  const auto q = RandomFloats(dim, 8);
  std::vector<float> out(directions);
  for (auto _ : state) {
    DotRows(DType::kF32, dirs.data(), directions, dim, q.data(), out.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * directions);
}
BENCHMARK(BM_Projection)->Arg(14)->Arg(28)->Arg(64);

// Page score of one page's exact logits for G queries.
void BM_PageMassScore(benchmark::State& state) {
  const int fill = static_cast<int>(state.range(0));
  const int nq = 4;
  const auto logits = RandomFloats(static_cast<size_t>(fill) * nq, 9);
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  for (auto _ : state) {
    benchmark::DoNotOptimize(PageMassScore(logits.data(), nq, fill, fill, scale));
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_PageMassScore)->Arg(8)->Arg(16)->Arg(32);

// mdci's candidate pages from the scan's estimates: the `want` largest of
// `pages` group masses, exp of N(0, 4) logits as the scan's estimates span
// many octaves. Arg 2: 0 = nth_element over (score, page) pairs, as before
// session 47; 1 = TopPositiveScores (the radix select). Same scores, same set.
void BM_TopScores(benchmark::State& state) {
  const auto pages = static_cast<uint32_t>(state.range(0));
  const auto want = static_cast<size_t>(state.range(1));
  const bool radix = state.range(2) != 0;
  std::vector<float> score = RandomFloats(pages, 5);
  for (float& x : score) x = std::exp(4.0f * x);
  std::vector<std::pair<float, uint32_t>> rank(pages);
  std::vector<uint32_t> out;
  out.reserve(pages);
  TopScoresScratch scratch;
  for (auto _ : state) {
    out.clear();
    if (radix) {
      TopPositiveScores(score.data(), pages, want, &scratch, &out);
    } else {
      size_t ranked = 0;
      for (uint32_t p = 0; p < pages; ++p) {
        rank[ranked] = {score[p], p};
        ranked += score[p] > 0.0f ? 1 : 0;
      }
      const size_t k = std::min(want, ranked);
      std::nth_element(rank.begin(), rank.begin() + static_cast<std::ptrdiff_t>(k),
                       rank.begin() + static_cast<std::ptrdiff_t>(ranked),
                       [](const auto& a, const auto& b) { return a.first > b.first; });
      for (size_t i = 0; i < k; ++i) out.push_back(rank[i].second);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
}
BENCHMARK(BM_TopScores)
    ->Args({2048, 128, 0})
    ->Args({2048, 128, 1})
    ->Args({8192, 128, 0})
    ->Args({8192, 128, 1})
    ->Args({8192, 512, 0})
    ->Args({8192, 512, 1})
    ->Unit(benchmark::kMicrosecond);

// Tree walk primitive: a Prioritized DCI query over n augmented points.
void BM_PrioritizedDciQuery(benchmark::State& state) {
  const int64_t n = state.range(0);
  const int dim = kDim + 1;
  const auto pts = RandomFloats(static_cast<size_t>(n) * dim, 10);
  auto dci = PrioritizedDci::Create(pts.data(), n, dim, DciParams{});
  if (!dci.ok()) {
    state.SkipWithError(dci.status().ToString().c_str());
    return;
  }
  const auto q = RandomFloats(dim, 11);
  DciQueryParams qp;
  qp.k = 8;
  qp.max_candidates = 64;
  std::vector<std::pair<float, uint32_t>> out;
  int64_t visited = 0, total_visited = 0;
  for (auto _ : state) {
    visited = 0;
    const absl::Status s = (*dci)->Query(q.data(), qp, &out, &visited);
    if (!s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      return;
    }
    total_visited += visited;
  }
  state.counters["visited"] =
      benchmark::Counter(static_cast<double>(total_visited), benchmark::Counter::kAvgIterations);
}
BENCHMARK(BM_PrioritizedDciQuery)->Arg(1024)->Arg(16384);

// Whole per-head selections on the llama3-8b-like generator: one KV head,
// its G = 4 query heads, budget 256, 16-token pages.
struct SelectFixture {
  KvDump dump;
  std::unique_ptr<OwnedPageKeys> keys;
  std::unique_ptr<Selector> selector;
};

absl::StatusOr<KvDump> MakeDump(int64_t n) {
  auto cfg = SyntheticPreset("llama3-8b-like");
  if (!cfg.ok()) return cfg.status();
  cfg->layers = 1;
  cfg->kv_heads = 1;
  cfg->q_heads = 4;
  cfg->tokens = n;
  cfg->steps = 8;
  return GenerateSynthetic(*cfg);
}

// Builds the selector of `kind` over the dump's single head (its
// placements into `placed` when given).
absl::Status BuildIndex(SelectorKind kind, SelectFixture* f,
                        std::vector<Placement>* placed = nullptr, float pq_factor = 0.0f,
                        float carry_keep_factor = MdciParams{}.carry_keep_factor) {
  SelectorConfig sc;
  sc.kind = kind;
  sc.mdci.pq_factor = pq_factor;
  sc.mdci.carry_keep_factor = carry_keep_factor;
  sc.head_dim = f->dump.head_dim;
  sc.page_tokens = 16;
  sc.num_query_heads = f->dump.group_size();
  auto keys = OwnedPageKeys::ForSelector(sc);
  if (!keys.ok()) return keys.status();
  f->keys = *std::move(keys);
  auto sel = Selector::Create(sc, f->keys.get());
  if (!sel.ok()) return sel.status();
  f->selector = *std::move(sel);
  std::vector<Placement> placements;
  absl::Status s = f->selector->Build(f->dump.key(0, 0), f->dump.tokens, &placements);
  if (!s.ok()) return s;
  if (placed != nullptr) *placed = placements;
  return f->keys->Apply(placements, f->dump.key(0, 0));
}

// FNV-1a of the last build's placements and index image: equal labels
// before and after a change to the build mean the same layout, bit for bit.
uint64_t LayoutHash(const std::vector<Placement>& placed, const std::string& image) {
  uint64_t h = 1469598103934665603ull;
  const auto mix = [&h](const void* p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      h ^= static_cast<const unsigned char*>(p)[i];
      h *= 1099511628211ull;
    }
  };
  mix(placed.data(), placed.size() * sizeof(Placement));
  mix(image.data(), image.size());
  return h;
}

absl::StatusOr<std::unique_ptr<SelectFixture>> MakeSelectFixture(SelectorKind kind, int64_t n,
                                                                 float pq_factor = 0.0f) {
  auto f = std::make_unique<SelectFixture>();
  auto dump = MakeDump(n);
  if (!dump.ok()) return dump.status();
  f->dump = *std::move(dump);
  absl::Status s = BuildIndex(kind, f.get(), nullptr, pq_factor);
  if (!s.ok()) return s;
  return f;
}

// pq_factor > 0: mdci with its product-quantised codes, selecting by the
// scan (the daemon's default for MDCI sessions, MdciParams::kDefaultPqFactor).
void BM_Select(benchmark::State& state, SelectorKind kind, float pq_factor = 0.0f) {
  const int64_t n = state.range(0);
  auto f = MakeSelectFixture(kind, n, pq_factor);
  if (!f.ok()) {
    state.SkipWithError(f.status().ToString().c_str());
    return;
  }
  SelectParams params;
  params.budget_tokens = 256;
  Selection sel;
  int step = 0;
  double touched = 0;
  for (auto _ : state) {
    const KvDump& d = (*f)->dump;
    const absl::Status s =
        (*f)->selector->Select(d.query(step, 0, 0), d.group_size(), params, &sel);
    if (!s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      return;
    }
    touched += static_cast<double>(sel.keys_touched);
    step = (step + 1) % d.steps;
  }
  state.counters["keys_touched"] = benchmark::Counter(touched, benchmark::Counter::kAvgIterations);
  state.SetLabel(KernelIsa());
}
BENCHMARK_CAPTURE(BM_Select, Mdci, SelectorKind::kMdci)
    ->Arg(16384)
    ->Arg(32768)
    ->Arg(131072)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_Select, MdciPq8, SelectorKind::kMdci, 8.0f)
    ->Arg(32768)
    ->Arg(131072)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_Select, Exact, SelectorKind::kExact)
    ->Arg(16384)
    ->Arg(32768)
    ->Arg(131072)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_Select, Quest, SelectorKind::kQuest)
    ->Arg(16384)
    ->Arg(131072)
    ->Unit(benchmark::kMicrosecond);

// Cold selections, as in decode: kColdHeads copies of one head's mdci index
// (PQ scan, pq_factor 8), each with its own frames and codes, selected in
// turn. What one select reads (the codes, 18 B a token, and its candidate
// pages' frames: about 1.1 MB at 32768 tokens) times 64 heads is twice this
// machine's 32 MiB L3, so each select finds its head out of cache, as a
// decode step does (32 layers x 8 KV heads between one token's selects of a
// head). Arg(1): token granularity (the daemon's default), Arg(0): pages.
constexpr int kColdHeads = 64;
struct ColdHeads {
  KvDump dump;  // the queries (the keys are in each head's frames)
  std::vector<SelectFixture> heads;
  std::vector<CandidateCarry> carries;  // one per head (BM_SelectCarried)
};
// Built once for both granularities (64 builds: most of the run's time);
// `keep`: MdciParams::carry_keep_factor.
absl::StatusOr<ColdHeads*> GetColdHeads(int64_t n, float keep = MdciParams{}.carry_keep_factor) {
  static auto* cache = new std::map<std::pair<int64_t, float>, std::unique_ptr<ColdHeads>>();
  auto it = cache->find({n, keep});
  if (it != cache->end()) return it->second.get();
  auto c = std::make_unique<ColdHeads>();
  auto dump = MakeDump(n);
  if (!dump.ok()) return dump.status();
  c->dump = *std::move(dump);
  c->heads.resize(kColdHeads);
  c->carries.resize(kColdHeads);
  for (SelectFixture& h : c->heads) {
    h.dump = c->dump;  // BuildIndex reads the keys from it
    RETURN_IF_ERROR(BuildIndex(SelectorKind::kMdci, &h, nullptr, 8.0f, keep));
    h.dump = KvDump();  // the frames hold the keys now
  }
  return cache->emplace(std::make_pair(n, keep), std::move(c)).first->second.get();
}

// Selects the cold heads in turn. `carry`: BM_SelectCarried (below).
void RunColdSelects(benchmark::State& state, bool carry) {
  const float keep =
      carry ? static_cast<float>(state.range(2)) / 10.0f : MdciParams{}.carry_keep_factor;
  auto cold = GetColdHeads(state.range(0), keep);
  if (!cold.ok()) {
    state.SkipWithError(cold.status().ToString().c_str());
    return;
  }
  const KvDump& d = (*cold)->dump;
  SelectParams params;
  params.budget_tokens = 256;
  params.recent_tokens = 64;
  params.granularity = state.range(1) != 0 ? Granularity::kToken : Granularity::kPage;
  params.carry_steps = carry ? 1 : 0;
  for (CandidateCarry& c : (*cold)->carries) c.Clear();
  Selection sel;
  int i = 0;
  int64_t carried = 0, keys = 0;
  for (auto _ : state) {
    const int head = i % kColdHeads;
    params.carry = carry ? &(*cold)->carries[head] : nullptr;
    const absl::Status s = (*cold)->heads[head].selector->Select(
        d.query((i / kColdHeads) % d.steps, 0, 0), d.group_size(), params, &sel);
    if (!s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      return;
    }
    carried += sel.carried ? 1 : 0;
    keys += static_cast<int64_t>(sel.keys_touched);
    ++i;
  }
  if (carry) {
    state.counters["carried"] = benchmark::Counter(static_cast<double>(carried) / std::max(1, i));
    state.counters["keys"] = benchmark::Counter(static_cast<double>(keys) / std::max(1, i));
  }
  state.SetLabel(KernelIsa());
}

void BM_SelectCold(benchmark::State& state) { RunColdSelects(state, /*carry=*/false); }
BENCHMARK(BM_SelectCold)->Args({32768, 0})->Args({32768, 1})->Unit(benchmark::kMicrosecond);

// BM_SelectCold with the candidate carry-over at carry_steps 1, as a
// calibrated head selects in decode: each head alternates a fresh select
// and one that reuses its candidates (the mean of the two is the time).
// Arg(2): MdciParams::carry_keep_factor x 10 (0: every candidate carried;
// 40: the default 4), so the two keep factors run side by side in one run
// (docs/bench/trim37.md). The heads of each keep factor are built once.
void BM_SelectCarried(benchmark::State& state) { RunColdSelects(state, /*carry=*/true); }
BENCHMARK(BM_SelectCarried)
    ->Args({32768, 0, 0})
    ->Args({32768, 0, 40})
    ->Args({32768, 1, 0})
    ->Args({32768, 1, 40})
    ->Unit(benchmark::kMicrosecond);

// Bulk build of one head's tree / layout (data generated once, outside).
void BM_Build(benchmark::State& state, SelectorKind kind) {
  const int64_t n = state.range(0);
  SelectFixture f;
  auto dump = MakeDump(n);
  if (!dump.ok()) {
    state.SkipWithError(dump.status().ToString().c_str());
    return;
  }
  f.dump = *std::move(dump);
  std::vector<Placement> placed;
  for (auto _ : state) {
    const absl::Status s = BuildIndex(kind, &f, &placed);
    if (!s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      return;
    }
  }
  state.SetItemsProcessed(state.iterations() * n);
  std::string image;
  const absl::Status saved = f.selector->SaveImage(&image);
  state.SetLabel(absl::StrCat("layout ", absl::Hex(LayoutHash(placed, image)),
                              saved.ok() ? "" : " (no image)"));
}
BENCHMARK_CAPTURE(BM_Build, Mdci, SelectorKind::kMdci)
    ->Arg(16384)
    ->Arg(32768)
    ->Arg(131072)
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Build, Exact, SelectorKind::kExact)
    ->Arg(131072)
    ->Unit(benchmark::kMillisecond);

// Token i at slot i % page_tokens of page i / page_tokens (the PQ
// benchmarks' placement: full pages in position order).
std::vector<Placement> InOrder(int64_t n, int page_tokens) {
  std::vector<Placement> placements(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    placements[i].page = static_cast<uint32_t>(i / page_tokens);
    placements[i].slot = static_cast<uint32_t>(i % page_tokens);
  }
  return placements;
}

// The product-quantised codes of one head (MdciParams::pq_factor): the
// codebooks' k-means (Train, on at most PqSketch::kMaxTrainRows keys) and the
// encoding of every key (Write), apart, on the llama3-8b-like generator. The
// label is an FNV-1a of the codes read back: equal before and after a change
// means the same codes.
void BM_PqBuild(benchmark::State& state, bool train, bool write) {
  const int64_t n = state.range(0);
  auto dump = MakeDump(n);
  if (!dump.ok()) {
    state.SkipWithError(dump.status().ToString().c_str());
    return;
  }
  const int page_tokens = 16;
  const std::vector<Placement> placements = InOrder(n, page_tokens);
  PqSketch pq(dump->head_dim, page_tokens);
  pq.Train(dump->key(0, 0), n);
  for (auto _ : state) {
    if (train) pq.Train(dump->key(0, 0), n);
    if (write) pq.Write(placements, dump->key(0, 0), DType::kF16);
  }
  state.SetItemsProcessed(state.iterations() * n);
  if (!write) pq.Write(placements, dump->key(0, 0), DType::kF16);
  uint64_t h = 1469598103934665603ull;
  for (int64_t i = 0; i < n; ++i) {
    for (int sub = 0; sub < pq.subspaces(); ++sub) {
      h ^= static_cast<uint64_t>(pq.code(static_cast<uint64_t>(i), sub));
      h *= 1099511628211ull;
    }
  }
  state.SetLabel(absl::StrCat("codes ", absl::Hex(h)));
}
BENCHMARK_CAPTURE(BM_PqBuild, TrainAndWrite, true, true)->Arg(32768)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_PqBuild, Train, true, false)->Arg(32768)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_PqBuild, Write, false, true)->Arg(32768)->Unit(benchmark::kMillisecond);

// The PQ scan alone (PqSketch::EstimatePageMass, a GQA group of 4 queries)
// over n tokens in 16-token pages, on the llama3-8b-like generator. Arg(1):
// how many sketches (copies of the same codes) are scanned in turn: 1 keeps
// the 18 B a token in cache, 64 (37 MB at 32768 tokens) finds each one out
// of the L3, as a decode step does. Arg(2): the kernel, 0 the one this CPU
// takes (PqSketch::ScanKernel()), 1 the AVX2 shuffles, 2 the AVX-512
// shuffles (skipped where the CPU lacks what it needs). Arg(3): 1 scans
// with the query basis mdci learns from the first 8 steps' queries
// (QueryBasis, PqSketch::SetBasis), 0 the codes alone. The label names the
// kernel and ends with an FNV-1a of the masses' bits: equal across kernels,
// and before and after a change, means the same estimates.
// The basis mdci would learn from head 0's first steps' queries, and the
// fp16 frames of its keys at `placements` (PqSketch::SetBasis reads them).
// False when either cannot be made.
bool LearnBasis(const KvDump& dump, const std::vector<Placement>& placements, int page_tokens,
                std::unique_ptr<OwnedPageKeys>* frames, std::vector<float>* basis) {
  auto owned = OwnedPageKeys::Create(dump.head_dim, DType::kF16, page_tokens);
  if (!owned.ok() || !(*owned)->Apply(placements, dump.key(0, 0)).ok()) return false;
  QueryBasis qb(dump.head_dim, PqSketch::kBasis);
  for (int s = 0; !qb.due() && s < QueryBasis::kFirstSelects + QueryBasis::kFirstSpread; ++s) {
    qb.Observe(dump.query(s % dump.steps, 0, 0), dump.group_size());
  }
  if (!qb.Fit(basis)) return false;
  *frames = std::move(*owned);
  return true;
}

void BM_PqScan(benchmark::State& state) {
  const int64_t n = state.range(0);
  const int copies = static_cast<int>(state.range(1));
  const int64_t kernel = state.range(2);
  const bool with_basis = state.range(3) == 1;
  // Arg 4: the scan's software prefetch distance in groups (-1: the default).
  const int prefetch =
      state.range(4) < 0 ? PqSketch::kScanPrefetchGroups : static_cast<int>(state.range(4));
  auto dump = MakeDump(n);
  if (!dump.ok()) {
    state.SkipWithError(dump.status().ToString().c_str());
    return;
  }
  const int page_tokens = 16;
  const uint32_t pages = static_cast<uint32_t>(n / page_tokens);
  const std::vector<Placement> placements = InOrder(n, page_tokens);
  std::vector<std::unique_ptr<PqSketch>> sketches;
  for (int c = 0; c < copies; ++c) {
    sketches.push_back(std::make_unique<PqSketch>(dump->head_dim, page_tokens));
    sketches.back()->Train(dump->key(0, 0), n);
    sketches.back()->Write(placements, dump->key(0, 0), DType::kF16);
  }
  if (with_basis) {
    std::unique_ptr<OwnedPageKeys> frames;
    std::vector<float> basis;
    if (!LearnBasis(*dump, placements, page_tokens, &frames, &basis)) {
      state.SkipWithError("no query basis");
      return;
    }
    for (auto& sk : sketches) {
      if (!sk->SetBasis(basis.data(), *frames, DType::kF16, pages, [&](uint32_t) {
               return static_cast<uint32_t>(page_tokens);
             }).ok()) {
        state.SkipWithError("SetBasis failed");
        return;
      }
    }
  }
  if ((kernel == 1 && !ForceKernelIsa("avx2")) || (kernel == 2 && !ForceKernelIsa("avx512"))) {
    state.SkipWithError("this CPU cannot run that kernel");
    return;
  }
  if (kernel == 2) PqSketch::AllowByteLookupScan(false);
  const std::string name = PqSketch::ScanKernel();
  const int nq = dump->group_size();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dump->head_dim));
  std::vector<uint32_t> fill(pages, page_tokens);
  std::vector<float> mass(static_cast<size_t>(pages) * nq), bulk(mass.size()), ref(nq);
  int i = 0;
  uint64_t h = 1469598103934665603ull;
  const int prefetch_before = PqSketch::SetScanPrefetch(prefetch);
  for (auto _ : state) {
    sketches[i % copies]->EstimatePageMass(dump->query((i / copies) % dump->steps, 0, 0), nq, scale,
                                           pages, fill.data(), mass.data(), ref.data(),
                                           bulk.data());
    if (i % copies == 0 && i / copies < dump->steps) {
      for (const float v : mass) {
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof(bits));
        h = (h ^ bits) * 1099511628211ull;
      }
    }
    ++i;
  }
  PqSketch::SetScanPrefetch(prefetch_before);
  ForceKernelIsa("auto");
  PqSketch::AllowByteLookupScan(true);
  state.SetItemsProcessed(state.iterations() * n);
  state.SetLabel(absl::StrCat(name, " prefetch ", prefetch, " masses ", absl::Hex(h)));
}
// Args: tokens, copies (64: read cold), kernel (0 auto, 1 avx2, 2 avx512
// without byte lookups), query basis, prefetch distance (-1: default).
BENCHMARK(BM_PqScan)
    ->Args({32768, 1, 0, 0, -1})
    ->Args({32768, 1, 2, 0, -1})
    ->Args({32768, 1, 1, 0, -1})
    ->Args({32768, 64, 0, 0, -1})
    ->Args({32768, 64, 2, 0, -1})
    ->Args({32768, 64, 1, 0, -1})
    ->Args({32768, 1, 0, 1, -1})
    ->Args({32768, 64, 0, 1, -1})
    ->Args({32768, 1, 0, 1, 0})   // hot, without the prefetch
    ->Args({32768, 64, 0, 1, 0})  // the cold scan without and with the prefetch, side by side
    ->Args({32768, 64, 0, 1, 2})
    ->Args({32768, 64, 0, 1, 8})
    ->Args({32768, 64, 1, 1, 0})
    ->Args({32768, 64, 1, 1, -1})
    ->Unit(benchmark::kMicrosecond);

// PqSketch::SetBasis: the pass over every key's frame that installs a query
// basis (mdci does it once after its first selects, and again, ever more
// rarely, when the queries drift), at n tokens of fp16 keys.
void BM_PqSetBasis(benchmark::State& state) {
  const int64_t n = state.range(0);
  auto dump = MakeDump(n);
  if (!dump.ok()) {
    state.SkipWithError(dump.status().ToString().c_str());
    return;
  }
  const int page_tokens = 16;
  const uint32_t pages = static_cast<uint32_t>(n / page_tokens);
  const std::vector<Placement> placements = InOrder(n, page_tokens);
  PqSketch pq(dump->head_dim, page_tokens);
  pq.Train(dump->key(0, 0), n);
  pq.Write(placements, dump->key(0, 0), DType::kF16);
  std::unique_ptr<OwnedPageKeys> frames;
  std::vector<float> basis;
  if (!LearnBasis(*dump, placements, page_tokens, &frames, &basis)) {
    state.SkipWithError("no query basis");
    return;
  }
  for (auto _ : state) {
    if (!pq.SetBasis(basis.data(), *frames, DType::kF16, pages, [&](uint32_t) {
             return static_cast<uint32_t>(page_tokens);
           }).ok()) {
      state.SkipWithError("SetBasis failed");
      return;
    }
  }
  state.SetItemsProcessed(state.iterations() * n);
}
BENCHMARK(BM_PqSetBasis)->Arg(32768)->Arg(131072)->Unit(benchmark::kMillisecond);

// Gather of one head's selection into the staging region (docs/architecture.md
// §6): 16 whole pages of 16 tokens (page granularity) against 256 scattered
// tokens packed into 16 slots (token granularity). 131072 tokens of fp16 K+V
// at head_dim 128 in 8 KiB frames (64 MiB, past the last-level cache); each
// iteration picks new random pages / tokens.
struct GatherFixture {
  static constexpr int kPageTokens = 16;
  static constexpr int kDim = 128;
  static constexpr uint64_t kRowBytes = kDim * 2;
  static constexpr uint64_t kFrameBytes = 2 * kPageTokens * kRowBytes;
  std::vector<std::unique_ptr<uint8_t[]>> frames;
  std::vector<uint8_t> staging = std::vector<uint8_t>(16 * kFrameBytes);
  std::mt19937 rng{7};
  GatherFixture() {
    frames.resize(131072 / kPageTokens);
    for (auto& f : frames) {
      f.reset(new uint8_t[kFrameBytes]);
      std::memset(f.get(), 1, kFrameBytes);
    }
  }
};

void BM_Gather(benchmark::State& state) {
  const bool by_token = state.range(0) == 1;
  static GatherFixture* f = new GatherFixture();
  std::uniform_int_distribution<uint32_t> page(0, static_cast<uint32_t>(f->frames.size() - 1));
  std::uniform_int_distribution<uint32_t> slot(0, GatherFixture::kPageTokens - 1);
  std::vector<const uint8_t*> pages(16);
  std::vector<RowSource> rows(256);
  for (auto _ : state) {
    state.PauseTiming();
    for (auto& p : pages) p = f->frames[page(f->rng)].get();
    for (auto& r : rows) r = RowSource{f->frames[page(f->rng)].get(), slot(f->rng)};
    state.ResumeTiming();
    if (by_token) {
      GatherRows(rows.data(), rows.size(), GatherFixture::kPageTokens, GatherFixture::kRowBytes,
                 f->staging.data());
    } else {
      GatherFrames(pages.data(), pages.size(), GatherFixture::kFrameBytes, f->staging.data());
    }
    benchmark::DoNotOptimize(f->staging.data());
  }
  state.SetBytesProcessed(state.iterations() * 16 * GatherFixture::kFrameBytes);
  state.SetLabel(by_token ? "256 tokens" : "16 pages");
}
BENCHMARK(BM_Gather)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

// Token gather from a pool-like arena (docs/bench/gather_arena.md): 1024
// random tokens (one KV head's budget) per iteration, their K and V rows
// read from 8 KiB frames of an arena of range(0) MiB, mapped with
// transparent huge pages (range(1) = 1) or 4 KiB pages only (0), gathered
// with a software prefetch range(2) tokens ahead (0: none). A 32-layer
// daemon's arena at 32768 tokens is about 4 GiB, a 4-layer one 512 MiB.
// 4096 precomputed row sets rotate, so the rows are read cold.
struct ArenaFixture {
  static constexpr uint64_t kFrame = GatherFixture::kFrameBytes;
  static constexpr uint64_t kHuge = uint64_t{2} << 20;
  uint64_t bytes = 0;
  bool thp = false;
  uint8_t* map = nullptr;
  uint8_t* base = nullptr;  // 2 MiB aligned
  std::vector<std::vector<RowSource>> sets;
  ArenaFixture(uint64_t mib, bool huge) : bytes(mib << 20), thp(huge) {
    map = static_cast<uint8_t*>(mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (map == MAP_FAILED) std::abort();
    base =
        reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(map) + kHuge - 1) / kHuge * kHuge);
    madvise(base, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    for (uint64_t off = 0; off < bytes; off += 4096) base[off] = 1;  // fault it all in
    std::mt19937_64 rng(11);
    std::uniform_int_distribution<uint64_t> frame(0, bytes / kFrame - 1);
    std::uniform_int_distribution<uint32_t> slot(0, GatherFixture::kPageTokens - 1);
    sets.resize(4096);
    for (auto& set : sets) {
      set.resize(1024);
      for (auto& r : set) r = RowSource{base + frame(rng) * kFrame, slot(rng)};
    }
  }
  ~ArenaFixture() { munmap(map, bytes + kHuge); }
};

void BM_GatherArena(benchmark::State& state) {
  // One arena at a time (the variants of one arena run back to back).
  static std::unique_ptr<ArenaFixture> arena;
  const uint64_t mib = static_cast<uint64_t>(state.range(0));
  const bool thp = state.range(1) == 1;
  if (arena == nullptr || arena->bytes != (mib << 20) || arena->thp != thp) {
    arena.reset();
    arena = std::make_unique<ArenaFixture>(mib, thp);
  }
  std::vector<uint8_t> staging(64 * GatherFixture::kFrameBytes);
  size_t next = 0;
  for (auto _ : state) {
    const std::vector<RowSource>& rows = arena->sets[next++ % arena->sets.size()];
    GatherRows(rows.data(), rows.size(), GatherFixture::kPageTokens, GatherFixture::kRowBytes,
               staging.data(), static_cast<int>(state.range(2)));
    benchmark::DoNotOptimize(staging.data());
  }
  state.SetItemsProcessed(state.iterations() * 1024);
  state.SetLabel(absl::StrCat(mib, " MiB ", thp ? "thp" : "4k", " prefetch ", state.range(2)));
}
BENCHMARK(BM_GatherArena)
    ->ArgNames({"mib", "thp", "ahead"})
    ->Args({512, 0, 0})
    ->Args({512, 0, 8})
    ->Args({512, 1, 0})
    ->Args({512, 1, 8})
    ->Args({4096, 0, 0})
    ->Args({4096, 0, 8})
    ->Args({4096, 0, 16})
    ->Args({4096, 1, 0})
    ->Args({4096, 1, 8})
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace icecache
