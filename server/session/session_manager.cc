#include "server/session/session_manager.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <new>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/random_id.h"
#include "common/status_macros.h"
#include "server/index/parallel_build.h"
#include "server/pool/heap_trim.h"
#include "server/pool/slab_prefaulter.h"
#include "server/session/append_staging.h"
#include "server/session/index_builder.h"
#include "server/session/session.h"
#include "server/session/session_append.h"

namespace icecache {

// ------------------------------------------------------------------ helpers

namespace {

// Reservations from this size on have their slabs faulted in before
// admission (AdmitFrames): a prefill's, never a decode append's.
constexpr uint64_t kPopulateBytes = uint64_t{64} << 20;

// Appends of at most this many tokens are a decode loop's (they keep the
// decode lanes watching, DecodeLanes::KeepWatching).
constexpr int64_t kDecodeAppendTokens = 64;

// A decode call, from its start to its end (any return): the decode lanes
// keep watching from both, and the call counts as in flight between them
// (the quality sampler gives way: decode_activity.h).
class DecodeCall {
 public:
  DecodeCall(DecodeLanes* lanes, DecodeActivity* activity) : lanes_(lanes), call_(activity) {
    if (lanes_ != nullptr) lanes_->KeepWatching();
  }
  ~DecodeCall() {
    if (lanes_ != nullptr) lanes_->KeepWatching();
  }
  DecodeCall(const DecodeCall&) = delete;
  DecodeCall& operator=(const DecodeCall&) = delete;

 private:
  DecodeLanes* lanes_;
  DecodeActivity::Call call_;
};

absl::Status SessionNotFound(std::string_view id) {
  return absl::NotFoundError(absl::StrCat("session ", std::string(id), " not found"));
}

absl::Status NeedAdmin(const Caller& caller, const char* verb) {
  if (caller.admin) return absl::OkStatus();
  return absl::PermissionDeniedError(
      absl::StrCat(verb, " needs the admin role; tenant '", caller.tenant, "' does not have it"));
}

}  // namespace

struct SessionManager::Counters {
  std::atomic<uint64_t> created{0};
  std::atomic<uint64_t> evicted{0};
  std::atomic<uint64_t> expired{0};
  std::atomic<uint64_t> dropped{0};
  std::atomic<uint64_t> rejected{0};
  std::atomic<int> in_flight{0};
  ChecksumCounters checksums;
};

// Marks a session busy for the lifetime of a request. Created under mu_ so
// eviction and expiry (which check in_flight under mu_) never take a session
// that a request has already found.
namespace {

// Layer groups [first, end) of a session, for the waits on background builds.
struct GroupWait {
  const Session* s;
  int first, end;
};

// absl::Condition: true once none of the groups is being built. Called by
// the mutex with s->mu held (the analysis cannot see it).
bool GroupsNotBuilding(const GroupWait* w) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  return w->s->GroupsReady(w->first, w->end);
}

// Holds s.mu shared, taken once the group of `layer` is not being built or
// after `wait` (ready() then says false). A layer outside the model waits
// for nothing: the call's own checks answer it.
class ABSL_SCOPED_LOCKABLE ReadyReader {
 public:
  ReadyReader(const Session& s, int layer, absl::Duration wait) ABSL_SHARED_LOCK_FUNCTION(s.mu)
      : mu_(&s.mu) {
    const int g = layer >= 0 && layer < s.config.layers ? s.GroupOf(layer) : 0;
    const int end = layer >= 0 && layer < s.config.layers ? g + 1 : 0;
    const GroupWait w{&s, g, end};
    ready_ = mu_->ReaderLockWhenWithTimeout(absl::Condition(&GroupsNotBuilding, &w), wait);
  }
  ~ReadyReader() ABSL_UNLOCK_FUNCTION() { mu_->ReaderUnlock(); }
  ReadyReader(const ReadyReader&) = delete;
  ReadyReader& operator=(const ReadyReader&) = delete;
  bool ready() const { return ready_; }

 private:
  absl::Mutex* mu_;
  bool ready_ = false;
};

}  // namespace

class SessionManager::InFlightGuard {
 public:
  InFlightGuard(std::shared_ptr<Session> s, Counters* c) : s_(std::move(s)), c_(c) {
    s_->in_flight.fetch_add(1);
    c_->in_flight.fetch_add(1);
  }
  ~InFlightGuard() {
    if (s_ != nullptr) {
      s_->in_flight.fetch_sub(1);
      c_->in_flight.fetch_sub(1);
    }
  }
  InFlightGuard(InFlightGuard&& o) noexcept : s_(std::move(o.s_)), c_(o.c_) { o.s_.reset(); }
  InFlightGuard(const InFlightGuard&) = delete;
  InFlightGuard& operator=(const InFlightGuard&) = delete;
  Session* get() const { return s_.get(); }
  const std::shared_ptr<Session>& shared() const { return s_; }
  Session* operator->() const { return s_.get(); }

 private:
  std::shared_ptr<Session> s_;
  Counters* c_;
};

// ------------------------------------------------------------ construction

