#include "common/file_util.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

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

absl::Status WriteFileAtomically(const std::string& path, std::string_view contents) {
  const std::string tmp = absl::StrCat(path, ".tmp-", ::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return absl::ErrnoToStatus(errno, path);
  const bool written = std::fwrite(contents.data(), 1, contents.size(), f) == contents.size();
  int err = written ? 0 : errno;
  if (std::fclose(f) != 0 && err == 0) err = errno;
  if (err == 0 && std::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err != 0) {
    std::remove(tmp.c_str());
    return absl::ErrnoToStatus(err, path);
  }
  return absl::OkStatus();
}

std::string PrivateFileProblem(int fd, struct stat* st) {
  if (fstat(fd, st) != 0) return std::strerror(errno);
  if (!S_ISREG(st->st_mode)) return "not a regular file";
  if (st->st_uid != geteuid()) {
    return absl::StrCat("owned by uid ", st->st_uid, ", not this daemon's uid ", geteuid());
  }
  if ((st->st_mode & 077) != 0) {
    return absl::StrFormat("mode %04o lets group or others in; it must be 0600",
                           st->st_mode & 07777);
  }
  return "";
}

}  // namespace icecache
