// The unit of selection by destination (docs/architecture.md §3.8, §6.4): a
// session that sets no granularity selects per token for a DecodeStep into
// a HOST_SHM buffer and per page into a CUDA_IPC buffer (the recording fake
// of the CUDA runtime stands in for the device) and for SelectPages; an
// explicit PAGE or TOKEN, per session or per call, is kept whatever the
// destination. Every row written is checked against the appended KV.
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "common/shm_file.h"
#include "tests/support/recording_cuda_runtime.h"
#include "tests/unit/session/session_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::MakeKv;
using ::icecache::testing::MakeQueries;
using ::icecache::testing::RecordingCudaRuntime;
using ::icecache::testing::SmallConfig;
using ::icecache::testing::StatusIs;
using ::icecache::testing::UniqueName;
using ::testing::HasSubstr;

Caller Alice() { return Caller{"alice", static_cast<uint32_t>(getuid()), false}; }

TEST(CallGranularityTest, TheCallsThenTheSessionsThenTheDestinations) {
  SessionConfig c;
  using D = SelectDestination;
  EXPECT_EQ(CallGranularity(c, std::nullopt, D::kHost), Granularity::kToken);
  EXPECT_EQ(CallGranularity(c, std::nullopt, D::kDevice), Granularity::kPage);
  EXPECT_EQ(CallGranularity(c, std::nullopt, D::kNone), Granularity::kPage);
  for (D d : {D::kNone, D::kHost, D::kDevice}) {
    EXPECT_EQ(CallGranularity(c, Granularity::kPage, d), Granularity::kPage);
    EXPECT_EQ(CallGranularity(c, Granularity::kToken, d), Granularity::kToken);
    c.granularity = Granularity::kPage;
    EXPECT_EQ(CallGranularity(c, std::nullopt, d), Granularity::kPage);
    EXPECT_EQ(CallGranularity(c, Granularity::kToken, d), Granularity::kToken);
    c.granularity = Granularity::kToken;
    EXPECT_EQ(CallGranularity(c, std::nullopt, d), Granularity::kToken);
    EXPECT_EQ(CallGranularity(c, Granularity::kPage, d), Granularity::kPage);
    c.granularity.reset();
  }
}

class SessionGranularityTest : public ::testing::Test {
 protected:
  static constexpr int64_t kTokens = 64;

  void SetUp() override {
    PagePoolOptions po;
    po.capacity_bytes = uint64_t{64} << 20;
    po.use_huge_pages = false;
    auto pool = PagePool::Create(po);
    ASSERT_THAT(pool, IsOk());
    pool_ = *std::move(pool);
    BufferRegistryOptions bo;
    bo.cuda = &cuda_;
    auto buffers = BufferRegistry::Create(bo);
    ASSERT_THAT(buffers, IsOk());
    buffers_ = *std::move(buffers);
    SessionManagerOptions mo;
    mo.pool = pool_.get();
    mo.buffers = buffers_.get();
    mo.clock = &clock_;
    auto manager = SessionManager::Create(mo);
    ASSERT_THAT(manager, IsOk());
    manager_ = *std::move(manager);

    auto shm = ShmFile::Create(UniqueName("gran"), kBytes);
    ASSERT_THAT(shm, IsOk());
    shm_ = *std::move(shm);
    auto b = buffers_->RegisterShm(Alice(), shm_.path(), shm_.size(), clock_.Now());
    ASSERT_THAT(b, IsOk());
    shm_id_ = b->id;
    const CudaIpcHandle handle = cuda_.AddPeerAllocation(0, kBytes, &device_);
    auto d = buffers_->RegisterCudaIpc(
        Alice(), std::string(reinterpret_cast<const char*>(handle.bytes.data()), 64), kBytes,
        RecordingCudaRuntime::UuidOf(0).ToString(), clock_.Now());
    ASSERT_THAT(d, IsOk());
    device_id_ = d->id;
  }

