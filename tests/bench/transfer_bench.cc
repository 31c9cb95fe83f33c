#include "tests/bench/transfer_bench.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "server/pool/page_pool.h"
#include "server/transfer/cuda_runtime.h"
#include "server/transfer/device_push.h"
#include "server/transfer/gather.h"
#include "server/transfer/paged_kv_layout.h"

namespace icecache::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// A /dev/shm file mapped MAP_SHARED, as a client's buffer is; removed at once
// (the mapping keeps it).
struct ShmDst {
  uint8_t* data = nullptr;
  size_t size = 0;
  ~ShmDst() {
    if (data != nullptr) munmap(data, size);
  }
};

absl::Status MapShm(size_t size, ShmDst* out) {
  const std::string path = absl::StrCat("/dev/shm/icecache-bench-transfer-", getpid());
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot create ", path));
  unlink(path.c_str());
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    close(fd);
    return absl::InternalError("ftruncate of the shm file failed");
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return absl::InternalError("mmap of the shm file failed");
  out->data = static_cast<uint8_t*>(p);
  out->size = size;
  std::memset(out->data, 0, size);  // fault the pages in, as a reused buffer is
  return absl::OkStatus();
}

// Runs body(i, n) on n threads (the caller's thread is one of them).
template <typename Body>
void OnThreads(int n, const Body& body) {
  std::vector<std::thread> extra;
  for (int i = 1; i < n; ++i) extra.emplace_back([&body, i, n] { body(i, n); });
  body(0, n);
  for (std::thread& t : extra) t.join();
}

struct Geometry {
  int page_tokens;
  uint64_t frame_bytes;
  size_t frames;  // per layer
  uint64_t bytes;
};

Geometry GeometryOf(const TransferOptions& o, int page_tokens) {
  Geometry g;
  g.page_tokens = page_tokens;
  g.frame_bytes = 2ull * page_tokens * o.head_dim * 2;  // K and V, fp16
  g.frames = static_cast<size_t>(o.kv_heads) * (o.budget_tokens / page_tokens);
  g.bytes = g.frames * g.frame_bytes;
  return g;
}

// The daemon's page pool (huge pages when the system has them, else
// transparent huge pages), filled with frames of one size: the pages a fetch
// gathers are frames of this pool, as in the daemon.
struct Source {
  std::unique_ptr<PagePool> pool;
  FrameSet frames;
  uint8_t* base = nullptr;
  uint64_t bytes = 0;  // arena bytes
};

absl::Status MakeSource(uint64_t arena_bytes, uint64_t frame_bytes, Source* out) {
  PagePoolOptions po;
  po.capacity_bytes = arena_bytes;
  ASSIGN_OR_RETURN(out->pool, PagePool::Create(po));
  ASSIGN_OR_RETURN(SizeClassId id, out->pool->GetOrCreateClass(frame_bytes));
  const uint64_t count = arena_bytes / PagePool::StrideFor(frame_bytes) * 9 / 10;
  ASSIGN_OR_RETURN(out->frames, out->pool->Allocate("bench", id, count));
  for (size_t i = 0; i < out->frames.size(); ++i) {
    std::memset(out->frames.frame(i), static_cast<int>(i), frame_bytes);
  }
  out->base = out->pool->arena_base();
  out->bytes = arena_bytes;
  return absl::OkStatus();
}

// Random frames of the pool, and a random contiguous range of the arena of
// the same size (the memcpy's source).
void Draw(std::mt19937_64& rng, const Source& src, const Geometry& g,
          std::vector<const uint8_t*>* frames, const uint8_t** contiguous) {
  frames->clear();
  for (size_t i = 0; i < g.frames; ++i) {
    frames->push_back(src.frames.frame(rng() % src.frames.size()));
  }
  const uint64_t starts = (src.bytes * 9 / 10 - g.bytes) / 4096;
  *contiguous = src.base + (rng() % (starts + 1)) * 4096;
}

double GbPerS(uint64_t bytes, double seconds) { return seconds > 0 ? bytes / seconds / 1e9 : 0; }