absl::StatusOr<std::unique_ptr<SessionManager>> SessionManager::Create(
    const SessionManagerOptions& options) {
  if (options.pool == nullptr) return absl::InvalidArgumentError("session manager: pool is null");
  if (options.buffers == nullptr) {
    return absl::InvalidArgumentError("session manager: buffers is null");
  }
  if (!(options.high_watermark > 0.0 && options.high_watermark <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "session manager: high_watermark must be in (0, 1], got ", options.high_watermark));
  }
  if (options.max_sessions < 1 || options.max_sessions_per_tenant < 1 ||
      options.max_tokens_per_session < 1 || options.max_append_tokens < 1 ||
      options.build_threads < 1) {
    return absl::InvalidArgumentError(
        "session manager: max_sessions, max_sessions_per_tenant, max_tokens_per_session, "
        "max_append_tokens and build_threads must be >= 1");
  }
  if (options.prefetch_threads < 0 || options.max_prefetch_jobs < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("session manager: prefetch_threads must be >= 0 (0 = no prefetch) and "
                     "max_prefetch_jobs >= 1, got ",
                     options.prefetch_threads, " and ", options.max_prefetch_jobs));
  }
  if (options.decode_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("session manager: decode_threads must be >= 0 (0 = all cores), got ",
                     options.decode_threads));
  }
  if (options.decode_lane_spin < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("session manager: decode_lane_spin must be >= 0 (0 = oneTBB's pool), got ",
                     absl::FormatDuration(options.decode_lane_spin)));
  }
  if (options.default_ttl < absl::Seconds(1) || options.default_ttl > options.max_ttl) {
    return absl::InvalidArgumentError(
        absl::StrCat("session manager: default_ttl must be in 1s..max_ttl (",
                     absl::FormatDuration(options.max_ttl), "), got ",
                     absl::FormatDuration(options.default_ttl)));
  }
  RETURN_IF_ERROR(ValidateQualityOptions(options.quality));
  std::unique_ptr<SessionManager> m(new SessionManager(options));
  if (options.background_builds) m->builder_ = std::make_unique<IndexBuilder>();
  const int lanes = options.decode_threads > 0
                        ? options.decode_threads
                        : static_cast<int>(std::thread::hardware_concurrency());
  if (options.decode_lane_spin > absl::ZeroDuration() && lanes > 1) {
    m->lanes_ = std::make_unique<DecodeLanes>(lanes - 1, options.decode_lane_spin);
  }
  if (options.prefetch_threads > 0) {
    ASSIGN_OR_RETURN(m->prefetcher_,
                     Prefetcher::Create(options.prefetch_threads, options.max_prefetch_jobs));
  }
  if (options.quality.enabled) {
    QualitySamplerOptions sampler = options.quality.sampler;
    sampler.defer_to = &m->decode_activity_;
    ASSIGN_OR_RETURN(m->sampler_, QualitySampler::Create(sampler));
    if (options.quality.remember_widths) {
      m->calibration_memory_ = std::make_unique<CalibrationMemory>(
          options.quality.remembered_keys, options.quality.seeded_warmup_samples);
    }
  }
  if (options.reaper_interval > absl::ZeroDuration()) {
    m->reaper_ = std::thread([raw = m.get()] { raw->ReaperLoop(); });
    if (options.prefault_slabs > 0) {
      m->prefaulter_ = std::make_unique<SlabPrefaulter>(options.pool, options.prefault_slabs,
                                                        options.reaper_interval);
    }
  }
  return m;
}

namespace {

// lease.Read of a prefill chunk (hundreds of MiB) in 8 MiB blocks on
// `threads` cores (0: all): the copy, and on a VM the first touches of the
// client's pages through the daemon's mapping (docs/bench/thp9_memory.md),
// divide among them. Each 1 MiB step is checked for NaN/Inf (and keys out of
// range: AppendBytesClean) right after it is copied, while it is in cache;
// `*clean` says whether every step was (a separate scan of a 512 MiB chunk
// read it all back from memory: 12% of an ingest's CPU). The first failing
// block's status, unprefixed (a truncated file's "buffer file shrank ..."
// reads as from one Read).
absl::Status ReadInBlocks(BufferLease& lease, uint64_t offset, uint64_t length, uint8_t* dst,
                          int threads, DType dtype, bool* clean) {
  constexpr uint64_t kBlock = uint64_t{8} << 20;
  constexpr uint64_t kStep = uint64_t{1} << 20;
  const uint64_t half = length / 2;
  std::atomic<bool> all_clean{true};
  const auto read = [&](uint64_t at, uint64_t len) -> absl::Status {
    for (uint64_t s = at; s < at + len; s += kStep) {
      const uint64_t step = std::min(kStep, at + len - s);
      RETURN_IF_ERROR(lease.Read(offset + s, step, dst + s));
      if (all_clean.load(std::memory_order_relaxed) &&
          !AppendBytesClean(dtype, half, s, dst + s, step)) {
        all_clean.store(false, std::memory_order_relaxed);
      }
    }
    return absl::OkStatus();
  };
  if (length < 2 * kBlock || threads == 1) {
    RETURN_IF_ERROR(read(0, length));
    *clean = all_clean.load();
    return absl::OkStatus();
  }
  const int64_t blocks = static_cast<int64_t>((length + kBlock - 1) / kBlock);
  std::vector<absl::Status> results(static_cast<size_t>(blocks));
  RETURN_IF_ERROR(ParallelFor(blocks, threads, [&](int64_t b) {
    const uint64_t at = static_cast<uint64_t>(b) * kBlock;
    results[static_cast<size_t>(b)] = read(at, std::min(kBlock, length - at));
    return absl::OkStatus();
  }));
  *clean = all_clean.load();
  for (absl::Status& r : results) {
    if (!r.ok()) return std::move(r);
  }
  return absl::OkStatus();
}

StagingCacheOptions StagingOptionsOf(const SessionManagerOptions& options) {
  StagingCacheOptions o;
  o.max_cached_bytes = options.staging_cache_bytes;
  o.huge_pages = options.staging_huge_pages;
  return o;
}
}  // namespace

SessionManager::SessionManager(const SessionManagerOptions& options)
    : options_(options),
      clock_(options.clock != nullptr ? options.clock : Clock::Real()),
      epoch_(RandomNonZero64()),
      counters_(std::make_unique<Counters>()),
      staging_(StagingCache::Create(StagingOptionsOf(options))),
      prefetch_counters_(std::make_unique<PrefetchCounters>()) {}

