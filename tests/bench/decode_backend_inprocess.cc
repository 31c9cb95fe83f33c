// The in-process backend of `icecache-bench decode`: a SessionManager of the
// core library in this process (decode_backend.h), the calls the daemon's
// handlers make, on buffers registered the way the daemon registers them.
#include <unistd.h>

#include <chrono>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/caller.h"
#include "common/populate.h"
#include "common/random_id.h"
#include "common/shm_file.h"
#include "common/status_macros.h"
#include "server/pool/page_pool.h"
#include "server/rpc/quality_options.h"
#include "server/session/session_manager.h"
#include "server/transfer/buffer_registry.h"
#include "tests/bench/decode_backend.h"

namespace icecache::bench {
namespace {

double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

SelectRequest ToRequest(int layer, absl::Span<const float> queries, const DecodeSelect& s) {
  SelectRequest r;
  r.layer = layer;
  r.queries.assign(queries.begin(), queries.end());
  r.params.budget_tokens = s.budget_tokens;
  r.params.sink_tokens = s.sink_tokens > 0 ? s.sink_tokens : -1;
  r.params.recent_tokens = s.recent_tokens > 0 ? s.recent_tokens : -1;
  r.params.want_positions = true;
  r.reuse_group_selection = s.reuse_group_selection;
  return r;
}

StepOutcome ToOutcome(const SelectResult& sel, const FetchLayout& layout) {
  StepOutcome out;
  out.reused = sel.reused;
  out.layer_stride = layout.layer_stride_bytes;
  out.heads.resize(sel.heads.size());
  for (size_t h = 0; h < sel.heads.size(); ++h) {
    StepHead& o = out.heads[h];
    o.pages = sel.heads[h].pages;
    o.fills = sel.heads[h].fills;
    o.positions = sel.heads[h].positions;
    if (h < layout.heads.size()) {
      for (const FetchSlot& s : layout.heads[h].slots) o.k_offsets.push_back(s.byte_offset);
      // The rows' order (in place: not the selection's).
      if (!layout.heads[h].positions.empty()) o.positions = layout.heads[h].positions;
    }
  }
  out.rows_copied = layout.rows_copied;
  out.rows_kept = layout.rows_kept;
  return out;
}

// A shared-memory file of this process registered with the registry.
// `data` is the registry's own mapping (a lease keeps it): the benchmark
// writes and reads there, so the file's pages are counted once in this
// process's RSS, not once per mapping (the ShmFile's stays untouched).
struct Buffer {
  ShmFile file;
  std::string id;
  size_t size = 0;
  BufferLease lease;
  uint8_t* data = nullptr;
};

class InProcessBackend : public DecodeBackend {
 public:
  const char* name() const override { return "in-process"; }

  absl::Status Init(uint64_t capacity_bytes, bool quality) {
    caller_.tenant = "bench";
    caller_.uid = ::getuid();
    PagePoolOptions pool;
    pool.capacity_bytes = capacity_bytes;
    ASSIGN_OR_RETURN(pool_, PagePool::Create(pool));
    BufferRegistryOptions buffers;
    buffers.idle_ttl = absl::InfiniteDuration();
    ASSIGN_OR_RETURN(buffers_, BufferRegistry::Create(buffers));
    SessionManagerOptions m;
    m.pool = pool_.get();
    m.buffers = buffers_.get();
    m.default_ttl = absl::Minutes(30);
    m.reaper_interval = absl::ZeroDuration();
    // As icecached with worker_threads 0: builds use every CPU.
    m.build_threads = static_cast<int>(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN)));
    // As icecached's default config: mdci selects at its self-calibrated
    // width, carries candidates and pools widths as the daemon does, and
    // the background references run beside it.
    m.quality = rpc::DaemonDefaultQualityOptions();
    m.quality.enabled = quality;
    ASSIGN_OR_RETURN(manager_, SessionManager::Create(m));
    return absl::OkStatus();
  }

  ~InProcessBackend() override {
    staging_.lease = BufferLease();  // before the registry goes
    output_.lease = BufferLease();
    manager_.reset();
    buffers_.reset();
  }

