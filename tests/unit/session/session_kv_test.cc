// AppendKv / SelectPages / FetchPages / DecodeStep on real pool frames and a
// real /dev/shm buffer.
#include <unistd.h>

#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "tests/support/time_scale.h"
#include "tests/unit/session/session_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::Env;
using ::icecache::testing::IsOk;
using ::icecache::testing::MakeEnv;
using ::icecache::testing::MakeKv;
using ::icecache::testing::MakeQueries;
using ::icecache::testing::SmallConfig;
using ::icecache::testing::StatusIs;
using ::icecache::testing::UniqueName;
using ::testing::HasSubstr;

Caller Alice() { return Caller{"alice", static_cast<uint32_t>(getuid()), false}; }

// Reference copy of everything appended: row bytes of (kv, layer, head, pos).
class KvMirror {
 public:
  explicit KvMirror(const SessionConfig& c) : c_(c), row_(c.head_dim * DTypeSize(c.dtype)) {}
  void Add(const std::vector<uint8_t>& bytes, int64_t first, int64_t n) {
    size_t off = 0;
    for (int kv = 0; kv < 2; ++kv)
      for (int l = 0; l < c_.layers; ++l)
        for (int h = 0; h < c_.kv_heads; ++h)
          for (int64_t t = 0; t < n; ++t) {
            rows_[{kv, l, h, first + t}].assign(bytes.begin() + off, bytes.begin() + off + row_);
            off += row_;
          }
  }
  const std::vector<uint8_t>& Row(int kv, int l, int h, int64_t pos) const {
    return rows_.at({kv, l, h, pos});
  }
  size_t row_bytes() const { return row_; }

 private:
  SessionConfig c_;
  size_t row_;
  std::map<std::tuple<int, int, int, int64_t>, std::vector<uint8_t>> rows_;
};

// Checks every slot of a fetched region against the mirror: K and V rows of
// the listed positions byte-identical, rows past the fill zero. Returns the
// positions seen per head.
std::vector<std::set<int32_t>> CheckRegion(const SessionConfig& c, const FetchLayout& layout,
                                           const uint8_t* buffer, const KvMirror& mirror) {
  std::vector<std::set<int32_t>> seen(c.kv_heads);
  const size_t row = mirror.row_bytes();
  const std::vector<uint8_t> zero(row, 0);
  for (int j = 0; j < layout.num_layers; ++j) {
    const int layer = layout.first_layer + j;
    for (const FetchHeadLayout& head : layout.heads) {
      size_t pos_index = 0;
      for (const FetchSlot& slot : head.slots) {
        const uint8_t* k = buffer + slot.byte_offset + j * layout.layer_stride_bytes;
        const uint8_t* v = k + static_cast<size_t>(c.page_tokens) * row;
        for (uint32_t r = 0; r < static_cast<uint32_t>(c.page_tokens); ++r) {
          if (r < slot.fill) {
            const int32_t pos = head.positions[pos_index + r];
            if (j == 0) seen[head.kv_head].insert(pos);
            EXPECT_EQ(0,
                      std::memcmp(k + r * row, mirror.Row(0, layer, head.kv_head, pos).data(), row))
                << "K layer " << layer << " head " << head.kv_head << " pos " << pos;
            EXPECT_EQ(0,
                      std::memcmp(v + r * row, mirror.Row(1, layer, head.kv_head, pos).data(), row))
                << "V layer " << layer << " head " << head.kv_head << " pos " << pos;
          } else {
            EXPECT_EQ(0, std::memcmp(k + r * row, zero.data(), row)) << "K row past fill";
            EXPECT_EQ(0, std::memcmp(v + r * row, zero.data(), row)) << "V row past fill";
          }
        }
        pos_index += slot.fill;
      }
      EXPECT_EQ(pos_index, head.positions.size());
    }
  }
  return seen;
}

class SessionKvTest : public ::testing::TestWithParam<SelectorKind> {
 protected:
  void SetUp() override {
    env_ = MakeEnv(&clock_);
    auto shm = ShmFile::Create(UniqueName("kv"), 4 << 20);
    ASSERT_THAT(shm, IsOk());
    shm_ = std::move(shm).value();
    auto b = env_.buffers->RegisterShm(Alice(), shm_.path(), shm_.size(), clock_.Now());
    ASSERT_THAT(b, IsOk());
    buffer_id_ = b->id;
  }

  // One DecodeStep of layers 2-3 into the shm buffer, every row checked.
  void DecodeStepSelectsAndFetches(std::optional<Granularity> granularity);

  FakeClock clock_;
  Env env_;
  ShmFile shm_;
  std::string buffer_id_;
};

