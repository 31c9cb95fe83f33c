// CudaRuntime of builds without CUDA: always "no CUDA device".
#include "server/transfer/cuda_runtime.h"

namespace icecache {
namespace {

constexpr char kNoDevice[] = "no CUDA device (icecached was built without CUDA)";

class NoCudaRuntime final : public CudaRuntime {
 public:
  bool available() const override { return false; }
  std::string unavailable_reason() const override { return kNoDevice; }
  int device_count() const override { return 0; }
  absl::StatusOr<int> FindDevice(const CudaDeviceUuid&) const override { return Unavailable(); }
  absl::StatusOr<void*> OpenIpcHandle(int, const CudaIpcHandle&) override { return Unavailable(); }
  absl::Status CloseIpcHandle(int, void*) override { return Unavailable(); }
  absl::Status CopyToDevice(int, void*, const void*, size_t) override { return Unavailable(); }
  absl::Status HostRegister(void*, size_t) override { return Unavailable(); }
  absl::Status HostUnregister(void*) override { return Unavailable(); }
  absl::StatusOr<void*> CreateStream(int) override { return Unavailable(); }
  absl::Status DestroyStream(int, void*) override { return Unavailable(); }
  absl::StatusOr<void*> AllocPinned(size_t) override { return Unavailable(); }
  absl::Status FreePinned(void*) override { return Unavailable(); }
  absl::StatusOr<void*> DevicePointerOf(void*) override { return Unavailable(); }
  absl::StatusOr<void*> AllocDevice(int, size_t) override { return Unavailable(); }
  absl::Status FreeDevice(int, void*) override { return Unavailable(); }
  absl::Status CopyToDeviceAsync(int, void*, void*, const void*, size_t) override {
    return Unavailable();
  }
  absl::Status LaunchScatter(int, void*, const ScatterGeometry&, const ScatterTask*, uint32_t,
                             const ScatterSource&, uint8_t*) override {
    return Unavailable();
  }
  absl::Status LaunchGatherFrames(int, void*, const uint8_t* const*, uint32_t, uint64_t, uint32_t,
                                  uint8_t*) override {
    return Unavailable();
  }
  absl::StatusOr<void*> OpenIpcEvent(int, const CudaIpcHandle&) override { return Unavailable(); }
  absl::Status DestroyEvent(int, void*) override { return Unavailable(); }
  absl::Status StreamWaitEvent(int, void*, void*) override { return Unavailable(); }
  absl::Status RecordEvent(int, void*, void*) override { return Unavailable(); }
  absl::Status SynchronizeStream(int, void*) override { return Unavailable(); }

 private:
  static absl::Status Unavailable() { return absl::FailedPreconditionError(kNoDevice); }
};

}  // namespace

std::unique_ptr<CudaRuntime> CudaRuntime::Create() { return std::make_unique<NoCudaRuntime>(); }

}  // namespace icecache
