// The bad-input matrix: for every RPC, malformed and hostile requests sent
// through the raw generated stubs (the typed client would refuse to build
// most of them). Each gets the right canonical code and a message that says
// what is wrong, and afterwards the daemon serves a good request normally.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <limits>

#include "client/client_internal.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
namespace v1 = ::icecache::v1;
using Code = absl::StatusCode;

constexpr int kTokens = 256;

// The status code is one of two (where the API allows either).
MATCHER_P2(StatusIsEither, a, b,
           "has code " + absl::StatusCodeToString(a) + " or " + absl::StatusCodeToString(b)) {
  const absl::Status& s = ::icecache::testing::GetStatus(arg);
  *result_listener << "status is " << s;
  return s.code() == a || s.code() == b;
}

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto d =
        StartDaemon("limits { max_receive_message_bytes: 4194304 max_inline_bytes: 1048576 }\n");
    ASSERT_THAT(d, IsOk());
    daemon_ = *std::move(d);
    auto c = Connect(*daemon_);
    ASSERT_THAT(c, IsOk());
    client_ = *std::move(c);
    model_ = std::make_unique<TestModel>(MakeModel(2, 2, kTokens, 2));
    auto s = client_->CreateSession(model_->spec);
    ASSERT_THAT(s, IsOk());
    session_ = s->id;
    ASSERT_THAT(client_->AppendKvInline(session_, model_->kv.Chunk(0, kTokens), kTokens), IsOk());
    auto b = client_->CreateShmBuffer(1 << 20);
    ASSERT_THAT(b, IsOk());
    buffer_ = std::make_unique<ShmBuffer>(*std::move(b));
  }
  void TearDown() override {
    buffer_.reset();
    client_.reset();
    if (daemon_ != nullptr) {
      EXPECT_TRUE(daemon_->running()) << "the daemon died; stderr:\n" << daemon_->Stderr();
    }
  }

  Client::Impl& raw() { return *client_->impl(); }
  std::unique_ptr<grpc::ClientContext> Ctx() { return raw().NewContext(); }

  // A good select + fetch, checked byte for byte: the daemon still serves.
  void ExpectServesGoodRequest() {
    SelectOptions opt;
    opt.budget_tokens = 32;
    opt.want_positions = true;
    auto r = client_->DecodeStep(session_, 1, Queries(*model_, 0, 1), buffer_->buffer_id(), 0, opt);
    ASSERT_THAT(r, IsOk()) << "daemon stderr:\n" << daemon_->Stderr();
    auto n =
        VerifyFetch(model_->kv, kTokens, r->layout, r->heads, buffer_->data(), buffer_->size());
    ASSERT_THAT(n, IsOk());
    EXPECT_GT(*n, 0);
    auto info = client_->GetSession(session_);
    ASSERT_THAT(info, IsOk());
    EXPECT_EQ(info->tokens, static_cast<uint64_t>(kTokens));
  }

  std::string QueryBytes(int floats, float fill = 0.5f) {
    std::vector<float> q(floats, fill);
    return std::string(reinterpret_cast<const char*>(q.data()), q.size() * sizeof(float));
  }
  int QFloats() const { return model_->spec.q_heads * model_->spec.head_dim; }

  absl::Status Create(const std::function<void(v1::SessionConfig*)>& mutate) {
    v1::CreateSessionRequest req;
    ToProto(model_->spec, req.mutable_config());
    mutate(req.mutable_config());
    v1::CreateSessionResponse resp;
    auto ctx = Ctx();
    return FromGrpcStatus(raw().sessions->CreateSession(ctx.get(), req, &resp));
  }
  absl::Status Register(const std::string& path, uint64_t size) {
    return client_->RegisterShm(path, size).status();
  }
  absl::Status Append(const v1::AppendKvRequest& req) {
    v1::AppendKvResponse resp;
    auto ctx = Ctx();
    return FromGrpcStatus(raw().kv->AppendKv(ctx.get(), req, &resp));
  }
  absl::Status Select(const v1::SelectPagesRequest& req) {
    v1::SelectPagesResponse resp;
    auto ctx = Ctx();
    return FromGrpcStatus(raw().kv->SelectPages(ctx.get(), req, &resp));
  }
  absl::Status Fetch(const v1::FetchPagesRequest& req) {
    v1::FetchPagesResponse resp;
    auto ctx = Ctx();
    return FromGrpcStatus(raw().kv->FetchPages(ctx.get(), req, &resp));
  }
  v1::SelectPagesRequest GoodSelect() {
    v1::SelectPagesRequest req;
    req.set_session_id(session_);
    req.set_layer(0);
    req.set_queries(QueryBytes(QFloats()));
    req.mutable_params()->set_budget_tokens(32);
    return req;
  }
  v1::FetchPagesRequest GoodFetch() {
    v1::FetchPagesRequest req;
    req.set_session_id(session_);
    req.set_layer(0);
    for (uint32_t h = 0; h < 2; ++h) {
      auto* hp = req.add_heads();
      hp->set_kv_head(h);
      hp->add_pages(0);
    }
    req.set_buffer_id(buffer_->buffer_id());
    req.set_offset(0);
    return req;
  }
  // A fresh file under /dev/shm of `size` bytes, owned by us; removed by the
  // fixture.
  std::string MakeShmFile(size_t size, const std::string& tag) {
    std::string path = "/dev/shm/icecache-test-" + std::to_string(::getpid()) + "-" + tag;
    ::unlink(path.c_str());
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd, 0) << path;
    EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(size)), 0);
    ::close(fd);
    cleanup_.push_back(path);
    return path;
  }
  ~BadInputTest() override {
    for (const auto& p : cleanup_) ::unlink(p.c_str());
  }

  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<TestModel> model_;
  std::string session_;
  std::unique_ptr<ShmBuffer> buffer_;
  std::vector<std::string> cleanup_;
};