TEST_P(SessionKvTest, AppendSelectFetchRoundTripIsByteIdentical) {
  const SessionConfig c = SmallConfig(GetParam());
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  KvMirror mirror(c);
  int64_t tokens = 0;
  // Prefill (bulk build, large enough to run on several threads), then
  // decode chunks (insert).
  for (int64_t n : {2100, 1, 3, 1, 6}) {
    auto kv = MakeKv(c, tokens, n);
    mirror.Add(kv, tokens, n);
    auto r = env_.manager->AppendKv(Alice(), info->id, n, kv);
    ASSERT_THAT(r, IsOk());
    tokens += n;
    EXPECT_EQ(r->tokens, tokens);
  }
  auto got = env_.manager->GetSession(Alice(), info->id);
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->tokens, tokens);
  EXPECT_GT(got->frame_bytes, 0u);
  EXPECT_EQ(env_.pool->TenantUsedBytes("alice"), got->frame_bytes);
  EXPECT_GT(got->page_fill, 0.0);
  EXPECT_LE(got->page_fill, 1.0);
  // Frames: one per page per layer of its group.
  EXPECT_EQ(got->frame_bytes, got->pages * c.layer_reuse * PagePool::StrideFor(2 * 4 * 16 * 2));
  // The decode appends' 11 keys were inserted one at a time into every tree
  // (mdci, exact-mdci); the prefill's were built, not inserted. The
  // daemon's stats sum the live sessions'.
  const bool tree = c.selector == SelectorKind::kMdci || c.selector == SelectorKind::kExactMdci;
  const uint64_t trees = static_cast<uint64_t>(c.layers / c.layer_reuse) * c.kv_heads;
  EXPECT_EQ(got->decode_keys, tree ? 11 * trees : 0u);
  EXPECT_LE(got->decode_keys_unrouted, got->decode_keys);
  auto stats = env_.manager->Stats(Caller{"root", 0, true});
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->decode_keys, got->decode_keys);
  EXPECT_EQ(stats->decode_keys_unrouted, got->decode_keys_unrouted);

  for (int layer = 0; layer < c.layers; layer += c.layer_reuse) {
    SelectRequest sel;
    sel.layer = layer;
    sel.queries = MakeQueries(c, 11 + layer);
    sel.params.budget_tokens = static_cast<int>(tokens);  // everything
    sel.params.want_positions = true;
    auto s = env_.manager->SelectPages(Alice(), info->id, sel);
    ASSERT_THAT(s, IsOk());
    ASSERT_EQ(s->heads.size(), static_cast<size_t>(c.kv_heads));
    FetchRequest f;
    f.layer = layer;
    f.num_layers = c.layer_reuse;  // the whole group in one region
    f.buffer_id = buffer_id_;
    f.offset = 4096;
    f.want_positions = true;
    for (const Selection& h : s->heads) f.pages.push_back(h.pages);
    std::memset(shm_.data(), 0xAB, shm_.size());
    auto layout = env_.manager->FetchPages(Alice(), info->id, f);
    ASSERT_THAT(layout, IsOk());
    EXPECT_EQ(layout->buffer_offset, 4096u);
    EXPECT_EQ(layout->frame_bytes, 2u * c.page_tokens * c.head_dim * 2);
    // Bytes outside the region are untouched.
    EXPECT_EQ(shm_.data()[4095], 0xAB);
    EXPECT_EQ(shm_.data()[4096 + layout->total_bytes], 0xAB);
    // Selection positions agree with the layout's.
    for (int h = 0; h < c.kv_heads; ++h) {
      EXPECT_EQ(s->heads[h].positions, layout->heads[h].positions);
    }
    auto seen = CheckRegion(c, *layout, shm_.data(), mirror);
    for (int h = 0; h < c.kv_heads; ++h) {
      EXPECT_EQ(seen[h].size(), static_cast<size_t>(tokens)) << "head " << h;
    }
  }
}

// A new page's frame comes from the pool holding a former owner's rows:
// the slots no row lands in read as zero (the prefill's partly filled pages,
// a decode page's tail), while the written slots carry exactly the rows.
TEST_P(SessionKvTest, NewPagesShowNoFormerOwnersBytes) {
  const SessionConfig c = SmallConfig(GetParam());
  {
    auto dirty = env_.manager->CreateSession(Alice(), c);
    ASSERT_THAT(dirty, IsOk());
    ASSERT_THAT(env_.manager->AppendKv(Alice(), dirty->id, 2100, MakeKv(c, 0, 2100, 9)), IsOk());
    ASSERT_THAT(env_.manager->DropSession(Alice(), dirty->id), IsOk());
  }
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  KvMirror mirror(c);
  int64_t tokens = 0;
  for (int64_t n : {1998, 1, 3, 2, 5}) {
    auto kv = MakeKv(c, tokens, n);
    mirror.Add(kv, tokens, n);
    ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, n, kv), IsOk());
    tokens += n;
  }
  for (int layer = 0; layer < c.layers; layer += c.layer_reuse) {
    SelectRequest sel;
    sel.layer = layer;
    sel.queries = MakeQueries(c, 3);
    sel.params.budget_tokens = static_cast<int>(tokens);
    sel.params.want_positions = true;
    auto s = env_.manager->SelectPages(Alice(), info->id, sel);
    ASSERT_THAT(s, IsOk());
    FetchRequest f;
    f.layer = layer;
    f.num_layers = c.layer_reuse;
    f.buffer_id = buffer_id_;
    f.want_positions = true;
    for (const Selection& h : s->heads) f.pages.push_back(h.pages);
    std::memset(shm_.data(), 0xAB, shm_.size());
    auto layout = env_.manager->FetchPages(Alice(), info->id, f);
    ASSERT_THAT(layout, IsOk());
    auto seen = CheckRegion(c, *layout, shm_.data(), mirror);  // rows past a fill are zero
    for (int h = 0; h < c.kv_heads; ++h) EXPECT_EQ(seen[h].size(), static_cast<size_t>(tokens));
  }
}

// Unset granularity (per token into this shm buffer) and explicit pages.
TEST_P(SessionKvTest, DecodeStepSelectsAndFetchesInOneCall) {
  for (std::optional<Granularity> g :
       {std::optional<Granularity>(), std::optional(Granularity::kPage)}) {
    SCOPED_TRACE(g.has_value() ? "page" : "unset");
    DecodeStepSelectsAndFetches(g);
  }
}