  absl::Status Reserve(size_t staging_bytes, size_t output_bytes) override {
    RETURN_IF_ERROR(Grow(&staging_, staging_bytes));
    return Grow(&output_, output_bytes);
  }
  absl::Status ShrinkStaging(size_t bytes) override {
    if (bytes >= staging_.size) return absl::OkStatus();
    staging_.lease = BufferLease();
    if (!staging_.id.empty()) (void)buffers_->Unregister(caller_, staging_.id);
    staging_ = Buffer();
    return Grow(&staging_, bytes);
  }
  uint8_t* staging() override { return staging_.data; }
  const uint8_t* output() const override { return output_.data; }

  absl::StatusOr<std::string> CreateSession(const DecodeSessionSpec& spec) override {
    SessionConfig c;
    c.layers = spec.layers;
    c.kv_heads = spec.kv_heads;
    c.q_heads = spec.q_heads;
    c.head_dim = spec.head_dim;
    c.dtype = DType::kF16;
    c.page_tokens = spec.page_tokens;
    c.layer_reuse = spec.layer_reuse;
    c.mdci.sketch_scoring = spec.mdci_sketch;
    c.mdci.pq_factor = spec.mdci_pq;
    if (spec.mdci_carry_keep >= 0.0f) c.mdci.carry_keep_factor = spec.mdci_carry_keep;
    ASSIGN_OR_RETURN(c.selector, ParseSelectorKind(spec.selector));
    ASSIGN_OR_RETURN(SessionInfo info, manager_->CreateSession(caller_, c));
    return info.id;
  }

  absl::Status Append(const std::string& id, int64_t n, int first, int count) override {
    LayerRange range;
    range.first = first;
    range.count = count;
    return manager_->AppendKvFromBuffer(caller_, id, n, staging_.id, 0, range).status();
  }

  absl::StatusOr<std::pair<int, int>> Trees(const std::string& id) override {
    ASSIGN_OR_RETURN(SessionInfo info, manager_->GetSession(caller_, id));
    return std::make_pair(info.trees_built, info.trees_total);
  }

  absl::StatusOr<StepOutcome> DecodeStep(const std::string& id, int layer,
                                         absl::Span<const float> queries, uint64_t out_offset,
                                         const DecodeSelect& select) override {
    ASSIGN_OR_RETURN(
        DecodeStepResult r,
        manager_->DecodeStep(caller_, id, ToRequest(layer, queries, select), output_.id, out_offset,
                             1, {}, select.prefetch_group, select.in_place));
    StepOutcome out = ToOutcome(r.selection, r.layout);
    out.prefetching = r.prefetching;
    out.prefetched = r.prefetched;
    out.select_ms = static_cast<double>(r.select_ns) / 1e6;
    out.gather_ms = static_cast<double>(r.gather_ns) / 1e6;
    out.step_ms = static_cast<double>(r.step_ns) / 1e6;
    return out;
  }

  absl::StatusOr<StepOutcome> SelectThenFetch(const std::string& id, int layer,
                                              absl::Span<const float> queries, uint64_t out_offset,
                                              const DecodeSelect& select, double* select_ms,
                                              double* fetch_ms) override {
    auto t0 = std::chrono::steady_clock::now();
    // Per token, as DecodeStep into this HOST_SHM buffer selects (the
    // session's granularity is unset; SelectPages alone would take pages).
    SelectRequest request = ToRequest(layer, queries, select);
    request.granularity = Granularity::kToken;
    ASSIGN_OR_RETURN(SelectResult sel, manager_->SelectPages(caller_, id, request));
    *select_ms = MsSince(t0);
    t0 = std::chrono::steady_clock::now();
    FetchRequest f;
    f.layer = layer;
    for (const Selection& s : sel.heads) {
      if (s.token_refs.empty()) {
        f.pages.push_back(s.pages);
      } else {
        f.tokens.push_back(s.positions);
      }
    }
    f.buffer_id = output_.id;
    f.offset = out_offset;
    f.want_positions = false;
    ASSIGN_OR_RETURN(FetchLayout layout, manager_->FetchPages(caller_, id, f));
    *fetch_ms = MsSince(t0);
    return ToOutcome(sel, layout);
  }