TEST_F(BadInputTest, CreateSessionRejectsEachBadFieldAndNamesIt) {
  struct Case {
    const char* field;
    std::function<void(v1::SessionConfig*)> mutate;
  };
  const std::vector<Case> cases = {
      {"layers", [](v1::SessionConfig* c) { c->mutable_model()->set_layers(0); }},
      {"layers", [](v1::SessionConfig* c) { c->mutable_model()->set_layers(100000); }},
      {"kv_heads", [](v1::SessionConfig* c) { c->mutable_model()->set_kv_heads(0); }},
      {"q_heads", [](v1::SessionConfig* c) { c->mutable_model()->set_q_heads(3); }},
      {"head_dim", [](v1::SessionConfig* c) { c->mutable_model()->set_head_dim(0); }},
      {"head_dim", [](v1::SessionConfig* c) { c->mutable_model()->set_head_dim(4096); }},
      {"dtype", [](v1::SessionConfig* c) { c->mutable_model()->set_dtype(v1::DTYPE_UNSPECIFIED); }},
      {"dtype",
       [](v1::SessionConfig* c) { c->mutable_model()->set_dtype(static_cast<v1::DType>(77)); }},
      {"page_tokens", [](v1::SessionConfig* c) { c->set_page_tokens(300); }},
      {"layer_reuse", [](v1::SessionConfig* c) { c->set_layer_reuse(3); }},
      {"ttl", [](v1::SessionConfig* c) { c->set_ttl_ms(1); }},
      {"ttl", [](v1::SessionConfig* c) { c->set_ttl_ms(std::numeric_limits<uint64_t>::max()); }},
      {"selector",
       [](v1::SessionConfig* c) {
         c->mutable_selector()->set_kind(static_cast<v1::SelectorKind>(42));
       }},
      {"budget", [](v1::SessionConfig* c) { c->mutable_defaults()->set_budget_tokens(0); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.field);
    EXPECT_THAT(Create(c.mutate), StatusIs(Code::kInvalidArgument, HasSubstr(c.field)));
  }
  v1::CreateSessionRequest empty;
  v1::CreateSessionResponse resp;
  auto ctx = Ctx();
  EXPECT_THAT(FromGrpcStatus(raw().sessions->CreateSession(ctx.get(), empty, &resp)),
              StatusIs(Code::kInvalidArgument));
  ExpectServesGoodRequest();
}

TEST_F(BadInputTest, SessionVerbsOnUnknownAndEmptyIds) {
  for (const std::string& id :
       std::vector<std::string>{"no-such-session", "../../etc/passwd", std::string(5000, 'x')}) {
    EXPECT_THAT(client_->GetSession(id), StatusIsEither(Code::kNotFound, Code::kInvalidArgument));
    EXPECT_THAT(client_->DropSession(id), StatusIsEither(Code::kNotFound, Code::kInvalidArgument));
    EXPECT_THAT(client_->KeepAlive({id}), StatusIsEither(Code::kNotFound, Code::kInvalidArgument));
  }
  EXPECT_THAT(client_->GetSession("no-such-session"), StatusIs(Code::kNotFound));
  EXPECT_THAT(client_->GetSession(""), StatusIs(Code::kInvalidArgument));
  EXPECT_THAT(client_->DropSession(""), StatusIs(Code::kInvalidArgument));
  EXPECT_THAT(client_->KeepAlive({}), StatusIs(Code::kInvalidArgument));
  std::vector<std::string> many(1025, session_);
  EXPECT_THAT(client_->KeepAlive(many), StatusIs(Code::kInvalidArgument));
  ExpectServesGoodRequest();
}

TEST_F(BadInputTest, RegisterBufferRefusesHostilePaths) {
  const std::string good = MakeShmFile(8192, "good");
  // Outside /dev/shm, relative, dot-dot escapes.
  const std::string tmp = daemon_->temp_dir() + "/outside";
  {
    int fd = ::open(tmp.c_str(), O_RDWR | O_CREAT, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, 8192), 0);
    ::close(fd);
  }
  EXPECT_THAT(Register(tmp, 4096), StatusIs(Code::kInvalidArgument, HasSubstr("/dev/shm")));
  EXPECT_THAT(Register("icecache-relative", 4096), StatusIs(Code::kInvalidArgument));
  EXPECT_THAT(Register("", 4096), StatusIs(Code::kInvalidArgument));
  EXPECT_THAT(Register("/dev/shm/../../etc/passwd", 4096), StatusIs(Code::kInvalidArgument));
  EXPECT_THAT(Register("/dev/shm/../" + tmp, 4096), StatusIs(Code::kInvalidArgument));
  // A symlink under /dev/shm, to a file outside and to a good file inside.
  const std::string link_out = "/dev/shm/icecache-test-" + std::to_string(::getpid()) + "-lnout";
  const std::string link_in = "/dev/shm/icecache-test-" + std::to_string(::getpid()) + "-lnin";
  ::unlink(link_out.c_str());
  ::unlink(link_in.c_str());
  ASSERT_EQ(::symlink(tmp.c_str(), link_out.c_str()), 0);
  ASSERT_EQ(::symlink(good.c_str(), link_in.c_str()), 0);
  cleanup_.push_back(link_out);
  cleanup_.push_back(link_in);
  EXPECT_THAT(Register(link_out, 4096), StatusIs(Code::kInvalidArgument, HasSubstr("symlink")));
  EXPECT_THAT(Register(link_in, 4096), StatusIs(Code::kInvalidArgument, HasSubstr("symlink")));
  // Missing file, a directory, size 0, size lies.
  EXPECT_THAT(Register("/dev/shm/icecache-test-does-not-exist", 4096), StatusIs(Code::kNotFound));
  const std::string dir = "/dev/shm/icecache-test-" + std::to_string(::getpid()) + "-dir";
  ::mkdir(dir.c_str(), 0700);
  EXPECT_THAT(Register(dir, 4096), StatusIs(Code::kInvalidArgument));
  ::rmdir(dir.c_str());
  EXPECT_THAT(Register(good, 0), StatusIs(Code::kInvalidArgument));
  EXPECT_THAT(Register(good, 8193), StatusIs(Code::kInvalidArgument, HasSubstr("size")));
  EXPECT_THAT(Register(good, std::numeric_limits<uint64_t>::max()),
              StatusIs(Code::kInvalidArgument));
  // Owned by another uid.
  if (::geteuid() == 0) {
    const std::string other = MakeShmFile(8192, "other");
    ASSERT_EQ(::chown(other.c_str(), kOtherUid, kOtherUid), 0);
    EXPECT_THAT(Register(other, 4096), StatusIs(Code::kPermissionDenied));
  }
  // Neither kind; CUDA_IPC with a short handle; a well-formed one without a
  // device.
  {
    v1::RegisterBufferRequest req;
    v1::RegisterBufferResponse resp;
    auto ctx = Ctx();
    EXPECT_THAT(FromGrpcStatus(raw().buffers->RegisterBuffer(ctx.get(), req, &resp)),
                StatusIs(Code::kInvalidArgument));
  }
  {
    v1::RegisterBufferRequest req;
    req.mutable_cuda_ipc()->set_handle(std::string(10, 'h'));
    req.mutable_cuda_ipc()->set_size(4096);
    req.mutable_cuda_ipc()->set_device_uuid(std::string(16, 'u'));
    v1::RegisterBufferResponse resp;
    auto ctx = Ctx();
    EXPECT_THAT(FromGrpcStatus(raw().buffers->RegisterBuffer(ctx.get(), req, &resp)),
                StatusIs(Code::kInvalidArgument, HasSubstr("64")));
  }
  {
    v1::RegisterBufferRequest req;
    req.mutable_cuda_ipc()->set_handle(std::string(64, 'h'));
    req.mutable_cuda_ipc()->set_size(4096);
    req.mutable_cuda_ipc()->set_device_uuid(std::string(16, 'u'));
    v1::RegisterBufferResponse resp;
    auto ctx = Ctx();
    EXPECT_THAT(FromGrpcStatus(raw().buffers->RegisterBuffer(ctx.get(), req, &resp)),
                StatusIsEither(Code::kFailedPrecondition, Code::kNotFound));
  }
  {
    // A paged KV cache layout that does not fit the size: refused by its form,
    // naming the field, with or without a device.
    v1::RegisterBufferRequest req;
    req.mutable_cuda_ipc()->set_handle(std::string(64, 'h'));
    req.mutable_cuda_ipc()->set_size(4096);
    req.mutable_cuda_ipc()->set_device_uuid(std::string(16, 'u'));
    v1::PagedKvCache* kv = req.mutable_cuda_ipc()->mutable_paged_kv();
    kv->set_format(v1::PAGED_KV_FORMAT_VLLM_FLASH);
    kv->set_num_layers(2);
    kv->set_num_blocks(16);
    kv->set_block_tokens(16);
    kv->set_kv_heads(2);
    kv->set_head_dim(64);
    kv->set_dtype(v1::DTYPE_FLOAT16);
    v1::RegisterBufferResponse resp;
    auto ctx = Ctx();
    EXPECT_THAT(FromGrpcStatus(raw().buffers->RegisterBuffer(ctx.get(), req, &resp)),
                StatusIs(Code::kOutOfRange, HasSubstr("paged_kv")));
    kv->set_format(v1::PAGED_KV_FORMAT_UNSPECIFIED);
    auto ctx2 = Ctx();
    EXPECT_THAT(FromGrpcStatus(raw().buffers->RegisterBuffer(ctx2.get(), req, &resp)),
                StatusIs(Code::kInvalidArgument, HasSubstr("paged_kv.format")));
  }
  EXPECT_THAT(client_->UnregisterBuffer(""), StatusIs(Code::kInvalidArgument));
  EXPECT_THAT(client_->UnregisterBuffer("no-such-buffer"), StatusIs(Code::kNotFound));
  // The good file registers.
  auto id = client_->RegisterShm(good, 8192);
  ASSERT_THAT(id, IsOk());
  EXPECT_THAT(client_->UnregisterBuffer(*id), IsOk());
  EXPECT_THAT(client_->UnregisterBuffer(*id), StatusIs(Code::kNotFound));
  ExpectServesGoodRequest();
}

