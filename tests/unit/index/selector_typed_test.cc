// The contract every selector passes (selector.h), whatever its layout and
// policy. One value-parameterized suite over SelectorKind.
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/index/owned_page_keys.h"
#include "server/index/page_select.h"
#include "server/index/selector.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/index_test_data.h"

namespace icecache {
namespace {

using ::icecache::testing::HeadData;
using ::icecache::testing::IsOk;
using ::icecache::testing::MakeSyntheticHead;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

// Every selector kind. All of them run every test below.
constexpr SelectorKind kAllKinds[] = {
    SelectorKind::kExact,    SelectorKind::kQuest,        SelectorKind::kStreaming,
    SelectorKind::kMdci,     SelectorKind::kExactMdci,    SelectorKind::kArkvale,
    SelectorKind::kPqcache,  SelectorKind::kSnapkv,       SelectorKind::kOmnikv,
    SelectorKind::kMagicpig, SelectorKind::kMdciPublished};

constexpr int kDim = 64;
constexpr int kPage = 16;
constexpr int kGroup = 2;

// A selector with the frames it lays out, plus every key in position order.
struct Harness {
  SelectorConfig config;
  std::unique_ptr<OwnedPageKeys> frames;
  std::unique_ptr<Selector> sel;
  std::vector<float> keys;            // all keys added so far, by position
  std::vector<Placement> placements;  // of all keys, by position

  absl::Status Add(const float* k, int64_t n, bool bulk) {
    std::vector<Placement> pl;
    absl::Status s = bulk ? sel->Build(k, n, &pl) : sel->Insert(k, n, &pl);
    if (!s.ok()) return s;
    if (static_cast<int64_t>(pl.size()) != n) {
      return absl::InternalError("placements do not have one entry per key");
    }
    s = frames->Apply(pl, k);
    if (!s.ok()) return s;
    keys.insert(keys.end(), k, k + n * config.head_dim);
    placements.insert(placements.end(), pl.begin(), pl.end());
    return absl::OkStatus();
  }
};

SelectorConfig MakeConfig(SelectorKind kind, DType dtype = DType::kF16) {
  SelectorConfig c;
  c.kind = kind;
  c.head_dim = kDim;
  c.dtype = dtype;
  c.page_tokens = kPage;
  c.num_query_heads = kGroup;
  return c;
}

class SelectorContractTest : public ::testing::TestWithParam<SelectorKind> {
 protected:
  // Creates a selector of the test's kind (null after a test failure).
  std::unique_ptr<Harness> MakeHarness(DType dtype = DType::kF16) {
    auto h = std::make_unique<Harness>();
    h->config = MakeConfig(GetParam(), dtype);
    auto frames = OwnedPageKeys::ForSelector(h->config);
    EXPECT_THAT(frames, IsOk());
    if (!frames.ok()) return nullptr;
    h->frames = std::move(*frames);
    auto sel = Selector::Create(h->config, h->frames.get());
    EXPECT_THAT(sel, IsOk());
    if (!sel.ok()) return nullptr;
    h->sel = std::move(*sel);
    EXPECT_EQ(h->sel->kind(), GetParam());
    return h;
  }

