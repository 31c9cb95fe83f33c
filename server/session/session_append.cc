#include "server/session/session_append.h"

#include <sys/resource.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/thread_cpu.h"
#include "server/index/dci_tree.h"
#include "server/index/headroom.h"
#include "server/index/parallel_build.h"
#include "server/pool/frame_checksum.h"
#include "server/session/decode_lanes.h"

namespace icecache {
namespace {

// Index of the first non-finite element of `n` elements of `dtype`, or -1.
// Keys of magnitude 2^59 or more are refused: the squared norm of a row of
// up to 1024 of them would overflow float32 (the indexes' arithmetic), which
// once surfaced as an index error after part of the append was applied.
constexpr int kMaxKeyExponent = 59;

// Elements tested per block: a block is tested branch-free (the loop
// vectorises; a prefill checks hundreds of MiB per call), and only a block
// with a hit is searched element by element for the first one.
constexpr int64_t kScanBlock = 2048;

// Index of the first of `n` elements of type T at `p` (any alignment) for
// which `hit` is true, or -1.
template <typename T, typename Hit>
int64_t FirstHit(const uint8_t* p, int64_t n, Hit hit) {
  for (int64_t begin = 0; begin < n; begin += kScanBlock) {
    const int64_t end = std::min(n, begin + kScanBlock);
    unsigned any = 0;
    for (int64_t i = begin; i < end; ++i) {
      T v;
      std::memcpy(&v, p + sizeof(T) * i, sizeof(T));
      any |= hit(v) ? 1u : 0u;
    }
    if (any == 0) continue;
    for (int64_t i = begin; i < end; ++i) {
      T v;
      std::memcpy(&v, p + sizeof(T) * i, sizeof(T));
      if (hit(v)) return i;
    }
  }
  return -1;
}

// Index of the first element whose float32 exponent is `max_exponent` or
// more (NaN and Inf included: their exponent field is all ones), or -1.
// max_exponent >= 128 means "NaN or Inf only". fp16 is finite below 2^16, so
// for it only NaN/Inf count.
int64_t FirstAtOrAbove(DType dtype, const uint8_t* p, int64_t n, int max_exponent) {
  const uint32_t biased = static_cast<uint32_t>(std::min(max_exponent, 128) + 127);
  switch (dtype) {
    case DType::kF16:
      return FirstHit<uint16_t>(p, n, [](uint16_t v) { return (v & 0x7c00) == 0x7c00; });
    case DType::kBF16:  // the top 16 bits of a float32
      return FirstHit<uint16_t>(p, n,
                                [biased](uint16_t v) { return ((v >> 7) & 0xffu) >= biased; });
    case DType::kF32:
      return FirstHit<uint32_t>(p, n,
                                [biased](uint32_t v) { return ((v >> 23) & 0xffu) >= biased; });
  }
  return 0;
}

bool IsNonFinite(DType dtype, const uint8_t* p, int64_t i) {
  return FirstAtOrAbove(dtype, p + i * DTypeSize(dtype), 1, 128) == 0;
}

// The keys of session index gi's group's first layer, as fp32.
void KeysOf(const Session& s, const AppendInput& in, int64_t gi, float* keys) {
  const int g = static_cast<int>(gi / s.config.kv_heads);
  const int h = static_cast<int>(gi % s.config.kv_heads);
  ToFloat(s.config.dtype, in.key_row(s.FirstLayerOf(g), h, 0), keys,
          static_cast<size_t>(in.n) * s.config.head_dim);
}

void KeysOf(const Session& s, const AppendInput& in, int64_t gi, std::vector<float>* keys) {
  keys->resize(static_cast<size_t>(in.n) * s.config.head_dim);
  KeysOf(s, in, gi, keys->data());
}

// Never trust an index with memory safety: every placement must name a page
// that exists and a slot inside it, and no index may open more pages than
// were reserved for it; else no byte is written.
absl::Status CheckPlacements(const Session& s, const AppendPlan& plan, int64_t i,
                             const Selector& sel) {
  const std::vector<Placement>& placed = plan.placements[i];
  const uint32_t pages_now = sel.num_pages();
  bool ok = placed.size() == static_cast<size_t>(plan.n) && pages_now >= plan.pages_before[i] &&
            pages_now - plan.pages_before[i] <= plan.max_new_pages[i];
  for (size_t t = 0; ok && t < placed.size(); ++t) {
    ok = placed[t].page < pages_now && placed[t].slot < static_cast<uint32_t>(s.config.page_tokens);
  }
  if (ok) return absl::OkStatus();
  const int64_t gi = plan.base + i;
  return absl::InternalError(
      absl::StrCat("append: index of layer group ", gi / s.config.kv_heads, " kv head ",
                   gi % s.config.kv_heads, " returned invalid placements (", placed.size(), " for ",
                   plan.n, " tokens; ", plan.pages_before[i], " -> ", pages_now, " pages)"));
}

// One task of the first append's parallel build: plan index i, built aside.
// A prefill's fp32 keys (16 MiB per index at 32768 tokens of head dim 128)
// live in a reused mapping of `scratch` (none: a vector): a fresh one would
// take a page fault per 4 KiB, as much as a positional build's whole work.
absl::Status BuildAside(const Session& s, const SelectorConfig& sc, const AppendInput& in,
                        StagingCache* scratch, AppendPlan& plan, int64_t i) {
  const int64_t gi = plan.base + i;
  ASSIGN_OR_RETURN(plan.built[i], Selector::Create(sc, s.page_keys[gi].get()));
  // CheckAppendInput refused every non-finite byte of the append; this
  // selector's later appends (Insert) pass the same check.
  plan.built[i]->set_keys_prechecked(true);
  const uint64_t key_bytes = static_cast<uint64_t>(in.n) * s.config.head_dim * sizeof(float);
  std::vector<float> small;
  StagingBuffer big;
  float* keys;
  if (scratch != nullptr && scratch->Caches(key_bytes)) {
    ASSIGN_OR_RETURN(big, scratch->Acquire(key_bytes));
    keys = reinterpret_cast<float*>(big.data());  // page-aligned
  } else {
    small.resize(key_bytes / sizeof(float));
    keys = small.data();
  }
  KeysOf(s, in, gi, keys);
  RETURN_IF_ERROR(plan.built[i]->Build(keys, in.n, &plan.placements[i]));
  s.trees_built.fetch_add(1, std::memory_order_relaxed);
  return absl::OkStatus();
}

// Minor page faults of the calling thread so far.
int64_t ThreadMinorFaults() {
  struct rusage ru;
  if (getrusage(RUSAGE_THREAD, &ru) != 0) return 0;
  return ru.ru_minflt;
}

// One task of a later append: inserts into index i of the live session.
absl::Status InsertInto(Session& s, const AppendInput& in, AppendPlan& plan, int64_t i)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  const int64_t gi = plan.base + i;
  // Decode chunks are small: one buffer per thread, reused, instead of an
  // allocation per (group, head) per token.
  thread_local std::vector<float> keys;
  KeysOf(s, in, gi, &keys);
  RETURN_IF_ERROR(s.selectors[gi]->Insert(keys.data(), in.n, &plan.placements[i]));
  if (keys.capacity() > (size_t{1} << 20)) std::vector<float>().swap(keys);  // a big chunk's
  return CheckPlacements(s, plan, i, *s.selectors[gi]);
}

// The pages index i's placements write to, each once, ascending.
std::vector<uint32_t> TouchedPages(const AppendPlan& plan, int64_t i) {
  std::vector<uint32_t> pages;
  pages.reserve(plan.placements[i].size());
  for (const Placement& pl : plan.placements[i]) pages.push_back(pl.page);
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  return pages;
}

}  // namespace