  // A session of SmallConfig (4 layers in groups of 2, 2 KV heads, pages of
  // 4) holding kTokens tokens.
  std::string Session(std::optional<Granularity> granularity) {
    config_ = SmallConfig();
    config_.granularity = granularity;
    auto info = manager_->CreateSession(Alice(), config_);
    EXPECT_THAT(info, IsOk());
    kv_ = MakeKv(config_, 0, kTokens);
    EXPECT_THAT(manager_->AppendKv(Alice(), info->id, kTokens, kv_), IsOk());
    return info->id;
  }

  SelectRequest Step(int layer, std::optional<Granularity> granularity = std::nullopt) const {
    SelectRequest r;
    r.layer = layer;
    r.queries = MakeQueries(config_, 11 + layer);
    r.params.budget_tokens = 10;  // not a multiple of the page: the last token slot is partial
    r.params.sink_tokens = 2;
    r.params.want_positions = true;
    r.granularity = granularity;
    return r;
  }

  // Every slot of `layout` (first layer `layer`) in `data` holds the appended
  // K and V rows of the positions it reports, zero past its fill; the slots
  // are token slots (packed, all full but the last) or page slots.
  void ExpectRows(const FetchLayout& layout, const uint8_t* data, bool token_slots) const {
    const uint64_t row = static_cast<uint64_t>(config_.head_dim) * 2;
    const int pt = config_.page_tokens;
    for (int h = 0; h < config_.kv_heads; ++h) {
      const FetchHeadLayout& head = layout.heads[h];
      size_t pos = 0;
      for (size_t i = 0; i < head.slots.size(); ++i) {
        const FetchSlot& s = head.slots[i];
        EXPECT_EQ(s.page == kTokenSlot, token_slots) << "head " << h << " slot " << i;
        if (token_slots && i + 1 < head.slots.size()) {
          EXPECT_EQ(s.fill, static_cast<uint32_t>(pt));
        }
        for (int k = 0; k < 2; ++k) {
          for (int t = 0; t < pt; ++t) {
            const uint8_t* got = data + s.byte_offset + (k * pt + t) * row;
            if (static_cast<uint32_t>(t) < s.fill) {
              ASSERT_LT(pos + t, head.positions.size());
              const int64_t p = head.positions[pos + t];
              const uint8_t* want =
                  kv_.data() +
                  (((k * config_.layers + layout.first_layer) * config_.kv_heads + h) * kTokens +
                   p) *
                      row;
              EXPECT_EQ(std::memcmp(got, want, row), 0) << "head " << h << " position " << p;
            } else {
              EXPECT_EQ(std::memcmp(got, zeros_.data(), row), 0) << "head " << h << " slot " << i;
            }
          }
        }
        pos += s.fill;
      }
      EXPECT_EQ(pos, head.positions.size());
    }
  }

  static bool ByToken(const SelectResult& r) {
    for (const Selection& s : r.heads) {
      if (s.token_refs.empty() || !s.pages.empty()) return false;
    }
    return true;
  }

  static constexpr uint64_t kBytes = 1 << 20;
  FakeClock clock_;
  RecordingCudaRuntime cuda_;
  std::unique_ptr<PagePool> pool_;
  std::unique_ptr<BufferRegistry> buffers_;
  std::unique_ptr<SessionManager> manager_;
  ShmFile shm_;
  std::string shm_id_, device_id_;
  uint8_t* device_ = nullptr;
  SessionConfig config_;
  std::vector<uint8_t> kv_;
  std::vector<uint8_t> zeros_ = std::vector<uint8_t>(1024, 0);
};

