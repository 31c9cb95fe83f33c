#include "server/session/session.h"

#include <algorithm>
#include <atomic>
#include <cassert>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "common/status_macros.h"
#include "server/index/parallel_build.h"
#include "server/index/token_select.h"
#include "server/pool/frame_checksum.h"
#include "server/session/calibration_memory.h"
#include "server/session/decode_lanes.h"

namespace icecache {

namespace {

uint64_t NextWriterId() {
  static std::atomic<uint64_t> next{1};  // 0 is WriteLog::kNoWriter
  return next.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

Session::Session(std::string id_in, std::string tenant_in, uint64_t epoch_in,
                 const SessionConfig& config_in, SizeClassId size_class_in, absl::Time now,
                 bool keep_sums_in)
    : id(std::move(id_in)),
      tenant(std::move(tenant_in)),
      epoch(epoch_in),
      config(config_in),
      size_class(size_class_in),
      geometry{config_in.page_tokens, config_in.head_dim, config_in.dtype},
      frame_bytes(geometry.frame_bytes()),
      groups(NumLayerGroups(config_in)),
      q_per_kv(config_in.q_heads / config_in.kv_heads),
      created(now),
      keep_sums(keep_sums_in || config_in.checksums.mode != ChecksumMode::kOff),
      resident(config_in.layers),
      writer_id(NextWriterId()) {
  last_use_ns.store(absl::ToUnixNanos(now));
  pinned.store(config_in.pinned);
  absl::MutexLock l(&mu);
  page_frames.resize(static_cast<size_t>(config.layers) * config.kv_heads);
  if (keep_sums) page_sums.resize(page_frames.size());
  selectors.resize(static_cast<size_t>(groups) * config.kv_heads);
  head_costs = std::make_unique<HeadCost[]>(selectors.size());
  carries = std::make_unique<HeadCarry[]>(selectors.size());
  // Staggered phases (CandidateCarry::phase), numbered across the session's
  // (group, head) pairs: with an even number of KV heads each layer's heads
  // alternate; with one (MQA) or an odd number the layers do, so no token
  // has every head scanning either.
  for (size_t i = 0; i < selectors.size(); ++i) {
    absl::MutexLock carry_lock(&carries[i].mu);
    carries[i].carry.phase = static_cast<int>(i);
  }
  group_tokens.assign(groups, 0);
  group_building.assign(groups, 0);
  for (int g = 0; g < groups; ++g) {
    for (int h = 0; h < config.kv_heads; ++h) {
      page_keys.push_back(
          std::make_unique<FramePageKeys>(&page_frames[FrameTableIndex(FirstLayerOf(g), h)]));
    }
  }
  absl::MutexLock c(&cache_mu);
  group_cache.resize(groups);
  absl::MutexLock p(&prefetch_mu);
  prefetch.resize(groups);
}

bool Session::SelectionCurrent(int group, uint64_t generation, int64_t tokens) const {
  if (group_tokens[group] != tokens) return false;
  absl::MutexLock l(&cache_mu);
  return group_cache[group].generation == generation && group_cache[group].tokens == tokens;
}

namespace {

absl::Status CheckLayer(const Session& s, int layer) {
  if (layer < 0 || layer >= s.config.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer must be in 0..", s.config.layers - 1, ", got ", layer));
  }
  return absl::OkStatus();
}

// Resolves request params against the session defaults (0 = default, -1 = 0
// for sink/recent) and clamps the budget to the session's tokens.
absl::StatusOr<SelectParams> ResolveParams(const SessionConfig& c, const SelectParams& in,
                                           int64_t tokens) {
  SelectParams p = in;
  auto pick = [](int v, int def) { return v == 0 ? (def < 0 ? 0 : def) : (v < 0 ? 0 : v); };
  if (in.budget_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "select: budget_tokens must be >= 0 (0 = session default), got ", in.budget_tokens));
  }
  if (in.sink_tokens < -1 || in.recent_tokens < -1) {
    return absl::InvalidArgumentError("select: sink_tokens and recent_tokens must be >= -1");
  }
  p.budget_tokens = in.budget_tokens == 0 ? c.default_select.budget_tokens : in.budget_tokens;
  if (p.budget_tokens <= 0) p.budget_tokens = SelectParams().budget_tokens;
  p.sink_tokens = pick(in.sink_tokens, c.default_select.sink_tokens);
  p.recent_tokens = pick(in.recent_tokens, c.default_select.recent_tokens);
  if (p.budget_tokens > tokens) p.budget_tokens = static_cast<int>(tokens);
  return p;
}

absl::Status CheckQueries(const SessionConfig& c, const std::vector<float>& queries) {
  const size_t expect = static_cast<size_t>(c.q_heads) * c.head_dim;
  if (queries.size() != expect) {
    return absl::InvalidArgumentError(
        absl::StrCat("select: queries must hold q_heads x head_dim = ", c.q_heads, " x ",
                     c.head_dim, " = ", expect, " floats, got ", queries.size()));
  }
  for (size_t i = 0; i < expect; ++i) {
    if (!std::isfinite(queries[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "select: query head ", i / c.head_dim, " element ", i % c.head_dim, " is NaN or Inf"));
    }
  }
  return absl::OkStatus();
}

// Runs fn(h) for every KV head h on `threads` (ParallelFor semantics; with
// `order`, a permutation of the heads, they start in that order:
// ParallelForInOrder; with `lanes`, on those, in order too) and returns the
// error of the lowest failing head, as the head's own error (no task numbers
// in the caller's message).
absl::Status ForEachHead(int heads, int threads, const std::function<absl::Status(int)>& fn,
                         absl::Span<const int> order = {}, DecodeLanes* lanes = nullptr) {
  std::vector<absl::Status> status(heads);
  auto run = [&](int64_t i) {
    const int h = order.empty() ? static_cast<int>(i) : order[i];
    status[h] = fn(h);
    return absl::OkStatus();
  };
  if (lanes != nullptr && threads != 1) {
    RETURN_IF_ERROR(lanes->Run(heads, run));
  } else {
    RETURN_IF_ERROR(order.empty() ? ParallelFor(heads, threads, run)
                                  : ParallelForInOrder(heads, threads, run));
  }
  for (absl::Status& s : status) {
    if (!s.ok()) return std::move(s);
  }
  return absl::OkStatus();
}

// The copy of one fetch: frames in buffer order, those to check with their
// expected checksums. Copy() may run for disjoint ranges concurrently.
struct FrameCopier {
  static constexpr size_t kNone = ~size_t{0};
  explicit FrameCopier(uint64_t frame_bytes) : bytes(frame_bytes) {}