void SessionKvTest::DecodeStepSelectsAndFetches(std::optional<Granularity> granularity) {
  SessionConfig c = SmallConfig(GetParam());
  c.granularity = granularity;
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  KvMirror mirror(c);
  auto kv = MakeKv(c, 0, 64);
  mirror.Add(kv, 0, 64);
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 64, kv), IsOk());
  SelectRequest sel;
  sel.layer = 2;
  sel.queries = MakeQueries(c, 5);
  sel.params.budget_tokens = 16;
  sel.params.sink_tokens = 4;
  sel.params.want_positions = true;
  auto step = env_.manager->DecodeStep(Alice(), info->id, sel, buffer_id_, 0, 2);
  ASSERT_THAT(step, IsOk());
  EXPECT_EQ(step->layout.first_layer, 2);
  EXPECT_EQ(step->layout.num_layers, 2);
  for (int h = 0; h < c.kv_heads; ++h) {
    const Selection& s = step->selection.heads[h];
    // The literature's baselines (§3.9) have no token mode: they answer pages.
    const SelectorKind k = GetParam();
    const bool token_mode = k == SelectorKind::kMdci || k == SelectorKind::kExactMdci ||
                            k == SelectorKind::kExact || k == SelectorKind::kQuest ||
                            k == SelectorKind::kStreaming;
    const bool by_token = !granularity.has_value() && token_mode;
    EXPECT_EQ(s.token_refs.empty(), !by_token);
    EXPECT_EQ(s.pages.empty(), by_token);
    if (by_token) {
      EXPECT_EQ(s.tokens(), 16);  // exactly the budget, packed
    } else {
      EXPECT_GE(s.tokens(), 16);
    }
    ASSERT_EQ(step->layout.heads[h].slots.size(), s.fills.size());
    for (size_t i = 0; i < s.fills.size(); ++i) {
      EXPECT_EQ(step->layout.heads[h].slots[i].page, by_token ? kTokenSlot : s.pages[i]);
      EXPECT_EQ(step->layout.heads[h].slots[i].fill, s.fills[i]);
    }
    EXPECT_EQ(step->layout.heads[h].positions, s.positions);
  }
  auto seen = CheckRegion(c, step->layout, shm_.data(), mirror);
  for (int h = 0; h < c.kv_heads; ++h) EXPECT_TRUE(seen[h].count(0)) << "sink token missing";
}

// The layers [first, first + count) of an AppendKv chunk of n tokens.
std::vector<uint8_t> SliceLayers(const SessionConfig& c, const std::vector<uint8_t>& kv, int64_t n,
                                 int first, int count) {
  const size_t layer_bytes = static_cast<size_t>(c.kv_heads) * n * c.head_dim * DTypeSize(c.dtype);
  const size_t half = layer_bytes * c.layers;
  std::vector<uint8_t> out;
  for (size_t base : {size_t{0}, half}) {
    const uint8_t* from = kv.data() + base + first * layer_bytes;
    out.insert(out.end(), from, from + count * layer_bytes);
  }
  return out;
}

TEST_P(SessionKvTest, ChunksSentByLayerGroupsStoreTheSameBytes) {
  const SessionConfig c = SmallConfig(GetParam());  // 4 layers, layer_reuse 2
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  KvMirror mirror(c);
  int64_t tokens = 0;
  for (int64_t n : {300, 1, 2}) {
    auto kv = MakeKv(c, tokens, n);
    mirror.Add(kv, tokens, n);
    auto first = env_.manager->AppendKv(Alice(), info->id, n, SliceLayers(c, kv, n, 0, 2), {0, 2});
    ASSERT_THAT(first, IsOk());
    EXPECT_EQ(first->tokens, tokens);  // not every layer holds them yet
    EXPECT_EQ(first->next_layer, 2);
    auto rest = env_.manager->AppendKv(Alice(), info->id, n, SliceLayers(c, kv, n, 2, 2), {2, 0});
    ASSERT_THAT(rest, IsOk());
    tokens += n;
    EXPECT_EQ(rest->tokens, tokens);
    EXPECT_EQ(rest->next_layer, 0);
  }
  auto got = env_.manager->GetSession(Alice(), info->id);
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->trees_built, got->trees_total);
  EXPECT_EQ(got->trees_total, 2 * c.kv_heads);
  for (int layer = 0; layer < c.layers; layer += c.layer_reuse) {
    SelectRequest sel;
    sel.layer = layer;
    sel.queries = MakeQueries(c, 3 + layer);
    sel.params.budget_tokens = static_cast<int>(tokens);
    sel.params.want_positions = true;
    auto step = env_.manager->DecodeStep(Alice(), info->id, sel, buffer_id_, 0, c.layer_reuse);
    ASSERT_THAT(step, IsOk());
    auto seen = CheckRegion(c, step->layout, shm_.data(), mirror);
    for (int h = 0; h < c.kv_heads; ++h) EXPECT_EQ(seen[h].size(), static_cast<size_t>(tokens));
  }
}

INSTANTIATE_TEST_SUITE_P(Selectors, SessionKvTest,
                         ::testing::Values(SelectorKind::kExact, SelectorKind::kQuest,
                                           SelectorKind::kMdci, SelectorKind::kExactMdci,
                                           SelectorKind::kArkvale, SelectorKind::kPqcache,
                                           SelectorKind::kSnapkv, SelectorKind::kOmnikv,
                                           SelectorKind::kMagicpig, SelectorKind::kMdciPublished),
                         [](const ::testing::TestParamInfo<SelectorKind>& p) {
                           std::string n(SelectorKindName(p.param));
                           for (char& ch : n) ch = ch == '-' ? '_' : ch;
                           return n;
                         });

class SessionKvBasicTest : public SessionKvTest {};