Json CpuRow(const TransferOptions& o, const Source& src, const Geometry& g, int threads,
            uint8_t* dst) {
  std::mt19937_64 rng(g.page_tokens * 131 + threads);
  std::vector<const uint8_t*> frames;
  const uint8_t* contiguous = nullptr;
  std::vector<double> gather_s, memcpy_s;
  for (int r = 0; r < o.reps + 2; ++r) {
    Draw(rng, src, g, &frames, &contiguous);
    auto t0 = Clock::now();
    OnThreads(threads, [&](int i, int n) {
      const size_t lo = g.frames * i / n, hi = g.frames * (i + 1) / n;
      GatherFrames(frames.data() + lo, hi - lo, g.frame_bytes, dst + lo * g.frame_bytes);
    });
    auto t1 = Clock::now();
    Draw(rng, src, g, &frames, &contiguous);
    auto t2 = Clock::now();
    OnThreads(threads, [&](int i, int n) {
      const uint64_t lo = g.bytes * i / n, hi = g.bytes * (i + 1) / n;
      std::memcpy(dst + lo, contiguous + lo, hi - lo);
    });
    auto t3 = Clock::now();
    if (r < 2) continue;  // warm-up
    gather_s.push_back(std::chrono::duration<double>(t1 - t0).count());
    memcpy_s.push_back(std::chrono::duration<double>(t3 - t2).count());
  }
  const double gs = Median(gather_s), ms = Median(memcpy_s);
  return {{"page_tokens", g.page_tokens},
          {"frame_bytes", g.frame_bytes},
          {"threads", threads},
          {"bytes", g.bytes},
          {"gather_us", gs * 1e6},
          {"memcpy_us", ms * 1e6},
          {"gather_gbps", GbPerS(g.bytes, gs)},
          {"memcpy_gbps", GbPerS(g.bytes, ms)},
          {"ratio", gs > 0 ? ms / gs : 0}};
}

absl::Status GpuRows(const TransferOptions& o, Json* rows, std::string* skipped);

}  // namespace

void AddTransferFlags(CLI::App* app, TransferOptions* o) {
  app->add_option("--page-tokens", o->page_tokens, "page sizes in tokens")
      ->delimiter(',')
      ->capture_default_str();
  app->add_option("--threads", o->threads, "gather thread counts")
      ->delimiter(',')
      ->capture_default_str();
  app->add_option("--kv-heads", o->kv_heads, "KV heads per layer")->capture_default_str();
  app->add_option("--head-dim", o->head_dim, "head dimension (fp16)")->capture_default_str();
  app->add_option("--budget-tokens", o->budget_tokens, "selected tokens per KV head")
      ->capture_default_str();
  app->add_option("--reps", o->reps, "timed runs per row (median)")->capture_default_str();
  app->add_option("--arena-bytes", o->arena_bytes, "source arena (>> last-level cache)")
      ->capture_default_str();
  app->add_flag("--gpu", o->gpu, "also push + scatter to the GPU against a pinned cudaMemcpy");
  app->add_flag("--gpu-only", o->gpu_only, "GPU rows only (no CPU gather table)");
  app->add_option("--gpu-modes", o->gpu_modes, "GPU: staged, zero-copy, direct")
      ->delimiter(',')
      ->check(CLI::IsMember({"staged", "zero-copy", "direct"}))
      ->capture_default_str();
  app->add_option("--json", o->json, "write the rows as JSON here");
}