TEST_F(BadInputTest, AppendKvRejectsBadShapesNanAndRegionsChangingNothing) {
  const std::vector<uint8_t> one = model_->kv.Chunk(0, 1);
  auto base = [&] {
    v1::AppendKvRequest req;
    req.set_session_id(session_);
    req.set_num_tokens(1);
    req.set_inline_kv(reinterpret_cast<const char*>(one.data()), one.size());
    return req;
  };
  {
    auto req = base();
    req.set_session_id("no-such-session");
    EXPECT_THAT(Append(req), StatusIs(Code::kNotFound));
  }
  {
    auto req = base();
    req.set_num_tokens(0);
    EXPECT_THAT(Append(req), StatusIs(Code::kInvalidArgument));
  }
  {
    auto req = base();
    req.set_num_tokens(2);  // bytes for one token
    EXPECT_THAT(Append(req), StatusIs(Code::kInvalidArgument, HasSubstr("bytes")));
  }
  {
    auto req = base();
    req.mutable_inline_kv()->pop_back();
    EXPECT_THAT(Append(req), StatusIs(Code::kInvalidArgument));
  }
  {
    auto req = base();
    req.clear_inline_kv();
    EXPECT_THAT(Append(req), StatusIs(Code::kInvalidArgument));
  }
  {
    // NaN in a key (fp16 0x7e00) of layer 0.
    auto req = base();
    std::string bytes = req.inline_kv();
    bytes[0] = 0x00;
    bytes[1] = 0x7e;
    req.set_inline_kv(bytes);
    EXPECT_THAT(Append(req), StatusIs(Code::kInvalidArgument, HasSubstr("NaN")));
  }
  {
    // Inf in a value (fp16 0x7c00) of layer 1, kv head 1: refused like keys,
    // naming where it is.
    auto req = base();
    std::string bytes = req.inline_kv();
    const size_t last_value = bytes.size() - 2;
    bytes[last_value] = 0x00;
    bytes[last_value + 1] = 0x7c;
    req.set_inline_kv(bytes);
    EXPECT_THAT(Append(req), StatusIs(Code::kInvalidArgument,
                                      HasSubstr("value of layer 1, kv head 1, token 0 is NaN")));
  }
  {
    // Inline bytes above max_inline_bytes (1 MiB), message still < 4 MiB.
    const uint32_t n = 2100;  // 2 x 2 x 2 x 2100 x 64 x 2 = 2.05 MiB
    v1::AppendKvRequest req;
    req.set_session_id(session_);
    req.set_num_tokens(n);
    req.set_inline_kv(std::string(model_->spec.ChunkBytes(n), '\0'));
    EXPECT_THAT(Append(req), StatusIs(Code::kInvalidArgument, HasSubstr("inline")));
  }
  {
    // A message above max_receive_message_bytes (4 MiB).
    v1::AppendKvRequest req;
    req.set_session_id(session_);
    req.set_num_tokens(1);
    req.set_inline_kv(std::string(5 << 20, '\0'));
    EXPECT_THAT(Append(req), StatusIs(Code::kResourceExhausted));
  }
  // Regions: unknown buffer, past the end, overflowing offset, length != chunk.
  auto region = [&](const std::string& id, uint64_t offset, uint64_t length, uint32_t n) {
    v1::AppendKvRequest req;
    req.set_session_id(session_);
    req.set_num_tokens(n);
    req.mutable_region()->set_buffer_id(id);
    req.mutable_region()->set_offset(offset);
    req.mutable_region()->set_length(length);
    return req;
  };
  const uint64_t chunk16 = model_->spec.ChunkBytes(16);
  EXPECT_THAT(Append(region("no-such-buffer", 0, chunk16, 16)), StatusIs(Code::kNotFound));
  EXPECT_THAT(Append(region(buffer_->buffer_id(), buffer_->size() - 100, chunk16, 16)),
              StatusIsEither(Code::kOutOfRange, Code::kInvalidArgument));
  EXPECT_THAT(
      Append(region(buffer_->buffer_id(), std::numeric_limits<uint64_t>::max() - 10, chunk16, 16)),
      StatusIsEither(Code::kOutOfRange, Code::kInvalidArgument));
  EXPECT_THAT(Append(region(buffer_->buffer_id(), 0, chunk16 - 2, 16)),
              StatusIs(Code::kInvalidArgument));
  // None of it changed the session.
  auto info = client_->GetSession(session_);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->tokens, static_cast<uint64_t>(kTokens));
  ExpectServesGoodRequest();
}