SelectorConfig SelectorConfigOf(const Session& s) {
  SelectorConfig sc;
  sc.kind = s.config.selector;
  sc.head_dim = s.config.head_dim;
  sc.dtype = s.config.dtype;
  sc.page_tokens = s.config.page_tokens;
  sc.num_query_heads = s.q_per_kv;
  sc.mdci = s.config.mdci;
  return sc;
}

std::vector<SlotRun> UnwrittenSlots(const std::vector<Placement>& placements, uint32_t pages_before,
                                    uint32_t pages_now, int page_tokens) {
  std::vector<SlotRun> runs;
  if (pages_now <= pages_before) return runs;
  const size_t words = (static_cast<size_t>(page_tokens) + 63) / 64;
  std::vector<uint64_t> written(static_cast<size_t>(pages_now - pages_before) * words, 0);
  for (const Placement& pl : placements) {
    if (pl.page < pages_before || pl.page >= pages_now) continue;
    written[(pl.page - pages_before) * words + pl.slot / 64] |= uint64_t{1} << (pl.slot % 64);
  }
  for (uint32_t p = pages_before; p < pages_now; ++p) {
    const uint64_t* w = &written[(p - pages_before) * words];
    int slot = 0;
    while (slot < page_tokens) {
      if (w[slot / 64] >> (slot % 64) & 1) {
        ++slot;
        continue;
      }
      const int begin = slot;
      while (slot < page_tokens && !(w[slot / 64] >> (slot % 64) & 1)) ++slot;
      runs.push_back({p, static_cast<uint32_t>(begin), static_cast<uint32_t>(slot)});
    }
  }
  return runs;
}