TEST_F(SessionGranularityTest, UnsetSelectsTokensIntoShmAndPagesIntoADeviceBuffer) {
  const std::string id = Session(std::nullopt);
  auto host = manager_->DecodeStep(Alice(), id, Step(0), shm_id_, 0);
  ASSERT_THAT(host, IsOk());
  EXPECT_TRUE(ByToken(host->selection));
  // The call's own select and gather times are reported (bench decode's split).
  EXPECT_GT(host->select_ns, 0);
  EXPECT_GT(host->gather_ns, 0);
  EXPECT_GE(host->step_ns, host->select_ns + host->gather_ns);
  for (const Selection& s : host->selection.heads) EXPECT_EQ(s.positions.size(), 10u);
  ExpectRows(host->layout, static_cast<const uint8_t*>(shm_.data()), /*token_slots=*/true);

  auto device = manager_->DecodeStep(Alice(), id, Step(2), device_id_, 0);
  ASSERT_THAT(device, IsOk());
  EXPECT_FALSE(ByToken(device->selection));
  for (const Selection& s : device->selection.heads) EXPECT_FALSE(s.pages.empty());
  ExpectRows(device->layout, device_, /*token_slots=*/false);

  // SelectPages has no destination: pages, which any buffer takes.
  auto selected = manager_->SelectPages(Alice(), id, Step(0));
  ASSERT_THAT(selected, IsOk());
  EXPECT_FALSE(ByToken(*selected));
  for (const Selection& s : selected->heads) EXPECT_FALSE(s.pages.empty());
}

// FetchRequest::token_hints (DecodeStep passes its selection's placements):
// right hints, wrong ones (another token's placement, a page that does not
// exist) and none write the same rows; a wrong hint is looked up.
TEST_F(SessionGranularityTest, TokenHintsRightOrWrongWriteTheSameRows) {
  const std::string id = Session(std::nullopt);
  auto sel = manager_->SelectPages(Alice(), id, Step(0, Granularity::kToken));
  ASSERT_THAT(sel, IsOk());
  ASSERT_TRUE(ByToken(*sel));
  FetchRequest f;
  f.layer = 0;
  f.buffer_id = shm_id_;
  f.want_positions = true;
  for (const Selection& s : sel->heads) f.tokens.push_back(s.positions);
  const uint8_t* data = static_cast<const uint8_t*>(shm_.data());
  std::vector<std::vector<uint8_t>> written;
  for (int variant = 0; variant < 3; ++variant) {
    SCOPED_TRACE(::testing::Message() << "variant " << variant);
    f.token_hints.clear();
    for (const Selection& s : sel->heads) {
      std::vector<Placement> hints = s.token_refs;
      if (variant == 2) {
        std::reverse(hints.begin(), hints.end());  // another token's placement
        hints.front().page = 1u << 30;             // no such page
      }
      if (variant > 0) f.token_hints.push_back(hints);
    }
    std::memset(shm_.data(), 0xab, kBytes);
    auto layout = manager_->FetchPages(Alice(), id, f);
    ASSERT_THAT(layout, IsOk());
    ExpectRows(*layout, data, /*token_slots=*/true);
    written.emplace_back(data, data + kBytes);
  }
  EXPECT_TRUE(written[0] == written[1]);
  EXPECT_TRUE(written[0] == written[2]);
}

TEST_F(SessionGranularityTest, ExplicitPageOrTokenIsKeptWhateverTheDestination) {
  for (Granularity session : {Granularity::kPage, Granularity::kToken}) {
    const std::string id = Session(session);
    auto host = manager_->DecodeStep(Alice(), id, Step(0), shm_id_, 0);
    ASSERT_THAT(host, IsOk());
    EXPECT_EQ(ByToken(host->selection), session == Granularity::kToken);
    ExpectRows(host->layout, static_cast<const uint8_t*>(shm_.data()),
               session == Granularity::kToken);
    auto selected = manager_->SelectPages(Alice(), id, Step(0));
    ASSERT_THAT(selected, IsOk());
    EXPECT_EQ(ByToken(*selected), session == Granularity::kToken);
  }
  // Per call, over an unset session.
  const std::string id = Session(std::nullopt);
  auto pages = manager_->DecodeStep(Alice(), id, Step(0, Granularity::kPage), shm_id_, 0);
  ASSERT_THAT(pages, IsOk());
  EXPECT_FALSE(ByToken(pages->selection));
  ExpectRows(pages->layout, static_cast<const uint8_t*>(shm_.data()), false);
  auto tokens = manager_->SelectPages(Alice(), id, Step(0, Granularity::kToken));
  ASSERT_THAT(tokens, IsOk());
  EXPECT_TRUE(ByToken(*tokens));
}

