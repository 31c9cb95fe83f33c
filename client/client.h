// icecache::Client: the C++ client of icecached (docs/architecture.md).
//
// One Client holds one gRPC channel to the daemon: a Unix socket (default)
// or a TCP address with TLS and a bearer token. Every call is a blocking RPC
// with the client's deadline; errors come back as absl::Status carrying the
// daemon's canonical code and message unchanged (see types.proto for which
// code means what). No gRPC or protobuf type appears in this header.
//
// Thread safety: a Client is thread-safe; all methods may be called
// concurrently. DecodeStep() serialises calls per session (one stream per
// session); calls for different sessions run in parallel.
// Ownership: ShmBuffer objects created by a Client refer to it and must be
// destroyed before it.
#ifndef ICECACHE_CLIENT_CLIENT_H_
#define ICECACHE_CLIENT_CLIENT_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "common/dtype.h"

namespace icecache {

struct ClientOptions {
  // Unix socket of the daemon. Empty: $ICECACHE_SOCKET, else the daemon's
  // default search order (/run/icecache/icecached.sock,
  // $XDG_RUNTIME_DIR/icecached.sock, /tmp/icecached-<uid>.sock; the first
  // that exists). Ignored when `address` is set.
  std::string socket_path;
  // TCP "host:port" of a remote daemon; always TLS. Empty: $ICECACHE_ADDRESS.
  std::string address;
  // PEM file with the CA that signed the daemon's certificate (TCP only).
  // Empty: the system roots.
  std::string ca_file;
  // Bearer token sent as "authorization: Bearer <token>" (TCP only).
  // Empty: $ICECACHE_TOKEN.
  std::string token;
  // Deadline of every unary call; DecodeStep streams have no deadline.
  absl::Duration timeout = absl::Seconds(30);
  // Largest message the client accepts / sends.
  int max_message_bytes = 64 << 20;
  // DecodeStep of one session over a shared-memory ring (docs/architecture.md
  // §8.1) when the daemon is local (Unix socket) and accepts one; otherwise,
  // and for DecodeBatch, the gRPC stream. Results and codes are the same;
  // on the ring an error ends only its own step.
  bool decode_ring = true;
  // On the ring, after sending a step the client watches for its answer for
  // up to this long (yielding the CPU between looks) before it sleeps on the
  // doorbell, while the session's last answer came within it: a sleeping
  // thread's wake-up costs tens of microseconds (about 90 on a 2-vCPU VM,
  // docs/bench/rpc.md). Zero (the default): always sleep. Worth it only
  // with a core to spare beside the daemon's selection threads: on 2 cores
  // the watch competes with them (docs/bench/rpc.md).
  absl::Duration decode_ring_spin = absl::ZeroDuration();
};

enum class SelectorType : uint8_t {
  kDefault = 0,  // the daemon's default (mdci)
  kMdci = 1,
  kExactMdci = 2,
  kExact = 3,
  kQuest = 4,
  kStreaming = 5,
  kArkvale = 6,
  kPqcache = 7,
  kSnapkv = 8,
  kOmnikv = 9,
  kMagicpig = 10,
  kMdciPublished = 11,
};
std::string_view SelectorTypeName(SelectorType type);
// Accepts "mdci", "exact-mdci", "exact", "quest", "streaming", "arkvale",
// "pqcache", "snapkv", "omnikv", "magicpig", "mdci-published", "default".
absl::StatusOr<SelectorType> ParseSelectorType(std::string_view name);

// Unit of selection (types.proto Granularity): whole pages, or the best
// tokens packed into slots (HeadSelection.pages empty, positions listed).
enum class SelectionGranularity {
  // Per call: the session's. As the session's (the default): per token for a
  // DecodeStep into a HOST_SHM buffer, per page for a CUDA_IPC buffer, device
  // fields, and SelectPages (types.proto Granularity).
  kDefault,
  kPage,
  kToken,
};

// Per-call selection parameters; unset = the session's defaults.
struct SelectOptions {
  std::optional<uint32_t> budget_tokens;
  std::optional<uint32_t> sink_tokens;
  std::optional<uint32_t> recent_tokens;
  bool want_positions = false;
  SelectionGranularity granularity = SelectionGranularity::kDefault;
  // SelectPages / DecodeStep on a layer that is not the first of its layer
  // group: reuse the group's selection (queries may then be empty).
  bool reuse_group_selection = false;
};

// Everything fixed at session creation (types.proto SessionConfig).
// 0 means "the daemon's default" for page_tokens, layer_reuse and ttl.
struct SessionSpec {
  int layers = 0;
  int kv_heads = 0;
  int q_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kF16;
  int page_tokens = 0;
  SelectorType selector = SelectorType::kDefault;
  int layer_reuse = 0;
  SelectOptions defaults;
  // 0 = daemon default; else >= 1 s and <= the daemon's max TTL.
  absl::Duration ttl = absl::ZeroDuration();
  bool pinned = false;  // never evicted at the watermark (still expires)
  // MDCI: the mass ratio the self-calibrating width aims at (types.proto
  // SessionConfig.target_mass_ratio); unset = the daemon's default, 0 = fixed width.
  std::optional<double> target_mass_ratio;
  // MDCI and EXACT_MDCI search width (types.proto MdciParams): nodes kept per
  // level and candidate pages per budget page; 0 = the daemon's default.
  uint32_t mdci_field_of_view = 0;
  float mdci_candidate_factor = 0.0f;
  // MDCI: the product-quantised scan beside the tree (types.proto
  // MdciParams.pq_factor): this many x budget tokens' worth of the best
  // pages by the 4-bit codes are scored exactly, and the quality monitor
  // keeps per head the cheaper of the scan and the tree's descent that meets
  // its target. Unset = the daemon's default (8 where head_dim is a multiple
  // of 8); 0 = the tree's descent only (no codes); else 1..512.
  std::optional<float> mdci_pq_factor;
  // MDCI's candidate carry-over (types.proto MdciParams.carry_keep_factor):
  // the selects that reuse a fresh one's candidates score its best this many
  // x budget tokens' worth of them. Unset = the daemon's default (4); 0 =
  // every candidate; else 1..512.
  std::optional<float> mdci_carry_keep_factor;
  // MDCI decode appends (types.proto MdciParams.insert_fit): a key within
  // this many times the spread of the nearest recent node with room joins it
  // unrouted. Unset = the daemon's default (2); 0 = every key routed (keys
  // with no temporal locality); else up to 64.
  std::optional<float> mdci_insert_fit;
  // Page checksums (types.proto PageChecksums): computed at append, checked
  // at fetch (every page, or a sampled fraction); a mismatch is DATA_LOSS.
  enum class Checksums { kOff = 1, kEveryPage = 2, kSampled = 3 };
  Checksums checksums = Checksums::kOff;
  float checksum_sample_fraction = 0;  // kSampled: (0, 1]; 0 = the daemon's default