namespace {

// One task of WriteRows: the K and V rows of index i, every layer of its
// group, then the checksums of the frames written (docs/architecture.md §5):
// a decode append that fills a partial page rehashes that page. The new
// pages' slots no row lands in are zeroed (the frames come from the pool
// holding a former owner's bytes, and a page is fetched whole); the slots
// the rows fill are not, so a prefill writes each byte once.
void WriteIndexRows(Session& s, const AppendInput& in, const AppendPlan& plan, int64_t i)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  const int g = static_cast<int>((plan.base + i) / s.config.kv_heads);
  const int h = static_cast<int>((plan.base + i) % s.config.kv_heads);
  const uint64_t kv_block = static_cast<uint64_t>(s.config.page_tokens) * in.row_bytes;
  const std::vector<uint32_t> touched =
      s.keep_sums ? TouchedPages(plan, i) : std::vector<uint32_t>();
  const std::vector<SlotRun> unwritten =
      UnwrittenSlots(plan.placements[i], plan.pages_before[i],
                     s.selectors[plan.base + i]->num_pages(), s.config.page_tokens);
  for (int l = s.FirstLayerOf(g); l < s.FirstLayerOf(g) + s.LayersIn(g); ++l) {
    const std::vector<uint8_t*>& table = s.page_frames[s.FrameTableIndex(l, h)];
    for (const SlotRun& run : unwritten) {
      const uint64_t bytes = (run.end - run.begin) * in.row_bytes;
      std::memset(table[run.page] + run.begin * in.row_bytes, 0, bytes);
      std::memset(table[run.page] + kv_block + run.begin * in.row_bytes, 0, bytes);
    }
    for (int64_t t = 0; t < in.n; ++t) {
      const Placement& pl = plan.placements[i][t];
      uint8_t* frame = table[pl.page];
      std::memcpy(frame + pl.slot * in.row_bytes, in.key_row(l, h, t), in.row_bytes);
      std::memcpy(frame + kv_block + pl.slot * in.row_bytes, in.value_row(l, h, t), in.row_bytes);
    }
    if (touched.empty()) continue;
    // Each task owns its (layer, head) tables: no two tasks write one vector.
    std::vector<uint64_t>& sums = s.page_sums[s.FrameTableIndex(l, h)];
    for (uint32_t p : touched) sums[p] = FrameChecksum(table[p], s.frame_bytes);
  }
}

absl::Status CheckLayerRange(const SessionConfig& c, LayerRange range) {
  const int end = range.first + (range.count > 0 ? range.count : c.layers - range.first);
  if (range.first < 0 || range.first >= c.layers || range.count < 0 || end > c.layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "append: layers ", range.first, "..", end - 1, " are not within the model's ", c.layers,
        " layers (first_layer ", range.first, ", num_layers ", range.count, ")"));
  }
  if (range.first % c.layer_reuse != 0 || (end % c.layer_reuse != 0 && end != c.layers)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "append: layers ", range.first, "..", end - 1, " must be whole layer groups (layer_reuse=",
        c.layer_reuse, "): first_layer and first_layer + num_layers multiples of ", c.layer_reuse));
  }
  return absl::OkStatus();
}

}  // namespace

