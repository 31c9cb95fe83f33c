// Two processes on one GPU (docs/architecture.md §6.3): a real icecached and
// gpu_kv_client, the engine's side, which registers a paged KV cache and a
// plain device buffer by CUDA IPC through the C++ client and checks every
// byte the daemon pushed (scatter with events, plain fetch, a layer-group
// prefetch pushed in the background). Run twice: with the direct mode (the
// daemon pins its pool and the kernels read the pages in place; the test
// waits for the pinning and checks the daemon's metrics say the pushes read
// in place) and with transfer.direct_reads off (every push staged). Skips,
// with the reason, where there is no CUDA device or the build has no CUDA
// (then the client is not built).
#include <cstdlib>
#include <string>

#include "gtest/gtest.h"
#include "server/transfer/cuda_runtime.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

class GpuPushTest : public ::testing::TestWithParam<bool> {};

TEST_P(GpuPushTest, ScatterEventsAndPlainFetchLandEveryByte) {
  const bool direct = GetParam();
  std::unique_ptr<CudaRuntime> cuda = CudaRuntime::Create();
  if (!cuda->available()) GTEST_SKIP() << "skipped: " << cuda->unavailable_reason();
  // ICECACHE_GPU_CLIENT in the environment overrides the build's path (a
  // prebuilt bundle: tests/gpu/run.sh --prebuilt).
  const char* env = std::getenv("ICECACHE_GPU_CLIENT");
  const std::string client = env != nullptr && *env != '\0' ? env : ICECACHE_GPU_CLIENT;
  if (client.empty()) {
    GTEST_SKIP() << "skipped: built without CUDA (ICECACHE_ENABLE_CUDA=OFF), so the GPU "
                    "client is not built";
  }
  DaemonOptions options =
      TestDaemonOptions(direct ? "" : "transfer { direct_reads: false }\n", {}, "info");
  const int port = FreePort();
  ASSERT_GT(port, 0);
  options.metrics_port = static_cast<uint16_t>(port);
  auto daemon = DaemonProcess::Start(options);
  ASSERT_THAT(daemon, IsOk());
  if (direct) {
    ASSERT_TRUE(Eventually([&] {
      const std::string log = (*daemon)->Stderr();
      return log.find("msg=pool_pinned") != std::string::npos ||
             log.find("msg=pool_not_pinned") != std::string::npos;
    })) << (*daemon)->Stderr();
    ASSERT_EQ((*daemon)->Stderr().find("msg=pool_not_pinned"), std::string::npos)
        << (*daemon)->Stderr();
  }
  auto run = RunCommand({client, (*daemon)->target()});
  ASSERT_THAT(run, IsOk());
  std::printf("%s%s", run->out.c_str(), run->err.c_str());
  EXPECT_EQ(run->exit_code, 0) << run->err << "\ndaemon stderr:\n" << (*daemon)->Stderr();
  EXPECT_NE(run->out.find("gpu_kv_client: OK"), std::string::npos);
  const double in_place = MetricValue(**daemon, "icecache_gpu_pushes_total{path=\"in_place\"}");
  const double staged = MetricValue(**daemon, "icecache_gpu_pushes_total{path=\"staged\"}");
  std::printf("daemon pushes: %.0f in place, %.0f staged\n", in_place, staged);
  if (direct) {
    EXPECT_GT(in_place, 0) << (*daemon)->Stderr();
  } else {
    EXPECT_EQ(in_place, 0);
    EXPECT_GT(staged, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, GpuPushTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& p) {
                           return p.param ? "direct" : "staged";
                         });

}  // namespace
}  // namespace icecache::testing