absl::Status RunTransferBench(const TransferOptions& o) {
  if (o.kv_heads < 1 || o.head_dim < 1 || o.reps < 1 || o.budget_tokens < 1) {
    return absl::InvalidArgumentError(
        "--kv-heads, --head-dim, --reps, --budget-tokens must be >= 1");
  }
  Json report = {{"kv_heads", o.kv_heads},           {"head_dim", o.head_dim},
                 {"budget_tokens", o.budget_tokens}, {"reps", o.reps},
                 {"arena_bytes", o.arena_bytes},     {"cpu", Json::array()}};
  for (int p : o.page_tokens) {
    if (p < 1 || o.budget_tokens % p != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--page-tokens ", p, " must divide --budget-tokens ", o.budget_tokens));
    }
  }
  if (!(o.gpu && o.gpu_only)) {
    std::printf(
        "gather into /dev/shm vs memcpy of the same bytes (%d kv heads x %d tokens, "
        "head_dim %d, fp16; medians of %d)\n",
        o.kv_heads, o.budget_tokens, o.head_dim, o.reps);
    std::printf("%6s %9s %7s %10s %10s %10s %10s %7s\n", "page", "frame", "threads", "bytes",
                "gather_us", "memcpy_us", "gather_GB/s", "ratio");
    for (int p : o.page_tokens) {
      const Geometry g = GeometryOf(o, p);
      ShmDst dst;
      RETURN_IF_ERROR(MapShm(g.bytes, &dst));
      Source src;
      RETURN_IF_ERROR(MakeSource(o.arena_bytes, g.frame_bytes, &src));
      for (int t : o.threads) {
        Json row = CpuRow(o, src, g, std::max(1, t), dst.data);
        std::printf("%6d %9llu %7d %10llu %10.1f %10.1f %10.2f %7.2f\n", p,
                    static_cast<unsigned long long>(g.frame_bytes), t,
                    static_cast<unsigned long long>(g.bytes), row["gather_us"].get<double>(),
                    row["memcpy_us"].get<double>(), row["gather_gbps"].get<double>(),
                    row["ratio"].get<double>());
        report["cpu"].push_back(row);
      }
    }
  }
  if (o.gpu) {
    Json rows = Json::array();
    std::string skipped;
    RETURN_IF_ERROR(GpuRows(o, &rows, &skipped));
    report["gpu"] = rows;
    if (!skipped.empty()) report["gpu_skipped"] = skipped;
  }
  if (!o.json.empty()) {
    std::ofstream f(o.json);
    f << DumpJson(report, 2) << "\n";
    if (!f) return absl::InternalError(absl::StrCat("cannot write ", o.json));
  }
  return absl::OkStatus();
}

