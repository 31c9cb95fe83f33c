// Index images (docs/architecture.md §5, warm restart): an mdci or
// exact-mdci selector saved and loaded back selects exactly like the
// original, and later inserts place every token where the original places
// it; a truncated, bit-flipped or foreign image is refused (or, for a flip
// that leaves a consistent tree, gives a tree that keeps every invariant),
// never a crash.
#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gtest/gtest.h"
#include "server/index/byte_image.h"
#include "server/index/mdci_selector.h"
#include "server/index/selector.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/dci_tree_invariants.h"
#include "tests/unit/index/mdci_test_util.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

constexpr int kDim = 32;
constexpr int kPage = 16;

SelectorConfig Config(SelectorKind kind) {
  SelectorConfig c;
  c.kind = kind;
  c.head_dim = kDim;
  c.page_tokens = kPage;
  c.num_query_heads = 2;
  c.dtype = DType::kF16;
  c.mdci.locality_window = 512;  // several windows in a small test
  return c;
}

// Keys as the fp16 frames hold them: a daemon hands its selectors the keys
// converted from the session's dtype, so a loader that reads them back
// through PageKeys (mdci-published) sees the same values.
std::vector<float> AsStored(std::vector<float> keys) {
  for (float& v : keys) v = HalfToFloat(FloatToHalf(v));
  return keys;
}

// A selector with a prefill of 2000 keys and two decode chunks, its keys in
// `keys`.
struct Built {
  std::unique_ptr<mdci_test::TestPageKeys> keys;
  std::unique_ptr<Selector> sel;
  std::vector<float> data = AsStored(mdci_test::ClusteredKeys(3200, kDim, 24, 0.4f, 5));
};

absl::Status Add(Selector& sel, mdci_test::TestPageKeys& keys, const std::vector<float>& data,
                 int64_t from, int64_t n, bool bulk, std::vector<Placement>* placed) {
  const float* k = data.data() + from * kDim;
  absl::Status st = bulk ? sel.Build(k, n, placed) : sel.Insert(k, n, placed);
  if (st.ok()) keys.Apply(k, *placed);
  return st;
}

Built Make(SelectorKind kind) {
  Built b;
  b.keys = std::make_unique<mdci_test::TestPageKeys>(kDim, kPage, DType::kF16);
  b.sel = Selector::Create(Config(kind), b.keys.get()).value();
  std::vector<Placement> placed;
  EXPECT_THAT(Add(*b.sel, *b.keys, b.data, 0, 2000, true, &placed), IsOk());
  EXPECT_THAT(Add(*b.sel, *b.keys, b.data, 2000, 300, false, &placed), IsOk());
  EXPECT_THAT(Add(*b.sel, *b.keys, b.data, 2300, 1, false, &placed), IsOk());
  return b;
}

std::string Image(const Selector& sel) {
  std::string out;
  EXPECT_THAT(sel.SaveImage(&out), IsOk());
  return out;
}

// The layout and several selections (page and token granularity) as text.
std::string Behaviour(const Selector& sel, uint64_t seed) {
  std::string out;
  for (uint32_t p = 0; p < sel.num_pages(); ++p) {
    for (uint32_t s = 0; s < sel.fill(p); ++s) out += std::to_string(sel.positions(p)[s]) + ",";
    out += ";";
  }
  const std::vector<float> q = mdci_test::GaussianRows(8 * 2, kDim, 1.0f, seed);
  for (int i = 0; i < 8; ++i) {
    SelectParams params;
    params.budget_tokens = 64;
    params.recent_tokens = 8;
    params.granularity = i % 2 == 0 ? Granularity::kPage : Granularity::kToken;
    Selection got;
    EXPECT_THAT(sel.Select(q.data() + i * 2 * kDim, 2, params, &got), IsOk());
    for (uint32_t p : got.pages) out += "p" + std::to_string(p);
    for (const Placement& t : got.token_refs) {
      out += "t" + std::to_string(t.page) + "." + std::to_string(t.slot);
    }
    for (float s : got.scores) out += "s" + std::to_string(s);
    out += "|";
  }
  return out;
}

