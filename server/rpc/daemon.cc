#include "server/rpc/daemon.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_posix.h>
#include <httplib.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "server/rpc/config.h"
#include "server/rpc/convert.h"
#include "server/rpc/log.h"
#include "server/rpc/quality_options.h"

namespace icecache::rpc {
namespace {

// A file the config names: InvalidArgument naming the config field.
absl::StatusOr<std::string> ReadConfiguredFile(const std::string& path, absl::string_view field) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (!text.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(field, " ", text.status().message()));
  }
  return text;
}

// A SIGTERM/SIGINT sent to the process but not yet taken by icecached's
// signal thread (main.cc blocks both in every thread and sigwait()s them).
bool ShutdownSignalPending() {
  sigset_t pending;
  if (sigpending(&pending) != 0) return false;
  return sigismember(&pending, SIGTERM) == 1 || sigismember(&pending, SIGINT) == 1;
}

}  // namespace

Daemon::Daemon(const v1::IcecachedConfig& config, const DaemonOptions& options)
    : config_(config), options_(options) {}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Create(const v1::IcecachedConfig& config,
                                                       const DaemonOptions& options) {
  std::unique_ptr<Daemon> d(new Daemon(config, options));
  RETURN_IF_ERROR(d->Init());
  return d;
}

absl::Status Daemon::Init() {
  const auto& c = config_;
  rpc_metrics_ = std::make_unique<RpcMetrics>(&registry_);
  cuda_ = CudaRuntime::Create();

  std::optional<SnapshotImage> snapshot;
  RETURN_IF_ERROR(CreatePool(&snapshot));
  for (const auto& q : c.pool().quotas()) {
    RETURN_IF_ERROR(pool_->SetQuota(q.tenant(), QuotaFromProto(q.quota_bytes())));
  }

  BufferRegistryOptions buf_opts;
  buf_opts.max_buffers_per_tenant = static_cast<int>(c.limits().max_buffers_per_tenant());
  buf_opts.idle_ttl = absl::Milliseconds(static_cast<int64_t>(c.sessions().buffer_idle_ttl_ms()));
  buf_opts.cuda = cuda_.get();
  buf_opts.scatter_mode =
      c.transfer().zero_copy_scatter() ? ScatterMode::kZeroCopy : ScatterMode::kStaged;
  ASSIGN_OR_RETURN(buffers_, BufferRegistry::Create(buf_opts));
  if (cuda_->available() && (!c.transfer().has_direct_reads() || c.transfer().direct_reads())) {
    StartPinningPool();
  }

  SessionManagerOptions mgr_opts;
  mgr_opts.pool = pool_.get();
  mgr_opts.buffers = buffers_.get();
  mgr_opts.default_ttl = absl::Milliseconds(static_cast<int64_t>(c.sessions().default_ttl_ms()));
  mgr_opts.max_ttl = absl::Milliseconds(static_cast<int64_t>(c.sessions().max_ttl_ms()));
  mgr_opts.high_watermark = c.pool().high_watermark();
  mgr_opts.max_sessions = static_cast<int>(c.sessions().max_sessions());
  mgr_opts.max_sessions_per_tenant = static_cast<int>(c.sessions().max_sessions_per_tenant());
  mgr_opts.max_tokens_per_session = static_cast<int64_t>(c.sessions().max_tokens_per_session());
  mgr_opts.reaper_interval =
      absl::Milliseconds(static_cast<int64_t>(c.sessions().reaper_interval_ms()));
  mgr_opts.build_threads = static_cast<int>(c.worker_threads());
  mgr_opts.decode_lane_spin = absl::Microseconds(c.decode_lanes().spin_us());
  // Trees build while the client sends the next layer range; no call waits
  // on a whole prefill's builds (docs/architecture.md §5).
  mgr_opts.background_builds = true;
  // Staging follows the pool's page size (StagingCacheOptions.huge_pages).
  mgr_opts.staging_huge_pages = c.pool().prefault() || c.pool().huge_pages();
  if (c.pool().has_staging_wait_ms()) {
    mgr_opts.staging_wait = absl::Milliseconds(c.pool().staging_wait_ms());
  }
  mgr_opts.stop_pending = ShutdownSignalPending;
  mgr_opts.keep_checksums = !snapshot_path_.empty();
  mgr_opts.on_expired = [](const std::string& tenant, const std::string& id, absl::Duration idle) {
    Log(LogLevel::kInfo, "session_expired",
        {{"tenant", tenant},
         {"id", id},
         {"idle_ms", absl::ToInt64Milliseconds(idle)},
         {"why", "lease lapsed (no use or KeepAlive within its ttl)"}});
  };
  mgr_opts.on_build_done = [](const BuildDone& b) {
    if (!LogEnabled(LogLevel::kDebug)) return;
    const int64_t per = std::max<int64_t>(b.trees, 1);
    Log(LogLevel::kDebug, "index_build",
        {{"id", b.session},
         {"first_layer", b.first_layer},
         {"layers", b.num_layers},
         {"queued_ms", absl::ToInt64Milliseconds(b.queued)},
         {"ms", absl::ToInt64Milliseconds(b.ran)},
         {"trees_ms", absl::ToInt64Milliseconds(b.trees_wall)},
         {"trees", b.trees},
         {"cpu_us_per_tree", b.tree_cpu_ns / per / 1000},
         {"minflt_per_tree", b.tree_minor_faults / per}});
  };
  mgr_opts.quality = QualityOptionsFromConfig(c.quality());
  quality_metrics_ = std::make_unique<QualityMetrics>(&registry_);
  mgr_opts.on_quality_sample = [m = quality_metrics_.get()](SelectorKind kind,
                                                            const QualitySample& sample) {
    m->Observe(kind, sample);
  };
  ASSIGN_OR_RETURN(manager_, SessionManager::Create(mgr_opts));
  if (snapshot.has_value()) RecoverSessions(*snapshot);

  ASSIGN_OR_RETURN(auth_, Authenticator::Create(c.auth(), ::geteuid()));
  internal_admin_.tenant = "icecached";
  internal_admin_.uid = ::getuid();
  internal_admin_.admin = true;

  deps_.manager = manager_.get();
  deps_.buffers = buffers_.get();
  deps_.auth = auth_.get();
  deps_.peers = &peers_;
  deps_.metrics = rpc_metrics_.get();
  limiter_ = std::make_unique<CallLimiter>(
      static_cast<int>(c.limits().max_calls_per_tenant()),
      static_cast<int>(c.limits().max_concurrent_calls() - c.limits().reserved_calls()));
  deps_.limiter = limiter_.get();
  deps_.config = &config_;
  deps_.start_unix_ms = absl::ToUnixMillis(absl::Now());
  deps_.on_drain = [this](bool shutdown, bool for_upgrade) {
    if (for_upgrade) for_upgrade_.store(true);
    BeginDrain();
    if (shutdown) RequestShutdown();
    return absl::OkStatus();
  };
  deps_.can_upgrade = [this] { return !snapshot_path_.empty(); };
  session_service_ = std::make_unique<SessionServiceImpl>(deps_);
  buffer_service_ = std::make_unique<BufferServiceImpl>(deps_);
  kv_service_ = std::make_unique<KvServiceImpl>(deps_);
  admin_service_ = std::make_unique<AdminServiceImpl>(deps_);
  ring_service_ = std::make_unique<DecodeRingServiceImpl>(deps_);
  DecodeRingOptions ring_opts;
  ring_opts.threads = std::max(4, 2 * static_cast<int>(std::thread::hardware_concurrency()));
  ring_opts.max_rings_per_tenant = static_cast<int>(c.limits().max_calls_per_tenant());
  ring_opts.max_rings =
      static_cast<int>(c.limits().max_concurrent_calls() - c.limits().reserved_calls());
  ring_opts.max_spin = absl::Microseconds(c.decode_ring().max_spin_us());
  ring_opts.max_spinning = static_cast<int>(c.decode_ring().max_spinning_threads());
  ASSIGN_OR_RETURN(
      rings_, DecodeRingServer::Create(ring_opts, buffers_.get(),
                                       [svc = ring_service_.get()](
                                           const Caller& caller, const v1::DecodeStepRequest& req,
                                           DecodeCursor* cursor, v1::DecodeStepResponse* resp) {
                                         return svc->HandleRingMessage(caller, req, cursor, resp);
                                       }));
  ring_service_->set_rings(rings_.get());

  // Bind the socket before starting gRPC so a busy path fails fast.
  ASSIGN_OR_RETURN(listener_,
                   UnixListener::Create(c.listen().unix_socket(),
                                        static_cast<mode_t>(c.listen().unix_socket_mode())));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.RegisterService(session_service_.get());
  builder.RegisterService(buffer_service_.get());
  builder.RegisterService(kv_service_.get());
  builder.RegisterService(admin_service_.get());
  builder.RegisterService(ring_service_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(c.limits().max_receive_message_bytes()));
  grpc::ResourceQuota quota("icecached");
  quota.SetMaxThreads(static_cast<int>(c.limits().max_concurrent_calls()));
  quota.Resize(TransportQuotaBytes(c.limits().max_receive_message_bytes()));
  builder.SetResourceQuota(quota);
  int tcp_port = 0;
  if (!c.listen().tcp_address().empty()) {
    ASSIGN_OR_RETURN(std::string cert,
                     ReadConfiguredFile(c.listen().tls_cert_file(), "listen.tls_cert_file"));
    ASSIGN_OR_RETURN(std::string key,
                     ReadConfiguredFile(c.listen().tls_key_file(), "listen.tls_key_file"));
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({key, cert});
    builder.AddListeningPort(c.listen().tcp_address(), grpc::SslServerCredentials(ssl), &tcp_port);
  }
  server_ = builder.BuildAndStart();
  if (server_ == nullptr) {
    return absl::InternalError(absl::StrCat(
        "gRPC server failed to start",
        c.listen().tcp_address().empty()
            ? ""
            : absl::StrCat(" (TCP ", c.listen().tcp_address(), ": port busy or bad TLS files?)")));
  }
  if (!c.listen().tcp_address().empty() && tcp_port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", c.listen().tcp_address()));
  }
  tcp_port_ = tcp_port;
  server_->GetHealthCheckService()->SetServingStatus(true);

  listener_->Start([this](int fd, const PeerCred& cred) {
    // Record the peer before gRPC can see a call on this fd (auth.h).
    peers_.Set(fd, cred);
    Log(LogLevel::kDebug, "connection", {{"fd", fd}, {"uid", cred.uid}, {"pid", cred.pid}});
    grpc::AddInsecureChannelFromFd(server_.get(), fd);
  });

  // Scrape-time metrics from the core.
  pool_bytes_ = registry_.AddSnapshot("icecache_pool_bytes", "Pool bytes by state",
                                      MetricType::kGauge, {"state"});
  tenant_bytes_ = registry_.AddSnapshot("icecache_tenant_used_bytes", "Pool bytes used per tenant",
                                        MetricType::kGauge, {"tenant"});
  tenant_quota_ =
      registry_.AddSnapshot("icecache_tenant_quota_bytes", "Tenant quota (absent = none)",
                            MetricType::kGauge, {"tenant"});
  tenant_free_ = registry_.AddSnapshot("icecache_tenant_free_bytes",
                                       "Quota left per tenant (tenants with a quota)",
                                       MetricType::kGauge, {"tenant"});
  tenant_sessions_ = registry_.AddSnapshot("icecache_tenant_sessions", "Sessions per tenant",
                                           MetricType::kGauge, {"tenant"});
  class_frames_ =
      registry_.AddSnapshot("icecache_pool_class_frames", "Frames per size class and state",
                            MetricType::kGauge, {"frame_bytes", "state"});
  class_bytes_ = registry_.AddSnapshot("icecache_pool_class_bytes",
                                       "Bytes of carved frames per size class and state",
                                       MetricType::kGauge, {"frame_bytes", "state"});
  sessions_ = registry_.AddSnapshot("icecache_sessions", "Live sessions", MetricType::kGauge, {});
  decode_keys_ = registry_.AddSnapshot(
      "icecache_decode_keys",
      "Decode keys the live sessions' trees inserted one at a time, by placement: routed from "
      "the top of the tree, or unrouted (joined a recent node they fit, MdciParams.insert_fit)",
      MetricType::kGauge, {"placement"});
  buffers_gauge_ =
      registry_.AddSnapshot("icecache_buffers", "Registered buffers", MetricType::kGauge, {});
  gpu_pushes_ = registry_.AddSnapshot(
      "icecache_gpu_pushes_total",
      "Pushes to client GPUs by path: in_place (the device read the pool's pinned pages where "
      "they lie) or staged (gathered into pinned staging first)",
      MetricType::kCounter, {"path"});
  session_events_ =
      registry_.AddSnapshot("icecache_session_events_total", "Session lifecycle events since start",
                            MetricType::kCounter, {"event"});
  draining_gauge_ =
      registry_.AddSnapshot("icecache_draining", "1 while draining", MetricType::kGauge, {});
  connections_ =
      registry_.AddSnapshot("icecache_unix_connections_total", "Unix-socket connections accepted",
                            MetricType::kCounter, {});
  checksum_failures_ = registry_.AddSnapshot(
      "icecache_checksum_failures_total",
      "Fetched pages whose bytes failed their checksum (answered DATA_LOSS, never shipped)",
      MetricType::kCounter, {});
  pages_verified_ =
      registry_.AddSnapshot("icecache_checksum_pages_verified_total",
                            "Fetched pages whose checksum was checked", MetricType::kCounter, {});
  decode_rings_ = registry_.AddSnapshot("icecache_decode_rings", "Open DecodeStep rings",
                                        MetricType::kGauge, {});
  decode_ring_caught_ = registry_.AddSnapshot(
      "icecache_decode_ring_messages_caught_total",
      "DecodeStep ring messages found by a ring thread watching for them after its previous "
      "answer (decode_ring.max_spin_us), served without a thread wake-up",
      MetricType::kCounter, {});
  decode_lane_jobs_ = registry_.AddSnapshot(
      "icecache_decode_lane_jobs_total",
      "A decode step's parallel jobs (a layer's selection of its KV heads, and the write of its "
      "rows) run on the decode lanes (decode_lanes.spin_us: helper threads watching for the next "
      "job), or on oneTBB's shared pool (the lanes were busy with another session's job)",
      MetricType::kCounter, {"path"});
  decode_lane_helper_tasks_ = registry_.AddSnapshot(
      "icecache_decode_lane_helper_tasks_total",
      "Tasks (one KV head's selection or write) of the decode lanes' jobs that a helper thread "
      "ran; the calling thread ran the others. Near 0 while jobs run: the helpers are asleep or "
      "share the caller's CPU",
      MetricType::kCounter, {});
  decode_lane_jobs_alone_ = registry_.AddSnapshot(
      "icecache_decode_lane_jobs_alone_total",
      "Decode lane jobs in which no helper ran a task: the calling thread selected or wrote every "
      "KV head alone (the helpers were asleep, or another thread held their CPU)",
      MetricType::kCounter, {});
  decode_rings_closed_ = registry_.AddSnapshot(
      "icecache_decode_rings_closed_total",
      "DecodeStep rings closed (the client closed its request FIFO or exited)",
      MetricType::kCounter, {});
  prefault_bytes_ = registry_.AddSnapshot(
      "icecache_pool_prefaulted_bytes",
      "Arena bytes pool.prefault has faulted in so far (absent when off)", MetricType::kGauge, {});
  prefault_seconds_ = registry_.AddSnapshot(
      "icecache_pool_prefault_seconds",
      "Wall time pool.prefault took to fault the arena in (absent until done or when off)",
      MetricType::kGauge, {});
  staging_reserve_ = registry_.AddSnapshot(
      "icecache_staging_reserve_bytes",
      "Append staging pool.prefault faulted in at start and keeps (absent when off)",
      MetricType::kGauge, {});
  staging_lent_ = registry_.AddSnapshot(
      "icecache_staging_lent_bytes",
      "Append staging held now by appends and queued index builds (a prefill chunk's private "
      "copy of the client's bytes until its trees are built)",
      MetricType::kGauge, {});
  staging_waits_ = registry_.AddSnapshot(
      "icecache_staging_waits_total",
      "Appends from a buffer that waited for a build to return staging (pool.staging_wait_ms): "
      "outcome returned (a build gave staging back: it took it, or had room again) or expired (the "
      "wait ran out or the daemon drained: it mapped fresh memory)",
      MetricType::kCounter, {"outcome"});
  staging_wait_seconds_ = registry_.AddSnapshot(
      "icecache_staging_wait_seconds_total",
      "Seconds appends from a buffer waited for staging (pool.staging_wait_ms)",
      MetricType::kCounter, {});
  registry_.AddCollector([this] { CollectMetrics(); });

  if (c.metrics().port() != 0 || options_.metrics_any_port) RETURN_IF_ERROR(StartMetricsHttp());
  started_ = true;
  Log(LogLevel::kInfo, "started",
      {{"socket", listener_->path()},
       {"epoch", manager_->epoch()},
       {"capacity_bytes", c.pool().capacity_bytes()},
       {"metrics_port", metrics_port_},
       {"tcp", c.listen().tcp_address().empty() ? "off" : c.listen().tcp_address()},
       {"tcp_port", tcp_port_},
       {"cuda", cuda_->available() ? "yes" : "no"}});
  // Who can use the admin verbs, so an operator can tell at a glance.
  Log(LogLevel::kInfo, "admins",
      {{"uids", auth_->admin_uids().empty() ? std::string("none")
                                            : absl::StrJoin(auth_->admin_uids(), ",")},
       {"source", c.auth().admin_uids_size() > 0 ? "auth.admin_uids"
                  : c.auth().no_unix_admins()    ? "auth.no_unix_admins"
                                                 : "default (daemon uid and root)"},
       {"admin_tokens",
        static_cast<int64_t>(std::count_if(c.auth().tokens().begin(), c.auth().tokens().end(),
                                           [](const v1::TokenTenant& t) { return t.admin(); }))}});
  if (c.pool().prefault()) {
    {
      absl::MutexLock health(&health_mu_);
      ready_.store(false);
      server_->GetHealthCheckService()->SetServingStatus(false);
    }
    prefault_thread_ = std::thread([this] { PrefaultPool(); });
  }
  return absl::OkStatus();
}

