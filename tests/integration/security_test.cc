// Security cases the other suites do not cover (docs/operations.md, "Faults
// and what clients see"): every admin verb refused to a non-admin uid (Drain
// and GetConfig included, and a refused Drain drains nothing); TCP without
// TLS refuses to start; oversized, deeply nested and length-lying messages
// are refused before they cost memory. Tenant isolation (tenancy_test), bad
// tokens (tls_test) and the shm attacks (bad_input_test, fault_test) live
// next to their features.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>

#include <fstream>
#include <future>
#include <thread>

#include "client/client_internal.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;
using Code = absl::StatusCode;

// The peak resident set (VmHWM) of `pid`, in bytes; 0 when unreadable.
int64_t PeakRssBytes(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return 0;
}

// Sends `payload` as the raw request bytes of `method`; the daemon's status.
absl::Status RawUnary(Client& c, const std::string& method, const std::string& payload) {
  Client::Impl& raw = *c.impl();
  auto ctx = raw.NewContext();
  grpc::Slice slice(payload);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  raw.generic->UnaryCall(ctx.get(), method, grpc::StubOptions(), &request, &response,
                         [&done](grpc::Status s) { done.set_value(std::move(s)); });
  return FromGrpcStatus(done.get_future().get());
}

// A protobuf varint.
std::string Varint(uint64_t v) {
  std::string out;
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
  return out;
}

TEST(SecurityTest, EveryAdminVerbNeedsTheAdminRoleAndARefusedDrainDrainsNothing) {
  // Our uid is tenant "alpha" but not an admin: admins are someone else.
  DaemonOptions o = TestDaemonOptions();
  o.config_textproto = absl::StrCat("listen { unix_socket_mode: 384 }\n",  // 0600
                                    "auth { uid_tenants { uid: ", ::geteuid(),
                                    " tenant: \"alpha\" } admin_uids: ", kOtherUid, " }\n");
  auto daemon = DaemonProcess::Start(o);
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(1, 1, 64, 1);
  auto s = c.CreateSession(m.spec);
  ASSERT_THAT(s, IsOk());
  EXPECT_THAT(c.GetStats(), StatusIs(Code::kPermissionDenied));
  EXPECT_THAT(c.ListTenants(), StatusIs(Code::kPermissionDenied));
  EXPECT_THAT(c.SetQuota("alpha", 1), StatusIs(Code::kPermissionDenied));
  EXPECT_THAT(c.EvictSession(s->id), StatusIs(Code::kPermissionDenied));
  EXPECT_THAT(c.PinSession(s->id, true), StatusIs(Code::kPermissionDenied));
  EXPECT_THAT(c.Drain(/*shutdown=*/true), StatusIs(Code::kPermissionDenied));
  EXPECT_THAT(c.GetConfig(false), StatusIs(Code::kPermissionDenied));
  EXPECT_THAT(c.ListSessions(/*all_tenants=*/true), StatusIs(Code::kPermissionDenied));
  // Nothing happened: not draining, the session is there and unpinned.
  auto h = c.Health();
  ASSERT_THAT(h, IsOk());
  EXPECT_TRUE(*h);
  auto info = c.GetSession(s->id);
  ASSERT_THAT(info, IsOk());
  EXPECT_FALSE(info->pinned);
  EXPECT_THAT(c.CreateSession(m.spec), IsOk());
  EXPECT_TRUE((*daemon)->running());
}

TEST(SecurityTest, TcpWithoutTlsRefusesToStartNamingTheField) {
  DaemonOptions o = TestDaemonOptions("listen { tcp_address: \"127.0.0.1:0\" }\n");
  o.ready_timeout = absl::Seconds(20);
  auto daemon = DaemonProcess::Start(o);
  ASSERT_FALSE(daemon.ok()) << "icecached served TCP without TLS";
  EXPECT_THAT(daemon.status(), StatusIs(Code::kUnavailable, HasSubstr("listen.tls_cert_file")));
}

class MessageLimitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto d =
        StartDaemon("limits { max_receive_message_bytes: 4194304 max_inline_bytes: 1048576 }\n");
    ASSERT_THAT(d, IsOk());
    daemon_ = *std::move(d);
    auto c = Connect(*daemon_);
    ASSERT_THAT(c, IsOk());
    client_ = *std::move(c);
    model_ = std::make_unique<TestModel>(MakeModel(1, 2, 256, 1));
    auto s = client_->CreateSession(model_->spec);
    ASSERT_THAT(s, IsOk());
    session_ = s->id;
    ASSERT_THAT(client_->AppendKvInline(session_, model_->kv.Chunk(0, 256), 256), IsOk());
  }
  void TearDown() override {
    // After every hostile message the daemon serves, and the session is whole.
    if (client_ == nullptr) return;
    auto info = client_->GetSession(session_);
    ASSERT_THAT(info, IsOk()) << daemon_->Stderr();
    EXPECT_EQ(info->tokens, 256u);
    SelectOptions opt;
    opt.budget_tokens = 32;
    EXPECT_THAT(client_->SelectPages(session_, 0, Queries(*model_, 0, 0), opt), IsOk());
    EXPECT_TRUE(daemon_->running()) << daemon_->Stderr();
  }

  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<TestModel> model_;
  std::string session_;
};

TEST_F(MessageLimitTest, OversizedMessagesCostAtMostTheTransportQuota) {
  const int64_t peak_before = PeakRssBytes(daemon_->pid());
  // Six clients at once, each sending 48 MiB of inline KV against a 4 MiB
  // receive limit. gRPC reads a message before it checks its size; the
  // transport quota (32 MiB here, TransportQuotaBytes; a soft cap) bounds
  // what they cost together to about 70 MB (without it the peak grew by what
  // was sent: 177 MB for four).
  const std::string big(size_t{48} << 20, '\x3c');
  std::string msg = "\x0a" + Varint(session_.size()) + session_;  // session_id = 1
  msg += "\x10" + Varint(1);                                      // num_tokens = 2
  msg += big;
  std::vector<std::thread> senders;
  std::vector<absl::Status> results(6);
  for (int i = 0; i < 6; ++i) {
    senders.emplace_back([&, i] {
      auto c = Connect(*daemon_);
      results[i] = c.ok() ? RawUnary(**c, "/icecache.v1.KvService/AppendKv", msg) : c.status();
    });
  }
  for (auto& t : senders) t.join();
  for (const absl::Status& st : results) EXPECT_THAT(st, StatusIs(Code::kResourceExhausted));
  const int64_t peak_after = PeakRssBytes(daemon_->pid());
  EXPECT_LT(peak_after - peak_before, int64_t{128} << 20)
      << "peak RSS grew from " << peak_before << " to " << peak_after;
  // A message just under the limit is still received (and judged on its
  // contents: 3.5 MiB of queries is the wrong size for this session).
  std::string near = "\x0a" + Varint(session_.size()) + session_;
  near += "\x1a" + Varint(size_t{7} << 19) + std::string(size_t{7} << 19, '\0');
  EXPECT_THAT(RawUnary(*client_, "/icecache.v1.KvService/SelectPages", near),
              StatusIs(Code::kInvalidArgument));
}

TEST_F(MessageLimitTest, DeeplyNestedMessagesAreRefusedNotRecursedInto) {
  // 100000 nested unknown groups (field 15, start-group wire type 3): past
  // protobuf's recursion limit, so the parser refuses, on every service.
  std::string nested;
  for (int i = 0; i < 100000; ++i) nested.push_back(static_cast<char>((15 << 3) | 3));
  for (const char* method :
       {"/icecache.v1.SessionService/CreateSession", "/icecache.v1.KvService/SelectPages",
        "/icecache.v1.BufferService/RegisterBuffer", "/icecache.v1.AdminService/SetQuota"}) {
    const absl::Status st = RawUnary(*client_, method, nested);
    EXPECT_FALSE(st.ok()) << method;
    EXPECT_NE(st.code(), Code::kUnavailable) << method << ": " << st;
  }
}

TEST_F(MessageLimitTest, LengthsThatLieAreRefusedWithoutAllocatingWhatTheyClaim) {
  const int64_t peak_before = PeakRssBytes(daemon_->pid());
  // SelectPages with queries (field 3) claiming 1 GiB in a
  // 40-byte message; and a session id claiming 2^62 bytes.
  std::string lie = "\x0a" + Varint(session_.size()) + session_;
  lie += "\x1a" + Varint(uint64_t{1} << 30) + "short";
  EXPECT_FALSE(RawUnary(*client_, "/icecache.v1.KvService/SelectPages", lie).ok());
  const std::string id_lie = "\x0a" + Varint(uint64_t{1} << 62) + "x";
  EXPECT_FALSE(RawUnary(*client_, "/icecache.v1.SessionService/GetSession", id_lie).ok());
  EXPECT_LT(PeakRssBytes(daemon_->pid()) - peak_before, int64_t{24} << 20);
}

}  // namespace
}  // namespace icecache::testing