  // Copies frames [first, first + count) to the buffer at `offset`, hashing
  // each frame to check right before its copy; stops at a mismatch (records
  // the lowest bad frame in `bad`; its bytes are not copied).
  // `check`: BufferLease::Write's (kChecked where the caller checked the
  // whole region once).
  absl::Status Copy(BufferLease& lease, uint64_t offset, size_t first, size_t count,
                    BufferLease::FileCheck check = BufferLease::FileCheck::kNow) {
    return lease.Write(
        offset, count * bytes, [&](uint8_t* dst) { Gather(first, count, dst); }, check);
  }

  // Hashes every frame to check, before anything is written; false at the
  // first mismatch (recorded in `bad`). Gather then checks nothing again.
  bool VerifyAll() {
    for (size_t k = 0; k < check.size(); ++k) {
      checked.fetch_add(1, std::memory_order_relaxed);
      if (FrameChecksum(frames[check[k]], bytes) != expected[k]) {
        bad.store(check[k]);
        check.clear();
        return false;
      }
    }
    check.clear();
    return true;
  }

  // The copy itself: frames [first, first + count) to dst.
  void Gather(size_t first, size_t count, uint8_t* dst) {
    if (check.empty()) {
      GatherFrames(frames.data() + first, count, bytes, dst);
      return;
    }
    auto next = std::lower_bound(check.begin(), check.end(), first);
    for (size_t i = first; i < first + count; ++i) {
      if (next != check.end() && *next == i) {
        const uint64_t want = expected[next - check.begin()];
        ++next;
        checked.fetch_add(1, std::memory_order_relaxed);
        if (FrameChecksum(frames[i], bytes) != want) {
          size_t cur = bad.load();
          while (i < cur && !bad.compare_exchange_weak(cur, i)) {
          }
          return;
        }
      }
      std::memcpy(dst + (i - first) * bytes, frames[i], bytes);
    }
  }

