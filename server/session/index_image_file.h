// The index images of a warm restart on disk (docs/architecture.md §5): one
// file next to the snapshot, "<dir>/icecached-indexes", holding the images
// of every (session, layer group, KV head) that keeps one
// (Selector::SaveImage) back to back. The snapshot records where each one
// sits and its XXH3-64 (IndexImageRef), so one bad image costs only its own
// index a replay.
//
// Writing: "<path>.tmp" (0600, O_EXCL, O_NOFOLLOW), appended to, fsync'ed
// and renamed by Commit(), so a reader sees a whole file or none; an
// uncommitted writer removes its .tmp. Reading: the file is opened and
// removed at once (an image is trusted for one start, like the snapshot);
// the open descriptor keeps its bytes readable, each image read with pread
// after its bounds are checked against the file's size.
//
// Thread safety: the writer is single-threaded; IndexImageFile::Read may run
// concurrently (pread on one descriptor).
#ifndef ICECACHE_SERVER_SESSION_INDEX_IMAGE_FILE_H_
#define ICECACHE_SERVER_SESSION_INDEX_IMAGE_FILE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace icecache {

inline constexpr char kIndexImageFile[] = "icecached-indexes";

// Where one image sits in the file; bytes == 0: no image (replay).
struct IndexImageRef {
  uint64_t offset = 0;
  uint64_t bytes = 0;
  uint64_t hash = 0;  // XXH3-64 of the image's bytes
};

class IndexImageFileWriter {
 public:
  // PermissionDenied naming the path when the .tmp cannot be created.
  static absl::StatusOr<std::unique_ptr<IndexImageFileWriter>> Create(const std::string& path);
  ~IndexImageFileWriter();
  IndexImageFileWriter(const IndexImageFileWriter&) = delete;
  IndexImageFileWriter& operator=(const IndexImageFileWriter&) = delete;

  // Appends one image; Internal naming the path when the write fails (the
  // file then holds a torn image no ref points at). The first failure
  // sticks: later Appends and Commit return it.
  absl::StatusOr<IndexImageRef> Append(std::string_view image);
  // fsync and rename into place. Internal naming the failing call.
  absl::Status Commit();
  uint64_t bytes() const { return size_; }
  int64_t images() const { return images_; }

 private:
  IndexImageFileWriter(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  std::string path_;
  int fd_;
  uint64_t size_ = 0;
  int64_t images_ = 0;
  absl::Status status_;
  bool committed_ = false;
};

class IndexImageFile {
 public:
  // Opens `path` (O_NOFOLLOW; a regular file of this uid without
  // group/other bits) and removes it. NotFound when there is none;
  // FailedPrecondition (the file is removed all the same) otherwise.
  static absl::StatusOr<std::unique_ptr<IndexImageFile>> OpenAndRemove(const std::string& path);
  ~IndexImageFile();
  IndexImageFile(const IndexImageFile&) = delete;
  IndexImageFile& operator=(const IndexImageFile&) = delete;

  // The image `ref` names. DataLoss when it lies outside the file, the read
  // comes up short or the bytes do not hash to ref.hash.
  absl::StatusOr<std::string> Read(const IndexImageRef& ref) const;
  uint64_t size() const { return size_; }

 private:
  IndexImageFile(int fd, uint64_t size) : fd_(fd), size_(size) {}
  int fd_;
  uint64_t size_;
};

}  // namespace icecache

#endif  // ICECACHE_SERVER_SESSION_INDEX_IMAGE_FILE_H_