TEST_F(BadInputTest, SelectPagesRejectsBadLayersShapesNanAndBudgets) {
  {
    auto req = GoodSelect();
    req.set_session_id("no-such-session");
    EXPECT_THAT(Select(req), StatusIs(Code::kNotFound));
  }
  {
    auto req = GoodSelect();
    req.set_layer(2);
    EXPECT_THAT(Select(req), StatusIs(Code::kInvalidArgument, HasSubstr("layer")));
  }
  {
    auto req = GoodSelect();
    req.set_layer(std::numeric_limits<uint32_t>::max());
    EXPECT_THAT(Select(req), StatusIs(Code::kInvalidArgument, HasSubstr("layer")));
  }
  for (int floats : {0, QFloats() - 1, QFloats() + 1, 2 * QFloats()}) {
    auto req = GoodSelect();
    req.set_queries(QueryBytes(floats));
    EXPECT_THAT(Select(req), StatusIs(Code::kInvalidArgument)) << floats << " floats";
  }
  {
    auto req = GoodSelect();
    req.mutable_queries()->push_back('x');  // not a whole float
    EXPECT_THAT(Select(req), StatusIs(Code::kInvalidArgument));
  }
  for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity()}) {
    auto req = GoodSelect();
    req.set_queries(QueryBytes(QFloats(), bad));
    EXPECT_THAT(Select(req),
                StatusIs(Code::kInvalidArgument,
                         AnyOf(HasSubstr("NaN"), HasSubstr("finite"), HasSubstr("Inf"))));
  }
  {
    auto req = GoodSelect();
    req.set_query_dtype(static_cast<v1::DType>(99));
    EXPECT_THAT(Select(req), StatusIs(Code::kInvalidArgument));
  }
  {
    auto req = GoodSelect();
    req.mutable_params()->set_budget_tokens(0);
    EXPECT_THAT(Select(req), StatusIs(Code::kInvalidArgument, HasSubstr("budget")));
  }
  {
    // A budget above the session's tokens is clamped (types.proto): every
    // token is selected exactly once, never more.
    auto req = GoodSelect();
    req.mutable_params()->set_budget_tokens(kTokens + 1);
    v1::SelectPagesResponse resp;
    auto ctx = Ctx();
    ASSERT_THAT(FromGrpcStatus(raw().kv->SelectPages(ctx.get(), req, &resp)), IsOk());
    ASSERT_EQ(resp.heads_size(), 2);
    for (const auto& h : resp.heads()) {
      int64_t filled = 0;
      for (uint32_t f : h.fills()) filled += f;
      EXPECT_EQ(filled, kTokens) << "a clamped budget selects every token exactly once";
    }
  }
  {
    // An empty session has nothing to select from.
    auto empty = client_->CreateSession(model_->spec);
    ASSERT_THAT(empty, IsOk());
    auto req = GoodSelect();
    req.set_session_id(empty->id);
    EXPECT_THAT(Select(req), StatusIsEither(Code::kFailedPrecondition, Code::kInvalidArgument));
  }
  {
    // fp16 queries of the wrong byte count.
    auto req = GoodSelect();
    req.set_query_dtype(v1::DTYPE_FLOAT16);
    EXPECT_THAT(Select(req), StatusIs(Code::kInvalidArgument));
  }
  ExpectServesGoodRequest();
}