  const uint64_t bytes;
  std::vector<const uint8_t*> frames;
  std::vector<size_t> block_start;
  std::vector<size_t> check;       // ascending frame indices to check
  std::vector<uint64_t> expected;  // their checksums
  std::atomic<uint64_t> checked{0};
  std::atomic<size_t> bad{kNone};
};

// Token fetches (checksums on): the distinct pages the rows of one (layer,
// head) block are read from, each sampled like a page of a page fetch
// (`*index` numbers them across the request).
std::vector<uint32_t> PagesToCheck(const std::vector<Placement>& rows, uint64_t seed,
                                   double fraction, size_t* index) {
  std::vector<uint32_t> pages;
  pages.reserve(rows.size());
  for (const Placement& p : rows) pages.push_back(p.page);
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  std::vector<uint32_t> check;
  for (uint32_t p : pages) {
    if (SampleFrame(seed, (*index)++, fraction)) check.push_back(p);
  }
  return check;
}

// DataLoss naming the first of `pages` of (layer, head) whose frame no longer
// matches its checksum.
absl::Status CheckPages(const Session& s, int layer, int head, const std::vector<uint32_t>& pages)
    ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
  const size_t t = s.FrameTableIndex(layer, head);
  for (uint32_t p : pages) {
    if (FrameChecksum(s.page_frames[t][p], s.frame_bytes) == s.page_sums[t][p]) continue;
    return absl::DataLossError(absl::StrCat(
        "fetch: session ", s.id, " layer ", layer, " kv head ", head, " page ", p,
        " failed its checksum (its stored bytes changed after they were appended); its tokens "
        "were not sent. Drop the session and send its prefill again"));
  }
  return absl::OkStatus();
}

// A placement hint (FetchRequest::token_hints) holds when its page exists,
// the slot is filled and it holds `position`.
bool HintHolds(const Selector& sel, const Placement& p, int32_t position) {
  return p.page < sel.num_pages() && p.slot < sel.fill(p.page) &&
         sel.positions(p.page)[p.slot] == position;
}

}  // namespace

void Session::EnableQuality(std::vector<std::unique_ptr<HeadQualityMonitor>> heads,
                            QualitySampler* sampler_in) {
  quality = std::move(heads);
  sampler = sampler_in;
  if (sampler != nullptr) {
    quality_account = sampler->NewAccount(selection_ns.load(), calibration_cpu_ns.load());
  }
}

absl::Status Session::CheckUsable() const {
  if (!broken) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("session ", id, " is unusable after an internal index error; drop it"));
}

absl::StatusOr<SelectResult> Session::Select(const SelectRequest& req,
                                             SelectDestination destination, int threads,
                                             std::vector<QualityProbe>* probes,
                                             DecodeLanes* lanes) {
  RETURN_IF_ERROR(CheckLayer(*this, req.layer));
  RETURN_IF_ERROR(CheckUsable());
  SelectResult result;
  result.layer = req.layer;
  result.group = GroupOf(req.layer);
  // A layer group is selectable as soon as its own layers hold tokens, while
  // later layers of a chunk are still arriving.
  const int64_t tokens = group_tokens[result.group];
  result.tokens = tokens;
  if (tokens == 0) {
    if (next_layer == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("session ", id, " holds no tokens yet; AppendKv first"));
    }
    return absl::FailedPreconditionError(
        absl::StrCat("session ", id, ": layer ", req.layer, " holds no tokens yet (layers ",
                     next_layer, ".. of the first chunk have not been appended)"));
  }
  const bool first_of_group = FirstLayerOf(result.group) == req.layer;
  if (req.reuse_group_selection && first_of_group) {
    return absl::InvalidArgumentError(
        config.layer_reuse == 1
            ? absl::StrCat("select: reuse_group_selection needs a session with layer_reuse > 1; "
                           "session ",
                           id, " has layer_reuse 1, so every layer selects with its own queries")
            : absl::StrCat("select: reuse_group_selection on layer ", req.layer,
                           ", the first layer of its group (layers ", req.layer, "..",
                           req.layer + LayersIn(result.group) - 1,
                           "): send this layer's queries without it; the group's later layers "
                           "may reuse its selection"));
  }
  if (req.reuse_group_selection) {
    absl::MutexLock l(&cache_mu);
    const GroupSelection& cached = group_cache[result.group];
    if (cached.tokens != tokens) {
      return absl::FailedPreconditionError(
          absl::StrCat("select: no selection of layer group ", result.group, " at ", tokens,
                       " tokens to reuse; select layer ", FirstLayerOf(result.group), " first"));
    }
    result.heads = cached.heads;
    result.reused = true;
    result.generation = cached.generation;
    return result;
  }
  RETURN_IF_ERROR(CheckQueries(config, req.queries));
  ASSIGN_OR_RETURN(SelectParams params, ResolveParams(config, req.params, tokens));
  params.granularity = CallGranularity(config, req.granularity, destination);
  if (calibration_memory != nullptr) {
    std::call_once(seed_once, [&] {
      first_select_tokens.store(tokens, std::memory_order_relaxed);
      calibration_memory->Seed(*this, tokens);
    });
  }
  result.heads.resize(config.kv_heads);
  std::vector<std::unique_ptr<QualityProbe>> chosen(probes != nullptr ? config.kv_heads : 0);
  // Longest first (by what each head's next select is expected to cost): a
  // calibrated head's width or exact fallback makes it up to 10x another,
  // and with the carry a fresh select costs about three carried ones (by
  // the last select alone the order came out shortest first at carry 1,
  // where each head alternates); started last, a long head would hold the
  // layer up alone. The tasks run while this thread holds mu (shared) and
  // waits for them.
  std::vector<int> order(config.kv_heads);
  std::iota(order.begin(), order.end(), 0);
  const size_t first = SelectorIndex(result.group, 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return head_costs[first + a].Expected() > head_costs[first + b].Expected();
  });
  RETURN_IF_ERROR(ForEachHead(
      config.kv_heads, threads,
      [&](int h) {
        mu.AssertReaderHeld();
        return SelectHead(result.group, h, req.queries, params, tokens, &result.heads[h],
                          chosen.empty() ? nullptr : &chosen[h]);
      },
      order, lanes));
  for (auto& p : chosen) {
    if (p != nullptr) probes->push_back(std::move(*p));
  }
  if (first_of_group) {
    absl::MutexLock l(&cache_mu);
    result.generation = ++last_generation;
    group_cache[result.group].tokens = tokens;
    group_cache[result.group].generation = result.generation;
    // Kept for the group's later layers (reuse_group_selection, the
    // prefetch); a group of one layer has none.
    if (LayersIn(result.group) > 1) group_cache[result.group].heads = result.heads;
  }
  return result;
}

