#include "server/session/session_manager.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "server/index/parallel_build.h"
#include "server/session/session.h"

namespace icecache {

// ------------------------------------------------------------------ Session

Session::Session(std::string id_in, std::string tenant_in, uint64_t epoch_in,
                 const SessionConfig& config_in, SizeClassId size_class_in, absl::Time now)
    : id(std::move(id_in)),
      tenant(std::move(tenant_in)),
      epoch(epoch_in),
      config(config_in),
      size_class(size_class_in),
      geometry{config_in.page_tokens, config_in.head_dim, config_in.dtype},
      frame_bytes(geometry.frame_bytes()),
      groups(NumLayerGroups(config_in)),
      q_per_kv(config_in.q_heads / config_in.kv_heads),
      created(now) {
  last_use_ns.store(absl::ToUnixNanos(now));
  pinned.store(config_in.pinned);
  absl::MutexLock l(&mu);
  page_frames.resize(static_cast<size_t>(config.layers) * config.kv_heads);
  for (int g = 0; g < groups; ++g) {
    for (int h = 0; h < config.kv_heads; ++h) {
      page_keys.push_back(
          std::make_unique<FramePageKeys>(&page_frames[FrameTableIndex(FirstLayerOf(g), h)]));
    }
  }
  absl::MutexLock c(&cache_mu);
  group_cache.resize(groups);
}

// ------------------------------------------------------------------ helpers

namespace {

std::string RandomHex128() {
  static std::mutex mu;
  static std::mt19937_64 rng{std::random_device{}()};
  std::lock_guard<std::mutex> l(mu);
  return absl::StrFormat("%016x%016x", rng(), rng());
}

uint64_t RandomEpoch() {
  std::random_device rd;
  uint64_t e = 0;
  while (e == 0) e = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  return e;
}

absl::Status SessionNotFound(std::string_view id) {
  return absl::NotFoundError(absl::StrCat("session ", std::string(id), " not found"));
}

absl::Status NeedAdmin(const Caller& caller, const char* verb) {
  if (caller.admin) return absl::OkStatus();
  return absl::PermissionDeniedError(
      absl::StrCat(verb, " needs the admin role; tenant '", caller.tenant, "' does not have it"));
}

// Index of the first non-finite element of `n` elements of `dtype`, or -1.
int64_t FirstNonFinite(DType dtype, const uint8_t* p, int64_t n) {
  switch (dtype) {
    case DType::kF16:
    case DType::kBF16: {
      const uint16_t mask = dtype == DType::kF16 ? 0x7c00 : 0x7f80;
      for (int64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, p + 2 * i, 2);
        if ((v & mask) == mask) return i;
      }
      return -1;
    }
    case DType::kF32: {
      for (int64_t i = 0; i < n; ++i) {
        uint32_t v;
        std::memcpy(&v, p + 4 * i, 4);
        if ((v & 0x7f800000u) == 0x7f800000u) return i;
      }
      return -1;
    }
  }
  return 0;
}

}  // namespace

struct SessionManager::Counters {
  std::atomic<uint64_t> created{0};
  std::atomic<uint64_t> evicted{0};
  std::atomic<uint64_t> expired{0};
  std::atomic<uint64_t> dropped{0};
  std::atomic<uint64_t> rejected{0};
  std::atomic<int> in_flight{0};
};

// Marks a session busy for the lifetime of a request. Created under mu_ so
// eviction and expiry (which check in_flight under mu_) never take a session
// that a request has already found.
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
  if (options.default_ttl < absl::Seconds(1) || options.default_ttl > options.max_ttl) {
    return absl::InvalidArgumentError(
        absl::StrCat("session manager: default_ttl must be in 1s..max_ttl (",
                     absl::FormatDuration(options.max_ttl), "), got ",
                     absl::FormatDuration(options.default_ttl)));
  }
  std::unique_ptr<SessionManager> m(new SessionManager(options));
  if (options.reaper_interval > absl::ZeroDuration()) {
    m->reaper_ = std::thread([raw = m.get()] { raw->ReaperLoop(); });
  }
  return m;
}