TEST_F(BadInputTest, FetchPagesRejectsBadPagesHeadsAndRegions) {
  {
    auto req = GoodFetch();
    req.set_session_id("no-such-session");
    EXPECT_THAT(Fetch(req), StatusIs(Code::kNotFound));
  }
  {
    auto req = GoodFetch();
    req.set_buffer_id("no-such-buffer");
    EXPECT_THAT(Fetch(req), StatusIs(Code::kNotFound));
  }
  {
    auto req = GoodFetch();
    req.mutable_heads(1)->set_pages(0, 1u << 30);
    EXPECT_THAT(Fetch(req), StatusIs(Code::kInvalidArgument, HasSubstr("page")));
  }
  {
    auto req = GoodFetch();
    req.mutable_heads()->RemoveLast();
    EXPECT_THAT(Fetch(req), StatusIs(Code::kInvalidArgument));
  }
  {
    auto req = GoodFetch();
    req.mutable_heads(0)->set_kv_head(1);
    EXPECT_THAT(Fetch(req), StatusIs(Code::kInvalidArgument));
  }
  {
    auto req = GoodFetch();
    req.set_layer(7);
    EXPECT_THAT(Fetch(req), StatusIs(Code::kInvalidArgument));
  }
  {
    auto req = GoodFetch();
    req.set_offset(buffer_->size() - 10);
    EXPECT_THAT(Fetch(req), StatusIs(Code::kOutOfRange));
  }
  {
    auto req = GoodFetch();
    req.set_offset(std::numeric_limits<uint64_t>::max() - 100);
    EXPECT_THAT(Fetch(req), StatusIs(Code::kOutOfRange));
  }
  {
    // Device fields on a HOST_SHM buffer.
    auto req = GoodFetch();
    req.add_block_ids(0);
    EXPECT_THAT(Fetch(req), StatusIs(Code::kInvalidArgument, HasSubstr("need a CUDA_IPC buffer")));
    req.clear_block_ids();
    req.set_done_event(std::string(64, 'e'));
    EXPECT_THAT(Fetch(req), StatusIs(Code::kInvalidArgument, HasSubstr("need a CUDA_IPC buffer")));
  }
  {
    // Many pages: a region far past the 1 MiB buffer.
    auto req = GoodFetch();
    for (int i = 0; i < 4000; ++i) req.mutable_heads(0)->add_pages(0);
    EXPECT_THAT(Fetch(req), StatusIs(Code::kOutOfRange));
  }
  // The buffer was not written by any refused fetch.
  std::memset(buffer_->data(), 0x5A, buffer_->size());
  {
    auto req = GoodFetch();
    req.set_offset(buffer_->size() - 10);
    EXPECT_THAT(Fetch(req), StatusIs(Code::kOutOfRange));
    for (size_t i = 0; i < buffer_->size(); ++i) ASSERT_EQ(buffer_->data()[i], 0x5A) << i;
  }
  ExpectServesGoodRequest();
}

