// The daemon's side of a warm restart (docs/architecture.md §5,
// docs/operations.md): the file-backed pool, recovery at start-up and the
// snapshot written by a drain for upgrade.
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "server/rpc/convert.h"
#include "server/rpc/daemon.h"
#include "server/rpc/log.h"

namespace icecache::rpc {
namespace {

constexpr char kArenaFile[] = "icecached-arena";
constexpr char kSnapshotFile[] = "icecached-snapshot";

// The backing (or state) directory, named `field` in messages: created 0700
// when missing; it must be a real directory (not a symlink) owned by this
// uid.
absl::Status CheckDaemonDir(const std::string& field, const std::string& dir) {
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, " ", dir, ": cannot create it: ", std::strerror(errno)));
  }
  struct stat st;
  if (lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, " ", dir, " is not a directory (symlinks are refused)"));
  }
  if (st.st_uid != geteuid()) {
    return absl::FailedPreconditionError(absl::StrCat(
        field, " ", dir, " is owned by uid ", st.st_uid, ", not this daemon's ", geteuid()));
  }
  return absl::OkStatus();
}

// The snapshot and the index images are written with write(2), which
// hugetlbfs refuses (it takes only mmap): found at start, not at the drain
// that would lose every session.
absl::Status CheckStateDirTakesWrites(const std::string& field, const std::string& dir) {
  struct statfs fs;
  if (statfs(dir.c_str(), &fs) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(field, " ", dir, ": statfs: ", std::strerror(errno)));
  }
  if (static_cast<uint64_t>(fs.f_type) == HUGETLBFS_MAGIC) {
    return absl::FailedPreconditionError(absl::StrCat(
        field, " ", dir,
        " is on hugetlbfs, which takes no write(2): the drain for upgrade could not write its "
        "snapshot there. Keep the arena on hugetlbfs and set pool.state_dir to a tmpfs "
        "directory (e.g. /dev/shm/icecache-state) for the snapshot and index images"));
  }
  return absl::OkStatus();
}

// The previous daemon's snapshot, if there is one this daemon can use. It is
// removed once read: a snapshot is trusted for one start only, so a crash
// after this start can never bring back sessions as they were before it.
std::optional<SnapshotImage> TakeSnapshotFile(const std::string& path, uint64_t capacity) {
  absl::StatusOr<SnapshotImage> image = ReadSnapshotFile(path);
  if (absl::IsNotFound(image.status())) return std::nullopt;
  unlink(path.c_str());
  std::string why;
  if (!image.ok()) {
    why = std::string(image.status().message());
  } else if (image->capacity_bytes != capacity) {
    why = absl::StrCat("it was written by a daemon with pool.capacity_bytes ",
                       image->capacity_bytes, "; this one has ", capacity);
  }
  if (why.empty()) return std::move(image).value();
  Log(LogLevel::kWarn, "snapshot_ignored",
      {{"path", path}, {"why", why}, {"effect", "cold start: no session is recovered"}});
  return std::nullopt;
}

// The previous daemon's index images when its snapshot is used; the file is
// removed either way (an image is trusted for one start, like the snapshot).
std::unique_ptr<IndexImageFile> TakeIndexImages(const std::string& path, bool wanted) {
  absl::StatusOr<std::unique_ptr<IndexImageFile>> f = IndexImageFile::OpenAndRemove(path);
  if (f.ok() && wanted) return std::move(f).value();
  if (!f.ok() && !absl::IsNotFound(f.status()) && wanted) {
    Log(LogLevel::kWarn, "index_images_ignored",
        {{"path", path}, {"why", f.status().message()}, {"effect", "indexes are replayed"}});
  }
  return nullptr;
}

}  // namespace

absl::Status Daemon::CreatePool(std::optional<SnapshotImage>* snapshot) {
  const auto& c = config_;
  PagePoolOptions opts;
  opts.capacity_bytes = c.pool().capacity_bytes();
  opts.use_huge_pages = c.pool().huge_pages();
  opts.keep_resident = c.pool().prefault();  // Init() then faults it in (PrefaultPool)
  // A prefaulted arena pays its huge-page faults (and any compaction) at
  // start-up, never under a request: the TLB gain is then free
  // (docs/bench/thp9_memory.md).
  opts.transparent_huge_pages = c.pool().prefault();
  opts.default_tenant_quota_bytes = QuotaFromProto(c.pool().default_quota_bytes());
  if (!c.pool().backing_dir().empty()) {
    const std::string& dir = c.pool().backing_dir();
    RETURN_IF_ERROR(CheckDaemonDir("pool.backing_dir", dir));
    const bool own_state_dir = !c.pool().state_dir().empty();
    const std::string state_dir = own_state_dir ? c.pool().state_dir() : dir;
    const std::string state_field = own_state_dir ? "pool.state_dir" : "pool.backing_dir";
    if (own_state_dir) RETURN_IF_ERROR(CheckDaemonDir(state_field, state_dir));
    RETURN_IF_ERROR(CheckStateDirTakesWrites(state_field, state_dir));
    opts.backing_file = absl::StrCat(dir, "/", kArenaFile);
    snapshot_path_ = absl::StrCat(state_dir, "/", kSnapshotFile);
    const uint64_t capacity = (opts.capacity_bytes + PagePool::kSlabBytes - 1) /
                              PagePool::kSlabBytes * PagePool::kSlabBytes;
    index_images_path_ = absl::StrCat(state_dir, "/", kIndexImageFile);
    *snapshot = TakeSnapshotFile(snapshot_path_, capacity);
    index_images_ = TakeIndexImages(index_images_path_, snapshot->has_value());
    opts.reuse_backing_file = snapshot->has_value();
  }
  absl::StatusOr<std::unique_ptr<PagePool>> pool = PagePool::Create(opts);
  if (!pool.ok() && opts.reuse_backing_file) {
    Log(LogLevel::kWarn, "snapshot_ignored",
        {{"path", snapshot_path_},
         {"why", pool.status().message()},
         {"effect", "cold start: no session is recovered"}});
    snapshot->reset();
    index_images_.reset();
    opts.reuse_backing_file = false;
    pool = PagePool::Create(opts);
  }
  if (!pool.ok()) return pool.status();
  pool_ = std::move(pool).value();
  return absl::OkStatus();
}

