// DecodeRingService and the ring server through the daemon in-process: real
// Unix socket, real gRPC, real shm buffer and FIFOs under /dev/shm; the test
// speaks the ring protocol (decode_ring.proto) itself, so it can also send
// what a well-behaved client never would.
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <sched.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/decode_ring_layout.h"
#include "common/random_id.h"
#include "common/shm_file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "icecache/v1/decode_ring.grpc.pb.h"
#include "server/rpc/config.h"
#include "server/rpc/daemon.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache::rpc {
namespace {

using ::icecache::testing::IsOk;
using ::testing::HasSubstr;

constexpr int kLayers = 2, kKvHeads = 2, kQHeads = 4, kHeadDim = 16, kPageTokens = 4;
constexpr int kTokens = 64;
constexpr uint64_t kCap = 64 << 10;

// The FIFO pair of one ring, removed on destruction.
struct Fifos {
  Fifos() {
    const std::string stem =
        absl::StrCat("/dev/shm/icecache-ringtest-", getpid(), "-", RandomHexId());
    request = stem + ".req";
    response = stem + ".resp";
    EXPECT_EQ(mkfifo(request.c_str(), 0600), 0);
    EXPECT_EQ(mkfifo(response.c_str(), 0600), 0);
  }
  ~Fifos() {
    CloseFds();
    unlink(request.c_str());
    unlink(response.c_str());
  }
  // As a client does: the request FIFO read-write plus a hello byte, the
  // response FIFO for reading.
  void OpenAsClient(bool hello = true) {
    req_fd = open(request.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC);
    resp_fd = open(response.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    const char b = 1;
    if (hello) {
      EXPECT_EQ(write(req_fd, &b, 1), 1);
    }
  }
  void CloseFds() {
    if (req_fd >= 0) close(req_fd);
    if (resp_fd >= 0) close(resp_fd);
    req_fd = resp_fd = -1;
  }
  std::string request, response;
  int req_fd = -1, resp_fd = -1;
};

class DecodeRingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::icecache::testing::TempPathTemplate("icecache_ring_");
    dir_ = mkdtemp(tmpl.data());
    IcecachedConfig c;
    c.mutable_listen()->set_unix_socket(dir_ + "/d.sock");
    c.mutable_pool()->set_capacity_bytes(64 << 20);
    c.mutable_metrics()->set_port(0);
    c.set_worker_threads(1);
    c.set_drain_timeout_ms(300);  // an open ring holds Shutdown until then
    c.mutable_limits()->set_max_concurrent_calls(8);
    c.mutable_limits()->set_reserved_calls(2);
    c.mutable_limits()->set_max_calls_per_tenant(3);
    if (spin_us_ >= 0) c.mutable_decode_ring()->set_max_spin_us(spin_us_);
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
    rings_ = v1::DecodeRingService::NewStub(channel);
    session_ = CreateSession();
    auto shm = ShmFile::Create(absl::StrCat("icecache_ringtest_", getpid(), "_", RandomHexId()),
                               ring::RingBytes(kCap, kCap) + (1 << 20),
                               /*unlink_on_close=*/true);
    ASSERT_THAT(shm, IsOk());
    shm_ = *std::move(shm);
    const uint32_t magic = ring::kMagic, version = ring::kVersion;
    std::memcpy(shm_.data() + ring::kMagicOffset, &magic, 4);
    std::memcpy(shm_.data() + ring::kVersionOffset, &version, 4);
    buffer_id_ = Register(shm_.path(), shm_.size());
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
    EXPECT_TRUE(sessions_->CreateSession(&ctx, req, &resp).ok());
    const std::string id = resp.session().session_id();
    std::mt19937 rng(5);
    std::normal_distribution<float> dist;
    std::vector<float> kv(2ull * kLayers * kKvHeads * kTokens * kHeadDim);
    for (float& x : kv) x = dist(rng);
    grpc::ClientContext actx;
    v1::AppendKvRequest areq;
    areq.set_session_id(id);
    areq.set_num_tokens(kTokens);
    areq.set_inline_kv(std::string(reinterpret_cast<const char*>(kv.data()), kv.size() * 4));
    v1::AppendKvResponse aresp;
    const grpc::Status st = kv_->AppendKv(&actx, areq, &aresp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return id;
  }