namespace {

// One page size on the device, each mode: push + scatter against the
// contiguous pinned copy of the same bytes.
absl::Status GpuRowsForPage(CudaRuntime& cuda, const TransferOptions& o, int p, Json* rows) {
  const Geometry g = GeometryOf(o, p);
  Source src;
  RETURN_IF_ERROR(MakeSource(o.arena_bytes, g.frame_bytes, &src));
  const int pages = o.budget_tokens / p;
  PagedKvLayout l;
  l.format = PagedKvFormat::kVllmFlash;
  l.num_blocks = static_cast<uint32_t>(4 * pages);
  l.block_tokens = p;
  l.kv_heads = o.kv_heads;
  l.head_dim = o.head_dim;
  l.dtype = DType::kF16;
  const uint64_t cache_bytes = 2ull * l.num_blocks * p * o.kv_heads * o.head_dim * 2;
  ASSIGN_OR_RETURN(void* cache, cuda.AllocDevice(0, cache_bytes));
  ASSIGN_OR_RETURN(ResolvedKvLayout resolved, ResolveKvLayout(l, cache_bytes));
  std::vector<std::vector<uint32_t>> ids(o.kv_heads), fills(o.kv_heads);
  for (int h = 0; h < o.kv_heads; ++h) {
    for (int i = 0; i < pages; ++i) ids[h].push_back(i), fills[h].push_back(p);
  }
  ASSIGN_OR_RETURN(FetchLayout fetch, PlanFetchLayout(PageGeometry{p, o.head_dim, DType::kF16}, 0,
                                                      1, ids, fills, 0, cache_bytes));
  std::vector<uint32_t> blocks(pages);
  std::iota(blocks.begin(), blocks.end(), 0);
  std::mt19937 shuffle(p);
  std::shuffle(blocks.begin(), blocks.end(), shuffle);
  ASSIGN_OR_RETURN(ScatterPlan plan, PlanScatter(resolved, fetch, blocks));
  ASSIGN_OR_RETURN(void* pinned, cuda.AllocPinned(g.bytes));
  ASSIGN_OR_RETURN(void* block, cuda.AllocDevice(0, g.bytes));
  ASSIGN_OR_RETURN(void* copy_stream, cuda.CreateStream(0));
  std::memcpy(pinned, src.base, g.bytes);
  bool registered = false;
  for (const std::string& mode : o.gpu_modes) {
    auto region = std::make_shared<PinnedRegion>();
    if (mode == "direct") {
      if (!registered) {
        RETURN_IF_ERROR(cuda.HostRegister(src.base, src.bytes));
        registered = true;
      }
      ASSIGN_OR_RETURN(void* mapped, cuda.DevicePointerOf(src.base));
      region->Set(src.base, src.bytes, static_cast<uint8_t*>(mapped) - src.base);
    }
    ASSIGN_OR_RETURN(void* stream, cuda.CreateStream(0));
    PushChannel channel(&cuda, 0, stream,
                        mode == "zero-copy" ? ScatterMode::kZeroCopy : ScatterMode::kStaged,
                        region);
    std::mt19937_64 rng(p);
    std::vector<const uint8_t*> frames;
    const uint8_t* contiguous = nullptr;
    std::vector<double> push_s, copy_s;
    for (int r = 0; r < o.reps + 2; ++r) {
      Draw(rng, src, g, &frames, &contiguous);
      PushSpec spec;
      spec.scatter = &plan;
      spec.length = plan.staged_bytes;
      if (mode == "direct") spec.frames = PageFrames{frames.data(), frames.size(), g.frame_bytes};
      auto t0 = Clock::now();
      RETURN_IF_ERROR(channel.Push(static_cast<uint8_t*>(cache), spec, [&](uint8_t* dst) {
        GatherFrames(frames.data(), frames.size(), g.frame_bytes, dst);
      }));
      auto t1 = Clock::now();
      RETURN_IF_ERROR(cuda.CopyToDeviceAsync(0, copy_stream, block, pinned, g.bytes));
      RETURN_IF_ERROR(cuda.SynchronizeStream(0, copy_stream));
      auto t2 = Clock::now();
      if (r < 2) continue;
      push_s.push_back(std::chrono::duration<double>(t1 - t0).count());
      copy_s.push_back(std::chrono::duration<double>(t2 - t1).count());
    }
    if (mode == "direct" && channel.pushes_in_place() == 0) {
      return absl::InternalError("direct mode: no push read the pages in place");
    }
    const double ps = Median(push_s), cs = Median(copy_s);
    Json row = {{"page_tokens", p},
                {"bytes", g.bytes},
                {"mode", mode},
                {"push_scatter_us", ps * 1e6},
                {"pinned_copy_us", cs * 1e6},
                {"push_gbps", GbPerS(g.bytes, ps)},
                {"copy_gbps", GbPerS(g.bytes, cs)},
                {"ratio", ps > 0 ? cs / ps : 0}};
    std::printf("%6d %10s %10llu %14.1f %14.1f %10.2f %10.2f %7.2f\n", p, mode.c_str(),
                static_cast<unsigned long long>(g.bytes), ps * 1e6, cs * 1e6,
                row["push_gbps"].get<double>(), row["copy_gbps"].get<double>(),
                row["ratio"].get<double>());
    rows->push_back(row);
  }
  if (registered) cuda.HostUnregister(src.base).IgnoreError();
  cuda.DestroyStream(0, copy_stream).IgnoreError();
  cuda.FreeDevice(0, block).IgnoreError();
  cuda.FreePinned(pinned).IgnoreError();
  cuda.FreeDevice(0, cache).IgnoreError();
  return absl::OkStatus();
}

absl::Status GpuRows(const TransferOptions& o, Json* rows, std::string* skipped) {
  std::unique_ptr<CudaRuntime> cuda = CudaRuntime::Create();
  if (!cuda->available()) {
    *skipped = cuda->unavailable_reason();
    std::printf("GPU: skipped: %s\n", skipped->c_str());
    return absl::OkStatus();
  }
  std::printf(
      "GPU: push + scatter into a paged KV cache vs pinned cudaMemcpy of the same bytes, device 0 "
      "(%d kv heads x %d tokens, head_dim %d, fp16; medians of %d)\n",
      o.kv_heads, o.budget_tokens, o.head_dim, o.reps);
  std::printf("%6s %10s %10s %14s %14s %10s %10s %7s\n", "page", "mode", "bytes", "push_scatter_us",
              "pinned_copy_us", "push_GB/s", "copy_GB/s", "ratio");
  for (int p : o.page_tokens) RETURN_IF_ERROR(GpuRowsForPage(*cuda, o, p, rows));
  return absl::OkStatus();
}

}  // namespace
}  // namespace icecache::bench
