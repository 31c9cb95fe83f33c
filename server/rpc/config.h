// Loading, defaulting and validating IcecachedConfig (proto/icecache/v1/
// config.proto). Order at start-up:
//   config = file ? LoadConfigFile(path) : IcecachedConfig()
//   ApplyOverrides(flags, &config)     // flags win over the file
//   ApplyDefaults(&config)             // zeros/unset -> documented defaults
//   ValidateConfig(config)             // every field, message names it
// All functions are thread-compatible pure functions except where noted.
#ifndef ICECACHE_SERVER_RPC_CONFIG_H_
#define ICECACHE_SERVER_RPC_CONFIG_H_

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "icecache/v1/config.pb.h"

namespace icecache::rpc {

using ::icecache::v1::IcecachedConfig;

// Defaults (also documented in config.proto and deploy/icecached.textproto).
inline constexpr uint32_t kDefaultSocketMode = 0660;
inline constexpr uint64_t kDefaultCapacityBytes = uint64_t{4} << 30;
inline constexpr double kDefaultHighWatermark = 0.9;
inline constexpr uint64_t kDefaultTtlMs = 60'000;
inline constexpr uint64_t kDefaultMaxTtlMs = 86'400'000;
inline constexpr uint64_t kDefaultReaperIntervalMs = 1'000;
inline constexpr uint32_t kDefaultBudgetTokens = 256;
inline constexpr uint32_t kDefaultMaxSessions = 4096;
inline constexpr uint32_t kDefaultMaxSessionsPerTenant = 256;
inline constexpr uint64_t kDefaultBufferIdleTtlMs = 300'000;
inline constexpr uint64_t kDefaultMaxTokensPerSession = uint64_t{1} << 24;
inline constexpr uint32_t kDefaultSinkTokens = 4;
inline constexpr uint32_t kDefaultRecentTokens = 0;
inline constexpr uint64_t kDefaultMaxReceiveBytes = uint64_t{64} << 20;
inline constexpr uint64_t kDefaultMaxInlineBytes = uint64_t{16} << 20;
// gRPC reads a whole message before it checks max_receive_message_bytes, so
// a client sending far more would cost the daemon what it sends. The
// server's transport memory (every connection's buffers together) is capped
// at twice the receive limit, at least this much: past it gRPC shrinks its
// flow-control windows and the sender waits (docs/operations.md).
inline constexpr uint64_t kMinTransportQuotaBytes = uint64_t{32} << 20;
inline uint64_t TransportQuotaBytes(uint64_t max_receive_message_bytes) {
  return std::max(kMinTransportQuotaBytes, 2 * max_receive_message_bytes);
}
inline constexpr uint32_t kDefaultMaxBuffersPerTenant = 64;
inline constexpr uint32_t kDefaultMaxConcurrentCalls = 256;
inline constexpr uint32_t kDefaultMetricsPort = 9464;
inline constexpr uint64_t kDefaultDrainTimeoutMs = 10'000;
inline constexpr uint32_t kDefaultQualitySampleEvery = 64;
inline constexpr uint32_t kDefaultQualityMaxSampleEvery = 1024;
inline constexpr uint32_t kDefaultQualityWarmupSamples = 16;
inline constexpr uint32_t kDefaultQualityWarmupEvery = 3;
inline constexpr double kDefaultQualityExactCostRatio = 1.0;
inline constexpr uint32_t kDefaultQualityRankingDuelSamples = 0;  // off (rank7_ranking_duel.md)
inline constexpr uint32_t kDefaultRingMaxSpinUs = 1000;     // decode_ring.max_spin_us (rpc.md)
inline constexpr uint32_t kDefaultDecodeLaneSpinUs = 1000;  // decode_lanes.spin_us
inline constexpr bool kDefaultQualityMethodDuel = true;     // with codes (shadow18_trials.md)
inline constexpr bool kDefaultQualityRememberWidths = true;
inline constexpr bool kDefaultQualityPoolWidths = true;   // pool30_widths.md
inline constexpr bool kDefaultQualityFairBurst = true;    // pool30_widths.md
inline constexpr uint32_t kDefaultQualityCarrySteps = 2;  // carry60.md
inline constexpr uint32_t kDefaultQualitySeededWarmupSamples = 4;
inline constexpr double kDefaultQualityCpuShare = 0.05;
inline constexpr uint32_t kDefaultQualityQueueCapacity = 64;
inline constexpr uint64_t kDefaultQualityBurstMs = 250;
inline constexpr double kDefaultTargetMassRatio = 0.95;

// Parses textproto. InvalidArgument naming the line and column of the first
// error (unknown fields are errors). A field given twice: the last value wins;
// a message given twice (e.g. two "pool { ... }" blocks) is merged.
absl::StatusOr<IcecachedConfig> ParseConfigText(absl::string_view text);
// Reads and parses a file. NotFound when it does not exist, PermissionDenied
// when it cannot be read, InvalidArgument on a syntax error (the message
// starts with the path).
absl::StatusOr<IcecachedConfig> LoadConfigFile(const std::string& path);

// Values from command-line flags; set fields replace the file's.
struct ConfigOverrides {
  std::optional<std::string> socket;
  std::optional<uint32_t> metrics_port;
  std::optional<uint64_t> capacity_bytes;
  std::optional<std::string> log_level;  // debug|info|warn|error
  std::optional<uint64_t> reaper_interval_ms;
  std::optional<uint64_t> drain_timeout_ms;
  std::optional<uint64_t> default_ttl_ms;
  std::optional<std::string> tcp_address;
  std::optional<uint32_t> worker_threads;
  std::optional<bool> pool_prefault;
};
// InvalidArgument for an unknown log level (message names --log_level).
absl::Status ApplyOverrides(const ConfigOverrides& overrides, IcecachedConfig* config);

// Replaces every zero/unset field that has a default with the default
// (including the socket path: DaemonDefaultSocketPath(), common/socket_path.h).
void ApplyDefaults(IcecachedConfig* config);

// Checks every field of a defaulted config. InvalidArgument whose message
// starts with "config: <field path> = <value>: " and says what is allowed.
// Also checks that TLS files are readable when the TCP listener is on.
absl::Status ValidateConfig(const IcecachedConfig& config);

// A copy with bearer tokens replaced by "<redacted>".
IcecachedConfig RedactSecrets(const IcecachedConfig& config);

// Tenant names: 1..128 bytes of [A-Za-z0-9._@:-] (the core's rule).
bool IsValidTenantName(absl::string_view tenant);

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_CONFIG_H_
