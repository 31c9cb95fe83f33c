// SessionManager: sessions, tenants, leases, quotas and eviction, and the KV
// operations on a session (docs/architecture.md §2, §4-§6). gRPC-free: server/rpc
// converts requests into these calls.
//
// Storage of a session. One Selector per (layer group, KV head) owns the page
// layout; the group's first layer's keys build it. Every layer of the group
// stores its K/V in pool frames following the same placements, so page p of
// (group, head) has one frame per layer of the group. A frame holds K then V
// (page_tokens x head_dim each, session dtype); rows not yet filled are zero.
// The selector reads keys straight from the first layer's frames (the
// session implements PageKeys): no second copy of keys exists.
//
// AppendKv byte layout (n tokens, one chunk):
//   keys:   [layers][kv_heads][n][head_dim]  then
//   values: [layers][kv_heads][n][head_dim]
// in the session dtype, little-endian, exactly AppendBytes(config, n) bytes.
// A chunk may also arrive in layer ranges (whole layer groups, in order,
// starting at layer 0, the same n each): each range then holds its layers
// only, [range layers][kv_heads][n][head_dim] keys then values. A range's
// layer groups are selectable as soon as it is in; the session's token count
// moves when the last layer is in. A long prefill sent layer by layer never
// depends on one call's deadline, and GetSession shows its progress.
// The first append of a layer group builds its indexes (bulk, parallel over
// (group, head), holding the session lock shared so that selects of ready
// groups go on); later appends insert. With background_builds (icecached),
// the first append of mdci / exact-mdci groups returns once its worst-case
// frames are admitted and its bytes copied (new_pages 0, tokens and
// next_layer already moved); the trees are built on the builder thread, and
// calls on those groups wait for them (docs/architecture.md §5). Admission: the frames an append
// can need are reserved from the pool BEFORE any index changes (first append: the selectors are
// built aside, so the exact count is known; later appends: the worst case, one new page per token
// per (group, head) for mdci layouts, exact for positional layouts), the unused rest is returned
// afterwards. RESOURCE_EXHAUSTED (quota or capacity) and INVALID_ARGUMENT (size, NaN/Inf) leave the
// session exactly as it was.
//
// Tenancy: every session belongs to the creating caller's tenant. Session ids
// of other tenants answer NOT_FOUND ("session <id> not found"), exactly like
// unknown ids, so ids never leak. Admin callers may Get/List/Drop any
// session (and Evict/Pin it); KeepAlive and the KV operations
// (append/select/fetch/decode) need the owning tenant.
// Admin verbs answer PERMISSION_DENIED for non-admin callers.
//
// Leases: each session has a TTL; any request on it (or KeepAlive) renews
// it. ExpireLeases(now) drops sessions whose lease ran out and that have no
// request in flight; a reaper thread calls it every reaper_interval when
// that is positive. Eviction: when an append would take pool usage above
// high_watermark x capacity, idle sessions (not pinned, nothing in flight,
// not the one appending) are evicted by least recent use, only as many as
// needed and only if that makes the append fit the capacity; otherwise the
// append fails with RESOURCE_EXHAUSTED and nothing is evicted. Quotas never
// evict other sessions.
//
// Draining: after Drain(true), or while options.stop_pending() says a stop
// is on its way, CreateSession answers UNAVAILABLE; existing sessions keep
// working. The manager is the one source of truth for "draining": the daemon
// asks draining() for its health answers.
//
// Codes (besides the above): INVALID_ARGUMENT for malformed input (bad
// config field, wrong byte count, NaN/Inf, layer out of range, layer range
// crossing a layer group, page id out of range, query count/shape wrong);
// FAILED_PRECONDITION for state mismatches (select on an empty session, reuse
// without a group selection, a buffer file that shrank, a session whose index
// broke: INTERNAL is answered once, FAILED_PRECONDITION afterwards);
// OUT_OF_RANGE for a fetch that does not fit the buffer; NOT_FOUND for
// unknown sessions/buffers; DATA_LOSS for a fetch (or decode step) that met
// a page whose bytes fail their checksum (sessions with page checksums on;
// counted in ManagerStats::checksum_failures; that page is never copied).
//
// Thread safety: every method is thread-safe. Appends to one session are
// serialised; selects and fetches of one session run concurrently with each
// other (reader lock) and wait for appends.
#ifndef ICECACHE_SERVER_SESSION_SESSION_MANAGER_H_
#define ICECACHE_SERVER_SESSION_SESSION_MANAGER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/caller.h"
#include "server/pool/page_pool.h"
#include "server/session/calibration_memory.h"
#include "server/session/clock.h"
#include "server/session/decode_activity.h"
#include "server/session/decode_lanes.h"
#include "server/session/session.h"
#include "server/session/session_quality.h"
#include "server/session/session_types.h"
#include "server/session/snapshot.h"
#include "server/transfer/buffer_registry.h"

