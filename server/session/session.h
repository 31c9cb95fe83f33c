// Internal to icecache_session: the state of one session and the operations
// that read it (Select, Fetch). Only the session library uses it; the public
// API is session_manager.h. See docs/architecture.md (sessions).
//
// Locking: `append_mu` serialises appends and is taken first. `mu` is a
// reader/writer lock over the index and frame tables: an append holds it
// shared while it builds new indexes aside (selects and fetches of ready
// layer groups go on meanwhile) and exclusively while it changes the tables.
// `cache_mu` guards the group selection cache and is taken inside `mu`,
// never around it. The atomics are
// readable without any lock (listings, eviction decisions). Immutable fields
// are set before the session is published.
#ifndef ICECACHE_SERVER_SESSION_SESSION_H_
#define ICECACHE_SERVER_SESSION_SESSION_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/index/selector.h"
#include "server/pool/page_pool.h"
#include "server/session/carry_pool.h"
#include "server/session/prefetch.h"
#include "server/session/resident_rows.h"
#include "server/session/session_quality.h"
#include "server/session/session_types.h"
#include "server/transfer/buffer_registry.h"
#include "server/transfer/gather.h"

namespace icecache {

// PageKeys over the frames of one layer (the first of its group) of one KV
// head: the K block sits at the start of each frame.
class CalibrationMemory;
class DecodeLanes;

class FramePageKeys final : public PageKeys {
 public:
  explicit FramePageKeys(const std::vector<uint8_t*>* frames) : frames_(frames) {}
  const void* page_keys(uint32_t page) const override {
    return page < frames_->size() ? (*frames_)[page] : nullptr;
  }

 private:
  const std::vector<uint8_t*>* frames_;  // owned by the Session
};

// Checksum counters of a SessionManager, shared by its sessions' fetches.
struct ChecksumCounters {
  std::atomic<uint64_t> verified{0};  // pages checked
  std::atomic<uint64_t> failures{0};  // pages that did not match
};

class Session {
 public:
  // keep_sums: maintain page checksums even when config.checksums.mode is
  // kOff (the daemon keeps them for a warm restart; docs/architecture.md §5).
  Session(std::string id, std::string tenant, uint64_t epoch, const SessionConfig& config,
          SizeClassId size_class, absl::Time now, bool keep_sums = false);

  // Immutable after construction.
  const std::string id;
  const std::string tenant;
  const uint64_t epoch;
  const SessionConfig config;  // ttl resolved
  const SizeClassId size_class;
  const PageGeometry geometry;
  const uint64_t frame_bytes;  // 2 x page_tokens x head_dim x dtype size
  const int groups;
  const int q_per_kv;
  const absl::Time created;
  // Page checksums are maintained (config.checksums.mode != kOff or keep_sums).
  const bool keep_sums;

  int GroupOf(int layer) const { return layer / config.layer_reuse; }
  int FirstLayerOf(int group) const { return group * config.layer_reuse; }
  int LayersIn(int group) const {
    const int end = std::min(config.layers, (group + 1) * config.layer_reuse);
    return end - FirstLayerOf(group);
  }
  size_t SelectorIndex(int group, int head) const {
    return static_cast<size_t>(group) * config.kv_heads + head;
  }
  size_t FrameTableIndex(int layer, int head) const {
    return static_cast<size_t>(layer) * config.kv_heads + head;
  }

  // Lock-free view for listings, leases and eviction.
  std::atomic<int64_t> last_use_ns{0};  // absl::ToUnixNanos
  std::atomic<bool> pinned{false};
  std::atomic<int> in_flight{0};
  std::atomic<int64_t> tokens_view{0};
  std::atomic<uint64_t> pages_view{0};
  std::atomic<uint64_t> frame_bytes_view{0};  // pool bytes charged (strides)
  std::atomic<uint64_t> index_bytes_view{0};
  // Decode keys the trees inserted one at a time, and of them those that
  // skipped routing (Selector::insert_counts), since built or loaded.
  // StoreViews stores the total first, so a reader that loads the unrouted
  // count first never sees it above the total (an append between two loads
  // in the other order could make routed = total - unrouted wrap around).
  std::atomic<uint64_t> decode_keys_view{0};
  std::atomic<uint64_t> decode_keys_unrouted_view{0};
  std::atomic<int> next_layer_view{0};