  // Bulk-builds `data` keys [0, prefill) and inserts the rest in decode chunks.
  // `prechecked`: Selector::set_keys_prechecked before any key.
  std::unique_ptr<Harness> BuildHarness(const HeadData& data, int64_t prefill,
                                        DType dtype = DType::kF16, bool prechecked = false) {
    auto h = MakeHarness(dtype);
    if (h == nullptr) return nullptr;
    h->sel->set_keys_prechecked(prechecked);
    EXPECT_THAT(h->Add(data.keys.data(), prefill, /*bulk=*/true), IsOk());
    const int64_t chunks[] = {1, 7, 16, 33, 2};
    int64_t at = prefill;
    for (int i = 0; at < data.n; ++i) {
      const int64_t c = std::min<int64_t>(chunks[i % 5], data.n - at);
      EXPECT_THAT(h->Add(data.key(at), c, /*bulk=*/false), IsOk());
      at += c;
    }
    return h;
  }
};

#define ASSERT_CREATED(h) \
  if ((h) == nullptr) FAIL() << "could not create the selector"

TEST_P(SelectorContractTest, EveryTokenIsInExactlyOnePageWithinCapacity) {
  const HeadData data = MakeSyntheticHead(1100, kGroup, 1, 11);
  auto h = BuildHarness(data, 1000);
  ASSERT_CREATED(h);
  const Selector& sel = *h->sel;
  ASSERT_EQ(sel.num_tokens(), data.n);
  std::vector<int> seen(data.n, 0);
  int64_t total = 0;
  for (uint32_t p = 0; p < sel.num_pages(); ++p) {
    const uint32_t fill = sel.fill(p);
    ASSERT_LE(fill, static_cast<uint32_t>(kPage)) << "page " << p;
    const int32_t* pos = sel.positions(p);
    ASSERT_TRUE(fill == 0 || pos != nullptr) << "page " << p;
    for (uint32_t s = 0; s < fill; ++s) {
      ASSERT_GE(pos[s], 0);
      ASSERT_LT(pos[s], data.n);
      ++seen[pos[s]];
    }
    total += fill;
  }
  EXPECT_EQ(total, data.n);
  for (int64_t i = 0; i < data.n; ++i) ASSERT_EQ(seen[i], 1) << "position " << i;
  EXPECT_GT(sel.index_bytes(), 0u);
}

TEST_P(SelectorContractTest, PlacementsAgreeWithPositionsAndKeysRoundTrip) {
  const HeadData data = MakeSyntheticHead(600, kGroup, 1, 12);
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
    SCOPED_TRACE(std::string(DTypeName(dtype)));
    auto h = BuildHarness(data, 500, dtype);
    ASSERT_CREATED(h);
    std::vector<float> stored(kDim), expected(kDim);
    std::vector<uint8_t> raw(kDim * 4);
    for (int64_t i = 0; i < data.n; ++i) {
      const Placement at = h->placements[i];
      ASSERT_LT(at.page, h->sel->num_pages());
      ASSERT_LT(at.slot, h->sel->fill(at.page)) << "position " << i;
      ASSERT_EQ(h->sel->positions(at.page)[at.slot], i);
      ASSERT_THAT(h->frames->ReadKey(at, stored.data()), IsOk());
      FromFloat(dtype, data.key(i), raw.data(), kDim);
      ToFloat(dtype, raw.data(), expected.data(), kDim);
      ASSERT_EQ(stored, expected) << "key of position " << i;
    }
  }
}

void ExpectWellFormed(const Selector& sel, const SelectParams& params, const Selection& out) {
  const int64_t n = sel.num_tokens();
  ASSERT_EQ(out.pages.size(), out.fills.size());
  ASSERT_EQ(out.pages.size(), out.scores.size());
  std::set<uint32_t> unique(out.pages.begin(), out.pages.end());
  ASSERT_EQ(unique.size(), out.pages.size()) << "a page was selected twice";
  for (size_t i = 0; i < out.pages.size(); ++i) {
    ASSERT_LT(out.pages[i], sel.num_pages());
    ASSERT_EQ(out.fills[i], sel.fill(out.pages[i]));
  }
  // Forced pages: those holding the sinks and the most recent positions.
  std::set<uint32_t> forced;
  std::vector<uint32_t> page_of(n);
  for (uint32_t p = 0; p < sel.num_pages(); ++p) {
    for (uint32_t s = 0; s < sel.fill(p); ++s) page_of[sel.positions(p)[s]] = p;
  }
  for (int64_t i = 0; i < std::min<int64_t>(params.sink_tokens, n); ++i) forced.insert(page_of[i]);
  for (int64_t i = std::max<int64_t>(0, n - params.recent_tokens); i < n; ++i) {
    forced.insert(page_of[i]);
  }
  int64_t forced_tokens = 0;
  for (uint32_t p : forced) {
    EXPECT_TRUE(unique.count(p)) << "forced page " << p << " missing";
    forced_tokens += sel.fill(p);
  }
  // Forced pages come first with +inf, then scores do not increase.
  for (size_t i = 0; i < out.pages.size(); ++i) {
    if (i < forced.size()) {
      EXPECT_TRUE(forced.count(out.pages[i]));
      EXPECT_EQ(out.scores[i], std::numeric_limits<float>::infinity());
    } else if (i > forced.size()) {
      EXPECT_LE(out.scores[i], out.scores[i - 1]) << "entry " << i;
    }
  }
  const int64_t tokens = out.tokens();
  EXPECT_GE(tokens, std::min<int64_t>(params.budget_tokens, n)) << "budget not filled";
  EXPECT_LT(tokens, params.budget_tokens + kPage + forced_tokens) << "budget overshot";
  if (params.want_positions) {
    std::vector<int32_t> expected;
    for (size_t i = 0; i < out.pages.size(); ++i) {
      const int32_t* pos = sel.positions(out.pages[i]);
      expected.insert(expected.end(), pos, pos + out.fills[i]);
    }
    EXPECT_EQ(out.positions, expected);
  } else {
    EXPECT_TRUE(out.positions.empty());
  }
}

TEST_P(SelectorContractTest, SelectionRespectsBudgetAndAlwaysHasForcedPages) {
  const HeadData data = MakeSyntheticHead(1200, kGroup, 3, 13);
  auto h = BuildHarness(data, 1100);
  ASSERT_CREATED(h);
  for (int budget : {1, 16, 17, 100, 256, 1200}) {
    for (int sink : {0, 4, 40}) {
      for (int recent : {0, 20}) {
        for (int step = 0; step < data.steps; ++step) {
          SCOPED_TRACE(::testing::Message() << "budget " << budget << " sink " << sink << " recent "
                                            << recent << " step " << step);
          SelectParams p;
          p.budget_tokens = budget;
          p.sink_tokens = sink;
          p.recent_tokens = recent;
          p.want_positions = (step % 2) == 0;
          Selection out;
          ASSERT_THAT(h->sel->Select(data.query(step), kGroup, p, &out), IsOk());
          ASSERT_NO_FATAL_FAILURE(ExpectWellFormed(*h->sel, p, out));
        }
      }
    }
  }
}

TEST_P(SelectorContractTest, DeterministicForTheSameDataAndSeed) {
  const HeadData data = MakeSyntheticHead(900, kGroup, 4, 14);
  auto a = BuildHarness(data, 800);
  ASSERT_CREATED(a);
  auto b = BuildHarness(data, 800);
  ASSERT_CREATED(b);
  ASSERT_EQ(a->sel->num_pages(), b->sel->num_pages());
  for (int64_t i = 0; i < data.n; ++i) {
    ASSERT_EQ(a->placements[i].page, b->placements[i].page);
    ASSERT_EQ(a->placements[i].slot, b->placements[i].slot);
  }
  SelectParams p;
  p.budget_tokens = 128;
  p.want_positions = true;
  for (int step = 0; step < data.steps; ++step) {
    Selection x, y;
    ASSERT_THAT(a->sel->Select(data.query(step), kGroup, p, &x), IsOk());
    ASSERT_THAT(b->sel->Select(data.query(step), kGroup, p, &y), IsOk());
    EXPECT_EQ(x.pages, y.pages);
    EXPECT_EQ(x.scores, y.scores);
    EXPECT_EQ(x.positions, y.positions);
    EXPECT_EQ(x.keys_touched, y.keys_touched);
  }
}

// keys_prechecked (a caller that refused non-finite keys itself, as the
// session's append does) skips only the NaN/Inf scan: the same layout and
// selections, and every other check.
TEST_P(SelectorContractTest, PrecheckedKeysLayOutTheSameAndKeepEveryOtherCheck) {
  auto fresh = MakeHarness();
  ASSERT_CREATED(fresh);
  EXPECT_FALSE(fresh->sel->keys_prechecked());
  fresh->sel->set_keys_prechecked(true);
  const HeadData data = MakeSyntheticHead(600, kGroup, 2, 15);
  std::vector<Placement> pl;
  EXPECT_THAT(fresh->sel->Build(data.keys.data(), 0, &pl),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(fresh->sel->Build(data.keys.data(), 10, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(fresh->sel->Build(nullptr, 10, &pl), StatusIs(absl::StatusCode::kInvalidArgument));
  auto plain = BuildHarness(data, 500);
  ASSERT_CREATED(plain);
  auto checked = BuildHarness(data, 500, DType::kF16, /*prechecked=*/true);
  ASSERT_CREATED(checked);
  EXPECT_THAT(checked->sel->Build(data.keys.data(), 10, &pl),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  ASSERT_EQ(checked->sel->num_tokens(), data.n);
  for (int64_t i = 0; i < data.n; ++i) {
    ASSERT_EQ(checked->placements[i].page, plain->placements[i].page);
    ASSERT_EQ(checked->placements[i].slot, plain->placements[i].slot);
  }
  SelectParams p;
  p.budget_tokens = 128;
  p.want_positions = true;
  for (int step = 0; step < data.steps; ++step) {
    Selection x, y;
    ASSERT_THAT(checked->sel->Select(data.query(step), kGroup, p, &x), IsOk());
    ASSERT_THAT(plain->sel->Select(data.query(step), kGroup, p, &y), IsOk());
    EXPECT_EQ(x.pages, y.pages);
    EXPECT_EQ(x.positions, y.positions);
  }
}

TEST_P(SelectorContractTest, InsertedNeedleIsSelectedByScoringSelectors) {
  const SelectorKind kind = GetParam();
  if (kind == SelectorKind::kStreaming) {
    GTEST_SKIP() << "streaming ignores queries by design";
  }
  if (kind == SelectorKind::kSnapkv) {
    GTEST_SKIP() << "snapkv fixes its kept set at the first select by design (the paper's "
                    "prefill-time compression); decode keys rank by recency";
  }
  const HeadData data = MakeSyntheticHead(1000, kGroup, 1, 15);
  auto h = BuildHarness(data, 1000);
  ASSERT_CREATED(h);
  // Decode chunks with a needle in the middle of each: a key in a random
  // direction with 3x the largest key norm of the data.
  double max_norm = 0.0;
  for (int64_t i = 0; i < data.n; ++i) {
    double n2 = 0.0;
    for (int d = 0; d < kDim; ++d) n2 += data.key(i)[d] * data.key(i)[d];
    max_norm = std::max(max_norm, std::sqrt(n2));
  }
  std::mt19937 rng(99);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (int chunk = 0; chunk < 4; ++chunk) {
    std::vector<float> keys(9 * kDim);
    for (auto& x : keys) x = g(rng) * static_cast<float>(max_norm / std::sqrt(kDim));
    float* needle = keys.data() + 4 * kDim;
    for (int d = 0; d < kDim; ++d) needle[d] *= 3.0f;
    const int64_t needle_pos = h->sel->num_tokens() + 4;
    ASSERT_THAT(h->Add(keys.data(), 9, /*bulk=*/false), IsOk());
    // Pad with prefix data so the needle is not among the last tokens.
    ASSERT_THAT(h->Add(data.key(100 + 50 * chunk), 50, false), IsOk());
    std::vector<float> q(kGroup * kDim);
    for (int j = 0; j < kGroup; ++j) {
      for (int d = 0; d < kDim; ++d) q[j * kDim + d] = (j == 0 ? 2.0f : 0.5f) * needle[d];
    }
    SelectParams p;
    p.budget_tokens = 2 * kPage;
    p.sink_tokens = 0;
    p.want_positions = true;
    Selection out;
    ASSERT_THAT(h->sel->Select(q.data(), kGroup, p, &out), IsOk());
    EXPECT_THAT(out.positions, ::testing::Contains(static_cast<int32_t>(needle_pos)))
        << "needle at position " << needle_pos << " (chunk " << chunk << ") not selected";
  }
}

TEST_P(SelectorContractTest, BadConfigsAreInvalidArgumentNamingTheField) {
  auto frames = OwnedPageKeys::Create(kDim, DType::kF16, kPage);
  ASSERT_THAT(frames, IsOk());
  struct Case {
    const char* field;
    void (*mutate)(SelectorConfig*);
  };
  const Case cases[] = {
      {"page_tokens", [](SelectorConfig* c) { c->page_tokens = 0; }},
      {"page_tokens", [](SelectorConfig* c) { c->page_tokens = 257; }},
      {"head_dim", [](SelectorConfig* c) { c->head_dim = 0; }},
      {"head_dim", [](SelectorConfig* c) { c->head_dim = 1025; }},
      {"num_query_heads", [](SelectorConfig* c) { c->num_query_heads = 0; }},
      {"dtype", [](SelectorConfig* c) { c->dtype = static_cast<DType>(9); }},
      {"quest_rescore_factor", [](SelectorConfig* c) { c->quest_rescore_factor = -1.0f; }},
  };
  for (const Case& c : cases) {
    SelectorConfig config = MakeConfig(GetParam());
    c.mutate(&config);
    EXPECT_THAT(Selector::Create(config, frames->get()),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.field)));
  }
  EXPECT_THAT(Selector::Create(MakeConfig(GetParam()), nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("PageKeys")));
  // The DCI parameters are checked for the kinds that use them.
  const bool mdci = GetParam() == SelectorKind::kMdci || GetParam() == SelectorKind::kExactMdci;
  const Case mdci_cases[] = {
      {"mdci.num_composite", [](SelectorConfig* c) { c->mdci.num_composite = 0; }},
      {"mdci.num_simple", [](SelectorConfig* c) { c->mdci.num_simple = -1; }},
      {"mdci.field_of_view", [](SelectorConfig* c) { c->mdci.field_of_view = 0; }},
      {"mdci.candidate_factor", [](SelectorConfig* c) { c->mdci.candidate_factor = NAN; }},
      {"mdci.norm_headroom", [](SelectorConfig* c) { c->mdci.norm_headroom = 0.5f; }},
      {"mdci.rebuild_fraction", [](SelectorConfig* c) { c->mdci.rebuild_fraction = 2.0f; }},
  };
  for (const Case& c : mdci_cases) {
    SelectorConfig config = MakeConfig(GetParam());
    c.mutate(&config);
    auto sel = Selector::Create(config, frames->get());
    if (mdci) {
      EXPECT_THAT(sel, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.field)));
    } else {
      EXPECT_THAT(sel, IsOk()) << "positional kinds ignore " << c.field;
    }
  }
}

TEST_P(SelectorContractTest, BadInputsGetPreciseCodesAndChangeNothing) {
  const HeadData data = MakeSyntheticHead(700, kGroup, 2, 16);
  auto h = MakeHarness();
  ASSERT_CREATED(h);
  Selector& sel = *h->sel;
  SelectParams good;
  good.budget_tokens = 64;
  good.want_positions = true;
  Selection out;
  std::vector<Placement> pl;

  // Empty index.
  EXPECT_THAT(sel.Select(data.query(0), kGroup, good, &out),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  // NaN / Inf keys: the message names the row; nothing is laid out.
  std::vector<float> bad(data.keys.begin(), data.keys.begin() + 600 * kDim);
  bad[3 * kDim + 5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT(sel.Build(bad.data(), 600, &pl),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("row 3")));
  bad[3 * kDim + 5] = 0.0f;
  bad[599 * kDim] = -std::numeric_limits<float>::infinity();
  EXPECT_THAT(sel.Build(bad.data(), 600, &pl),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("row 599")));
  EXPECT_EQ(sel.num_tokens(), 0);
  EXPECT_EQ(sel.num_pages(), 0u);
  EXPECT_THAT(sel.Build(data.keys.data(), 0, &pl), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(sel.Build(data.keys.data(), 10, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));

  ASSERT_THAT(h->Add(data.keys.data(), 600, /*bulk=*/true), IsOk());
  Selection baseline;
  ASSERT_THAT(sel.Select(data.query(1), kGroup, good, &baseline), IsOk());
  const int64_t tokens = sel.num_tokens();
  const uint32_t pages = sel.num_pages();
  auto expect_unchanged = [&](const char* after) {
    SCOPED_TRACE(after);
    EXPECT_EQ(sel.num_tokens(), tokens);
    EXPECT_EQ(sel.num_pages(), pages);
    Selection again;
    ASSERT_THAT(sel.Select(data.query(1), kGroup, good, &again), IsOk());
    EXPECT_EQ(again.pages, baseline.pages);
    EXPECT_EQ(again.scores, baseline.scores);
    EXPECT_EQ(again.positions, baseline.positions);
  };

  EXPECT_THAT(sel.Build(data.key(600), 10, &pl), StatusIs(absl::StatusCode::kFailedPrecondition));
  expect_unchanged("Build twice");
  std::vector<float> chunk(data.key(600), data.key(610));
  chunk[5 * kDim + 1] = std::numeric_limits<float>::infinity();
  EXPECT_THAT(sel.Insert(chunk.data(), 10, &pl),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("row 5")));
  expect_unchanged("Insert with Inf");
  EXPECT_THAT(sel.Insert(chunk.data(), -1, &pl), StatusIs(absl::StatusCode::kInvalidArgument));
  expect_unchanged("Insert n < 0");
  EXPECT_THAT(sel.Insert(nullptr, 3, &pl), StatusIs(absl::StatusCode::kInvalidArgument));
  expect_unchanged("Insert null keys");

  std::vector<float> q(data.query(0), data.query(0) + kGroup * kDim);
  q[kDim + 2] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT(sel.Select(q.data(), kGroup, good, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("query row 1")));
  expect_unchanged("NaN query");
  SelectParams p = good;
  p.budget_tokens = 0;
  EXPECT_THAT(sel.Select(data.query(0), kGroup, p, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("budget")));
  expect_unchanged("budget 0");
  p.budget_tokens = static_cast<int>(tokens) + 1;
  EXPECT_THAT(sel.Select(data.query(0), kGroup, p, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("budget")));
  expect_unchanged("budget > n");
  p = good;
  p.sink_tokens = -1;
  EXPECT_THAT(sel.Select(data.query(0), kGroup, p, &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(sel.Select(data.query(0), 0, good, &out),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("num_queries")));
  EXPECT_THAT(sel.Select(nullptr, kGroup, good, &out),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(sel.Select(data.query(0), kGroup, good, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  expect_unchanged("bad select params");

  // And the index still grows normally afterwards.
  ASSERT_THAT(h->Add(data.key(600), 100, /*bulk=*/false), IsOk());
  EXPECT_EQ(sel.num_tokens(), 700);
  p = good;
  p.budget_tokens = 700;
  ASSERT_THAT(sel.Select(data.query(0), kGroup, p, &out), IsOk());
  EXPECT_EQ(out.tokens(), 700);
}

TEST_P(SelectorContractTest, ConcurrentSelectsMatchSerialResults) {
  const HeadData data = MakeSyntheticHead(1000, kGroup, 8, 17);
  auto h = BuildHarness(data, 1000);
  ASSERT_CREATED(h);
  SelectParams p;
  p.budget_tokens = 96;
  p.want_positions = true;
  std::vector<Selection> serial(data.steps);
  for (int s = 0; s < data.steps; ++s) {
    ASSERT_THAT(h->sel->Select(data.query(s), kGroup, p, &serial[s]), IsOk());
  }
  std::vector<std::vector<Selection>> parallel(4, std::vector<Selection>(data.steps));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int r = 0; r < 3; ++r) {
        for (int s = 0; s < data.steps; ++s) {
          (void)h->sel->Select(data.query(s), kGroup, p, &parallel[t][s]);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) {
    for (int s = 0; s < data.steps; ++s) {
      EXPECT_EQ(parallel[t][s].pages, serial[s].pages) << "thread " << t << " step " << s;
      EXPECT_EQ(parallel[t][s].positions, serial[s].positions);
    }
  }
}

TEST(SelectorKindTest, NamesRoundTripAndUnknownNamesAreRejected) {
  for (SelectorKind kind : kAllKinds) {
    auto parsed = ParseSelectorKind(SelectorKindName(kind));
    ASSERT_THAT(parsed, IsOk());
    EXPECT_EQ(*parsed, kind);
  }
  EXPECT_EQ(SelectorKindName(SelectorKind::kExactMdci), "exact-mdci");
  EXPECT_EQ(*ParseSelectorKind("Exact_MDCI"), SelectorKind::kExactMdci);
  EXPECT_THAT(ParseSelectorKind("hnsw"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("streaming")));
  EXPECT_THAT(ParseSelectorKind(""), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(SelectionTest, TokensSumsFillsAndClearResetsEverything) {
  Selection s;
  s.pages = {3, 1};
  s.fills = {16, 5};
  s.scores = {1.0f, 0.5f};
  s.positions = {1};
  s.keys_touched = 9;
  EXPECT_EQ(s.tokens(), 21);
  s.Clear();
  EXPECT_TRUE(s.pages.empty() && s.fills.empty() && s.scores.empty() && s.positions.empty());
  EXPECT_EQ(s.keys_touched, 0u);
  EXPECT_EQ(s.tokens(), 0);
}

INSTANTIATE_TEST_SUITE_P(AllSelectors, SelectorContractTest, ::testing::ValuesIn(kAllKinds),
                         [](const ::testing::TestParamInfo<SelectorKind>& info) {
                           std::string name(SelectorKindName(info.param));
                           for (char& c : name) {
                             if (c == '-') c = '_';
                           }
                           return name;
                         });

}  // namespace
}  // namespace icecache