void Daemon::StartPinningPool() {
  PinnedRegion* region = buffers_->pinned_region();
  if (region == nullptr) return;
  uint8_t* const base = pool_->arena_base();
  const uint64_t bytes = pool_->capacity_bytes();
  CudaRuntime* const cuda = cuda_.get();
  const absl::Time start = absl::Now();
  Log(LogLevel::kInfo, "pool_pinning_started", {{"bytes", bytes}});
  pinner_ = HostPinner::Start(cuda, base, bytes, 0, [=](const absl::Status& pinned) {
    absl::Status s = pinned;
    intptr_t delta = 0;
    if (s.ok()) {
      // Where the device reads the arena: one offset for all of it.
      absl::StatusOr<void*> first = cuda->DevicePointerOf(base);
      absl::StatusOr<void*> last = cuda->DevicePointerOf(base + bytes - 1);
      if (!first.ok() || !last.ok()) {
        s = first.ok() ? last.status() : first.status();
      } else {
        delta = static_cast<uint8_t*>(*first) - base;
        if (static_cast<uint8_t*>(*last) - (base + bytes - 1) != delta) {
          s = absl::InternalError("the device addresses of the pinned arena are not one range");
        }
      }
    }
    if (!s.ok()) {
      Log(LogLevel::kWarn, "pool_not_pinned",
          {{"error", std::string(s.message())},
           {"effect", "pushes to GPUs gather through pinned staging (no direct reads)"}});
      return;
    }
    region->Set(base, bytes, delta);
    Log(LogLevel::kInfo, "pool_pinned",
        {{"bytes", bytes},
         {"seconds", absl::ToDoubleSeconds(absl::Now() - start)},
         {"direct_reads", "on"}});
  });
}

