// icecachectl against a live daemon: every command's table and --json
// output, and the documented exit codes.
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;

class IcecachectlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Every selection of the warm-up measured (SessionsShowReportsQuality
    // AndWidths counts them).
    auto d = StartDaemon("quality { warmup_every: 1 }\n");
    ASSERT_THAT(d, IsOk());
    daemon_ = *std::move(d);
    auto c = Connect(*daemon_);
    ASSERT_THAT(c, IsOk());
    client_ = *std::move(c);
  }
  CommandResult Ctl(std::vector<std::string> args, int uid = -1) {
    args.insert(args.begin(), {IcecachectlPath(), "--socket", daemon_->socket_path()});
    auto r = RunCommand(args, uid);
    EXPECT_THAT(r, IsOk());
    return r.ok() ? *r : CommandResult{};
  }
  // Parses --json output into a protobuf Value.
  google::protobuf::Value Json(const CommandResult& r) {
    google::protobuf::Value v;
    EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(r.out, &v).ok()) << r.out;
    return v;
  }
  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> client_;
};

TEST_F(IcecachectlTest, TablesAndJsonAgainstALiveDaemon) {
  TestModel m = MakeModel(1, 2, 128, 1);
  auto s = client_->CreateSession(m.spec);
  ASSERT_THAT(s, IsOk());
  ASSERT_THAT(client_->AppendKvInline(s->id, m.kv.Chunk(0, 128), 128), IsOk());

  CommandResult r = Ctl({"health"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "SERVING\n");

  r = Ctl({"sessions", "list"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("ID"));
  EXPECT_THAT(r.out, HasSubstr(s->id));
  EXPECT_THAT(r.out, HasSubstr("alpha"));
  EXPECT_THAT(r.out, HasSubstr("float16"));

  r = Ctl({"--json", "sessions", "list"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  google::protobuf::Value v = Json(r);
  ASSERT_EQ(v.kind_case(), google::protobuf::Value::kListValue);
  ASSERT_EQ(v.list_value().values_size(), 1);
  const auto& f = v.list_value().values(0).struct_value().fields();
  EXPECT_EQ(f.at("session_id").string_value(), s->id);
  EXPECT_EQ(f.at("tenant").string_value(), "alpha");
  EXPECT_EQ(f.at("tokens").number_value(), 128);
  EXPECT_EQ(f.at("kv_heads").number_value(), 2);
  EXPECT_GT(f.at("bytes").number_value(), 0);

  r = Ctl({"sessions", "show", s->id});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, MatchesRegex("(.|\n)*tokens +128\n(.|\n)*"));
  r = Ctl({"--json", "sessions", "show", s->id});
  EXPECT_EQ(Json(r).struct_value().fields().at("tokens").number_value(), 128);

  r = Ctl({"sessions", "pin", s->id});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(client_->GetSession(s->id).value().pinned);
  r = Ctl({"--json", "sessions", "pin", s->id, "--unpin"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(Json(r).struct_value().fields().at("pinned").bool_value());

  r = Ctl({"stats"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("capacity"));
  EXPECT_THAT(r.out, HasSubstr("gpu direct reads"));
  r = Ctl({"--json", "stats"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  v = Json(r);
  EXPECT_EQ(v.struct_value().fields().at("sessions").number_value(), 1);
  EXPECT_EQ(v.struct_value().fields().at("gpu_pushes_staged").number_value(), 0);
  EXPECT_EQ(v.struct_value().fields().at("capacity_bytes").number_value(), 268435456);

  r = Ctl({"status"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("SERVING"));
  r = Ctl({"--json", "status"});
  EXPECT_EQ(Json(r).struct_value().fields().at("health").string_value(), "SERVING");

  r = Ctl({"quota", "set", "alpha", "64M"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("64.0 MiB"));
  r = Ctl({"--json", "tenants"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  v = Json(r);
  bool found = false;
  for (const auto& t : v.list_value().values()) {
    if (t.struct_value().fields().at("tenant").string_value() != "alpha") continue;
    found = true;
    EXPECT_EQ(t.struct_value().fields().at("quota_bytes").number_value(), 64 << 20);
    EXPECT_EQ(t.struct_value().fields().at("sessions").number_value(), 1);
  }
  EXPECT_TRUE(found) << r.out;
  r = Ctl({"tenants"});
  EXPECT_THAT(r.out, HasSubstr("TENANT"));

  r = Ctl({"config"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("capacity_bytes: 268435456"));
  r = Ctl({"--json", "config"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Json(r).kind_case(), google::protobuf::Value::kStructValue);

  r = Ctl({"evict", s->id});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(client_->GetSession(s->id), StatusIs(absl::StatusCode::kNotFound));

  auto s2 = client_->CreateSession(m.spec);
  ASSERT_THAT(s2, IsOk());
  r = Ctl({"--json", "sessions", "drop", s2->id});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Json(r).struct_value().fields().at("dropped").string_value(), s2->id);

  r = Ctl({"--json", "drain"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(Json(r).struct_value().fields().at("draining").bool_value());
  r = Ctl({"health"});
  EXPECT_EQ(r.out, "NOT_SERVING\n");
  EXPECT_EQ(r.exit_code, 5);
  EXPECT_THAT(client_->CreateSession(m.spec), StatusIs(absl::StatusCode::kUnavailable));
}

// `sessions show` of an MDCI session: the quality monitor's rows (target,
// samples, ratios, width per head) and the per-head table; --json carries
// every head.
TEST_F(IcecachectlTest, SessionsShowReportsQualityAndWidths) {
  TestModel m = MakeModel(1, 2, 2048, 4, SelectorType::kMdci);
  auto s = client_->CreateSession(m.spec);
  ASSERT_THAT(s, IsOk());
  ASSERT_THAT(client_->AppendKvInline(s->id, m.kv.Chunk(0, 2048), 2048), IsOk());
  for (int step = 0; step < 4; ++step) {
    ASSERT_THAT(client_->SelectPages(s->id, 0, Queries(m, step, 0)), IsOk());
  }
  // The measurements run on the daemon's background thread. Every one of the
  // 8 selections (2 heads x 4 steps, all in the warm-up) is measured, or was
  // made exactly (the exact fallback: at 2048 tokens the tree may cost about
  // what the exact scan does, which thread CPU time decides).
  auto accounted = [&](uint64_t* samples) {
    const SessionQuality q = client_->GetSession(s->id).value().quality;
    uint64_t exact = 0;
    for (const HeadQuality& h : q.heads) exact += h.exact_selections;
    *samples = q.samples;
    return q.samples + exact;
  };
  uint64_t samples = 0;
  for (int i = 0; i < 1000 && accounted(&samples) < 8; ++i) usleep(10000);
  ASSERT_EQ(accounted(&samples), 8u);
  EXPECT_GE(samples, 2u);  // at least each head's first selection
  // Three decode tokens: 3 x 2 trees' keys inserted one at a time.
  for (int t = 0; t < 3; ++t) {
    ASSERT_THAT(client_->AppendKvInline(s->id, m.kv.Chunk(t, t + 1), 1), IsOk());
  }
  CommandResult r = Ctl({"sessions", "show", s->id});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("target mass ratio  0.950 (width calibrated)"));
  // MDCI's default product-quantised codes (pq_factor unset: 8).
  EXPECT_THAT(r.out, HasSubstr("tree descent or PQ scan per head (pq_factor 8)"));
  EXPECT_THAT(r.out, HasSubstr(absl::StrCat("samples            ", samples,
                                            " measured, 0 dropped, 0 stale")));
  EXPECT_THAT(r.out, HasSubstr("mass ratio"));
  // Both heads took their first selection's sample.
  EXPECT_THAT(r.out, HasSubstr("heads sampled      2 of 2 (samples per head: "));
  EXPECT_THAT(r.out, HasSubstr("width per head"));
  EXPECT_THAT(r.out, HasSubstr("GROUP  KV_HEAD  MODE"));
  EXPECT_THAT(r.out, HasSubstr("RANKING"));
  EXPECT_THAT(r.out, ::testing::ContainsRegex("loudest|normalized"));
  EXPECT_THAT(r.out, ::testing::ContainsRegex(
                         "decode keys +6 inserted, [0-9]+% joined a recent node unrouted"));
  // The default carry-over (quality.carry_steps 2): the session's pooled
  // judgement has samples, so the row says how far unjudged heads carry.
  EXPECT_THAT(r.out, ::testing::ContainsRegex("carry-over +[0-9]+ of 2 heads carry, [0-9]+ "
                                              "stopped; [0-9]+ selections carried; unjudged "
                                              "heads carry [12] steps?"));
  r = Ctl({"--json", "sessions", "show", s->id});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const google::protobuf::Value shown = Json(r);
  EXPECT_EQ(shown.struct_value().fields().at("mdci_pq_factor").number_value(), 8.0);
  EXPECT_EQ(shown.struct_value().fields().at("decode_keys").number_value(), 6.0);
  EXPECT_LE(shown.struct_value().fields().at("decode_keys_unrouted").number_value(), 6.0);
  const auto& q = shown.struct_value().fields().at("quality").struct_value().fields();
  EXPECT_TRUE(q.at("monitored").bool_value());
  EXPECT_EQ(q.at("samples").number_value(), static_cast<double>(samples));
  EXPECT_DOUBLE_EQ(q.at("target_mass_ratio").number_value(), 0.95);
  EXPECT_GE(q.at("carry_pool_steps").number_value(), 1.0);
  EXPECT_LE(q.at("carry_pool_steps").number_value(), 2.0);
  EXPECT_GT(q.at("mean_mass_ratio").number_value(), 0);
  ASSERT_EQ(q.at("heads").list_value().values_size(), 2);
  // A head starts at width 1 and may settle as low as 0.5
  // (CalibratorOptions::min_width).
  EXPECT_GE(q.at("heads").list_value().values(1).struct_value().fields().at("width").number_value(),
            0.5);
  const std::string mode =
      q.at("heads").list_value().values(1).struct_value().fields().at("mode").string_value();
  EXPECT_TRUE(mode == "tree" || mode == "exact") << mode;
}

TEST_F(IcecachectlTest, ExitCodesMeanWhatHelpSays) {
  CommandResult r = Ctl({"--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.out, HasSubstr("Exit codes"));
  EXPECT_EQ(Ctl({}).exit_code, 2);
  EXPECT_EQ(Ctl({"frobnicate"}).exit_code, 2);
  EXPECT_EQ(Ctl({"sessions", "show"}).exit_code, 2);
  EXPECT_EQ(Ctl({"quota", "set", "alpha", "lots"}).exit_code, 2);
  EXPECT_EQ(Ctl({"--bogus", "stats"}).exit_code, 2);
  r = Ctl({"sessions", "show", "no-such-session"});
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_THAT(r.err, HasSubstr("NOT_FOUND"));
  EXPECT_EQ(Ctl({"sessions", "drop", "no-such-session"}).exit_code, 3);
  EXPECT_EQ(Ctl({"evict", "no-such-session"}).exit_code, 3);
  if (::geteuid() == 0) {
    // uid 65534 is tenant "beta" without the admin role.
    r = Ctl({"tenants"}, kOtherUid);
    EXPECT_EQ(r.exit_code, 4) << r.err;
    EXPECT_THAT(r.err, HasSubstr("PERMISSION_DENIED"));
    EXPECT_EQ(Ctl({"stats"}, kOtherUid).exit_code, 4);
    r = Ctl({"--json", "sessions", "list"}, kOtherUid);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, "[]\n");
  }
  // No daemon at that socket.
  auto gone = RunCommand({IcecachectlPath(), "--socket", daemon_->temp_dir() + "/nothing.sock",
                          "--timeout", "2", "health"});
  ASSERT_THAT(gone, IsOk());
  EXPECT_EQ(gone->exit_code, 5) << gone->err;
}

}  // namespace
}  // namespace icecache::testing
