#include "server/session/index_image_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/file_util.h"
#include "server/pool/frame_checksum.h"

namespace icecache {

absl::StatusOr<std::unique_ptr<IndexImageFileWriter>> IndexImageFileWriter::Create(
    const std::string& path) {
  const std::string tmp = path + ".tmp";
  unlink(tmp.c_str());
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    return absl::PermissionDeniedError(
        absl::StrCat("index images: cannot create ", tmp, ": ", std::strerror(errno)));
  }
  return std::unique_ptr<IndexImageFileWriter>(new IndexImageFileWriter(path, fd));
}

IndexImageFileWriter::~IndexImageFileWriter() {
  if (fd_ >= 0) close(fd_);
  if (!committed_) unlink((path_ + ".tmp").c_str());
}

absl::StatusOr<IndexImageRef> IndexImageFileWriter::Append(std::string_view image) {
  if (!status_.ok()) return status_;
  IndexImageRef ref{size_, image.size(), FrameChecksum(image.data(), image.size())};
  size_t done = 0;
  while (done < image.size()) {
    const ssize_t n = write(fd_, image.data() + done, image.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      status_ = absl::InternalError(
          absl::StrCat("index images: write ", path_, ".tmp: ", std::strerror(errno)));
      return status_;
    }
    done += static_cast<size_t>(n);
    size_ += static_cast<uint64_t>(n);
  }
  ++images_;
  return ref;
}

absl::Status IndexImageFileWriter::Commit() {
  const std::string tmp = path_ + ".tmp";
  if (!status_.ok()) return status_;
  if (fd_ < 0) return absl::FailedPreconditionError("index images: committed twice");
  if (fsync(fd_) != 0) {
    return absl::InternalError(
        absl::StrCat("index images: fsync ", tmp, ": ", std::strerror(errno)));
  }
  close(fd_);
  fd_ = -1;
  if (rename(tmp.c_str(), path_.c_str()) != 0) {
    return absl::InternalError(
        absl::StrCat("index images: rename to ", path_, ": ", std::strerror(errno)));
  }
  committed_ = true;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<IndexImageFile>> IndexImageFile::OpenAndRemove(
    const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0 && errno == ENOENT) {
    return absl::NotFoundError(absl::StrCat("no index images at ", path));
  }
  unlink(path.c_str());
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("index images ", path, ": ", std::strerror(errno)));
  }
  struct stat st;
  const std::string why = PrivateFileProblem(fd, &st);
  if (!why.empty()) {
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat("index images ", path, ": ", why));
  }
  return std::unique_ptr<IndexImageFile>(new IndexImageFile(fd, static_cast<uint64_t>(st.st_size)));
}

IndexImageFile::~IndexImageFile() { close(fd_); }

absl::StatusOr<std::string> IndexImageFile::Read(const IndexImageRef& ref) const {
  if (ref.bytes == 0 || ref.offset > size_ || size_ - ref.offset < ref.bytes) {
    return absl::DataLossError(absl::StrCat("index image [", ref.offset, ", +", ref.bytes,
                                            ") lies outside the ", size_, "-byte file"));
  }
  std::string out(ref.bytes, '\0');
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n =
        pread(fd_, out.data() + done, out.size() - done, static_cast<off_t>(ref.offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::DataLossError(
          absl::StrCat("index image at ", ref.offset + done, ": short read (the file shrank?)"));
    }
    done += static_cast<size_t>(n);
  }
  if (FrameChecksum(out.data(), out.size()) != ref.hash) {
    return absl::DataLossError(absl::StrCat("index image at ", ref.offset, " fails its checksum"));
  }
  return out;
}

}  // namespace icecache