SessionManager::SessionManager(const SessionManagerOptions& options)
    : options_(options),
      clock_(options.clock != nullptr ? options.clock : Clock::Real()),
      epoch_(RandomEpoch()),
      counters_(std::make_unique<Counters>()) {}

SessionManager::~SessionManager() {
  {
    absl::MutexLock l(&reaper_mu_);
    stop_ = true;
  }
  if (reaper_.joinable()) reaper_.join();
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
  info.pinned = s.pinned.load();
  info.in_flight = s.in_flight.load();
  return info;
}

void SessionManager::RemoveSession(const std::string& id, const char* reason) {
  std::shared_ptr<Session> dead;  // frames go back to the pool outside mu_
  absl::MutexLock l(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;
  dead = std::move(it->second);
  sessions_.erase(it);
  (void)reason;
}

bool SessionManager::draining() const {
  absl::ReaderMutexLock l(&mu_);
  return draining_;
}

int SessionManager::InFlight() const { return counters_->in_flight.load(); }

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
  auto s =
      std::make_shared<Session>(RandomHex128(), caller.tenant, epoch_, config, size_class, now);
  absl::MutexLock l(&mu_);
  if (draining_) {
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
        dead.push_back(std::move(it->second));
        it = sessions_.erase(it);
      } else {
        ++it;
      }
    }
  }
  counters_->expired.fetch_add(dead.size());
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
    dead.push_back(std::move(it->second));
    sessions_.erase(it);
    freed += c.bytes;
  }
  counters_->evicted.fetch_add(dead.size());
  return absl::OkStatus();
}

// ------------------------------------------------------------ append

absl::StatusOr<AppendResult> SessionManager::AppendKv(const Caller& caller, std::string_view id,
                                                      int64_t n, absl::Span<const uint8_t> bytes) {
  std::shared_ptr<Session> s;
  { ASSIGN_OR_RETURN(s, Find(caller, id, /*admin_ok=*/false)); }
  return AppendLocked(caller, std::move(s), n, bytes);
}

absl::StatusOr<AppendResult> SessionManager::AppendKvFromBuffer(const Caller& caller,
                                                                std::string_view id, int64_t n,
                                                                std::string_view buffer_id,
                                                                uint64_t offset) {
  ASSIGN_OR_RETURN(std::shared_ptr<Session> s, Find(caller, id, /*admin_ok=*/false));
  if (n < 1 || n > options_.max_append_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("append: n must be in 1..", options_.max_append_tokens, ", got ", n));
  }
  const uint64_t length = AppendBytes(s->config, n);
  ASSIGN_OR_RETURN(BufferLease lease, options_.buffers->Acquire(caller, buffer_id, clock_->Now()));
  // One copy out of the client's mapping, under the SIGBUS guard; the index
  // and frames are then filled from private memory the client cannot change.
  std::vector<uint8_t> staging(length);
  RETURN_IF_ERROR(lease.Read(offset, length, staging.data()));
  return AppendLocked(caller, std::move(s), n, absl::MakeConstSpan(staging));
}