void Daemon::PrefaultPool() {
  Log(LogLevel::kInfo, "pool_prefault_started", {{"bytes", pool_->capacity_bytes()}});
  const ArenaPrefault done = pool_->PrefaultArena(&prefault_stop_);
  if (done.stopped) {
    Log(LogLevel::kWarn, "pool_prefault_stopped",
        {{"bytes", done.bytes}, {"seconds", done.seconds}, {"why", "shutdown"}});
    return;
  }
  prefault_seconds_value_.store(done.seconds);
  // The append staging too (pool.staging_reserve_bytes): a prefill's first
  // chunks, and a chunk sent while the last one builds, then find their
  // staging faulted in.
  constexpr uint64_t kStagingReserveMax = uint64_t{1} << 30;
  const uint64_t reserve = (config_.pool().has_staging_reserve_bytes()
                                ? config_.pool().staging_reserve_bytes()
                                : std::min(kStagingReserveMax, pool_->capacity_bytes() / 4)) /
                           (uint64_t{2} << 20) * (uint64_t{2} << 20);
  if (reserve > 0) {
    absl::StatusOr<double> staged = manager_->ReserveStaging(reserve, &prefault_stop_);
    if (staged.ok()) {
      Log(LogLevel::kInfo, "staging_prefaulted", {{"bytes", reserve}, {"seconds", *staged}});
    } else if (absl::IsCancelled(staged.status())) {
      Log(LogLevel::kWarn, "pool_prefault_stopped",
          {{"bytes", done.bytes}, {"seconds", done.seconds}, {"why", "shutdown"}});
      return;
    } else {
      // Not fatal: appends then map their staging as they come.
      Log(LogLevel::kWarn, "staging_prefault_failed",
          {{"bytes", reserve}, {"error", std::string(staged.status().message())}});
    }
  }
  {
    absl::MutexLock health(&health_mu_);
    ready_.store(true);
    if (!manager_->draining()) server_->GetHealthCheckService()->SetServingStatus(true);
  }
  Log(LogLevel::kInfo, "pool_prefaulted",
      {{"bytes", done.bytes},
       {"seconds", done.seconds},
       {"method", done.populate ? "MADV_POPULATE_WRITE" : "touch"}});
  absl::MutexLock lock(&mu_);  // wakes WaitUntilReady
}