const DciTree& TreeOf(const Selector& sel) { return static_cast<const MdciSelector&>(sel).tree(); }

class IndexImageTest : public ::testing::TestWithParam<SelectorKind> {};

TEST_P(IndexImageTest, LoadedSelectorSelectsAndInsertsLikeTheOriginal) {
  Built b = Make(GetParam());
  const std::string image = Image(*b.sel);
  auto loaded = Selector::LoadImage(Config(GetParam()), b.keys.get(), image, b.sel->num_tokens());
  ASSERT_THAT(loaded, IsOk());
  ASSERT_NO_FATAL_FAILURE(mdci_test::CheckInvariants(TreeOf(**loaded)));
  EXPECT_EQ((*loaded)->num_tokens(), b.sel->num_tokens());
  EXPECT_EQ(Behaviour(**loaded, 11), Behaviour(*b.sel, 11));
  EXPECT_EQ(Image(**loaded), image) << "a loaded tree saves the same bytes";
  // Later decode inserts: the same placements, one key and a chunk at a
  // time, into both (the original's frames hold the keys both read).
  std::vector<Placement> want, got;
  mdci_test::TestPageKeys scratch(kDim, kPage, DType::kF16);
  for (int64_t at = 2301; at < 3200; at += at < 2400 ? 1 : 200) {
    const int64_t n = std::min<int64_t>(at < 2400 ? 1 : 200, 3200 - at);
    ASSERT_THAT(Add(*b.sel, *b.keys, b.data, at, n, false, &want), IsOk());
    ASSERT_THAT(Add(**loaded, scratch, b.data, at, n, false, &got), IsOk());
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(got[i].page == want[i].page && got[i].slot == want[i].slot)
          << "token " << at + static_cast<int64_t>(i);
    }
  }
  ASSERT_NO_FATAL_FAILURE(mdci_test::CheckInvariants(TreeOf(**loaded)));
  EXPECT_EQ(Behaviour(**loaded, 12), Behaviour(*b.sel, 12));
  EXPECT_EQ(Image(**loaded), Image(*b.sel));
}

TEST_P(IndexImageTest, TruncatedImagesAreRefusedWithoutACrash) {
  Built b = Make(GetParam());
  const std::string image = Image(*b.sel);
  std::vector<size_t> cuts = {0, 1, 7, 8, 15, 16, 20, image.size() - 1};
  for (size_t i = 1; i < 300; ++i) cuts.push_back(image.size() * i / 300);
  for (size_t cut : cuts) {
    auto loaded = Selector::LoadImage(Config(GetParam()), b.keys.get(), image.substr(0, cut),
                                      b.sel->num_tokens());
    EXPECT_THAT(loaded, StatusIs(absl::StatusCode::kDataLoss)) << "cut at " << cut;
  }
  EXPECT_THAT(
      Selector::LoadImage(Config(GetParam()), b.keys.get(), image + "x", b.sel->num_tokens()),
      StatusIs(absl::StatusCode::kDataLoss));
}

TEST_P(IndexImageTest, BitFlipsAreRefusedOrLeaveAConsistentTree) {
  Built b = Make(GetParam());
  const std::string image = Image(*b.sel);
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<size_t> at(0, image.size() - 1);
  int refused = 0;
  for (int trial = 0; trial < 400; ++trial) {
    std::string bad = image;
    // Flips in the header and counts (the first bytes) as well as anywhere.
    const size_t byte = trial < 100 ? static_cast<size_t>(trial) : at(rng);
    bad[byte] = static_cast<char>(bad[byte] ^ (1 << (trial % 8)));
    auto loaded = Selector::LoadImage(Config(GetParam()), b.keys.get(), bad, b.sel->num_tokens());
    if (!loaded.ok()) {
      ++refused;
      continue;
    }
    // A flip in a representative's value is a consistent (other) tree: the
    // daemon's per-image hash catches those; here it must stay usable.
    ASSERT_NO_FATAL_FAILURE(mdci_test::CheckInvariants(TreeOf(**loaded))) << "byte " << byte;
    Behaviour(**loaded, 13);
  }
  EXPECT_GT(refused, 100);
}

