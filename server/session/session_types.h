// Value types of the session API (docs/architecture.md §2): configuration fixed at
// creation, the public view of a session, selection/fetch requests and
// results, admin views. Plain structs; thread safety is that of values.
#ifndef ICECACHE_SERVER_SESSION_SESSION_TYPES_H_
#define ICECACHE_SERVER_SESSION_SESSION_TYPES_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/dtype.h"
#include "server/index/selector.h"
#include "server/pool/page_pool.h"
#include "server/transfer/buffer_registry.h"
#include "server/transfer/gather.h"

namespace icecache {

// Page checksums (docs/architecture.md §5): kOff computes nothing; otherwise
// every frame's XXH3-64 is kept up to date by appends and fetched pages are
// checked (all of them, or a random `sample_fraction`).
enum class ChecksumMode { kOff, kEveryPage, kSampled };
struct ChecksumOptions {
  ChecksumMode mode = ChecksumMode::kOff;
  double sample_fraction = 0.0625;  // kSampled: (0, 1]
};

// Fixed at CreateSession. Limits are checked by ValidateSessionConfig.
struct SessionConfig {
  int layers = 0;             // 1..512
  int kv_heads = 0;           // 1..256
  int q_heads = 0;            // >= kv_heads, multiple of kv_heads (GQA), <= 4096
  int head_dim = 0;           // 1..1024
  DType dtype = DType::kF16;  // kF16, kBF16 or kF32
  int page_tokens = 16;       // 1..256
  int layer_reuse = 1;        // layers per layer group, 1..layers
  // Lease: the session expires when not used or kept alive for this long.
  // Zero means the manager's default_ttl; else 1 s .. max_ttl.
  absl::Duration ttl = absl::ZeroDuration();
  SelectorKind selector = SelectorKind::kMdci;
  MdciParams mdci;
  // Defaults for SelectPages when the request leaves them 0 / unset.
  // default_select.granularity is not read: `granularity` below is the
  // session's unit of selection.
  SelectParams default_select;
  // Unit of selection of a call that names none (docs/architecture.md §3.8,
  // CallGranularity): unset = per token wherever the call's destination
  // takes tokens, per page where it cannot or is unknown; kPage / kToken:
  // that unit for every such call.
  std::optional<Granularity> granularity;
  bool pinned = false;  // never evicted at the watermark (still expires)
  // Self-calibrating width (mdci): the mass ratio, against the exact
  // reference on the same layout, the search width is adapted to reach on
  // sampled steps. 0 = off (fixed width); else in (0, 1]. Only mdci has a
  // width; other selectors ignore it.
  double target_mass_ratio = 0.95;
  ChecksumOptions checksums;
};

// Where the selection of a call goes: nowhere yet (SelectPages: the client
// fetches it later, anywhere), a HOST_SHM buffer without device fields, or a
// CUDA_IPC buffer or a request with device fields (block ids, events), which
// take whole pages only (docs/architecture.md §6.4).
enum class SelectDestination { kNone, kHost, kDevice };

// The unit of one call's selection: the call's own granularity, else the
// session's, else (neither set) kToken for a kHost destination and kPage for
// kNone and kDevice. An explicit kToken is returned as is, whatever the
// destination (a device fetch of tokens then answers FailedPrecondition).
Granularity CallGranularity(const SessionConfig& config, std::optional<Granularity> call,
                            SelectDestination destination);

// InvalidArgument naming the field, e.g. "session config: kv_heads must be in
// 1..256, got 0". `max_ttl` bounds ttl.
absl::Status ValidateSessionConfig(const SessionConfig& config, absl::Duration max_ttl);

// Derived sizes.
inline int NumLayerGroups(const SessionConfig& c) {
  return (c.layers + c.layer_reuse - 1) / c.layer_reuse;
}
// Layers [first, first + count) of the model; count 0 = to the last layer.
struct LayerRange {
  int first = 0;
  int count = 0;
};

// Bytes of one append of `n` tokens: K then V, each layers x kv_heads x n x
// head_dim elements of the session dtype (layers: those of `range`).
uint64_t AppendBytes(const SessionConfig& c, int64_t n, LayerRange range = {});

// Measured quality of one (layer group, KV head) (session_quality.h).
struct HeadQualityInfo {
  int group = 0;
  int kv_head = 0;
  bool calibrated = false;  // a width calibrator adapts this head's width
  double width = 1.0;       // multiplier of the session's mdci width now in use
  int field_of_view = 0;    // the width in use (calibrated heads)
  float candidate_factor = 0.0f;
  int64_t width_changes = 0;
  // Exact fallback (calibrated heads): the tree did not pay, so this head
  // selects exactly now (exact page scores on its layout / exact tokens).
  bool exact = false;
  int64_t exact_selections = 0;  // selections made exactly so far
  int64_t fallbacks = 0;         // switches from the tree to exact selection
  int64_t sample_interval = 0;   // selections between samples once warm, now
  // The descent's ranking (calibrated heads): "loudest" or "normalized"
  // (WidthCalibrator's ranking duel), the duel's paired samples so far, the
  // moving mean gain of the other ranking since the last switch (its ratio
  // - this one's) and the switches.
  std::string ranking;
  int64_t ranking_trial_samples = 0;
  double ranking_trial_gain = 0.0;
  int64_t ranking_switches = 0;
  // Started from the width an earlier session of the same tenant and model
  // settled on (calibration memory), not from the default.
  bool seeded = false;
  // Started from the session's pooled width (the median of its sampled
  // heads') before a sample of its own (SessionQualityOptions::pool_widths).
  bool pooled = false;
  // "tree" or "scan" (calibrated heads; WidthCalibrator's method duel), the
  // duel's trials and the trials the other method won.
  std::string method;
  int64_t method_trials = 0;
  int64_t method_switches = 0;
  // Candidate carry-over: the selects each fresh one's candidates serve now
  // (0: off or stopped) and the times it stopped.
  int carry_steps = 0;
  int64_t carry_stops = 0;
  int64_t samples = 0;             // selections measured
  double mean_mass_ratio = 0.0;    // over every sample
  double recent_mass_ratio = 0.0;  // moving average (weight 1/8 per sample)
  double last_mass_ratio = 0.0;
  double mean_topk_recall = 0.0;
};

// The session's online quality monitor (docs/architecture.md §5).
struct SessionQualityInfo {
  bool monitored = false;          // selections of this session are sampled
  double target_mass_ratio = 0.0;  // 0 = width not calibrated
  int64_t samples = 0;             // measured, over every head
  int64_t samples_dropped = 0;     // not measured: queue full or CPU budget spent
  int64_t samples_stale = 0;       // not measured: the index was being built, or broke
  int64_t samples_reselected = 0;  // measured late: selected again at the probe's width
  int64_t probe_yields = 0;        // times a measurement let waiting appends through
  double mean_mass_ratio = 0.0;    // over every sample
  double recent_mass_ratio = 0.0;  // mean over heads of their moving average
  double mean_topk_recall = 0.0;
  int64_t calibration_cpu_ns = 0;  // reference scans of this session
  int64_t selection_ns = 0;        // this session's selections (per head, summed)
  int seeded_heads = 0;            // heads started from an earlier session's width
  int pooled_heads = 0;            // heads started from the session's pooled width
  double pool_width = 0.0;         // the pooled width now (0: no pool)
  int64_t pool_samples = 0;        // samples the pool learnt from
  int64_t carried_selections = 0;  // selections that reused a fresh one's candidates
  bool carry_stopped = false;      // the session's pooled judgement stopped the carry-over
  int carry_pool_steps = 0;        // the carry length it allows unjudged heads (0: not judged yet)
  int64_t carry_shortened = 0;     // its judgements that shortened the carry by one
  std::vector<HeadQualityInfo> heads;  // [group * kv_heads + head] when monitored
};

struct SessionInfo {
  std::string id;  // opaque, 32 hex characters, random
  std::string tenant;
  uint64_t epoch = 0;    // daemon start id; changes when the daemon restarts
  SessionConfig config;  // with ttl resolved
  absl::Time created;
  absl::Time last_use;
  absl::Time expires;  // last_use + ttl
  int64_t tokens = 0;
  uint64_t pages = 0;  // pages over all (layer group, head) indices
  // Mean page fill: tokens held / (pages x page_tokens) over all indices,
  // in [0, 1]; 0 for an empty session. Half-empty pages waste transfer budget.
  double page_fill = 0.0;
  uint64_t frame_bytes = 0;  // pool bytes (charged to the tenant's quota)
  uint64_t index_bytes = 0;  // selector structures (not charged)
  // Decode keys the session's trees inserted one at a time since this daemon
  // built or loaded them, and of them those that joined a recent node
  // without being routed (MdciParams::insert_fit).
  uint64_t decode_keys = 0;
  uint64_t decode_keys_unrouted = 0;
  bool pinned = false;
  int in_flight = 0;  // requests running on the session now
  // Index progress: trees (layer group x KV head indexes) built of the total.
  int trees_built = 0;
  int trees_total = 0;
  int next_layer = 0;  // a chunk arriving by layer ranges: its next layer (0 = none)
  SessionQualityInfo quality;
};

// SelectPages request. Zero budget/sink/recent take the session defaults
// (sink/recent: use -1 to force 0).
struct SelectRequest {
  int layer = 0;
  // q_heads x head_dim fp32, row-major; query head q belongs to KV head
  // q / (q_heads / kv_heads).
  std::vector<float> queries;
  SelectParams params;
  // Unset: the session's granularity, else the destination's (CallGranularity);
  // params.granularity is ignored.
  std::optional<Granularity> granularity;
  // For a layer that is not the first of its group: reuse the selection
  // made for the group's first layer at the current token count instead of
  // selecting (queries may then be empty). FailedPrecondition if there is none.
  bool reuse_group_selection = false;
};

struct SelectResult {
  int layer = 0;
  int group = 0;
  bool reused = false;
  std::vector<Selection> heads;  // one per KV head, in head order
  // Of the group's stored selection (a first layer's, or the one reused);
  // 0 for a later layer's own selection (layer_reuse 1 or not reused).
  uint64_t generation = 0;
  int64_t tokens = 0;  // the group's tokens the selection was made at
};

// FetchPages request: pages[h] for every KV head h (ids of the layer group's
// index; duplicates allowed, each takes a slot), written for layers
// [layer, layer + num_layers) which must lie in one layer group.
//
// Token granularity: `tokens` (non-empty: one vector per KV head, each
// head's pages empty) lists token positions per head (duplicates allowed),
// packed into slots in that order (gather.h).
struct FetchRequest {
  int layer = 0;
  int num_layers = 1;
  std::vector<std::vector<uint32_t>> pages;
  std::vector<std::vector<int32_t>> tokens;
  // Optional, beside `tokens` (per KV head, same length): where each token
  // lies, as this session's selection found it (Selection::token_refs).
  // Fetch checks each one against the layout (the page's slot holds that
  // position) and looks up only the tokens whose hint is wrong or missing.
  // DecodeStep passes its selection's, saving a lookup per token.
  std::vector<std::vector<Placement>> token_hints;
  // The hints are this session's own selection, checked under the same hold
  // of Session::mu as this fetch (DecodeStep): fresh, or the group's cached
  // one at the token count the group still holds. A placement never changes
  // while the count holds (appends only add tokens; a rebuild moves none),
  // so Fetch takes them as they are instead of reading each one's page back
  // (a cache miss per token, most of a token fetch's own CPU:
  // docs/bench/order13_heads.md). Set only there; never from a request on
  // the wire, nor for a background prefetch (GroupPrefetch::RequestFor).
  bool hints_checked = false;
  // Token granularity: the region holds what this session's previous token
  // write of these layers put there, unchanged (the client's word): write
  // only the tokens not written last time, into the slots of those that
  // left (resident_rows.h). Without a record of that write, in full.
  bool in_place = false;
  std::string buffer_id;
  uint64_t offset = 0;
  bool want_positions = false;
  // CUDA_IPC only: scatter into the client's paged KV cache blocks and order
  // the push by the client's events (docs/architecture.md §6.3).
  DeviceWrite device;
};

struct DecodeStepResult {
  SelectResult selection;
  FetchLayout layout;
  // Layers of the group being written in the background after this one
  // (prefetch_group; 0 when none: not asked, no later layer, or refused).
  int prefetching = 0;
  // This layer's bytes were written in the background (prefetch) before
  // the call came.
  bool prefetched = false;
  // Wall time of the selection (reused: the cache lookup) and of the gather
  // (the copy, or the wait for a prefetched layer) inside this call.
  int64_t select_ns = 0, gather_ns = 0;
  // The whole SessionManager::DecodeStep: the above plus the session
  // lookup, lock and build waits, probe hand-off and prefetch start.
  int64_t step_ns = 0;
};

// One sequence of a batched decode step (SessionManager::DecodeBatch): the
// layer's queries of one session, written to its own buffer region.
struct DecodeBatchEntry {
  std::string session_id;
  SelectRequest select;
  std::string buffer_id;
  uint64_t offset = 0;
  int num_layers = 1;
  bool prefetch_group = false;  // as in SessionManager::DecodeStep
  bool in_place = false;        // likewise
};

// Counters of the layer-group prefetch (SessionManager::prefetch_stats).
struct PrefetchStats {
  uint64_t started = 0;    // requests queued
  uint64_t refused = 0;    // queue full: went without prefetch
  uint64_t written = 0;    // layers written in the background
  uint64_t used = 0;       // of those, handed to the client's call for the layer
  uint64_t claimed = 0;    // layers whose call came first and wrote them itself
  uint64_t discarded = 0;  // layers not written: cancelled, stale, session or buffer gone
};

struct AppendResult {
  int64_t tokens = 0;        // session tokens after the append (every layer)
  int next_layer = 0;        // first layer of the chunk still to come; 0 = complete
  uint64_t new_pages = 0;    // pages opened by this append (all layers)
  uint64_t frame_bytes = 0;  // session pool bytes after the append
};

struct TenantInfo {
  std::string tenant;
  uint64_t used_bytes = 0;
  uint64_t quota_bytes = kUnlimitedQuota;
  int sessions = 0;
  int buffers = 0;
};

struct ManagerStats {
  PoolStats pool;
  uint64_t epoch = 0;
  int sessions = 0;
  int in_flight = 0;
  bool draining = false;
  uint64_t sessions_created = 0;
  uint64_t sessions_evicted = 0;
  uint64_t sessions_expired = 0;
  uint64_t sessions_dropped = 0;
  uint64_t admissions_rejected = 0;  // RESOURCE_EXHAUSTED answers
  uint64_t pages_verified = 0;       // fetched pages whose checksum was checked
  uint64_t checksum_failures = 0;    // of those, mismatches (DATA_LOSS answers)
  uint64_t pool_pinned_bytes = 0;    // readable in place by the GPU (device_push.h)
  uint64_t gpu_pushes_in_place = 0;  // pushes to client GPUs that read the pool in place
  uint64_t gpu_pushes_staged = 0;    // ... that went through pinned staging
  int buffers = 0;
  uint64_t pages = 0;      // over every session's indices
  double page_fill = 0.0;  // token-weighted mean fill of those pages, [0, 1]
  // The live sessions' SessionInfo::decode_keys and decode_keys_unrouted, summed.
  uint64_t decode_keys = 0;
  uint64_t decode_keys_unrouted = 0;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_SESSION_TYPES_H_