bool AppendBytesClean(DType dtype, uint64_t half, uint64_t at, const uint8_t* p, uint64_t len) {
  const uint64_t esize = DTypeSize(dtype);
  const uint64_t key_len = at < half ? std::min(len, half - at) : 0;
  if (key_len > 0 &&
      FirstAtOrAbove(dtype, p, static_cast<int64_t>(key_len / esize), kMaxKeyExponent) >= 0) {
    return false;
  }
  return len == key_len ||
         FirstAtOrAbove(dtype, p + key_len, static_cast<int64_t>((len - key_len) / esize), 128) < 0;
}

absl::StatusOr<AppendInput> CheckAppendInput(const SessionConfig& c, int64_t max_append_tokens,
                                             int64_t n, LayerRange range,
                                             absl::Span<const uint8_t> bytes, bool values_clean) {
  if (n < 1 || n > max_append_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("append: n must be in 1..", max_append_tokens, ", got ", n));
  }
  RETURN_IF_ERROR(CheckLayerRange(c, range));
  const int layers = range.count > 0 ? range.count : c.layers - range.first;
  const uint64_t expected = AppendBytes(c, n, range);
  if (bytes.size() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("append: ", n, " tokens of ", layers, " layers x ", c.kv_heads, " kv heads x ",
                     c.head_dim, " dims x K,V in ", std::string(DTypeName(c.dtype)),
                     " need exactly ", expected, " bytes, got ", bytes.size()));
  }
  AppendInput in;
  in.n = n;
  in.first_layer = range.first;
  in.num_layers = layers;
  in.bytes = bytes;
  in.kv_heads = c.kv_heads;
  const size_t esize = DTypeSize(c.dtype);
  in.row_bytes = static_cast<uint64_t>(c.head_dim) * esize;
  in.half = expected / 2;
  // Keys, then values: a NaN/Inf in either would poison every attention
  // output that selects its page, so both are refused before anything moves.
  const int64_t per_half = static_cast<int64_t>(in.half / esize);
  const int64_t per_layer = static_cast<int64_t>(c.kv_heads) * n * c.head_dim;
  for (const char* what : {"key", "value"}) {
    if (values_clean) break;
    const bool keys = what[0] == 'k';
    const uint8_t* half = bytes.data() + (keys ? 0 : in.half);
    const int64_t bad = FirstAtOrAbove(c.dtype, half, per_half, keys ? kMaxKeyExponent : 128);
    if (bad < 0) continue;
    const std::string why = IsNonFinite(c.dtype, half, bad)
                                ? "is NaN or Inf"
                                : absl::StrCat("has an element of magnitude 2^", kMaxKeyExponent,
                                               " or more (its norm would overflow float32)");
    return absl::InvalidArgumentError(
        absl::StrCat("append: ", what, " of layer ", range.first + bad / per_layer, ", kv head ",
                     (bad % per_layer) / (n * c.head_dim), ", token ",
                     (bad % (n * c.head_dim)) / c.head_dim, " ", why, "; nothing was stored"));
  }
  return in;
}

absl::Status CheckChunkOrder(const Session& s, const AppendInput& in) {
  if (s.next_layer == 0 && in.first_layer != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("append: a new chunk of tokens starts at layer 0; got first_layer ",
                     in.first_layer, " (session ", s.id, " holds ", s.tokens, " tokens)"));
  }
  if (s.next_layer != 0 && (in.first_layer != s.next_layer || in.n != s.pending_tokens)) {
    return absl::FailedPreconditionError(
        absl::StrCat("append: session ", s.id, " expects layers ", s.next_layer,
                     ".. of the chunk of ", s.pending_tokens, " tokens next; got first_layer ",
                     in.first_layer, " with ", in.n, " tokens"));
  }
  return absl::OkStatus();
}