TEST_F(SessionKvBasicTest, GroupSelectionIsReusedWithinTheGroup) {
  const SessionConfig c = SmallConfig();
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 40, MakeKv(c, 0, 40)), IsOk());
  SelectRequest reuse;
  reuse.layer = 1;
  reuse.reuse_group_selection = true;
  EXPECT_THAT(env_.manager->SelectPages(Alice(), info->id, reuse),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("select layer 0 first")));
  // On a group's first layer there is nothing to reuse: a precise refusal,
  // not a complaint about the (empty) queries.
  SelectRequest on_first = reuse;
  on_first.layer = 0;
  EXPECT_THAT(
      env_.manager->SelectPages(Alice(), info->id, on_first),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("reuse_group_selection on layer 0, the first layer of its group")));
  SelectRequest first;
  first.layer = 0;
  first.queries = MakeQueries(c, 3);
  first.params.budget_tokens = 8;
  auto a = env_.manager->SelectPages(Alice(), info->id, first);
  ASSERT_THAT(a, IsOk());
  auto b = env_.manager->SelectPages(Alice(), info->id, reuse);
  ASSERT_THAT(b, IsOk());
  EXPECT_TRUE(b->reused);
  EXPECT_EQ(b->group, 0);
  for (int h = 0; h < c.kv_heads; ++h) EXPECT_EQ(a->heads[h].pages, b->heads[h].pages);
  // Layer 2 is in another group: nothing to reuse there.
  reuse.layer = 3;
  EXPECT_THAT(env_.manager->SelectPages(Alice(), info->id, reuse),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  // A new append starts a new step: the old selection is stale.
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 1, MakeKv(c, 40, 1)), IsOk());
  reuse.layer = 1;
  EXPECT_THAT(env_.manager->SelectPages(Alice(), info->id, reuse),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_F(SessionKvBasicTest, BadAppendsChangeNothing) {
  const SessionConfig c = SmallConfig();
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  auto kv = MakeKv(c, 0, 10);
  EXPECT_THAT(env_.manager->AppendKv(Alice(), info->id, 10, absl::MakeConstSpan(kv).subspan(1)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("need exactly")));
  EXPECT_THAT(env_.manager->AppendKv(Alice(), info->id, 0, {}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(env_.manager->AppendKv(Alice(), info->id, -5, kv),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // A NaN key in the last layer (not the group's first layer) is refused too.
  auto bad = kv;
  const size_t row = c.head_dim * 2;
  const size_t at = ((3 * c.kv_heads + 1) * 10 + 7) * row + 6;  // layer 3, head 1, token 7
  bad[at] = 0x00;
  bad[at + 1] = 0x7e;  // fp16 NaN
  EXPECT_THAT(env_.manager->AppendKv(Alice(), info->id, 10, bad),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layer 3, kv head 1, token 7 is NaN or Inf")));
  auto got = env_.manager->GetSession(Alice(), info->id);
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->tokens, 0);
  EXPECT_EQ(env_.pool->used_bytes(), 0u);
  SelectRequest sel;
  sel.queries = MakeQueries(c, 1);
  EXPECT_THAT(env_.manager->SelectPages(Alice(), info->id, sel),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no tokens")));
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 10, kv), IsOk());
  // NaN after the index exists: still refused, still unchanged.
  const uint64_t used = env_.pool->used_bytes();
  auto kv2 = MakeKv(c, 10, 10);
  kv2[5 * row + 1] = 0x7c;
  kv2[5 * row] = 0x00;  // +Inf in layer 0
  EXPECT_THAT(env_.manager->AppendKv(Alice(), info->id, 10, kv2),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(env_.manager->GetSession(Alice(), info->id)->tokens, 10);
  EXPECT_EQ(env_.pool->used_bytes(), used);
}

TEST_F(SessionKvBasicTest, BadSelectsAreInvalidArgument) {
  const SessionConfig c = SmallConfig();
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 20, MakeKv(c, 0, 20)), IsOk());
  SelectRequest sel;
  sel.queries = MakeQueries(c, 1);
  sel.layer = 4;
  EXPECT_THAT(env_.manager->SelectPages(Alice(), info->id, sel),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer must be in 0..3")));
  sel.layer = 0;
  sel.queries.pop_back();
  EXPECT_THAT(env_.manager->SelectPages(Alice(), info->id, sel),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("q_heads x head_dim")));
  sel.queries = MakeQueries(c, 1);
  sel.queries[17] = std::nanf("");
  EXPECT_THAT(env_.manager->SelectPages(Alice(), info->id, sel),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NaN or Inf")));
  sel.queries[17] = 1.0f;
  sel.params.budget_tokens = -1;
  EXPECT_THAT(env_.manager->SelectPages(Alice(), info->id, sel),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("budget_tokens")));
  sel.params.budget_tokens = 1000;  // larger than the session: everything
  auto all = env_.manager->SelectPages(Alice(), info->id, sel);
  ASSERT_THAT(all, IsOk());
  EXPECT_EQ(all->heads[0].tokens(), 20);
}

TEST_F(SessionKvBasicTest, BadFetchesWriteNothing) {
  const SessionConfig c = SmallConfig();
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 20, MakeKv(c, 0, 20)), IsOk());
  std::memset(shm_.data(), 0xCD, shm_.size());
  FetchRequest f;
  f.buffer_id = buffer_id_;
  f.pages = {{0, 1}, {2}};
  const uint64_t frame = 2 * c.page_tokens * c.head_dim * 2;
  f.offset = shm_.size() - 3 * frame + 1;  // one byte too far
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f),
              StatusIs(absl::StatusCode::kOutOfRange, HasSubstr("exceeds buffer size")));
  f.offset = ~uint64_t{0} - 2;
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f),
              StatusIs(absl::StatusCode::kOutOfRange));
  f.offset = 0;
  f.pages = {{0, 99}, {2}};
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("page 99 of kv head 0")));
  f.pages = {{0}};
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("2 kv heads")));
  f.pages = {{0}, {0}};
  f.layer = 1;
  f.num_layers = 2;  // layers 1..2 cross the group boundary at 2
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("layer group boundary")));
  f.layer = 3;
  f.num_layers = 2;
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_layers")));
  f.layer = 0;
  f.num_layers = 1;
  f.buffer_id = "0123456789abcdef0123456789abcdef";
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("buffer")));
  for (size_t i = 0; i < shm_.size(); ++i) ASSERT_EQ(shm_.data()[i], 0xCD) << "byte " << i;
}