  absl::Status DecodeBatch(int layer, absl::Span<const BatchItem> items,
                           const DecodeSelect& select) override {
    std::vector<DecodeBatchEntry> entries(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      entries[i].session_id = items[i].session_id;
      entries[i].select = ToRequest(layer, items[i].queries, select);
      entries[i].buffer_id = output_.id;
      entries[i].offset = items[i].out_offset;
    }
    for (const auto& r : manager_->DecodeBatch(caller_, entries)) RETURN_IF_ERROR(r.status());
    return absl::OkStatus();
  }

  absl::Status Drop(const std::string& id) override { return manager_->DropSession(caller_, id); }

  absl::StatusOr<MonitorSummary> Monitor(const std::string& id) override {
    ASSIGN_OR_RETURN(SessionInfo info, manager_->GetSession(caller_, id));
    const SessionQualityInfo& q = info.quality;
    MonitorSummary m;
    m.monitored = q.monitored;
    m.samples = q.samples;
    m.dropped = q.samples_dropped;
    m.selection_ms = static_cast<double>(q.selection_ns) / 1e6;
    m.reference_cpu_ms = static_cast<double>(q.calibration_cpu_ns) / 1e6;
    m.mean_mass_ratio = q.mean_mass_ratio;
    m.seeded_heads = q.seeded_heads;
    m.pooled_heads = q.pooled_heads;
    m.pool_width = q.pool_width;
    m.carried_selections = static_cast<int64_t>(q.carried_selections);
    m.carry_stopped = q.carry_stopped;
    m.carry_pool_steps = q.carry_pool_steps;
    m.carry_shortened = q.carry_shortened;
    for (const HeadQualityInfo& h : q.heads) {
      m.carrying_heads += h.carry_steps > 0 ? 1 : 0;
      m.carry_stopped_heads += h.carry_stops > 0 ? 1 : 0;
      m.widths.push_back(h.width);
      m.head_samples.push_back(h.samples);
      m.exact_heads += h.exact ? 1 : 0;
      m.exact_selections += h.exact_selections;
    }
    return m;
  }

 private:
  absl::Status Grow(Buffer* b, size_t bytes) {
    if (bytes <= b->size) return absl::OkStatus();
    b->lease = BufferLease();
    if (!b->id.empty()) (void)buffers_->Unregister(caller_, b->id);
    *b = Buffer();
    ASSIGN_OR_RETURN(
        b->file, ShmFile::Create(absl::StrCat("icecache-bench-", ::getpid(), "-", RandomHexId()),
                                 bytes, /*unlink_on_close=*/true));
    ASSIGN_OR_RETURN(BufferInfo info,
                     buffers_->RegisterShm(caller_, b->file.path(), bytes, absl::Now()));
    b->id = info.id;
    b->size = bytes;
    ASSIGN_OR_RETURN(b->lease, buffers_->Acquire(caller_, b->id, absl::Now()));
    // HOST_SHM: Write hands the fill the mapping itself (zero-copy).
    RETURN_IF_ERROR(b->lease.Write(0, 1, [&](uint8_t* dst) { b->data = dst; }));
    // Resident before anything is timed, as a client's pinned buffer is
    // (Client::CreateShmBuffer does the same).
    TouchZeroPages(b->data, bytes);
    return absl::OkStatus();
  }

  Caller caller_;
  std::unique_ptr<PagePool> pool_;
  std::unique_ptr<BufferRegistry> buffers_;
  std::unique_ptr<SessionManager> manager_;
  Buffer staging_, output_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DecodeBackend>> MakeInProcessBackend(uint64_t capacity_bytes,
                                                                    bool quality) {
  auto backend = std::make_unique<InProcessBackend>();
  RETURN_IF_ERROR(backend->Init(capacity_bytes, quality));
  return backend;
}

}  // namespace icecache::bench
