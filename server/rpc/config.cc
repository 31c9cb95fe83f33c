#include "server/rpc/config.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "common/socket_path.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "server/rpc/log.h"

namespace icecache::rpc {
namespace {

class CollectFirstError : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, int column, const std::string& message) override {
    if (error_.empty())
      error_ = absl::StrCat("line ", line + 1, " column ", column + 1, ": ", message);
  }
  void AddWarning(int, int, const std::string&) override {}
  const std::string& error() const { return error_; }

 private:
  std::string error_;
};

template <typename T>
absl::Status Bad(absl::string_view field, const T& value, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("config: ", field, " = ", value, ": ", why));
}

std::string Quote(absl::string_view s) { return absl::StrCat("\"", s, "\""); }

constexpr size_t kMaxUnixPath = kMaxUnixSocketPath;
constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kMaxCapacity = uint64_t{1} << 40;
constexpr uint32_t kMaxSelectTokens = 1u << 20;

absl::Status CheckHostPort(absl::string_view field, const std::string& addr) {
  const size_t colon = addr.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return Bad(field, Quote(addr), "want host:port, e.g. \"0.0.0.0:50051\" or \"[::]:50051\"");
  }
  uint32_t port = 0;
  if (!absl::SimpleAtoi(addr.substr(colon + 1), &port) || port > 65535) {
    return Bad(field, Quote(addr), "port must be 0..65535 (0 = any free port, logged at start)");
  }
  return absl::OkStatus();
}