absl::Status Session::SelectHead(int group, int h, const std::vector<float>& queries,
                                 const SelectParams& params, int64_t tokens, Selection* out,
                                 std::unique_ptr<QualityProbe>* probe) {
  const size_t index = SelectorIndex(group, h);
  HeadQualityMonitor* hq = quality.empty() ? nullptr : quality[index].get();
  SelectParams p = params;
  if (hq != nullptr) hq->Apply(&p);
  if (hq != nullptr && p.carry_steps > 0) {
    // The session's pooled judgement (carry_pool.h) may shorten or stop the
    // carry of heads without a judgement of their own (asked, under the
    // calibrator's lock, only where the pool allows less than the head asks).
    const int pooled = carry_pool.Steps(p.carry_steps);
    if (pooled < p.carry_steps && !hq->CarryJudged()) p.carry_steps = pooled;
  }
  const float* q = queries.data() + static_cast<size_t>(h) * q_per_kv * config.head_dim;
  const auto t0 = std::chrono::steady_clock::now();
  // Thread CPU time too (monitored heads): the calibrator compares it with
  // the references' (timed the same way on the sampler's thread), which a
  // loaded machine's wall clock would skew.
  const int64_t cpu0 = hq != nullptr ? ThreadCpuNanos() : 0;
  if (p.carry_steps > 0 && carries[index].mu.TryLock()) {
    p.carry = &carries[index].carry;
    const absl::Status selected = selectors[index]->Select(q, q_per_kv, p, out);
    carries[index].mu.Unlock();
    p.carry = nullptr;  // the probe's copy and any re-selection collect afresh
    RETURN_IF_ERROR(selected);
  } else {
    p.carry_steps = 0;
    RETURN_IF_ERROR(selectors[index]->Select(q, q_per_kv, p, out));
  }
  if (out->carried) selects_carried.fetch_add(1, std::memory_order_relaxed);
  const int64_t ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
          .count();
  selection_ns.fetch_add(ns, std::memory_order_relaxed);
  head_costs[index].Record(ns, out->carried, out->carry_age, p.carry_steps);
  if (hq == nullptr) return absl::OkStatus();  // not monitored
  // Upkeep (a query basis installed) is the index's, not this width's cost.
  const int64_t cpu_ns = std::max<int64_t>(0, ThreadCpuNanos() - cpu0 - out->upkeep_cpu_ns);
  // The budget is a share of this session's selection time.
  if (sampler != nullptr) sampler->AddSelectionTime(ns, *quality_account);
  if (!hq->ShouldSample(p, cpu_ns, out->carry_age) || probe == nullptr) return absl::OkStatus();
  // Over budget or a full queue: no copy now; the head stays due.
  bool burst = sampler == nullptr || !fair_burst;
  if (!burst) {
    // A measurement's cost so far in this session: the estimate for the
    // head's measurements still queued.
    const int64_t run = probes_run.load(std::memory_order_relaxed);
    const int64_t estimate = run > 0 ? calibration_cpu_ns.load(std::memory_order_relaxed) / run : 0;
    burst = hq->MayUseBurst(static_cast<int>(quality.size()),
                            absl::ToInt64Nanoseconds(sampler->burst()), estimate);
  }
  if (sampler != nullptr && !sampler->Admits(*quality_account, burst)) {
    samples_dropped.fetch_add(1, std::memory_order_relaxed);
    return absl::OkStatus();
  }
  // Copied here so the measurement never touches the caller's buffers.
  auto made = std::make_unique<QualityProbe>();
  made->group = group;
  made->head = h;
  made->tokens = tokens;
  made->queries.assign(q, q + static_cast<size_t>(q_per_kv) * config.head_dim);
  made->params = p;
  made->pages = out->pages;
  made->burst = burst;
  made->carried = out->carried;
  made->carry_age = out->carry_age;
  if (p.granularity == Granularity::kToken) made->positions = out->positions;
  *probe = std::move(made);
  return absl::OkStatus();
}