// Two sessions given one region: a write into bytes another writer is
// writing right now is refused before anything changes; the same write into
// other bytes, or once the other write is done, goes through.
TEST_F(SessionKvBasicTest, AWriteIntoBytesAnotherSessionIsWritingIsRefused) {
  const SessionConfig c = SmallConfig();
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 20, MakeKv(c, 0, 20)), IsOk());
  std::memset(shm_.data(), 0xCD, shm_.size());
  const uint64_t frame = 2 * c.page_tokens * c.head_dim * 2;
  // Another writer's write in flight over [frame, 2 x frame).
  auto lease = env_.buffers->Acquire(Alice(), buffer_id_, clock_.Now());
  ASSERT_THAT(lease, IsOk());
  auto other = lease->ClaimWrite(~uint64_t{0}, frame, frame);
  ASSERT_THAT(other, IsOk());
  EXPECT_EQ(lease->writes_in_flight(), 1u);
  FetchRequest pages;
  pages.buffer_id = buffer_id_;
  pages.pages = {{0, 1}, {2}};  // 3 frames from offset 0
  FetchRequest tokens;
  tokens.buffer_id = buffer_id_;
  tokens.tokens = {{0, 1, 2}, {5}};
  tokens.offset = frame / 2;
  for (const FetchRequest* f : {&pages, &tokens}) {
    SCOPED_TRACE(f == &pages ? "pages" : "tokens");
    EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, *f),
                StatusIs(absl::StatusCode::kFailedPrecondition,
                         HasSubstr("that another session is writing right now")));
  }
  for (size_t i = 0; i < shm_.size(); ++i) ASSERT_EQ(shm_.data()[i], 0xCD) << "byte " << i;
  EXPECT_EQ(lease->writes_in_flight(), 1u);  // the refused writes left no claim
  // Other bytes: written.
  FetchRequest elsewhere = pages;
  elsewhere.offset = 4 * frame;
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, elsewhere), IsOk());
  // The other write done: the same requests go through.
  *other = BufferLease::WriteClaim();
  EXPECT_EQ(lease->writes_in_flight(), 0u);
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, pages), IsOk());
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, tokens), IsOk());
  EXPECT_EQ(lease->writes_in_flight(), 0u);
}

TEST_F(SessionKvBasicTest, TruncatedBufferIsAStatusNotACrash) {
  const SessionConfig c = SmallConfig();
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 20, MakeKv(c, 0, 20)), IsOk());
  ASSERT_EQ(ftruncate(shm_.fd(), 100), 0);
  FetchRequest f;
  f.buffer_id = buffer_id_;
  f.pages = {{0, 1}, {2}};
  EXPECT_THAT(env_.manager->FetchPages(Alice(), info->id, f),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("shrank")));
  EXPECT_THAT(env_.manager->AppendKvFromBuffer(Alice(), info->id, 1, buffer_id_, 0),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("shrank")));
  EXPECT_EQ(env_.manager->GetSession(Alice(), info->id)->tokens, 20);
}

TEST_F(SessionKvBasicTest, AppendFromRegisteredBuffer) {
  const SessionConfig c = SmallConfig();
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  KvMirror mirror(c);
  auto kv = MakeKv(c, 0, 24);
  mirror.Add(kv, 0, 24);
  std::memcpy(shm_.data() + 512, kv.data(), kv.size());
  ASSERT_THAT(env_.manager->AppendKvFromBuffer(Alice(), info->id, 24, buffer_id_, 512), IsOk());
  EXPECT_THAT(env_.manager->AppendKvFromBuffer(Alice(), info->id, 24, buffer_id_,
                                               shm_.size() - kv.size() + 1),
              StatusIs(absl::StatusCode::kOutOfRange));
  SelectRequest sel;
  sel.queries = MakeQueries(c, 2);
  sel.params.budget_tokens = 24;
  sel.params.want_positions = true;
  auto step = env_.manager->DecodeStep(Alice(), info->id, sel, buffer_id_, 0, 1);
  ASSERT_THAT(step, IsOk());
  auto seen = CheckRegion(c, step->layout, shm_.data(), mirror);
  EXPECT_EQ(seen[0].size(), 24u);
}