SessionManager::~SessionManager() {
  prefetcher_.reset();  // its jobs hold leases and sessions
  sampler_.reset();
  {
    absl::MutexLock l(&reaper_mu_);
    stop_ = true;
  }
  if (reaper_.joinable()) reaper_.join();
  prefaulter_.reset();
  std::map<std::string, std::shared_ptr<Session>, std::less<>> dead;
  absl::MutexLock l(&mu_);
  dead.swap(sessions_);
}

void SessionManager::ReaperLoop() {
  while (true) {
    {
      absl::MutexLock l(&reaper_mu_);
      reaper_mu_.AwaitWithTimeout(absl::Condition(&stop_), options_.reaper_interval);
      if (stop_) return;
    }
    ExpireLeases(clock_->Now());
    staging_->Trim(options_.staging_idle);
    MaybeTrimHeap();  // after sessions dropped (server/pool/heap_trim.h)
  }
}

// ------------------------------------------------------------ lookup, info

absl::StatusOr<std::shared_ptr<Session>> SessionManager::Find(const Caller& caller,
                                                              std::string_view id, bool admin_ok) {
  absl::ReaderMutexLock l(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return SessionNotFound(id);
  if (it->second->tenant != caller.tenant && !(admin_ok && caller.admin)) {
    return SessionNotFound(id);  // same answer as unknown: ids do not leak
  }
  return it->second;
}

SessionInfo SessionManager::Info(const Session& s) const {
  SessionInfo info;
  info.id = s.id;
  info.tenant = s.tenant;
  info.epoch = s.epoch;
  info.config = s.config;
  info.config.pinned = s.pinned.load();
  info.created = s.created;
  info.last_use = s.last_use();
  info.expires = info.last_use + s.config.ttl;
  info.tokens = s.tokens_view.load();
  info.pages = s.pages_view.load();
  if (info.pages > 0) {
    const double slots = static_cast<double>(info.pages) * s.config.page_tokens;
    const double held = static_cast<double>(info.tokens) * s.groups * s.config.kv_heads;
    info.page_fill = held / slots;
  }
  info.frame_bytes = s.frame_bytes_view.load();
  info.index_bytes = s.index_bytes_view.load();
  // The unrouted count first (session.h): never more than the total read after it.
  info.decode_keys_unrouted = s.decode_keys_unrouted_view.load();
  info.decode_keys = s.decode_keys_view.load();
  info.pinned = s.pinned.load();
  info.in_flight = s.in_flight.load();
  info.trees_built = s.trees_built.load();
  info.trees_total = s.groups * s.config.kv_heads;
  info.next_layer = s.next_layer_view.load();
  info.quality = QualityInfoOf(s);
  return info;
}

void SessionManager::RemoveSession(const std::string& id, const char* reason) {
  std::shared_ptr<Session> dead;  // frames go back to the pool outside mu_
  {
    absl::MutexLock l(&mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return;
    dead = std::move(it->second);
    dead->closed.store(true);
    sessions_.erase(it);
  }
  RememberCalibration(*dead);
  (void)reason;
}

void SessionManager::RememberCalibration(const Session& s) {
  if (calibration_memory_ == nullptr) return;
  // A head's width counts as learnt from its first sample (which raises it
  // or confirms it), a fallback to exact, or a seed: at model scale the
  // sampler's CPU budget, shared by 32 layers x 8 KV heads, allows a head
  // about one sample per session of a few dozen tokens
  // (docs/bench/prior11_memory.md), so only a chain of sessions can add up.
  calibration_memory_->Remember(s, 1);
}

bool SessionManager::draining() const {
  {
    absl::ReaderMutexLock l(&mu_);
    if (draining_) return true;
  }
  return options_.stop_pending && options_.stop_pending();
}

bool SessionManager::SetDraining(bool draining) {
  absl::MutexLock l(&mu_);
  const bool before = draining_;
  draining_ = draining;
  return before;
}

absl::StatusOr<double> SessionManager::ReserveStaging(uint64_t bytes,
                                                      const std::atomic<bool>* stop) {
  return staging_->Reserve(bytes, stop);
}

uint64_t SessionManager::staging_reserve_bytes() const { return staging_->reserve_bytes(); }

SessionManager::StagingState SessionManager::staging_state() const {
  StagingState s;
  s.lent_bytes = staging_->lent_bytes();
  const StagingCache::WaitStats w = staging_->wait_stats();
  s.waits = w.waits;
  s.waits_expired = w.expired;
  s.wait_seconds = w.seconds;
  return s;
}

SessionManager::DecodeLaneStats SessionManager::decode_lane_stats() const {
  DecodeLaneStats s;
  if (lanes_ == nullptr) return s;
  s.jobs = lanes_->jobs();
  s.fallbacks = lanes_->fallbacks();
  s.helper_tasks = lanes_->helper_tasks();
  s.jobs_alone = lanes_->jobs_alone();
  return s;
}

int SessionManager::InFlight() const { return counters_->in_flight.load(); }

ChecksumCounters* SessionManager::checksum_counters() { return &counters_->checksums; }

// ------------------------------------------------------------ sessions

absl::StatusOr<SessionInfo> SessionManager::CreateSession(const Caller& caller,
                                                          const SessionConfig& config_in) {
  RETURN_IF_ERROR(ValidateTenantName(caller.tenant));
  RETURN_IF_ERROR(ValidateSessionConfig(config_in, options_.max_ttl));
  SessionConfig config = config_in;
  if (config.ttl == absl::ZeroDuration()) config.ttl = options_.default_ttl;
  // Validate the selector configuration with the index's own rules.
  SelectorConfig sc;
  sc.kind = config.selector;
  sc.head_dim = config.head_dim;
  sc.dtype = config.dtype;
  sc.page_tokens = config.page_tokens;
  sc.num_query_heads = config.q_heads / config.kv_heads;
  sc.mdci = config.mdci;
  {
    FramePageKeys none(nullptr);
    auto probe = Selector::Create(sc, &none);
    if (!probe.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("session config: selector: ", probe.status().message()));
    }
  }
  const uint64_t frame_bytes =
      PageGeometry{config.page_tokens, config.head_dim, config.dtype}.frame_bytes();
  ASSIGN_OR_RETURN(SizeClassId size_class, options_.pool->GetOrCreateClass(frame_bytes));
  const absl::Time now = clock_->Now();
  // Built before taking mu_: the constructor takes the session's own locks,
  // which must never nest inside mu_ (appends take mu_ inside them).
  auto s = std::make_shared<Session>(RandomHexId(), caller.tenant, epoch_, config, size_class, now,
                                     options_.keep_checksums);
  if (sampler_ != nullptr) {
    ASSIGN_OR_RETURN(std::vector<std::unique_ptr<HeadQualityMonitor>> heads,
                     MakeHeadQuality(s->config, s->groups, options_.quality));
    s->EnableQuality(std::move(heads), sampler_.get());
    s->calibration_memory = calibration_memory_.get();
    s->width_pool = MakeWidthPool(s->config, options_.quality);
    s->fair_burst = options_.quality.fair_burst;
  }
  // Probed before mu_: the probe is the owner's code.
  const bool stopping = options_.stop_pending && options_.stop_pending();
  absl::MutexLock l(&mu_);
  if (draining_ || stopping) {
    return absl::UnavailableError("icecached is draining; no new sessions are accepted");
  }
  if (sessions_.size() >= static_cast<size_t>(options_.max_sessions)) {
    counters_->rejected.fetch_add(1);
    return absl::ResourceExhaustedError(
        absl::StrCat("the daemon holds max_sessions=", options_.max_sessions, " sessions"));
  }
  int mine = 0;
  for (const auto& [id, s] : sessions_) mine += s->tenant == caller.tenant ? 1 : 0;
  if (mine >= options_.max_sessions_per_tenant) {
    counters_->rejected.fetch_add(1);
    return absl::ResourceExhaustedError(
        absl::StrCat("tenant '", caller.tenant, "' holds max_sessions_per_tenant=",
                     options_.max_sessions_per_tenant, " sessions; drop some first"));
  }
  if (sessions_.count(s->id) != 0) {  // 128 random bits: practically never
    return absl::InternalError("session id collision; retry CreateSession");
  }
  SessionInfo info = Info(*s);
  sessions_.emplace(s->id, std::move(s));
  counters_->created.fetch_add(1);
  return info;
}

absl::StatusOr<SessionInfo> SessionManager::GetSession(const Caller& caller, std::string_view id) {
  ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(caller, id, /*admin_ok=*/true));
  return Info(*s);
}