absl::StatusOr<FetchLayout> Session::Fetch(BufferLease& lease, const FetchRequest& req, int threads,
                                           ChecksumCounters* counters, DecodeLanes* lanes) const {
  const SessionConfig& c = config;
  RETURN_IF_ERROR(CheckLayer(*this, req.layer));
  if (req.num_layers < 1 || req.layer + req.num_layers > c.layers) {
    return absl::InvalidArgumentError(absl::StrCat("fetch: num_layers must be in 1..",
                                                   c.layers - req.layer, ", got ", req.num_layers));
  }
  const int group = GroupOf(req.layer);
  if (GroupOf(req.layer + req.num_layers - 1) != group) {
    // The request is well formed; it disagrees with this session's layer
    // grouping (documented as FAILED_PRECONDITION in kv.proto).
    return absl::FailedPreconditionError(
        absl::StrCat("fetch: layers ", req.layer, "..", req.layer + req.num_layers - 1,
                     " cross a layer group boundary (layer_reuse=", c.layer_reuse, ")"));
  }
  RETURN_IF_ERROR(CheckUsable());
  if (!req.tokens.empty()) return FetchTokens(lease, req, group, threads, counters, lanes);
  if (req.pages.size() != static_cast<size_t>(c.kv_heads)) {
    return absl::InvalidArgumentError(
        absl::StrCat("fetch: pages must list ", c.kv_heads, " kv heads, got ", req.pages.size()));
  }
  std::vector<std::vector<uint32_t>> fills(c.kv_heads);
  for (int h = 0; h < c.kv_heads; ++h) {
    const Selector* sel = selectors.empty() ? nullptr : selectors[SelectorIndex(group, h)].get();
    const uint32_t num_pages = sel == nullptr ? 0 : sel->num_pages();
    fills[h].reserve(req.pages[h].size());
    for (uint32_t p : req.pages[h]) {
      if (p >= num_pages) {
        return absl::InvalidArgumentError(absl::StrCat("fetch: page ", p, " of kv head ", h,
                                                       " does not exist (", num_pages, " pages)"));
      }
      fills[h].push_back(sel->fill(p));
    }
  }
  ASSIGN_OR_RETURN(FetchLayout layout, PlanFetchLayout(geometry, req.layer, req.num_layers,
                                                       req.pages, fills, req.offset, lease.size()));
  // These bytes are this write's until it returns. While another session's
  // write into them runs, this one is refused before anything changes
  // (write_log.h).
  ASSIGN_OR_RETURN(BufferLease::WriteClaim claim,
                   lease.ClaimWrite(writer_id, layout.buffer_offset, layout.total_bytes));
  // Pages over a token write's rows: that write's record goes (resident_rows.h).
  resident.Overwritten(lease.id(), layout.buffer_offset, layout.total_bytes);
  lease.NoteWrite(writer_id, layout.buffer_offset, layout.total_bytes);
  if (req.want_positions) {
    for (int h = 0; h < c.kv_heads; ++h) {
      if (req.pages[h].empty()) continue;  // (selectors may not exist yet)
      const Selector* sel = selectors[SelectorIndex(group, h)].get();
      for (uint32_t p : req.pages[h]) {
        const int32_t* pos = sel->positions(p);
        layout.heads[h].positions.insert(layout.heads[h].positions.end(), pos, pos + sel->fill(p));
      }
    }
  }
  // Frames in buffer order: layer, then KV head, then the head's pages; the
  // block of (layer j, head h) starts at block_start[j * kv_heads + h].
  FrameCopier copier(frame_bytes);
  copier.frames.reserve(static_cast<size_t>(layout.total_slots()) * req.num_layers);
  copier.block_start.reserve(static_cast<size_t>(req.num_layers) * c.kv_heads + 1);
  const bool verify = keep_sums && c.checksums.mode != ChecksumMode::kOff;
  const uint64_t seed = verify ? fetch_seq.fetch_add(1, std::memory_order_relaxed) : 0;
  const double fraction =
      c.checksums.mode == ChecksumMode::kSampled ? c.checksums.sample_fraction : 1.0;
  for (int j = 0; j < req.num_layers; ++j) {
    for (int h = 0; h < c.kv_heads; ++h) {
      copier.block_start.push_back(copier.frames.size());
      const size_t t = FrameTableIndex(req.layer + j, h);
      for (uint32_t p : req.pages[h]) {
        if (verify && SampleFrame(seed, copier.frames.size(), fraction)) {
          copier.check.push_back(copier.frames.size());
          copier.expected.push_back(page_sums[t][p]);
        }
        copier.frames.push_back(page_frames[t][p]);
      }
    }
  }
  copier.block_start.push_back(copier.frames.size());
  const uint64_t bytes = frame_bytes;
  absl::Status copied;
  if (!req.device.empty() || lease.kind() == BufferKind::kCudaIpc) {
    // One push per request (docs/architecture.md §6.3): the gather fills
    // daemon-owned pinned staging, never client memory, so it needs no guard;
    // or the device reads the frames in place (device_push.h), so the
    // checksums are verified first, and a bad page stops the push whole.
    if (copier.VerifyAll()) {
      const PageFrames frames{copier.frames.data(), copier.frames.size(), bytes};
      copied = lease.WriteFetch(
          layout, req.device, [&](uint8_t* dst) { copier.Gather(0, copier.frames.size(), dst); },
          frames);
    }
  } else if (threads == 1 || layout.total_bytes < kParallelGatherBytes) {
    copied = copier.Copy(lease, req.offset, 0, copier.frames.size());
  } else {
    // Each block is its own guarded write: a truncated buffer fails the block
    // that meets it (FailedPrecondition) wherever it runs. The file is
    // checked once for the whole region, not per block.
    const int blocks = static_cast<int>(copier.block_start.size()) - 1;
    copied = lease.CheckRegion(req.offset, layout.total_bytes);
    if (copied.ok()) {
      copied = ForEachHead(
          blocks, threads,
          [&](int b) {
            const size_t first = copier.block_start[b];
            return copier.Copy(lease, req.offset + first * bytes, first,
                               copier.block_start[b + 1] - first, BufferLease::FileCheck::kChecked);
          },
          {}, lanes);
    }
  }
  if (counters != nullptr) {
    counters->verified.fetch_add(copier.checked.load(), std::memory_order_relaxed);
  }
  if (copier.bad.load() == FrameCopier::kNone) {
    RETURN_IF_ERROR(copied);
    return layout;
  }
  if (counters != nullptr) counters->failures.fetch_add(1, std::memory_order_relaxed);
  const size_t bad = copier.bad.load();
  const size_t block = static_cast<size_t>(std::upper_bound(copier.block_start.begin(),
                                                            copier.block_start.end(), bad) -
                                           copier.block_start.begin()) -
                       1;
  const int h = static_cast<int>(block % c.kv_heads);
  return absl::DataLossError(absl::StrCat(
      "fetch: session ", id, " layer ", req.layer + static_cast<int>(block / c.kv_heads),
      " kv head ", h, " page ", req.pages[h][bad - copier.block_start[block]],
      " failed its checksum (its stored bytes changed after they were appended); the page was "
      "not sent. Drop the session and send its prefill again"));
}

