#include "common/socket_path.h"

#include <unistd.h>

#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace icecache {
namespace {

using ::testing::ElementsAre;

TEST(SocketPathTest, CandidatesInDocumentedOrder) {
  EXPECT_THAT(SocketCandidates("/run/user/1000", 1000),
              ElementsAre("/run/icecache/icecached.sock", "/run/user/1000/icecached.sock",
                          "/tmp/icecached-1000.sock"));
}

TEST(SocketPathTest, XdgSkippedWhenUnsetRelativeOrTooLong) {
  EXPECT_THAT(SocketCandidates("", 7),
              ElementsAre("/run/icecache/icecached.sock", "/tmp/icecached-7.sock"));
  EXPECT_THAT(SocketCandidates("relative/dir", 7),
              ElementsAre("/run/icecache/icecached.sock", "/tmp/icecached-7.sock"));
  const std::string long_dir = "/" + std::string(kMaxUnixSocketPath, 'x');
  EXPECT_THAT(SocketCandidates(long_dir, 7),
              ElementsAre("/run/icecache/icecached.sock", "/tmp/icecached-7.sock"));
}

TEST(SocketPathTest, FirstUsableWinsElseTheLast) {
  const std::vector<std::string> c = SocketCandidates("/xdg", 5);
  std::set<std::string> usable = {"/xdg/icecached.sock", "/tmp/icecached-5.sock"};
  auto pick = [&](const std::string& p) { return usable.count(p) > 0; };
  EXPECT_EQ(FirstUsableSocket(c, pick), "/xdg/icecached.sock");
  usable.insert("/run/icecache/icecached.sock");
  EXPECT_EQ(FirstUsableSocket(c, pick), "/run/icecache/icecached.sock");
  usable.clear();
  EXPECT_EQ(FirstUsableSocket(c, pick), "/tmp/icecached-5.sock");
}

TEST(SocketPathTest, DaemonAndClientDefaultsAreCandidates) {
  // The real environment: whatever is chosen comes from the one list.
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  const std::vector<std::string> c = SocketCandidates(xdg ? xdg : "", ::getuid());
  EXPECT_THAT(c, ::testing::Contains(DaemonDefaultSocketPath()));
  EXPECT_THAT(c, ::testing::Contains(ClientDefaultSocketPath()));
}

}  // namespace
}  // namespace icecache