absl::StatusOr<AppendPlan> PlanAppend(const Session& s, const AppendInput& in, int build_threads,
                                      int decode_threads, StagingCache* scratch) {
  const SessionConfig& c = s.config;
  const int first_group = s.GroupOf(in.first_layer);
  const int end_group = s.GroupOf(in.end_layer() - 1) + 1;
  AppendPlan plan;
  plan.n = in.n;
  plan.base = first_group * c.kv_heads;
  plan.num_indices = (end_group - first_group) * c.kv_heads;
  plan.first = s.group_tokens[first_group] == 0;
  // A tree insert costs about 10 us a token (routing, representatives): one
  // decode token into a few dozen trees is worth the shared pool. A
  // positional insert costs well under 1 us: only large chunks gain from
  // threads; small ones are cheaper serially than through a task arena.
  const bool tree_layout =
      c.selector == SelectorKind::kMdci || c.selector == SelectorKind::kExactMdci;
  const int64_t work = in.n * plan.num_indices;
  if (plan.first) {
    plan.threads = work >= 8192 ? build_threads : 1;
  } else if (tree_layout ? work >= 32 : work >= 8192) {
    plan.threads = decode_threads;
  } else {
    plan.threads = 1;
  }
  plan.placements.resize(plan.num_indices);
  plan.pages_before.assign(plan.num_indices, 0);
  plan.max_new_pages.assign(plan.num_indices, static_cast<uint64_t>(in.n));
  if (plan.first) {
    // The reservation is computed from the built indices: no page bound.
    std::fill(plan.max_new_pages.begin(), plan.max_new_pages.end(), ~uint64_t{0});
    plan.built.resize(plan.num_indices);
    const SelectorConfig sc = SelectorConfigOf(s);
    const int trees_before = s.trees_built.load();  // appends are serialised
    absl::Status built = ParallelFor(plan.num_indices, plan.threads, [&](int64_t i) {
      return BuildAside(s, sc, in, scratch, plan, i);
    });
    if (!built.ok()) {
      s.trees_built.store(trees_before);
      return built;
    }
    for (int i = 0; i < plan.num_indices; ++i) {
      RETURN_IF_ERROR(CheckPlacements(s, plan, i, *plan.built[i]));  // nothing stored yet
      const int g = (plan.base + i) / c.kv_heads;
      plan.reserve += uint64_t{plan.built[i]->num_pages()} * s.LayersIn(g);
    }
    return plan;
  }
  const bool positional = UsesPositionalLayout(c.selector);
  for (int i = 0; i < plan.num_indices; ++i) {
    const int g = (plan.base + i) / c.kv_heads;
    plan.pages_before[i] = s.selectors[plan.base + i]->num_pages();
    uint64_t worst = static_cast<uint64_t>(in.n);
    if (positional) {
      const int64_t P = c.page_tokens;
      const int64_t after = (s.group_tokens[g] + in.n + P - 1) / P;
      worst = static_cast<uint64_t>(std::max<int64_t>(0, after - plan.pages_before[i]));
    }
    plan.max_new_pages[i] = worst;
    plan.reserve += worst * s.LayersIn(g);
  }
  return plan;
}

namespace {

// fn(i) for every index of a later append: on the decode lanes when the plan
// has them, else on `plan.threads` (ParallelFor).
absl::Status ForEachIndex(const AppendPlan& plan, const std::function<absl::Status(int64_t)>& fn) {
  if (plan.lanes != nullptr && plan.threads != 1) return plan.lanes->Run(plan.num_indices, fn);
  return ParallelFor(plan.num_indices, plan.threads, fn);
}

}  // namespace

absl::Status ApplyToIndexes(Session& s, const AppendInput& in, AppendPlan& plan) {
  if (plan.first) {
    for (int i = 0; i < plan.num_indices; ++i)
      s.selectors[plan.base + i] = std::move(plan.built[i]);
    return absl::OkStatus();
  }
  // The tasks run while this thread holds s.mu and waits for them.
  absl::Status inserted = ForEachIndex(plan, [&](int64_t i) {
    s.mu.AssertHeld();
    return InsertInto(s, in, plan, i);
  });
  if (inserted.ok()) return inserted;
  // Keys were checked for NaN/Inf, so this is an index bug; some indices may
  // have changed while others did not.
  s.broken = true;
  return absl::InternalError(absl::StrCat("append: index insert failed: ", inserted.message(),
                                          "; session ", s.id, " is now unusable"));
}

