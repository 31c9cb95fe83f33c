// The online quality monitor and the self-calibrating width through the
// daemon: in-process icecached on a real Unix socket, real gRPC (generated
// stubs; the C++ client's types share names with the core's), a real shm
// buffer, generated KV data, and the /metrics endpoint over HTTP.
#include <grpcpp/grpcpp.h>
#include <httplib.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/shm_file.h"
#include "common/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "icecache/v1/buffer.grpc.pb.h"
#include "icecache/v1/kv.grpc.pb.h"
#include "icecache/v1/session.grpc.pb.h"
#include "server/rpc/config.h"
#include "server/rpc/daemon.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache::rpc {
namespace {

using ::icecache::testing::IsOk;
using ::testing::HasSubstr;

class QualityRpcTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::icecache::testing::TempPathTemplate("icecache_qt_");
    dir_ = mkdtemp(tmpl.data());
    // Every chosen step is measured (cpu_share 1, a large burst): the test
    // checks what the monitor reports, not the budget (quality_sampler_test).
    auto parsed = ParseConfigText(
        "quality { warmup_samples: 24 warmup_every: 1 sample_every: 4 max_sample_every: 4 "
        "cpu_share: 1 "
        "burst_ms: 60000 exact_cost_ratio: 0 " +
        QualityExtra() + " }");
    ASSERT_THAT(parsed, IsOk());
    IcecachedConfig c = *parsed;
    c.mutable_listen()->set_unix_socket(dir_ + "/d.sock");
    c.mutable_pool()->set_capacity_bytes(256 << 20);
    c.mutable_metrics()->set_port(0);
    c.set_worker_threads(1);
    c.mutable_auth()->add_admin_uids(getuid());
    ApplyDefaults(&c);
    ASSERT_THAT(ValidateConfig(c), IsOk());
    DaemonOptions options;
    options.metrics_any_port = true;
    auto d = Daemon::Create(c, options);
    ASSERT_THAT(d, IsOk());
    daemon_ = *std::move(d);
    channel_ = grpc::CreateChannel("unix:" + dir_ + "/d.sock", grpc::InsecureChannelCredentials());
    sessions_ = v1::SessionService::NewStub(channel_);
    buffers_ = v1::BufferService::NewStub(channel_);
    kv_ = v1::KvService::NewStub(channel_);
  }
  // More of the daemon's quality config (a fixture's own). The sample
  // counts the tests wait for take every warm-up selection as measured: the
  // candidate carry-over, whose samples wait for their kind's share, is off
  // but in its own fixture (QualityRpcCarryTest).
  virtual std::string QualityExtra() const { return "carry_steps: 0"; }
  void TearDown() override {
    daemon_.reset();
    std::system(("rm -rf " + dir_).c_str());
  }

  // Two KV heads x 8192 generated tokens, G = 4, one layer.
  void Generate() {
    SyntheticConfig c = SyntheticPreset("small").value();
    c.layers = 1;
    c.kv_heads = 2;
    c.q_heads = 8;
    c.tokens = 8192;
    c.steps = 64;
    c.seed = 23;
    c.threads = 1;
    auto dump = GenerateSynthetic(c);
    ASSERT_THAT(dump.status(), IsOk());
    dump_ = *std::move(dump);
  }

  grpc::Status Create(v1::SessionConfig config, std::string* id) {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    *req.mutable_config() = std::move(config);
    v1::CreateSessionResponse resp;
    grpc::Status st = sessions_->CreateSession(&ctx, req, &resp);
    *id = resp.session().session_id();
    return st;
  }

  v1::SessionConfig MdciConfig() const {
    v1::SessionConfig c;
    auto* m = c.mutable_model();
    m->set_layers(1);
    m->set_kv_heads(2);
    m->set_q_heads(8);
    m->set_head_dim(dump_.head_dim);
    m->set_dtype(v1::DTYPE_FLOAT32);
    c.set_page_tokens(16);
    c.mutable_selector()->set_kind(v1::SELECTOR_KIND_MDCI);
    // Narrow on purpose: the calibration has to widen it. The tree's descent
    // only: with the scan (the default) the method duel may meet the target
    // at x1 on one machine's float order and not on another's.
    c.mutable_selector()->mutable_mdci()->set_field_of_view(2);
    c.mutable_selector()->mutable_mdci()->set_pq_factor(0.0f);
    c.mutable_selector()->mutable_mdci()->set_candidate_factor(1.0f);
    c.mutable_defaults()->set_budget_tokens(128);
    return c;
  }

  std::vector<uint8_t> KvBytes() const {
    std::vector<uint8_t> b((dump_.keys.size() + dump_.values.size()) * sizeof(float));
    std::memcpy(b.data(), dump_.keys.data(), dump_.keys.size() * sizeof(float));
    std::memcpy(b.data() + dump_.keys.size() * sizeof(float), dump_.values.data(),
                dump_.values.size() * sizeof(float));
    return b;
  }

  std::string Metrics() {
    httplib::Client http("127.0.0.1", daemon_->metrics_port());
    http.set_read_timeout(10);
    auto res = http.Get("/metrics");
    return res ? res->body : "";
  }

  v1::SessionInfo Get(const std::string& id) {
    grpc::ClientContext ctx;
    v1::GetSessionRequest req;
    req.set_session_id(id);
    v1::GetSessionResponse resp;
    const grpc::Status st = sessions_->GetSession(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.session();
  }

  // GetSession until `samples` were taken (the measurements run on the
  // daemon's background thread).
  v1::SessionInfo WaitForSamples(const std::string& id, uint64_t samples) {
    v1::SessionInfo info;
    for (int i = 0; i < 2000; ++i) {
      info = Get(id);
      const v1::SessionQuality& q = info.quality();
      if (q.samples() + q.samples_stale() + q.samples_dropped() >= samples) break;
      usleep(5000);
    }
    return info;
  }

  // A session with product-quantised codes (pq_factor 8) holding the whole
  // dump, into *id.
  void CreateScanSession(std::string* id) {
    ASSERT_NO_FATAL_FAILURE(Generate());
    ASSERT_EQ(dump_.head_dim % 8, 0);
    v1::SessionConfig config = MdciConfig();
    config.mutable_selector()->mutable_mdci()->set_pq_factor(8.0f);
    ASSERT_TRUE(Create(config, id).ok());
    ASSERT_TRUE(AppendAll(*id).ok());
  }

  grpc::Status AppendAll(const std::string& id) {
    const std::vector<uint8_t> kv = KvBytes();
    grpc::ClientContext ctx;
    v1::AppendKvRequest req;
    req.set_session_id(id);
    req.set_num_tokens(static_cast<uint32_t>(dump_.tokens));
    req.set_inline_kv(std::string(reinterpret_cast<const char*>(kv.data()), kv.size()));
    v1::AppendKvResponse resp;
    return kv_->AppendKv(&ctx, req, &resp);
  }

  std::string Queries(int step) const {
    const float* q = dump_.query(step, 0, 0);
    return std::string(reinterpret_cast<const char*>(q),
                       sizeof(float) * dump_.q_heads * dump_.head_dim);
  }

  grpc::Status Select(const std::string& id, int step) {
    grpc::ClientContext ctx;
    v1::SelectPagesRequest req;
    req.set_session_id(id);
    req.set_layer(0);
    req.set_queries(Queries(step));
    v1::SelectPagesResponse resp;
    return kv_->SelectPages(&ctx, req, &resp);
  }

  std::string dir_;
  std::unique_ptr<Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::SessionService::Stub> sessions_;
  std::unique_ptr<v1::BufferService::Stub> buffers_;
  std::unique_ptr<v1::KvService::Stub> kv_;
  KvDump dump_;
};
TEST_F(QualityRpcTest, ASessionAfterAnotherOfTheModelStartsAtItsWidths) {
  ASSERT_NO_FATAL_FAILURE(Generate());
  std::string first;
  ASSERT_TRUE(Create(MdciConfig(), &first).ok());
  ASSERT_TRUE(AppendAll(first).ok());
  for (int step = 0; step < 24; ++step) {  // the whole warm-up (warmup_samples 24)
    ASSERT_TRUE(Select(first, step).ok());
    WaitForSamples(first, static_cast<uint64_t>(2 * (step + 1)));
  }
  const v1::SessionInfo learnt = Get(first);
  ASSERT_EQ(learnt.quality().heads_size(), 2);
  EXPECT_EQ(learnt.quality().seeded_heads(), 0u);
  {
    grpc::ClientContext ctx;
    v1::DropSessionRequest req;
    req.set_session_id(first);
    v1::DropSessionResponse resp;
    ASSERT_TRUE(sessions_->DropSession(&ctx, req, &resp).ok());
  }
  std::string next;
  ASSERT_TRUE(Create(MdciConfig(), &next).ok());
  ASSERT_TRUE(AppendAll(next).ok());
  ASSERT_TRUE(Select(next, 30).ok());
  const v1::SessionInfo info = WaitForSamples(next, 2);
  EXPECT_EQ(info.quality().seeded_heads(), 2u);
  ASSERT_EQ(info.quality().heads_size(), 2);
  for (int h = 0; h < 2; ++h) {
    SCOPED_TRACE(h);
    EXPECT_TRUE(info.quality().heads(h).seeded());
    // Where the first session ended, give or take the one sample taken since.
    EXPECT_NEAR(std::log(info.quality().heads(h).width()),
                std::log(learnt.quality().heads(h).width()), std::log(1.5) + 1e-9);
    EXPECT_GT(info.quality().heads(h).width(), 1.0);
  }
}