TEST_P(IndexImageTest, ImagesOfOtherKindsAlgorithmsOrParametersAreRefused) {
  Built b = Make(GetParam());
  const std::string image = Image(*b.sel);
  const SelectorKind other =
      GetParam() == SelectorKind::kMdci ? SelectorKind::kExactMdci : SelectorKind::kMdci;
  EXPECT_THAT(Selector::LoadImage(Config(other), b.keys.get(), image, b.sel->num_tokens()),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  SelectorConfig seed = Config(GetParam());
  seed.mdci.seed = 99;
  EXPECT_THAT(Selector::LoadImage(seed, b.keys.get(), image, b.sel->num_tokens()),
              StatusIs(absl::StatusCode::kFailedPrecondition, ::testing::HasSubstr("seed")));
  SelectorConfig window = Config(GetParam());
  window.mdci.locality_window = 4096;
  EXPECT_THAT(
      Selector::LoadImage(window, b.keys.get(), image, b.sel->num_tokens()),
      StatusIs(absl::StatusCode::kFailedPrecondition, ::testing::HasSubstr("locality_window")));
  std::string algorithm = image;
  algorithm[16] = static_cast<char>(algorithm[16] + 1);  // after magic, format, kind
  EXPECT_THAT(Selector::LoadImage(Config(GetParam()), b.keys.get(), algorithm, b.sel->num_tokens()),
              StatusIs(absl::StatusCode::kFailedPrecondition, ::testing::HasSubstr("algorithm")));
  std::string format = image;
  format[8] = static_cast<char>(format[8] + 1);
  EXPECT_THAT(Selector::LoadImage(Config(GetParam()), b.keys.get(), format, b.sel->num_tokens()),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

INSTANTIATE_TEST_SUITE_P(TreeKinds, IndexImageTest,
                         ::testing::Values(SelectorKind::kMdci, SelectorKind::kExactMdci),
                         [](const ::testing::TestParamInfo<SelectorKind>& info) {
                           return info.param == SelectorKind::kMdci ? "Mdci" : "ExactMdci";
                         });

// The baselines with a costly first append (k-means, SimHash tables) keep
// an image of their state on the positional layout.
class BaselineImageTest : public ::testing::TestWithParam<SelectorKind> {};

TEST_P(BaselineImageTest, LoadedSelectorSelectsAndInsertsLikeTheOriginal) {
  Built b = Make(GetParam());
  const std::string image = Image(*b.sel);
  auto loaded = Selector::LoadImage(Config(GetParam()), b.keys.get(), image, b.sel->num_tokens());
  ASSERT_THAT(loaded, IsOk());
  EXPECT_EQ(Image(**loaded), image);
  EXPECT_EQ(Behaviour(**loaded, 21), Behaviour(*b.sel, 21));
  std::vector<Placement> want, got;
  mdci_test::TestPageKeys scratch(kDim, kPage, DType::kF16);
  for (int64_t at = 2301; at < 3200; at += 300) {
    const int64_t n = std::min<int64_t>(300, 3200 - at);
    ASSERT_THAT(Add(*b.sel, *b.keys, b.data, at, n, false, &want), IsOk());
    ASSERT_THAT(Add(**loaded, scratch, b.data, at, n, false, &got), IsOk());
  }
  EXPECT_EQ(Behaviour(**loaded, 22), Behaviour(*b.sel, 22));
  EXPECT_EQ(Image(**loaded), Image(*b.sel)) << "the decode keys got the same codes";
}

TEST_P(BaselineImageTest, DamagedOrForeignImagesAreRefusedWithoutACrash) {
  Built b = Make(GetParam());
  const std::string image = Image(*b.sel);
  for (size_t i = 0; i < 200; ++i) {
    const size_t cut = image.size() * i / 200;
    EXPECT_THAT(Selector::LoadImage(Config(GetParam()), b.keys.get(), image.substr(0, cut),
                                    b.sel->num_tokens()),
                StatusIs(absl::StatusCode::kDataLoss))
        << "cut at " << cut;
  }
  std::mt19937_64 rng(4);
  std::uniform_int_distribution<size_t> at(0, image.size() - 1);
  for (int trial = 0; trial < 120; ++trial) {
    std::string bad = image;
    const size_t byte = trial < 60 ? static_cast<size_t>(trial) % image.size() : at(rng);
    bad[byte] = static_cast<char>(bad[byte] ^ (1 << (trial % 8)));
    auto loaded = Selector::LoadImage(Config(GetParam()), b.keys.get(), bad, b.sel->num_tokens());
    if (loaded.ok()) Behaviour(**loaded, 23);  // a consistent other state: usable
  }
  SelectorConfig other = Config(GetParam());
  other.baseline.seed = 99;  // pqcache, magicpig
  other.baseline.snapkv_window += 1;
  EXPECT_THAT(Selector::LoadImage(other, b.keys.get(), image, b.sel->num_tokens()),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(Selector::LoadImage(Config(GetParam()), b.keys.get(), image, b.sel->num_tokens() + 1),
              StatusIs(absl::StatusCode::kDataLoss))
      << "an image of another token count";
}

INSTANTIATE_TEST_SUITE_P(Baselines, BaselineImageTest,
                         ::testing::Values(SelectorKind::kPqcache, SelectorKind::kMagicpig,
                                           SelectorKind::kSnapkv, SelectorKind::kMdciPublished),
                         [](const ::testing::TestParamInfo<SelectorKind>& info) {
                           std::string name(SelectorKindName(info.param));
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// SnapKV's votes are fixed by its first Select: the image keeps them, so the
// loaded selector answers later queries as the original does, where a
// replay of the appends would fix new votes from those queries.
TEST(SnapkvImageTest, VotesFixedBeforeTheImageAreKept) {
  Built b = Make(SelectorKind::kSnapkv);
  Behaviour(*b.sel, 31);  // the first Select fixes the votes
  const std::string image = Image(*b.sel);
  auto loaded =
      Selector::LoadImage(Config(SelectorKind::kSnapkv), b.keys.get(), image, b.sel->num_tokens());
  ASSERT_THAT(loaded, IsOk());
  Built replayed = Make(SelectorKind::kSnapkv);
  EXPECT_EQ(Behaviour(**loaded, 32), Behaviour(*b.sel, 32));
  EXPECT_NE(Behaviour(*replayed.sel, 32), Behaviour(*b.sel, 32)) << "replay fixes other votes";
}

TEST(IndexImageKindsTest, PositionalKindsKeepNoImage) {
  mdci_test::TestPageKeys keys(kDim, kPage, DType::kF16);
  auto sel = Selector::Create(Config(SelectorKind::kExact), &keys);
  ASSERT_THAT(sel, IsOk());
  std::string out;
  EXPECT_FALSE((*sel)->has_image());
  EXPECT_THAT((*sel)->SaveImage(&out), StatusIs(absl::StatusCode::kUnimplemented));
  Built b = Make(SelectorKind::kMdci);
  const std::string image = Image(*b.sel);
  EXPECT_THAT(Selector::LoadImage(Config(SelectorKind::kExact), &keys, image, b.sel->num_tokens()),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  auto empty = Selector::Create(Config(SelectorKind::kMdci), &keys);
  ASSERT_THAT(empty, IsOk());
  EXPECT_THAT((*empty)->SaveImage(&out), StatusIs(absl::StatusCode::kFailedPrecondition));
}

}  // namespace
}  // namespace icecache
