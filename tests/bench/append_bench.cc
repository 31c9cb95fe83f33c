#include "tests/bench/append_bench.h"

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/caller.h"
#include "common/cli.h"
#include "common/dtype.h"
#include "common/json.h"
#include "common/status_macros.h"
#include "common/synthetic.h"
#include "server/pool/page_pool.h"
#include "server/session/session_manager.h"
#include "server/transfer/buffer_registry.h"

namespace icecache::bench {
namespace {

using Clock = std::chrono::steady_clock;

// The insert route fov the sessions run with (the default where unset).
int InsertRouteFov(const AppendBenchOptions& o) {
  return o.insert_route_fov >= 0 ? o.insert_route_fov : MdciParams().insert_route_fov;
}

// The insert fit the sessions run with (the default where unset).
float InsertFit(const AppendBenchOptions& o) {
  return o.insert_fit >= 0.0f ? o.insert_fit : MdciParams().insert_fit;
}

// The mdci sessions' pq_factor: the daemon's default where unset
// (server/rpc/convert.cc), so the bench appends what a daemon's session does.
float MdciPq(const AppendBenchOptions& o) {
  if (o.mdci_pq >= 0.0f) return o.mdci_pq;
  return MdciParams::DaemonPqFactor(o.head_dim, o.q_heads / o.kv_heads);
}

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// CPU time of the calling thread, ms: a 1-token append runs on the caller
// (too small for the task arena), so this is its cost without the time the
// thread spent preempted on a shared machine.
double ThreadCpuMs() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1) from a running state (xorshift64*).
float Uniform(uint64_t* s) {
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  const uint64_t r = *s * 0x2545f4914f6cdd1dull;
  return static_cast<float>(static_cast<double>(r >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

// Where the appended rows come from.
class KvSource {
 public:
  virtual ~KvSource() = default;
  // Bytes of tokens [t0, t0 + n) of layers [first, first + count), in the
  // AppendKv layout of that range.
  virtual void Fill(int first, int count, int64_t t0, int64_t n,
                    std::vector<uint8_t>* out) const = 0;
};

// KV rows with the structure routing cares about and nothing else: each
// (layer, head) has kTopics key directions; a key follows one topic for a
// segment of kSegment positions (topics recur), plus uniform noise, so
// consecutive keys are no nearer each other than any two of their topic.
// Deterministic in (seed, layer, head, position), so decode tokens continue
// the prefill.
class TopicSource : public KvSource {
 public:
  static constexpr int kTopics = 64;
  static constexpr int64_t kSegment = 256;

  TopicSource(const SessionConfig& c, uint64_t seed) : c_(c), seed_(seed) {
    centers_.resize(static_cast<size_t>(c.layers) * c.kv_heads * kTopics * c.head_dim);
    uint64_t s = SplitMix(seed) | 1;
    for (float& x : centers_) x = 2.0f * Uniform(&s);
  }

  void Fill(int first, int count, int64_t t0, int64_t n, std::vector<uint8_t>* out) const override {
    const size_t d = c_.head_dim;
    out->resize(AppendBytes(c_, n, LayerRange{first, count}));
    const size_t half = out->size() / 2;
    std::vector<float> row(d);
    size_t r = 0;
    for (int l = first; l < first + count; ++l) {
      for (int h = 0; h < c_.kv_heads; ++h) {
        for (int64_t t = t0; t < t0 + n; ++t, ++r) {
          uint64_t s = SplitMix(seed_ ^ SplitMix((static_cast<uint64_t>(l) << 40) ^
                                                 (static_cast<uint64_t>(h) << 32) ^ t)) |
                       1;
          const uint64_t topic = SplitMix(seed_ + l * 7919 + h * 104729 + t / kSegment) % kTopics;
          const float* c =
              &centers_[((static_cast<size_t>(l) * c_.kv_heads + h) * kTopics + topic) * d];
          for (size_t k = 0; k < d; ++k) row[k] = c[k] + 0.6f * Uniform(&s);
          FromFloat(c_.dtype, row.data(), out->data() + r * d * DTypeSize(c_.dtype), d);
          for (size_t k = 0; k < d; ++k) row[k] = Uniform(&s);
          FromFloat(c_.dtype, row.data(), out->data() + half + r * d * DTypeSize(c_.dtype), d);
        }
      }
    }
  }

 private:
  SessionConfig c_;
  uint64_t seed_;
  std::vector<float> centers_;
};

// The realistic synthetic generator's keys and values (common/synthetic.h,
// a preset), one layer generated at a time (seed + layer) and held in the
// session's dtype: RoPE, topic segments, needles, sinks, as the quality
// figures use them. A decode insert's cost depends on where its key lands,
// so the realistic keys are the ones that tell what a model's appends cost.
class PresetSource : public KvSource {
 public:
  static absl::StatusOr<std::unique_ptr<PresetSource>> Create(const SessionConfig& c,
                                                              const std::string& preset,
                                                              uint64_t seed, int64_t tokens) {
    ASSIGN_OR_RETURN(SyntheticConfig sc, SyntheticPreset(preset));
    sc.layers = 1;
    sc.kv_heads = c.kv_heads;
    sc.q_heads = c.q_heads;
    sc.head_dim = c.head_dim;
    sc.tokens = tokens;
    sc.steps = 1;
    auto src = std::unique_ptr<PresetSource>(new PresetSource(c, tokens));
    const size_t per_layer = static_cast<size_t>(c.kv_heads) * tokens * c.head_dim;
    const size_t row = DTypeSize(c.dtype);
    src->keys_.resize(c.layers * per_layer * row);
    src->values_.resize(c.layers * per_layer * row);
    for (int l = 0; l < c.layers; ++l) {
      sc.seed = seed + static_cast<uint64_t>(l);
      ASSIGN_OR_RETURN(KvDump dump, GenerateSynthetic(sc));
      FromFloat(c.dtype, dump.keys.data(), src->keys_.data() + l * per_layer * row, per_layer);
      FromFloat(c.dtype, dump.values.data(), src->values_.data() + l * per_layer * row, per_layer);
      std::fprintf(stderr, "\r  generated layer %d/%d (%s)", l + 1, c.layers, preset.c_str());
    }
    std::fprintf(stderr, "\n");
    return src;
  }

  void Fill(int first, int count, int64_t t0, int64_t n, std::vector<uint8_t>* out) const override {
    const size_t row = static_cast<size_t>(c_.head_dim) * DTypeSize(c_.dtype);
    out->resize(AppendBytes(c_, n, LayerRange{first, count}));
    const size_t half = out->size() / 2;
    size_t r = 0;
    for (int l = first; l < first + count; ++l) {
      for (int h = 0; h < c_.kv_heads; ++h, r += n) {
        const size_t at = ((static_cast<size_t>(l) * c_.kv_heads + h) * tokens_ + t0) * row;
        std::memcpy(out->data() + r * row, keys_.data() + at, n * row);
        std::memcpy(out->data() + half + r * row, values_.data() + at, n * row);
      }
    }
  }

 private:
  PresetSource(const SessionConfig& c, int64_t tokens) : c_(c), tokens_(tokens) {}

  SessionConfig c_;
  int64_t tokens_;
  std::vector<uint8_t> keys_, values_;  // [layers][kv_heads][tokens] rows of c_.dtype
};

absl::StatusOr<std::unique_ptr<KvSource>> MakeSource(const AppendBenchOptions& o,
                                                     const SessionConfig& c) {
  if (o.keys == "topics") return std::unique_ptr<KvSource>(new TopicSource(c, o.seed));
  ASSIGN_OR_RETURN(std::unique_ptr<PresetSource> p,
                   PresetSource::Create(c, o.keys, o.seed, o.tokens + o.steps + 1));
  return std::unique_ptr<KvSource>(std::move(p));
}

struct Quantiles {
  double p50 = 0, p99 = 0, max = 0, mean = 0;
};

Quantiles Summarise(std::vector<double> v) {
  Quantiles q;
  if (v.empty()) return q;
  std::sort(v.begin(), v.end());
  q.p50 = v[v.size() / 2];
  q.p99 = v[std::min(v.size() - 1, static_cast<size_t>(std::ceil(0.99 * v.size())) - 1)];
  q.max = v.back();
  double sum = 0;
  for (double x : v) sum += x;
  q.mean = sum / static_cast<double>(v.size());
  return q;
}

// One timed step, kept for the slowest-steps list (what lands on the hot
// path now and then shows in the positions it lands at).
struct StepTime {
  int64_t position = 0;  // the appended token's position
  double ms = 0;
  double cpu_ms = 0;
  bool carved = false;  // the pool carved a new slab for the step's frames
};

struct SelectorRun {
  std::string selector;
  double prefill_s = 0;
  double first_ms = 0;
  Quantiles step_ms;  // steps after the first
  Quantiles cpu_ms;   // their thread CPU time
  // The same steps split by whether the pool carved a slab for them (its
  // memory faulted in on the append's path unless prefaulted ahead).
  Quantiles cpu_carved_ms, cpu_other_ms;
  int64_t steps_carved = 0;
  double pages_per_step = 0;  // pages the indexes opened, per step
  uint64_t pages = 0;
  uint64_t index_bytes = 0;
  std::vector<StepTime> slowest;  // by CPU time, slowest first
};

SessionConfig ConfigOf(const AppendBenchOptions& o, SelectorKind kind) {
  SessionConfig c;
  c.layers = o.layers;
  c.kv_heads = o.kv_heads;
  c.q_heads = o.q_heads;
  c.head_dim = o.head_dim;
  c.dtype = DType::kF16;
  c.page_tokens = o.page_tokens;
  c.selector = kind;
  c.ttl = absl::Hours(1);
  if (o.insert_route_fov >= 0) c.mdci.insert_route_fov = o.insert_route_fov;
  c.mdci.insert_fit = InsertFit(o);
  if (kind == SelectorKind::kMdci) c.mdci.pq_factor = MdciPq(o);
  return c;
}

absl::StatusOr<SelectorRun> RunOne(const AppendBenchOptions& o, const std::string& name) {
  ASSIGN_OR_RETURN(SelectorKind kind, ParseSelectorKind(name));
  const SessionConfig c = ConfigOf(o, kind);
  // Frames: pages at 80% fill at worst, one new page per step per index.
  const uint64_t frame = 2ull * o.page_tokens * o.head_dim * DTypeSize(c.dtype);
  const uint64_t pages = static_cast<uint64_t>(o.tokens / o.page_tokens * 1.25) + o.steps + 16;
  PagePoolOptions po;
  po.capacity_bytes = pages * frame * o.layers * o.kv_heads + (uint64_t{64} << 20);
  ASSIGN_OR_RETURN(std::unique_ptr<PagePool> pool, PagePool::Create(po));
  ASSIGN_OR_RETURN(std::unique_ptr<BufferRegistry> buffers,
                   BufferRegistry::Create(BufferRegistryOptions()));
  SessionManagerOptions mo;
  mo.pool = pool.get();
  mo.buffers = buffers.get();
  mo.reaper_interval = absl::Seconds(1);  // as the daemon: it also faults in slabs ahead
  mo.build_threads = o.build_threads;
  mo.decode_threads = o.decode_threads;
  mo.max_tokens_per_session = o.tokens + o.steps + 1;
  ASSIGN_OR_RETURN(std::unique_ptr<SessionManager> manager, SessionManager::Create(mo));
  const Caller caller{"bench", static_cast<uint32_t>(getuid()), false};
  ASSIGN_OR_RETURN(SessionInfo info, manager->CreateSession(caller, c));
  ASSIGN_OR_RETURN(const std::unique_ptr<KvSource> src, MakeSource(o, c));
  const KvSource& source = *src;

  SelectorRun run;
  run.selector = name;
  std::vector<uint8_t> bytes;
  double prefill_ms = 0;
  for (int l = 0; l < o.layers; ++l) {  // one layer per call, as a client streams it
    source.Fill(l, 1, 0, o.tokens, &bytes);
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(manager->AppendKv(caller, info.id, o.tokens, bytes, LayerRange{l, 1}).status());
    prefill_ms += Ms(t0, Clock::now());
    std::fprintf(stderr, "\r  %s: prefill layer %d/%d", name.c_str(), l + 1, o.layers);
  }
  std::fprintf(stderr, "\n");
  run.prefill_s = prefill_ms / 1e3;
  bytes.clear();
  bytes.shrink_to_fit();
  // Every step's bytes ahead, so only the append is timed.
  std::vector<std::vector<uint8_t>> steps(o.steps + 1);
  for (int i = 0; i <= o.steps; ++i) source.Fill(0, o.layers, o.tokens + i, 1, &steps[i]);
  ASSIGN_OR_RETURN(SessionInfo before, manager->GetSession(caller, info.id));
  std::vector<double> ms, cpu, cpu_carved, cpu_other;
  std::vector<StepTime> times;
  ms.reserve(o.steps);
  cpu.reserve(o.steps);
  times.reserve(o.steps);
  uint64_t reserved = pool->Stats().reserved_bytes;
  std::vector<uint64_t> evict(static_cast<size_t>(o.evict_mib) << 17);
  for (int i = 0; i <= o.steps; ++i) {
    // Untimed: another working set takes the caches (a decode's selections).
    for (size_t k = 0; k < evict.size(); k += 8) evict[k] += static_cast<uint64_t>(i);
    const double c0 = ThreadCpuMs();
    const auto t0 = Clock::now();
    RETURN_IF_ERROR(manager->AppendKv(caller, info.id, 1, steps[i]).status());
    const double dt = Ms(t0, Clock::now());
    const double dc = ThreadCpuMs() - c0;
    const uint64_t reserved_now = pool->Stats().reserved_bytes;
    const bool carved = reserved_now > reserved;
    reserved = reserved_now;
    if (i == 0) {
      run.first_ms = dt;
    } else {
      ms.push_back(dt);
      cpu.push_back(dc);
      (carved ? cpu_carved : cpu_other).push_back(dc);
      times.push_back({o.tokens + i, dt, dc, carved});
    }
  }
  run.steps_carved = static_cast<int64_t>(cpu_carved.size());
  run.cpu_carved_ms = Summarise(std::move(cpu_carved));
  run.cpu_other_ms = Summarise(std::move(cpu_other));
  const size_t keep = std::min<size_t>(times.size(), static_cast<size_t>(o.slowest));
  std::partial_sort(times.begin(), times.begin() + keep, times.end(),
                    [](const StepTime& a, const StepTime& b) { return a.cpu_ms > b.cpu_ms; });
  run.slowest.assign(times.begin(), times.begin() + keep);
  run.step_ms = Summarise(std::move(ms));
  run.cpu_ms = Summarise(std::move(cpu));
  ASSIGN_OR_RETURN(SessionInfo after, manager->GetSession(caller, info.id));
  run.pages = after.pages;
  run.pages_per_step = static_cast<double>(after.pages - before.pages) / (o.steps + 1);
  run.index_bytes = after.index_bytes;
  return run;
}

Json ToJson(const AppendBenchOptions& o, const std::vector<SelectorRun>& runs) {
  const double heads = static_cast<double>(o.layers) * o.kv_heads;
  Json j;
  j["benchmark"] = "append";
  j["tokens"] = o.tokens;
  j["layers"] = o.layers;
  j["kv_heads"] = o.kv_heads;
  j["head_dim"] = o.head_dim;
  j["page_tokens"] = o.page_tokens;
  j["steps"] = o.steps;
  j["build_threads"] = o.build_threads;
  j["decode_threads"] = o.decode_threads;
  j["evict_mib"] = o.evict_mib;
  j["insert_route_fov"] = InsertRouteFov(o);
  j["insert_fit"] = InsertFit(o);
  j["keys"] = o.keys;
  j["mdci_pq_factor"] = MdciPq(o);
  Json list = Json::array();
  for (const SelectorRun& r : runs) {
    Json e;
    e["selector"] = r.selector;
    e["prefill_s"] = r.prefill_s;
    e["first_append_ms"] = r.first_ms;
    e["append_ms_p50"] = r.step_ms.p50;
    e["append_ms_p99"] = r.step_ms.p99;
    e["append_ms_max"] = r.step_ms.max;
    e["append_ms_mean"] = r.step_ms.mean;
    e["append_cpu_ms_p50"] = r.cpu_ms.p50;
    e["append_cpu_ms_p99"] = r.cpu_ms.p99;
    e["append_us_per_head_p50"] = r.step_ms.p50 * 1e3 / heads;
    e["append_us_per_head_p99"] = r.step_ms.p99 * 1e3 / heads;
    e["append_ms_p50_scaled_32_layers"] = r.step_ms.p50 * 32.0 / o.layers;
    e["append_ms_p99_scaled_32_layers"] = r.step_ms.p99 * 32.0 / o.layers;
    e["steps_carving_a_slab"] = r.steps_carved;
    e["append_cpu_ms_p50_carving"] = r.cpu_carved_ms.p50;
    e["append_cpu_ms_max_carving"] = r.cpu_carved_ms.max;
    e["append_cpu_ms_p50_not_carving"] = r.cpu_other_ms.p50;
    e["append_cpu_ms_p99_not_carving"] = r.cpu_other_ms.p99;
    e["append_cpu_ms_max_not_carving"] = r.cpu_other_ms.max;
    e["pages_opened_per_step"] = r.pages_per_step;
    e["pages"] = r.pages;
    e["index_bytes"] = r.index_bytes;
    Json slow = Json::array();
    for (const StepTime& t : r.slowest) {
      slow.push_back(
          {{"position", t.position}, {"ms", t.ms}, {"cpu_ms", t.cpu_ms}, {"carved", t.carved}});
    }
    e["slowest_steps"] = std::move(slow);
    list.push_back(std::move(e));
  }
  j["selectors"] = std::move(list);
  return j;
}

void PrintTable(const AppendBenchOptions& o, const std::vector<SelectorRun>& runs) {
  const double heads = static_cast<double>(o.layers) * o.kv_heads;
  std::printf(
      "\n1-token appends at %lld tokens: %d layers x %d kv heads (%g indexes per step), "
      "%d steps, keys %s, insert route fov %d, insert fit %g, mdci pq factor %g, %s%s\n",
      static_cast<long long>(o.tokens), o.layers, o.kv_heads, heads, o.steps, o.keys.c_str(),
      InsertRouteFov(o), InsertFit(o), MdciPq(o),
      o.decode_threads > 0 ? absl::StrCat(o.decode_threads, " decode threads, ").c_str() : "",
      o.evict_mib > 0 ? absl::StrCat(o.evict_mib, " MiB written between steps (cold)").c_str()
                      : "warm");
  std::printf("%-10s %10s %10s %9s %9s %9s %9s %9s %12s %12s %14s\n", "selector", "prefill_s",
              "first_ms", "p50_ms", "p99_ms", "max_ms", "cpu_p50", "cpu_p99", "p50_us/head",
              "p99_us/head", "p50_ms@32L*");
  for (const SelectorRun& r : runs) {
    std::printf("%-10s %10.2f %10.3f %9.3f %9.3f %9.3f %9.3f %9.3f %12.2f %12.2f %14.3f\n",
                r.selector.c_str(), r.prefill_s, r.first_ms, r.step_ms.p50, r.step_ms.p99,
                r.step_ms.max, r.cpu_ms.p50, r.cpu_ms.p99, r.step_ms.p50 * 1e3 / heads,
                r.step_ms.p99 * 1e3 / heads, r.step_ms.p50 * 32.0 / o.layers);
  }
  std::printf("%-10s %10s %10s %10s %10s %10s %10s %11s\n", "by cause", "pages/step", "carving",
              "cpu_p50", "cpu_max", "others", "cpu_p99", "cpu_max");
  for (const SelectorRun& r : runs) {
    std::printf("%-10s %10.2f %10lld %10.3f %10.3f %10lld %10.3f %11.3f\n", r.selector.c_str(),
                r.pages_per_step, static_cast<long long>(r.steps_carved), r.cpu_carved_ms.p50,
                r.cpu_carved_ms.max, static_cast<long long>(o.steps - r.steps_carved),
                r.cpu_other_ms.p99, r.cpu_other_ms.max);
  }
  for (const SelectorRun& r : runs) {
    if (r.slowest.empty()) continue;
    std::printf("%s, slowest steps by cpu (position: cpu ms, c = carved a slab):",
                r.selector.c_str());
    for (const StepTime& t : r.slowest) {
      std::printf(" %lld: %.3f%s", static_cast<long long>(t.position), t.cpu_ms,
                  t.carved ? " c" : "");
    }
    std::printf("\n");
  }
  std::printf(
      "wall: the AppendKv call; cpu: its thread's CPU time (without preemption on a shared "
      "machine)\n* scaled: the p50 step times 32 / layers (a 32-layer model's step), not "
      "measured\n");
}

}  // namespace

AppendFlags::AppendFlags(CLI::App* app) {
  app->add_option("--tokens", o_.tokens, "prefill context (tokens)")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--layers", o_.layers, "model layers (every step appends to all of them)")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--kv-heads", o_.kv_heads, "KV heads per layer")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--q-heads", o_.q_heads, "query heads")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--head-dim", o_.head_dim, "head dimension")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--page-tokens", o_.page_tokens, "tokens per page")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--steps", o_.steps, "timed 1-token appends")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--selectors", o_.selectors, "selectors, comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  app->add_option("--build-threads", o_.build_threads, "threads of the prefill's index builds")
      ->check(cli::Positive())
      ->capture_default_str();
  app->add_option("--decode-threads", o_.decode_threads,
                  "threads of a decode append's inserts and row writes (0: all cores)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--slowest", o_.slowest, "list this many slowest steps with their positions")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--evict-mib", o_.evict_mib,
                  "write this many MiB of another buffer between steps, untimed (cold trees, as "
                  "in a decode); 0: warm")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--insert-route-fov", o_.insert_route_fov,
                  "mdci nodes kept per routing level by a decode insert (0: route_fov; -1: the "
                  "default)")
      ->check(CLI::Range(-1, 64))
      ->capture_default_str();
  app->add_option("--keys", o_.keys,
                  "where the KV rows come from: topics (64 key directions per head, a topic per "
                  "256 positions, uniform noise) or a synthetic preset (the realistic generator, "
                  "e.g. llama3-8b-like; one layer generated at a time)")
      ->capture_default_str();
  app->add_option("--insert-fit", o_.insert_fit,
                  "mdci: a decode key within this factor of the spread of the nearest recent node "
                  "with room joins it unrouted (0: every key routed; -1: the default)")
      ->check(CLI::Range(-1.0f, 1000.0f))
      ->capture_default_str();
  app->add_option("--mdci-pq", o_.mdci_pq,
                  "mdci sessions' pq_factor (0: the tree only; -1: the daemon's default, the PQ "
                  "codes written on every insert)")
      ->check(CLI::Range(-1.0f, 512.0f))
      ->capture_default_str();
  app->add_option("--seed", o_.seed, "KV generator seed")->capture_default_str();
  app->add_option("--json", o_.json, "write the JSON report to FILE");
}

absl::Status RunAppendBench(const AppendBenchOptions& o) {
  for (const std::string& s : o.selectors) RETURN_IF_ERROR(ParseSelectorKind(s).status());
  std::vector<SelectorRun> runs;
  for (const std::string& s : o.selectors) {
    ASSIGN_OR_RETURN(SelectorRun r, RunOne(o, s));
    runs.push_back(std::move(r));
  }
  PrintTable(o, runs);
  if (!o.json.empty()) {
    std::ofstream f(o.json);
    f << DumpJson(ToJson(o, runs), 2) << "\n";
    if (!f) return absl::InternalError(absl::StrCat("cannot write ", o.json));
  }
  return absl::OkStatus();
}

}  // namespace icecache::bench
