// Micro-benchmarks of the daemon core's hot paths (no gRPC): pool
// allocate/free, a decode append's staging, a decode-step append, a one-layer fetch (gather into a
// /dev/shm buffer) and a DecodeStep (select + fetch). Run:
//   icecache-core-bench --benchmark_min_time=0.2
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "common/dtype.h"
#include "common/shm_file.h"
#include "server/pool/page_pool.h"
#include "server/session/append_staging.h"
#include "server/session/session_manager.h"
#include "server/transfer/buffer_registry.h"

namespace icecache {
namespace {

void BM_PoolAllocateFree(benchmark::State& state) {
  PagePoolOptions o;
  o.capacity_bytes = uint64_t{256} << 20;
  o.use_huge_pages = false;
  auto pool = PagePool::Create(o).value();
  const SizeClassId id = pool->GetOrCreateClass(8192).value();
  const uint64_t n = static_cast<uint64_t>(state.range(0));
  for (auto _ : state) {
    auto set = pool->Allocate("bench", id, n);
    benchmark::DoNotOptimize(set->frame(0));
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(n));
}
BENCHMARK(BM_PoolAllocateFree)->Arg(1)->Arg(64)->Arg(4096);

// A decode append's staging, side by side: one token of a 32-layer x 8 KV
// head x 128-dim fp16 model (128 KiB, K and V) copied into the staging the
// append takes, then released. Arg 0: a cache that keeps nothing, so every
// append maps fresh memory, takes a fault per 4 KiB page and unmaps it
// (every append before small buffers were kept); Arg 1: the daemon's cache.
void BM_StagingDecodeAppend(benchmark::State& state) {
  StagingCacheOptions o;
  o.max_cached_bytes = state.range(0) != 0 ? uint64_t{1} << 30 : 0;
  auto cache = StagingCache::Create(o);
  const size_t bytes = size_t{32} * 8 * 128 * 2 * 2;
  std::vector<uint8_t> src(bytes, 7);
  for (auto _ : state) {
    auto staging = cache->Acquire(bytes);
    std::copy(src.begin(), src.end(), staging->data());
    benchmark::DoNotOptimize(staging->data());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(bytes));
}
BENCHMARK(BM_StagingDecodeAppend)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

// A Llama-like shape with fewer layers so the set-up stays small:
// 8 layers x 8 KV heads x 128 dims fp16, 32 query heads, 16-token pages.
struct CoreEnv {
  std::unique_ptr<PagePool> pool;
  std::unique_ptr<BufferRegistry> buffers;
  std::unique_ptr<SessionManager> manager;
  ShmFile shm;
  std::string buffer_id;
  std::string session;
  SessionConfig config;
  Caller caller{"bench", static_cast<uint32_t>(getuid()), false};
  int64_t tokens = 0;

  CoreEnv(SelectorKind kind, int64_t prefill, ChecksumOptions checksums = {},
          int decode_threads = 0) {
    PagePoolOptions po;
    po.capacity_bytes = uint64_t{2} << 30;
    pool = PagePool::Create(po).value();
    buffers = BufferRegistry::Create(BufferRegistryOptions()).value();
    SessionManagerOptions mo;
    mo.pool = pool.get();
    mo.buffers = buffers.get();
    mo.reaper_interval = absl::ZeroDuration();
    mo.build_threads = 2;
    mo.decode_threads = decode_threads;
    manager = SessionManager::Create(mo).value();
    config.layers = 8;
    config.kv_heads = 8;
    config.q_heads = 32;
    config.head_dim = 128;
    config.dtype = DType::kF16;
    config.page_tokens = 16;
    config.selector = kind;
    config.ttl = absl::Hours(1);
    config.checksums = checksums;
    session = manager->CreateSession(caller, config)->id;
    shm = ShmFile::Create("icecache-core-bench-" + std::to_string(getpid()) + "-" +
                              std::string(SelectorKindName(kind)),
                          64 << 20)
              .value();
    buffer_id = buffers->RegisterShm(caller, shm.path(), shm.size(), absl::Now())->id;
    Append(prefill);
  }