  absl::Time last_use() const { return absl::FromUnixNanos(last_use_ns.load()); }
  void Touch(absl::Time now) {
    const int64_t ns = absl::ToUnixNanos(now);
    int64_t cur = last_use_ns.load();
    while (cur < ns && !last_use_ns.compare_exchange_weak(cur, ns)) {
    }
  }

  // Trees (group, KV head indexes) built so far, of groups x kv_heads; read
  // without a lock for progress ("indexing 96/256 trees").
  mutable std::atomic<int> trees_built{0};

  absl::Mutex append_mu ABSL_ACQUIRED_BEFORE(mu);
  // Appends waiting for append_mu. The quality sampler's measurements take
  // append_mu only while it is 0 and let such an append through between
  // their steps (MeasureProbe), so an append waits for one step of one
  // measurement at most, never for a queue of them.
  std::atomic<int> appends_waiting{0};
  std::atomic<int64_t> probe_yields{0};  // times a measurement let appends through
  mutable absl::Mutex mu;
  // [group * kv_heads + head]; null until the group's first append.
  std::vector<std::unique_ptr<Selector>> selectors ABSL_GUARDED_BY(mu);
  // [group * kv_heads + head]: what that index's next select is expected to
  // cost. A select starts its KV heads longest first by it (calibrated
  // widths and exact fallbacks differ by 10x and more, a fresh select costs
  // about three carried ones), so a long head never starts last and holds
  // the layer up alone.
  struct HeadCost {
    std::atomic<int64_t> fresh_ns{0};    // the wall time of its last fresh select (0: none yet)
    std::atomic<int64_t> carried_ns{0};  // of its last carried one
    // The carry's turn (CandidateCarry): after a fresh select come
    // carry_steps carried ones, so the next select's kind is known.
    std::atomic<bool> next_carried{false};
    // The wall time of the last select of the kind the next one will be.
    int64_t Expected() const {
      const int64_t carried = carried_ns.load(std::memory_order_relaxed);
      return next_carried.load(std::memory_order_relaxed) && carried > 0
                 ? carried
                 : fresh_ns.load(std::memory_order_relaxed);
    }
    void Record(int64_t ns, bool carried, int carry_age, int carry_steps) {
      (carried ? carried_ns : fresh_ns).store(ns, std::memory_order_relaxed);
      next_carried.store(carry_steps > 0 && (!carried || carry_age < carry_steps),
                         std::memory_order_relaxed);
    }
  };
  std::unique_ptr<HeadCost[]> head_costs;
  // [group * kv_heads + head]: the head's candidate carry-over
  // (SelectParams::carry, set by its calibrator), each under its own mutex;
  // a select that finds it held (a concurrent select of the same layer)
  // collects afresh without it.
  struct HeadCarry {
    absl::Mutex mu;
    CandidateCarry carry ABSL_GUARDED_BY(mu);
  };
  std::unique_ptr<HeadCarry[]> carries;
  // Selections that reused a fresh one's candidates (Selection::carried).
  std::atomic<int64_t> selects_carried{0};
  // The session's pooled judgement of the carry-over (carry_pool.h): heads
  // with no judgement of their own select afresh while it has stopped.
  CarryPool carry_pool;
  // [layer * kv_heads + head][page] -> frame. Vectors are created at
  // construction and never move (FramePageKeys points at them).
  std::vector<std::vector<uint8_t*>> page_frames ABSL_GUARDED_BY(mu);
  std::vector<std::unique_ptr<FramePageKeys>> page_keys;  // [group * kv_heads + head]
  FrameSet frames ABSL_GUARDED_BY(mu);                    // owns every frame in page_frames
  // [layer * kv_heads + head][page] -> FrameChecksum of that frame, parallel
  // to page_frames while keep_sums (else empty). WriteRows updates every
  // frame it writes, under mu exclusive.
  std::vector<std::vector<uint64_t>> page_sums ABSL_GUARDED_BY(mu);
  // Seeds the sampled checks of successive fetches.
  mutable std::atomic<uint64_t> fetch_seq{0};
  // What this session's token writes left in its clients' buffers, per
  // layer (FetchRequest::in_place; resident_rows.h). Its own leaf mutex:
  // fetches run under mu shared.
  mutable ResidentRows resident;
  // This session's writer id in the buffers' write logs (write_log.h):
  // unique in the process, never 0, never reused.
  const uint64_t writer_id;
  // Tokens every layer holds. A chunk may arrive in layer ranges (whole layer
  // groups, in order): while one is incomplete, next_layer is the first layer
  // still to come and pending_tokens its token count; group_tokens says what
  // each layer group already holds (selects use their group's count).
  int64_t tokens ABSL_GUARDED_BY(mu) = 0;
  std::vector<int64_t> group_tokens ABSL_GUARDED_BY(mu);  // [group]
  int next_layer ABSL_GUARDED_BY(mu) = 0;                 // 0 = no chunk pending
  int64_t pending_tokens ABSL_GUARDED_BY(mu) = 0;
  // [group]: its first append is accepted and its trees are being built in
  // the background (session_append.h, PendingBuild); selects and appends
  // of the group wait until it is cleared.
  std::vector<char> group_building ABSL_GUARDED_BY(mu);
  // Tokens of every complete chunk, in order: a warm restart replays them
  // into fresh indexes, which then lay pages out exactly as before.
  std::vector<int64_t> chunks ABSL_GUARDED_BY(mu);
  // Set when an index failed midway through an append; the session then
  // answers FailedPrecondition until dropped.
  bool broken ABSL_GUARDED_BY(mu) = false;