std::vector<SessionInfo> SessionManager::ListSessions(const Caller& caller) {
  std::vector<SessionInfo> out;
  absl::ReaderMutexLock l(&mu_);
  for (const auto& [id, s] : sessions_) {
    if (caller.admin || s->tenant == caller.tenant) out.push_back(Info(*s));
  }
  return out;
}

absl::Status SessionManager::DropSession(const Caller& caller, std::string_view id) {
  ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(caller, id, /*admin_ok=*/true));
  RemoveSession(s->id, "dropped");
  counters_->dropped.fetch_add(1);
  return absl::OkStatus();
}

absl::StatusOr<SessionInfo> SessionManager::KeepAlive(const Caller& caller, std::string_view id) {
  ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(caller, id, /*admin_ok=*/false));
  const absl::Time now = clock_->Now();
  s->Touch(now);
  options_.buffers->TouchTenant(caller.tenant, now);
  return Info(*s);
}

// ------------------------------------------------------------ leases

int SessionManager::ExpireLeases(absl::Time now) {
  std::vector<std::shared_ptr<Session>> dead;
  {
    absl::MutexLock l(&mu_);
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      Session& s = *it->second;
      if (s.in_flight.load() == 0 && now - s.last_use() > s.config.ttl) {
        s.closed.store(true);
        dead.push_back(std::move(it->second));
        it = sessions_.erase(it);
      } else {
        ++it;
      }
    }
  }
  counters_->expired.fetch_add(dead.size());
  for (const auto& s : dead) RememberCalibration(*s);
  if (options_.on_expired) {
    for (const auto& s : dead) options_.on_expired(s->tenant, s->id, now - s->last_use());
  }
  options_.buffers->ExpireIdle(now);
  return static_cast<int>(dead.size());
}

// ------------------------------------------------------------ admission

absl::Status SessionManager::MakeRoom(const Session* appending, uint64_t bytes) {
  const uint64_t capacity = options_.pool->capacity_bytes();
  const uint64_t used = options_.pool->used_bytes();
  const auto high = static_cast<uint64_t>(options_.high_watermark * static_cast<double>(capacity));
  if (used + bytes <= high) return absl::OkStatus();
  const uint64_t need_fit = used + bytes > capacity ? used + bytes - capacity : 0;
  const uint64_t need_high = used + bytes - high;

  std::vector<std::shared_ptr<Session>> dead;  // destroyed after mu_ is released
  absl::MutexLock l(&mu_);
  struct Candidate {
    int64_t last_use_ns;
    uint64_t bytes;
    std::string id;
  };
  std::vector<Candidate> candidates;
  uint64_t evictable = 0;
  for (const auto& [id, s] : sessions_) {
    if (s.get() == appending || s->pinned.load() || s->in_flight.load() > 0) continue;
    const uint64_t b = s->frame_bytes_view.load();
    if (b == 0) continue;
    candidates.push_back({s->last_use_ns.load(), b, id});
    evictable += b;
  }
  // Evicting cannot make the request fit: evict nothing, let the pool refuse.
  if (evictable < need_fit) return absl::OkStatus();
  std::sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    return a.last_use_ns != b.last_use_ns ? a.last_use_ns < b.last_use_ns : a.id < b.id;
  });
  uint64_t freed = 0;
  for (const Candidate& c : candidates) {
    if (freed >= need_high) break;
    auto it = sessions_.find(c.id);
    it->second->closed.store(true);
    dead.push_back(std::move(it->second));
    sessions_.erase(it);
    freed += c.bytes;
  }
  counters_->evicted.fetch_add(dead.size());
  // Under mu_ (the memory's own lock nests inside it; it never calls back).
  for (const auto& s : dead) RememberCalibration(*s);
  return absl::OkStatus();
}

