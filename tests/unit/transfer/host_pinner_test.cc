#include "server/transfer/host_pinner.h"

#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/recording_cuda_runtime.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::RecordingCudaRuntime;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(HostPinnerTest, PinsInChunksAndUnpinsOnDestruction) {
  RecordingCudaRuntime rt;
  std::vector<uint8_t> region(1000);
  {
    auto p = HostPinner::Start(&rt, region.data(), region.size(), 300);
    ASSERT_THAT(p->Wait(), IsOk());
    EXPECT_TRUE(p->done());
    EXPECT_EQ(p->pinned_bytes(), 1000u);
    const auto registered = rt.registered();
    ASSERT_EQ(registered.size(), 4u);
    EXPECT_EQ(registered[0].first, region.data());
    EXPECT_EQ(registered[3].first, region.data() + 900);
    EXPECT_EQ(registered[3].second, 100u);
    EXPECT_TRUE(rt.unregistered().empty());
  }
  EXPECT_EQ(rt.unregistered().size(), 4u);
}

TEST(HostPinnerTest, ErrorStopsAndIsReported) {
  RecordingCudaRuntime rt;
  rt.FailNext("host_register", /*skip=*/2);  // the third chunk fails
  std::vector<uint8_t> region(1000);
  {
    auto p = HostPinner::Start(&rt, region.data(), region.size(), 300);
    EXPECT_THAT(p->Wait(), StatusIs(absl::StatusCode::kInternal, HasSubstr("host_register")));
    EXPECT_EQ(p->pinned_bytes(), 600u);
  }
  EXPECT_EQ(rt.unregistered().size(), 2u);  // what was pinned is unpinned
}

TEST(HostPinnerTest, NoDeviceIsFailedPrecondition) {
  auto rt = CudaRuntime::Create();
  if (rt->available()) GTEST_SKIP() << "a CUDA device is present";
  std::vector<uint8_t> region(4096);
  auto p = HostPinner::Start(rt.get(), region.data(), region.size());
  EXPECT_THAT(p->Wait(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no CUDA device")));
  EXPECT_EQ(p->pinned_bytes(), 0u);
  auto none = HostPinner::Start(nullptr, region.data(), region.size());
  EXPECT_THAT(none->Wait(), StatusIs(absl::StatusCode::kFailedPrecondition));
}

}  // namespace
}  // namespace icecache