  std::string Register(const std::string& path, uint64_t size) {
    grpc::ClientContext ctx;
    v1::RegisterBufferRequest req;
    req.mutable_host_shm()->set_path(path);
    req.mutable_host_shm()->set_size(size);
    v1::RegisterBufferResponse resp;
    const grpc::Status st = buffers_->RegisterBuffer(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return resp.buffer_id();
  }

  v1::OpenDecodeRingRequest OpenRequest(const Fifos& f) const {
    v1::OpenDecodeRingRequest req;
    req.set_session_id(session_);
    req.set_buffer_id(buffer_id_);
    req.set_request_capacity(kCap);
    req.set_response_capacity(kCap);
    req.set_request_fifo(f.request);
    req.set_response_fifo(f.response);
    return req;
  }

  grpc::Status Open(const v1::OpenDecodeRingRequest& req) {
    grpc::ClientContext ctx;
    v1::OpenDecodeRingResponse resp;
    return rings_->OpenDecodeRing(&ctx, req, &resp);
  }

  // One layer's request: pages land at the start of the ring buffer's tail.
  v1::DecodeStepRequest StepRequest(uint32_t layer) const {
    std::vector<float> q(kQHeads * kHeadDim, 0.5f);
    v1::DecodeStepRequest req;
    req.set_layer(layer);
    req.set_queries(std::string(reinterpret_cast<const char*>(q.data()), q.size() * 4));
    req.set_buffer_id(buffer_id_);
    req.set_offset(ring::RingBytes(kCap, kCap));
    req.mutable_params()->set_budget_tokens(16);
    return req;
  }

  // Writes `bytes` as request `seq`, rings and waits for the answer; returns
  // the answer's code and fills `body` with its bytes.
  int Exchange(Fifos& f, const std::string& bytes, uint64_t seq, std::string* body,
               uint32_t len_override = 0) {
    uint8_t* h = shm_.data();
    std::memcpy(h + ring::RequestAreaOffset(), bytes.data(), bytes.size());
    const uint32_t len = len_override ? len_override : static_cast<uint32_t>(bytes.size());
    std::memcpy(h + ring::kRequestLenOffset, &len, 4);
    __atomic_store_n(reinterpret_cast<uint64_t*>(h + ring::kRequestSeqOffset), seq,
                     __ATOMIC_RELEASE);
    const char b = 1;
    EXPECT_EQ(write(f.req_fd, &b, 1), 1);
    for (int i = 0; i < 5000; ++i) {
      if (__atomic_load_n(reinterpret_cast<uint64_t*>(h + ring::kResponseSeqOffset),
                          __ATOMIC_ACQUIRE) == seq) {
        int32_t code;
        uint32_t n;
        std::memcpy(&code, h + ring::kCodeOffset, 4);
        std::memcpy(&n, h + ring::kResponseLenOffset, 4);
        body->assign(reinterpret_cast<const char*>(h + ring::ResponseAreaOffset(kCap)), n);
        return code;
      }
      absl::SleepFor(absl::Milliseconds(1));
    }
    ADD_FAILURE() << "no answer to ring request " << seq;
    return -1;
  }

  // The metric line's value ("icecache_decode_rings 1" -> 1), -1 if absent.
  int Metric(const std::string& name) {
    const std::string text = daemon_->metrics()->Render();
    const size_t at = text.find("\n" + name + " ");
    if (at == std::string::npos) return -1;
    return std::atoi(text.c_str() + at + name.size() + 2);
  }
  bool AwaitMetric(const std::string& name, int want) {
    for (int i = 0; i < 2000; ++i) {
      if (Metric(name) == want) return true;
      absl::SleepFor(absl::Milliseconds(5));
    }
    return false;
  }

  // Sends `count` layer messages (sequence numbers from `first_seq`), each as
  // soon as the answer before it is seen (a decode loop with nothing to do
  // between layers); expects every answer OK.
  void SendBackToBack(Fifos& f, uint64_t first_seq, int count) {
    uint8_t* h = shm_.data();
    for (int i = 0; i < count; ++i) {
      const uint64_t seq = first_seq + i;
      const std::string bytes = StepRequest(static_cast<uint32_t>(i % kLayers)).SerializeAsString();
      std::memcpy(h + ring::RequestAreaOffset(), bytes.data(), bytes.size());
      const uint32_t len = static_cast<uint32_t>(bytes.size());
      std::memcpy(h + ring::kRequestLenOffset, &len, 4);
      __atomic_store_n(reinterpret_cast<uint64_t*>(h + ring::kRequestSeqOffset), seq,
                       __ATOMIC_RELEASE);
      const char b = 1;
      ASSERT_EQ(write(f.req_fd, &b, 1), 1);
      const absl::Time deadline = absl::Now() + absl::Seconds(10);
      while (__atomic_load_n(reinterpret_cast<uint64_t*>(h + ring::kResponseSeqOffset),
                             __ATOMIC_ACQUIRE) != seq) {
        ASSERT_LT(absl::Now(), deadline) << "no answer to ring request " << seq;
        sched_yield();
      }
      int32_t code;
      std::memcpy(&code, h + ring::kCodeOffset, 4);
      ASSERT_EQ(code, 0) << "request " << seq;
    }
  }

  int spin_us_ = -1;  // decode_ring.max_spin_us; -1: the default
  std::string dir_, session_, buffer_id_;
  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<v1::SessionService::Stub> sessions_;
  std::unique_ptr<v1::BufferService::Stub> buffers_;
  std::unique_ptr<v1::KvService::Stub> kv_;
  std::unique_ptr<v1::DecodeRingService::Stub> rings_;
  ShmFile shm_;
};

// The ring answers each layer exactly as the stream does, and the bytes
// land in the same place.
TEST_F(DecodeRingTest, AnswersLikeTheStream) {
  Fifos f;
  f.OpenAsClient();
  const grpc::Status opened = Open(OpenRequest(f));
  ASSERT_TRUE(opened.ok()) << opened.error_message();
  EXPECT_EQ(Metric("icecache_decode_rings"), 1);
  grpc::ClientContext ctx;
  auto stream = kv_->DecodeStep(&ctx);
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    v1::DecodeStepRequest req = StepRequest(layer);
    std::string body;
    ASSERT_EQ(Exchange(f, req.SerializeAsString(), layer + 1, &body), 0) << body;
    v1::DecodeStepResponse by_ring;
    ASSERT_TRUE(by_ring.ParseFromString(body));
    const std::vector<uint8_t> ring_bytes(shm_.data() + req.offset(),
                                          shm_.data() + req.offset() + (64 << 10));
    std::memset(shm_.data() + req.offset(), 0, 64 << 10);
    req.set_session_id(session_);
    ASSERT_TRUE(stream->Write(req));
    v1::DecodeStepResponse by_stream;
    ASSERT_TRUE(stream->Read(&by_stream));
    // The daemon's own times in the call are measurements, set on both
    // paths (select_ns, gather_ns, step_ns); the rest is the same answer.
    for (v1::DecodeStepResponse* r : {&by_ring, &by_stream}) {
      EXPECT_GT(r->select_ns(), 0u) << "layer " << layer;
      EXPECT_GT(r->gather_ns(), 0u) << "layer " << layer;
      EXPECT_GE(r->step_ns(), r->select_ns() + r->gather_ns()) << "layer " << layer;
      r->clear_select_ns();
      r->clear_gather_ns();
      r->clear_step_ns();
    }
    EXPECT_EQ(by_ring.SerializeAsString(), by_stream.SerializeAsString()) << "layer " << layer;
    EXPECT_EQ(by_ring.heads_size(), kKvHeads);
    EXPECT_GT(by_ring.layout().total_bytes(), 0u);
    EXPECT_EQ(
        std::vector<uint8_t>(shm_.data() + req.offset(), shm_.data() + req.offset() + (64 << 10)),
        ring_bytes);
  }
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// A client that sends its next message right after an answer finds the
// ring's thread still watching (decode_ring.max_spin_us): the message is
// served without the thread being woken, and answered like any other. The
// window is wide (100 ms) so that the first gaps, which include a wake-up
// (milliseconds under TSan on a loaded machine), still make the ring busy.
template <int kSpinUs>
class DecodeRingWithSpin : public DecodeRingTest {
 protected:
  void SetUp() override {
    spin_us_ = kSpinUs;
    DecodeRingTest::SetUp();
  }
};
using DecodeRingWideSpinTest = DecodeRingWithSpin<100'000>;
using DecodeRingNoSpinTest = DecodeRingWithSpin<0>;

TEST_F(DecodeRingWideSpinTest, MessagesSentBackToBackAreCaughtByTheWatchingThread) {
  Fifos f;
  f.OpenAsClient();
  const grpc::Status opened = Open(OpenRequest(f));
  ASSERT_TRUE(opened.ok()) << opened.error_message();
  SendBackToBack(f, 1, 40);
  // The first message (the ring's gap unknown) and any the thread missed
  // came through epoll; on a loaded machine some may, never most.
  EXPECT_GE(Metric("icecache_decode_ring_messages_caught_total"), 20);
  // A bad message found that way is answered with its code; the ring goes on.
  std::string body;
  EXPECT_EQ(Exchange(f, "not a request", 41, &body),
            static_cast<int>(absl::StatusCode::kInvalidArgument));
  SendBackToBack(f, 42, 4);
}

// max_spin_us 0: every message comes through the doorbell, none is caught.
TEST_F(DecodeRingNoSpinTest, WithoutWatchingEveryMessageComesThroughTheDoorbell) {
  Fifos f;
  f.OpenAsClient();
  const grpc::Status opened = Open(OpenRequest(f));
  ASSERT_TRUE(opened.ok()) << opened.error_message();
  SendBackToBack(f, 1, 20);
  EXPECT_EQ(Metric("icecache_decode_ring_messages_caught_total"), 0);
}

// positions_as_bytes: the same positions, as little-endian int32s in
// positions_le, in the selection and in the layout; without it (an older
// client) the repeated fields as before.
TEST_F(DecodeRingTest, PositionsAsBytesCarryTheSamePositions) {
  grpc::ClientContext ctx;
  auto stream = kv_->DecodeStep(&ctx);
  v1::DecodeStepResponse as_list, as_bytes;
  for (bool bytes : {false, true}) {
    v1::DecodeStepRequest req = StepRequest(1);
    req.set_session_id(session_);
    req.mutable_params()->set_want_positions(true);
    req.set_positions_as_bytes(bytes);
    ASSERT_TRUE(stream->Write(req));
    ASSERT_TRUE(stream->Read(bytes ? &as_bytes : &as_list));
  }
  stream->WritesDone();
  ASSERT_TRUE(stream->Finish().ok());
  const auto ints = [](const std::string& b) {
    std::vector<int32_t> v(b.size() / 4);
    std::memcpy(v.data(), b.data(), v.size() * 4);
    return v;
  };
  ASSERT_EQ(as_list.heads_size(), kKvHeads);
  ASSERT_EQ(as_bytes.heads_size(), kKvHeads);
  int64_t listed = 0;
  for (int h = 0; h < kKvHeads; ++h) {
    const auto& l = as_list.heads(h);
    const auto& b = as_bytes.heads(h);
    EXPECT_TRUE(l.positions_le().empty());
    EXPECT_EQ(b.positions_size(), 0);
    EXPECT_EQ(ints(b.positions_le()),
              std::vector<int32_t>(l.positions().begin(), l.positions().end()));
    listed += l.positions_size();
    const auto& ll = as_list.layout().heads(h);
    const auto& lb = as_bytes.layout().heads(h);
    EXPECT_TRUE(ll.positions_le().empty());
    EXPECT_EQ(lb.positions_size(), 0);
    EXPECT_EQ(ints(lb.positions_le()),
              std::vector<int32_t>(ll.positions().begin(), ll.positions().end()));
  }
  EXPECT_GT(listed, 0);
  // The rest of the answer is the same.
  for (v1::DecodeStepResponse* r : {&as_list, &as_bytes}) {
    r->clear_select_ns();
    r->clear_gather_ns();
    r->clear_step_ns();
    for (auto& h : *r->mutable_heads()) {
      h.clear_positions();
      h.clear_positions_le();
    }
    for (auto& h : *r->mutable_layout()->mutable_heads()) {
      h.clear_positions();
      h.clear_positions_le();
    }
  }
  EXPECT_EQ(as_list.SerializeAsString(), as_bytes.SerializeAsString());
}

// Every malformed OpenDecodeRing gets its own code and opens nothing.
TEST_F(DecodeRingTest, BadOpenRequestsGetPreciseCodes) {
  const std::string regular = absl::StrCat("/dev/shm/icecache-ringtest-file-", RandomHexId());
  close(open(regular.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600));
  const std::string link = absl::StrCat("/dev/shm/icecache-ringtest-link-", RandomHexId());
  Fifos f;
  f.OpenAsClient();
  ASSERT_EQ(symlink(f.request.c_str(), link.c_str()), 0);
  const std::string small = Register(shm_.path(), ring::RingBytes(kCap, kCap) - 1);
  struct Case {
    const char* what;
    std::function<void(v1::OpenDecodeRingRequest*)> edit;
    grpc::StatusCode want;
    const char* says;
  };
  const std::vector<Case> cases = {
      {"no session", [](auto* r) { r->clear_session_id(); }, grpc::INVALID_ARGUMENT, "session_id"},
      {"unknown session", [](auto* r) { r->set_session_id("nope"); }, grpc::NOT_FOUND, "nope"},
      {"unknown buffer", [](auto* r) { r->set_buffer_id("nobuf"); }, grpc::NOT_FOUND, "nobuf"},
      {"no fifo", [](auto* r) { r->clear_request_fifo(); }, grpc::INVALID_ARGUMENT, "request_fifo"},
      {"small capacity", [](auto* r) { r->set_request_capacity(100); }, grpc::INVALID_ARGUMENT,
       "request_capacity = 100"},
      {"ring past the buffer", [&](auto* r) { r->set_buffer_id(small); }, grpc::OUT_OF_RANGE,
       "does not fit"},
      {"fifo outside /dev/shm", [&](auto* r) { r->set_request_fifo(dir_ + "/d.sock"); },
       grpc::INVALID_ARGUMENT, "directly in /dev/shm"},
      {"fifo dot-dot", [](auto* r) { r->set_request_fifo("/dev/shm/../etc/passwd"); },
       grpc::INVALID_ARGUMENT, "directly in /dev/shm"},
      {"missing fifo", [](auto* r) { r->set_request_fifo("/dev/shm/icecache-ringtest-none"); },
       grpc::NOT_FOUND, "not found"},
      {"regular file", [&](auto* r) { r->set_request_fifo(regular); }, grpc::INVALID_ARGUMENT,
       "is not a FIFO"},
      {"symlink", [&](auto* r) { r->set_request_fifo(link); }, grpc::INVALID_ARGUMENT, "a symlink"},
  };
  for (const Case& c : cases) {
    v1::OpenDecodeRingRequest req = OpenRequest(f);
    c.edit(&req);
    const grpc::Status st = Open(req);
    EXPECT_EQ(st.error_code(), c.want) << c.what << ": " << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(c.says)) << c.what;
  }
  {  // A header without the ring magic.
    std::memset(shm_.data(), 0, 8);
    const grpc::Status st = Open(OpenRequest(f));
    EXPECT_EQ(st.error_code(), grpc::INVALID_ARGUMENT) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr("magic"));
    const uint32_t magic = ring::kMagic, version = ring::kVersion;
    std::memcpy(shm_.data() + ring::kMagicOffset, &magic, 4);
    std::memcpy(shm_.data() + ring::kVersionOffset, &version, 4);
  }
  {  // No hello byte: nobody is known to hold the request FIFO.
    Fifos quiet;
    quiet.OpenAsClient(/*hello=*/false);
    const grpc::Status st = Open(OpenRequest(quiet));
    EXPECT_EQ(st.error_code(), grpc::FAILED_PRECONDITION) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr("hello byte"));
  }
  {  // Nobody reads the response FIFO.
    Fifos deaf;
    deaf.OpenAsClient();
    close(deaf.resp_fd);
    deaf.resp_fd = -1;
    const grpc::Status st = Open(OpenRequest(deaf));
    EXPECT_EQ(st.error_code(), grpc::FAILED_PRECONDITION) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr("no reader"));
  }
  EXPECT_EQ(Metric("icecache_decode_rings"), 0);
  unlink(regular.c_str());
  unlink(link.c_str());
  const grpc::Status ok = Open(OpenRequest(f));  // the well-formed request still opens
  EXPECT_TRUE(ok.ok()) << ok.error_message();
}