// ------------------------------------------------------------ KV operations

absl::StatusOr<SessionManager::InFlightGuard> SessionManager::Use(const Caller& caller,
                                                                  std::string_view id) {
  absl::ReaderMutexLock l(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end() || it->second->tenant != caller.tenant) return SessionNotFound(id);
  return InFlightGuard(it->second, counters_.get());
}

absl::StatusOr<AppendResult> SessionManager::AppendKv(const Caller& caller, std::string_view id,
                                                      int64_t n, absl::Span<const uint8_t> bytes,
                                                      LayerRange range) {
  ASSIGN_OR_RETURN(InFlightGuard guard, Use(caller, id));
  guard->Touch(clock_->Now());
  return Append(guard, n, range, bytes, StagingBuffer());
}

absl::StatusOr<AppendResult> SessionManager::AppendKvFromBuffer(const Caller& caller,
                                                                std::string_view id, int64_t n,
                                                                std::string_view buffer_id,
                                                                uint64_t offset, LayerRange range,
                                                                absl::Time deadline) {
  ASSIGN_OR_RETURN(InFlightGuard guard, Use(caller, id));
  if (n < 1 || n > options_.max_append_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("append: n must be in 1..", options_.max_append_tokens, ", got ", n));
  }
  const absl::Time now = clock_->Now();
  guard->Touch(now);
  const uint64_t length = AppendBytes(guard->config, n, range);
  ASSIGN_OR_RETURN(BufferLease lease, options_.buffers->Acquire(caller, buffer_id, now));
  // Every bound before any allocation: the region must lie in the buffer, so
  // the staging copy is never larger than what the client registered.
  RETURN_IF_ERROR(lease.CheckRegion(offset, length));
  if (length > options_.pool->capacity_bytes()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "append of ", n, " tokens takes ", length, " bytes, more than the whole pool (",
        options_.pool->capacity_bytes(), " bytes, pool.capacity_bytes); append in smaller chunks"));
  }
  // Back-pressure: a client that sends chunks faster than their trees build
  // waits here for the staging of a finished build rather than have the
  // daemon map (and fault in) fresh memory for every queued chunk.
  // (No deadline: infinite time arithmetic leaves it InfiniteFuture.)
  const absl::Time real_now = absl::Now();
  const absl::Time wait_until =
      std::min(real_now + options_.staging_wait, real_now + (deadline - real_now) / 2);
  absl::StatusOr<StagingBuffer> staging =
      staging_->AcquireWaiting(length, wait_until, [this] { return draining(); });
  if (!staging.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("append of ", n, " tokens from buffer ", std::string(buffer_id), ": ",
                     staging.status().message(), "; retry, or append in smaller chunks"));
  }
  // One copy out of the client's mapping, under the SIGBUS guard; the index
  // and frames are then filled from private memory the client cannot change.
  bool clean = false;
  RETURN_IF_ERROR(ReadInBlocks(lease, offset, length, staging->data(), options_.decode_threads,
                               guard->config.dtype, &clean));
  const absl::Span<const uint8_t> bytes = absl::MakeConstSpan(staging->data(), length);
  return Append(guard, n, range, bytes, std::move(staging).value(), clean);
}

absl::StatusOr<AppendResult> SessionManager::Append(const InFlightGuard& guard, int64_t n,
                                                    LayerRange range,
                                                    absl::Span<const uint8_t> bytes,
                                                    StagingBuffer owned, bool values_clean) {
  Session& s = *guard.get();
  // A decode token (or a few, a speculative step): its inserts and row
  // writes run on the lanes, which wake while it is checked and planned,
  // and the sampler gives way to it.
  const bool decode_append = n <= kDecodeAppendTokens;
  if (lanes_ != nullptr && decode_append) lanes_->KeepWatching();
  const DecodeActivity::Call call(decode_append ? &decode_activity_ : nullptr);
  ASSIGN_OR_RETURN(AppendInput in, CheckAppendInput(s.config, options_.max_append_tokens, n, range,
                                                    bytes, values_clean));
  // Counted while it waits: the quality sampler then lets it through
  // (MeasureProbe) instead of holding it for a whole measurement.
  s.appends_waiting.fetch_add(1);
  absl::MutexLock serial(&s.append_mu);
  s.appends_waiting.fetch_sub(1);
  // Only this append changes the session until it returns (a background
  // build changes only groups marked building, which this append waits
  // for): what the shared phase saw still holds when the writer lock is taken.
  const int trees_before = s.trees_built.load();
  AppendPlan plan;
  bool background = false;
  {
    const GroupWait wait{&s, s.GroupOf(in.first_layer), s.GroupOf(in.end_layer() - 1) + 1};
    absl::ReaderMutexLock read(&s.mu, absl::Condition(&GroupsNotBuilding, &wait));
    RETURN_IF_ERROR(s.CheckUsable());
    RETURN_IF_ERROR(CheckChunkOrder(s, in));
    if (in.first_layer == 0 && s.tokens + n > options_.max_tokens_per_session) {
      counters_->rejected.fetch_add(1);
      return absl::ResourceExhaustedError(absl::StrCat("append: session would hold ", s.tokens + n,
                                                       " tokens; max_tokens_per_session is ",
                                                       options_.max_tokens_per_session));
    }
    background = builder_ != nullptr && BuildsInBackground(s, in);
    if (background) {
      plan = PlanBackgroundBuild(s, in);
    } else {
      ASSIGN_OR_RETURN(
          plan, PlanAppend(s, in, options_.build_threads, options_.decode_threads, staging_.get()));
      if (!plan.first) plan.lanes = lanes_.get();  // decode tokens: lanes start at once
    }
  }
  if (background && owned.data() != in.bytes.data()) {
    // Inline bytes live in the request: the build needs its own copy (a
    // buffer append's private copy is taken over as it is).
    absl::StatusOr<StagingBuffer> copy = staging_->Acquire(in.bytes.size());
    if (!copy.ok()) {
      return absl::ResourceExhaustedError(absl::StrCat("append of ", n, " tokens to session ", s.id,
                                                       ": ", copy.status().message(),
                                                       "; retry, or append in smaller chunks"));
    }
    owned = std::move(copy).value();
    std::memcpy(owned.data(), in.bytes.data(), in.bytes.size());
  }
  absl::StatusOr<FrameSet> reserved = AdmitFrames(s, plan.reserve);
  if (!reserved.ok()) {
    s.trees_built.store(trees_before);  // the indexes built aside are dropped
    return reserved.status();
  }
  if (background) {
    return StartBackgroundBuild(guard, in, std::move(plan), std::move(reserved).value(),
                                std::move(owned));
  }
  absl::MutexLock write(&s.mu);
  RETURN_IF_ERROR(ApplyToIndexes(s, in, plan));
  ASSIGN_OR_RETURN(uint64_t new_pages, WriteRows(s, in, plan, std::move(reserved).value()));
  return Publish(s, in, new_pages, clock_->Now());
}

