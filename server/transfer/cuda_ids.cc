// Parsing of CUDA IPC handles and device UUIDs: no CUDA needed.
#include <cctype>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/transfer/cuda_runtime.h"

namespace icecache {

std::string CudaDeviceUuid::ToString() const {
  std::string hex;
  for (uint8_t b : bytes) absl::StrAppendFormat(&hex, "%02x", b);
  return absl::StrCat("GPU-", hex.substr(0, 8), "-", hex.substr(8, 4), "-", hex.substr(12, 4), "-",
                      hex.substr(16, 4), "-", hex.substr(20, 12));
}

absl::StatusOr<CudaIpcHandle> ParseCudaIpcHandle(std::string_view bytes) {
  if (bytes.size() != kCudaIpcHandleBytes) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA IPC handle must be ", kCudaIpcHandleBytes,
                                                   " bytes, got ", bytes.size()));
  }
  CudaIpcHandle h;
  bool all_zero = true;
  for (size_t i = 0; i < kCudaIpcHandleBytes; ++i) {
    h.bytes[i] = static_cast<uint8_t>(bytes[i]);
    all_zero = all_zero && h.bytes[i] == 0;
  }
  if (all_zero) return absl::InvalidArgumentError("CUDA IPC handle is all zero bytes");
  return h;
}

absl::StatusOr<CudaDeviceUuid> ParseCudaDeviceUuid(std::string_view s) {
  CudaDeviceUuid uuid;
  if (s.size() == 16) {
    // Raw bytes, unless it is printable hex text that happens to be 16 chars
    // (it cannot be: the text form has 32 hex digits).
    for (size_t i = 0; i < 16; ++i) uuid.bytes[i] = static_cast<uint8_t>(s[i]);
    return uuid;
  }
  std::string_view t = s;
  if (t.size() >= 4 && (t.substr(0, 4) == "GPU-" || t.substr(0, 4) == "gpu-")) t.remove_prefix(4);
  std::string hex;
  for (char c : t) {
    if (c == '-') continue;
    if (!std::isxdigit(static_cast<unsigned char>(c))) {
      return absl::InvalidArgumentError(
          "device UUID must be 16 bytes or 'GPU-' followed by 32 hex digits");
    }
    hex.push_back(c);
  }
  if (hex.size() != 32) {
    return absl::InvalidArgumentError(
        absl::StrCat("device UUID must be 16 bytes or 'GPU-' followed by 32 hex digits, got ",
                     s.size(), " characters"));
  }
  for (size_t i = 0; i < 16; ++i) {
    uuid.bytes[i] = static_cast<uint8_t>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  }
  return uuid;
}

}  // namespace icecache