namespace icecache {

class Session;       // internal (server/session/session.h)
class IndexBuilder;  // internal (server/session/index_builder.h)
class Prefetcher;    // internal (server/session/prefetch.h)
class SlabPrefaulter;
class GroupPrefetch;
struct ChecksumCounters;
struct PrefetchCounters;
struct AppendInput;  // internal (server/session/session_append.h)
class StagingCache;  // internal (server/session/append_staging.h)
class StagingBuffer;
struct AppendPlan;

// One background build job, as SessionManagerOptions::on_build_done hears of
// it: the session, the layer range, how long the job waited behind earlier
// ones and how long it ran (trees, install, rows), of that the trees' wall
// time (the parallel builds alone), and the trees built with their CPU time
// and minor page faults summed (each on its building thread's clocks).
// trees x CPU per tree / trees_wall: the cores the builds kept busy.
struct BuildDone {
  std::string session;
  int first_layer = 0;
  int num_layers = 0;
  absl::Duration queued;
  absl::Duration ran;
  absl::Duration trees_wall;
  int trees = 0;
  int64_t tree_cpu_ns = 0;
  int64_t tree_minor_faults = 0;
};

struct SessionManagerOptions {
  // Not owned; must outlive the manager. pool and buffers are required.
  PagePool* pool = nullptr;
  BufferRegistry* buffers = nullptr;
  Clock* clock = nullptr;  // null = Clock::Real()
  absl::Duration default_ttl = absl::Seconds(60);
  absl::Duration max_ttl = absl::Hours(24);
  // Fraction of pool capacity above which idle sessions are evicted (0, 1].
  double high_watermark = 0.9;
  int max_sessions = 4096;  // all tenants
  int max_sessions_per_tenant = 256;
  int64_t max_tokens_per_session = int64_t{1} << 24;
  int64_t max_append_tokens = 1 << 20;  // per AppendKv call
  // Reaper thread period; zero or negative = no thread (call ExpireLeases).
  absl::Duration reaper_interval = absl::Seconds(1);
  // Threads for building indices of the first append (1 = serial).
  int build_threads = 1;
  // Pool slabs a prefault thread keeps faulted in ahead of allocation
  // (server/pool/slab_prefaulter.h: after every slab carved and every
  // reaper_interval), so decode appends do not take the page faults of a
  // new slab. 0 = none; needs a reaper (reaper_interval > 0).
  uint64_t prefault_slabs = 16;
  // An append from a registered buffer copies its bytes once into private
  // staging memory (append_staging.h); released staging buffers of at least
  // 4 MiB are kept for later appends, up to staging_cache_bytes, and the
  // reaper unmaps those idle for staging_idle.
  uint64_t staging_cache_bytes = uint64_t{1} << 30;
  absl::Duration staging_idle = absl::Seconds(5);
  // Back-pressure on appends from a buffer (StagingCache::AcquireWaiting):
  // while the staging lent out to appends and builds would pass the larger of
  // the reserve and staging_cache_bytes, an append waits up to this long
  // (and at most half of its call's time left) for a build to return some,
  // then maps fresh memory. Zero: never waits.
  absl::Duration staging_wait = absl::Seconds(10);
  // Staging buffers in transparent huge pages (StagingCacheOptions.huge_pages).
  bool staging_huge_pages = false;
  // The first append of a range of mdci / exact-mdci layer groups returns
  // once its frames are admitted and its bytes taken; the trees are built
  // on a background thread (docs/architecture.md §5). Selects, fetches and
  // appends of a group being built wait for it, at most build_wait, then
  // answer UNAVAILABLE naming the progress; other groups serve meanwhile.
  bool background_builds = false;
  absl::Duration build_wait = absl::Seconds(60);
  // Optional, for tests: runs on the builder thread before each background
  // build (session id, first layer of its range), e.g. to hold it at a gate.
  std::function<void(const std::string& session, int first_layer)> on_build_start;
  // Optional: told after each background build, on the builder thread with
  // no lock held (BuildDone). The daemon logs it (the timeline of a prefill,
  // docs/bench/prefill.md).
  std::function<void(const BuildDone&)> on_build_done;
  // Threads one select or fetch spreads its KV heads over: 0 = the process's
  // shared oneTBB pool (every concurrent stream shares the same workers, so
  // the cores are never oversubscribed), 1 = serially on the calling thread.
  int decode_threads = 0;
  // A decode step's KV heads are selected on the calling thread and
  // `decode_threads` - 1 helpers (all cores but one at 0) that watch for the
  // next layer's work for up to this long after their last (DecodeLanes,
  // decode_lanes.h): a layer's second lane then starts at once, not after a
  // thread wake-up. Zero: the oneTBB pool above.
  absl::Duration decode_lane_spin = absl::Milliseconds(1);
  // Layer-group prefetch (docs/architecture.md §5.2): threads that write a
  // group's later layers in the background (0 = never: DecodeStep's
  // prefetch_group is then ignored), and the most requests queued at once
  // (beyond, a request goes without prefetch).
  int prefetch_threads = 1;
  int max_prefetch_jobs = 64;
  // Optional, for tests: runs on the prefetch thread before each request's
  // job (e.g. to hold it at a gate).
  std::function<void()> on_prefetch_job;
  // Optional: true while a stop of the process is requested but its owner
  // has not acted on it yet (icecached: a SIGTERM/SIGINT sent and not yet
  // taken by the signal thread). Counts as draining. Must be thread-safe.
  std::function<bool()> stop_pending;
  // Keep page checksums for every session, whatever its checksums.mode
  // (a warm restart verifies every recovered frame; docs/architecture.md §5).
  bool keep_checksums = false;
  // Optional: told about each session whose lease lapsed, after it is gone
  // (tenant, id, how long it had been idle), on the thread that ran
  // ExpireLeases (the reaper), with no lock held. The daemon logs it.
  std::function<void(const std::string& tenant, const std::string& id, absl::Duration idle)>
      on_expired;
  // Online quality monitor and self-calibrating width (session_quality.h).
  // Off by default in the core; icecached turns it on (config `quality`).
  SessionQualityOptions quality;
  // Optional: told about each measured selection (the session's selector,
  // the sample) on the sampler's thread, with no lock held. The daemon
  // feeds its /metrics histograms. Must be thread-safe and quick.
  std::function<void(SelectorKind selector, const QualitySample& sample)> on_quality_sample;
};

class SessionManager {
 public:
  // InvalidArgument when pool or buffers is null, high_watermark not in
  // (0, 1], a limit non-positive, or default_ttl > max_ttl. Starts the reaper.
  static absl::StatusOr<std::unique_ptr<SessionManager>> Create(
      const SessionManagerOptions& options);
  // Stops the quality sampler and the reaper, then drops every session.
  ~SessionManager();
  SessionManager(const SessionManager&) = delete;
  SessionManager& operator=(const SessionManager&) = delete;