absl::StatusOr<AppendResult> SessionManager::AppendLocked(const Caller& caller,
                                                          std::shared_ptr<Session> shared,
                                                          int64_t n,
                                                          absl::Span<const uint8_t> bytes) {
  // In-flight from here on: never evicted or expired while appending.
  std::optional<InFlightGuard> guard;
  {
    absl::ReaderMutexLock l(&mu_);
    if (sessions_.find(shared->id) == sessions_.end()) return SessionNotFound(shared->id);
    guard.emplace(shared, counters_.get());
  }
  Session& s = *shared;
  const SessionConfig& c = s.config;
  s.Touch(clock_->Now());
  if (n < 1 || n > options_.max_append_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("append: n must be in 1..", options_.max_append_tokens, ", got ", n));
  }
  const uint64_t expected = AppendBytes(c, n);
  if (bytes.size() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("append: ", n, " tokens of ", c.layers, " layers x ", c.kv_heads,
                     " kv heads x ", c.head_dim, " dims x K,V in ", std::string(DTypeName(c.dtype)),
                     " need exactly ", expected, " bytes, got ", bytes.size()));
  }
  const size_t esize = DTypeSize(c.dtype);
  const uint64_t row_bytes = static_cast<uint64_t>(c.head_dim) * esize;
  const uint64_t half = expected / 2;  // keys, then values
  if (int64_t bad = FirstNonFinite(c.dtype, bytes.data(), static_cast<int64_t>(half / esize));
      bad >= 0) {
    const int64_t per_layer = static_cast<int64_t>(c.kv_heads) * n * c.head_dim;
    const int64_t layer = bad / per_layer;
    const int64_t head = (bad % per_layer) / (n * c.head_dim);
    const int64_t token = (bad % (n * c.head_dim)) / c.head_dim;
    return absl::InvalidArgumentError(absl::StrCat("append: key of layer ", layer, ", kv head ",
                                                   head, ", token ", token,
                                                   " is NaN or Inf; nothing was stored"));
  }
  auto key_row = [&](int layer, int head, int64_t t) {
    return bytes.data() + ((static_cast<uint64_t>(layer) * c.kv_heads + head) * n + t) * row_bytes;
  };
  auto value_row = [&](int layer, int head, int64_t t) { return key_row(layer, head, t) + half; };

  absl::MutexLock write(&s.mu);
  if (s.broken) {
    return absl::FailedPreconditionError(
        absl::StrCat("session ", s.id, " is unusable after an internal index error; drop it"));
  }
  if (s.tokens + n > options_.max_tokens_per_session) {
    counters_->rejected.fetch_add(1);
    return absl::ResourceExhaustedError(absl::StrCat("append: session would hold ", s.tokens + n,
                                                     " tokens; max_tokens_per_session is ",
                                                     options_.max_tokens_per_session));
  }
  const int num_indices = s.groups * c.kv_heads;
  const bool first = s.tokens == 0;
  // Small decode chunks are cheaper serially than through a task arena.
  const int threads = static_cast<int64_t>(n) * num_indices >= 8192 ? options_.build_threads : 1;
  SelectorConfig sc;
  sc.kind = c.selector;
  sc.head_dim = c.head_dim;
  sc.dtype = c.dtype;
  sc.page_tokens = c.page_tokens;
  sc.num_query_heads = s.q_per_kv;
  sc.mdci = c.mdci;

  // 1. First append: build every index aside (nothing of the session changes
  //    until the frames are reserved). Later appends: compute the worst case.
  std::vector<std::unique_ptr<Selector>> built;
  std::vector<std::vector<Placement>> placements(num_indices);
  std::vector<uint32_t> pages_before(num_indices, 0);
  uint64_t reserve = 0;
  auto to_float = [&](int g, int h, std::vector<float>* keys) {
    keys->resize(static_cast<size_t>(n) * c.head_dim);
    ToFloat(c.dtype, key_row(s.FirstLayerOf(g), h, 0), keys->data(),
            static_cast<size_t>(n) * c.head_dim);
  };
  // Never trust an index with memory safety: every placement must name a
  // page that exists and a slot inside it, and no index may open more pages
  // than were reserved for it; else no byte is written.
  std::vector<uint64_t> max_new_pages(num_indices, static_cast<uint64_t>(n));
  auto check_placements = [&](int i, const Selector& sel) -> absl::Status {
    const uint32_t pages_now = sel.num_pages();
    bool ok = placements[i].size() == static_cast<size_t>(n) && pages_now >= pages_before[i] &&
              pages_now - pages_before[i] <= max_new_pages[i];
    for (size_t t = 0; ok && t < placements[i].size(); ++t) {
      ok = placements[i][t].page < pages_now &&
           placements[i][t].slot < static_cast<uint32_t>(c.page_tokens);
    }
    if (ok) return absl::OkStatus();
    return absl::InternalError(
        absl::StrCat("append: index of layer group ", i / c.kv_heads, " kv head ", i % c.kv_heads,
                     " returned invalid placements (", placements[i].size(), " for ", n,
                     " tokens; ", pages_before[i], " -> ", pages_now, " pages)"));
  };
  if (first) {
    // The reservation is computed from the built indices: no page bound.
    std::fill(max_new_pages.begin(), max_new_pages.end(), ~uint64_t{0});
    built.resize(num_indices);
    RETURN_IF_ERROR(ParallelFor(num_indices, threads, [&](int64_t i) {
      const int g = static_cast<int>(i / c.kv_heads);
      const int h = static_cast<int>(i % c.kv_heads);
      ASSIGN_OR_RETURN(built[i], Selector::Create(sc, s.page_keys[i].get()));
      std::vector<float> keys;
      to_float(g, h, &keys);
      return built[i]->Build(keys.data(), n, &placements[i]);
    }));
    for (int i = 0; i < num_indices; ++i) {
      RETURN_IF_ERROR(check_placements(i, *built[i]));  // nothing stored yet
      reserve += uint64_t{built[i]->num_pages()} * s.LayersIn(i / c.kv_heads);
    }
  } else {
    const bool positional = c.selector == SelectorKind::kExact ||
                            c.selector == SelectorKind::kQuest ||
                            c.selector == SelectorKind::kStreaming;
    for (int i = 0; i < num_indices; ++i) {
      pages_before[i] = s.selectors[i]->num_pages();
      uint64_t worst = static_cast<uint64_t>(n);
      if (positional) {
        const int64_t P = c.page_tokens;
        const int64_t after = (s.tokens + n + P - 1) / P;
        worst = static_cast<uint64_t>(std::max<int64_t>(0, after - pages_before[i]));
      }
      max_new_pages[i] = worst;
      reserve += worst * s.LayersIn(i / c.kv_heads);
    }
  }

  // 2. Admission: quota first (never evicts), then the watermark policy, then
  //    the reservation itself. On failure nothing has changed.
  FrameSet reserved;
  {
    absl::MutexLock admission(&admission_mu_);
    const uint64_t stride = PagePool::StrideFor(s.frame_bytes);
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
    reserved = std::move(frames).value();
  }

  // 3. Later appends: insert now that the frames are secured.
  if (!first) {
    // The lambdas run under s.mu held by this thread (ParallelFor waits).
    std::vector<std::unique_ptr<Selector>>* selectors = &s.selectors;
    absl::Status inserted = ParallelFor(num_indices, threads, [&](int64_t i) {
      const int g = static_cast<int>(i / c.kv_heads);
      const int h = static_cast<int>(i % c.kv_heads);
      std::vector<float> keys;
      to_float(g, h, &keys);
      RETURN_IF_ERROR((*selectors)[i]->Insert(keys.data(), n, &placements[i]));
      return check_placements(static_cast<int>(i), *(*selectors)[i]);
    });
    if (absl::Status e = inserted; !e.ok()) {
      // Keys were checked for NaN/Inf above, so this is an index bug; some
      // indices may have changed while others did not.
      s.broken = true;
      return absl::InternalError(absl::StrCat("append: index insert failed: ", e.message(),
                                              "; session ", s.id, " is now unusable"));
    }
  } else {
    s.selectors = std::move(built);
  }

  // 4. Assign frames to new pages (zeroed), then write K and V rows.
  uint64_t taken = 0;
  uint64_t new_pages = 0;
  for (int i = 0; i < num_indices; ++i) {
    const int g = i / c.kv_heads;
    const int h = i % c.kv_heads;
    const uint32_t pages_now = s.selectors[i]->num_pages();
    for (int l = s.FirstLayerOf(g); l < s.FirstLayerOf(g) + s.LayersIn(g); ++l) {
      std::vector<uint8_t*>& table = s.page_frames[s.FrameTableIndex(l, h)];
      for (uint32_t p = pages_before[i]; p < pages_now; ++p) {
        uint8_t* f = reserved.frame(taken++);
        std::memset(f, 0, s.frame_bytes);
        table.push_back(f);
        ++new_pages;
      }
    }
  }
  // taken <= reserved.size(): check_placements bounded every index's pages.
  // Frames [0, taken) are in use; the worst-case surplus goes back now.
  reserved.TakeBack(reserved.size() - taken).Reset();
  s.frames.Absorb(std::move(reserved)).IgnoreError();  // same pool, tenant, class
  const uint64_t kv_block = static_cast<uint64_t>(c.page_tokens) * row_bytes;
  // Read by the lambdas under s.mu held by this thread (ParallelFor waits).
  const std::vector<std::vector<uint8_t*>>* page_frames = &s.page_frames;
  RETURN_IF_ERROR(ParallelFor(num_indices, threads, [&](int64_t i) {
    const int g = static_cast<int>(i / c.kv_heads);
    const int h = static_cast<int>(i % c.kv_heads);
    for (int l = s.FirstLayerOf(g); l < s.FirstLayerOf(g) + s.LayersIn(g); ++l) {
      const std::vector<uint8_t*>& table = (*page_frames)[s.FrameTableIndex(l, h)];
      for (int64_t t = 0; t < n; ++t) {
        const Placement& pl = placements[i][t];
        uint8_t* frame = table[pl.page];
        std::memcpy(frame + pl.slot * row_bytes, key_row(l, h, t), row_bytes);
        std::memcpy(frame + kv_block + pl.slot * row_bytes, value_row(l, h, t), row_bytes);
      }
    }
    return absl::OkStatus();
  }));
  s.tokens += n;
  uint64_t pages = 0;
  uint64_t index_bytes = 0;
  for (const auto& sel : s.selectors) {
    pages += sel->num_pages();
    index_bytes += sel->index_bytes();
  }
  s.tokens_view.store(s.tokens);
  s.pages_view.store(pages);
  s.frame_bytes_view.store(s.frames.size() * PagePool::StrideFor(s.frame_bytes));
  s.index_bytes_view.store(index_bytes);
  s.Touch(clock_->Now());
  AppendResult result;
  result.tokens = s.tokens;
  result.new_pages = new_pages;
  result.frame_bytes = s.frame_bytes_view.load();
  return result;
}