TEST_F(SessionGranularityTest, TokensAskedForADeviceBufferAreRefusedAndWriteNothing) {
  std::memset(device_, 0xAB, kBytes);
  const std::vector<uint8_t> before(device_, device_ + kBytes);
  const std::string unset = Session(std::nullopt);
  EXPECT_THAT(manager_->DecodeStep(Alice(), unset, Step(0, Granularity::kToken), device_id_, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("HOST_SHM buffers only")));
  const std::string token = Session(Granularity::kToken);
  EXPECT_THAT(manager_->DecodeStep(Alice(), token, Step(0), device_id_, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("GRANULARITY_PAGE")));
  EXPECT_EQ(std::memcmp(device_, before.data(), kBytes), 0);
}

TEST_F(SessionGranularityTest, AReusedTokenSelectionGoesToShmButNotToADeviceBuffer) {
  const std::string id = Session(std::nullopt);
  auto first = manager_->DecodeStep(Alice(), id, Step(0), shm_id_, 0);
  ASSERT_THAT(first, IsOk());
  ASSERT_TRUE(ByToken(first->selection));
  SelectRequest later;
  later.layer = 1;
  later.reuse_group_selection = true;
  later.params.want_positions = true;
  std::memset(device_, 0xAB, kBytes);
  const std::vector<uint8_t> before(device_, device_ + kBytes);
  EXPECT_THAT(manager_->DecodeStep(Alice(), id, later, device_id_, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("select layer 0 with GRANULARITY_PAGE")));
  EXPECT_EQ(std::memcmp(device_, before.data(), kBytes), 0);
  auto host = manager_->DecodeStep(Alice(), id, later, shm_id_, 0);
  ASSERT_THAT(host, IsOk());
  EXPECT_TRUE(host->selection.reused);
  EXPECT_TRUE(ByToken(host->selection));
  ExpectRows(host->layout, static_cast<const uint8_t*>(shm_.data()), true);
}

// In-place writes (DecodeStep's in_place; resident_rows.h).
class SessionInPlaceTest : public SessionGranularityTest {
 protected:
  absl::StatusOr<DecodeStepResult> StepAt(const std::string& id, uint32_t seed, uint64_t offset,
                                          bool in_place, int layer = 0) {
    SelectRequest r = Step(layer);
    r.queries = MakeQueries(config_, seed);
    return manager_->DecodeStep(Alice(), id, r, shm_id_, offset, 1, {}, false, in_place);
  }
  const uint8_t* data() const { return static_cast<const uint8_t*>(shm_.data()); }
  // Rows of one step: kv_heads x the budget.
  uint64_t Rows() const { return static_cast<uint64_t>(config_.kv_heads) * 10; }
};