// A bad message is answered with its own code in the header; the ring goes
// on serving the next one.
TEST_F(DecodeRingTest, BadMessagesAreAnsweredAndTheRingGoesOn) {
  Fifos f;
  f.OpenAsClient();
  ASSERT_TRUE(Open(OpenRequest(f)).ok());
  std::string body;
  uint64_t seq = 0;
  EXPECT_EQ(Exchange(f, std::string(40, '\xff'), ++seq, &body), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(body, HasSubstr("is not a DecodeStepRequest"));
  EXPECT_EQ(Exchange(f, StepRequest(0).SerializeAsString(), ++seq, &body, kCap + 1),
            grpc::INVALID_ARGUMENT);
  EXPECT_THAT(body, HasSubstr("larger than the request area"));
  seq += 5;
  EXPECT_EQ(Exchange(f, StepRequest(0).SerializeAsString(), seq, &body), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(body, HasSubstr("is not the next"));
  v1::DecodeStepRequest other = StepRequest(0);
  other.set_session_id("someone-else");
  EXPECT_EQ(Exchange(f, other.SerializeAsString(), ++seq, &body), grpc::INVALID_ARGUMENT);
  EXPECT_THAT(body, HasSubstr("belongs to session " + session_));
  EXPECT_EQ(Exchange(f, StepRequest(kLayers).SerializeAsString(), ++seq, &body),
            grpc::INVALID_ARGUMENT);
  EXPECT_THAT(body, HasSubstr("layer"));
  v1::DecodeStepRequest past = StepRequest(0);
  past.set_offset(shm_.size());
  EXPECT_EQ(Exchange(f, past.SerializeAsString(), ++seq, &body), grpc::OUT_OF_RANGE) << body;
  EXPECT_EQ(Exchange(f, StepRequest(1).SerializeAsString(), ++seq, &body), 0) << body;
  v1::DecodeStepResponse resp;
  EXPECT_TRUE(resp.ParseFromString(body));
  EXPECT_EQ(resp.layer(), 1u);
}

// Open rings are bounded per tenant (limits.max_calls_per_tenant, 3 here),
// and a ring message takes one of the tenant's call places while it runs:
// with every place held by idle streams it is refused like a call.
TEST_F(DecodeRingTest, RingsAndRingMessagesCountAgainstTheTenantsLimits) {
  std::vector<std::unique_ptr<Fifos>> open;
  for (int i = 0; i < 3; ++i) {
    open.push_back(std::make_unique<Fifos>());
    open.back()->OpenAsClient();
    const grpc::Status st = Open(OpenRequest(*open.back()));
    ASSERT_TRUE(st.ok()) << st.error_message();
  }
  Fifos extra;
  extra.OpenAsClient();
  const grpc::Status refused = Open(OpenRequest(extra));
  EXPECT_EQ(refused.error_code(), grpc::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_THAT(refused.error_message(), HasSubstr("decode rings open"));
  struct Stream {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReaderWriter<v1::DecodeStepRequest, v1::DecodeStepResponse>> rw;
  };
  std::vector<std::unique_ptr<Stream>> idle;
  for (int i = 0; i < 3; ++i) {
    idle.push_back(std::make_unique<Stream>());
    idle.back()->rw = kv_->DecodeStep(&idle.back()->ctx);
    // One answered message shows the stream's handler runs, so it holds its
    // place (the in-flight gauge counts a call before it takes one).
    v1::DecodeStepRequest req = StepRequest(0);
    req.set_session_id(session_);
    ASSERT_TRUE(idle.back()->rw->Write(req));
    v1::DecodeStepResponse first;
    ASSERT_TRUE(idle.back()->rw->Read(&first));
  }
  std::string body;
  EXPECT_EQ(Exchange(*open[0], StepRequest(0).SerializeAsString(), 1, &body),
            grpc::RESOURCE_EXHAUSTED);
  EXPECT_THAT(body, HasSubstr("limits.max_calls_per_tenant"));
  for (auto& s : idle) {
    s->rw->WritesDone();
    EXPECT_TRUE(s->rw->Finish().ok());
  }
  EXPECT_EQ(Exchange(*open[0], StepRequest(0).SerializeAsString(), 2, &body), 0) << body;
}

// A client that truncates its ring file under an open ring: the daemon
// cannot read the request, closes the ring (the client reads end of file)
// and goes on serving.
TEST_F(DecodeRingTest, ATruncatedRingFileClosesTheRing) {
  Fifos f;
  f.OpenAsClient();
  ASSERT_TRUE(Open(OpenRequest(f)).ok());
  const std::string bytes = StepRequest(0).SerializeAsString();
  std::memcpy(shm_.data() + ring::RequestAreaOffset(), bytes.data(), bytes.size());
  const uint32_t len = static_cast<uint32_t>(bytes.size());
  std::memcpy(shm_.data() + ring::kRequestLenOffset, &len, 4);
  const uint64_t seq = 1;
  std::memcpy(shm_.data() + ring::kRequestSeqOffset, &seq, 8);
  ASSERT_EQ(ftruncate(shm_.fd(), 0), 0);
  const char b = 1;
  ASSERT_EQ(write(f.req_fd, &b, 1), 1);
  fcntl(f.resp_fd, F_SETFL, fcntl(f.resp_fd, F_GETFL) & ~O_NONBLOCK);
  char bells[16];
  EXPECT_EQ(read(f.resp_fd, bells, sizeof bells), 0) << "end of file, no answer";
  EXPECT_TRUE(AwaitMetric("icecache_decode_rings", 0));
  EXPECT_EQ(Metric("icecache_decode_rings_closed_total"), 1);
  EXPECT_FALSE(CreateSession().empty());
}

// A client killed while its ring is open: the daemon sees the request
// FIFO's end of file and releases the ring.
TEST_F(DecodeRingTest, AClientThatDiesHasItsRingReclaimed) {
  Fifos f;
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {  // only syscalls here: the parent owns gRPC
    f.OpenAsClient();
    const char b = 1;
    if (write(ready[1], &b, 1) != 1) _exit(2);
    for (;;) pause();
  }
  close(ready[1]);
  char b;
  ASSERT_EQ(read(ready[0], &b, 1), 1);
  close(ready[0]);
  const grpc::Status opened = Open(OpenRequest(f));
  ASSERT_TRUE(opened.ok()) << opened.error_message();
  EXPECT_EQ(Metric("icecache_decode_rings"), 1);
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  EXPECT_TRUE(AwaitMetric("icecache_decode_rings", 0));
  EXPECT_EQ(Metric("icecache_decode_rings_closed_total"), 1);
}

// Shutdown serves open rings until the drain time is up, then closes them:
// the client reads end of file.
TEST_F(DecodeRingTest, ShutdownClosesRingsTheClientReadsEndOfFile) {
  Fifos f;
  f.OpenAsClient();
  ASSERT_TRUE(Open(OpenRequest(f)).ok());
  std::thread stopper([this] { daemon_->Shutdown(); });
  absl::SleepFor(absl::Milliseconds(50));
  std::string body;
  EXPECT_EQ(Exchange(f, StepRequest(0).SerializeAsString(), 1, &body), 0) << body;
  stopper.join();
  const int flags = fcntl(f.resp_fd, F_GETFL);
  fcntl(f.resp_fd, F_SETFL, flags & ~O_NONBLOCK);
  char bells[16];
  ssize_t n;
  while ((n = read(f.resp_fd, bells, sizeof bells)) > 0) {
  }
  EXPECT_EQ(n, 0) << "end of file, not an error";
}

}  // namespace
}  // namespace icecache::rpc