// ------------------------------------------------------------ select, fetch

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

}  // namespace

// Requires s.mu held (shared).
static absl::StatusOr<SelectResult> SelectHeld(Session& s, const SelectRequest& req)
    ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
  const SessionConfig& c = s.config;
  RETURN_IF_ERROR(CheckLayer(s, req.layer));
  if (s.broken) {
    return absl::FailedPreconditionError(
        absl::StrCat("session ", s.id, " is unusable after an internal index error; drop it"));
  }
  if (s.tokens == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("session ", s.id, " holds no tokens yet; AppendKv first"));
  }
  SelectResult result;
  result.layer = req.layer;
  result.group = s.GroupOf(req.layer);
  const bool first_of_group = s.FirstLayerOf(result.group) == req.layer;
  if (req.reuse_group_selection && !first_of_group) {
    absl::MutexLock l(&s.cache_mu);
    const Session::GroupSelection& cached = s.group_cache[result.group];
    if (cached.tokens != s.tokens) {
      return absl::FailedPreconditionError(
          absl::StrCat("select: no selection of layer group ", result.group, " at ", s.tokens,
                       " tokens to reuse; select layer ", s.FirstLayerOf(result.group), " first"));
    }
    result.heads = cached.heads;
    result.reused = true;
    return result;
  }
  const size_t expect = static_cast<size_t>(c.q_heads) * c.head_dim;
  if (req.queries.size() != expect) {
    return absl::InvalidArgumentError(
        absl::StrCat("select: queries must hold q_heads x head_dim = ", c.q_heads, " x ",
                     c.head_dim, " = ", expect, " floats, got ", req.queries.size()));
  }
  for (size_t i = 0; i < expect; ++i) {
    if (!std::isfinite(req.queries[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "select: query head ", i / c.head_dim, " element ", i % c.head_dim, " is NaN or Inf"));
    }
  }
  ASSIGN_OR_RETURN(SelectParams params, ResolveParams(c, req.params, s.tokens));
  result.heads.resize(c.kv_heads);
  for (int h = 0; h < c.kv_heads; ++h) {
    const float* q = req.queries.data() + static_cast<size_t>(h) * s.q_per_kv * c.head_dim;
    RETURN_IF_ERROR(s.selectors[s.SelectorIndex(result.group, h)]->Select(q, s.q_per_kv, params,
                                                                          &result.heads[h]));
  }
  if (first_of_group) {
    absl::MutexLock l(&s.cache_mu);
    s.group_cache[result.group].tokens = s.tokens;
    s.group_cache[result.group].heads = result.heads;
  }
  return result;
}