TEST_F(SessionInPlaceTest, OnlyTheNewTokensAreCopiedAndEveryRowHoldsItsPosition) {
  const std::string id = Session(std::nullopt);
  // No previous write: in full.
  auto first = StepAt(id, 11, 0, /*in_place=*/true);
  ASSERT_THAT(first, IsOk());
  EXPECT_EQ(first->layout.rows_copied, Rows());
  EXPECT_EQ(first->layout.rows_kept, 0u);
  ExpectRows(first->layout, data(), /*token_slots=*/true);

  // The same queries again: every row stays where it is and none is copied,
  // so rows scribbled over since stay scribbled (the client's word was false).
  std::memset(shm_.data(), 0xCD, first->layout.total_bytes);
  auto same = StepAt(id, 11, 0, true);
  ASSERT_THAT(same, IsOk());
  EXPECT_EQ(same->layout.rows_copied, 0u);
  EXPECT_EQ(same->layout.rows_kept, Rows());
  EXPECT_EQ(data()[same->layout.heads[0].slots[0].byte_offset], 0xCD);
  // A whole write puts them back.
  auto whole = StepAt(id, 11, 0, false);
  ASSERT_THAT(whole, IsOk());
  EXPECT_EQ(whole->layout.rows_kept, 0u);
  ExpectRows(whole->layout, data(), true);

  // Other queries: only the tokens new to each head's selection are copied,
  // the others keep their slots, and every row holds the position reported.
  std::vector<std::vector<int32_t>> before;
  for (const FetchHeadLayout& h : whole->layout.heads) before.push_back(h.positions);
  uint64_t copied = 0, kept = 0;
  for (uint32_t seed = 12; seed < 24; ++seed) {
    SCOPED_TRACE(seed);
    auto step = StepAt(id, seed, 0, true);
    ASSERT_THAT(step, IsOk());
    ExpectRows(step->layout, data(), true);
    uint64_t fresh = 0;
    for (int h = 0; h < config_.kv_heads; ++h) {
      const std::vector<int32_t>& now = step->layout.heads[h].positions;
      ASSERT_EQ(now.size(), 10u);
      for (size_t slot = 0; slot < now.size(); ++slot) {
        const auto was = std::find(before[h].begin(), before[h].end(), now[slot]);
        if (was == before[h].end()) {
          ++fresh;
        } else {
          EXPECT_EQ(static_cast<size_t>(was - before[h].begin()), slot) << "head " << h;
        }
      }
      before[h] = now;
    }
    EXPECT_EQ(step->layout.rows_copied, fresh);
    EXPECT_EQ(step->layout.rows_kept, Rows() - fresh);
    copied += step->layout.rows_copied;
    kept += step->layout.rows_kept;
  }
  // The queries moved enough to change some tokens and keep others.
  EXPECT_GT(copied, 0u);
  EXPECT_GT(kept, 0u);
}

TEST_F(SessionInPlaceTest, WithoutARecordOfTheSamePlaceTheWriteIsWhole) {
  const std::string id = Session(std::nullopt);
  constexpr uint64_t kAt = 8192;
  ASSERT_THAT(StepAt(id, 11, 0, false), IsOk());
  // Another offset.
  auto moved = StepAt(id, 11, kAt, true);
  ASSERT_THAT(moved, IsOk());
  EXPECT_EQ(moved->layout.rows_kept, 0u);
  auto again = StepAt(id, 11, kAt, true);
  ASSERT_THAT(again, IsOk());
  EXPECT_EQ(again->layout.rows_kept, Rows());
  // Another layer (the other group) written over the region drops the record.
  std::memset(shm_.data(), 0, kBytes);
  ASSERT_THAT(StepAt(id, 11, kAt, false, /*layer=*/2), IsOk());
  auto after_other = StepAt(id, 11, kAt, true);
  ASSERT_THAT(after_other, IsOk());
  EXPECT_EQ(after_other->layout.rows_kept, 0u);
  ExpectRows(after_other->layout, data(), true);
  // Pages written over it likewise.
  auto pages = manager_->DecodeStep(Alice(), id, Step(0, Granularity::kPage), shm_id_, kAt, 1, {},
                                    false, /*in_place=*/true);
  ASSERT_THAT(pages, IsOk());
  EXPECT_FALSE(ByToken(pages->selection));
  EXPECT_EQ(pages->layout.rows_copied + pages->layout.rows_kept, 0u);
  auto after_pages = StepAt(id, 11, kAt, true);
  ASSERT_THAT(after_pages, IsOk());
  EXPECT_EQ(after_pages->layout.rows_kept, 0u);
  ExpectRows(after_pages->layout, data(), true);
  // And the record is back for the next step.
  auto next = StepAt(id, 11, kAt, true);
  ASSERT_THAT(next, IsOk());
  EXPECT_EQ(next->layout.rows_kept, Rows());
  ExpectRows(next->layout, data(), true);
}