  // --- sessions ---
  // InvalidArgument (config, tenant name), UNAVAILABLE while draining,
  // RESOURCE_EXHAUSTED beyond max_sessions / max_sessions_per_tenant.
  absl::StatusOr<SessionInfo> CreateSession(const Caller& caller, const SessionConfig& config);
  absl::StatusOr<SessionInfo> GetSession(const Caller& caller, std::string_view id);
  // The caller's tenant's sessions (admin: every tenant's), sorted by id.
  std::vector<SessionInfo> ListSessions(const Caller& caller);
  // Removes the session; its frames return to the pool once requests in
  // flight on it have finished.
  absl::Status DropSession(const Caller& caller, std::string_view id);
  // Renews the lease (and the tenant's buffers' idle timers).
  absl::StatusOr<SessionInfo> KeepAlive(const Caller& caller, std::string_view id);

  // --- KV operations ---
  // Appends n tokens of the layers of `range` (default: all) from `bytes`
  // (layout above). InvalidArgument for n < 1, n > max_append_tokens, a range
  // that is not whole layer groups of the model, bytes.size() !=
  // AppendBytes(config, n, range), NaN/Inf in keys or values; FailedPrecondition for a
  // range out of order (a new chunk starts at layer 0; a pending one goes on
  // at its next layer with the same n); RESOURCE_EXHAUSTED for
  // quota/capacity/max_tokens_per_session.
  absl::StatusOr<AppendResult> AppendKv(const Caller& caller, std::string_view id, int64_t n,
                                        absl::Span<const uint8_t> bytes, LayerRange range = {});
  // Same, reading the bytes from [offset, offset + AppendBytes(config, n)) of
  // a registered HOST_SHM buffer (copied out under the SIGBUS guard first).
  // Adds NotFound (buffer), OutOfRange (region past the buffer),
  // FailedPrecondition (buffer file shrank; CUDA_IPC buffer).
  // `deadline` is the call's: a wait for staging (staging_wait) takes at
  // most half of the time left to it.
  absl::StatusOr<AppendResult> AppendKvFromBuffer(const Caller& caller, std::string_view id,
                                                  int64_t n, std::string_view buffer_id,
                                                  uint64_t offset, LayerRange range = {},
                                                  absl::Time deadline = absl::InfiniteFuture());
  // Selects pages of `request.layer` for every KV head (queries: q_heads x
  // head_dim fp32). A budget larger than the session's tokens selects every
  // page. Selections made for the first layer of a group are remembered (per
  // token count) for reuse_group_selection. InvalidArgument for a bad layer,
  // query size or NaN/Inf, budget < 0 or sink/recent < -1;
  // FailedPrecondition when the session holds no tokens, or reuse was asked
  // and no group selection exists at the current token count.
  // Granularity: the request's, else the session's, else whole pages (the
  // selection may be fetched into any buffer; CallGranularity).
  absl::StatusOr<SelectResult> SelectPages(const Caller& caller, std::string_view id,
                                           const SelectRequest& request);
  // Gathers the given pages into a registered buffer (layout in gather.h).
  // InvalidArgument: pages.size() != kv_heads, page id >= pages of that head,
  // layer range invalid or crossing a layer group boundary; OutOfRange: the
  // region does not fit; FailedPrecondition: buffer file shrank (checked by
  // fstat before the copy, and any truncation racing the copy is caught).
  absl::StatusOr<FetchLayout> FetchPages(const Caller& caller, std::string_view id,
                                         const FetchRequest& request);
  // SelectPages of `select.layer`, then FetchPages of the selected pages for
  // layers [select.layer, select.layer + num_layers) into the buffer, in one
  // call (positions included when select.params.want_positions). `device`:
  // block ids and events of a CUDA_IPC buffer (BufferLease::WriteFetch).
  //
  // Granularity (docs/architecture.md §3.8): the request's, else the
  // session's, else per token into a HOST_SHM buffer without device fields
  // and per page into a CUDA_IPC buffer or with device fields; the result's
  // selection and layout say which (token slots: page kTokenSlot). Tokens
  // asked explicitly for a device destination, or a later layer reusing a
  // selection made per token there, are FailedPrecondition (nothing written).
  //
  // prefetch_group (IceCache(r), docs/architecture.md §5.2): on the first
  // layer of a group of a session with layer_reuse > 1, the group's later
  // layers (past num_layers) are written in the background after the answer,
  // where a fetch of the whole group would put them: layer first + j at
  // offset + j x layout.layer_stride_bytes, or into the same block ids of
  // their layer tensors (ordered after `device.wait_event`). The answer says
  // how many (`prefetching`; 0 when the queue was full or the request asks
  // for none). A later call for such a layer with reuse_group_selection, the
  // same buffer and that offset (or block ids) and num_layers 1 waits for its
  // write instead of copying (`prefetched`); its done_event is recorded at
  // once. Any other call writes as usual. A prefetch stops (the layers not
  // yet written are left for the calls) when the group selects again, the
  // tokens change, the session goes or the buffer is unregistered. Ignored
  // on other layers and sessions. Its errors are never reported: the call
  // for the layer then writes it itself and answers as usual.
  // `in_place` (token granularity): the region holds what this session's
  // previous write of these layers put there, and only the rows of tokens
  // not written then are copied (FetchRequest::in_place, resident_rows.h;
  // the layout's positions give the slot order, rows_copied / rows_kept
  // the split).
  absl::StatusOr<DecodeStepResult> DecodeStep(const Caller& caller, std::string_view id,
                                              const SelectRequest& select,
                                              std::string_view buffer_id, uint64_t offset,
                                              int num_layers = 1, const DeviceWrite& device = {},
                                              bool prefetch_group = false, bool in_place = false);

