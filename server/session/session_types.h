// Value types of the session API (docs/architecture.md §2): configuration fixed at
// creation, the public view of a session, selection/fetch requests and
// results, admin views. Plain structs; thread safety is that of values.
#ifndef ICECACHE_SERVER_SESSION_SESSION_TYPES_H_
#define ICECACHE_SERVER_SESSION_SESSION_TYPES_H_

#include <cstdint>
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
  SelectParams default_select;
  bool pinned = false;  // never evicted at the watermark (still expires)
  ChecksumOptions checksums;
};

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
  bool pinned = false;
  int in_flight = 0;  // requests running on the session now
  // Index progress: trees (layer group x KV head indexes) built of the total.
  int trees_built = 0;
  int trees_total = 0;
  int next_layer = 0;  // a chunk arriving by layer ranges: its next layer (0 = none)
};

// SelectPages request. Zero budget/sink/recent take the session defaults
// (sink/recent: use -1 to force 0).
struct SelectRequest {
  int layer = 0;
  // q_heads x head_dim fp32, row-major; query head q belongs to KV head
  // q / (q_heads / kv_heads).
  std::vector<float> queries;
  SelectParams params;
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
};

// FetchPages request: pages[h] for every KV head h (ids of the layer group's
// index; duplicates allowed, each takes a slot), written for layers
// [layer, layer + num_layers) which must lie in one layer group.
struct FetchRequest {
  int layer = 0;
  int num_layers = 1;
  std::vector<std::vector<uint32_t>> pages;
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
};

// One sequence of a batched decode step (SessionManager::DecodeBatch): the
// layer's queries of one session, written to its own buffer region.
struct DecodeBatchEntry {
  std::string session_id;
  SelectRequest select;
  std::string buffer_id;
  uint64_t offset = 0;
  int num_layers = 1;
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
  int buffers = 0;
  uint64_t pages = 0;      // over every session's indices
  double page_fill = 0.0;  // token-weighted mean fill of those pages, [0, 1]
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_SESSION_TYPES_H_