absl::StatusOr<FetchLayout> Session::FetchTokens(BufferLease& lease, const FetchRequest& req,
                                                 int group, int threads, ChecksumCounters* counters,
                                                 DecodeLanes* lanes) const {
  const SessionConfig& c = config;
  if (req.tokens.size() != static_cast<size_t>(c.kv_heads)) {
    return absl::InvalidArgumentError(
        absl::StrCat("fetch: tokens must list ", c.kv_heads, " kv heads, got ", req.tokens.size()));
  }
  if (!req.device.empty() || lease.kind() == BufferKind::kCudaIpc) {
    return absl::FailedPreconditionError(
        "fetch: token granularity writes to HOST_SHM buffers only (this buffer is CUDA_IPC or the "
        "request has device fields); select with GRANULARITY_PAGE for a device buffer");
  }
  for (int h = 0; h < static_cast<int>(req.pages.size()); ++h) {
    if (!req.pages[h].empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "fetch: kv head ", h, " lists both pages and tokens; ask for one or the other"));
    }
  }
  // Every position, checked and placed, before anything is written.
  const int64_t held = group_tokens[group];
  std::vector<std::vector<Placement>> placed(c.kv_heads);
  std::vector<std::vector<uint32_t>> slot_pages(c.kv_heads), fills(c.kv_heads);
  for (int h = 0; h < c.kv_heads; ++h) {
    const Selector* sel = selectors.empty() ? nullptr : selectors[SelectorIndex(group, h)].get();
    placed[h].reserve(req.tokens[h].size());
    const std::vector<Placement>* hints = h < static_cast<int>(req.token_hints.size()) &&
                                                  req.token_hints[h].size() == req.tokens[h].size()
                                              ? &req.token_hints[h]
                                              : nullptr;
    for (size_t i = 0; i < req.tokens[h].size(); ++i) {
      const int32_t pos = req.tokens[h][i];
      if (pos < 0 || pos >= held || sel == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("fetch: token position ", pos,
                                                       " of kv head ", h, " is not in 0..",
                                                       held - 1, " (the session's tokens)"));
      }
      if (hints != nullptr && (req.hints_checked || HintHolds(*sel, (*hints)[i], pos))) {
        assert(HintHolds(*sel, (*hints)[i], pos));
        placed[h].push_back((*hints)[i]);
      } else {
        placed[h].push_back(sel->placement_of(pos));
      }
    }
    PackedFills(static_cast<int64_t>(placed[h].size()), c.page_tokens, &fills[h]);
    slot_pages[h].assign(fills[h].size(), kTokenSlot);
  }
  ASSIGN_OR_RETURN(FetchLayout layout,
                   PlanFetchLayout(geometry, req.layer, req.num_layers, slot_pages, fills,
                                   req.offset, lease.size()));
  // These bytes are this write's until it returns (as Fetch's).
  ASSIGN_OR_RETURN(BufferLease::WriteClaim claim,
                   lease.ClaimWrite(writer_id, req.offset, layout.total_bytes));
  // In place (resident_rows.h): the record of the previous token write of
  // these layers here, taken before anything is written (with every record
  // these bytes overlap); the new one is put once the write succeeded.
  std::optional<ResidentRegion> before =
      resident.TakeForWrite(req.layer, lease.id(), req.offset, layout.total_bytes, req.num_layers);
  // Another writer (a session sharing the buffer, the decode ring) over
  // these bytes since: the rows there are not this session's any more.
  if (before.has_value() &&
      lease.WrittenSince(writer_id, req.offset, layout.total_bytes, before->stamp)) {
    before.reset();
  }
  ResidentRegion after;
  after.stamp = lease.NoteWrite(writer_id, req.offset, layout.total_bytes);
  after.buffer_id = lease.id();
  after.offset = req.offset;
  after.bytes = layout.total_bytes;
  after.num_layers = req.num_layers;
  after.head_offsets.resize(c.kv_heads);
  after.slots.resize(c.kv_heads);
  // Per KV head: the tokens copied (indexes into req.tokens[h]) and, in
  // place, the packed row each goes to (empty: all of them, in order).
  std::vector<std::vector<uint32_t>> copy(c.kv_heads), to(c.kv_heads);
  uint64_t head_at = req.offset;
  for (int h = 0; h < c.kv_heads; ++h) {
    after.head_offsets[h] = head_at;
    head_at += fills[h].size() * frame_bytes;
    const size_t n = req.tokens[h].size();
    if (req.in_place && before.has_value() && before->head_offsets[h] == after.head_offsets[h]) {
      InPlacePlan plan = PlanInPlace(before->slots[h], req.tokens[h]);
      after.slots[h] = std::move(plan.slots);
      copy[h] = std::move(plan.copy_index);
      to[h] = std::move(plan.copy_slot);
    } else {
      after.slots[h] = req.tokens[h];
      copy[h].resize(n);
      std::iota(copy[h].begin(), copy[h].end(), 0u);
    }
    layout.rows_copied += copy[h].size();
    layout.rows_kept += n - copy[h].size();
    // Positions always come back for tokens written out of order.
    if (req.want_positions || copy[h].size() < n || !to[h].empty()) {
      layout.heads[h].positions = after.slots[h];
    }
  }
  // One block per (layer, head): its rows' sources, where it starts, and
  // (checksums on) the distinct pages its rows come from that are checked.
  const uint64_t row_bytes = static_cast<uint64_t>(c.head_dim) * DTypeSize(c.dtype);
  const int blocks = req.num_layers * c.kv_heads;
  std::vector<std::vector<RowSource>> rows(blocks);
  std::vector<std::vector<uint32_t>> check(blocks);
  std::vector<uint64_t> block_offset(blocks);
  const bool verify = keep_sums && c.checksums.mode != ChecksumMode::kOff;
  const uint64_t seed = verify ? fetch_seq.fetch_add(1, std::memory_order_relaxed) : 0;
  const double fraction =
      c.checksums.mode == ChecksumMode::kSampled ? c.checksums.sample_fraction : 1.0;
  std::vector<std::vector<Placement>> copied(verify ? c.kv_heads : 0);  // the rows read
  for (size_t h = 0; h < copied.size(); ++h) {
    copied[h].reserve(copy[h].size());
    for (uint32_t i : copy[h]) copied[h].push_back(placed[h][i]);
  }
  size_t sampled = 0;
  for (int j = 0; j < req.num_layers; ++j) {
    for (int h = 0; h < c.kv_heads; ++h) {
      const int b = j * c.kv_heads + h;
      const std::vector<uint8_t*>& table = page_frames[FrameTableIndex(req.layer + j, h)];
      rows[b].reserve(copy[h].size());
      for (uint32_t i : copy[h]) {
        const Placement& p = placed[h][i];
        rows[b].push_back(RowSource{table[p.page], p.slot});
      }
      block_offset[b] = after.head_offsets[h] + j * layout.layer_stride_bytes;
      if (verify) check[b] = PagesToCheck(copied[h], seed, fraction, &sampled);
    }
  }
  std::atomic<uint64_t> checked{0};
  auto check_block = [&](int b) {
    mu.AssertReaderHeld();  // the caller holds mu (shared) and waits for the tasks
    const int j = b / c.kv_heads, h = b % c.kv_heads;
    checked.fetch_add(check[b].size(), std::memory_order_relaxed);
    return CheckPages(*this, req.layer + j, h, check[b]);
  };
  auto block_bytes = [&](int b) { return fills[b % c.kv_heads].size() * frame_bytes; };
  // Block b's rows, into `dst` (where the block starts).
  auto fill_block = [&](int b, uint8_t* dst) {
    const int h = b % c.kv_heads;
    const size_t n = placed[h].size();
    if (to[h].empty() && rows[b].size() == n) {
      GatherRows(rows[b].data(), n, c.page_tokens, row_bytes, dst);
    } else {
      GatherRowsTo(rows[b].data(), to[h].data(), rows[b].size(), n, c.page_tokens, row_bytes, dst);
    }
  };
  absl::Status written;
  // Parallel only for enough bytes to copy (in place: the rows copied).
  const uint64_t copy_bytes = layout.rows_copied * 2 * row_bytes * req.num_layers;
  const uint64_t parallel_from =
      lanes != nullptr ? kParallelTokenGatherBytesOnLanes : kParallelGatherBytes;
  if (threads == 1 || copy_bytes < parallel_from) {
    // Every block checked, then one guarded write of the whole region (one
    // file-size check and one SIGBUS guard, not one per block): a failed
    // check writes nothing.
    for (int b = 0; b < blocks && written.ok(); ++b) {
      if (block_bytes(b) > 0) written = check_block(b);
    }
    if (written.ok()) {
      written = lease.Write(req.offset, layout.total_bytes, [&](uint8_t* base) {
        for (int b = 0; b < blocks; ++b) {
          if (block_bytes(b) > 0) fill_block(b, base + (block_offset[b] - req.offset));
        }
      });
    }
  } else {
    // Each block is its own guarded write: a truncated buffer fails the
    // block that meets it (FailedPrecondition) wherever it runs. The file is
    // checked once for the whole region, not per block.
    written = lease.CheckRegion(req.offset, layout.total_bytes);
    if (written.ok()) {
      written = ForEachHead(
          blocks, threads,
          [&](int b) {
            if (block_bytes(b) == 0) return absl::OkStatus();
            RETURN_IF_ERROR(check_block(b));
            return lease.Write(
                block_offset[b], block_bytes(b), [&](uint8_t* dst) { fill_block(b, dst); },
                BufferLease::FileCheck::kChecked);
          },
          {}, lanes);
    }
  }
  if (counters != nullptr) {
    counters->verified.fetch_add(checked.load(), std::memory_order_relaxed);
    if (absl::IsDataLoss(written)) counters->failures.fetch_add(1, std::memory_order_relaxed);
  }
  RETURN_IF_ERROR(written);
  resident.Put(req.layer, std::move(after));
  return layout;
}

}  // namespace icecache
