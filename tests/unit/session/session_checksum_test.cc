// Page checksums (docs/architecture.md §5) on a real pool and a real /dev/shm
// buffer: a byte changed in the pool behind the session's back is DATA_LOSS
// naming the page and is never shipped; appends keep the checksums current.
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/session/session_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::Env;
using ::icecache::testing::IsOk;
using ::icecache::testing::MakeEnv;
using ::icecache::testing::MakeKv;
using ::icecache::testing::SmallConfig;
using ::icecache::testing::StatusIs;
using ::icecache::testing::UniqueName;
using ::testing::HasSubstr;

Caller Alice() { return Caller{"alice", static_cast<uint32_t>(getuid()), false}; }

class SessionChecksumTest : public ::testing::TestWithParam<SelectorKind> {
 protected:
  void SetUp() override {
    env_ = MakeEnv(&clock_);
    auto shm = ShmFile::Create(UniqueName("sum"), 1 << 20);
    ASSERT_THAT(shm, IsOk());
    shm_ = std::move(shm).value();
    auto b = env_.buffers->RegisterShm(Alice(), shm_.path(), shm_.size(), clock_.Now());
    ASSERT_THAT(b, IsOk());
    buffer_id_ = b->id;
  }

  SessionConfig Config(ChecksumMode mode) const {
    SessionConfig c = SmallConfig(GetParam());
    c.checksums.mode = mode;
    return c;
  }

  // Every page of every KV head of `layer`'s group (a budget above the
  // session's tokens selects every page).
  FetchRequest AllPages(const std::string& id, int layer) {
    SelectRequest sel;
    sel.layer = layer;
    sel.queries = ::icecache::testing::MakeQueries(SmallConfig(), 3);
    sel.params.budget_tokens = 1 << 20;
    auto picked = env_.manager->SelectPages(Alice(), id, sel);
    EXPECT_THAT(picked, IsOk());
    FetchRequest f;
    f.buffer_id = buffer_id_;
    f.layer = layer;
    for (const Selection& h : picked->heads) f.pages.push_back(h.pages);
    return f;
  }

  // The pool frame whose bytes equal `frame` (found by content: the rows of
  // every position differ), or null.
  uint8_t* FindInPool(const uint8_t* frame, size_t bytes) {
    uint8_t* base = env_.pool->arena_base();
    void* at = memmem(base, env_.pool->Stats().reserved_bytes, frame, bytes);
    return static_cast<uint8_t*>(at);
  }

  FakeClock clock_;
  Env env_;
  ShmFile shm_;
  std::string buffer_id_;
};

TEST_P(SessionChecksumTest, CorruptPoolByteIsDataLossNamingThePage) {
  const SessionConfig c = Config(ChecksumMode::kEveryPage);
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 20, MakeKv(c, 0, 20)), IsOk());
  FetchRequest f;
  f.buffer_id = buffer_id_;
  f.layer = 1;
  f.pages = {{0, 1}, {2}};
  auto layout = env_.manager->FetchPages(Alice(), info->id, f);
  ASSERT_THAT(layout, IsOk());
  // Layer 1, KV head 1, page 2 sits in the third slot of the region.
  const uint64_t frame_bytes = layout->frame_bytes;
  const uint64_t slot = layout->heads[1].slots[0].byte_offset;
  uint8_t* in_pool = FindInPool(shm_.data() + slot, frame_bytes);
  ASSERT_NE(in_pool, nullptr);
  in_pool[frame_bytes - 3] ^= 0x40;  // one bit of a V row

  std::memset(shm_.data(), 0xCD, shm_.size());
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr("session " + info->id + " layer 1 kv head 1 page 2 failed")));
  for (uint64_t i = slot; i < slot + frame_bytes; ++i) {
    ASSERT_EQ(shm_.data()[i], 0xCD) << "byte " << i - slot << " of the corrupt page was shipped";
  }
  // Pages that were not touched still fetch.
  f.pages = {{0, 1}, {0}};
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f), IsOk());
  const ManagerStats st = env_.manager->Stats(Caller{"root", 0, true}).value();
  EXPECT_EQ(st.checksum_failures, 1u);
  EXPECT_GE(st.pages_verified, 3u + 3u + 3u);
}