// A prefill chunk of 16 MiB or more is copied out of the client's buffer in
// 8 MiB blocks on several threads: every byte lands, and a file truncated
// under it is one precise status (no "task N:" of the parallel runner), with
// nothing stored.
TEST_F(SessionKvBasicTest, ALargeBufferAppendIsCopiedInBlocksExactly) {
  const SessionConfig c = SmallConfig();  // 512 bytes per token (4 layers, K and V)
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  const int64_t n = 40000;  // 20 MB: three blocks, the last one partial
  auto kv = MakeKv(c, 0, n);
  ASSERT_GE(kv.size(), uint64_t{16} << 20);
  auto big = ShmFile::Create(UniqueName("big"), kv.size() + 4096);
  ASSERT_THAT(big, IsOk());
  auto b = env_.buffers->RegisterShm(Alice(), big->path(), big->size(), clock_.Now());
  ASSERT_THAT(b, IsOk());
  std::memcpy(big->data() + 4096, kv.data(), kv.size());
  ASSERT_THAT(env_.manager->AppendKvFromBuffer(Alice(), info->id, n, b->id, 4096), IsOk());
  KvMirror mirror(c);
  mirror.Add(kv, 0, n);
  // Every page of the last layer back out, compared row by row.
  FetchRequest f;
  f.buffer_id = buffer_id_;
  f.layer = 3;
  f.want_positions = true;
  const int64_t pages = n / c.page_tokens;
  for (int h = 0; h < c.kv_heads; ++h) f.pages.emplace_back();
  for (int64_t first = 0; first < pages; first += 256) {
    for (auto& head : f.pages) {
      head.clear();
      for (int64_t p = first; p < std::min(pages, first + 256); ++p) {
        head.push_back(static_cast<uint32_t>(p));
      }
    }
    auto layout = env_.manager->FetchPages(Alice(), info->id, f);
    ASSERT_THAT(layout, IsOk());
    auto seen = CheckRegion(c, *layout, shm_.data(), mirror);
    ASSERT_EQ(seen[0].size(), f.pages[0].size() * c.page_tokens) << "pages from " << first;
  }
  ASSERT_EQ(ftruncate(big->fd(), 12 << 20), 0);  // inside the second block
  auto again = env_.manager->AppendKvFromBuffer(Alice(), info->id, n, b->id, 4096);
  EXPECT_THAT(again, StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("shrank")));
  EXPECT_THAT(again.status().message(), ::testing::Not(HasSubstr("task")));
  EXPECT_EQ(env_.manager->GetSession(Alice(), info->id)->tokens, n);
}

// The blocks are checked for NaN/Inf as they are copied: a bad element in
// any block of a large buffer append, keys or values, is refused with the
// element named and nothing stored; a clean append then goes in.
TEST_F(SessionKvBasicTest, ABadElementInAnyBlockOfALargeBufferAppendIsNamed) {
  const SessionConfig c = SmallConfig();  // fp16, 512 bytes per token (4 layers, K and V)
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  const int64_t n = 40000;  // 20 MB: three 8 MiB blocks
  auto kv = MakeKv(c, 0, n);
  auto big = ShmFile::Create(UniqueName("bad"), kv.size());
  ASSERT_THAT(big, IsOk());
  auto b = env_.buffers->RegisterShm(Alice(), big->path(), big->size(), clock_.Now());
  ASSERT_THAT(b, IsOk());
  const size_t row = c.head_dim * 2;
  struct Bad {
    bool values;
    int layer, head;
    int64_t token;
    const char* want;
  };
  for (const Bad& bad :
       {Bad{false, 0, 0, 3, "key of layer 0, kv head 0, token 3 is NaN"},
        Bad{false, 2, 1, 39999, "key of layer 2, kv head 1, token 39999 is NaN"},
        Bad{true, 1, 0, 20000, "value of layer 1, kv head 0, token 20000 is NaN"},
        Bad{true, 3, 1, 39999, "value of layer 3, kv head 1, token 39999 is NaN"}}) {
    std::memcpy(big->data(), kv.data(), kv.size());
    const size_t at =
        (bad.values ? kv.size() / 2 : 0) +
        ((static_cast<size_t>(bad.layer) * c.kv_heads + bad.head) * n + bad.token) * row + 10;
    big->data()[at] = 0x00;
    big->data()[at + 1] = 0x7c;  // fp16 +Inf
    EXPECT_THAT(env_.manager->AppendKvFromBuffer(Alice(), info->id, n, b->id, 0),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(bad.want)));
    EXPECT_EQ(env_.manager->GetSession(Alice(), info->id)->tokens, 0);
  }
  std::memcpy(big->data(), kv.data(), kv.size());
  ASSERT_THAT(env_.manager->AppendKvFromBuffer(Alice(), info->id, n, b->id, 0), IsOk());
  EXPECT_EQ(env_.manager->GetSession(Alice(), info->id)->tokens, n);
}

