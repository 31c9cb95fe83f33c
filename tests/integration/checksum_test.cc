// Page checksums through a real daemon (docs/architecture.md §5): a decode
// loop with every fetched page checked (and byte-identical to what was
// appended), and a byte of the daemon's pool changed behind its back
// (through /proc/<pid>/mem) answered DATA_LOSS naming the page, counted in
// GetStats, never shipped.
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kPoolBytes = uint64_t{64} << 20;

// Finds `needle` in the daemon's pool (the one mapping of exactly
// kPoolBytes) and flips one bit of its last byte through /proc/<pid>/mem.
absl::Status CorruptInDaemon(pid_t pid, const uint8_t* needle, size_t size) {
  // The pool arena: a read-write mapping of at least the pool's size. The
  // kernel may merge it with a neighbouring anonymous mapping of the same
  // flags (seen under ASan: 64 MiB arena + 8 MiB), so mappings up to 4x the
  // size are candidates and the page's bytes pick the one that holds them.
  std::ifstream maps("/proc/" + std::to_string(pid) + "/maps");
  std::vector<std::pair<uint64_t, uint64_t>> candidates;
  for (std::string line; std::getline(maps, line);) {
    uint64_t a = 0, b = 0;
    char perms[5] = {};
    if (std::sscanf(line.c_str(), "%lx-%lx %4s", &a, &b, perms) == 3 && perms[0] == 'r' &&
        perms[1] == 'w' && b - a >= kPoolBytes && b - a <= 4 * kPoolBytes) {
      candidates.emplace_back(a, b);
    }
  }
  if (candidates.empty()) return absl::NotFoundError("no mapping of the pool's size in the daemon");
  const int fd = open(("/proc/" + std::to_string(pid) + "/mem").c_str(), O_RDWR);
  if (fd < 0) return absl::PermissionDeniedError("cannot open the daemon's /proc/<pid>/mem");
  absl::Status st = absl::NotFoundError("the page's bytes are not in the daemon's pool");
  for (const auto& [lo, hi] : candidates) {
    std::vector<uint8_t> pool(hi - lo);
    const ssize_t got = pread(fd, pool.data(), pool.size(), static_cast<off_t>(lo));
    void* at = got > 0 ? memmem(pool.data(), static_cast<size_t>(got), needle, size) : nullptr;
    if (at == nullptr) continue;
    const uint64_t where = lo + (static_cast<uint8_t*>(at) - pool.data()) + size - 1;
    const uint8_t flipped = needle[size - 1] ^ 0x10;
    st = pwrite(fd, &flipped, 1, static_cast<off_t>(where)) == 1
             ? absl::OkStatus()
             : absl::InternalError("pwrite to the daemon's memory failed");
    break;
  }
  close(fd);
  return st;
}

TEST(ChecksumIntegrationTest, DecodeLoopChecksEveryPageAndCorruptionIsDataLoss) {
  auto daemon = StartDaemon(absl::StrCat("pool { capacity_bytes: ", kPoolBytes, " }"));
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  TestModel m =
      MakeModel(/*layers=*/2, /*kv_heads=*/2, /*tokens=*/512, /*steps=*/4, SelectorType::kMdci);
  m.spec.checksums = SessionSpec::Checksums::kEveryPage;
  auto s = (*client)->CreateSession(m.spec);
  ASSERT_THAT(s, IsOk());
  EXPECT_EQ(s->spec.checksums, SessionSpec::Checksums::kEveryPage);
  const int64_t prefill = 512 - 4;
  ASSERT_THAT((*client)->AppendKvInline(s->id, m.kv.Chunk(0, prefill), prefill), IsOk());
  auto out = (*client)->CreateShmBuffer(1 << 20);
  ASSERT_THAT(out, IsOk());
  SelectOptions opt;
  opt.budget_tokens = 64;
  opt.want_positions = true;
  // Whole pages: the test finds a fetched page's bytes in the daemon (token
  // fetches are checked the same way: session_checksum_test).
  opt.granularity = SelectionGranularity::kPage;
  int64_t tokens = prefill, verified = 0;
  StepResult last;
  for (int step = 0; step < 4; ++step) {
    ASSERT_THAT((*client)->AppendKvInline(s->id, m.kv.Chunk(tokens, tokens + 1), 1), IsOk());
    ++tokens;
    for (int layer = 0; layer < m.spec.layers; ++layer) {
      auto r =
          (*client)->DecodeStep(s->id, layer, Queries(m, step, layer), out->buffer_id(), 0, opt);
      ASSERT_THAT(r, IsOk());
      auto n = VerifyFetch(m.kv, tokens, r->layout, r->heads, out->data(), out->size());
      ASSERT_THAT(n, IsOk());
      verified += *n;
      last = *r;
    }
  }
  auto stats = (*client)->GetStats();
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->checksum_failures, 0u);
  EXPECT_GE(stats->pages_verified, static_cast<uint64_t>(verified));

  // The last layer's first page of KV head 1, as the daemon holds it.
  const HeadLayout& h1 = last.layout.heads[1];
  std::vector<uint8_t> page(out->data() + h1.byte_offsets[0],
                            out->data() + h1.byte_offsets[0] + last.layout.page_bytes);
  ASSERT_THAT(CorruptInDaemon((*daemon)->pid(), page.data(), page.size()), IsOk());
  const uint32_t layer = m.spec.layers - 1;
  std::vector<std::vector<uint32_t>> pages = {{}, {h1.pages[0]}};
  EXPECT_THAT((*client)->FetchPages(s->id, layer, pages, out->buffer_id(), 0),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr(absl::StrCat("layer ", layer, " kv head 1 page ", h1.pages[0]))));
  stats = (*client)->GetStats();
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->checksum_failures, 1u);
  EXPECT_THAT((*daemon)->Stderr(), HasSubstr("page_checksum_mismatch"));
}

}  // namespace
}  // namespace icecache::testing
