// KvService's layer-range AppendKv and batched DecodeStep through the daemon
// in-process: real Unix socket, real gRPC stubs, real core and shm buffer.
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/shm_file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/rpc/config.h"
#include "server/rpc/daemon.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache::rpc {
namespace {

using ::icecache::testing::IsOk;
using ::testing::HasSubstr;

constexpr int kLayers = 2, kKvHeads = 2, kQHeads = 4, kHeadDim = 16, kPageTokens = 4;

class DecodeRpcTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::icecache::testing::TempPathTemplate("icecache_drt_");
    dir_ = mkdtemp(tmpl.data());
    IcecachedConfig c;
    c.mutable_listen()->set_unix_socket(dir_ + "/d.sock");
    c.mutable_pool()->set_capacity_bytes(64 << 20);
    c.mutable_metrics()->set_port(0);
    c.set_worker_threads(1);
    ApplyDefaults(&c);
    ASSERT_THAT(ValidateConfig(c), IsOk());
    auto d = Daemon::Create(c);
    ASSERT_THAT(d, IsOk());
    daemon_ = *std::move(d);
    auto channel =
        grpc::CreateChannel("unix:" + dir_ + "/d.sock", grpc::InsecureChannelCredentials());
    sessions_ = v1::SessionService::NewStub(channel);
    buffers_ = v1::BufferService::NewStub(channel);
    kv_ = v1::KvService::NewStub(channel);
  }
  void TearDown() override {
    daemon_.reset();
    std::system(("rm -rf " + dir_).c_str());
  }

  std::string CreateSession() {
    grpc::ClientContext ctx;
    v1::CreateSessionRequest req;
    auto* m = req.mutable_config()->mutable_model();
    m->set_layers(kLayers);
    m->set_kv_heads(kKvHeads);
    m->set_q_heads(kQHeads);
    m->set_head_dim(kHeadDim);
    m->set_dtype(v1::DTYPE_FLOAT32);
    req.mutable_config()->set_page_tokens(kPageTokens);
    req.mutable_config()->mutable_selector()->set_kind(v1::SELECTOR_KIND_EXACT);
    v1::CreateSessionResponse resp;
    const grpc::Status st = sessions_->CreateSession(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.session().session_id();
  }

  // keys then values, [layers][kv_heads][n][head_dim] fp32.
  static std::vector<float> MakeKv(int n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist;
    std::vector<float> kv(2ull * kLayers * kKvHeads * n * kHeadDim);
    for (float& x : kv) x = dist(rng);
    return kv;
  }

  std::string dir_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<v1::SessionService::Stub> sessions_;
  std::unique_ptr<v1::BufferService::Stub> buffers_;
  std::unique_ptr<v1::KvService::Stub> kv_;
};

// AppendKv by layer ranges, GetSession's progress, then one batched
// DecodeStep whose middle entry is bad: it fails alone, nothing is written
// for it, the stream goes on.
TEST_F(DecodeRpcTest, LayerRangeAppendsAndABatchedDecodeStep) {
  constexpr int kTokens = 32;
  std::vector<std::string> ids;
  for (int s = 0; s < 2; ++s) {
    ids.push_back(CreateSession());
    const std::vector<float> kv = MakeKv(kTokens, 11 + s);
    const size_t layer_floats = static_cast<size_t>(kKvHeads) * kTokens * kHeadDim;
    for (int layer = 0; layer < kLayers; ++layer) {
      std::string bytes;
      for (size_t half : {size_t{0}, layer_floats * kLayers}) {
        bytes.append(reinterpret_cast<const char*>(kv.data() + half + layer * layer_floats),
                     layer_floats * 4);
      }
      grpc::ClientContext ctx;
      v1::AppendKvRequest req;
      req.set_session_id(ids.back());
      req.set_num_tokens(kTokens);
      req.set_first_layer(layer);
      req.set_num_layers(1);
      req.set_inline_kv(bytes);
      v1::AppendKvResponse resp;
      const grpc::Status st = kv_->AppendKv(&ctx, req, &resp);
      ASSERT_TRUE(st.ok()) << st.error_message();
      EXPECT_EQ(resp.tokens(), layer + 1 == kLayers ? uint64_t{kTokens} : 0u);
      EXPECT_EQ(resp.next_layer(), layer + 1 == kLayers ? 0u : uint32_t(layer + 1));
      grpc::ClientContext gctx;
      v1::GetSessionRequest greq;
      greq.set_session_id(ids.back());
      v1::GetSessionResponse gresp;
      ASSERT_TRUE(sessions_->GetSession(&gctx, greq, &gresp).ok());
      EXPECT_EQ(gresp.session().trees_built(), uint32_t((layer + 1) * kKvHeads));
      EXPECT_EQ(gresp.session().trees_total(), uint32_t(kLayers * kKvHeads));
    }
  }
  const uint64_t buf_size = 1 << 20;
  auto shm = ShmFile::Create(absl::StrCat("icecache_dtb_", getpid(), "_", rand()), buf_size);
  ASSERT_THAT(shm, IsOk());
  std::memset(shm->data(), 0xAB, buf_size);
  grpc::ClientContext rctx;
  v1::RegisterBufferRequest rreq;
  rreq.mutable_host_shm()->set_path(shm->path());
  rreq.mutable_host_shm()->set_size(buf_size);
  v1::RegisterBufferResponse rresp;
  ASSERT_TRUE(buffers_->RegisterBuffer(&rctx, rreq, &rresp).ok());

  std::vector<float> q(kQHeads * kHeadDim, 0.25f);
  const std::string qbytes(reinterpret_cast<const char*>(q.data()), q.size() * 4);
  grpc::ClientContext ctx;
  auto stream = kv_->DecodeStep(&ctx);
  v1::DecodeStepRequest req;
  req.set_layer(1);
  req.set_buffer_id(rresp.buffer_id());
  req.mutable_params()->set_budget_tokens(8);
  for (int i = 0; i < 3; ++i) {
    v1::DecodeBatchEntry* e = req.add_batch();
    e->set_session_id(ids[i % 2]);
    e->set_offset(i * 65536);
    e->set_queries(i == 1 ? qbytes.substr(4) : qbytes);  // entry 1: one float short
  }
  ASSERT_TRUE(stream->Write(req));
  v1::DecodeStepResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  ASSERT_EQ(resp.batch_size(), 3);
  EXPECT_EQ(resp.batch(1).code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_THAT(resp.batch(1).message(), HasSubstr("batch entry 1 (session " + ids[1]));
  for (int b = 0; b < 65536; ++b) ASSERT_EQ(shm->data()[65536 + b], 0xAB) << "entry 1 wrote";
  for (int i : {0, 2}) {
    EXPECT_EQ(resp.batch(i).code(), 0) << resp.batch(i).message();
    EXPECT_EQ(resp.batch(i).session_id(), ids[i % 2]);
    EXPECT_EQ(resp.batch(i).heads_size(), kKvHeads);
    EXPECT_EQ(resp.batch(i).layout().offset(), uint64_t(i) * 65536);
  }
  // The stream goes on; a request that mixes its own session with a batch ends it.
  req.set_session_id(ids[0]);
  ASSERT_TRUE(stream->Write(req));
  stream->WritesDone();
  EXPECT_FALSE(stream->Read(&resp));
  const grpc::Status st = stream->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
}

}  // namespace
}  // namespace icecache::rpc