TEST_F(SessionKvBasicTest, ReadyLayerGroupsServeWhileTheRestOfThePrefillArrives) {
  const SessionConfig c = SmallConfig(SelectorKind::kMdci);  // 4 layers, layer_reuse 2
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  const int64_t n = 64;
  auto kv = MakeKv(c, 0, n);
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, n, SliceLayers(c, kv, n, 0, 2), {0, 2}),
              IsOk());
  auto got = env_.manager->GetSession(Alice(), info->id);
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->tokens, 0);
  EXPECT_EQ(got->next_layer, 2);
  EXPECT_EQ(got->trees_built, c.kv_heads);  // group 0 of 2
  EXPECT_EQ(got->trees_total, 2 * c.kv_heads);
  SelectRequest sel;
  sel.layer = 1;
  sel.queries = MakeQueries(c, 4);
  sel.params.budget_tokens = 16;
  EXPECT_THAT(env_.manager->SelectPages(Alice(), info->id, sel), IsOk());
  sel.layer = 2;
  EXPECT_THAT(env_.manager->SelectPages(Alice(), info->id, sel),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("layer 2")));

  // Out of order, wrong size or not whole groups: refused, nothing stored.
  EXPECT_THAT(env_.manager->AppendKv(Alice(), info->id, n, kv),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("expects layers 2..")));
  EXPECT_THAT(env_.manager->AppendKv(Alice(), info->id, 8, SliceLayers(c, MakeKv(c, 0, 8), 8, 2, 2),
                                     {2, 2}),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("chunk of 64 tokens")));
  EXPECT_THAT(env_.manager->AppendKv(Alice(), info->id, n, SliceLayers(c, kv, n, 1, 2), {1, 2}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("whole layer groups")));
  EXPECT_THAT(env_.manager->AppendKv(Alice(), info->id, n, SliceLayers(c, kv, n, 2, 2), {2, 3}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("within the model's 4")));
  got = env_.manager->GetSession(Alice(), info->id);
  EXPECT_EQ(got->next_layer, 2);
  EXPECT_EQ(got->trees_built, c.kv_heads);

  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, n, SliceLayers(c, kv, n, 2, 2), {2, 2}),
              IsOk());
  got = env_.manager->GetSession(Alice(), info->id);
  EXPECT_EQ(got->tokens, n);
  EXPECT_EQ(got->next_layer, 0);
  EXPECT_THAT(env_.manager->SelectPages(Alice(), info->id, sel), IsOk());
  // A new chunk must start at layer 0.
  EXPECT_THAT(env_.manager->AppendKv(Alice(), info->id, 1, SliceLayers(c, MakeKv(c, n, 1), 1, 2, 2),
                                     {2, 2}),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("starts at layer 0")));
}

TEST_F(SessionKvBasicTest, BackgroundBuildsServeBuiltGroupsAndMakeOnlyTheirOwnCallsWait) {
  // A second manager over the same pool and buffers, building trees in the
  // background; the build of layers 2..3 is held at a gate.
  absl::Notification release;
  SessionManagerOptions mo;
  mo.pool = env_.pool.get();
  mo.buffers = env_.buffers.get();
  mo.clock = &clock_;
  mo.reaper_interval = absl::ZeroDuration();
  mo.build_threads = 2;
  mo.background_builds = true;
  // Bounds how long the machine takes to build group 1 after the release.
  mo.build_wait = ::icecache::testing::Scaled(absl::Milliseconds(200));
  mo.on_build_start = [&release](const std::string&, int first_layer) {
    if (first_layer == 2) release.WaitForNotification();
  };
  absl::Mutex done_mu;
  std::vector<BuildDone> done;  // the jobs' reports, in order
  mo.on_build_done = [&](const BuildDone& d) {
    absl::MutexLock l(&done_mu);
    done.push_back(d);
  };
  auto manager = SessionManager::Create(mo);
  ASSERT_THAT(manager, IsOk());
  SessionManager& m = **manager;
  const SessionConfig c = SmallConfig(SelectorKind::kMdci);  // 4 layers, layer_reuse 2
  auto info = m.CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  const int64_t n = 200;
  auto kv = MakeKv(c, 0, n);
  KvMirror mirror(c);
  mirror.Add(kv, 0, n);
  ASSERT_THAT(m.AppendKv(Alice(), info->id, n, SliceLayers(c, kv, n, 0, 2), {0, 2}), IsOk());
  auto rest = m.AppendKv(Alice(), info->id, n, SliceLayers(c, kv, n, 2, 2), {2, 2});
  ASSERT_THAT(rest, IsOk());  // answered while its trees wait at the gate
  EXPECT_EQ(rest->tokens, n);
  // Layer 0's group is built (or being built, not gated): its step waits for it only.
  SelectRequest sel;
  sel.layer = 0;
  sel.queries = MakeQueries(c, 5);
  sel.params.budget_tokens = static_cast<int>(n);
  sel.params.want_positions = true;
  auto step = m.DecodeStep(Alice(), info->id, sel, buffer_id_, 0, c.layer_reuse);
  ASSERT_THAT(step, IsOk());
  auto seen = CheckRegion(c, step->layout, shm_.data(), mirror);
  for (int h = 0; h < c.kv_heads; ++h) EXPECT_EQ(seen[h].size(), static_cast<size_t>(n));
  auto got = m.GetSession(Alice(), info->id);
  ASSERT_THAT(got, IsOk());
  EXPECT_EQ(got->trees_built, c.kv_heads);  // group 1 still at the gate
  sel.layer = 3;
  EXPECT_THAT(m.SelectPages(Alice(), info->id, sel),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("still being built")));
  release.Notify();
  step = m.DecodeStep(Alice(), info->id, sel, buffer_id_, 0, 1);
  ASSERT_THAT(step, IsOk());
  seen = CheckRegion(c, step->layout, shm_.data(), mirror);
  for (int h = 0; h < c.kv_heads; ++h) EXPECT_EQ(seen[h].size(), static_cast<size_t>(n));
  got = m.GetSession(Alice(), info->id);
  EXPECT_EQ(got->trees_built, got->trees_total);
  // A decode token goes into the built trees.
  auto one = MakeKv(c, n, 1);
  mirror.Add(one, n, 1);
  ASSERT_THAT(m.AppendKv(Alice(), info->id, 1, one), IsOk());
  sel.params.budget_tokens = static_cast<int>(n + 1);
  step = m.DecodeStep(Alice(), info->id, sel, buffer_id_, 0, 1);
  ASSERT_THAT(step, IsOk());
  seen = CheckRegion(c, step->layout, shm_.data(), mirror);
  for (int h = 0; h < c.kv_heads; ++h) EXPECT_EQ(seen[h].size(), static_cast<size_t>(n + 1));
  // Each background job was reported once: its range, its trees, their CPU,
  // and the trees' wall time inside the job's.
  absl::MutexLock l(&done_mu);
  const auto both = [&done]() { return done.size() >= 2; };
  ASSERT_TRUE(done_mu.AwaitWithTimeout(absl::Condition(&both),
                                       ::icecache::testing::Scaled(absl::Seconds(10))));
  ASSERT_EQ(done.size(), 2u);
  for (int j = 0; j < 2; ++j) {
    EXPECT_EQ(done[j].session, info->id);
    EXPECT_EQ(done[j].first_layer, 2 * j);
    EXPECT_EQ(done[j].num_layers, 2);
    EXPECT_EQ(done[j].trees, c.kv_heads);
    EXPECT_GT(done[j].tree_cpu_ns, 0);
    EXPECT_GT(done[j].trees_wall, absl::ZeroDuration());
    EXPECT_LE(done[j].trees_wall, done[j].ran);
  }
}