  void Append(int64_t n) {
    std::vector<float> f(static_cast<size_t>(AppendBytes(config, n) / 2));
    std::mt19937 rng(static_cast<uint32_t>(tokens + 1));
    std::normal_distribution<float> nd;
    for (float& x : f) x = nd(rng);
    std::vector<uint8_t> bytes(AppendBytes(config, n));
    FromFloat(DType::kF16, f.data(), bytes.data(), f.size());
    auto r = manager->AppendKv(caller, session, n, bytes);
    if (!r.ok()) std::abort();
    tokens = r->tokens;
  }

  SelectRequest Query(int budget) const {
    SelectRequest sel;
    std::mt19937 rng(7);
    std::normal_distribution<float> nd;
    sel.queries.resize(static_cast<size_t>(config.q_heads) * config.head_dim);
    for (float& x : sel.queries) x = nd(rng);
    sel.params.budget_tokens = budget;
    return sel;
  }
};

void BM_AppendDecodeToken(benchmark::State& state) {
  CoreEnv env(SelectorKind::kExact, 4096);
  const int64_t n = state.range(0);
  std::vector<uint8_t> bytes(AppendBytes(env.config, n), 0x3c);  // 1.0 in fp16 pairs
  for (auto _ : state) {
    auto r = env.manager->AppendKv(env.caller, env.session, n, bytes);
    if (!r.ok()) state.SkipWithError(std::string(r.status().message()).c_str());
  }
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(bytes.size()));
}
BENCHMARK(BM_AppendDecodeToken)->Arg(1)->Arg(16)->Unit(benchmark::kMicrosecond);

void BM_FetchLayer(benchmark::State& state) {
  CoreEnv env(SelectorKind::kExact, 16384);
  const int pages_per_head = static_cast<int>(state.range(0)) / env.config.page_tokens;
  FetchRequest f;
  f.buffer_id = env.buffer_id;
  std::mt19937 rng(3);
  for (int h = 0; h < env.config.kv_heads; ++h) {
    std::vector<uint32_t> pages;
    for (int i = 0; i < pages_per_head; ++i) pages.push_back(rng() % (16384 / 16));
    f.pages.push_back(pages);
  }
  uint64_t bytes = 0;
  for (auto _ : state) {
    auto layout = env.manager->FetchPages(env.caller, env.session, f);
    if (!layout.ok()) state.SkipWithError(std::string(layout.status().message()).c_str());
    bytes = layout->total_bytes;
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(bytes));
  state.counters["region_KiB"] = static_cast<double>(bytes) / 1024;
}
// Budget in tokens per KV head (8 heads).
BENCHMARK(BM_FetchLayer)->Arg(256)->Arg(1024)->Unit(benchmark::kMicrosecond);

// The fetch of BM_FetchLayer (256 or 1024 tokens per KV head: 16 or 64
// pages x 8 heads of 8 KiB) with page checksums off, on every page, and on a
// 1/16 sample, serially on the calling thread (decode_threads 1) so the CPU
// time is the whole cost; cpu_per_page is the fetch's CPU time per page.
void BM_FetchChecksum(benchmark::State& state) {
  ChecksumOptions sums;
  sums.mode = static_cast<ChecksumMode>(state.range(0));
  CoreEnv env(SelectorKind::kExact, 16384, sums, /*decode_threads=*/1);
  const int pages_per_head = static_cast<int>(state.range(1)) / env.config.page_tokens;
  FetchRequest f;
  f.buffer_id = env.buffer_id;
  std::mt19937 rng(3);
  for (int h = 0; h < env.config.kv_heads; ++h) {
    std::vector<uint32_t> pages;
    for (int i = 0; i < pages_per_head; ++i) pages.push_back(rng() % (16384 / 16));
    f.pages.push_back(pages);
  }
  for (auto _ : state) {
    auto layout = env.manager->FetchPages(env.caller, env.session, f);
    if (!layout.ok()) state.SkipWithError(std::string(layout.status().message()).c_str());
  }
  const double pages = static_cast<double>(pages_per_head) * env.config.kv_heads;
  // CPU time per fetched page (printed with an SI suffix: 400n = 400 ns).
  state.counters["cpu_per_page"] = benchmark::Counter(
      pages, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.SetLabel(sums.mode == ChecksumMode::kOff         ? "checksums off"
                 : sums.mode == ChecksumMode::kEveryPage ? "checksums every page"
                                                         : "checksums sampled 1/16");
}
BENCHMARK(BM_FetchChecksum)
    ->ArgsProduct({{static_cast<int>(ChecksumMode::kOff),
                    static_cast<int>(ChecksumMode::kEveryPage),
                    static_cast<int>(ChecksumMode::kSampled)},
                   {256, 1024}})
    ->Unit(benchmark::kMicrosecond);

// Token writes of 8 layers (each into its own 1 MiB region of the buffer, as
// a decode step's layer messages), 256 tokens per KV head, the token sets
// alternating between two that share 192 of 256 per head (the 75% a decode
// step keeps, docs/bench/inplace14_gather.md). Arg 0: whole writes; 1: in
// place (only the 64 new tokens per head copied). Serially on the calling
// thread (decode_threads 1), so the time is the whole cost; per_message is
// the time of one layer's fetch.
void BM_FetchTokens(benchmark::State& state) {
  const bool in_place = state.range(0) != 0;
  CoreEnv env(SelectorKind::kExact, 16384, {}, /*decode_threads=*/1);
  std::mt19937 rng(5);
  constexpr int kBudget = 256, kShared = 192;
  std::vector<std::vector<int32_t>> sets[2];
  for (int h = 0; h < env.config.kv_heads; ++h) {
    std::vector<int32_t> all(16384);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    sets[0].emplace_back(all.begin(), all.begin() + kBudget);
    sets[1].emplace_back(all.begin(), all.begin() + kShared);
    sets[1].back().insert(sets[1].back().end(), all.begin() + kBudget,
                          all.begin() + kBudget + (kBudget - kShared));
    std::sort(sets[1].back().begin(), sets[1].back().end());
  }
  constexpr uint64_t kRegion = uint64_t{1} << 20;
  int which = 0;
  uint64_t copied = 0, messages = 0;
  for (auto _ : state) {
    for (int l = 0; l < env.config.layers; ++l) {
      FetchRequest f;
      f.buffer_id = env.buffer_id;
      f.layer = l;
      f.offset = static_cast<uint64_t>(l) * kRegion;
      f.tokens = sets[which];
      f.in_place = in_place;
      auto layout = env.manager->FetchPages(env.caller, env.session, f);
      if (!layout.ok()) {
        state.SkipWithError(std::string(layout.status().message()).c_str());
        return;
      }
      copied += layout->rows_copied;
      ++messages;
    }
    which ^= 1;
  }
  state.counters["per_message"] = benchmark::Counter(
      static_cast<double>(env.config.layers),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.counters["rows_copied"] = static_cast<double>(copied) / std::max<uint64_t>(1, messages);
  state.SetLabel(in_place ? "in place" : "whole");
}
BENCHMARK(BM_FetchTokens)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

void BM_DecodeStep(benchmark::State& state) {
  const auto kind = static_cast<SelectorKind>(state.range(0));
  CoreEnv env(kind, 8192);
  SelectRequest sel = env.Query(256);
  for (auto _ : state) {
    auto r = env.manager->DecodeStep(env.caller, env.session, sel, env.buffer_id, 0, 1);
    if (!r.ok()) state.SkipWithError(std::string(r.status().message()).c_str());
  }
  state.SetLabel(std::string(SelectorKindName(kind)) + " 8192 tokens, 8 kv heads, budget 256");
}
BENCHMARK(BM_DecodeStep)
    ->Arg(static_cast<int>(SelectorKind::kExact))
    ->Arg(static_cast<int>(SelectorKind::kMdci))
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace icecache