AppendResult SessionManager::StartBackgroundBuild(const InFlightGuard& guard, const AppendInput& in,
                                                  AppendPlan plan, FrameSet frames,
                                                  StagingBuffer owned) {
  Session& s = *guard.get();
  auto job = std::make_shared<PendingBuild>();
  job->session = guard.shared();
  job->bytes = std::move(owned);  // holds in.bytes (Append)
  job->in = in;
  job->in.bytes = absl::MakeConstSpan(job->bytes.data(), job->bytes.size());
  job->plan = std::move(plan);
  job->frames = std::move(frames);
  AppendResult result;
  {
    absl::MutexLock write(&s.mu);
    result = AcceptPendingBuild(s, in, clock_->Now());
  }
  // In flight until built: never evicted or expired meanwhile, and a drain
  // waits for it.
  s.in_flight.fetch_add(1);
  counters_->in_flight.fetch_add(1);
  const absl::Time posted = absl::Now();
  builder_->Post([this, job, posted] {
    if (options_.on_build_start) options_.on_build_start(job->session->id, job->in.first_layer);
    const absl::Time start = absl::Now();
    RunPendingBuild(*job, options_.build_threads, staging_.get(), clock_->Now());
    job->bytes = StagingBuffer();  // back to the cache for the next append
    if (options_.on_build_done) {
      BuildDone done;
      done.session = job->session->id;
      done.first_layer = job->in.first_layer;
      done.num_layers = job->in.num_layers;
      done.queued = start - posted;
      done.ran = absl::Now() - start;
      done.trees_wall = job->trees_wall;
      done.trees = job->plan.num_indices;
      done.tree_cpu_ns = job->tree_cpu_ns.load();
      done.tree_minor_faults = job->tree_minor_faults.load();
      options_.on_build_done(done);
    }
    job->session->in_flight.fetch_sub(1);
    counters_->in_flight.fetch_sub(1);
  });
  return result;
}

absl::Status SessionManager::GroupReadyOrUnavailable(const Session& s, int layer,
                                                     bool ready) const {
  if (ready) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "session ", s.id, ": the trees of layer ", layer, " are still being built after ",
      absl::FormatDuration(options_.build_wait), " (", s.trees_built.load(), " of ",
      s.groups * s.config.kv_heads, " trees built); retry the call"));
}

absl::StatusOr<FrameSet> SessionManager::AdmitFrames(const Session& s, uint64_t reserve) {
  // Quota first (never evicts), then the watermark policy, then the
  // reservation itself. On failure nothing has changed.
  const uint64_t stride = PagePool::StrideFor(s.frame_bytes);
  if (reserve * stride >= kPopulateBytes) {
    // A prefill's frames: their page faults are taken here, slab by slab,
    // before any lock (PagePool::PopulateNext), not 4 KiB by 4 KiB while
    // the pool lock is held for the carving.
    options_.pool->PopulateNext(reserve * stride);
  }
  absl::MutexLock admission(&admission_mu_);
  const uint64_t quota = options_.pool->Quota(s.tenant);
  const uint64_t used = options_.pool->TenantUsedBytes(s.tenant);
  if (reserve > 0 && quota != kUnlimitedQuota &&
      (reserve > quota / stride || used > quota - reserve * stride)) {
    counters_->rejected.fetch_add(1);
    return absl::ResourceExhaustedError(
        absl::StrCat("quota of tenant '", s.tenant, "': append needs up to ", reserve * stride,
                     " bytes, tenant uses ", used, " of ", quota, "; nothing was stored"));
  }
  if (reserve > 0 && reserve <= options_.pool->capacity_bytes() / stride) {
    RETURN_IF_ERROR(MakeRoom(&s, reserve * stride));
  }
  auto frames = options_.pool->Allocate(s.tenant, s.size_class, reserve);
  if (!frames.ok()) {
    counters_->rejected.fetch_add(1);
    return absl::Status(frames.status().code(),
                        absl::StrCat(frames.status().message(), "; nothing was stored"));
  }
  return std::move(frames).value();
}