TEST_F(SessionKvBasicTest, DecodeBatchAnswersEachEntryAndWritesNothingForABadOne) {
  const SessionConfig c = SmallConfig(SelectorKind::kMdci);
  std::vector<std::string> ids;
  std::vector<KvMirror> mirrors;
  for (int i = 0; i < 3; ++i) {
    auto info = env_.manager->CreateSession(Alice(), c);
    ASSERT_THAT(info, IsOk());
    auto kv = MakeKv(c, 0, 80, /*seed=*/i + 1);
    mirrors.emplace_back(c);
    mirrors.back().Add(kv, 0, 80);
    ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 80, kv), IsOk());
    ids.push_back(info->id);
  }
  auto bob = env_.manager->CreateSession(Caller{"bob", 0, false}, c);
  ASSERT_THAT(bob, IsOk());
  const uint64_t region = 1 << 20;
  std::vector<DecodeBatchEntry> batch(5);
  for (int i = 0; i < 5; ++i) {
    batch[i].session_id = ids[i % 3];
    batch[i].select.layer = 2;
    batch[i].select.queries = MakeQueries(c, 20 + i);
    batch[i].select.params.budget_tokens = 16;
    batch[i].select.params.want_positions = true;
    batch[i].buffer_id = buffer_id_;
    batch[i].offset = i * region / 2;
    batch[i].num_layers = 2;
  }
  batch[1].select.queries.pop_back();  // malformed: one float short
  batch[3].session_id = bob->id;       // another tenant's session: not found
  std::memset(shm_.data(), 0xAB, shm_.size());
  auto results = env_.manager->DecodeBatch(Alice(), batch);
  ASSERT_EQ(results.size(), 5u);
  EXPECT_THAT(results[1], StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("queries")));
  EXPECT_THAT(results[3], StatusIs(absl::StatusCode::kNotFound, HasSubstr(bob->id)));
  for (int i : {1, 3}) {  // nothing written in their regions
    const uint8_t* p = shm_.data() + batch[i].offset;
    for (uint64_t b = 0; b < region / 2; ++b) ASSERT_EQ(p[b], 0xAB) << "entry " << i;
  }
  for (int i : {0, 2, 4}) {
    ASSERT_THAT(results[i], IsOk()) << "entry " << i;
    // Same answer as the entry's own selection (per token, as a DecodeStep
    // into shm selects when the session sets no granularity).
    SelectRequest own = batch[i].select;
    own.granularity = Granularity::kToken;
    auto alone = env_.manager->SelectPages(Alice(), batch[i].session_id, own);
    ASSERT_THAT(alone, IsOk());
    for (int h = 0; h < c.kv_heads; ++h) {
      EXPECT_FALSE(results[i]->selection.heads[h].token_refs.empty());
      EXPECT_EQ(results[i]->selection.heads[h].positions, alone->heads[h].positions);
    }
    auto seen = CheckRegion(c, results[i]->layout, shm_.data(), mirrors[i % 3]);
    for (int h = 0; h < c.kv_heads; ++h) EXPECT_TRUE(seen[h].count(0)) << "sink token missing";
  }
}

TEST_F(SessionKvBasicTest, ConcurrentSelectsAndAppends) {
  const SessionConfig c = SmallConfig();
  auto info = env_.manager->CreateSession(Alice(), c);
  ASSERT_THAT(info, IsOk());
  ASSERT_THAT(env_.manager->AppendKv(Alice(), info->id, 32, MakeKv(c, 0, 32)), IsOk());
  std::atomic<bool> stop{false};
  std::atomic<int> selects{0};
  // No ASSERT while the reader lives: a fatal failure would return with the
  // thread joinable (std::terminate). Failures are recorded, then checked.
  absl::Status reader_status;
  std::thread reader([&] {
    SelectRequest sel;
    sel.queries = MakeQueries(c, 9);
    sel.params.budget_tokens = 8;
    while (!stop.load()) {
      auto s = env_.manager->SelectPages(Alice(), info->id, sel);
      if (!s.ok()) {
        reader_status = s.status();
        break;
      }
      selects++;
    }
  });
  // Start appending once the reader runs (bounded wait: a liveness check).
  for (int i = 0; i < 10000 && selects.load() == 0 && reader_status.ok(); ++i) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  for (int i = 0; i < 30; ++i) {
    const absl::Status st =
        env_.manager->AppendKv(Alice(), info->id, 2, MakeKv(c, 32 + 2 * i, 2)).status();
    EXPECT_THAT(st, IsOk()) << "append " << i;
    if (!st.ok()) break;
  }
  stop = true;
  reader.join();
  EXPECT_THAT(reader_status, IsOk());
  EXPECT_EQ(env_.manager->GetSession(Alice(), info->id)->tokens, 92);
  EXPECT_GT(selects.load(), 0);
}

}  // namespace
}  // namespace icecache