  // True when no group of [first_group, end_group) is being built.
  bool GroupsReady(int first_group, int end_group) const ABSL_SHARED_LOCKS_REQUIRED(mu) {
    for (int g = first_group; g < end_group; ++g) {
      if (group_building[g]) return false;
    }
    return true;
  }

  // Codes shared by every KV operation: FailedPrecondition once an index
  // broke (the session must be dropped).
  absl::Status CheckUsable() const ABSL_SHARED_LOCKS_REQUIRED(mu);

  // Selects pages of `req.layer` for every KV head (SessionManager::SelectPages
  // documents the codes), the heads in parallel on `threads` oneTBB threads
  // (0 = the process's shared pool, 1 = serially on this thread), at
  // CallGranularity(config, req.granularity, destination). Remembers
  // the selection of a group's first layer for reuse_group_selection (a
  // reused selection keeps the unit it was made in).
  // Monitored sessions: the selections chosen for measurement are appended
  // to *probes (may be null: none are taken). `lanes` (may be null): run the
  // heads there instead, unless threads is 1.
  absl::StatusOr<SelectResult> Select(const SelectRequest& req, SelectDestination destination,
                                      int threads, std::vector<QualityProbe>* probes = nullptr,
                                      DecodeLanes* lanes = nullptr) ABSL_SHARED_LOCKS_REQUIRED(mu)
      ABSL_LOCKS_EXCLUDED(cache_mu);
  // Writes the pages of `req` into the leased buffer (SessionManager::FetchPages
  // documents the codes), one (layer, KV head) block per task on `threads`
  // (on `lanes` where given, as Select's heads: a decode step's gather).
  // Every request check runs before any byte is written. With page checksums
  // on, each page to check is hashed right before it is copied; a mismatch
  // stops that block before the page (DataLoss naming layer, KV head and
  // page; other blocks may have been written). `counters` (optional) counts
  // the pages checked and the failures.
  absl::StatusOr<FetchLayout> Fetch(BufferLease& lease, const FetchRequest& req, int threads,
                                    ChecksumCounters* counters = nullptr,
                                    DecodeLanes* lanes = nullptr) const
      ABSL_SHARED_LOCKS_REQUIRED(mu);
  // Fetch at token granularity (req.tokens): positions placed through the
  // group's selectors, rows packed into slots (gather.h). With page
  // checksums on, the frames the rows come from are checked (sampled as in
  // Fetch) before a (layer, head) block is written: DataLoss as in Fetch.
  absl::StatusOr<FetchLayout> FetchTokens(BufferLease& lease, const FetchRequest& req, int group,
                                          int threads, ChecksumCounters* counters,
                                          DecodeLanes* lanes) const ABSL_SHARED_LOCKS_REQUIRED(mu);

  // One KV head of Select: the calibrated width, the selection, its time;
  // a copy into *probe when this head's step is to be measured.
  absl::Status SelectHead(int group, int head, const std::vector<float>& queries,
                          const SelectParams& params, int64_t tokens, Selection* out,
                          std::unique_ptr<QualityProbe>* probe) ABSL_SHARED_LOCKS_REQUIRED(mu);