static absl::StatusOr<FetchLayout> FetchHeld(Session& s, BufferLease& lease,
                                             const FetchRequest& req)
    ABSL_SHARED_LOCKS_REQUIRED(s.mu) {
  const SessionConfig& c = s.config;
  RETURN_IF_ERROR(CheckLayer(s, req.layer));
  if (req.num_layers < 1 || req.layer + req.num_layers > c.layers) {
    return absl::InvalidArgumentError(absl::StrCat("fetch: num_layers must be in 1..",
                                                   c.layers - req.layer, ", got ", req.num_layers));
  }
  const int group = s.GroupOf(req.layer);
  if (s.GroupOf(req.layer + req.num_layers - 1) != group) {
    // The request is well formed; it disagrees with this session's layer
    // grouping (documented as FAILED_PRECONDITION in kv.proto).
    return absl::FailedPreconditionError(
        absl::StrCat("fetch: layers ", req.layer, "..", req.layer + req.num_layers - 1,
                     " cross a layer group boundary (layer_reuse=", c.layer_reuse, ")"));
  }
  if (s.broken) {
    return absl::FailedPreconditionError(
        absl::StrCat("session ", s.id, " is unusable after an internal index error; drop it"));
  }
  if (req.pages.size() != static_cast<size_t>(c.kv_heads)) {
    return absl::InvalidArgumentError(
        absl::StrCat("fetch: pages must list ", c.kv_heads, " kv heads, got ", req.pages.size()));
  }
  std::vector<std::vector<uint32_t>> fills(c.kv_heads);
  for (int h = 0; h < c.kv_heads; ++h) {
    const Selector* sel =
        s.selectors.empty() ? nullptr : s.selectors[s.SelectorIndex(group, h)].get();
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
  ASSIGN_OR_RETURN(FetchLayout layout, PlanFetchLayout(s.geometry, req.layer, req.num_layers,
                                                       req.pages, fills, req.offset, lease.size()));
  if (req.want_positions) {
    for (int h = 0; h < c.kv_heads; ++h) {
      if (req.pages[h].empty()) continue;  // (selectors may not exist yet)
      const Selector* sel = s.selectors[s.SelectorIndex(group, h)].get();
      for (uint32_t p : req.pages[h]) {
        const int32_t* pos = sel->positions(p);
        layout.heads[h].positions.insert(layout.heads[h].positions.end(), pos, pos + sel->fill(p));
      }
    }
  }
  std::vector<const uint8_t*> frames;
  frames.reserve(static_cast<size_t>(layout.total_slots()) * req.num_layers);
  for (int j = 0; j < req.num_layers; ++j) {
    for (int h = 0; h < c.kv_heads; ++h) {
      const std::vector<uint8_t*>& table = s.page_frames[s.FrameTableIndex(req.layer + j, h)];
      for (uint32_t p : req.pages[h]) frames.push_back(table[p]);
    }
  }
  const uint64_t frame_bytes = s.frame_bytes;
  RETURN_IF_ERROR(lease.Write(req.offset, layout.total_bytes, [&](uint8_t* dst) {
    GatherFrames(frames.data(), frames.size(), frame_bytes, dst);
  }));
  return layout;
}

absl::StatusOr<SelectResult> SessionManager::SelectPages(const Caller& caller, std::string_view id,
                                                         const SelectRequest& request) {
  std::optional<InFlightGuard> guard;
  {
    absl::ReaderMutexLock l(&mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end() || it->second->tenant != caller.tenant) return SessionNotFound(id);
    guard.emplace(it->second, counters_.get());
  }
  Session& s = *guard->get();
  s.Touch(clock_->Now());
  absl::ReaderMutexLock read(&s.mu);
  return SelectHeld(s, request);
}

absl::StatusOr<FetchLayout> SessionManager::FetchPages(const Caller& caller, std::string_view id,
                                                       const FetchRequest& request) {
  std::optional<InFlightGuard> guard;
  {
    absl::ReaderMutexLock l(&mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end() || it->second->tenant != caller.tenant) return SessionNotFound(id);
    guard.emplace(it->second, counters_.get());
  }
  Session& s = *guard->get();
  const absl::Time now = clock_->Now();
  s.Touch(now);
  ASSIGN_OR_RETURN(BufferLease lease, options_.buffers->Acquire(caller, request.buffer_id, now));
  absl::ReaderMutexLock read(&s.mu);
  return FetchHeld(s, lease, request);
}

absl::StatusOr<DecodeStepResult> SessionManager::DecodeStep(const Caller& caller,
                                                            std::string_view id,
                                                            const SelectRequest& select,
                                                            std::string_view buffer_id,
                                                            uint64_t offset, int num_layers) {
  std::optional<InFlightGuard> guard;
  {
    absl::ReaderMutexLock l(&mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end() || it->second->tenant != caller.tenant) return SessionNotFound(id);
    guard.emplace(it->second, counters_.get());
  }
  Session& s = *guard->get();
  const absl::Time now = clock_->Now();
  s.Touch(now);
  ASSIGN_OR_RETURN(BufferLease lease, options_.buffers->Acquire(caller, buffer_id, now));
  absl::ReaderMutexLock read(&s.mu);
  DecodeStepResult out;
  ASSIGN_OR_RETURN(out.selection, SelectHeld(s, select));
  FetchRequest fetch;
  fetch.layer = select.layer;
  fetch.num_layers = num_layers;
  fetch.buffer_id = std::string(buffer_id);
  fetch.offset = offset;
  fetch.want_positions = select.params.want_positions;
  fetch.pages.reserve(out.selection.heads.size());
  for (const Selection& sel : out.selection.heads) fetch.pages.push_back(sel.pages);
  ASSIGN_OR_RETURN(out.layout, FetchHeld(s, lease, fetch));
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
    st.draining = draining_;
    for (const auto& [id, s] : sessions_) {
      const uint64_t pages = s->pages_view.load();
      st.pages += pages;
      slots += static_cast<double>(pages) * s->config.page_tokens;
      held += static_cast<double>(s->tokens_view.load()) * s->groups * s->config.kv_heads;
    }
  }
  st.page_fill = slots > 0 ? held / slots : 0.0;
  st.in_flight = counters_->in_flight.load();
  st.sessions_created = counters_->created.load();
  st.sessions_evicted = counters_->evicted.load();
  st.sessions_expired = counters_->expired.load();
  st.sessions_dropped = counters_->dropped.load();
  st.admissions_rejected = counters_->rejected.load();
  st.buffers = static_cast<int>(options_.buffers->size());
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
  {
    absl::MutexLock l(&mu_);
    draining_ = draining;
  }
  return counters_->in_flight.load();
}

}  // namespace icecache