  // DecodeStep for every entry (sessions of the caller's tenant; the same
  // session may appear twice), the entries in parallel on decode_threads.
  // One answer per entry, in order, each with DecodeStep's codes: a bad entry
  // fails alone and nothing is written for it.
  std::vector<absl::StatusOr<DecodeStepResult>> DecodeBatch(
      const Caller& caller, absl::Span<const DecodeBatchEntry> entries);

  // --- leases ---
  // Drops sessions whose lease expired at `now` (none with requests in
  // flight) and idle buffers; returns the number of sessions dropped.
  int ExpireLeases(absl::Time now);

  // --- admin verbs (PERMISSION_DENIED unless caller.admin) ---
  absl::StatusOr<ManagerStats> Stats(const Caller& caller);
  absl::StatusOr<std::vector<TenantInfo>> ListTenants(const Caller& caller);
  // InvalidArgument for a bad tenant name.
  absl::Status SetQuota(const Caller& caller, std::string_view tenant, uint64_t quota_bytes);
  // NotFound for unknown ids. Evicts even a pinned session (explicit admin act).
  absl::Status EvictSession(const Caller& caller, std::string_view id);
  absl::StatusOr<SessionInfo> PinSession(const Caller& caller, std::string_view id, bool pinned);
  // Starts (or with false, ends) draining; returns requests in flight now.
  absl::StatusOr<int> Drain(const Caller& caller, bool draining = true);
  // Drain() for the daemon itself; returns the previous setting.
  bool SetDraining(bool draining) ABSL_LOCKS_EXCLUDED(mu_);
  // The daemon's pool.prefault: faults `bytes` of append staging in now and
  // keeps them (StagingCache::Reserve, its codes); the seconds it took.
  absl::StatusOr<double> ReserveStaging(uint64_t bytes, const std::atomic<bool>* stop);
  uint64_t staging_reserve_bytes() const;
  // Append staging now: bytes lent out (appends, queued builds) and the
  // appends' waits for it (StagingCache::WaitStats).
  struct StagingState {
    uint64_t lent_bytes = 0;
    uint64_t waits = 0;
    uint64_t waits_expired = 0;
    double wait_seconds = 0;
  };
  StagingState staging_state() const;
  // The decode lanes (SessionManagerOptions::decode_lane_spin): helper
  // threads, selections run on them, selections that found them busy and
  // ran on oneTBB's pool, and the tasks the helpers ran. All 0 without lanes.
  struct DecodeLaneStats {
    int64_t jobs = 0, fallbacks = 0, helper_tasks = 0, jobs_alone = 0;
  };
  DecodeLaneStats decode_lane_stats() const;

