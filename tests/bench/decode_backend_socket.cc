// The socket backend of `icecache-bench decode`: icecache::Client over the
// Unix socket (decode_backend.h).
#include <chrono>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "client/daemon_process.h"
#include "common/status_macros.h"
#include "tests/bench/decode_backend.h"

namespace icecache::bench {
namespace {

double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

SelectOptions ToOptions(const DecodeSelect& s) {
  SelectOptions o;
  o.budget_tokens = static_cast<uint32_t>(s.budget_tokens);
  o.sink_tokens = static_cast<uint32_t>(s.sink_tokens);
  o.recent_tokens = static_cast<uint32_t>(s.recent_tokens);
  o.want_positions = true;
  o.reuse_group_selection = s.reuse_group_selection;
  return o;
}

// Pages and positions of the selection, landing offsets of the layout.
StepOutcome ToOutcome(const std::vector<HeadSelection>& heads, const FetchLayout& layout,
                      bool reused) {
  StepOutcome out;
  out.reused = reused;
  out.layer_stride = layout.layer_stride_bytes;
  out.heads.resize(heads.size());
  for (size_t h = 0; h < heads.size(); ++h) {
    out.heads[h].pages = heads[h].pages;
    out.heads[h].fills = heads[h].fills;
    out.heads[h].positions = heads[h].positions;
    if (h < layout.heads.size()) {
      out.heads[h].k_offsets = layout.heads[h].byte_offsets;
      // The rows' order (in place: not the selection's).
      if (!layout.heads[h].positions.empty()) out.heads[h].positions = layout.heads[h].positions;
    }
  }
  out.rows_copied = layout.rows_copied;
  out.rows_kept = layout.rows_kept;
  return out;
}

class SocketBackend : public DecodeBackend {
 public:
  SocketBackend(std::unique_ptr<DaemonProcess> daemon, std::unique_ptr<Client> client)
      : daemon_(std::move(daemon)), client_(std::move(client)) {}
  ~SocketBackend() override {
    staging_ = ShmBuffer();
    output_ = ShmBuffer();
    client_.reset();  // before the daemon stops
  }

  const char* name() const override { return "socket"; }
  const std::string& target() const { return client_->target(); }

  absl::Status Reserve(size_t staging_bytes, size_t output_bytes) override {
    if (staging_bytes > staging_.size()) {
      staging_ = ShmBuffer();
      ASSIGN_OR_RETURN(staging_, client_->CreateShmBuffer(staging_bytes));
    }
    if (output_bytes > output_.size()) {
      output_ = ShmBuffer();
      ASSIGN_OR_RETURN(output_, client_->CreateShmBuffer(output_bytes));
    }
    return absl::OkStatus();
  }
  absl::Status ShrinkStaging(size_t bytes) override {
    if (bytes >= staging_.size()) return absl::OkStatus();
    staging_ = ShmBuffer();
    ASSIGN_OR_RETURN(staging_, client_->CreateShmBuffer(bytes));
    return absl::OkStatus();
  }
  uint8_t* staging() override { return staging_.data(); }
  const uint8_t* output() const override { return output_.data(); }

  absl::StatusOr<std::string> CreateSession(const DecodeSessionSpec& spec) override {
    if (spec.mdci_sketch) {
      return absl::InvalidArgumentError("--mdci-sketch needs --mode in-process");
    }
    SessionSpec s;
    s.layers = spec.layers;
    s.kv_heads = spec.kv_heads;
    s.q_heads = spec.q_heads;
    s.head_dim = spec.head_dim;
    s.dtype = DType::kF16;
    s.page_tokens = spec.page_tokens;
    s.mdci_pq_factor = spec.mdci_pq;
    if (spec.mdci_carry_keep >= 0.0f) s.mdci_carry_keep_factor = spec.mdci_carry_keep;
    ASSIGN_OR_RETURN(s.selector, ParseSelectorType(spec.selector));
    s.layer_reuse = spec.layer_reuse;
    s.ttl = absl::Minutes(30);
    ASSIGN_OR_RETURN(SessionInfo info, client_->CreateSession(s));
    layers_[info.id] = spec.layers;
    bytes_per_token_layer_[info.id] = 2u * spec.kv_heads * spec.head_dim * sizeof(uint16_t);
    return info.id;
  }