// Finite float32 keys so large that a row's norm overflows: refused before
// anything is stored, naming where they are (they once failed inside the
// index build as "task 0: max key norm must be finite, got inf", and on a
// later append left the session unusable).
TEST_F(BadInputTest, HugeFiniteKeysAreRefusedNamingLayerHeadAndToken) {
  v1::CreateSessionRequest create;
  ToProto(model_->spec, create.mutable_config());
  create.mutable_config()->mutable_model()->set_dtype(v1::DTYPE_FLOAT32);
  v1::CreateSessionResponse created;
  {
    auto ctx = Ctx();
    ASSERT_THAT(FromGrpcStatus(raw().sessions->CreateSession(ctx.get(), create, &created)), IsOk());
  }
  const auto& m = create.config().model();
  const size_t floats = size_t{2} * m.layers() * m.kv_heads() * m.head_dim();  // one token
  std::vector<float> kv(floats, 0.25f);
  v1::AppendKvRequest req;
  req.set_session_id(created.session().session_id());
  req.set_num_tokens(1);
  req.set_inline_kv(reinterpret_cast<const char*>(kv.data()), kv.size() * 4);
  ASSERT_THAT(Append(req), IsOk());
  // Layer 1, kv head 1, dimension 3 of the key.
  kv[(size_t{1} * m.kv_heads() + 1) * m.head_dim() + 3] = 1e30f;
  req.set_inline_kv(reinterpret_cast<const char*>(kv.data()), kv.size() * 4);
  EXPECT_THAT(
      Append(req),
      StatusIs(Code::kInvalidArgument,
               HasSubstr("key of layer 1, kv head 1, token 0 has an element of magnitude")));
  // The session keeps its token and takes the next good append.
  kv.assign(floats, 0.5f);
  req.set_inline_kv(reinterpret_cast<const char*>(kv.data()), kv.size() * 4);
  EXPECT_THAT(Append(req), IsOk());
  auto info = client_->GetSession(created.session().session_id());
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->tokens, 2u);
}