void Daemon::RecoverSessions(const SnapshotImage& snapshot) {
  const SessionManager::RestoreReport r = manager_->Restore(snapshot, index_images_.get());
  index_images_.reset();  // closes the (already removed) file
  for (const std::vector<std::string>& d : r.dropped) {
    Log(LogLevel::kWarn, "session_not_recovered",
        {{"id", d[0]}, {"tenant", d[1]}, {"why", d[2]}, {"effect", "dropped, never served"}});
  }
  for (const std::vector<std::string>& d : r.images_refused) {
    Log(LogLevel::kWarn, "index_image_refused",
        {{"id", d[0]},
         {"indexes", d[1]},
         {"first", d[2]},
         {"why", d[3]},
         {"effect", "those indexes were rebuilt by replaying the appends"}});
  }
  for (const std::vector<std::string>& f : r.quality_fresh) {
    Log(LogLevel::kInfo, "calibration_not_recovered",
        {{"id", f[0]},
         {"why", f[1]},
         {"effect", "its calibration starts fresh, at the session's own width"}});
  }
  Log(LogLevel::kInfo, "warm_restart",
      {{"recovered", r.recovered},
       {"dropped", static_cast<int64_t>(r.dropped.size())},
       {"indexes_loaded", r.indexes_loaded},
       {"indexes_replayed", r.indexes_replayed},
       {"calibrations_restored", r.quality_restored},
       {"verify_ms", absl::ToInt64Milliseconds(r.verify_time)},
       {"rebuild_ms", absl::ToInt64Milliseconds(r.rebuild_time)},
       {"snapshot_epoch", snapshot.daemon_epoch},
       {"snapshot_age_ms", absl::ToInt64Milliseconds(absl::Now() - snapshot.written)}});
}

void Daemon::WriteUpgradeSnapshot() {
  const absl::Time t0 = absl::Now();
  // From here on nothing writes the arena (frees are only accounted), so
  // the checksums in the snapshot stay true until the next daemon reads it.
  pool_->Freeze();
  std::vector<std::string> skipped;
  // The index images first: the snapshot names them, and a snapshot without
  // them (they could not be written) still restores, by replay.
  absl::StatusOr<std::unique_ptr<IndexImageFileWriter>> images =
      IndexImageFileWriter::Create(index_images_path_);
  SnapshotImage image = manager_->TakeSnapshot(&skipped, images.ok() ? images->get() : nullptr);
  absl::Status images_st = images.status();
  if (images_st.ok()) images_st = (*images)->Commit();
  if (!images_st.ok()) {
    for (SessionImage& s : image.sessions) s.index_images.clear();
    Log(LogLevel::kWarn, "index_images_failed",
        {{"path", index_images_path_},
         {"error", images_st.message()},
         {"effect", "the next daemon rebuilds the indexes by replay"}});
  }
  const absl::Status st = WriteSnapshotFile(image, snapshot_path_);
  if (!st.ok()) {
    exit_code_.store(1);
    Log(LogLevel::kError, "snapshot_failed",
        {{"path", snapshot_path_}, {"error", st.message()}, {"effect", "sessions are lost"}});
    return;
  }
  pool_->KeepBackingFile();
  exit_code_.store(kExitDrainedForUpgrade);
  Log(LogLevel::kInfo, "snapshot_written",
      {{"path", snapshot_path_},
       {"sessions", static_cast<int64_t>(image.sessions.size())},
       {"skipped", skipped.empty() ? std::string("none") : absl::StrJoin(skipped, "; ")},
       {"index_images", images_st.ok() ? (*images)->images() : int64_t{0}},
       {"index_image_bytes",
        images_st.ok() ? static_cast<int64_t>((*images)->bytes()) : int64_t{0}},
       {"ms", absl::ToInt64Milliseconds(absl::Now() - t0)}});
}

}  // namespace icecache::rpc