  absl::Status Append(const std::string& id, int64_t n, int first, int count) override {
    const int layers = layers_[id];
    const int c = count == 0 ? layers : count;
    const uint64_t bytes = bytes_per_token_layer_[id] * static_cast<uint64_t>(n) * c;
    if (count == 0) {
      return client_->AppendKv(id, staging_.buffer_id(), 0, bytes, static_cast<uint32_t>(n))
          .status();
    }
    RETURN_IF_ERROR(client_
                        ->AppendKvLayers(id, staging_.buffer_id(), 0, bytes,
                                         static_cast<uint32_t>(n), static_cast<uint32_t>(first),
                                         static_cast<uint32_t>(count))
                        .status());
    // A long prefill leaves the output buffer unused: KeepAlive renews the
    // tenant's buffers' idle timers with the session's lease.
    return client_->KeepAlive({id}).status();
  }

  absl::StatusOr<std::pair<int, int>> Trees(const std::string& id) override {
    ASSIGN_OR_RETURN(SessionInfo info, client_->GetSession(id));
    return std::make_pair(static_cast<int>(info.trees_built), static_cast<int>(info.trees_total));
  }

  absl::StatusOr<StepOutcome> DecodeStep(const std::string& id, int layer,
                                         absl::Span<const float> queries, uint64_t out_offset,
                                         const DecodeSelect& select) override {
    StepOptions step;
    step.prefetch_group = select.prefetch_group;
    step.in_place = select.in_place;
    ASSIGN_OR_RETURN(StepResult r,
                     client_->DecodeStep(id, static_cast<uint32_t>(layer), queries,
                                         output_.buffer_id(), out_offset, ToOptions(select), step));
    StepOutcome out = ToOutcome(r.heads, r.layout, r.reused);
    out.prefetching = static_cast<int>(r.prefetching);
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
    bool reused = false;
    // Per token, as DecodeStep into this HOST_SHM buffer selects (the
    // session's granularity is unset; SelectPages alone would take pages).
    SelectOptions options = ToOptions(select);
    options.granularity = SelectionGranularity::kToken;
    ASSIGN_OR_RETURN(std::vector<HeadSelection> heads,
                     client_->SelectPages(id, static_cast<uint32_t>(layer), queries, options));
    *select_ms = MsSince(t0);
    t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(FetchLayout layout,
                     client_->FetchPages(id, static_cast<uint32_t>(layer), heads,
                                         output_.buffer_id(), out_offset, true));
    *fetch_ms = MsSince(t0);
    return ToOutcome(heads, layout, reused);
  }

  absl::Status DecodeBatch(int layer, absl::Span<const BatchItem> items,
                           const DecodeSelect& select) override {
    std::vector<DecodeBatchEntry> entries(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      entries[i].session_id = items[i].session_id;
      entries[i].queries = items[i].queries;
      entries[i].buffer_id = output_.buffer_id();
      entries[i].offset = items[i].out_offset;
      entries[i].reuse_group_selection = select.reuse_group_selection;
    }
    ASSIGN_OR_RETURN(auto results, client_->DecodeBatch(static_cast<uint32_t>(layer), entries,
                                                        ToOptions(select)));
    for (const auto& r : results) RETURN_IF_ERROR(r.status());
    return absl::OkStatus();
  }

  CpuTimes DaemonCpu() const override {
    return daemon_ != nullptr ? ProcessCpuTimes(daemon_->pid()) : DecodeBackend::DaemonCpu();
  }

