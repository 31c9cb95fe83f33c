// The daemon in-process: real Unix socket, real gRPC calls through the
// generated stubs, real core (pool, sessions, shm buffer). Checks handler
// wiring, status codes, admin role, drain, health and metrics; the client's
// integration suite runs the icecached binary end to end.
#include "server/rpc/daemon.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "common/file_util.h"
#include "common/shm_file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/rpc/config.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache::rpc {
namespace {

using ::icecache::testing::IsOk;
using ::testing::HasSubstr;

constexpr int kLayers = 2, kKvHeads = 2, kQHeads = 4, kHeadDim = 16, kPageTokens = 4;

class DaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::icecache::testing::TempPathTemplate("icecache_dt_");
    dir_ = mkdtemp(tmpl.data());
    socket_ = dir_ + "/d.sock";
  }
  void TearDown() override {
    daemon_.reset();
    std::system(("rm -rf " + dir_).c_str());
  }

  void Start(bool admin, std::string extra_config = "", bool metrics = false) {
    auto parsed = ParseConfigText(extra_config);
    ASSERT_THAT(parsed, IsOk());
    IcecachedConfig c = *parsed;
    c.mutable_listen()->set_unix_socket(socket_);
    c.mutable_pool()->set_capacity_bytes(64 << 20);
    c.mutable_metrics()->set_port(0);
    c.set_worker_threads(1);
    // Not admin: narrow the default admins (our own uid, root) to another uid.
    c.mutable_auth()->add_admin_uids(admin ? getuid() : getuid() + 1);
    ApplyDefaults(&c);
    ASSERT_THAT(ValidateConfig(c), IsOk());
    DaemonOptions options;
    options.metrics_any_port = metrics;
    auto d = Daemon::Create(c, options);
    ASSERT_THAT(d, IsOk());
    daemon_ = *std::move(d);
    channel_ = grpc::CreateChannel("unix:" + socket_, grpc::InsecureChannelCredentials());
    sessions_ = v1::SessionService::NewStub(channel_);
    buffers_ = v1::BufferService::NewStub(channel_);
    kv_ = v1::KvService::NewStub(channel_);
    admin_ = v1::AdminService::NewStub(channel_);
  }

  static v1::SessionConfig Config() {
    v1::SessionConfig c;
    auto* m = c.mutable_model();
    m->set_layers(kLayers);
    m->set_kv_heads(kKvHeads);
    m->set_q_heads(kQHeads);
    m->set_head_dim(kHeadDim);
    m->set_dtype(v1::DTYPE_FLOAT32);
    c.set_page_tokens(kPageTokens);
    c.mutable_selector()->set_kind(v1::SELECTOR_KIND_EXACT);
    return c;
  }

  std::string CreateSession() {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    *req.mutable_config() = Config();
    v1::CreateSessionResponse resp;
    const grpc::Status st = sessions_->CreateSession(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.session().session_id();
  }

  grpc::Status AppendInline(const std::string& id, const std::vector<float>& kv, int n,
                            v1::AppendKvResponse* resp) {
    grpc::ClientContext ctx;
    v1::AppendKvRequest req;
    req.set_session_id(id);
    req.set_num_tokens(n);
    req.set_inline_kv(std::string(reinterpret_cast<const char*>(kv.data()), kv.size() * 4));
    return kv_->AppendKv(&ctx, req, resp);
  }

  // Creates a 1 MiB file under /dev/shm owned by this process and registers
  // it; the file lives as long as the fixture.
  std::string RegisterShmBuffer() {
    auto shm = ShmFile::Create(absl::StrCat("icecache_dt_", getpid(), "_", rand()), 1 << 20);
    EXPECT_THAT(shm, IsOk());
    if (!shm.ok()) return "";
    shm_ = std::make_unique<ShmFile>(*std::move(shm));
    grpc::ClientContext ctx;
    v1::RegisterBufferRequest req;
    req.mutable_host_shm()->set_path(shm_->path());
    req.mutable_host_shm()->set_size(shm_->size());
    v1::RegisterBufferResponse resp;
    const grpc::Status st = buffers_->RegisterBuffer(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.kind(), v1::BUFFER_KIND_HOST_SHM);
    return resp.buffer_id();
  }

  static std::string Queries() {
    const std::vector<float> q(kQHeads * kHeadDim, 0.5f);
    return std::string(reinterpret_cast<const char*>(q.data()), q.size() * 4);
  }

  grpc::Status Select(const std::string& id, uint32_t layer, uint32_t budget,
                      v1::SelectPagesResponse* resp) {
    grpc::ClientContext ctx;
    v1::SelectPagesRequest req;
    req.set_session_id(id);
    req.set_layer(layer);
    req.set_queries(Queries());
    req.mutable_params()->set_budget_tokens(budget);
    req.mutable_params()->set_want_positions(true);
    return kv_->SelectPages(&ctx, req, resp);
  }

  // A session holding kTokens tokens of MakeKv(kTokens, 7).
  static constexpr int kTokens = 64;
  std::string SessionWithKv() {
    const std::string id = CreateSession();
    v1::AppendKvResponse resp;
    const grpc::Status st = AppendInline(id, MakeKv(kTokens, 7), kTokens, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return id;
  }

  // keys then values, [layers][kv_heads][n][head_dim] fp32.
  static std::vector<float> MakeKv(int n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist;
    std::vector<float> kv(2ull * kLayers * kKvHeads * n * kHeadDim);
    for (float& x : kv) x = dist(rng);
    return kv;
  }

  static float Key(const std::vector<float>& kv, int n, int layer, int head, int pos, int d) {
    return kv[((static_cast<size_t>(layer) * kKvHeads + head) * n + pos) * kHeadDim + d];
  }

  // Health over the generic stub: HealthCheckRequest{service=""} is empty;
  // the response's field 1 is the status (1 SERVING, 2 NOT_SERVING).
  int HealthStatus() {
    grpc::GenericStub generic(channel_);
    grpc::ClientContext ctx;
    grpc::ByteBuffer request, response;
    grpc::Slice empty("");
    request = grpc::ByteBuffer(&empty, 1);
    absl::Notification done;
    grpc::Status status;
    generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request,
                      &response, [&](grpc::Status s) {
                        status = std::move(s);
                        done.Notify();
                      });
    done.WaitForNotification();
    if (!status.ok()) return -status.error_code();
    std::vector<grpc::Slice> slices;
    if (!response.Dump(&slices).ok()) return -100;
    std::string bytes;
    for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    if (bytes.size() == 2 && bytes[0] == 0x08) return bytes[1];
    return bytes.empty() ? 0 : -101;
  }

  std::string dir_, socket_;
  std::unique_ptr<ShmFile> shm_;
  std::unique_ptr<Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::SessionService::Stub> sessions_;
  std::unique_ptr<v1::BufferService::Stub> buffers_;
  std::unique_ptr<v1::KvService::Stub> kv_;
  std::unique_ptr<v1::AdminService::Stub> admin_;
};