  // Bytes of one AppendKv chunk of `tokens` tokens:
  // 2 x layers x kv_heads x tokens x head_dim x dtype size.
  size_t ChunkBytes(int64_t tokens) const;
};

// Selection quality of one (layer group, KV head), measured on sampled
// selections (types.proto HeadQuality).
struct HeadQuality {
  uint32_t layer_group = 0;
  uint32_t kv_head = 0;
  bool calibrated = false;
  double width = 1.0;  // multiplier of the session's MDCI width in use
  uint32_t field_of_view = 0;
  float candidate_factor = 0.0f;
  uint64_t width_changes = 0;
  uint64_t samples = 0;
  double mean_mass_ratio = 0.0;
  double recent_mass_ratio = 0.0;
  double last_mass_ratio = 0.0;
  double mean_topk_recall = 0.0;
  bool exact = false;  // selects exactly now (exact fallback: the tree did not pay)
  uint64_t exact_selections = 0;
  uint64_t fallbacks = 0;
  uint64_t sample_interval = 0;  // selections between measurements once warm
  std::string descent_ranking;   // "loudest" / "normalized" (calibrated heads)
  uint64_t ranking_trial_samples = 0;
  double ranking_trial_gain = 0.0;  // mean: the other ranking's ratio - this one's
  uint64_t ranking_switches = 0;
  bool seeded = false;         // started from an earlier session's width (calibration memory)
  std::string search_method;   // "tree" / "scan" (calibrated heads)
  uint64_t method_trials = 0;  // the method duel's trials, and those the other method won
  uint64_t method_switches = 0;
  bool pooled = false;       // started from the session's pooled width (no sample of its own then)
  uint32_t carry_steps = 0;  // steps each fresh scan's candidates serve now (0: off or stopped)
  uint64_t carry_stops = 0;
};

// The session's online quality monitor (types.proto SessionQuality).
struct SessionQuality {
  bool monitored = false;
  double target_mass_ratio = 0.0;  // 0 = width not calibrated
  uint64_t samples = 0;
  uint64_t samples_dropped = 0;
  uint64_t samples_stale = 0;
  double mean_mass_ratio = 0.0;
  double recent_mass_ratio = 0.0;
  double mean_topk_recall = 0.0;
  double calibration_cpu_ms = 0.0;
  double selection_ms = 0.0;
  uint32_t seeded_heads = 0;  // heads started from an earlier session's width
  uint32_t pooled_heads = 0;  // heads started from the session's pooled width
  double pool_width = 0.0;    // the session's pooled width (0: none) and its samples
  uint64_t pool_samples = 0;
  uint64_t carried_selections = 0;  // selections that reused a fresh one's candidates
  bool carry_stopped = false;       // the session's pooled judgement stopped the carry-over
  uint32_t carry_pool_steps = 0;    // the carry length it allows (0: no judgement yet)
  uint64_t carry_shortened = 0;     // its judgements that shortened the carry
  std::vector<HeadQuality> heads;
};

// In an inline namespace: the core has types of the same name, and a
// program may link both (icecache-bench decode); distinct mangled names
// keep them apart (no ODR clash).
inline namespace client_api {
struct SessionInfo {
  std::string id;
  uint64_t epoch = 0;
  std::string tenant;
  SessionSpec spec;  // with the daemon's defaults filled in
  uint64_t tokens = 0;
  absl::Time created;
  absl::Time last_use;
  absl::Time expires;
  bool pinned = false;
  uint64_t bytes = 0;        // pool bytes held, charged to the quota
  uint64_t pages = 0;        // pages over all indices
  uint64_t index_bytes = 0;  // index structures (not charged)
  // Decode keys the trees inserted one at a time since the daemon built or
  // loaded them, and of them those that skipped routing (mdci_insert_fit).
  uint64_t decode_keys = 0;
  uint64_t decode_keys_unrouted = 0;
  uint32_t in_flight = 0;  // requests running on the session now
  // Index progress: (layer group, KV head) trees built of the total, and the
  // next layer of a chunk sent by layer ranges (0 = none pending).
  uint32_t trees_built = 0;
  uint32_t trees_total = 0;
  uint32_t next_layer = 0;
  SessionQuality quality;
};
}  // namespace client_api

// Selection of one KV head, pages in descending score order.
struct HeadSelection {
  uint32_t kv_head = 0;
  std::vector<uint32_t> pages;
  std::vector<uint32_t> fills;
  std::vector<float> scores;
  std::vector<int32_t> positions;  // when want_positions
  uint64_t keys_touched = 0;
};

// Where fetched pages landed (types.proto FetchLayout): per head, per page, a
// block of page_bytes = K (page_tokens x head_dim) then V, rows past the
// page's fill zeroed. A selection made per token (HeadSelection.pages empty,
// positions listed) lands in slots whose page id is kTokenSlotPage, its
// tokens packed in order (every slot full but the last).
inline constexpr uint32_t kTokenSlotPage = 4294967295u;
struct HeadLayout {
  uint32_t kv_head = 0;
  std::vector<uint32_t> pages;
  std::vector<uint32_t> slots;
  std::vector<uint32_t> fills;
  std::vector<uint64_t> byte_offsets;  // absolute offset of each K block (first layer)
  std::vector<int32_t> positions;      // when requested
};
// With num_layers > 1 layer j of the fetch starts at
// offset + j x layer_stride_bytes, with the same slots.
// In an inline namespace: the core has types of the same name, and a
// program may link both (icecache-bench decode); distinct mangled names
// keep them apart (no ODR clash).
inline namespace client_api {
struct FetchLayout {
  std::string buffer_id;
  uint64_t offset = 0;
  uint64_t total_bytes = 0;
  uint64_t page_bytes = 0;
  uint32_t first_layer = 0;
  uint32_t num_layers = 1;
  uint64_t layer_stride_bytes = 0;
  uint32_t page_tokens = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kF16;
  std::vector<HeadLayout> heads;
  // Token granularity, per layer over every head: rows copied by this
  // write, and rows left in place (StepOptions::in_place).
  uint64_t rows_copied = 0;
  uint64_t rows_kept = 0;
};
}  // namespace client_api

struct StepResult {
  uint32_t layer = 0;
  std::vector<HeadSelection> heads;
  FetchLayout layout;
  bool reused = false;
  // StepOptions::prefetch_group on a group's first layer: the group's later
  // layers being written in the background (0: none, e.g. the daemon's
  // prefetch queue was full: their calls copy as usual).
  uint32_t prefetching = 0;
  // This layer's pages were already written by a prefetch when the call came.
  bool prefetched = false;
  // The daemon's wall time in the call: selecting and gathering (kv.proto).
  uint64_t select_ns = 0, gather_ns = 0;
  uint64_t step_ns = 0;  // the whole call inside the daemon's session manager
};

// Element layouts of an engine's paged KV cache (buffer.proto PagedKvFormat;
// docs/engines.md "Paged KV caches"). The head_dim axis is contiguous.
// In an inline namespace: the core has types of the same name (see FetchLayout).
inline namespace client_api {
enum class PagedKvFormat {
  kVllmFlash = 1,      // [2, num_blocks, block_tokens, kv_heads, head_dim]
  kFlashInferNhd = 2,  // [num_blocks, 2, block_tokens, kv_heads, head_dim]
  kFlashInferHnd = 3,  // [num_blocks, 2, kv_heads, block_tokens, head_dim]
  kCustom = 4,         // the four element strides below
};

// An engine's paged KV cache in one CUDA allocation (buffer.proto
// PagedKvCache): num_layers layer tensors, either at layer_offsets_bytes
// (one per layer, e.g. data_ptr() minus the allocation's base) or, when that
// is empty, one all-layer tensor where layer l starts at base_offset_bytes +
// l x layer_stride elements (0 = the layer tensor's size). The daemon checks
// every layer tensor against the registered size before anything is written.
struct PagedKvCache {
  PagedKvFormat format = PagedKvFormat::kVllmFlash;
  uint32_t first_layer = 0;  // model layer of the first layer tensor
  uint32_t num_layers = 0;
  uint32_t num_blocks = 0;
  uint32_t block_tokens = 0;  // >= the session's page_tokens
  uint32_t kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kF16;
  std::vector<uint64_t> layer_offsets_bytes;
  uint64_t base_offset_bytes = 0;
  uint64_t layer_stride = 0;
  // kCustom only: element strides (Tensor.stride()) of the K/V, block, token
  // and head axes.
  uint64_t kv_stride = 0, block_stride = 0, token_stride = 0, head_stride = 0;
};

// What a fetch or decode step asks of a CUDA_IPC buffer besides the bytes
// (kv.proto FetchPagesRequest): `block_ids`, this step's block table (the
// i-th page of every KV head lands in block block_ids[i] of the registered
// paged KV cache; rows past a page's fill and heads with fewer pages are
// zero; `offset` is then unused), and CUDA IPC events ordering the push:
// the daemon's stream waits on `wait_event` before writing and records
// `done_event` after (the call then returns without waiting for the copy).
// Events are cudaIpcEventHandle_t bytes (64) of events made with
// cudaEventInterprocess | cudaEventDisableTiming, or empty.
struct DeviceWrite {
  std::vector<uint32_t> block_ids;
  std::string wait_event;
  std::string done_event;
  bool empty() const { return block_ids.empty() && wait_event.empty() && done_event.empty(); }
};
}  // namespace client_api

// A CUDA IPC registration (buffer.proto CudaIpc): the allocation's
// cudaIpcMemHandle_t (64 bytes), the bytes the daemon may use, the device's
// UUID (16 raw bytes, or "GPU-xxxxxxxx-..."), and, for an engine's KV cache,
// its paged layout.
struct CudaIpcBuffer {
  std::string handle;
  uint64_t size = 0;
  std::string device_uuid;
  std::optional<PagedKvCache> paged_kv;
};

// The per-call options of a decode step beyond the selection.
struct StepOptions {
  // Pages are written for layers [layer, layer + num_layers) of one group.
  uint32_t num_layers = 1;
  // CUDA_IPC buffers: block ids and events (DeviceWrite).
  DeviceWrite device;
  // IceCache(r) prefetch (kv.proto DecodeStepRequest.prefetch_group): on the
  // first layer of a layer group, the daemon writes the group's later layers
  // in the background after answering: layer `layer + j` at offset + j x
  // layout.layer_stride_bytes (or into the same block ids of its tensor).
  // The call for such a layer (reuse_group_selection, that offset or those
  // block ids) then only waits for its write (StepResult::prefetched).
  bool prefetch_group = false;
  // In-place write (kv.proto DecodeStepRequest.in_place; token granularity
  // into a HOST_SHM buffer): the region of these layers still holds what
  // this session's previous step of the same layers wrote at the same
  // offset, untouched since. Only the tokens not written then are copied,
  // into the slots of the tokens that left; the rest stay. The layout's
  // positions then give each slot's token (rows are no longer in selection
  // order), rows_copied / rows_kept the split. Without such a previous
  // write the daemon writes in full.
  bool in_place = false;
};

// One sequence of a batched decode step (Client::DecodeBatch): the layer's
// queries of one session (q_heads x head_dim fp32, not owned: valid during
// the call) and where its pages go.
// In an inline namespace: the core has types of the same name, and a
// program may link both (icecache-bench decode); distinct mangled names
// keep them apart (no ODR clash).
inline namespace client_api {
struct DecodeBatchEntry {
  std::string session_id;
  absl::Span<const float> queries;
  std::string buffer_id;
  uint64_t offset = 0;
  bool reuse_group_selection = false;
  bool prefetch_group = false;  // as StepOptions::prefetch_group
  bool in_place = false;        // as StepOptions::in_place
};
}  // namespace client_api

// Admin views (admin.proto).
// In an inline namespace: the core has types of the same name, and a
// program may link both (icecache-bench decode); distinct mangled names
// keep them apart (no ODR clash).
inline namespace client_api {
struct TenantInfo {
  std::string tenant;
  uint64_t bytes_used = 0;
  uint64_t quota_bytes = 0;  // 0 = none
  uint32_t sessions = 0;
  uint32_t buffers = 0;
};
}  // namespace client_api
struct SizeClassInfo {
  uint64_t frame_bytes = 0;
  uint64_t frames_used = 0;
  uint64_t frames_free = 0;
  uint64_t bytes_reserved = 0;
};
struct DaemonStats {
  uint64_t epoch = 0;
  absl::Time start;
  uint64_t capacity_bytes = 0;
  uint64_t bytes_reserved = 0;
  uint64_t bytes_used = 0;
  uint32_t sessions = 0;
  uint32_t buffers = 0;
  uint64_t evictions = 0;
  uint64_t expirations = 0;
  uint32_t in_flight = 0;
  bool draining = false;
  uint64_t sessions_created = 0;
  uint64_t sessions_dropped = 0;
  uint64_t admissions_rejected = 0;
  uint64_t frames_used = 0;
  uint64_t frames_free = 0;
  bool huge_pages = false;
  uint64_t pages_verified = 0;     // fetched pages whose checksum was checked
  uint64_t checksum_failures = 0;  // of those, mismatches (DATA_LOSS answers)
  // Pushes to client GPUs: pool bytes the device reads in place (0: not
  // pinned), and pushes by path (admin.proto GetStatsResponse).
  uint64_t pool_pinned_bytes = 0;
  uint64_t gpu_pushes_in_place = 0;
  uint64_t gpu_pushes_staged = 0;
  std::vector<SizeClassInfo> size_classes;
  std::vector<TenantInfo> tenants;
};
struct DrainInfo {
  uint32_t in_flight = 0;
  uint32_t sessions = 0;
};

class Client;

// A region of shared memory under /dev/shm, created and owned by the caller
// and registered with the daemon, which writes fetched pages into it (and
// may read appended KV from it). On destruction: unregister (best effort),
// unmap, close, unlink. Move-only. Not thread-safe to move/destroy while
// another thread uses it; reading/writing data() concurrently is the
// caller's business.
class ShmBuffer {
 public:
  ShmBuffer() = default;
  ~ShmBuffer();
  ShmBuffer(ShmBuffer&& other) noexcept;
  ShmBuffer& operator=(ShmBuffer&& other) noexcept;
  ShmBuffer(const ShmBuffer&) = delete;
  ShmBuffer& operator=(const ShmBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  const std::string& buffer_id() const { return buffer_id_; }
  bool valid() const { return data_ != nullptr; }

  // Unregisters now and reports the daemon's answer (the destructor does the
  // same silently). The mapping and file stay until destruction.
  absl::Status Unregister();

 private:
  friend class Client;
  void Release();

  Client* client_ = nullptr;
  std::string path_;
  std::string buffer_id_;
  int fd_ = -1;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

class Client {
 public:
  // Connects lazily: Create() fails only for bad options (InvalidArgument,
  // NotFound for a missing CA file / no socket found). The first RPC
  // reports UNAVAILABLE when no daemon listens.
  static absl::StatusOr<std::unique_ptr<Client>> Create(const ClientOptions& options);
  // Connects to "unix:<path>" or "<host:port>" with default options.
  static absl::StatusOr<std::unique_ptr<Client>> Create(std::string_view target);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // "unix:/path" or "host:port".
  const std::string& target() const;

  // --- sessions ---
  absl::StatusOr<SessionInfo> CreateSession(const SessionSpec& spec);
  absl::StatusOr<SessionInfo> GetSession(std::string_view session_id);
  // The caller's sessions; all_tenants needs the admin role.
  absl::StatusOr<std::vector<SessionInfo>> ListSessions(bool all_tenants = false);
  // Renews the leases; returns each new lease end.
  absl::StatusOr<std::vector<absl::Time>> KeepAlive(const std::vector<std::string>& session_ids);
  // Also closes this client's decode stream of the session.
  absl::Status DropSession(std::string_view session_id);

  // --- buffers ---
  // Creates /dev/shm/icecache-<pid>-<random> (mode 0600), sizes and maps
  // it, registers it. InvalidArgument for size 0; Internal for OS errors
  // (with errno text); the daemon's status when registration fails (the
  // file is removed again).
  absl::StatusOr<ShmBuffer> CreateShmBuffer(size_t size);
  // Registers an existing file (for tests and callers that manage their own
  // files); returns the buffer id.
  absl::StatusOr<std::string> RegisterShm(std::string_view path, uint64_t size);
  // Registers a CUDA allocation by IPC (optionally an engine's paged KV
  // cache); returns the buffer id. InvalidArgument from this client for a
  // handle that is not 64 bytes; the daemon's codes otherwise (buffer.proto
  // RegisterBuffer): INVALID_ARGUMENT / OUT_OF_RANGE naming the paged_kv
  // field, FAILED_PRECONDITION "no CUDA device" on a daemon without one.
  absl::StatusOr<std::string> RegisterCudaIpc(const CudaIpcBuffer& buffer);
  absl::Status UnregisterBuffer(std::string_view buffer_id);

  // --- KV ---
  // Appends `num_tokens` tokens from buffer bytes [offset, offset+length).
  // Returns the session's token count after the append.
  absl::StatusOr<uint64_t> AppendKv(std::string_view session_id, const ShmBuffer& buffer,
                                    uint64_t offset, uint64_t length, uint32_t num_tokens);
  absl::StatusOr<uint64_t> AppendKv(std::string_view session_id, std::string_view buffer_id,
                                    uint64_t offset, uint64_t length, uint32_t num_tokens);
  // Appends the layers [first_layer, first_layer + num_layers) of a chunk of
  // `num_tokens` tokens (whole layer groups, in order from layer 0; the
  // region holds those layers' keys then values). Each call indexes only its
  // layers, so a long prefill sent this way never meets one call's deadline.
  // Returns the next layer of the chunk to send (0 once it is complete).
  absl::StatusOr<uint32_t> AppendKvLayers(std::string_view session_id, std::string_view buffer_id,
                                          uint64_t offset, uint64_t length, uint32_t num_tokens,
                                          uint32_t first_layer, uint32_t num_layers);
  // Inline bytes (remote or small clients; bounded by the daemon).
  absl::StatusOr<uint64_t> AppendKvInline(std::string_view session_id, absl::Span<const uint8_t> kv,
                                          uint32_t num_tokens);

  // Queries: q_heads x head_dim fp32 of one layer. One HeadSelection per KV
  // head. `reused` (optional) reports whether the layer group's selection
  // was reused.
  absl::StatusOr<std::vector<HeadSelection>> SelectPages(std::string_view session_id,
                                                         uint32_t layer,
                                                         absl::Span<const float> queries,
                                                         const SelectOptions& options = {});
  // Fetches `pages[h]` of every KV head h of `layer` into `buffer_id` at
  // `offset`.
  absl::StatusOr<FetchLayout> FetchPages(std::string_view session_id, uint32_t layer,
                                         const std::vector<std::vector<uint32_t>>& pages,
                                         std::string_view buffer_id, uint64_t offset,
                                         bool want_positions = false, uint32_t num_layers = 1);
  // The same into a CUDA_IPC buffer with `device` (block ids of a paged KV
  // cache, events). InvalidArgument from this client for an event that is
  // not 64 bytes or a block id listed twice (naming it); the daemon's codes
  // otherwise (kv.proto FetchPagesRequest: OUT_OF_RANGE for a block id past
  // num_blocks, INVALID_ARGUMENT for device fields on a HOST_SHM buffer,
  // FAILED_PRECONDITION for block ids on a buffer without paged_kv).
  absl::StatusOr<FetchLayout> FetchPages(std::string_view session_id, uint32_t layer,
                                         const std::vector<std::vector<uint32_t>>& pages,
                                         std::string_view buffer_id, uint64_t offset,
                                         bool want_positions, uint32_t num_layers,
                                         const DeviceWrite& device);
  // Token granularity: fetches the tokens at `positions[h]` of every KV head h,
  // packed in order into slots of page_tokens (kv.proto HeadPages.tokens).
  absl::StatusOr<FetchLayout> FetchTokens(std::string_view session_id, uint32_t layer,
                                          const std::vector<std::vector<int32_t>>& positions,
                                          std::string_view buffer_id, uint64_t offset,
                                          bool want_positions = false, uint32_t num_layers = 1);
  // Convenience: fetch exactly the pages of `selection` (its tokens when it
  // was made at token granularity).
  absl::StatusOr<FetchLayout> FetchPages(std::string_view session_id, uint32_t layer,
                                         const std::vector<HeadSelection>& selection,
                                         std::string_view buffer_id, uint64_t offset,
                                         bool want_positions = false);

  // One layer of a decode step over this client's bidirectional stream of
  // the session (opened on first use, reopened after an error). Pages land
  // in `buffer_id` at `offset` before this returns.
  absl::StatusOr<StepResult> DecodeStep(std::string_view session_id, uint32_t layer,
                                        absl::Span<const float> queries, std::string_view buffer_id,
                                        uint64_t offset, const SelectOptions& options = {},
                                        uint32_t num_layers = 1);
  // The same with StepOptions: block ids and events of a CUDA_IPC buffer,
  // layer-group prefetch. With a done event the call returns once the push
  // is enqueued (wait on the event before reading). FetchPages's client-side
  // checks of `step.device`.
  absl::StatusOr<StepResult> DecodeStep(std::string_view session_id, uint32_t layer,
                                        absl::Span<const float> queries, std::string_view buffer_id,
                                        uint64_t offset, const SelectOptions& options,
                                        const StepOptions& step);
  // One layer of a decode step for several sessions of this tenant (an
  // engine's continuous batch) in one request, over this client's batch
  // stream. One result per entry, in order, each with its own status: a bad
  // entry fails alone and nothing is written for it. The outer status is the
  // stream's (the daemon refused the whole request, or it broke);
  // InvalidArgument for no entries.
  absl::StatusOr<std::vector<absl::StatusOr<StepResult>>> DecodeBatch(
      uint32_t layer, absl::Span<const DecodeBatchEntry> entries, const SelectOptions& options = {},
      uint32_t num_layers = 1);
  // Closes the session's decode stream (if open); returns its final status.
  // The batch stream is closed with session_id "".
  absl::Status CloseDecodeStream(std::string_view session_id);

  // --- admin (PERMISSION_DENIED without the admin role) ---
  absl::StatusOr<DaemonStats> GetStats();
  absl::StatusOr<std::vector<TenantInfo>> ListTenants();
  absl::StatusOr<TenantInfo> SetQuota(std::string_view tenant, uint64_t quota_bytes);
  absl::Status EvictSession(std::string_view session_id);
  absl::StatusOr<SessionInfo> PinSession(std::string_view session_id, bool pinned);
  // for_upgrade: exit keeping the sessions for the next daemon (warm restart;
  // FAILED_PRECONDITION unless the daemon has pool.backing_dir).
  absl::StatusOr<DrainInfo> Drain(bool shutdown, bool for_upgrade = false);
  // The effective daemon config as text format (json = false) or JSON.
  absl::StatusOr<std::string> GetConfig(bool json);

  // grpc.health.v1 Check for `service` ("" = the whole daemon): true when
  // SERVING, false when NOT_SERVING; error statuses as the RPC reports them.
  absl::StatusOr<bool> Health(std::string_view service = "");

  // The generated-stub layer, for tests that must send requests the typed
  // API refuses to build. Opaque here; see client/client_internal.h.
  struct Impl;
  Impl* impl() const { return impl_.get(); }

 private:
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace icecache

#endif  // ICECACHE_CLIENT_CLIENT_H_