// Peak resident bytes of a process (VmHWM), or -1.
int64_t PeakRssBytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

// A 100-byte request naming a region far larger than its buffer: refused
// before the daemon allocates anything for it (it once sized a staging copy
// from the session shape first: 16 GiB here).
TEST_F(BadInputTest, AppendFromARegionLargerThanItsBufferAllocatesNothing) {
  v1::CreateSessionRequest create;
  ToProto(model_->spec, create.mutable_config());
  auto* m = create.mutable_config()->mutable_model();
  m->set_layers(64);
  m->set_kv_heads(8);
  m->set_q_heads(8);
  m->set_head_dim(128);
  m->set_dtype(v1::DTYPE_FLOAT16);
  v1::CreateSessionResponse created;
  {
    auto ctx = Ctx();
    ASSERT_THAT(FromGrpcStatus(raw().sessions->CreateSession(ctx.get(), create, &created)), IsOk());
  }
  const int64_t peak_before = PeakRssBytes(daemon_->pid());
  ASSERT_GT(peak_before, 0);
  v1::AppendKvRequest req;
  req.set_session_id(created.session().session_id());
  req.set_num_tokens(65536);  // 64 x 8 x 65536 x 128 x 2 (K, V) x 2 bytes = 16 GiB
  req.mutable_region()->set_buffer_id(buffer_->buffer_id());
  req.mutable_region()->set_offset(0);
  EXPECT_THAT(Append(req), StatusIs(Code::kOutOfRange, HasSubstr("exceeds buffer size")));
  req.mutable_region()->set_offset(uint64_t{1} << 62);
  EXPECT_THAT(Append(req), StatusIs(Code::kOutOfRange, HasSubstr("exceeds buffer size")));
  const int64_t peak_after = PeakRssBytes(daemon_->pid());
  EXPECT_LT(peak_after - peak_before, int64_t{64} << 20)
      << "peak RSS grew from " << peak_before << " to " << peak_after << " bytes";
  ExpectServesGoodRequest();
}

