#include "server/rpc/config.h"

#include <stdlib.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <string>

#include "common/socket_path.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache::rpc {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

IcecachedConfig Defaulted(IcecachedConfig c = {}) {
  ApplyDefaults(&c);
  return c;
}

TEST(ConfigTest, DefaultsWithoutAFileAreValid) {
  const IcecachedConfig c = Defaulted();
  EXPECT_THAT(ValidateConfig(c), IsOk());
  EXPECT_EQ(c.listen().unix_socket_mode(), 0660u);
  EXPECT_EQ(c.pool().capacity_bytes(), kDefaultCapacityBytes);
  EXPECT_EQ(c.metrics().port(), kDefaultMetricsPort);
  EXPECT_EQ(c.metrics().address(), "127.0.0.1");
  EXPECT_EQ(c.sessions().default_sink_tokens(), kDefaultSinkTokens);
  EXPECT_EQ(c.auth().unmapped_uid(), v1::UNMAPPED_UID_POLICY_TENANT_PER_UID);
  EXPECT_EQ(c.log_level(), v1::LOG_LEVEL_INFO);
  EXPECT_GE(c.worker_threads(), 1u);
  EXPECT_FALSE(c.listen().unix_socket().empty());
  EXPECT_TRUE(c.quality().enabled());
  EXPECT_EQ(c.quality().sample_every(), kDefaultQualitySampleEvery);
  EXPECT_EQ(c.quality().max_sample_every(), kDefaultQualityMaxSampleEvery);
  EXPECT_DOUBLE_EQ(c.quality().exact_cost_ratio(), kDefaultQualityExactCostRatio);
  EXPECT_EQ(c.quality().ranking_duel_samples(), kDefaultQualityRankingDuelSamples);
  EXPECT_EQ(c.quality().method_duel(), kDefaultQualityMethodDuel);
  EXPECT_EQ(c.quality().carry_steps(), kDefaultQualityCarrySteps);
  EXPECT_EQ(c.quality().warmup_samples(), kDefaultQualityWarmupSamples);
  EXPECT_DOUBLE_EQ(c.quality().cpu_share(), kDefaultQualityCpuShare);
  EXPECT_DOUBLE_EQ(c.quality().default_target_mass_ratio(), kDefaultTargetMassRatio);
  EXPECT_EQ(c.decode_ring().max_spin_us(), kDefaultRingMaxSpinUs);
  EXPECT_EQ(c.decode_ring().max_spinning_threads(), 1u);
  EXPECT_EQ(c.decode_lanes().spin_us(), kDefaultDecodeLaneSpinUs);
}

TEST(ConfigTest, ExplicitZerosForOptionalFieldsSurviveDefaults) {
  IcecachedConfig c;
  c.mutable_metrics()->set_port(0);
  c.mutable_sessions()->set_default_sink_tokens(0);
  c = Defaulted(c);
  EXPECT_EQ(c.metrics().port(), 0u);  // 0 = metrics off, not "default"
  EXPECT_EQ(c.sessions().default_sink_tokens(), 0u);
  IcecachedConfig q;
  q.mutable_quality()->set_enabled(false);
  q.mutable_quality()->set_warmup_samples(0);
  q.mutable_quality()->set_default_target_mass_ratio(0);
  q.mutable_quality()->set_method_duel(false);
  q.mutable_decode_ring()->set_max_spin_us(0);
  q.mutable_decode_lanes()->set_spin_us(0);
  q = Defaulted(q);
  EXPECT_EQ(q.decode_ring().max_spin_us(), 0u);  // never watch
  EXPECT_EQ(q.decode_lanes().spin_us(), 0u);     // oneTBB's pool
  EXPECT_FALSE(q.quality().method_duel());
  EXPECT_FALSE(q.quality().enabled());
  EXPECT_EQ(q.quality().warmup_samples(), 0u);
  EXPECT_DOUBLE_EQ(q.quality().default_target_mass_ratio(), 0.0);  // fixed width
}