  // --- warm restart (session_restore.cc; docs/architecture.md §5) ---
  // Every usable session as a snapshot image: frame offsets and checksums,
  // token slots, chunk sizes. Sessions without checksums (keep_checksums was
  // off) or with a broken index are left out (listed in *skipped with why).
  // Call with no request in flight (after the server stopped) and after
  // PagePool::Freeze(), so the bytes cannot change under the snapshot.
  // With `images`, every index that keeps an image (Selector::has_image) is
  // saved there and the image records where (SessionImage::index_images);
  // an index whose image cannot be written restores by replay.
  SnapshotImage TakeSnapshot(std::vector<std::string>* skipped,
                             IndexImageFileWriter* images = nullptr) ABSL_LOCKS_EXCLUDED(mu_);
  struct RestoreReport {
    int recovered = 0;
    // (session id, tenant, why) of every session not recovered.
    std::vector<std::vector<std::string>> dropped;
    absl::Duration verify_time, rebuild_time;
    // Indexes (layer group, KV head) loaded from their image, and rebuilt by
    // replaying the chunks (no image, or one that was refused).
    int64_t indexes_loaded = 0;
    int64_t indexes_replayed = 0;
    // Per session with refused images: (session id, how many, the first
    // one's "layer group G kv head H", why it was refused).
    std::vector<std::vector<std::string>> images_refused;
    // Recovered sessions whose quality monitor state (self-calibrated
    // widths, exact fallbacks, sampling) came back from the snapshot, and
    // (session id, why) of those whose calibration starts fresh (an older
    // snapshot without the state, or another state format).
    int64_t quality_restored = 0;
    std::vector<std::vector<std::string>> quality_fresh;
  };
  // Re-creates the sessions of `image` on a pool whose arena holds the
  // snapshot's bytes and has handed out nothing: each session's frames are
  // checked against their checksums, re-owned (PagePool::Recover) and its
  // indexes rebuilt by replaying its chunks; the replayed layout must put
  // every token where the snapshot says, else the session is dropped (never
  // served). Recovered sessions keep their id, tenant and epoch (the data is
  // the same); their lease starts now.
  // With `images` (the file the drain wrote; may be null), an index whose
  // image verifies (hash, format, kind, algorithm, parameters, every token
  // at its recorded slot) is loaded instead of replayed.
  // With the quality monitor on, each recovered session's monitor takes over
  // the state the snapshot holds for it (widths, exact fallbacks, sampling,
  // tallies), or starts fresh when it holds none; a state out of range
  // drops the session.
  RestoreReport Restore(const SnapshotImage& image, const IndexImageFile* images = nullptr)
      ABSL_LOCKS_EXCLUDED(mu_);

