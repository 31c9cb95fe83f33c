#include "server/transfer/cuda_runtime.h"

#include <string>

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(CudaIdsTest, ParseHandle) {
  std::string bytes(64, '\0');
  EXPECT_THAT(ParseCudaIpcHandle(bytes),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("all zero")));
  bytes[5] = 7;
  auto h = ParseCudaIpcHandle(bytes);
  ASSERT_THAT(h, IsOk());
  EXPECT_EQ(h->bytes[5], 7);
  EXPECT_THAT(ParseCudaIpcHandle(bytes + "x"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseCudaIpcHandle(""), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(CudaIdsTest, ParseUuidForms) {
  const std::string text = "GPU-01234567-89ab-cdef-0123-456789abcdef";
  auto a = ParseCudaDeviceUuid(text);
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ(a->bytes[0], 0x01);
  EXPECT_EQ(a->bytes[15], 0xef);
  EXPECT_EQ(a->ToString(), text);
  auto b = ParseCudaDeviceUuid("0123456789abcdef0123456789ABCDEF");
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(b->ToString(), text);
  std::string raw(reinterpret_cast<const char*>(a->bytes.data()), 16);
  auto c = ParseCudaDeviceUuid(raw);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->bytes, a->bytes);
  EXPECT_THAT(ParseCudaDeviceUuid("GPU-0123"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseCudaDeviceUuid("GPU-0123456789abcdef0123456789abcdeg"),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(CudaRuntimeTest, ReportsNoDeviceAsStatus) {
  auto rt = CudaRuntime::Create();
  if (rt->available()) GTEST_SKIP() << "CUDA device present: " << rt->device_count();
  EXPECT_EQ(rt->device_count(), 0);
  EXPECT_THAT(rt->unavailable_reason(), HasSubstr("no CUDA device"));
  CudaIpcHandle h;
  h.bytes[0] = 1;
  EXPECT_THAT(rt->OpenIpcHandle(0, h),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no CUDA device")));
  EXPECT_THAT(rt->FindDevice(CudaDeviceUuid{}), StatusIs(absl::StatusCode::kFailedPrecondition));
  char buf[4];
  EXPECT_THAT(rt->CopyToDevice(0, nullptr, buf, 4),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(rt->HostRegister(buf, 4), StatusIs(absl::StatusCode::kFailedPrecondition));
}

}  // namespace
}  // namespace icecache