absl::StatusOr<uint64_t> WriteRows(Session& s, const AppendInput& in, const AppendPlan& plan,
                                   FrameSet reserved) {
  const SessionConfig& c = s.config;
  uint64_t taken = 0;
  for (int i = 0; i < plan.num_indices; ++i) {
    const int g = (plan.base + i) / c.kv_heads;
    const int h = (plan.base + i) % c.kv_heads;
    const uint32_t pages_now = s.selectors[plan.base + i]->num_pages();
    for (int l = s.FirstLayerOf(g); l < s.FirstLayerOf(g) + s.LayersIn(g); ++l) {
      std::vector<uint8_t*>& table = s.page_frames[s.FrameTableIndex(l, h)];
      // Room for the decode pages after a prefill (headroom.h): the table
      // is not reallocated on a decode append's path.
      if (plan.first) table.reserve(TokensWithHeadroom(pages_now));
      for (uint32_t p = plan.pages_before[i]; p < pages_now; ++p) {
        table.push_back(reserved.frame(taken++));  // zeroed where unwritten: WriteIndexRows
        if (s.keep_sums) s.page_sums[s.FrameTableIndex(l, h)].push_back(0);  // set by the rows
      }
    }
  }
  // taken <= reserved.size(): CheckPlacements bounded every index's pages.
  // Frames [0, taken) are in use; the worst-case surplus goes back now.
  reserved.TakeBack(reserved.size() - taken).Reset();
  if (plan.first) s.frames.Reserve(TokensWithHeadroom(s.frames.size() + taken));
  s.frames.Absorb(std::move(reserved)).IgnoreError();  // same pool, tenant, class
  // The tasks run while this thread holds s.mu and waits for them.
  RETURN_IF_ERROR(ForEachIndex(plan, [&](int64_t i) {
    s.mu.AssertHeld();  // by the waiting caller
    WriteIndexRows(s, in, plan, i);
    return absl::OkStatus();
  }));
  return taken;
}

namespace {

// The chunk's progress: the session's token count moves when its last layer
// is in.
void AdvanceChunk(Session& s, const AppendInput& in) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  if (in.end_layer() == s.config.layers) {
    s.tokens += in.n;
    s.chunks.push_back(in.n);
    s.next_layer = 0;
    s.pending_tokens = 0;
  } else {
    s.next_layer = in.end_layer();
    s.pending_tokens = in.n;
  }
}

// The lock-free views of the session, and its last use.
void RefreshViews(Session& s, absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) {
  StoreViews(s);
  s.Touch(now);
}

AppendResult ResultOf(const Session& s, uint64_t new_pages) ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
  AppendResult result;
  result.tokens = s.tokens;
  result.next_layer = s.next_layer;
  result.new_pages = new_pages;
  result.frame_bytes = s.frame_bytes_view.load();
  return result;
}

}  // namespace

AppendResult Publish(Session& s, const AppendInput& in, uint64_t new_pages, absl::Time now) {
  for (int g = s.GroupOf(in.first_layer); g <= s.GroupOf(in.end_layer() - 1); ++g) {
    s.group_tokens[g] += in.n;
  }
  AdvanceChunk(s, in);
  RefreshViews(s, now);
  return ResultOf(s, new_pages);
}

// ---------------------------------------------------------------- background builds

bool BuildsInBackground(const Session& s, const AppendInput& in) {
  const SelectorKind k = s.config.selector;
  return (k == SelectorKind::kMdci || k == SelectorKind::kExactMdci) &&
         s.group_tokens[s.GroupOf(in.first_layer)] == 0;
}