TEST(ConfigTest, ParsesTextprotoAndReportsErrorsWithLine) {
  auto c =
      ParseConfigText("listen { unix_socket: \"/tmp/a.sock\" }\npool { capacity_bytes: 8388608 }");
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->listen().unix_socket(), "/tmp/a.sock");
  EXPECT_EQ(c->pool().capacity_bytes(), 8388608u);

  EXPECT_THAT(ParseConfigText("pool {\n  capcity_bytes: 1\n}"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::AllOf(HasSubstr("line 2"), HasSubstr("capcity_bytes"))));
  EXPECT_THAT(ParseConfigText("pool { capacity_bytes: -1 }"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("line 1")));
}

TEST(ConfigTest, RepeatedBlocksMergeAndLastValueWins) {
  auto c = ParseConfigText(
      "pool { capacity_bytes: 8388608 }\n"
      "pool { high_watermark: 0.5 }\n"
      "log_level: LOG_LEVEL_DEBUG\nlog_level: LOG_LEVEL_WARN\n");
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->pool().capacity_bytes(), 8388608u);
  EXPECT_EQ(c->pool().high_watermark(), 0.5);
  EXPECT_EQ(c->log_level(), v1::LOG_LEVEL_WARN);
}

TEST(ConfigTest, OctalSocketModeParses) {
  auto c = ParseConfigText("listen { unix_socket_mode: 0640 }");
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->listen().unix_socket_mode(), 0640u);
}

TEST(ConfigTest, LoadFileErrors) {
  EXPECT_THAT(LoadConfigFile("/nonexistent/icecached.textproto"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("/nonexistent/icecached.textproto")));
  std::string path = ::icecache::testing::TempPathTemplate("icecache_cfg_");
  const int fd = mkstemp(path.data());
  ASSERT_GE(fd, 0);
  const std::string bad = "log_level: LOUD\n";
  ASSERT_EQ(write(fd, bad.data(), bad.size()), static_cast<ssize_t>(bad.size()));
  close(fd);
  EXPECT_THAT(LoadConfigFile(path),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::AllOf(HasSubstr(path), HasSubstr("line "), HasSubstr("LOUD"))));
  unlink(path.c_str());
}

TEST(ConfigTest, ShippedExampleConfigIsValid) {
  auto c = LoadConfigFile(ICECACHE_SOURCE_DIR "/deploy/icecached.textproto");
  ASSERT_THAT(c, IsOk());
  IcecachedConfig d = *c;
  ApplyDefaults(&d);
  EXPECT_THAT(ValidateConfig(d), IsOk());
  EXPECT_EQ(d.listen().unix_socket_mode(), 0660u);
  EXPECT_EQ(d.pool().capacity_bytes(), kDefaultCapacityBytes);
}

// The shipped example states the quality section the daemon runs with by
// default (the in-process decode benchmark takes those defaults too,
// quality_options.h): a default changed in one place and not the other
// fails here.
TEST(ConfigTest, ShippedExampleQualitySectionIsTheDefault) {
  auto c = LoadConfigFile(ICECACHE_SOURCE_DIR "/deploy/icecached.textproto");
  ASSERT_THAT(c, IsOk());
  IcecachedConfig shipped = *c;
  ApplyDefaults(&shipped);
  IcecachedConfig defaults;
  ApplyDefaults(&defaults);
  EXPECT_EQ(shipped.quality().SerializeAsString(), defaults.quality().SerializeAsString())
      << "deploy/icecached.textproto quality:\n"
      << shipped.quality().DebugString() << "defaults:\n"
      << defaults.quality().DebugString();
}

// Each case breaks one field; the error must name it.
struct BadCase {
  std::string field;
  std::function<void(IcecachedConfig*)> breaker;
};