absl::Status CheckReadableFile(absl::string_view field, const std::string& path) {
  if (path.empty()) {
    return Bad(field, "\"\"", "required when listen.tcp_address is set (TCP needs TLS)");
  }
  if (::access(path.c_str(), R_OK) != 0) {
    return Bad(field, Quote(path), absl::StrCat("cannot read: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace

bool IsValidTenantName(absl::string_view t) {
  if (t.empty() || t.size() > 128) return false;
  for (char c : t) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '@' || c == ':' || c == '-';
    if (!ok) return false;
  }
  return true;
}

absl::StatusOr<IcecachedConfig> ParseConfigText(absl::string_view text) {
  IcecachedConfig config;
  google::protobuf::TextFormat::Parser parser;
  CollectFirstError errors;
  parser.RecordErrorsTo(&errors);
  // Merge semantics: a singular field given twice takes the last value and a
  // message given twice is merged, so "base + overrides" files work.
  if (!parser.MergeFromString(std::string(text), &config)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config: ", errors.error().empty() ? "cannot parse textproto" : errors.error()));
  }
  return config;
}

absl::StatusOr<IcecachedConfig> LoadConfigFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (!text.ok()) {
    const std::string msg = absl::StrCat("config file ", text.status().message());
    const absl::StatusCode code = text.status().code();
    if (code == absl::StatusCode::kNotFound) return absl::NotFoundError(msg);
    if (code == absl::StatusCode::kPermissionDenied) return absl::PermissionDeniedError(msg);
    return absl::InvalidArgumentError(msg);
  }
  absl::StatusOr<IcecachedConfig> config = ParseConfigText(*text);
  if (!config.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

absl::Status ApplyOverrides(const ConfigOverrides& o, IcecachedConfig* c) {
  if (o.socket) c->mutable_listen()->set_unix_socket(*o.socket);
  if (o.tcp_address) c->mutable_listen()->set_tcp_address(*o.tcp_address);
  if (o.metrics_port) c->mutable_metrics()->set_port(*o.metrics_port);
  if (o.capacity_bytes) c->mutable_pool()->set_capacity_bytes(*o.capacity_bytes);
  if (o.reaper_interval_ms) c->mutable_sessions()->set_reaper_interval_ms(*o.reaper_interval_ms);
  if (o.default_ttl_ms) c->mutable_sessions()->set_default_ttl_ms(*o.default_ttl_ms);
  if (o.drain_timeout_ms) c->set_drain_timeout_ms(*o.drain_timeout_ms);
  if (o.worker_threads) c->set_worker_threads(*o.worker_threads);
  if (o.pool_prefault) c->mutable_pool()->set_prefault(*o.pool_prefault);
  if (o.log_level) {
    absl::StatusOr<rpc::LogLevel> level = ParseLogLevel(*o.log_level);
    if (!level.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--log_level: ", level.status().message()));
    }
    switch (*level) {
      case rpc::LogLevel::kDebug:
        c->set_log_level(v1::LOG_LEVEL_DEBUG);
        break;
      case rpc::LogLevel::kInfo:
        c->set_log_level(v1::LOG_LEVEL_INFO);
        break;
      case rpc::LogLevel::kWarn:
        c->set_log_level(v1::LOG_LEVEL_WARN);
        break;
      case rpc::LogLevel::kError:
        c->set_log_level(v1::LOG_LEVEL_ERROR);
        break;
    }
  }
  return absl::OkStatus();
}

void ApplyDefaults(IcecachedConfig* c) {
  auto* listen = c->mutable_listen();
  if (listen->unix_socket().empty()) listen->set_unix_socket(DaemonDefaultSocketPath());
  if (listen->unix_socket_mode() == 0) listen->set_unix_socket_mode(kDefaultSocketMode);
  auto* auth = c->mutable_auth();
  if (auth->unmapped_uid() == v1::UNMAPPED_UID_POLICY_UNSPECIFIED) {
    auth->set_unmapped_uid(v1::UNMAPPED_UID_POLICY_TENANT_PER_UID);
  }
  auto* pool = c->mutable_pool();
  if (pool->capacity_bytes() == 0) pool->set_capacity_bytes(kDefaultCapacityBytes);
  if (pool->high_watermark() == 0) pool->set_high_watermark(kDefaultHighWatermark);
  auto* s = c->mutable_sessions();
  if (s->default_ttl_ms() == 0) s->set_default_ttl_ms(kDefaultTtlMs);
  if (s->max_ttl_ms() == 0) s->set_max_ttl_ms(std::max(kDefaultMaxTtlMs, s->default_ttl_ms()));
  if (s->reaper_interval_ms() == 0) s->set_reaper_interval_ms(kDefaultReaperIntervalMs);
  if (s->default_budget_tokens() == 0) s->set_default_budget_tokens(kDefaultBudgetTokens);
  if (s->max_sessions() == 0) s->set_max_sessions(kDefaultMaxSessions);
  if (s->max_sessions_per_tenant() == 0) {
    s->set_max_sessions_per_tenant(std::min(kDefaultMaxSessionsPerTenant, s->max_sessions()));
  }
  if (s->buffer_idle_ttl_ms() == 0) s->set_buffer_idle_ttl_ms(kDefaultBufferIdleTtlMs);
  if (s->max_tokens_per_session() == 0) s->set_max_tokens_per_session(kDefaultMaxTokensPerSession);
  if (!s->has_default_sink_tokens()) s->set_default_sink_tokens(kDefaultSinkTokens);
  if (!s->has_default_recent_tokens()) s->set_default_recent_tokens(kDefaultRecentTokens);
  auto* l = c->mutable_limits();
  if (l->max_receive_message_bytes() == 0)
    l->set_max_receive_message_bytes(kDefaultMaxReceiveBytes);
  if (l->max_inline_bytes() == 0) {
    l->set_max_inline_bytes(std::min(kDefaultMaxInlineBytes, l->max_receive_message_bytes()));
  }
  if (l->max_buffers_per_tenant() == 0) l->set_max_buffers_per_tenant(kDefaultMaxBuffersPerTenant);
  if (l->max_concurrent_calls() == 0) l->set_max_concurrent_calls(kDefaultMaxConcurrentCalls);
  if (l->reserved_calls() == 0) {
    l->set_reserved_calls(
        std::max<uint32_t>(1, std::min<uint32_t>(8, l->max_concurrent_calls() / 2)));
  }
  if (l->max_calls_per_tenant() == 0 && l->max_concurrent_calls() > l->reserved_calls()) {
    l->set_max_calls_per_tenant(
        std::max<uint32_t>(1, (l->max_concurrent_calls() - l->reserved_calls()) / 2));
  }
  auto* m = c->mutable_metrics();
  if (!m->has_port()) m->set_port(kDefaultMetricsPort);
  if (m->address().empty()) m->set_address("127.0.0.1");
  if (c->log_level() == v1::LOG_LEVEL_UNSPECIFIED) c->set_log_level(v1::LOG_LEVEL_INFO);
  if (c->drain_timeout_ms() == 0) c->set_drain_timeout_ms(kDefaultDrainTimeoutMs);
  auto* q = c->mutable_quality();
  if (!q->has_enabled()) q->set_enabled(true);
  if (q->sample_every() == 0) q->set_sample_every(kDefaultQualitySampleEvery);
  if (q->max_sample_every() == 0) {
    q->set_max_sample_every(std::max(kDefaultQualityMaxSampleEvery, q->sample_every()));
  }
  if (!q->has_warmup_samples()) q->set_warmup_samples(kDefaultQualityWarmupSamples);
  if (!q->has_warmup_every()) q->set_warmup_every(kDefaultQualityWarmupEvery);
  if (!q->has_remember_widths()) q->set_remember_widths(kDefaultQualityRememberWidths);
  if (!q->has_seeded_warmup_samples()) {
    q->set_seeded_warmup_samples(std::min(kDefaultQualitySeededWarmupSamples, q->warmup_samples()));
  }
  if (!q->has_exact_cost_ratio()) q->set_exact_cost_ratio(kDefaultQualityExactCostRatio);
  if (!q->has_ranking_duel_samples()) {
    q->set_ranking_duel_samples(kDefaultQualityRankingDuelSamples);
  }
  if (!q->has_method_duel()) q->set_method_duel(kDefaultQualityMethodDuel);
  if (!q->has_pool_widths()) q->set_pool_widths(kDefaultQualityPoolWidths);
  if (!q->has_fair_burst()) q->set_fair_burst(kDefaultQualityFairBurst);
  if (!q->has_carry_steps()) q->set_carry_steps(kDefaultQualityCarrySteps);
  if (q->cpu_share() == 0) q->set_cpu_share(kDefaultQualityCpuShare);
  if (q->queue_capacity() == 0) q->set_queue_capacity(kDefaultQualityQueueCapacity);
  if (!q->has_burst_ms()) q->set_burst_ms(kDefaultQualityBurstMs);
  if (!q->has_default_target_mass_ratio())
    q->set_default_target_mass_ratio(kDefaultTargetMassRatio);
  auto* ring = c->mutable_decode_ring();
  if (!ring->has_max_spin_us()) ring->set_max_spin_us(kDefaultRingMaxSpinUs);
  if (ring->max_spinning_threads() == 0) ring->set_max_spinning_threads(1);
  auto* lanes = c->mutable_decode_lanes();
  if (!lanes->has_spin_us()) lanes->set_spin_us(kDefaultDecodeLaneSpinUs);
  if (c->worker_threads() == 0) {
    const long n = ::sysconf(_SC_NPROCESSORS_ONLN);
    c->set_worker_threads(n > 0 ? static_cast<uint32_t>(n) : 1);
  }
}

absl::Status ValidateConfig(const IcecachedConfig& c) {
  // listen
  const auto& listen = c.listen();
  const std::string& sock = listen.unix_socket();
  if (sock.empty() || sock[0] != '/') {
    return Bad("listen.unix_socket", Quote(sock), "must be an absolute path");
  }
  if (sock.size() > kMaxUnixPath) {
    return Bad("listen.unix_socket", Quote(sock),
               absl::StrCat("longer than ", kMaxUnixPath, " bytes (sun_path limit)"));
  }
  const uint32_t mode = listen.unix_socket_mode();
  if ((mode & ~0777u) != 0 || (mode & 0600u) != 0600u) {
    return Bad("listen.unix_socket_mode", absl::StrFormat("0%o", mode),
               "must be octal 0600..0777 with owner read+write (e.g. 0660 = 432)");
  }
  if (!listen.tcp_address().empty()) {
    absl::Status st = CheckHostPort("listen.tcp_address", listen.tcp_address());
    if (!st.ok()) return st;
    st = CheckReadableFile("listen.tls_cert_file", listen.tls_cert_file());
    if (!st.ok()) return st;
    st = CheckReadableFile("listen.tls_key_file", listen.tls_key_file());
    if (!st.ok()) return st;
  }
  // auth
  const auto& auth = c.auth();
  std::set<uint32_t> uids;
  for (int i = 0; i < auth.uid_tenants_size(); ++i) {
    const auto& m = auth.uid_tenants(i);
    const std::string f = absl::StrCat("auth.uid_tenants[", i, "]");
    if (!IsValidTenantName(m.tenant())) {
      return Bad(f + ".tenant", Quote(m.tenant()), "must be 1..128 bytes of [A-Za-z0-9._@:-]");
    }
    if (!uids.insert(m.uid()).second) return Bad(f + ".uid", m.uid(), "uid listed twice");
  }
  if (auth.no_unix_admins() && auth.admin_uids_size() > 0) {
    return Bad("auth.no_unix_admins", "true",
               "cannot be set together with auth.admin_uids; keep one of them");
  }
  if (!v1::UnmappedUidPolicy_IsValid(auth.unmapped_uid())) {
    return Bad("auth.unmapped_uid", auth.unmapped_uid(), "unknown policy");
  }
  std::set<std::string> tokens;
  for (int i = 0; i < auth.tokens_size(); ++i) {
    const auto& t = auth.tokens(i);
    const std::string f = absl::StrCat("auth.tokens[", i, "]");
    if (t.token().size() < 16) return Bad(f + ".token", "<redacted>", "must be at least 16 bytes");
    for (char ch : t.token()) {
      if (ch <= ' ' || ch == 0x7f) {
        return Bad(f + ".token", "<redacted>", "must not contain spaces or control characters");
      }
    }
    if (!tokens.insert(t.token()).second)
      return Bad(f + ".token", "<redacted>", "token listed twice");
    if (!IsValidTenantName(t.tenant())) {
      return Bad(f + ".tenant", Quote(t.tenant()), "must be 1..128 bytes of [A-Za-z0-9._@:-]");
    }
  }
  // pool
  const auto& pool = c.pool();
  if (pool.capacity_bytes() < 2 * kMiB || pool.capacity_bytes() > kMaxCapacity) {
    return Bad("pool.capacity_bytes", pool.capacity_bytes(), "must be 2 MiB .. 1 TiB");
  }
  if (!(pool.high_watermark() > 0 && pool.high_watermark() <= 1)) {
    return Bad("pool.high_watermark", pool.high_watermark(), "must be in (0, 1]");
  }
  if (pool.has_staging_reserve_bytes()) {
    if (!pool.prefault()) {
      return Bad("pool.staging_reserve_bytes", pool.staging_reserve_bytes(),
                 "needs pool.prefault: true (the reserve is faulted in with the arena)");
    }
    if (pool.staging_reserve_bytes() > pool.capacity_bytes()) {
      return Bad("pool.staging_reserve_bytes", pool.staging_reserve_bytes(),
                 absl::StrCat("must be at most pool.capacity_bytes (", pool.capacity_bytes(), ")"));
    }
  }
  if (pool.has_staging_wait_ms() && pool.staging_wait_ms() > 600000) {
    return Bad("pool.staging_wait_ms", pool.staging_wait_ms(), "must be at most 600000 (10 min)");
  }
  if (!pool.backing_dir().empty() &&
      (pool.backing_dir()[0] != '/' || pool.backing_dir().size() > 200)) {
    return Bad("pool.backing_dir", Quote(pool.backing_dir()),
               "must be an absolute path (a tmpfs or hugetlbfs directory) of at most 200 bytes");
  }
  if (!pool.state_dir().empty()) {
    if (pool.backing_dir().empty()) {
      return Bad("pool.state_dir", Quote(pool.state_dir()),
                 "needs pool.backing_dir (the snapshot it holds is of the file-backed arena)");
    }
    if (pool.state_dir()[0] != '/' || pool.state_dir().size() > 200) {
      return Bad("pool.state_dir", Quote(pool.state_dir()),
                 "must be an absolute path (a tmpfs directory) of at most 200 bytes");
    }
  }
  std::set<std::string> quota_tenants;
  for (int i = 0; i < pool.quotas_size(); ++i) {
    const auto& q = pool.quotas(i);
    const std::string f = absl::StrCat("pool.quotas[", i, "].tenant");
    if (!IsValidTenantName(q.tenant())) {
      return Bad(f, Quote(q.tenant()), "must be 1..128 bytes of [A-Za-z0-9._@:-]");
    }
    if (!quota_tenants.insert(q.tenant()).second) return Bad(f, Quote(q.tenant()), "listed twice");
  }
  // sessions
  const auto& s = c.sessions();
  if (s.max_ttl_ms() < 1000 || s.max_ttl_ms() > uint64_t{365} * 86'400'000) {
    return Bad("sessions.max_ttl_ms", s.max_ttl_ms(), "must be 1000 .. 31536000000 (one year)");
  }
  if (s.default_ttl_ms() < 1000 || s.default_ttl_ms() > s.max_ttl_ms()) {
    return Bad("sessions.default_ttl_ms", s.default_ttl_ms(),
               absl::StrCat("must be 1000 .. sessions.max_ttl_ms (", s.max_ttl_ms(), ")"));
  }
  if (s.reaper_interval_ms() < 1 || s.reaper_interval_ms() > 3'600'000) {
    return Bad("sessions.reaper_interval_ms", s.reaper_interval_ms(), "must be 1 .. 3600000");
  }
  if (s.default_budget_tokens() < 1 || s.default_budget_tokens() > kMaxSelectTokens) {
    return Bad("sessions.default_budget_tokens", s.default_budget_tokens(), "must be 1 .. 1048576");
  }
  if (s.default_sink_tokens() > kMaxSelectTokens) {
    return Bad("sessions.default_sink_tokens", s.default_sink_tokens(), "must be <= 1048576");
  }
  if (s.default_recent_tokens() > kMaxSelectTokens) {
    return Bad("sessions.default_recent_tokens", s.default_recent_tokens(), "must be <= 1048576");
  }
  if (s.max_sessions() < 1 || s.max_sessions() > (1u << 20)) {
    return Bad("sessions.max_sessions", s.max_sessions(), "must be 1 .. 1048576");
  }
  if (s.max_sessions_per_tenant() < 1 || s.max_sessions_per_tenant() > s.max_sessions()) {
    return Bad("sessions.max_sessions_per_tenant", s.max_sessions_per_tenant(),
               "must be 1 .. sessions.max_sessions");
  }
  if (s.buffer_idle_ttl_ms() < 1000 || s.buffer_idle_ttl_ms() > 86'400'000) {
    return Bad("sessions.buffer_idle_ttl_ms", s.buffer_idle_ttl_ms(), "must be 1000 .. 86400000");
  }
  if (s.max_tokens_per_session() < 1 || s.max_tokens_per_session() > (uint64_t{1} << 31)) {
    return Bad("sessions.max_tokens_per_session", s.max_tokens_per_session(),
               "must be 1 .. 2147483648");
  }
  // limits
  const auto& l = c.limits();
  if (l.max_receive_message_bytes() < 4096 || l.max_receive_message_bytes() > (uint64_t{1} << 30)) {
    return Bad("limits.max_receive_message_bytes", l.max_receive_message_bytes(),
               "must be 4096 .. 1073741824");
  }
  if (l.max_inline_bytes() < 1 || l.max_inline_bytes() > l.max_receive_message_bytes()) {
    return Bad("limits.max_inline_bytes", l.max_inline_bytes(),
               "must be 1 .. limits.max_receive_message_bytes");
  }
  if (l.max_buffers_per_tenant() < 1 || l.max_buffers_per_tenant() > 65536) {
    return Bad("limits.max_buffers_per_tenant", l.max_buffers_per_tenant(), "must be 1 .. 65536");
  }
  if (l.max_concurrent_calls() < 2 || l.max_concurrent_calls() > 4096) {
    return Bad("limits.max_concurrent_calls", l.max_concurrent_calls(), "must be 2 .. 4096");
  }
  if (l.reserved_calls() < 1 || l.reserved_calls() >= l.max_concurrent_calls()) {
    return Bad("limits.reserved_calls", l.reserved_calls(),
               "must be 1 .. limits.max_concurrent_calls - 1");
  }
  if (l.max_calls_per_tenant() < 1 ||
      l.max_calls_per_tenant() > l.max_concurrent_calls() - l.reserved_calls()) {
    return Bad("limits.max_calls_per_tenant", l.max_calls_per_tenant(),
               "must be 1 .. limits.max_concurrent_calls - limits.reserved_calls");
  }
  // metrics
  const auto& m = c.metrics();
  if (m.port() > 65535) return Bad("metrics.port", m.port(), "must be 0 (off) .. 65535");
  if (m.address().empty()) return Bad("metrics.address", "\"\"", "must not be empty");
  // quality
  const auto& q = c.quality();
  if (q.sample_every() < 1 || q.sample_every() > (1u << 20)) {
    return Bad("quality.sample_every", q.sample_every(), "must be 1 .. 1048576");
  }
  if (q.max_sample_every() < q.sample_every() || q.max_sample_every() > (1u << 20)) {
    return Bad("quality.max_sample_every", q.max_sample_every(),
               absl::StrCat("must be quality.sample_every (", q.sample_every(), ") .. 1048576"));
  }
  if (!(q.exact_cost_ratio() >= 0 && q.exact_cost_ratio() <= 1000)) {
    return Bad("quality.exact_cost_ratio", q.exact_cost_ratio(),
               "must be 0 (fall back only when the largest width misses) .. 1000");
  }
  if (q.ranking_duel_samples() > (1u << 20)) {
    return Bad("quality.ranking_duel_samples", q.ranking_duel_samples(),
               "must be 0 (off) .. 1048576");
  }
  if (q.carry_steps() > 64) {
    return Bad("quality.carry_steps", q.carry_steps(),
               "must be 0 (every select scans afresh) .. 64");
  }
  if (q.warmup_samples() > (1u << 20)) {
    return Bad("quality.warmup_samples", q.warmup_samples(), "must be <= 1048576");
  }
  if (q.warmup_every() < 1 || q.warmup_every() > 1024) {
    return Bad("quality.warmup_every", q.warmup_every(),
               "must be 1 (every selection of the warm-up) .. 1024");
  }
  if (q.seeded_warmup_samples() > q.warmup_samples()) {
    return Bad("quality.seeded_warmup_samples", q.seeded_warmup_samples(),
               absl::StrCat("must be <= quality.warmup_samples (", q.warmup_samples(), ")"));
  }
  if (!(q.cpu_share() > 0 && q.cpu_share() <= 1)) {
    return Bad("quality.cpu_share", q.cpu_share(),
               "must be in (0, 1] (0.05: the measurements cost at most 5% of selection time)");
  }
  if (q.queue_capacity() < 1 || q.queue_capacity() > 65536) {
    return Bad("quality.queue_capacity", q.queue_capacity(), "must be 1 .. 65536");
  }
  if (q.burst_ms() > 60'000) return Bad("quality.burst_ms", q.burst_ms(), "must be <= 60000");
  if (!(q.default_target_mass_ratio() >= 0 && q.default_target_mass_ratio() <= 1)) {
    return Bad("quality.default_target_mass_ratio", q.default_target_mass_ratio(),
               "must be 0 (fixed width) or in (0, 1]");
  }
  // decode_ring
  const auto& ring = c.decode_ring();
  if (ring.max_spin_us() > 100'000) {
    return Bad("decode_ring.max_spin_us", ring.max_spin_us(),
               "must be <= 100000 (0 = never watch)");
  }
  if (ring.max_spinning_threads() < 1 || ring.max_spinning_threads() > 1024) {
    return Bad("decode_ring.max_spinning_threads", ring.max_spinning_threads(),
               "must be 1 .. 1024 (0 = 1)");
  }
  if (c.decode_lanes().spin_us() > 100'000) {
    return Bad("decode_lanes.spin_us", c.decode_lanes().spin_us(),
               "must be <= 100000 (0 = no watching threads)");
  }
  // top level
  if (!v1::LogLevel_IsValid(c.log_level()) || c.log_level() == v1::LOG_LEVEL_UNSPECIFIED) {
    return Bad("log_level", c.log_level(), "must be DEBUG, INFO, WARN or ERROR");
  }
  if (c.drain_timeout_ms() < 1 || c.drain_timeout_ms() > 600'000) {
    return Bad("drain_timeout_ms", c.drain_timeout_ms(), "must be 1 .. 600000");
  }
  if (c.worker_threads() < 1 || c.worker_threads() > 1024) {
    return Bad("worker_threads", c.worker_threads(), "must be 1 .. 1024 (0 = number of CPUs)");
  }
  return absl::OkStatus();
}

IcecachedConfig RedactSecrets(const IcecachedConfig& config) {
  IcecachedConfig out = config;
  for (auto& t : *out.mutable_auth()->mutable_tokens()) t.set_token("<redacted>");
  return out;
}

}  // namespace icecache::rpc