TEST_F(DaemonTest, SessionLifecycleAndTenantFromPeerUid) {
  Start(false);
  const std::string id = CreateSession();
  ASSERT_FALSE(id.empty());
  {
    grpc::ClientContext ctx;
    v1::GetSessionRequest req;
    req.set_session_id(id);
    v1::GetSessionResponse resp;
    ASSERT_TRUE(sessions_->GetSession(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.session().tenant(), absl::StrCat("uid-", getuid()));
    EXPECT_EQ(resp.session().epoch(), daemon_->epoch());
    EXPECT_EQ(resp.session().config().model().head_dim(), uint32_t{kHeadDim});
    EXPECT_EQ(resp.session().config().defaults().budget_tokens(), kDefaultBudgetTokens);
    EXPECT_GT(resp.session().expires_unix_ms(), resp.session().created_unix_ms());
  }
  {
    grpc::ClientContext ctx;
    v1::KeepAliveRequest req;
    req.add_session_ids(id);
    v1::KeepAliveResponse resp;
    ASSERT_TRUE(sessions_->KeepAlive(&ctx, req, &resp).ok());
    ASSERT_EQ(resp.expires_unix_ms_size(), 1);
  }
  {
    grpc::ClientContext ctx;
    v1::ListSessionsResponse resp;
    ASSERT_TRUE(sessions_->ListSessions(&ctx, v1::ListSessionsRequest(), &resp).ok());
    ASSERT_EQ(resp.sessions_size(), 1);
    EXPECT_EQ(resp.sessions(0).session_id(), id);
  }
  {
    grpc::ClientContext ctx;
    v1::DropSessionRequest req;
    req.set_session_id(id);
    v1::DropSessionResponse resp;
    ASSERT_TRUE(sessions_->DropSession(&ctx, req, &resp).ok());
  }
  {
    grpc::ClientContext ctx;
    v1::GetSessionRequest req;
    req.set_session_id(id);
    v1::GetSessionResponse resp;
    EXPECT_EQ(sessions_->GetSession(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
}

TEST_F(DaemonTest, AppendKvInlineReportsTokensAndBytes) {
  Start(false);
  const std::string id = CreateSession();
  v1::AppendKvResponse resp;
  const grpc::Status st = AppendInline(id, MakeKv(kTokens, 7), kTokens, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(resp.tokens(), uint64_t{kTokens});
  EXPECT_GT(resp.bytes(), 0u);
}

TEST_F(DaemonTest, SelectPagesMeetsTheBudgetOnEveryHead) {
  Start(false);
  const std::string id = SessionWithKv();
  v1::SelectPagesResponse sel;
  const grpc::Status st = Select(id, 1, 16, &sel);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_EQ(sel.heads_size(), kKvHeads);
  for (const auto& h : sel.heads()) EXPECT_GE(h.pages_size(), 16 / kPageTokens);
}

TEST_F(DaemonTest, FetchPagesWritesTheAppendedKeysIntoTheBuffer) {
  Start(false);
  const std::string id = SessionWithKv();
  const std::vector<float> kv = MakeKv(kTokens, 7);
  const std::string buffer_id = RegisterShmBuffer();
  ASSERT_FALSE(buffer_id.empty());
  v1::SelectPagesResponse sel;
  ASSERT_TRUE(Select(id, 1, 16, &sel).ok());
  v1::FetchPagesResponse fetched;
  {
    grpc::ClientContext ctx;
    v1::FetchPagesRequest req;
    req.set_session_id(id);
    req.set_layer(1);
    req.set_buffer_id(buffer_id);
    req.set_offset(4096);
    req.set_want_positions(true);
    for (const auto& h : sel.heads()) {
      auto* hp = req.add_heads();
      hp->set_kv_head(h.kv_head());
      *hp->mutable_pages() = h.pages();
    }
    const grpc::Status st = kv_->FetchPages(&ctx, req, &fetched);
    ASSERT_TRUE(st.ok()) << st.error_message();
  }
  // Every fetched K row is the appended key of its position.
  const v1::FetchLayout& layout = fetched.layout();
  EXPECT_EQ(layout.offset(), 4096u);
  EXPECT_EQ(layout.page_bytes(), 2u * kPageTokens * kHeadDim * 4);
  const uint8_t* base = shm_->data();
  int rows_checked = 0;
  for (const v1::HeadLayout& h : layout.heads()) {
    int pos_index = 0;
    for (int i = 0; i < h.pages_size(); ++i) {
      const float* k = reinterpret_cast<const float*>(base + h.byte_offsets(i));
      for (uint32_t slot = 0; slot < h.fills(i); ++slot, ++pos_index) {
        const int pos = h.positions(pos_index);
        for (int d = 0; d < kHeadDim; ++d) {
          ASSERT_EQ(k[slot * kHeadDim + d], Key(kv, kTokens, 1, h.kv_head(), pos, d))
              << "head " << h.kv_head() << " page " << h.pages(i) << " slot " << slot;
        }
        ++rows_checked;
      }
    }
  }
  EXPECT_GE(rows_checked, 2 * 16);
}

TEST_F(DaemonTest, DecodeStepServesEveryLayerOnOneStreamWithIdsOnlyFirst) {
  Start(false);
  const std::string id = SessionWithKv();
  const std::string buffer_id = RegisterShmBuffer();
  grpc::ClientContext ctx;
  auto stream = kv_->DecodeStep(&ctx);
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    v1::DecodeStepRequest req;
    if (layer == 0) {
      req.set_session_id(id);
      req.set_buffer_id(buffer_id);
    }
    req.set_layer(layer);
    req.set_offset(layer * 65536);
    req.set_queries(Queries());
    req.mutable_params()->set_budget_tokens(8);
    ASSERT_TRUE(stream->Write(req));
    v1::DecodeStepResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    EXPECT_EQ(resp.layer(), layer);
    EXPECT_EQ(resp.heads_size(), kKvHeads);
    EXPECT_EQ(resp.layout().offset(), layer * 65536u);
    EXPECT_GT(resp.layout().total_bytes(), 0u);
  }
  stream->WritesDone();
  const grpc::Status st = stream->Finish();
  EXPECT_TRUE(st.ok()) << st.error_message();
}

// in_place (kv.proto): the second step with the same queries copies no row,
// keeps them all, moves no byte, and /metrics counts the rows both ways.
TEST_F(DaemonTest, InPlaceDecodeStepsKeepTheRowsSelectedAgain) {
  Start(false);
  const std::string id = SessionWithKv();
  const std::string buffer_id = RegisterShmBuffer();
  grpc::ClientContext ctx;
  auto stream = kv_->DecodeStep(&ctx);
  uint64_t rows = 0, first_bytes = 0;
  for (int step = 0; step < 2; ++step) {
    v1::DecodeStepRequest req;
    req.set_session_id(id);
    req.set_buffer_id(buffer_id);
    req.set_layer(0);
    req.set_queries(Queries());
    req.mutable_params()->set_budget_tokens(8);
    req.mutable_params()->set_granularity(v1::GRANULARITY_TOKEN);
    req.mutable_params()->set_want_positions(true);
    req.set_in_place(true);
    ASSERT_TRUE(stream->Write(req));
    v1::DecodeStepResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
    const v1::FetchLayout& l = resp.layout();
    if (step == 0) {
      for (const v1::HeadLayout& h : l.heads()) rows += h.positions_size();
      first_bytes = l.total_bytes();
      EXPECT_EQ(l.rows_copied(), rows);
      EXPECT_EQ(l.rows_kept(), 0u);
    } else {
      EXPECT_EQ(l.rows_copied(), 0u);
      EXPECT_EQ(l.rows_kept(), rows);
    }
  }
  stream->WritesDone();
  const grpc::Status st = stream->Finish();
  EXPECT_TRUE(st.ok()) << st.error_message();
  ASSERT_GT(rows, 0u);
  const std::string metrics = daemon_->metrics()->Render();
  EXPECT_THAT(metrics, HasSubstr(absl::StrCat("icecache_token_rows_total{how=\"copied\"} ", rows)));
  EXPECT_THAT(metrics, HasSubstr(absl::StrCat("icecache_token_rows_total{how=\"kept\"} ", rows)));
  EXPECT_THAT(metrics, HasSubstr(absl::StrCat("icecache_bytes_moved_total{direction=\"fetch\"} ",
                                              first_bytes)));
}

TEST_F(DaemonTest, DecodeStepBadMessageEndsTheStreamWithItsCode) {
  Start(false);
  const std::string id = SessionWithKv();
  const std::string buffer_id = RegisterShmBuffer();
  grpc::ClientContext ctx;
  auto stream = kv_->DecodeStep(&ctx);
  v1::DecodeStepRequest bad;
  bad.set_session_id(id);
  bad.set_buffer_id(buffer_id);
  bad.set_layer(kLayers);  // out of range
  bad.set_queries(Queries());
  ASSERT_TRUE(stream->Write(bad));
  stream->WritesDone();
  v1::DecodeStepResponse ignored;
  EXPECT_FALSE(stream->Read(&ignored));
  const grpc::Status st = stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(
      daemon_->metrics()->Render(),
      HasSubstr("icecache_rpc_requests_total{method=\"DecodeStep\",code=\"INVALID_ARGUMENT\"} 1"));
}

TEST_F(DaemonTest, MetricsCountCallsBytesAndPoolClasses) {
  Start(false);
  const std::string id = SessionWithKv();
  v1::SelectPagesResponse sel;
  ASSERT_TRUE(Select(id, 0, 8, &sel).ok());
  const std::string metrics = daemon_->metrics()->Render();
  EXPECT_THAT(metrics, HasSubstr("icecache_rpc_requests_total{method=\"AppendKv\",code=\"OK\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("icecache_select_duration_seconds_count 1"));
  EXPECT_THAT(metrics,
              HasSubstr(absl::StrCat("icecache_bytes_moved_total{direction=\"append_inline\"} ",
                                     MakeKv(kTokens, 7).size() * 4)));
  EXPECT_THAT(metrics, HasSubstr("icecache_tenant_sessions{tenant=\"uid-"));
  // Pool bytes per size class: frame = 2 x 4 tokens x 16 dims x 4 bytes.
  EXPECT_THAT(metrics,
              HasSubstr("icecache_pool_class_frames{frame_bytes=\"512\",state=\"used\"} "));
  EXPECT_THAT(metrics, HasSubstr("icecache_pool_class_bytes{frame_bytes=\"512\",state=\"free\"} "));
}

// Decode keys inserted one at a time into an mdci session's trees: its
// GetSession counts them (and the ones that skipped routing), /metrics
// sums the live sessions' by placement.
TEST_F(DaemonTest, DecodeKeysAreCountedPerSessionAndInMetrics) {
  Start(false);
  grpc::ClientContext ctx;
  v1::CreateSessionRequest create;
  *create.mutable_config() = Config();
  create.mutable_config()->mutable_selector()->set_kind(v1::SELECTOR_KIND_MDCI);
  v1::CreateSessionResponse created;
  ASSERT_TRUE(sessions_->CreateSession(&ctx, create, &created).ok());
  const std::string id = created.session().session_id();
  v1::AppendKvResponse resp;
  grpc::Status st = AppendInline(id, MakeKv(kTokens, 7), kTokens, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  auto decode_keys = [&](uint64_t* all, uint64_t* unrouted) {
    grpc::ClientContext get_ctx;
    v1::GetSessionRequest req;
    req.set_session_id(id);
    v1::GetSessionResponse got;
    ASSERT_TRUE(sessions_->GetSession(&get_ctx, req, &got).ok());
    *all = got.session().decode_keys();
    *unrouted = got.session().decode_keys_unrouted();
  };
  uint64_t all = 1, unrouted = 1;
  ASSERT_NO_FATAL_FAILURE(decode_keys(&all, &unrouted));
  EXPECT_EQ(all, 0u);  // the prefill's trees were built, not inserted into
  EXPECT_EQ(unrouted, 0u);
  constexpr int kDecode = 12;
  for (int t = 0; t < kDecode; ++t) {
    st = AppendInline(id, MakeKv(1, 100 + t), 1, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
  }
  ASSERT_NO_FATAL_FAILURE(decode_keys(&all, &unrouted));
  EXPECT_EQ(all, uint64_t{kDecode} * kLayers * kKvHeads);  // one tree per (layer, head)
  EXPECT_LE(unrouted, all);
  const std::string metrics = daemon_->metrics()->Render();
  EXPECT_THAT(metrics, HasSubstr(absl::StrCat("icecache_decode_keys{placement=\"routed\"} ",
                                              all - unrouted)));
  EXPECT_THAT(metrics,
              HasSubstr(absl::StrCat("icecache_decode_keys{placement=\"unrouted\"} ", unrouted)));
}

TEST_F(DaemonTest, DecodeStepDurationIsCountedPerLayer) {
  Start(false);
  const std::string id = SessionWithKv();
  const std::string buffer_id = RegisterShmBuffer();
  grpc::ClientContext ctx;
  auto stream = kv_->DecodeStep(&ctx);
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    v1::DecodeStepRequest req;
    req.set_session_id(id);
    req.set_buffer_id(buffer_id);
    req.set_layer(layer);
    req.set_queries(Queries());
    ASSERT_TRUE(stream->Write(req));
    v1::DecodeStepResponse resp;
    ASSERT_TRUE(stream->Read(&resp));
  }
  stream->WritesDone();
  ASSERT_TRUE(stream->Finish().ok());
  EXPECT_THAT(daemon_->metrics()->Render(),
              HasSubstr(absl::StrCat("icecache_decode_step_duration_seconds_count ", kLayers)));
}

TEST_F(DaemonTest, BadRequestsGetPreciseCodes) {
  Start(false, "limits { max_inline_bytes: 1024 }");
  const std::string id = CreateSession();
  struct Probe {
    const char* what;
    grpc::StatusCode want;
    std::function<grpc::Status()> call;
  };
  auto ctx = [] { return std::make_unique<grpc::ClientContext>(); };
  const std::vector<Probe> probes = {
      {"unknown session", grpc::StatusCode::NOT_FOUND,
       [&] {
         auto c = ctx();
         v1::GetSessionRequest r;
         r.set_session_id("nope");
         v1::GetSessionResponse out;
         return sessions_->GetSession(c.get(), r, &out);
       }},
      {"empty id", grpc::StatusCode::INVALID_ARGUMENT,
       [&] {
         auto c = ctx();
         v1::DropSessionResponse out;
         return sessions_->DropSession(c.get(), v1::DropSessionRequest(), &out);
       }},
      {"missing model", grpc::StatusCode::INVALID_ARGUMENT,
       [&] {
         auto c = ctx();
         v1::CreateSessionResponse out;
         return sessions_->CreateSession(c.get(), v1::CreateSessionRequest(), &out);
       }},
      {"bad layers", grpc::StatusCode::INVALID_ARGUMENT,
       [&] {
         auto c = ctx();
         v1::CreateSessionRequest r;
         *r.mutable_config() = Config();
         r.mutable_config()->mutable_model()->set_layers(100000);
         v1::CreateSessionResponse out;
         return sessions_->CreateSession(c.get(), r, &out);
       }},
      {"inline over limit", grpc::StatusCode::INVALID_ARGUMENT,
       [&] {
         auto c = ctx();
         v1::AppendKvRequest r;
         r.set_session_id(id);
         r.set_num_tokens(1);
         r.set_inline_kv(std::string(2048, '\0'));
         v1::AppendKvResponse out;
         return kv_->AppendKv(c.get(), r, &out);
       }},
      {"inline wrong size", grpc::StatusCode::INVALID_ARGUMENT,
       [&] {
         auto c = ctx();
         v1::AppendKvRequest r;
         r.set_session_id(id);
         r.set_num_tokens(1);
         r.set_inline_kv(std::string(100, '\0'));
         v1::AppendKvResponse out;
         return kv_->AppendKv(c.get(), r, &out);
       }},
      {"no source", grpc::StatusCode::INVALID_ARGUMENT,
       [&] {
         auto c = ctx();
         v1::AppendKvRequest r;
         r.set_session_id(id);
         r.set_num_tokens(1);
         v1::AppendKvResponse out;
         return kv_->AppendKv(c.get(), r, &out);
       }},
      {"select on empty session", grpc::StatusCode::FAILED_PRECONDITION,
       [&] {
         auto c = ctx();
         v1::SelectPagesRequest r;
         r.set_session_id(id);
         std::vector<float> q(kQHeads * kHeadDim, 1.0f);
         r.set_queries(std::string(reinterpret_cast<const char*>(q.data()), q.size() * 4));
         v1::SelectPagesResponse out;
         return kv_->SelectPages(c.get(), r, &out);
       }},
      {"shm outside /dev/shm", grpc::StatusCode::INVALID_ARGUMENT,
       [&] {
         auto c = ctx();
         v1::RegisterBufferRequest r;
         r.mutable_host_shm()->set_path("/etc/passwd");
         r.mutable_host_shm()->set_size(16);
         v1::RegisterBufferResponse out;
         return buffers_->RegisterBuffer(c.get(), r, &out);
       }},
      {"no buffer kind", grpc::StatusCode::INVALID_ARGUMENT,
       [&] {
         auto c = ctx();
         v1::RegisterBufferResponse out;
         return buffers_->RegisterBuffer(c.get(), v1::RegisterBufferRequest(), &out);
       }},
      {"cuda without device", grpc::StatusCode::FAILED_PRECONDITION,
       [&] {
         auto c = ctx();
         v1::RegisterBufferRequest r;
         r.mutable_cuda_ipc()->set_handle(std::string(64, '\x01'));
         r.mutable_cuda_ipc()->set_size(4096);
         r.mutable_cuda_ipc()->set_device_uuid(std::string(16, '\x02'));
         v1::RegisterBufferResponse out;
         return buffers_->RegisterBuffer(c.get(), r, &out);
       }},
      {"admin without role", grpc::StatusCode::PERMISSION_DENIED,
       [&] {
         auto c = ctx();
         v1::GetStatsResponse out;
         return admin_->GetStats(c.get(), v1::GetStatsRequest(), &out);
       }},
      {"all tenants without role", grpc::StatusCode::PERMISSION_DENIED,
       [&] {
         auto c = ctx();
         v1::ListSessionsRequest r;
         r.set_all_tenants(true);
         v1::ListSessionsResponse out;
         return sessions_->ListSessions(c.get(), r, &out);
       }},
  };
  for (const Probe& p : probes) {
    const grpc::Status st = p.call();
    EXPECT_EQ(st.error_code(), p.want) << p.what << ": " << st.error_message();
    EXPECT_FALSE(st.error_message().empty()) << p.what;
  }
  // The daemon still serves.
  EXPECT_FALSE(CreateSession().empty());
}

// Idle DecodeStep streams of one tenant hold a server thread each: past
// limits.max_calls_per_tenant the tenant is refused with a clear status,
// while admin verbs and health keep their reserved threads.
TEST_F(DaemonTest, IdleStreamsOfOneTenantStopAtItsLimitAdminAndHealthStillServe) {
  Start(true, "limits { max_concurrent_calls: 8 reserved_calls: 2 max_calls_per_tenant: 3 }");
  struct Stream {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReaderWriter<v1::DecodeStepRequest, v1::DecodeStepResponse>> rw;
  };
  const std::string id = SessionWithKv();
  const std::string buffer_id = RegisterShmBuffer();
  std::vector<std::unique_ptr<Stream>> idle;
  for (int i = 0; i < 3; ++i) {
    idle.push_back(std::make_unique<Stream>());
    idle.back()->rw = kv_->DecodeStep(&idle.back()->ctx);
    // One answered message shows the stream's handler runs, so it holds its
    // place (the in-flight gauge counts a call before it takes one).
    v1::DecodeStepRequest req;
    req.set_session_id(id);
    req.set_buffer_id(buffer_id);
    req.set_queries(Queries());
    req.mutable_params()->set_budget_tokens(8);
    ASSERT_TRUE(idle.back()->rw->Write(req));
    v1::DecodeStepResponse first;
    ASSERT_TRUE(idle.back()->rw->Read(&first));
  }
  EXPECT_THAT(daemon_->metrics()->Render(), HasSubstr("icecache_rpc_in_flight 3\n"));
  {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    *req.mutable_config() = Config();
    v1::CreateSessionResponse resp;
    const grpc::Status st = sessions_->CreateSession(&ctx, req, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(st.error_message(), HasSubstr("limits.max_calls_per_tenant"));
  }
  {
    grpc::ClientContext ctx;
    v1::GetStatsResponse resp;
    const grpc::Status st = admin_->GetStats(&ctx, v1::GetStatsRequest(), &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
  }
  EXPECT_EQ(HealthStatus(), 1);  // SERVING
  // Closing one stream gives its place back.
  idle.back()->rw->WritesDone();
  const grpc::Status closed = idle.back()->rw->Finish();
  EXPECT_EQ(closed.error_code(), grpc::StatusCode::OK) << closed.error_message();
  idle.pop_back();
  EXPECT_FALSE(CreateSession().empty());
  for (auto& s : idle) {
    s->rw->WritesDone();
    s->rw->Finish();
  }
}

TEST_F(DaemonTest, AdminGetStatsSetQuotaAndPin) {
  Start(true);
  const std::string id = CreateSession();
  {
    grpc::ClientContext ctx;
    v1::GetStatsResponse resp;
    ASSERT_TRUE(admin_->GetStats(&ctx, v1::GetStatsRequest(), &resp).ok());
    EXPECT_EQ(resp.sessions(), 1u);
    EXPECT_EQ(resp.capacity_bytes(), uint64_t{64} << 20);
    EXPECT_FALSE(resp.draining());
  }
  {
    grpc::ClientContext ctx;
    v1::SetQuotaRequest req;
    req.set_tenant("someone");
    req.set_quota_bytes(1 << 20);
    v1::SetQuotaResponse resp;
    ASSERT_TRUE(admin_->SetQuota(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.tenant().quota_bytes(), 1u << 20);
  }
  {
    grpc::ClientContext ctx;
    v1::PinSessionRequest req;
    req.set_session_id(id);
    req.set_pinned(true);
    v1::PinSessionResponse resp;
    ASSERT_TRUE(admin_->PinSession(&ctx, req, &resp).ok());
    EXPECT_TRUE(resp.session().pinned());
  }
}

// A first run with no auth config: the daemon's own uid (this process) has
// the admin role, so `icecachectl stats` works out of the box.
TEST_F(DaemonTest, WithNoAuthConfigTheDaemonsOwnUidIsAdmin) {
  const std::string socket = socket_;
  IcecachedConfig c;
  c.mutable_listen()->set_unix_socket(socket);
  c.mutable_pool()->set_capacity_bytes(64 << 20);
  c.mutable_metrics()->set_port(0);
  ApplyDefaults(&c);
  ASSERT_THAT(ValidateConfig(c), IsOk());
  auto d = Daemon::Create(c);
  ASSERT_THAT(d, IsOk());
  daemon_ = *std::move(d);
  auto admin = v1::AdminService::NewStub(
      grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  v1::GetStatsResponse resp;
  const grpc::Status st = admin->GetStats(&ctx, v1::GetStatsRequest(), &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
}

TEST_F(DaemonTest, GetConfigRedactsTokens) {
  Start(true, "auth { tokens { token: \"secret-token-0123456789\" tenant: \"r\" } }");
  grpc::ClientContext ctx;
  v1::GetConfigResponse resp;
  ASSERT_TRUE(admin_->GetConfig(&ctx, v1::GetConfigRequest(), &resp).ok());
  EXPECT_EQ(resp.config().listen().unix_socket(), socket_);
  ASSERT_EQ(resp.config().auth().tokens_size(), 1);
  EXPECT_EQ(resp.config().auth().tokens(0).token(), "<redacted>");
}

TEST_F(DaemonTest, DrainRefusesNewSessionsKeepsExistingOnesAndReportsNotServing) {
  Start(true);
  const std::string id = CreateSession();
  EXPECT_EQ(HealthStatus(), 1);  // SERVING
  {
    grpc::ClientContext ctx;
    v1::DrainResponse resp;
    ASSERT_TRUE(admin_->Drain(&ctx, v1::DrainRequest(), &resp).ok());
    EXPECT_EQ(resp.sessions(), 1u);
  }
  EXPECT_EQ(HealthStatus(), 2);  // NOT_SERVING
  {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    *req.mutable_config() = Config();
    v1::CreateSessionResponse resp;
    EXPECT_EQ(sessions_->CreateSession(&ctx, req, &resp).error_code(),
              grpc::StatusCode::UNAVAILABLE);
  }
  {
    grpc::ClientContext ctx;  // existing sessions keep working
    v1::GetSessionRequest req;
    req.set_session_id(id);
    v1::GetSessionResponse resp;
    EXPECT_TRUE(sessions_->GetSession(&ctx, req, &resp).ok());
  }
  grpc::ClientContext ctx;
  v1::EvictSessionRequest req;
  req.set_session_id(id);
  v1::EvictSessionResponse resp;
  EXPECT_TRUE(admin_->EvictSession(&ctx, req, &resp).ok());
}

TEST_F(DaemonTest, ShutdownRemovesTheSocketFile) {
  Start(true);
  ASSERT_EQ(access(socket_.c_str(), F_OK), 0);
  daemon_->Shutdown();
  EXPECT_NE(access(socket_.c_str(), F_OK), 0) << "socket file removed at shutdown";
}

std::string ReadAll(const std::string& path) { return ReadFileToString(path).value_or(""); }

// A GET against the loopback metrics endpoint; status -1 when the request
// failed (no connection, no reply).
struct HttpReply {
  int status = -1;
  std::string content_type;
  std::string body;
};
HttpReply HttpGet(int port, const std::string& path) {
  httplib::Client http("127.0.0.1", port);
  http.set_connection_timeout(5);
  http.set_read_timeout(10);
  HttpReply reply;
  if (auto res = http.Get(path.c_str())) {
    reply.status = res->status;
    reply.content_type = res->get_header_value("Content-Type");
    reply.body = res->body;
  }
  return reply;
}

// Server reflection lists the icecache services. The request is encoded by
// hand (ServerReflectionRequest{list_services = ""}: field 7, empty string);
// no generated reflection stubs ship with Debian's gRPC.
TEST_F(DaemonTest, ReflectionListsTheServices) {
  Start(false);
  grpc::GenericStub generic(channel_);
  grpc::ClientContext ctx;
  grpc::CompletionQueue cq;
  auto call = generic.PrepareCall(
      &ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  auto step = [&](int tag) {
    void* got = nullptr;
    bool ok = false;
    if (!cq.Next(&got, &ok)) return false;
    return ok && got == reinterpret_cast<void*>(static_cast<intptr_t>(tag));
  };
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(step(1));
  const char kListServices[] = {0x3a, 0x00};
  grpc::Slice slice(kListServices, sizeof(kListServices));
  grpc::ByteBuffer request(&slice, 1);
  call->Write(request, reinterpret_cast<void*>(2));
  ASSERT_TRUE(step(2));
  grpc::ByteBuffer response;
  call->Read(&response, reinterpret_cast<void*>(3));
  ASSERT_TRUE(step(3));
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(response.Dump(&slices).ok());
  std::string bytes;
  for (const auto& sl : slices) bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  for (const char* service :
       {"icecache.v1.SessionService", "icecache.v1.BufferService", "icecache.v1.KvService",
        "icecache.v1.AdminService", "grpc.health.v1.Health"}) {
    EXPECT_THAT(bytes, HasSubstr(service));
  }
  call->WritesDone(reinterpret_cast<void*>(4));
  ASSERT_TRUE(step(4));
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  ASSERT_TRUE(step(5));
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(DaemonTest, MetricsEndpointServesPrometheusText) {
  Start(true, "", /*metrics=*/true);
  const int port = daemon_->metrics_port();
  ASSERT_GT(port, 0);
  CreateSession();
  const HttpReply reply = HttpGet(port, "/metrics");
  EXPECT_EQ(reply.status, 200);
  EXPECT_THAT(reply.content_type, HasSubstr("text/plain; version=0.0.4"));
  const std::string& metrics = reply.body;
  EXPECT_THAT(metrics, HasSubstr("icecache_pool_bytes{state=\"capacity\"} 67108864\n"));
  EXPECT_THAT(metrics, HasSubstr("icecache_sessions 1\n"));
  EXPECT_THAT(metrics, HasSubstr("icecache_session_events_total{event=\"created\"} 1\n"));
  EXPECT_THAT(
      metrics,
      HasSubstr("icecache_rpc_duration_seconds_bucket{method=\"CreateSession\",le=\"+Inf\"} 1\n"));
}

TEST_F(DaemonTest, MetricsShowTheQuotaLeftOnceATenantHasOne) {
  Start(true, "", /*metrics=*/true);
  const int port = daemon_->metrics_port();
  CreateSession();
  EXPECT_THAT(HttpGet(port, "/metrics").body,
              ::testing::Not(HasSubstr("icecache_tenant_free_bytes{")));
  grpc::ClientContext ctx;
  v1::SetQuotaRequest req;
  req.set_tenant(absl::StrCat("uid-", getuid()));
  req.set_quota_bytes(1 << 20);
  v1::SetQuotaResponse resp;
  ASSERT_TRUE(admin_->SetQuota(&ctx, req, &resp).ok());
  EXPECT_THAT(HttpGet(port, "/metrics").body,
              HasSubstr(absl::StrCat("icecache_tenant_free_bytes{tenant=\"uid-", getuid(),
                                     "\"} 1048576\n")));
}

TEST_F(DaemonTest, HealthzTurns503WhileDraining) {
  Start(true, "", /*metrics=*/true);
  const int port = daemon_->metrics_port();
  EXPECT_EQ(HttpGet(port, "/healthz").status, 200);
  daemon_->BeginDrain();
  EXPECT_EQ(HttpGet(port, "/healthz").status, 503);
  EXPECT_THAT(HttpGet(port, "/metrics").body, HasSubstr("icecache_draining 1\n"));
}

// pool.prefault: the daemon faults its whole arena in on a background
// thread and says ready once it is done; the metrics show how much and how
// long (the pool's own test checks the pages are resident with mincore).
TEST_F(DaemonTest, PoolPrefaultFaultsTheArenaInThenReportsReady) {
  Start(true, "pool { prefault: true }", /*metrics=*/true);
  ASSERT_TRUE(daemon_->WaitUntilReady());
  EXPECT_TRUE(daemon_->ready());
  EXPECT_EQ(HealthStatus(), 1);  // SERVING
  const int port = daemon_->metrics_port();
  EXPECT_EQ(HttpGet(port, "/healthz").status, 200);
  const std::string metrics = HttpGet(port, "/metrics").body;
  EXPECT_THAT(metrics,
              HasSubstr(absl::StrCat("\nicecache_pool_prefaulted_bytes ", 64 << 20, "\n")));
  EXPECT_THAT(metrics, HasSubstr("\nicecache_pool_prefault_seconds "));
  // And a quarter of the pool's worth of append staging, kept.
  EXPECT_THAT(metrics,
              HasSubstr(absl::StrCat("\nicecache_staging_reserve_bytes ", 16 << 20, "\n")));
  // Sessions work as usual on the faulted-in arena.
  const std::string id = CreateSession();
  EXPECT_FALSE(id.empty());
}

TEST_F(DaemonTest, PoolPrefaultKeepsTheStagingReserveItIsGiven) {
  Start(true, "pool { prefault: true staging_reserve_bytes: 7340033 }", /*metrics=*/true);
  ASSERT_TRUE(daemon_->WaitUntilReady());
  // Whole 2 MiB pages, rounded down.
  EXPECT_THAT(HttpGet(daemon_->metrics_port(), "/metrics").body,
              HasSubstr(absl::StrCat("\nicecache_staging_reserve_bytes ", 6 << 20, "\n")));
}

TEST_F(DaemonTest, WithoutPoolPrefaultTheDaemonIsReadyAtOnceAndExportsNoPrefaultFigures) {
  Start(true, "", /*metrics=*/true);
  EXPECT_TRUE(daemon_->WaitUntilReady());
  const std::string metrics = HttpGet(daemon_->metrics_port(), "/metrics").body;
  EXPECT_THAT(metrics, ::testing::Not(HasSubstr("\nicecache_pool_prefaulted_bytes ")));
  EXPECT_THAT(metrics, ::testing::Not(HasSubstr("\nicecache_staging_reserve_bytes ")));
}

// A daemon with a TLS TCP listener on a free port and two bearer tokens:
// tenant "r" and admin tenant "ops". Skips where openssl cannot make a
// throwaway certificate.
class DaemonTcpTest : public DaemonTest {
 protected:
  void StartTcp() {
    const std::string cert = dir_ + "/cert.pem", key = dir_ + "/key.pem";
    const std::string cmd = absl::StrCat(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ", key, " -out ", cert,
        " -days 1 -subj /CN=localhost -addext subjectAltName=DNS:localhost >/dev/null 2>&1");
    if (std::system(cmd.c_str()) != 0) GTEST_SKIP() << "openssl cannot make a test certificate";
    Start(true, absl::StrCat("listen { tcp_address: \"127.0.0.1:0\" tls_cert_file: \"", cert,
                             "\" tls_key_file: \"", key, "\" }\n", "auth { tokens { token: \"",
                             kTenantToken, "\" tenant: \"r\" }\n", "       tokens { token: \"",
                             kAdminToken, "\" tenant: \"ops\" admin: true } }"));
    ASSERT_GT(daemon_->tcp_port(), 0);
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = ReadAll(cert);
    grpc::ChannelArguments args;
    args.SetSslTargetNameOverride("localhost");
    auto tcp = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", daemon_->tcp_port()),
                                         grpc::SslCredentials(ssl), args);
    tcp_sessions_ = v1::SessionService::NewStub(tcp);
    tcp_admin_ = v1::AdminService::NewStub(tcp);
  }

  // CreateSession over TCP with `token` (none when null): status and tenant.
  std::pair<grpc::Status, std::string> CreateOverTcp(const char* token) {
    grpc::ClientContext ctx;
    if (token != nullptr) ctx.AddMetadata("authorization", absl::StrCat("Bearer ", token));
    v1::CreateSessionRequest req;
    *req.mutable_config() = Config();
    v1::CreateSessionResponse resp;
    grpc::Status st = tcp_sessions_->CreateSession(&ctx, req, &resp);
    return {st, resp.session().tenant()};
  }

  grpc::Status StatsOverTcp(const char* token, v1::GetStatsResponse* resp) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", absl::StrCat("Bearer ", token));
    return tcp_admin_->GetStats(&ctx, v1::GetStatsRequest(), resp);
  }

  static constexpr const char* kTenantToken = "tenant-r-token-0123456789";
  static constexpr const char* kAdminToken = "admin-token-0123456789ab";
  std::unique_ptr<v1::SessionService::Stub> tcp_sessions_;
  std::unique_ptr<v1::AdminService::Stub> tcp_admin_;
};

TEST_F(DaemonTcpTest, ABearerTokenMapsToItsTenant) {
  ASSERT_NO_FATAL_FAILURE(StartTcp());
  const auto [st, tenant] = CreateOverTcp(kTenantToken);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(tenant, "r");
}

TEST_F(DaemonTcpTest, MissingTokenIsUnauthenticatedAndWrongTokenPermissionDenied) {
  ASSERT_NO_FATAL_FAILURE(StartTcp());
  EXPECT_EQ(CreateOverTcp(nullptr).first.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(CreateOverTcp("wrong-token-0123456789").first.error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
}

TEST_F(DaemonTcpTest, AdminVerbsNeedAnAdminToken) {
  ASSERT_NO_FATAL_FAILURE(StartTcp());
  ASSERT_TRUE(CreateOverTcp(kTenantToken).first.ok());
  v1::GetStatsResponse resp;
  EXPECT_EQ(StatsOverTcp(kTenantToken, &resp).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  const grpc::Status st = StatsOverTcp(kAdminToken, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(resp.sessions(), 1u);
}

// The Unix-socket caller (an admin, but another tenant) cannot see or drop
// r's session through SessionService; only the explicit admin listing shows
// it, and only the admin verb evicts it.
TEST_F(DaemonTcpTest, AnotherTenantsSessionIsVisibleOnlyThroughAdminVerbs) {
  ASSERT_NO_FATAL_FAILURE(StartTcp());
  ASSERT_TRUE(CreateOverTcp(kTenantToken).first.ok());
  {
    grpc::ClientContext ctx;
    v1::ListSessionsResponse mine;
    ASSERT_TRUE(sessions_->ListSessions(&ctx, v1::ListSessionsRequest(), &mine).ok());
    EXPECT_EQ(mine.sessions_size(), 0);
  }
  std::string r_session;
  {
    grpc::ClientContext ctx;
    v1::ListSessionsRequest req;
    req.set_all_tenants(true);
    v1::ListSessionsResponse all;
    ASSERT_TRUE(sessions_->ListSessions(&ctx, req, &all).ok());
    ASSERT_EQ(all.sessions_size(), 1);
    EXPECT_EQ(all.sessions(0).tenant(), "r");
    r_session = all.sessions(0).session_id();
  }
  {
    grpc::ClientContext ctx;
    v1::GetSessionRequest req;
    req.set_session_id(r_session);
    v1::GetSessionResponse resp;
    EXPECT_EQ(sessions_->GetSession(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    v1::DropSessionRequest req;
    req.set_session_id(r_session);
    v1::DropSessionResponse resp;
    EXPECT_EQ(sessions_->DropSession(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  grpc::ClientContext ctx;
  v1::EvictSessionRequest req;
  req.set_session_id(r_session);
  v1::EvictSessionResponse resp;
  EXPECT_TRUE(admin_->EvictSession(&ctx, req, &resp).ok());
}

}  // namespace
}  // namespace icecache::rpc