bool Daemon::ReadyOrShutdownLocked() const { return ready_.load() || shutdown_requested_; }

bool Daemon::WaitUntilReady() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(this, &Daemon::ReadyOrShutdownLocked));
  return ready_.load();
}

void Daemon::CollectMetrics() {
  absl::StatusOr<ManagerStats> stats = manager_->Stats(internal_admin_);
  absl::StatusOr<std::vector<TenantInfo>> tenants = manager_->ListTenants(internal_admin_);
  if (!stats.ok() || !tenants.ok()) return;
  const PoolStats& p = stats->pool;
  pool_bytes_->Replace(
      {{{"capacity"}, double(p.capacity_bytes)},
       {{"reserved"}, double(p.reserved_bytes)},
       {{"used"}, double(p.used_bytes)},
       {{"free"}, double(p.capacity_bytes - std::min(p.capacity_bytes, p.used_bytes))}});
  std::vector<SnapshotFamily::Sample> used, quota, free, sess;
  for (const TenantInfo& t : *tenants) {
    used.push_back({{t.tenant}, double(t.used_bytes)});
    if (t.quota_bytes != kUnlimitedQuota) {
      quota.push_back({{t.tenant}, double(t.quota_bytes)});
      free.push_back({{t.tenant}, double(t.quota_bytes - std::min(t.quota_bytes, t.used_bytes))});
    }
    sess.push_back({{t.tenant}, double(t.sessions)});
  }
  tenant_bytes_->Replace(std::move(used));
  tenant_quota_->Replace(std::move(quota));
  tenant_free_->Replace(std::move(free));
  tenant_sessions_->Replace(std::move(sess));
  std::vector<SnapshotFamily::Sample> frames, class_bytes;
  for (const SizeClassStats& cl : p.classes) {
    const std::string fb = absl::StrCat(cl.frame_bytes);
    frames.push_back({{fb, "used"}, double(cl.frames_used)});
    frames.push_back({{fb, "free"}, double(cl.frames_free)});
    class_bytes.push_back({{fb, "used"}, double(cl.frames_used * cl.stride_bytes)});
    class_bytes.push_back({{fb, "free"}, double(cl.frames_free * cl.stride_bytes)});
  }
  class_frames_->Replace(std::move(frames));
  class_bytes_->Replace(std::move(class_bytes));
  sessions_->Replace({{{}, double(stats->sessions)}});
  decode_keys_->Replace({{{"routed"}, double(stats->decode_keys - stats->decode_keys_unrouted)},
                         {{"unrouted"}, double(stats->decode_keys_unrouted)}});
  buffers_gauge_->Replace({{{}, double(stats->buffers)}});
  if (const PushCounts* pushes = buffers_->push_counts()) {
    gpu_pushes_->Replace({{{"in_place"}, double(pushes->in_place.load())},
                          {{"staged"}, double(pushes->staged.load())}});
  }
  session_events_->Replace({{{"created"}, double(stats->sessions_created)},
                            {{"dropped"}, double(stats->sessions_dropped)},
                            {{"evicted"}, double(stats->sessions_evicted)},
                            {{"expired"}, double(stats->sessions_expired)},
                            {{"admission_rejected"}, double(stats->admissions_rejected)}});
  draining_gauge_->Replace({{{}, stats->draining ? 1.0 : 0.0}});
  connections_->Replace({{{}, double(listener_ ? listener_->accepted() : 0)}});
  quality_metrics_->Collect(manager_->QualityStats());
  checksum_failures_->Replace({{{}, double(stats->checksum_failures)}});
  if (config_.pool().prefault()) {
    prefault_bytes_->Replace({{{}, double(pool_->prefaulted_bytes())}});
    if (const double sec = prefault_seconds_value_.load(); sec >= 0) {
      prefault_seconds_->Replace({{{}, sec}});
    }
    staging_reserve_->Replace({{{}, double(manager_->staging_reserve_bytes())}});
  }
  const SessionManager::StagingState staging = manager_->staging_state();
  staging_lent_->Replace({{{}, double(staging.lent_bytes)}});
  staging_waits_->Replace({{{"returned"}, double(staging.waits - staging.waits_expired)},
                           {{"expired"}, double(staging.waits_expired)}});
  staging_wait_seconds_->Replace({{{}, staging.wait_seconds}});
  pages_verified_->Replace({{{}, double(stats->pages_verified)}});
  decode_rings_->Replace({{{}, double(rings_ ? rings_->open_rings() : 0)}});
  decode_rings_closed_->Replace({{{}, double(rings_ ? rings_->rings_reclaimed() : 0)}});
  decode_ring_caught_->Replace({{{}, double(rings_ ? rings_->messages_caught_spinning() : 0)}});
  const SessionManager::DecodeLaneStats lanes = manager_->decode_lane_stats();
  decode_lane_jobs_->Replace(
      {{{"lanes"}, double(lanes.jobs)}, {{"shared_pool"}, double(lanes.fallbacks)}});
  decode_lane_helper_tasks_->Replace({{{}, double(lanes.helper_tasks)}});
  decode_lane_jobs_alone_->Replace({{{}, double(lanes.jobs_alone)}});
}