absl::StatusOr<SelectResult> SessionManager::SelectPages(const Caller& caller, std::string_view id,
                                                         const SelectRequest& request) {
  ASSIGN_OR_RETURN(InFlightGuard guard, Use(caller, id));
  const DecodeActivity::Call call(&decode_activity_);
  Session& s = *guard.get();
  s.Touch(clock_->Now());
  std::vector<QualityProbe> probes;
  absl::StatusOr<SelectResult> result;
  if (!request.reuse_group_selection) DropPrefetch(s, request.layer);
  {
    ReadyReader read(s, request.layer, options_.build_wait);
    RETURN_IF_ERROR(GroupReadyOrUnavailable(s, request.layer, read.ready()));
    // No destination yet: an unset granularity selects whole pages, which
    // any buffer takes (docs/architecture.md §3.8).
    result =
        s.Select(request, SelectDestination::kNone, options_.decode_threads, &probes, lanes_.get());
  }
  OfferProbes(guard.shared(), std::move(probes));
  return result;
}

absl::StatusOr<FetchLayout> SessionManager::FetchPages(const Caller& caller, std::string_view id,
                                                       const FetchRequest& request) {
  ASSIGN_OR_RETURN(InFlightGuard guard, Use(caller, id));
  const DecodeActivity::Call call(&decode_activity_);
  Session& s = *guard.get();
  const absl::Time now = clock_->Now();
  s.Touch(now);
  ASSIGN_OR_RETURN(BufferLease lease, options_.buffers->Acquire(caller, request.buffer_id, now));
  ReadyReader read(s, request.layer, options_.build_wait);
  RETURN_IF_ERROR(GroupReadyOrUnavailable(s, request.layer, read.ready()));
  return s.Fetch(lease, request, options_.decode_threads, &counters_->checksums, lanes_.get());
}

namespace {

// A later layer of a group reuses the first layer's selection, made per token
// (for a HOST_SHM destination), while this call writes to a device buffer.
absl::Status ReusedTokensToDevice(const Session& s, int layer) {
  const int group = s.GroupOf(layer);
  const int first = s.FirstLayerOf(group);
  return absl::FailedPreconditionError(
      absl::StrCat("decode step: session ", s.id, " layer ", layer,
                   " reuses the selection of layer ", first, " (layer group ", group,
                   "), which was made per token, and this buffer is CUDA_IPC or the "
                   "request has device fields, which take whole pages only; select layer ",
                   first,
                   " with GRANULARITY_PAGE (or create the session with defaults.granularity "
                   "GRANULARITY_PAGE) to write this group to a device buffer"));
}

}  // namespace

absl::StatusOr<DecodeStepResult> SessionManager::DecodeStep(
    const Caller& caller, std::string_view id, const SelectRequest& select,
    std::string_view buffer_id, uint64_t offset, int num_layers, const DeviceWrite& device,
    bool prefetch_group, bool in_place) {
  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(InFlightGuard guard, Use(caller, id));
  // The loop's next call comes soon: the lanes watch from here and from
  // the answer (below), whether or not this call runs a job on them.
  const DecodeCall call(lanes_.get(), &decode_activity_);
  Session& s = *guard.get();
  const absl::Time now = clock_->Now();
  s.Touch(now);
  ASSIGN_OR_RETURN(BufferLease lease, options_.buffers->Acquire(caller, buffer_id, now));
  FetchRequest fetch;
  fetch.layer = select.layer;
  fetch.num_layers = num_layers;
  fetch.buffer_id = std::string(buffer_id);
  fetch.offset = offset;
  fetch.want_positions = select.params.want_positions;
  fetch.device = device;
  fetch.in_place = in_place;
  // A prefetched layer: wait for its flag before the session lock (the
  // worker writing it may need that lock; prefetch.h).
  const auto wait0 = std::chrono::steady_clock::now();
  PrefetchedLayer pre = TakePrefetched(s, select, fetch);
  const auto waited = std::chrono::steady_clock::now() - wait0;  // counted as gather
  // A new selection of the group: its old prefetch stops first.
  if (!select.reuse_group_selection) DropPrefetch(s, select.layer);
  DecodeStepResult out;
  std::vector<QualityProbe> probes;
  {
    ReadyReader read(s, select.layer, options_.build_wait);
    RETURN_IF_ERROR(GroupReadyOrUnavailable(s, select.layer, read.ready()));
    const SelectDestination destination = device.empty() && lease.kind() == BufferKind::kHostShm
                                              ? SelectDestination::kHost
                                              : SelectDestination::kDevice;
    const auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(out.selection,
                     s.Select(select, destination, options_.decode_threads, &probes, lanes_.get()));
    const auto t1 = std::chrono::steady_clock::now();
    out.select_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
    const bool by_token =
        !out.selection.heads.empty() && !out.selection.heads.front().token_refs.empty();
    if (by_token && out.selection.reused && destination == SelectDestination::kDevice) {
      return ReusedTokensToDevice(s, select.layer);
    }
    for (const Selection& sel : out.selection.heads) {
      // Token granularity: the selected tokens, packed (their positions always come back).
      if (by_token) {
        fetch.tokens.push_back(sel.positions);
        fetch.token_hints.push_back(sel.token_refs);  // Fetch checks them; no lookup
      } else {
        fetch.pages.push_back(sel.pages);
      }
    }
    // The selection's token refs, current under this same read lock.
    fetch.hints_checked = by_token;
    if (UsePrefetched(s, out.selection, fetch, &pre, &out)) {
      RETURN_IF_ERROR(lease.SignalDone(device.done_event));
    } else {
      ASSIGN_OR_RETURN(out.layout, s.Fetch(lease, fetch, options_.decode_threads,
                                           &counters_->checksums, lanes_.get()));
    }
    out.gather_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - t1 + waited)
                        .count();
  }
  OfferProbes(guard.shared(), std::move(probes));  // never waits (quality_sampler.h)
  if (prefetch_group) out.prefetching = StartPrefetch(guard.shared(), std::move(lease), fetch, out);
  out.step_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count();
  return out;
}