  uint64_t epoch() const { return epoch_; }
  // Drain(true) was called, or options.stop_pending() is true.
  bool draining() const ABSL_LOCKS_EXCLUDED(mu_);
  int InFlight() const;
  // The quality sampler's counters (zeros when the monitor is off).
  QualitySamplerStats QualityStats() const;
  // Waits until every queued quality sample has been measured (tests, benchmarks).
  void WaitForQualitySamples();
  // Counters of the layer-group prefetch.
  PrefetchStats prefetch_stats() const;
  // Prefetch requests queued or running now (tests).
  int PrefetchPending() const;
  // Waits until no prefetch is queued or running (tests, benchmarks).
  void WaitForPrefetch() const;

 private:
  explicit SessionManager(const SessionManagerOptions& options);
  struct Counters;
  class InFlightGuard;

  // Looks up a session of the caller's tenant (admin_ok: any tenant for
  // admins); NotFound otherwise.
  absl::StatusOr<std::shared_ptr<Session>> Find(const Caller& caller, std::string_view id,
                                                bool admin_ok);
  // Looks up a session of the caller's tenant and marks it in flight for the
  // guard's lifetime (never evicted or expired meanwhile); NotFound otherwise.
  absl::StatusOr<InFlightGuard> Use(const Caller& caller, std::string_view id);
  // The steps of an append (session_append.h), under the session's writer
  // lock. `owned`, when it holds `bytes`, is the private copy they live in:
  // a background build takes it instead of copying them again.
  // `values_clean`: the copy into `owned` already found every element clean
  // (AppendBytesClean), so CheckAppendInput skips its scan.
  absl::StatusOr<AppendResult> Append(const InFlightGuard& guard, int64_t n, LayerRange range,
                                      absl::Span<const uint8_t> bytes, StagingBuffer owned,
                                      bool values_clean = false) ABSL_LOCKS_EXCLUDED(mu_);
  // Accepts a background build (session_append.h, PendingBuild) and posts it.
  // `owned` holds the bytes `in` points at; the job keeps it.
  AppendResult StartBackgroundBuild(const InFlightGuard& guard, const AppendInput& in,
                                    AppendPlan plan, FrameSet frames, StagingBuffer owned)
      ABSL_LOCKS_EXCLUDED(mu_);
  // UNAVAILABLE when the group of `layer` was still being built after
  // build_wait (the caller holds `s.mu` shared, taken by ReadyReader).
  absl::Status GroupReadyOrUnavailable(const Session& s, int layer, bool ready) const;
  // Reserves `reserve` frames for an append of `s`: quota, watermark
  // eviction, pool capacity (RESOURCE_EXHAUSTED; nothing changes).
  absl::StatusOr<FrameSet> AdmitFrames(const Session& s, uint64_t reserve)
      ABSL_LOCKS_EXCLUDED(mu_, admission_mu_);
  // Makes room for `bytes` more pool bytes under the watermark policy.
  absl::Status MakeRoom(const Session* appending, uint64_t bytes);
  void RemoveSession(const std::string& id, const char* reason);
  // An ending session's calibrated widths into the calibration memory.
  void RememberCalibration(const Session& s);
  void ReaperLoop();
  // Queues the probes of one selection of `s` on the sampler (drops counted).
  void OfferProbes(const std::shared_ptr<Session>& s, std::vector<QualityProbe> probes);
  // On the sampler's thread: measures one probe if its session still exists.
  SampleOutcome RunProbe(const std::weak_ptr<Session>& weak, const QualityProbe& probe)
      ABSL_LOCKS_EXCLUDED(mu_);
  SessionInfo Info(const Session& s) const;

