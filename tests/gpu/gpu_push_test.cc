// Two processes on one GPU (docs/architecture.md §6.3): a real icecached and
// gpu_kv_client, the engine's side, which registers a paged KV cache and a
// plain device buffer by CUDA IPC through the C++ client and checks every
// byte the daemon pushed (scatter with events, plain fetch, a layer-group
// prefetch pushed in the background). Skips, with the reason, where there is
// no CUDA device or the build has no CUDA (then the client is not built).
#include <cstdlib>
#include <string>

#include "gtest/gtest.h"
#include "server/transfer/cuda_runtime.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

TEST(GpuPushTest, ScatterEventsAndPlainFetchLandEveryByte) {
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
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto run = RunCommand({client, (*daemon)->target()});
  ASSERT_THAT(run, IsOk());
  std::printf("%s%s", run->out.c_str(), run->err.c_str());
  EXPECT_EQ(run->exit_code, 0) << run->err << "\ndaemon stderr:\n" << (*daemon)->Stderr();
  EXPECT_NE(run->out.find("gpu_kv_client: OK"), std::string::npos);
}

}  // namespace
}  // namespace icecache::testing