std::vector<absl::StatusOr<DecodeStepResult>> SessionManager::DecodeBatch(
    const Caller& caller, absl::Span<const DecodeBatchEntry> entries) {
  std::vector<absl::StatusOr<DecodeStepResult>> out(entries.size(), DecodeStepResult{});
  std::vector<char> done(entries.size(), 0);
  auto run = [&](int64_t i) {
    const DecodeBatchEntry& e = entries[i];
    out[i] = DecodeStep(caller, e.session_id, e.select, e.buffer_id, e.offset, e.num_layers, {},
                        e.prefetch_group, e.in_place);
    done[i] = 1;
    return absl::OkStatus();
  };
  // Only a failure of the task runtime itself (out of memory) comes back here.
  const absl::Status ran =
      ParallelFor(static_cast<int64_t>(entries.size()), options_.decode_threads, run);
  for (size_t i = 0; i < out.size(); ++i) {
    if (!done[i]) out[i] = ran.ok() ? absl::InternalError("decode batch entry was not run") : ran;
  }
  return out;
}

// ------------------------------------------------------------ admin

absl::StatusOr<ManagerStats> SessionManager::Stats(const Caller& caller) {
  RETURN_IF_ERROR(NeedAdmin(caller, "GetStats"));
  ManagerStats st;
  st.pool = options_.pool->Stats();
  st.epoch = epoch_;
  double held = 0, slots = 0;
  {
    absl::ReaderMutexLock l(&mu_);
    st.sessions = static_cast<int>(sessions_.size());
    st.draining = draining_ || (options_.stop_pending && options_.stop_pending());
    for (const auto& [id, s] : sessions_) {
      const uint64_t pages = s->pages_view.load();
      st.pages += pages;
      slots += static_cast<double>(pages) * s->config.page_tokens;
      held += static_cast<double>(s->tokens_view.load()) * s->groups * s->config.kv_heads;
      st.decode_keys_unrouted += s->decode_keys_unrouted_view.load();  // first (session.h)
      st.decode_keys += s->decode_keys_view.load();
    }
  }
  st.page_fill = slots > 0 ? held / slots : 0.0;
  st.in_flight = counters_->in_flight.load();
  st.sessions_created = counters_->created.load();
  st.sessions_evicted = counters_->evicted.load();
  st.sessions_expired = counters_->expired.load();
  st.sessions_dropped = counters_->dropped.load();
  st.admissions_rejected = counters_->rejected.load();
  st.pages_verified = counters_->checksums.verified.load();
  st.checksum_failures = counters_->checksums.failures.load();
  st.buffers = static_cast<int>(options_.buffers->size());
  if (const PushCounts* pushes = options_.buffers->push_counts()) {
    st.gpu_pushes_in_place = pushes->in_place.load();
    st.gpu_pushes_staged = pushes->staged.load();
  }
  if (const PinnedRegion* region = options_.buffers->pinned_region()) {
    st.pool_pinned_bytes = region->Get().bytes;
  }
  return st;
}

absl::StatusOr<std::vector<TenantInfo>> SessionManager::ListTenants(const Caller& caller) {
  RETURN_IF_ERROR(NeedAdmin(caller, "ListTenants"));
  std::map<std::string, TenantInfo> by_name;
  PoolStats ps = options_.pool->Stats();
  for (const TenantPoolStats& t : ps.tenants) {
    TenantInfo& info = by_name[t.tenant];
    info.tenant = t.tenant;
    info.used_bytes = t.used_bytes;
    info.quota_bytes = t.quota_bytes;
  }
  {
    absl::ReaderMutexLock l(&mu_);
    for (const auto& [id, s] : sessions_) {
      TenantInfo& info = by_name[s->tenant];
      if (info.tenant.empty()) {
        info.tenant = s->tenant;
        info.quota_bytes = options_.pool->Quota(s->tenant);
      }
      info.sessions++;
    }
  }
  for (const BufferInfo& b : options_.buffers->List(caller)) {
    TenantInfo& info = by_name[b.tenant];
    if (info.tenant.empty()) {
      info.tenant = b.tenant;
      info.quota_bytes = options_.pool->Quota(b.tenant);
    }
    info.buffers++;
  }
  std::vector<TenantInfo> out;
  for (auto& [name, info] : by_name) out.push_back(std::move(info));
  return out;
}

absl::Status SessionManager::SetQuota(const Caller& caller, std::string_view tenant,
                                      uint64_t quota_bytes) {
  RETURN_IF_ERROR(NeedAdmin(caller, "SetQuota"));
  return options_.pool->SetQuota(tenant, quota_bytes);
}

absl::Status SessionManager::EvictSession(const Caller& caller, std::string_view id) {
  RETURN_IF_ERROR(NeedAdmin(caller, "EvictSession"));
  ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(caller, id, /*admin_ok=*/true));
  RemoveSession(s->id, "evicted");
  counters_->evicted.fetch_add(1);
  return absl::OkStatus();
}

absl::StatusOr<SessionInfo> SessionManager::PinSession(const Caller& caller, std::string_view id,
                                                       bool pinned) {
  RETURN_IF_ERROR(NeedAdmin(caller, "PinSession"));
  ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(caller, id, /*admin_ok=*/true));
  s->pinned.store(pinned);
  return Info(*s);
}

absl::StatusOr<int> SessionManager::Drain(const Caller& caller, bool draining) {
  RETURN_IF_ERROR(NeedAdmin(caller, "Drain"));
  SetDraining(draining);
  return counters_->in_flight.load();
}

}  // namespace icecache
