#include "common/file_util.h"

#include <cerrno>
#include <cstdio>

#include "absl/status/status.h"

namespace icecache {

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return absl::ErrnoToStatus(errno, path);
  std::string out;
  char buf[1 << 16];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  const int err = std::ferror(f) ? errno : 0;
  std::fclose(f);
  if (err != 0) return absl::ErrnoToStatus(err, path);
  return out;
}

}  // namespace icecache
