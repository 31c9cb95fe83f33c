// The daemon's checks on a client-named shm path (RegisterBuffer HOST_SHM):
// the input is "<size as 8 little-endian bytes><path>". Paths are resolved
// against a private root holding a regular file, a symlink to it, a
// directory, a file outside the root reachable through "..", and a small
// file; every answer must be a mapping of a regular file under the root
// that covers `size` bytes, or a status. Nothing outside the root is ever
// mapped.
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "common/shm_file.h"
#include "tests/fuzz/fuzz_temp_dir.h"

namespace {

struct Root {
  std::string dir;
  icecache::ShmOpenOptions options;
  Root() {
    dir = icecache::fuzz::FuzzTempDir("icecache_fuzz_shm_");
    MakeFile(dir + "/icecache_fuzz_outside", 8192);
    std::string root = dir + "/root";
    mkdir(root.c_str(), 0700);
    MakeFile(root + "/buf", 8192);
    MakeFile(root + "/small", 16);
    mkdir((root + "/dir").c_str(), 0700);
    symlink((root + "/buf").c_str(), (root + "/link").c_str());
    symlink(dir.c_str(), (root + "/up").c_str());
    options.root = root;
    options.max_bytes = 1 << 20;
  }
  static void MakeFile(const std::string& path, off_t size) {
    const int fd = open(path.c_str(), O_RDWR | O_CREAT, 0600);
    if (fd >= 0) {
      if (ftruncate(fd, size) != 0) abort();
      close(fd);
    }
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Root* root = new Root();
  if (size < 8) return 0;
  uint64_t want;
  std::memcpy(&want, data, 8);
  std::string path(reinterpret_cast<const char*>(data + 8), size - 8);
  // Relative inputs are taken under the root, so the fuzzer reaches its files.
  if (path.empty() || path[0] != '/') path = root->options.root + "/" + path;
  auto f = icecache::ShmFile::OpenChecked(path, want, geteuid(), root->options);
  if (!f.ok()) return 0;
  // What was mapped is a regular file under the root, at least `want` long.
  struct stat st;
  if (fstat(f->fd(), &st) != 0 || !S_ISREG(st.st_mode) || uint64_t(st.st_size) < want) abort();
  if (f->path().rfind(root->options.root + "/", 0) != 0) abort();
  f->data()[want - 1] ^= 0;  // the whole mapping is readable and writable
  return 0;
}