  // Gather blocks smaller than this are written by one task (a thread hop
  // costs more than the copy).
  static constexpr uint64_t kParallelGatherBytes = uint64_t{256} << 10;
  // The same for a token write on the decode lanes (a helper watching: the
  // hop costs a few microseconds). Its rows are scattered over cold pages,
  // so the copy waits on memory: an in-place write of ~430 rows (220 KB) took
  // 53 us on one thread, and the mdci + in-place gather went 0.86x with this
  // bound at 32 KB (docs/bench/staging59.md).
  static constexpr uint64_t kParallelTokenGatherBytesOnLanes = uint64_t{32} << 10;

  struct GroupSelection {
    int64_t tokens = -1;  // session tokens when it was made
    // Distinct for every selection stored (a prefetch of the group's later
    // layers is valid only for the selection it copied; §5.2).
    uint64_t generation = 0;
    std::vector<Selection> heads;
  };
  mutable absl::Mutex cache_mu;
  std::vector<GroupSelection> group_cache ABSL_GUARDED_BY(cache_mu);  // [group]
  uint64_t last_generation ABSL_GUARDED_BY(cache_mu) = 0;

  // True while the group's stored selection is `generation`, made at the
  // group's current token count: pages written from it are what a fetch of
  // that selection would write now.
  bool SelectionCurrent(int group, uint64_t generation, int64_t tokens) const
      ABSL_SHARED_LOCKS_REQUIRED(mu) ABSL_LOCKS_EXCLUDED(cache_mu);

  // Layer-group prefetch (prefetch.h; docs/architecture.md §5.2): the
  // latest request per group, replaced (the old one cancelled) by the next.
  // prefetch_mu is a leaf, never held while waiting or with mu.
  absl::Mutex prefetch_start_mu ABSL_ACQUIRED_BEFORE(prefetch_mu);  // serialises replacements
  absl::Mutex prefetch_mu;
  std::vector<std::shared_ptr<GroupPrefetch>> prefetch ABSL_GUARDED_BY(prefetch_mu);  // [group]
  // Set when the manager removes the session (dropped, expired, evicted):
  // background work on it stops.
  std::atomic<bool> closed{false};

  // Quality monitor (session_quality.h). Set by EnableQuality before the
  // session is published, immutable afterwards; each HeadQualityMonitor is
  // thread-safe. `sampler` (owned by the manager, which outlives every
  // request) counts selection time for the calibration budget, per session:
  // `quality_account` is this session's budget (quality_sampler.h), opened
  // by EnableQuality from selection_ns and calibration_cpu_ns as they are
  // then: zero for a new session (a whole warm-up burst), the saved values
  // for a session restored with its calibrators (RestoreQualityCounters runs
  // first: it resumes its budget where it stood, no second burst).
  void EnableQuality(std::vector<std::unique_ptr<HeadQualityMonitor>> heads,
                     QualitySampler* sampler);
  std::vector<std::unique_ptr<HeadQualityMonitor>> quality;  // [group * kv_heads + head] or empty
  QualitySampler* sampler = nullptr;
  std::shared_ptr<QualityAccount> quality_account;  // non-null with sampler
  std::atomic<int64_t> selection_ns{0};  // every selection of the session, per head summed
  std::atomic<int64_t> calibration_cpu_ns{0};
  std::atomic<int64_t> probes_run{0};  // measurements run this incarnation (fair burst's estimate)
  std::atomic<int64_t> samples_dropped{0};
  std::atomic<int64_t> samples_stale{0};
  std::atomic<int64_t> samples_reselected{0};  // measured late: selected again (MeasureProbe)
  // Calibration memory (calibration_memory.h; owned by the manager, null when
  // off): the fresh calibrators are seeded once, at the first selection
  // (when the context length is known); the context of the
  // session's first selection is what the manager remembers them under.
  CalibrationMemory* calibration_memory = nullptr;
  // SessionQualityOptions::pool_widths: the session's pooled width
  // (MakeWidthPool; null when off), fed by every sample at its width; heads
  // with no sample of their own take it (PoolWidths). Set with
  // EnableQuality, before the session is published; thread-safe.
  std::unique_ptr<WidthCalibrator> width_pool;
  // SessionQualityOptions::fair_burst (HeadQualityMonitor::MayUseBurst).
  bool fair_burst = false;
  std::once_flag seed_once;
  std::atomic<int64_t> first_select_tokens{0};
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_SESSION_H_