// Token granularity reads rows out of frames: each frame a fetch reads from
// is checked before any row of its (layer, head) block is written.
TEST_P(SessionChecksumTest, CorruptPoolByteIsDataLossForATokenFetchToo) {
  const SessionConfig c = Config(ChecksumMode::kEveryPage);
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 20, MakeKv(c, 0, 20)), IsOk());
  FetchRequest f;
  f.buffer_id = buffer_id_;
  f.layer = 1;
  f.pages = {{0}, {2}};
  auto layout = env_.manager->FetchPages(Alice(), info->id, f);
  ASSERT_THAT(layout, IsOk());
  const uint64_t frame_bytes = layout->frame_bytes;
  uint8_t* in_pool = FindInPool(shm_.data() + layout->heads[1].slots[0].byte_offset, frame_bytes);
  ASSERT_NE(in_pool, nullptr);
  in_pool[frame_bytes - 3] ^= 0x40;  // layer 1, KV head 1, page 2

  std::vector<int32_t> every(20);
  for (int32_t p = 0; p < 20; ++p) every[p] = 19 - p;
  f.pages.clear();
  f.tokens = {every, every};
  std::memset(shm_.data(), 0xCD, shm_.size());
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f),
              StatusIs(absl::StatusCode::kDataLoss,
                       HasSubstr("session " + info->id + " layer 1 kv head 1 page 2 failed")));
  // Head 1's block (5 slots after head 0's 5) was not written at all.
  for (uint64_t i = 5 * frame_bytes; i < 10 * frame_bytes; ++i) {
    ASSERT_EQ(shm_.data()[i], 0xCD) << "byte " << i << " of kv head 1's block was written";
  }
  const ManagerStats st = env_.manager->Stats(Caller{"root", 0, true}).value();
  EXPECT_EQ(st.checksum_failures, 1u);
}

TEST_P(SessionChecksumTest, WithChecksumsOffTheSameCorruptionIsNotCaught) {
  const SessionConfig c = Config(ChecksumMode::kOff);
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 20, MakeKv(c, 0, 20)), IsOk());
  FetchRequest f;
  f.buffer_id = buffer_id_;
  f.pages = {{0}, {0}};
  auto layout = env_.manager->FetchPages(Alice(), info->id, f);
  ASSERT_THAT(layout, IsOk());
  uint8_t* in_pool = FindInPool(shm_.data(), layout->frame_bytes);
  ASSERT_NE(in_pool, nullptr);
  in_pool[5] ^= 0x01;
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f), IsOk());
  EXPECT_EQ(env_.manager->Stats(Caller{"root", 0, true})->pages_verified, 0u);
}

TEST_P(SessionChecksumTest, DecodeAppendsKeepPartialPagesVerifiable) {
  const SessionConfig c = Config(ChecksumMode::kEveryPage);
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 10, MakeKv(c, 0, 10)), IsOk());
  // One token at a time: each lands in a partial page, whose checksum must
  // follow, or the next fetch of that page would be DATA_LOSS.
  for (int64_t t = 10; t < 19; ++t) {
    ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 1, MakeKv(c, t, 1)), IsOk());
    for (int layer = 0; layer < c.layers; ++layer) {
      ASSERT_THAT(env_.manager->FetchPages(Alice(), info->id, AllPages(info->id, layer)), IsOk())
          << "after token " << t << ", layer " << layer;
    }
  }
  EXPECT_EQ(env_.manager->Stats(Caller{"root", 0, true})->checksum_failures, 0u);
}

TEST_P(SessionChecksumTest, SampledModeChecksAboutItsFraction) {
  SessionConfig c = Config(ChecksumMode::kSampled);
  c.checksums.sample_fraction = 0.25;
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 64, MakeKv(c, 0, 64)), IsOk());
  uint64_t fetched = 0;
  for (int i = 0; i < 50; ++i) {
    auto layout = env_.manager->FetchPages(Alice(), info->id, AllPages(info->id, i % c.layers));
    ASSERT_THAT(layout, IsOk());
    fetched += layout->total_slots();
  }
  const double verified = env_.manager->Stats(Caller{"root", 0, true})->pages_verified;
  EXPECT_GT(verified, 0.15 * fetched);
  EXPECT_LT(verified, 0.35 * fetched);
}

INSTANTIATE_TEST_SUITE_P(Selectors, SessionChecksumTest,
                         ::testing::Values(SelectorKind::kExact, SelectorKind::kMdci));

TEST(SessionChecksumConfigTest, SampleFractionOutsideRangeIsInvalidArgument) {
  SessionConfig c = SmallConfig();
  c.checksums.mode = ChecksumMode::kSampled;
  for (double bad : {0.0, -0.5, 1.5}) {
    c.checksums.sample_fraction = bad;
    EXPECT_THAT(ValidateSessionConfig(c, absl::Hours(1)),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("sample_fraction")));
  }
  c.checksums.sample_fraction = 1.0;
  EXPECT_THAT(ValidateSessionConfig(c, absl::Hours(1)), IsOk());
}

}  // namespace
}  // namespace icecache
