// The Unix listener and the peer-uid path end to end: accept -> SO_PEERCRED
// -> PeerTable -> grpc::AddInsecureChannelFromFd -> ServerContext::peer()
// "fd:<n>" -> Authenticator -> tenant, through a real gRPC call.
#include "server/rpc/unix_listener.h"

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/server_posix.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "icecache/v1/session.grpc.pb.h"
#include "server/rpc/auth.h"
#include "server/rpc/status.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache::rpc {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::icecache::testing::TempPathTemplate("icecache_ul_");
    path_ = mkdtemp(tmpl.data());
    chmod(path_.c_str(), 0755);  // a setuid child must reach the socket
  }
  ~TempDir() { std::system(("rm -rf " + path_).c_str()); }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

int ConnectTo(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

TEST(UnixListenerTest, BindsWithModeAndRemovesSocketOnStop) {
  TempDir dir;
  const std::string path = dir.File("d.sock");
  auto l = UnixListener::Create(path, 0660);
  ASSERT_THAT(l, IsOk());
  struct stat st;
  ASSERT_EQ(lstat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  (*l)->Stop();
  EXPECT_NE(lstat(path.c_str(), &st), 0);
}

TEST(UnixListenerTest, RemovesStaleSocketButNotLiveOneNorOtherFiles) {
  TempDir dir;
  const std::string stale = dir.File("stale.sock");
  {
    // A socket file whose owner died: bound, never unlinked.
    const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, stale.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    close(fd);
  }
  auto l = UnixListener::Create(stale, 0660);
  ASSERT_THAT(l, IsOk());

  // While it listens, a second daemon on the same path is refused.
  EXPECT_THAT(UnixListener::Create(stale, 0660),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("another daemon")));

  const std::string regular = dir.File("regular");
  const int fd = open(regular.c_str(), O_CREAT | O_WRONLY, 0600);
  ASSERT_GE(fd, 0);
  close(fd);
  EXPECT_THAT(UnixListener::Create(regular, 0660),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("not a socket")));
  struct stat st;
  EXPECT_EQ(lstat(regular.c_str(), &st), 0) << "a non-socket file must never be removed";
}

TEST(UnixListenerTest, BadPaths) {
  EXPECT_THAT(UnixListener::Create("relative.sock", 0660),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(UnixListener::Create("/" + std::string(150, 'x'), 0660),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("longer")));
  EXPECT_THAT(UnixListener::Create("/nonexistent-dir-icecache/x.sock", 0660),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(UnixListenerTest, AcceptReportsThePeerUid) {
  TempDir dir;
  const std::string path = dir.File("cred.sock");
  auto l = UnixListener::Create(path, 0666);
  ASSERT_THAT(l, IsOk());
  absl::Mutex mu;
  std::vector<PeerCred> seen;
  (*l)->Start([&](int fd, const PeerCred& cred) {
    absl::MutexLock lock(&mu);
    seen.push_back(cred);
    close(fd);
  });

  const int fd = ConnectTo(path);
  ASSERT_GE(fd, 0);
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(
        +[](std::vector<PeerCred>* v) { return !v->empty(); }, &seen));
    EXPECT_EQ(seen[0].uid, getuid());
    EXPECT_EQ(seen[0].pid, getpid());
  }
  close(fd);

  if (geteuid() != 0) {
    GTEST_LOG_(INFO) << "not root: skipping the other-uid half";
    return;
  }
  // A child that becomes uid 65534 before connecting must be seen as 65534.
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (setgid(65534) != 0 || setuid(65534) != 0) _exit(3);
    const int cfd = ConnectTo(path);
    if (cfd < 0) _exit(4);
    char b;
    // Wait until the daemon side closes the connection.
    while (read(cfd, &b, 1) > 0) {
    }
    _exit(0);
  }
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(
        +[](std::vector<PeerCred>* v) { return v->size() >= 2; }, &seen));
    EXPECT_EQ(seen[1].uid, 65534u);
    EXPECT_EQ(seen[1].pid, child);
  }
  int wstatus = 0;
  ASSERT_EQ(waitpid(child, &wstatus, 0), child);
  EXPECT_TRUE(WIFEXITED(wstatus));
  EXPECT_EQ(WEXITSTATUS(wstatus), 0);
}

// Answers ListSessions with one fake session whose tenant is the caller's.
class WhoAmI final : public v1::SessionService::Service {
 public:
  WhoAmI(const Authenticator* auth, const PeerTable* peers) : auth_(auth), peers_(peers) {}
  grpc::Status ListSessions(grpc::ServerContext* ctx, const v1::ListSessionsRequest*,
                            v1::ListSessionsResponse* resp) override {
    absl::StatusOr<Caller> caller = auth_->Resolve(ctx->peer(), *peers_, std::nullopt);
    if (!caller.ok()) return ToGrpcStatus(caller.status());
    v1::SessionInfo* s = resp->add_sessions();
    s->set_tenant(caller->tenant);
    s->set_pinned(caller->admin);
    s->set_session_id(ctx->peer());
    return grpc::Status::OK;
  }

 private:
  const Authenticator* auth_;
  const PeerTable* peers_;
};

TEST(UnixListenerTest, GrpcCallSeesTheConnectionsUidThroughFdPeer) {
  TempDir dir;
  const std::string path = dir.File("grpc.sock");
  v1::AuthConfig auth_config;
  auto* m = auth_config.add_uid_tenants();
  m->set_uid(getuid());
  m->set_tenant("me");
  auth_config.add_admin_uids(getuid());
  auto auth = Authenticator::Create(auth_config, getuid());
  ASSERT_THAT(auth, IsOk());
  PeerTable peers;
  WhoAmI service(auth->get(), &peers);
  grpc::ServerBuilder builder;
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);

  auto l = UnixListener::Create(path, 0660);
  ASSERT_THAT(l, IsOk());
  (*l)->Start([&](int fd, const PeerCred& cred) {
    peers.Set(fd, cred);
    grpc::AddInsecureChannelFromFd(server.get(), fd);
  });

  for (int round = 0; round < 2; ++round) {  // two channels, two connections
    auto channel = grpc::CreateChannel("unix:" + path, grpc::InsecureChannelCredentials());
    auto stub = v1::SessionService::NewStub(channel);
    grpc::ClientContext ctx;
    v1::ListSessionsResponse resp;
    const grpc::Status st = stub->ListSessions(&ctx, v1::ListSessionsRequest(), &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    ASSERT_EQ(resp.sessions_size(), 1);
    EXPECT_EQ(resp.sessions(0).tenant(), "me");
    EXPECT_TRUE(resp.sessions(0).pinned());  // admin role from admin_uids
    EXPECT_THAT(resp.sessions(0).session_id(), ::testing::StartsWith("fd:"));
  }
  EXPECT_EQ((*l)->accepted(), 2u);
  (*l)->Stop();
  server->Shutdown();
}

}  // namespace
}  // namespace icecache::rpc