// An engine that hands a region of its one buffer to another sequence: the
// other session's rows are there now, and the first session's next in-place
// write must not keep them (WriteLog, write_log.h).
TEST_F(SessionInPlaceTest, AnotherSessionsWriteOverTheRegionMakesTheWriteWhole) {
  const std::string a = Session(std::nullopt);
  const std::vector<uint8_t> a_kv = kv_;
  auto b_info = manager_->CreateSession(Alice(), config_);
  ASSERT_THAT(b_info, IsOk());
  const std::string b = b_info->id;
  ASSERT_THAT(manager_->AppendKv(Alice(), b, kTokens, MakeKv(config_, 0, kTokens, /*seed=*/9)),
              IsOk());

  ASSERT_THAT(StepAt(a, 11, 0, true), IsOk());
  auto kept = StepAt(a, 11, 0, true);
  ASSERT_THAT(kept, IsOk());
  EXPECT_EQ(kept->layout.rows_kept, Rows());
  // Session b writes its own rows there (same shape, same place).
  auto other = StepAt(b, 11, 0, false);
  ASSERT_THAT(other, IsOk());
  EXPECT_EQ(other->layout.total_bytes, kept->layout.total_bytes);
  // a's record is void: every row is a's again.
  auto after = StepAt(a, 11, 0, true);
  ASSERT_THAT(after, IsOk());
  EXPECT_EQ(after->layout.rows_kept, 0u);
  EXPECT_EQ(after->layout.rows_copied, Rows());
  kv_ = a_kv;
  ExpectRows(after->layout, data(), true);
  // And its record holds again for the next step.
  auto next = StepAt(a, 11, 0, true);
  ASSERT_THAT(next, IsOk());
  EXPECT_EQ(next->layout.rows_kept, Rows());
  // A write of b elsewhere in the buffer leaves a's record alone.
  ASSERT_THAT(StepAt(b, 11, 3 * next->layout.total_bytes, false), IsOk());
  auto elsewhere = StepAt(a, 11, 0, true);
  ASSERT_THAT(elsewhere, IsOk());
  EXPECT_EQ(elsewhere->layout.rows_kept, Rows());
  ExpectRows(elsewhere->layout, data(), true);
}

TEST_F(SessionInPlaceTest, TheLayersOfAGroupKeepTheirOwnRecords) {
  const std::string id = Session(std::nullopt);
  constexpr uint64_t kLater = 16384;  // layer 1's region
  SelectRequest later;
  later.layer = 1;
  later.reuse_group_selection = true;
  later.params.want_positions = true;
  for (uint32_t seed : {11u, 11u, 12u, 13u}) {
    SCOPED_TRACE(seed);
    auto first = StepAt(id, seed, 0, true);
    ASSERT_THAT(first, IsOk());
    auto reused = manager_->DecodeStep(Alice(), id, later, shm_id_, kLater, 1, {}, false, true);
    ASSERT_THAT(reused, IsOk());
    EXPECT_TRUE(reused->selection.reused);
    // The same selection, the same history: the same split, slot for slot.
    EXPECT_EQ(reused->layout.rows_copied, first->layout.rows_copied);
    for (int h = 0; h < config_.kv_heads; ++h) {
      EXPECT_EQ(reused->layout.heads[h].positions, first->layout.heads[h].positions);
    }
    ExpectRows(first->layout, data(), true);
    ExpectRows(reused->layout, data(), true);
  }
}

}  // namespace
}  // namespace icecache