TEST(ConfigTest, EveryBadFieldIsNamed) {
  const std::vector<BadCase> cases = {
      {"listen.unix_socket",
       [](auto* c) { c->mutable_listen()->set_unix_socket("relative.sock"); }},
      {"listen.unix_socket",
       [](auto* c) { c->mutable_listen()->set_unix_socket("/" + std::string(200, 'a')); }},
      {"listen.unix_socket_mode",
       [](auto* c) { c->mutable_listen()->set_unix_socket_mode(01777); }},
      {"listen.unix_socket_mode", [](auto* c) { c->mutable_listen()->set_unix_socket_mode(0060); }},
      {"listen.tcp_address", [](auto* c) { c->mutable_listen()->set_tcp_address("nohostport"); }},
      {"listen.tcp_address",
       [](auto* c) { c->mutable_listen()->set_tcp_address("0.0.0.0:99999"); }},
      {"listen.tls_cert_file",
       [](auto* c) { c->mutable_listen()->set_tcp_address("0.0.0.0:50051"); }},
      {"listen.tls_key_file",
       [](auto* c) {
         c->mutable_listen()->set_tcp_address("0.0.0.0:50051");
         c->mutable_listen()->set_tls_cert_file(ICECACHE_SOURCE_DIR "/deploy/icecached.textproto");
         c->mutable_listen()->set_tls_key_file("/nonexistent.key");
       }},
      {"auth.uid_tenants[0].tenant",
       [](auto* c) {
         auto* m = c->mutable_auth()->add_uid_tenants();
         m->set_uid(5);
         m->set_tenant("bad tenant");
       }},
      {"auth.uid_tenants[1].uid",
       [](auto* c) {
         for (int i = 0; i < 2; ++i) {
           auto* m = c->mutable_auth()->add_uid_tenants();
           m->set_uid(7);
           m->set_tenant("t" + std::to_string(i));
         }
       }},
      {"auth.unmapped_uid",
       [](auto* c) { c->mutable_auth()->set_unmapped_uid(static_cast<v1::UnmappedUidPolicy>(9)); }},
      {"auth.tokens[0].token",
       [](auto* c) {
         auto* t = c->mutable_auth()->add_tokens();
         t->set_token("short");
         t->set_tenant("a");
       }},
      {"auth.tokens[0].tenant",
       [](auto* c) {
         auto* t = c->mutable_auth()->add_tokens();
         t->set_token("0123456789abcdef0123");
         t->set_tenant("");
       }},
      {"auth.tokens[1].token",
       [](auto* c) {
         for (int i = 0; i < 2; ++i) {
           auto* t = c->mutable_auth()->add_tokens();
           t->set_token("0123456789abcdef0123");
           t->set_tenant("a");
         }
       }},
      {"pool.capacity_bytes", [](auto* c) { c->mutable_pool()->set_capacity_bytes(1024); }},
      {"pool.capacity_bytes",
       [](auto* c) { c->mutable_pool()->set_capacity_bytes(uint64_t{1} << 41); }},
      {"pool.high_watermark", [](auto* c) { c->mutable_pool()->set_high_watermark(1.5); }},
      {"pool.high_watermark", [](auto* c) { c->mutable_pool()->set_high_watermark(-0.1); }},
      {"pool.staging_reserve_bytes",  // without prefault
       [](auto* c) { c->mutable_pool()->set_staging_reserve_bytes(uint64_t{1} << 20); }},
      {"pool.staging_reserve_bytes",  // beyond the pool
       [](auto* c) {
         c->mutable_pool()->set_prefault(true);
         c->mutable_pool()->set_staging_reserve_bytes(uint64_t{1} << 40);
       }},
      {"pool.staging_wait_ms", [](auto* c) { c->mutable_pool()->set_staging_wait_ms(600001); }},
      {"pool.backing_dir", [](auto* c) { c->mutable_pool()->set_backing_dir("relative/dir"); }},
      {"pool.state_dir", [](auto* c) { c->mutable_pool()->set_state_dir("/dev/shm/state"); }},
      {"pool.state_dir",
       [](auto* c) {
         c->mutable_pool()->set_backing_dir("/dev/shm/arena");
         c->mutable_pool()->set_state_dir("state");
       }},
      {"pool.quotas[1].tenant",
       [](auto* c) {
         for (int i = 0; i < 2; ++i) c->mutable_pool()->add_quotas()->set_tenant("dup");
       }},
      {"sessions.max_ttl_ms", [](auto* c) { c->mutable_sessions()->set_max_ttl_ms(5); }},
      {"sessions.default_ttl_ms",
       [](auto* c) {
         c->mutable_sessions()->set_max_ttl_ms(10000);
         c->mutable_sessions()->set_default_ttl_ms(20000);
       }},
      {"sessions.reaper_interval_ms",
       [](auto* c) { c->mutable_sessions()->set_reaper_interval_ms(7'200'000); }},
      {"sessions.default_budget_tokens",
       [](auto* c) { c->mutable_sessions()->set_default_budget_tokens(1u << 25); }},
      {"sessions.default_sink_tokens",
       [](auto* c) { c->mutable_sessions()->set_default_sink_tokens(1u << 25); }},
      {"sessions.default_recent_tokens",
       [](auto* c) { c->mutable_sessions()->set_default_recent_tokens(1u << 25); }},
      {"sessions.max_sessions", [](auto* c) { c->mutable_sessions()->set_max_sessions(1u << 21); }},
      {"sessions.max_sessions_per_tenant",
       [](auto* c) {
         c->mutable_sessions()->set_max_sessions(10);
         c->mutable_sessions()->set_max_sessions_per_tenant(11);
       }},
      {"sessions.buffer_idle_ttl_ms",
       [](auto* c) { c->mutable_sessions()->set_buffer_idle_ttl_ms(10); }},
      {"sessions.max_tokens_per_session",
       [](auto* c) { c->mutable_sessions()->set_max_tokens_per_session(uint64_t{1} << 40); }},
      {"limits.max_receive_message_bytes",
       [](auto* c) { c->mutable_limits()->set_max_receive_message_bytes(100); }},
      {"limits.max_inline_bytes",
       [](auto* c) {
         c->mutable_limits()->set_max_receive_message_bytes(8192);
         c->mutable_limits()->set_max_inline_bytes(16384);
       }},
      {"limits.max_buffers_per_tenant",
       [](auto* c) { c->mutable_limits()->set_max_buffers_per_tenant(100000); }},
      {"limits.max_concurrent_calls",
       [](auto* c) { c->mutable_limits()->set_max_concurrent_calls(1); }},
      {"limits.reserved_calls", [](auto* c) { c->mutable_limits()->set_reserved_calls(256); }},
      {"limits.max_calls_per_tenant",
       [](auto* c) { c->mutable_limits()->set_max_calls_per_tenant(250); }},
      {"metrics.port", [](auto* c) { c->mutable_metrics()->set_port(70000); }},
      {"log_level", [](auto* c) { c->set_log_level(static_cast<v1::LogLevel>(42)); }},
      {"drain_timeout_ms", [](auto* c) { c->set_drain_timeout_ms(700'000); }},
      {"worker_threads", [](auto* c) { c->set_worker_threads(5000); }},
      {"quality.sample_every", [](auto* c) { c->mutable_quality()->set_sample_every(1u << 21); }},
      {"quality.warmup_samples",
       [](auto* c) { c->mutable_quality()->set_warmup_samples(1u << 21); }},
      {"quality.exact_cost_ratio", [](auto* c) { c->mutable_quality()->set_exact_cost_ratio(-1); }},
      {"quality.ranking_duel_samples",
       [](auto* c) { c->mutable_quality()->set_ranking_duel_samples(1u << 21); }},
      {"quality.carry_steps", [](auto* c) { c->mutable_quality()->set_carry_steps(65); }},
      {"quality.warmup_every", [](auto* c) { c->mutable_quality()->set_warmup_every(0); }},
      {"quality.warmup_every", [](auto* c) { c->mutable_quality()->set_warmup_every(1025); }},
      {"quality.max_sample_every",
       [](auto* c) {
         c->mutable_quality()->set_sample_every(128);
         c->mutable_quality()->set_max_sample_every(64);
       }},
      {"quality.cpu_share", [](auto* c) { c->mutable_quality()->set_cpu_share(1.5); }},
      {"quality.cpu_share", [](auto* c) { c->mutable_quality()->set_cpu_share(-0.1); }},
      {"quality.queue_capacity", [](auto* c) { c->mutable_quality()->set_queue_capacity(100000); }},
      {"quality.burst_ms", [](auto* c) { c->mutable_quality()->set_burst_ms(61'000); }},
      {"quality.default_target_mass_ratio",
       [](auto* c) { c->mutable_quality()->set_default_target_mass_ratio(1.01); }},
      {"decode_ring.max_spin_us",
       [](auto* c) { c->mutable_decode_ring()->set_max_spin_us(100'001); }},
      {"decode_ring.max_spinning_threads",
       [](auto* c) { c->mutable_decode_ring()->set_max_spinning_threads(1025); }},
      {"decode_lanes.spin_us", [](auto* c) { c->mutable_decode_lanes()->set_spin_us(100'001); }},
  };
  for (const BadCase& bc : cases) {
    IcecachedConfig c;
    bc.breaker(&c);
    ApplyDefaults(&c);
    EXPECT_THAT(ValidateConfig(c), StatusIs(absl::StatusCode::kInvalidArgument,
                                            HasSubstr("config: " + bc.field + " = ")))
        << bc.field;
  }
}

TEST(ConfigTest, TokensAreNeverEchoedInErrorsOrGetConfig) {
  IcecachedConfig c;
  auto* t = c.mutable_auth()->add_tokens();
  t->set_token("secret-secret-secret");
  t->set_tenant("has space");
  ApplyDefaults(&c);
  const absl::Status st = ValidateConfig(c);
  EXPECT_THAT(st, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(std::string(st.message()), ::testing::Not(HasSubstr("secret")));
  const IcecachedConfig r = RedactSecrets(c);
  EXPECT_EQ(r.auth().tokens(0).token(), "<redacted>");
  EXPECT_EQ(r.auth().tokens(0).tenant(), "has space");
  EXPECT_EQ(c.auth().tokens(0).token(), "secret-secret-secret");  // original untouched
}

TEST(ConfigTest, OverridesReplaceFileValues) {
  IcecachedConfig c;
  c.mutable_listen()->set_unix_socket("/from/file.sock");
  c.mutable_metrics()->set_port(1234);
  ConfigOverrides o;
  o.socket = "/from/flag.sock";
  o.metrics_port = 0;
  o.capacity_bytes = uint64_t{64} << 20;
  o.reaper_interval_ms = 50;
  o.log_level = "warn";
  ASSERT_THAT(ApplyOverrides(o, &c), IsOk());
  EXPECT_EQ(c.listen().unix_socket(), "/from/flag.sock");
  EXPECT_TRUE(c.metrics().has_port());
  EXPECT_EQ(c.metrics().port(), 0u);
  EXPECT_EQ(c.pool().capacity_bytes(), uint64_t{64} << 20);
  EXPECT_EQ(c.sessions().reaper_interval_ms(), 50u);
  EXPECT_EQ(c.log_level(), v1::LOG_LEVEL_WARN);
  ApplyDefaults(&c);
  EXPECT_EQ(c.metrics().port(), 0u);
  EXPECT_THAT(ValidateConfig(c), IsOk());

  ConfigOverrides bad;
  bad.log_level = "chatty";
  EXPECT_THAT(ApplyOverrides(bad, &c),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--log_level")));
}

TEST(ConfigTest, DefaultSocketPathFallsBackToXdgRuntimeDir) {
  if (access("/run/icecache", W_OK | X_OK) == 0) {
    GTEST_SKIP() << "/run/icecache is writable here; the first choice wins";
  }
  std::string dir = ::icecache::testing::TempPathTemplate("icecache_xdg_");
  ASSERT_NE(mkdtemp(dir.data()), nullptr);
  const char* old = getenv("XDG_RUNTIME_DIR");
  const std::string saved = old ? old : "";
  setenv("XDG_RUNTIME_DIR", dir.c_str(), 1);
  EXPECT_EQ(DaemonDefaultSocketPath(), std::string(dir) + "/icecached.sock");
  setenv("XDG_RUNTIME_DIR", "/nonexistent-dir", 1);
  EXPECT_EQ(DaemonDefaultSocketPath(), "/tmp/icecached-" + std::to_string(getuid()) + ".sock");
  if (old)
    setenv("XDG_RUNTIME_DIR", saved.c_str(), 1);
  else
    unsetenv("XDG_RUNTIME_DIR");
  rmdir(dir.c_str());
}

TEST(ConfigTest, TenantNames) {
  EXPECT_TRUE(IsValidTenantName("inference-a"));
  EXPECT_TRUE(IsValidTenantName("uid-1000"));
  EXPECT_TRUE(IsValidTenantName("svc@host:1.x_y"));
  EXPECT_FALSE(IsValidTenantName(""));
  EXPECT_FALSE(IsValidTenantName("a b"));
  EXPECT_FALSE(IsValidTenantName("a/b"));
  EXPECT_FALSE(IsValidTenantName(std::string(129, 'a')));
  EXPECT_TRUE(IsValidTenantName(std::string(128, 'a')));
}

}  // namespace
}  // namespace icecache::rpc