TEST_F(QualityRpcTest, DecodeStepsAreMeasuredCalibratedAndExported) {
  ASSERT_NO_FATAL_FAILURE(Generate());
  std::string id;
  ASSERT_TRUE(Create(MdciConfig(), &id).ok());  // target unset: the daemon's 0.95
  ASSERT_TRUE(AppendAll(id).ok());
  auto shm = ShmFile::Create(absl::StrCat("icecache_qt_", getpid()), 4 << 20);
  ASSERT_THAT(shm, IsOk());
  std::string buffer_id;
  {
    grpc::ClientContext ctx;
    v1::RegisterBufferRequest req;
    req.mutable_host_shm()->set_path(shm->path());
    req.mutable_host_shm()->set_size(shm->size());
    v1::RegisterBufferResponse resp;
    ASSERT_TRUE(buffers_->RegisterBuffer(&ctx, req, &resp).ok());
    buffer_id = resp.buffer_id();
  }
  grpc::ClientContext stream_ctx;
  auto stream = kv_->DecodeStep(&stream_ctx);
  const int kSteps = 32;
  for (int step = 0; step < kSteps; ++step) {
    if (step % 2 == 0) {  // the decode stream and SelectPages both feed the monitor
      v1::DecodeStepRequest req;
      req.set_session_id(id);
      req.set_layer(0);
      req.set_queries(Queries(step));
      req.set_buffer_id(buffer_id);
      v1::DecodeStepResponse resp;
      ASSERT_TRUE(stream->Write(req));
      ASSERT_TRUE(stream->Read(&resp));
      ASSERT_EQ(resp.heads_size(), 2);
    } else {
      ASSERT_TRUE(Select(id, step).ok());
    }
    // One step's samples land before the next step: the width then moves
    // as it would in a long run, only sooner.
    const int chosen = std::min(step + 1, 24) + std::max(0, step + 1 - 24) / 4;
    WaitForSamples(id, static_cast<uint64_t>(2 * chosen));
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
  const v1::SessionInfo info = WaitForSamples(id, 2 * (24 + 2));
  const v1::SessionQuality& q = info.quality();
  EXPECT_TRUE(q.monitored());
  EXPECT_DOUBLE_EQ(q.target_mass_ratio(), 0.95);
  EXPECT_DOUBLE_EQ(info.config().target_mass_ratio(), 0.95);
  EXPECT_EQ(q.samples(), uint64_t{2 * 24 + 2 * 2});  // warm-up, then steps 27 and 31
  EXPECT_EQ(q.samples_dropped(), 0u);
  EXPECT_GT(q.mean_mass_ratio(), 0.5);
  EXPECT_GT(q.mean_topk_recall(), 0.0);
  EXPECT_GT(q.calibration_cpu_ms(), 0.0);
  EXPECT_GT(q.selection_ms(), 0.0);
  ASSERT_EQ(q.heads_size(), 2);
  for (const v1::HeadQuality& h : q.heads()) {
    SCOPED_TRACE(h.kv_head());
    EXPECT_TRUE(h.calibrated());
    EXPECT_GT(h.width(), 1.0);
    EXPECT_GT(h.field_of_view(), 2u);
    // The calibrator holds the mean at a width on target (width_calibrator.h);
    // `recent` (a moving average over about 8 samples) also dips while it
    // tries a lower width, so it is checked loosely.
    EXPECT_GE(h.recent_mass_ratio(), 0.95 - 0.07);
  }
  // The session sets no granularity: its DecodeSteps into shm select per
  // token and its SelectPages per page, each measured against its own
  // reference and counted under its own label.
  // The sampler's thread counts a sample as measured after its tally (which
  // q read) and its histograms: wait for the last count before reading them.
  const std::string measured =
      absl::StrCat("icecache_quality_samples_total{outcome=\"measured\"} ", q.samples(), "\n");
  std::string metrics = Metrics();
  for (int i = 0; i < 500 && metrics.find(measured) == std::string::npos; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
    metrics = Metrics();
  }
  EXPECT_THAT(metrics, HasSubstr("icecache_selection_mass_ratio_bucket{selector=\"mdci\","
                                 "granularity=\"token\",le=\"0.95\"}"));
  EXPECT_THAT(metrics, HasSubstr("icecache_selection_topk_recall_bucket{selector=\"mdci\","
                                 "granularity=\"page\",le=\"+Inf\"}"));
  uint64_t counted = 0;
  for (const char* unit : {"page", "token"}) {
    const std::string key = absl::StrCat(
        "icecache_selection_mass_ratio_count{selector=\"mdci\","
        "granularity=\"",
        unit, "\"} ");
    const size_t at = metrics.find(key);
    ASSERT_NE(at, std::string::npos) << key;
    const uint64_t n = std::stoull(metrics.substr(at + key.size()));
    EXPECT_GT(n, 0u) << unit;
    counted += n;
  }
  EXPECT_EQ(counted, q.samples());
  EXPECT_THAT(metrics,
              HasSubstr(absl::StrCat("icecache_quality_samples_total{outcome=\"measured\"} ",
                                     q.samples(), "\n")));
  EXPECT_THAT(metrics,
              HasSubstr("icecache_quality_samples_total{outcome=\"dropped_queue_full\"} 0\n"));
  EXPECT_THAT(metrics, HasSubstr("icecache_quality_cpu_seconds_total "));
  EXPECT_THAT(metrics, HasSubstr("icecache_quality_selection_seconds_total "));
  // The measurements' waits for decode calls in flight (decode_activity.h):
  // how many is the scheduler's business, the series are there.
  EXPECT_THAT(metrics, HasSubstr("icecache_quality_defers_total{outcome=\"calls_ended\"} "));
  EXPECT_THAT(metrics, HasSubstr("icecache_quality_defers_total{outcome=\"timed_out\"} "));
  EXPECT_THAT(metrics, HasSubstr("icecache_decode_lane_jobs_alone_total "));
}

// A session whose mdci scans its product-quantised codes starts every head
// on the scan; the method duel may then put the tree on trial (it compares
// measured costs, so when is timing's business), and every head reports its
// method and the duel's counts through GetSession.
TEST_F(QualityRpcTest, AScanSessionReportsEachHeadsMethodAndDuel) {
  std::string id;
  ASSERT_NO_FATAL_FAILURE(CreateScanSession(&id));
  ASSERT_TRUE(Select(id, 0).ok());
  v1::SessionInfo info = WaitForSamples(id, 2);
  ASSERT_EQ(info.quality().heads_size(), 2);
  for (const v1::HeadQuality& h : info.quality().heads()) {
    SCOPED_TRACE(h.kv_head());
    // The scan selects; the tree's trial rides on the samples from the first.
    EXPECT_EQ(h.search_method(), "scan");
    EXPECT_EQ(h.method_trials(), 1u);
    EXPECT_EQ(h.method_switches(), 0u);
  }
  for (int step = 1; step < 40; ++step) {
    ASSERT_TRUE(Select(id, step).ok());
    WaitForSamples(id, static_cast<uint64_t>(2 * std::min(step + 1, 24)));
  }
  info = Get(id);
  ASSERT_EQ(info.quality().heads_size(), 2);
  for (const v1::HeadQuality& h : info.quality().heads()) {
    SCOPED_TRACE(h.kv_head());
    EXPECT_TRUE(h.calibrated());
    EXPECT_THAT(h.search_method(), ::testing::AnyOf("scan", "tree"));
    EXPECT_LE(h.method_switches(), h.method_trials());
    // On the tree only through a trial (running now, or won).
    if (h.search_method() == "tree") {
      EXPECT_GE(h.method_trials(), 1u);
    }
  }
}

// The daemon's quality.method_duel off: a session with codes selects by the
// scan only, and its heads never try the tree.
class QualityRpcNoDuelTest : public QualityRpcTest {
 protected:
  std::string QualityExtra() const override { return "method_duel: false carry_steps: 0"; }
};

TEST_F(QualityRpcNoDuelTest, AScanSessionNeverTriesTheTree) {
  std::string id;
  ASSERT_NO_FATAL_FAILURE(CreateScanSession(&id));
  for (int step = 0; step < 40; ++step) {
    ASSERT_TRUE(Select(id, step).ok());
    WaitForSamples(id, static_cast<uint64_t>(2 * std::min(step + 1, 24)));
  }
  const v1::SessionInfo info = Get(id);
  ASSERT_EQ(info.quality().heads_size(), 2);
  for (const v1::HeadQuality& h : info.quality().heads()) {
    SCOPED_TRACE(h.kv_head());
    EXPECT_TRUE(h.calibrated());
    EXPECT_GE(h.samples(), 24u);
    EXPECT_EQ(h.search_method(), "scan");
    EXPECT_EQ(h.method_trials(), 0u);
  }
}

// The daemon's default candidate carry-over (quality.carry_steps 2): a
// session's calibrated heads reuse each fresh scan's candidates for up to the
// next two steps, the selections carried are counted, and the heads say how
// far they carry.
class QualityRpcCarryTest : public QualityRpcTest {
 protected:
  std::string QualityExtra() const override { return ""; }
};

TEST_F(QualityRpcCarryTest, CarriedSelectionsAreCountedAndReportedPerHead) {
  std::string id;
  ASSERT_NO_FATAL_FAILURE(CreateScanSession(&id));
  const int kSteps = 40;
  for (int step = 0; step < kSteps; ++step) {
    ASSERT_TRUE(Select(id, step).ok());
    WaitForSamples(id, static_cast<uint64_t>(std::min(step + 1, 24)));
  }
  const v1::SessionInfo info = Get(id);
  const v1::SessionQuality& q = info.quality();
  EXPECT_GT(q.carried_selections(), 0u);
  // At most two of every three per head (2 heads x 40 steps).
  EXPECT_LE(q.carried_selections(), uint64_t{2 * kSteps * 2 / 3 + 2});
  EXPECT_GE(q.samples(), 24u);
  ASSERT_EQ(q.heads_size(), 2);
  for (const v1::HeadQuality& h : q.heads()) {
    SCOPED_TRACE(h.kv_head());
    EXPECT_TRUE(h.calibrated());
    // Carrying (2, or 1 once its second reuse fell behind), or stopped
    // after its carried steps fell behind.
    EXPECT_TRUE(h.carry_steps() == 2 || h.carry_steps() == 1 || h.carry_stops() > 0)
        << h.carry_steps();
  }
  EXPECT_GE(q.carry_pool_steps(), 1u);  // the pool has samples: the length it allows
  EXPECT_LE(q.carry_pool_steps(), 2u);
}

TEST_F(QualityRpcTest, TargetMassRatioIsValidatedNamingTheField) {
  ASSERT_NO_FATAL_FAILURE(Generate());
  std::string id;
  v1::SessionConfig c = MdciConfig();
  c.set_target_mass_ratio(1.5);
  grpc::Status st = Create(c, &id);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(),
              HasSubstr("target_mass_ratio must be 0 (fixed width) or in (0, 1], got 1.5"));
  c.mutable_selector()->set_kind(v1::SELECTOR_KIND_QUEST);
  c.set_target_mass_ratio(0.9);
  st = Create(c, &id);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("target_mass_ratio 0.9 calibrates the search width of "
                                            "the MDCI selector; selector quest has no width"));
  // Quest with the target unset is fine and not monitored; MDCI with 0 is
  // monitored at a fixed width.
  c.clear_target_mass_ratio();
  ASSERT_TRUE(Create(c, &id).ok());
  EXPECT_FALSE(Get(id).quality().monitored());
  c = MdciConfig();
  c.set_target_mass_ratio(0);
  ASSERT_TRUE(Create(c, &id).ok());
  EXPECT_TRUE(Get(id).quality().monitored());
  EXPECT_DOUBLE_EQ(Get(id).quality().target_mass_ratio(), 0.0);
}

}  // namespace
}  // namespace icecache::rpc