absl::Status Daemon::StartMetricsHttp() {
  http_ = std::make_unique<httplib::Server>();
  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(registry_.Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  http_->Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
    if (manager_->draining()) {
      res.status = 503;
      res.set_content("draining\n", "text/plain");
    } else if (!ready_.load()) {
      res.status = 503;
      res.set_content("prefaulting\n", "text/plain");
    } else {
      res.set_content("ok\n", "text/plain");
    }
  });
  const int wanted = static_cast<int>(config_.metrics().port());
  const char* host = config_.metrics().address().c_str();
  int port = wanted;
  if (options_.metrics_any_port) {
    port = http_->bind_to_any_port(host);
  } else if (!http_->bind_to_port(host, wanted)) {
    port = -1;
  }
  if (port <= 0) {
    http_.reset();
    return absl::UnavailableError(
        absl::StrCat("metrics endpoint: cannot bind ", config_.metrics().address(), ":", wanted,
                     " (in use?); choose another --metrics_port or 0 to turn it off"));
  }
  metrics_port_ = port;
  http_thread_ = std::thread([this] { http_->listen_after_bind(); });
  return absl::OkStatus();
}

void Daemon::BeginDrain() {
  // Idempotent: AdminService.Drain has already set the manager's flag.
  const bool was_draining = manager_->SetDraining(true);
  if (server_) {
    absl::MutexLock health(&health_mu_);
    server_->GetHealthCheckService()->SetServingStatus(false);
  }
  if (!was_draining) Log(LogLevel::kWarn, "draining", {{"in_flight", manager_->InFlight()}});
}