AppendPlan PlanBackgroundBuild(const Session& s, const AppendInput& in) {
  const SessionConfig& c = s.config;
  const int first_group = s.GroupOf(in.first_layer);
  const int end_group = s.GroupOf(in.end_layer() - 1) + 1;
  AppendPlan plan;
  plan.n = in.n;
  plan.first = true;
  plan.base = first_group * c.kv_heads;
  plan.num_indices = (end_group - first_group) * c.kv_heads;
  plan.placements.resize(plan.num_indices);
  plan.pages_before.assign(plan.num_indices, 0);
  plan.built.resize(plan.num_indices);
  // The tree's own bound (about n / P when r = P, the pages the keys fill):
  // the frames of ranges still being built are held meanwhile, so a looser
  // bound (it was n / P + n / r, twice the need) made a prefill streamed
  // faster than its builds run out of pool.
  const int r = c.mdci.promotion_ratio > 0 ? c.mdci.promotion_ratio : std::max(2, c.page_tokens);
  const uint64_t worst = DciTree::MaxBulkBuildPages(in.n, c.page_tokens, r);
  plan.max_new_pages.assign(plan.num_indices, worst);
  for (int i = 0; i < plan.num_indices; ++i) {
    plan.reserve += worst * s.LayersIn((plan.base + i) / c.kv_heads);
  }
  return plan;
}

AppendResult AcceptPendingBuild(Session& s, const AppendInput& in, absl::Time now) {
  for (int g = s.GroupOf(in.first_layer); g <= s.GroupOf(in.end_layer() - 1); ++g) {
    s.group_building[g] = 1;
  }
  AdvanceChunk(s, in);
  RefreshViews(s, now);
  return ResultOf(s, 0);
}

void RunPendingBuild(PendingBuild& job, int build_threads, StagingCache* scratch, absl::Time now) {
  Session& s = *job.session;
  AppendPlan& plan = job.plan;
  // No session lock while building: BuildAside reads only immutable fields,
  // the job's own bytes and its own selectors; the groups are marked
  // building, so nothing else touches their tables meanwhile.
  const SelectorConfig sc = SelectorConfigOf(s);
  const int trees_before = s.trees_built.load();
  const absl::Time trees_start = absl::Now();
  absl::Status built = ParallelFor(plan.num_indices, build_threads, [&](int64_t i) {
    const int64_t cpu0 = ThreadCpuNanos();
    const int64_t faults0 = ThreadMinorFaults();
    absl::Status st = BuildAside(s, sc, job.in, scratch, plan, i);
    job.tree_cpu_ns.fetch_add(ThreadCpuNanos() - cpu0, std::memory_order_relaxed);
    job.tree_minor_faults.fetch_add(ThreadMinorFaults() - faults0, std::memory_order_relaxed);
    return st;
  });
  job.trees_wall = absl::Now() - trees_start;
  absl::MutexLock write(&s.mu);
  for (int i = 0; built.ok() && i < plan.num_indices; ++i) {
    built = CheckPlacements(s, plan, i, *plan.built[i]);
  }
  for (int g = s.GroupOf(job.in.first_layer); g <= s.GroupOf(job.in.end_layer() - 1); ++g) {
    s.group_building[g] = 0;
  }
  if (!built.ok()) {
    // The caller's call has returned: the session cannot take this back.
    s.trees_built.store(trees_before);
    s.broken = true;
    RefreshViews(s, now);
    return;  // the reserved frames go back to the pool with the job
  }
  ApplyToIndexes(s, job.in, plan).IgnoreError();  // installs; cannot fail for a first append
  absl::StatusOr<uint64_t> written = WriteRows(s, job.in, plan, std::move(job.frames));
  if (!written.ok()) s.broken = true;
  for (int g = s.GroupOf(job.in.first_layer); g <= s.GroupOf(job.in.end_layer() - 1); ++g) {
    s.group_tokens[g] += job.in.n;
  }
  RefreshViews(s, now);
}

void StoreViews(Session& s) {
  uint64_t pages = 0, index_bytes = 0, inserted = 0, unrouted = 0;
  for (const auto& sel : s.selectors) {
    if (sel == nullptr) continue;
    pages += sel->num_pages();
    index_bytes += sel->index_bytes();
    const Selector::InsertCounts c = sel->insert_counts();
    inserted += c.inserted;
    unrouted += c.unrouted;
  }
  s.tokens_view.store(s.tokens);
  s.next_layer_view.store(s.next_layer);
  s.pages_view.store(pages);
  s.frame_bytes_view.store(s.frames.size() * PagePool::StrideFor(s.frame_bytes));
  s.index_bytes_view.store(index_bytes);
  s.decode_keys_view.store(inserted);  // before the unrouted count (session.h)
  s.decode_keys_unrouted_view.store(unrouted);
}

}  // namespace icecache