  absl::StatusOr<MonitorSummary> Monitor(const std::string& id) override {
    ASSIGN_OR_RETURN(SessionInfo info, client_->GetSession(id));
    const SessionQuality& q = info.quality;
    MonitorSummary m;
    m.monitored = q.monitored;
    m.samples = static_cast<int64_t>(q.samples);
    m.dropped = static_cast<int64_t>(q.samples_dropped);
    m.selection_ms = q.selection_ms;
    m.reference_cpu_ms = q.calibration_cpu_ms;
    m.mean_mass_ratio = q.mean_mass_ratio;
    m.seeded_heads = static_cast<int>(q.seeded_heads);
    m.pooled_heads = static_cast<int>(q.pooled_heads);
    m.pool_width = q.pool_width;
    m.carried_selections = static_cast<int64_t>(q.carried_selections);
    m.carry_stopped = q.carry_stopped;
    m.carry_pool_steps = static_cast<int>(q.carry_pool_steps);
    m.carry_shortened = static_cast<int64_t>(q.carry_shortened);
    for (const HeadQuality& h : q.heads) {
      m.carrying_heads += h.carry_steps > 0 ? 1 : 0;
      m.carry_stopped_heads += h.carry_stops > 0 ? 1 : 0;
      m.widths.push_back(h.width);
      m.head_samples.push_back(static_cast<int64_t>(h.samples));
      m.exact_heads += h.exact ? 1 : 0;
      m.exact_selections += static_cast<int64_t>(h.exact_selections);
    }
    return m;
  }

  absl::Status Drop(const std::string& id) override {
    layers_.erase(id);
    return client_->DropSession(id);
  }

 private:
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> client_;
  ShmBuffer staging_, output_;
  std::map<std::string, int> layers_;
  std::map<std::string, uint64_t> bytes_per_token_layer_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DecodeBackend>> MakeSocketBackend(const std::string& spawn_binary,
                                                                 const std::string& socket,
                                                                 uint64_t capacity_bytes,
                                                                 const std::string& spawn_config,
                                                                 absl::Duration ring_spin) {
  std::unique_ptr<DaemonProcess> daemon;
  ClientOptions options;
  if (ring_spin >= absl::ZeroDuration()) options.decode_ring_spin = ring_spin;
  options.socket_path = socket;
  // A prefill call builds one layer group's trees; generous, never the limit.
  options.timeout = absl::Minutes(10);
  if (!spawn_binary.empty()) {
    DaemonOptions d;
    d.binary = spawn_binary;
    d.extra_args = {absl::StrCat("--capacity-bytes=", capacity_bytes)};
    // Buffers stay registered through the longest prefill of a loaded machine.
    d.config_textproto = "sessions { buffer_idle_ttl_ms: 3600000 }\n" + spawn_config;
    // pool.prefault: the daemon says ready once its arena and its staging
    // reserve (at most half the pool here) are faulted in, at up to 19 s per
    // GiB on a host that backs memory lazily (docs/operations.md).
    if (absl::StrContains(spawn_config, "prefault: true")) {
      d.ready_timeout +=
          absl::Seconds(20.0 * 1.5 * static_cast<double>(capacity_bytes) / (1 << 30));
    }
    ASSIGN_OR_RETURN(daemon, DaemonProcess::Start(d));
    options.socket_path = daemon->socket_path();
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Create(options));
  absl::StatusOr<bool> serving = client->Health();
  if (!serving.ok()) {
    return absl::UnavailableError(absl::StrCat("no icecached answers at ", client->target(),
                                               " (pass --spawn PATH to start one, or --socket "
                                               "PATH): ",
                                               serving.status().message()));
  }
  return std::make_unique<SocketBackend>(std::move(daemon), std::move(client));
}

absl::StatusOr<std::unique_ptr<DecodeBackend>> MakeStreamTwin(DecodeBackend& socket_backend) {
  auto* first = dynamic_cast<SocketBackend*>(&socket_backend);
  if (first == nullptr) return absl::InvalidArgumentError("MakeStreamTwin needs a socket backend");
  ClientOptions options;
  options.socket_path = first->target();
  options.timeout = absl::Minutes(10);
  options.decode_ring = false;
  ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Create(options));
  return std::make_unique<SocketBackend>(nullptr, std::move(client));
}

}  // namespace icecache::bench