TEST_F(BadInputTest, ShrunkBufferFileIsRefusedNotACrash) {
  const std::string path = MakeShmFile(1 << 20, "shrink");
  auto id = client_->RegisterShm(path, 1 << 20);
  ASSERT_THAT(id, IsOk());
  ASSERT_EQ(::truncate(path.c_str(), 4096), 0);  // lie after registering
  auto req = GoodFetch();
  req.set_buffer_id(*id);
  req.set_offset(512 << 10);
  EXPECT_THAT(Fetch(req), StatusIs(Code::kFailedPrecondition, HasSubstr("shr")));
  ExpectServesGoodRequest();
}

TEST_F(BadInputTest, DecodeStepStreamRejectsBadFirstRequestsAndNan) {
  auto stream_status = [&](const std::vector<v1::DecodeStepRequest>& reqs, int* responses) {
    auto ctx = raw().NewContext();
    auto stream = raw().kv->DecodeStep(ctx.get());
    *responses = 0;
    for (const auto& r : reqs) {
      if (!stream->Write(r)) break;
      v1::DecodeStepResponse resp;
      if (!stream->Read(&resp)) break;
      ++*responses;
    }
    stream->WritesDone();
    return FromGrpcStatus(stream->Finish());
  };
  v1::DecodeStepRequest good;
  good.set_session_id(session_);
  good.set_layer(0);
  good.set_queries(QueryBytes(QFloats()));
  good.mutable_params()->set_budget_tokens(32);
  good.set_buffer_id(buffer_->buffer_id());
  int n = 0;
  {
    auto r = good;
    r.clear_session_id();
    EXPECT_THAT(stream_status({r}, &n), StatusIs(Code::kInvalidArgument));
  }
  {
    auto r = good;
    r.clear_buffer_id();
    EXPECT_THAT(stream_status({r}, &n), StatusIs(Code::kInvalidArgument));
  }
  {
    auto r = good;
    r.set_session_id("no-such-session");
    EXPECT_THAT(stream_status({r}, &n), StatusIs(Code::kNotFound));
  }
  {
    // Good, good, then NaN: two answers, then the stream ends with the error.
    auto bad = good;
    bad.clear_session_id();
    bad.clear_buffer_id();
    bad.set_queries(QueryBytes(QFloats(), std::nanf("")));
    auto second = good;
    second.set_layer(1);
    EXPECT_THAT(stream_status({good, second, bad}, &n), StatusIs(Code::kInvalidArgument));
    EXPECT_EQ(n, 2);
  }
  {
    auto r = good;
    r.set_offset(buffer_->size());
    EXPECT_THAT(stream_status({r}, &n), StatusIs(Code::kOutOfRange));
  }
  {
    auto r = good;
    r.set_layer(9);
    EXPECT_THAT(stream_status({r}, &n), StatusIs(Code::kInvalidArgument));
  }
  // An empty stream closes cleanly.
  EXPECT_THAT(stream_status({}, &n), IsOk());
  // The typed client's per-session stream: a good step, a NaN step (the
  // daemon ends the stream), then the next step reopens it and works.
  SelectOptions opt;
  opt.budget_tokens = 32;
  ASSERT_THAT(
      client_->DecodeStep(session_, 0, Queries(*model_, 0, 0), buffer_->buffer_id(), 0, opt),
      IsOk());
  std::vector<float> nan_q(QFloats(), std::nanf(""));
  EXPECT_THAT(client_->DecodeStep(session_, 0, nan_q, buffer_->buffer_id(), 0, opt),
              StatusIs(Code::kInvalidArgument));
  ExpectServesGoodRequest();
}

TEST_F(BadInputTest, AdminVerbsValidateTheirArguments) {
  EXPECT_THAT(client_->SetQuota("", 1), StatusIs(Code::kInvalidArgument));
  EXPECT_THAT(client_->EvictSession("no-such-session"), StatusIs(Code::kNotFound));
  EXPECT_THAT(client_->PinSession("no-such-session", true), StatusIs(Code::kNotFound));
  EXPECT_THAT(client_->Health("no.such.Service"), StatusIs(Code::kNotFound));
  ExpectServesGoodRequest();
}

}  // namespace
}  // namespace icecache::testing