  // Layer-group prefetch (session_manager_prefetch.cc).
  struct PrefetchedLayer {
    std::shared_ptr<GroupPrefetch> record;  // null: not a prefetched layer
    std::optional<FetchLayout> layout;      // set: written, not yet checked as current
  };
  // The record of `select.layer`'s group when `fetch` is a layer it
  // prefetches, after waiting for that layer's write (no lock held).
  PrefetchedLayer TakePrefetched(Session& s, const SelectRequest& select,
                                 const FetchRequest& fetch);
  // True (out->layout set) when the layer was written by the prefetch from
  // this very selection at the current tokens.
  bool UsePrefetched(const Session& s, const SelectResult& selection, const FetchRequest& fetch,
                     PrefetchedLayer* pre, DecodeStepResult* out) ABSL_SHARED_LOCKS_REQUIRED(s.mu);
  // Replaces the group's prefetch by one for the layers after `fetch`;
  // returns how many layers it will write (0: none or refused).
  int StartPrefetch(const std::shared_ptr<Session>& s, BufferLease lease, const FetchRequest& fetch,
                    const DecodeStepResult& out) ABSL_LOCKS_EXCLUDED(mu_);
  ChecksumCounters* checksum_counters();
  // Before a new selection of a group's first layer (`layer`; any other
  // layer: nothing): stops the group's prefetch, waiting for a layer it is
  // writing, so no background write of the old selection can land after the
  // writes of the new one. No session lock may be held.
  void DropPrefetch(Session& s, int layer) ABSL_LOCKS_EXCLUDED(mu_);
  // On a prefetch thread: writes the layers of `record` not claimed by then.
  void RunPrefetch(const std::weak_ptr<Session>& weak, GroupPrefetch& record, BufferLease& lease);

  const SessionManagerOptions options_;
  Clock* const clock_;
  const uint64_t epoch_;

  mutable absl::Mutex mu_;
  // Null unless quality.remember_widths (with the monitor on). Declared
  // before the sessions, which point at it: destroyed after them.
  std::unique_ptr<CalibrationMemory> calibration_memory_;
  std::map<std::string, std::shared_ptr<Session>, std::less<>> sessions_ ABSL_GUARDED_BY(mu_);
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  std::unique_ptr<Counters> counters_;  // atomics inside
  // Staging memory of appends (thread-safe; buffers keep it alive).
  std::shared_ptr<StagingCache> staging_;
  std::unique_ptr<DecodeLanes> lanes_;  // null: decode_lane_spin 0, one core, or decode_threads 1
  // Serialises eviction decisions with the pool allocations they make room for.
  absl::Mutex admission_mu_;

  absl::Mutex reaper_mu_;
  bool stop_ ABSL_GUARDED_BY(reaper_mu_) = false;
  std::thread reaper_;
  std::unique_ptr<SlabPrefaulter> prefaulter_;  // null: prefault_slabs 0 or no reaper
  // The decode calls in flight, which the sampler gives way to (declared
  // before it: destroyed after it).
  DecodeActivity decode_activity_;
  // Null when the monitor is off. Destroyed first (its queued jobs point at
  // this manager).
  std::unique_ptr<QualitySampler> sampler_;
  std::unique_ptr<PrefetchCounters> prefetch_counters_;
  // Reset first by the destructor (its jobs hold sessions and leases).
  std::unique_ptr<Prefetcher> prefetcher_;
  // Declared last: destroyed first, so no build runs on a dying manager.
  std::unique_ptr<IndexBuilder> builder_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_SESSION_MANAGER_H_
