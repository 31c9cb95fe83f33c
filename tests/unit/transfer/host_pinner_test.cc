#include "server/transfer/host_pinner.h"

#include <mutex>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

// A CudaRuntime double that records pinning calls.
class RecordingRuntime : public CudaRuntime {
 public:
  explicit RecordingRuntime(int fail_at = -1) : fail_at_(fail_at) {}
  bool available() const override { return true; }
  std::string unavailable_reason() const override { return ""; }
  int device_count() const override { return 1; }
  absl::StatusOr<int> FindDevice(const CudaDeviceUuid&) const override { return 0; }
  absl::StatusOr<void*> OpenIpcHandle(int, const CudaIpcHandle&) override { return nullptr; }
  absl::Status CloseIpcHandle(int, void*) override { return absl::OkStatus(); }
  absl::Status CopyToDevice(int, void*, const void*, size_t) override { return absl::OkStatus(); }
  absl::Status HostRegister(void* p, size_t n) override {
    std::lock_guard<std::mutex> l(mu_);
    if (static_cast<int>(registered.size()) == fail_at_) {
      return absl::InternalError("cudaHostRegister: out of memory");
    }
    registered.emplace_back(p, n);
    return absl::OkStatus();
  }
  absl::Status HostUnregister(void* p) override {
    std::lock_guard<std::mutex> l(mu_);
    unregistered.push_back(p);
    return absl::OkStatus();
  }
  std::vector<std::pair<void*, size_t>> registered;
  std::vector<void*> unregistered;

 private:
  int fail_at_;
  std::mutex mu_;
};

TEST(HostPinnerTest, PinsInChunksAndUnpinsOnDestruction) {
  RecordingRuntime rt;
  std::vector<uint8_t> region(1000);
  {
    auto p = HostPinner::Start(&rt, region.data(), region.size(), 300);
    ASSERT_THAT(p->Wait(), IsOk());
    EXPECT_TRUE(p->done());
    EXPECT_EQ(p->pinned_bytes(), 1000u);
    ASSERT_EQ(rt.registered.size(), 4u);
    EXPECT_EQ(rt.registered[0].first, region.data());
    EXPECT_EQ(rt.registered[3].first, region.data() + 900);
    EXPECT_EQ(rt.registered[3].second, 100u);
    EXPECT_TRUE(rt.unregistered.empty());
  }
  EXPECT_EQ(rt.unregistered.size(), 4u);
}

TEST(HostPinnerTest, ErrorStopsAndIsReported) {
  RecordingRuntime rt(/*fail_at=*/2);
  std::vector<uint8_t> region(1000);
  {
    auto p = HostPinner::Start(&rt, region.data(), region.size(), 300);
    EXPECT_THAT(p->Wait(), StatusIs(absl::StatusCode::kInternal, HasSubstr("cudaHostRegister")));
    EXPECT_EQ(p->pinned_bytes(), 600u);
  }
  EXPECT_EQ(rt.unregistered.size(), 2u);  // what was pinned is unpinned
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