void Daemon::RequestShutdown() {
  absl::MutexLock lock(&mu_);
  shutdown_requested_ = true;
}

void Daemon::WaitForShutdownRequest() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(&shutdown_requested_));
}

void Daemon::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_) return;
    shut_down_ = true;
    shutdown_requested_ = true;
  }
  prefault_stop_.store(true);
  if (prefault_thread_.joinable()) prefault_thread_.join();
  if (manager_) BeginDrain();
  const auto t0 = std::chrono::steady_clock::now();
  // No new connections; existing ones keep their in-flight calls.
  if (listener_) listener_->Stop();
  const absl::Time drain_end =
      absl::Now() + absl::Milliseconds(static_cast<int64_t>(config_.drain_timeout_ms()));
  if (server_) {
    server_->Shutdown(absl::ToChronoTime(drain_end));
    server_->Wait();
  }
  // Open decode rings drain like open streams: served until their clients
  // close them or the drain time is up; then closed (clients read end of
  // file: UNAVAILABLE).
  if (rings_) {
    rings_->AwaitClosed(drain_end);
    rings_->Stop();
  }
  // No call runs any more: the sessions can be written down for the next daemon.
  if (for_upgrade_.load() && manager_ != nullptr) WriteUpgradeSnapshot();
  if (http_) {
    http_->stop();
    if (http_thread_.joinable()) http_thread_.join();
  }
  Log(LogLevel::kInfo, "stopped",
      {{"drain_ms", static_cast<int64_t>(std::chrono::duration<double, std::milli>(
                                             std::chrono::steady_clock::now() - t0)
                                             .count())}});
}

Daemon::~Daemon() {
  bool shut_down;
  {
    absl::MutexLock lock(&mu_);
    shut_down = shut_down_;
  }
  if (started_ && !shut_down) {
    Shutdown();
    return;
  }
  // Init failed part way: tear down what exists, quietly.
  if (listener_) listener_->Stop();
  if (server_) server_->Shutdown(std::chrono::system_clock::now());
  if (http_) {
    http_->stop();
    if (http_thread_.joinable()) http_thread_.join();
  }
}

}  // namespace icecache::rpc
