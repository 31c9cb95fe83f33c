// The KV dump reader (common/kv_dump.h; icecache-bench, icecache-demo and
// the python tools read dumps a person hands them). The input is split at
// each "\n--part--\n" into keys.npy, values.npy, queries.npy and meta.json,
// written to a private directory, and read back whole and with a token
// limit. Any bytes give a dump whose sizes agree with its shape, or a
// status; never a crash, an overflow or an allocation beyond the files.
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/kv_dump.h"
#include "tests/fuzz/fuzz_temp_dir.h"

namespace {

constexpr std::string_view kSeparator = "\n--part--\n";
constexpr const char* kParts[] = {"keys.npy", "values.npy", "queries.npy", "meta.json"};

void WriteFile(const std::string& path, std::string_view bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) abort();
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) abort();
    done += static_cast<size_t>(n);
  }
  ::close(fd);
}

void CheckSizes(const icecache::KvDump& d) {
  const size_t kv = static_cast<size_t>(d.layers) * d.kv_heads * d.tokens * d.head_dim;
  const size_t q = static_cast<size_t>(d.steps) * d.layers * d.q_heads * d.head_dim;
  if (d.keys.size() != kv || d.values.size() != kv || d.queries.size() != q) abort();
  if (d.kv_heads <= 0 || d.q_heads % d.kv_heads != 0) abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string& dir = icecache::fuzz::FuzzTempDir("icecache_fuzz_kv_dump_");
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  for (const char* part : kParts) {
    const std::string path = dir + "/" + part;
    if (rest.data() == nullptr) {
      ::unlink(path.c_str());  // fewer parts: the file is missing
      continue;
    }
    const size_t cut = rest.find(kSeparator);
    WriteFile(path, rest.substr(0, cut));
    rest =
        cut == std::string_view::npos ? std::string_view() : rest.substr(cut + kSeparator.size());
  }
  auto whole = icecache::ReadKvDump(dir);
  if (whole.ok()) CheckSizes(*whole);
  // A token limit reads only a prefix of keys and values.
  const int64_t limit = size > 0 ? data[0] % 8 + 1 : 1;
  auto prefix = icecache::ReadKvDump(dir, limit);
  if (prefix.ok()) {
    CheckSizes(*prefix);
    if (prefix->tokens > limit) abort();
  }
  return 0;
}
