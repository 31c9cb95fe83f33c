#include "server/index/dci_tree.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/index/byte_image.h"
#include "server/index/kernels.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/dci_tree_invariants.h"
#include "tests/unit/index/mdci_test_util.h"

namespace icecache {
namespace {

using ::icecache::mdci_test::CheckInvariants;
using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

DciTreeParams ParamsOf(int dim, int page_tokens) {
  DciTreeParams p;
  p.dim = dim;
  p.page_tokens = page_tokens;
  return p;
}

std::unique_ptr<DciTree> MakeTree(int dim, int page_tokens) {
  auto t = DciTree::Create(ParamsOf(dim, page_tokens));
  EXPECT_THAT(t, IsOk());
  return std::move(t).value();
}

TEST(DciTreeTest, BulkBuildInvariantsAndFullPages) {
  const int d = 32, P = 16;
  const int64_t n = 20000;
  auto keys = mdci_test::ClusteredKeys(n, d, 64, 0.4f, 1);
  auto t = MakeTree(d, P);
  std::vector<Placement> pl;
  ASSERT_THAT(t->BulkBuild(keys.data(), n, &pl), IsOk());
  ASSERT_EQ(pl.size(), static_cast<size_t>(n));
  ASSERT_NO_FATAL_FAILURE(CheckInvariants(*t));
  EXPECT_GE(t->top_level(), 3);
  EXPECT_GE(t->page_table().MeanFill(), 0.95);  // capacity-aware: balanced, full pages
  // Depth-first numbering: every upper node's children are one id run, so
  // the descent expands every node of a bulk build from the flat array.
  for (int l = 2; l <= t->top_level(); ++l) {
    for (uint32_t i = 0; i < t->level_size(l); ++i) {
      EXPECT_GT(t->node_child_run(l, i).count, 0u) << "level " << l << " node " << i;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(t->page_table().positions(pl[i].page)[pl[i].slot], i);
  }
  // A second bulk build is refused and changes nothing.
  EXPECT_THAT(t->BulkBuild(keys.data(), n, &pl), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(t->num_tokens(), n);
}

// A prefill reserves MaxBulkBuildPages frames per tree before building it:
// no build may open more, whatever the keys (clustered, duplicated) and the
// page / ratio shapes; at r = P, for a long prefill, it is about the pages
// the keys fill.
TEST(DciTreeTest, BulkBuildStaysWithinMaxBulkBuildPages) {
  const int d = 16;
  struct Shape {
    int page_tokens, ratio;
  };
  for (const Shape shape : {Shape{16, 0}, Shape{16, 4}, Shape{4, 4}, Shape{8, 32}, Shape{1, 2}}) {
    for (int64_t n : {1, 2, 15, 16, 17, 333, 5000}) {
      for (int kind = 0; kind < 3; ++kind) {
        std::vector<float> keys = kind == 0   ? mdci_test::ClusteredKeys(n, d, 8, 0.3f, n)
                                  : kind == 1 ? mdci_test::GaussianRows(n, d, 1.0f, n)
                                              : std::vector<float>(n * d, 0.5f);  // all equal
        DciTreeParams p;
        p.dim = d;
        p.page_tokens = shape.page_tokens;
        p.ratio = shape.ratio;
        p.locality_window = kind == 1 ? 0 : 256;
        auto t = DciTree::Create(p);
        ASSERT_THAT(t, IsOk());
        std::vector<Placement> pl;
        ASSERT_THAT((*t)->BulkBuild(keys.data(), n, &pl), IsOk());
        const uint64_t bound = DciTree::MaxBulkBuildPages(n, p.page_tokens, (*t)->ratio());
        EXPECT_LE((*t)->page_table().num_pages(), bound)
            << "P " << p.page_tokens << " r " << (*t)->ratio() << " n " << n << " kind " << kind;
        if (shape.ratio == 0 && n == 5000) {  // within 5% of the n / P pages the keys fill
          EXPECT_LE(bound, static_cast<uint64_t>(n / 16 * 21 / 20)) << "n " << n;
        }
      }
    }
  }
}

TEST(DciTreeTest, IncrementalInsertInvariants) {
  const int d = 16, P = 8;
  const int64_t n = 5000;
  auto keys = mdci_test::ClusteredKeys(n, d, 30, 0.4f, 2);
  auto t = MakeTree(d, P);
  std::vector<Placement> pl;
  for (int64_t b = 0; b < n; b += 333) {
    const int64_t c = std::min<int64_t>(333, n - b);
    ASSERT_THAT(t->Insert(&keys[b * d], c, &pl), IsOk());
    ASSERT_EQ(pl.size(), static_cast<size_t>(c));
    for (int64_t i = 0; i < c; ++i) {
      EXPECT_EQ(t->page_table().positions(pl[i].page)[pl[i].slot], b + i);
    }
  }
  ASSERT_NO_FATAL_FAILURE(CheckInvariants(*t));
  // The promotion rule gives the same level sizes as a bulk build.
  auto bulk = MakeTree(d, P);
  ASSERT_THAT(bulk->BulkBuild(keys.data(), n, &pl), IsOk());
  ASSERT_EQ(bulk->top_level(), t->top_level());
  for (int l = 0; l <= t->top_level(); ++l) EXPECT_EQ(bulk->level_size(l), t->level_size(l));
}

TEST(DciTreeTest, InsertAfterBulkBuildAndSmallTrees) {
  const int d = 8, P = 4;
  auto keys = mdci_test::ClusteredKeys(3000, d, 10, 0.3f, 3);
  for (int64_t n0 : {1, 3, 5, 100, 2000}) {
    auto t = MakeTree(d, P);
    std::vector<Placement> pl;
    ASSERT_THAT(t->BulkBuild(keys.data(), n0, &pl), IsOk());
    ASSERT_NO_FATAL_FAILURE(CheckInvariants(*t));
    ASSERT_THAT(t->Insert(&keys[n0 * d], 1000, &pl), IsOk());
    ASSERT_NO_FATAL_FAILURE(CheckInvariants(*t));
  }
}

TEST(DciTreeTest, DecodeSlackTradesNodeTightnessForFullPages) {
  const int d = 16, P = 16;
  auto keys = mdci_test::ClusteredKeys(12288, d, 40, 0.4f, 4);
  std::vector<double> fills;
  for (float slack : {1.0f, 1e6f}) {
    DciTreeParams p = ParamsOf(d, P);
    p.locality_window = 1024;
    p.decode_slack = slack;
    auto t = DciTree::Create(p);
    ASSERT_THAT(t, IsOk());
    std::vector<Placement> pl;
    ASSERT_THAT((*t)->BulkBuild(keys.data(), 8192, &pl), IsOk());
    const uint32_t pages_before = (*t)->page_table().num_pages();
    for (int64_t b = 8192; b < 12288; b += 64) {
      ASSERT_THAT((*t)->Insert(&keys[b * d], 64, &pl), IsOk());
    }
    ASSERT_NO_FATAL_FAILURE(CheckInvariants(**t));
    fills.push_back(4096.0 / (((*t)->page_table().num_pages() - pages_before) * P));
  }
  // Slack 1: nearest node only, most decode keys open a page in a full node.
  // An unbounded slack lets recent nodes with room take them: full pages.
  EXPECT_LT(fills[0], 0.8);
  EXPECT_GE(fills[1], 0.8);
}

// The node a greedy descent picks on `target` for key x (plain L2 routing):
// every top node, then the children of the best node of each level; best =
// highest dot - |c|^2 / 2, the lower id on a tie. An insert takes the dot
// against the centroid rounded to fp16 (the tree's mirror), |c|^2 exactly.
uint32_t GreedyReference(const DciTree& t, const float* x, int target) {
  const int d = t.params().dim;
  std::vector<uint32_t> cand(t.level_size(t.top_level()));
  for (uint32_t i = 0; i < cand.size(); ++i) cand[i] = i;
  std::vector<uint16_t> c16(d);
  for (int j = t.top_level();; --j) {
    uint32_t best = DciTree::kNone;
    float best_score = 0.0f;
    for (uint32_t node : cand) {
      const float* c = t.node_centroid(j, node);
      FloatToHalf(c, c16.data(), d);
      const float score = DotF16(x, c16.data(), d) - 0.5f * DotF32(c, c, d);
      if (best == DciTree::kNone || score > best_score || (score == best_score && node < best)) {
        best = node;
        best_score = score;
      }
    }
    if (j == target || best == DciTree::kNone) return best;
    cand = t.node_children(j, best);
  }
}

TEST(DciTreeTest, GreedyInsertsRouteEveryKeyDownTheBestNodeOfEachLevel) {
  const int d = 16, P = 8;
  auto keys = mdci_test::ClusteredKeys(6000, d, 40, 0.4f, 7);
  DciTreeParams p = ParamsOf(d, P);
  p.locality_window = 0;  // the routed node takes the key, with or without room
  p.insert_route_fov = 1;
  auto t = DciTree::Create(p);
  ASSERT_THAT(t, IsOk());
  DciTree& tree = **t;
  std::vector<Placement> pl;
  ASSERT_THAT(tree.BulkBuild(keys.data(), 4000, &pl), IsOk());
  int checked_level1 = 0, checked_upper = 0, scattered = 0;
  for (int64_t k = 4000; k < 6000; ++k) {
    const float* x = &keys[k * d];
    // The reference on the tree as the insert finds it, for every target.
    std::vector<uint32_t> want(tree.top_level() + 1, DciTree::kNone);
    for (int target = 1; target <= tree.top_level(); ++target) {
      want[target] = GreedyReference(tree, x, target);
    }
    const int top_before = tree.top_level();
    ASSERT_THAT(tree.Insert(x, 1, &pl), IsOk());
    const int lt = tree.key_top_level(k);
    if (lt >= top_before) continue;  // a new top level routes nothing
    if (lt == 0) {
      EXPECT_EQ(tree.page_table().node_of_page(pl[0].page), want[1]) << "key " << k;
      ++checked_level1;
    } else {
      EXPECT_EQ(tree.node_parent(lt, tree.key_node(k)), want[lt + 1]) << "key " << k;
      ++checked_upper;
    }
  }
  // Decode inserts broke some child runs, so both of the route's paths ran.
  for (int l = 2; l <= tree.top_level(); ++l) {
    for (uint32_t node = 0; node < tree.level_size(l); ++node) {
      scattered += tree.node_child_run(l, node).count == 0 ? 1 : 0;
    }
  }
  EXPECT_GT(checked_level1, 1500);
  EXPECT_GT(checked_upper, 100);
  EXPECT_GT(scattered, 0);
  ASSERT_NO_FATAL_FAILURE(CheckInvariants(tree));
}

TEST(DciTreeTest, DecodeInsertsPlaceTokensAsATreeLoadedFromItsImage) {
  // Decode inserts keep state between calls (where the locality window began,
  // which level-1 nodes have room); a tree loaded from an image derives it
  // afresh. Before every key, a fresh load of the tree's image must place
  // the key in the same slot as the tree itself.
  // With insert_fit, the nodes' spreads decide too (the image keeps them).
  const int d = 16, P = 8;
  auto keys = mdci_test::ClusteredKeys(4200, d, 40, 0.4f, 9);
  for (float fit : {0.0f, 8.0f}) {
    DciTreeParams p = ParamsOf(d, P);
    p.locality_window = 256;  // the window moves on over the inserts
    p.decode_slack = 1e6f;    // recent nodes with room take most keys
    p.insert_fit = fit;
    auto a = DciTree::Create(p);
    ASSERT_THAT(a, IsOk());
    std::vector<Placement> pa, pb;
    ASSERT_THAT((*a)->BulkBuild(keys.data(), 3000, &pa), IsOk());
    for (int64_t k = 3000; k < 4200; ++k) {
      std::string image;
      ByteWriter w(&image);
      (*a)->SaveImage(&w);
      ByteReader r(image);
      auto b = DciTree::LoadImage(p, &r, k);
      ASSERT_THAT(b, IsOk());
      ASSERT_THAT((*a)->Insert(&keys[k * d], 1, &pa), IsOk());
      ASSERT_THAT((*b)->Insert(&keys[k * d], 1, &pb), IsOk());
      ASSERT_TRUE(pa[0].page == pb[0].page && pa[0].slot == pb[0].slot)
          << "key " << k << " fit " << fit;
    }
    if (fit > 0.0f) {
      EXPECT_GT((*a)->fit_inserts(), 100u);
    }
    ASSERT_NO_FATAL_FAILURE(CheckInvariants(**a));
  }
}

// DciTreeParams::insert_fit: a decode key that lies within insert_fit x the
// spread of the nearest recent node with room joins that node unrouted; any
// other key is placed exactly where a tree without the gate places it (the
// same tree loaded from its image with insert_fit 0, before every key).
// Decode keys come in runs around one bulk key (a topic the model dwells
// on); every fifth key is a lone needle far from every other key, which
// the gate never takes.
TEST(DciTreeTest, KeysThatFitARecentNodeJoinItUnroutedAndTheRestAreRoutedAsWithoutTheGate) {
  const int d = 16, P = 16;
  const int64_t built = 3000, runs = 40, run = 24;
  auto keys = mdci_test::ClusteredKeys(built, d, 40, 0.4f, 21);
  std::mt19937_64 rng(22);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<bool> needle;
  for (int64_t r = 0; r < runs; ++r) {
    const std::vector<float> centre(keys.begin() + (r * 71 % built) * d,
                                    keys.begin() + (r * 71 % built + 1) * d);
    for (int64_t i = 0; i < run; ++i) {
      const bool far = i % 5 == 4;
      for (int k = 0; k < d; ++k) keys.push_back(far ? 40.0f * g(rng) : centre[k] + 0.08f * g(rng));
      needle.push_back(far);
    }
  }
  DciTreeParams p = ParamsOf(d, P);
  p.locality_window = 256;
  p.insert_fit = 2.0f;
  DciTreeParams routed = p;
  routed.insert_fit = 0.0f;
  auto a = DciTree::Create(p);
  ASSERT_THAT(a, IsOk());
  DciTree& tree = **a;
  std::vector<Placement> pa, pb;
  ASSERT_THAT(tree.BulkBuild(keys.data(), built, &pa), IsOk());
  int64_t fitted = 0, fitted_needles = 0, compared = 0;
  std::vector<bool> holds_needle;  // per level-1 node: a needle was placed in it
  for (int64_t k = built; k < built + runs * run; ++k) {
    std::string image;
    ByteWriter w(&image);
    tree.SaveImage(&w);
    ByteReader r(image);
    auto b = DciTree::LoadImage(routed, &r, k);
    ASSERT_THAT(b, IsOk());
    const uint64_t before = tree.fit_inserts();
    ASSERT_THAT(tree.Insert(&keys[k * d], 1, &pa), IsOk());
    ASSERT_THAT((*b)->Insert(&keys[k * d], 1, &pb), IsOk());
    const uint32_t node = tree.page_table().node_of_page(pa[0].page);
    if (holds_needle.size() <= node) holds_needle.resize(node + 1, false);
    const bool is_needle = needle[k - built];
    if (tree.fit_inserts() == before) {
      ++compared;
      ASSERT_TRUE(pa[0].page == pb[0].page && pa[0].slot == pb[0].slot) << "key " << k;
    } else {
      ++fitted;
      // Joined a recent level-1 node, in the page that had room.
      EXPECT_GE(static_cast<int64_t>(tree.node_key(1, node)), k - p.locality_window) << "key " << k;
      EXPECT_GT(pa[0].slot, 0u) << "key " << k;
      // A node of dwell keys is too tight to take a needle; one that a
      // needle already widened (routing's slack put it there) may.
      if (is_needle) {
        ++fitted_needles;
        EXPECT_TRUE(holds_needle[node]) << "needle " << k << " joined node " << node;
      }
    }
    if (is_needle) holds_needle[node] = true;
  }
  EXPECT_GT(fitted, runs * run / 4);  // a dwell's keys once its node holds a few
  EXPECT_LT(fitted_needles, fitted / 8);
  EXPECT_GT(compared, runs);  // at least each run's opening keys
  // The counts the session reports (Selector::insert_counts): every key
  // Insert placed, and of them the unrouted ones; a tree loaded from an
  // image counts from its load.
  EXPECT_EQ(tree.inserted_keys(), static_cast<uint64_t>(runs * run));
  EXPECT_EQ(tree.fit_inserts(), static_cast<uint64_t>(fitted));
  ASSERT_NO_FATAL_FAILURE(CheckInvariants(tree));
}

TEST(DciTreeTest, RejectsBadInputWithoutChanges) {
  auto t = MakeTree(4, 4);
  std::vector<float> k = {1, 2, 3, 4, 5, NAN, 7, 8};
  std::vector<Placement> pl;
  EXPECT_THAT(t->BulkBuild(k.data(), 2, &pl), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(t->Insert(k.data(), 2, &pl), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(t->Insert(k.data(), 0, &pl), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(t->num_tokens(), 0);
  EXPECT_EQ(t->inserted_keys(), 0u);  // refused keys are not counted
  DciTreeParams bad;
  bad.dim = 0;
  EXPECT_THAT(DciTree::Create(bad), StatusIs(absl::StatusCode::kInvalidArgument));
  bad.dim = 4;
  bad.ratio = 1;
  EXPECT_THAT(DciTree::Create(bad), StatusIs(absl::StatusCode::kInvalidArgument));
  bad.ratio = 0;
  for (float fit : {-1.0f, NAN, INFINITY}) {
    bad.insert_fit = fit;
    EXPECT_THAT(DciTree::Create(bad),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("insert_fit")));
  }
}

TEST(DciTreeTest, DecodeInsertsAfterBulkBuildReallocateNothing) {
  // The bulk build reserves room for as many tokens again: one-token inserts
  // after it must not move the tree's arrays (a reallocation copies the
  // whole array on a decode append's path).
  const int d = 16, P = 16;
  const int64_t n = 8000, extra = 4000;
  auto keys = mdci_test::ClusteredKeys(n + extra, d, 40, 0.4f, 5);
  auto t = MakeTree(d, P);
  std::vector<Placement> pl;
  ASSERT_THAT(t->BulkBuild(keys.data(), n, &pl), IsOk());
  const float* centroids = t->node_centroid(1, 0);
  const int32_t* positions = t->page_table().positions(0);
  for (int64_t i = n; i < n + extra; ++i) ASSERT_THAT(t->Insert(&keys[i * d], 1, &pl), IsOk());
  EXPECT_EQ(t->node_centroid(1, 0), centroids);
  EXPECT_EQ(t->page_table().positions(0), positions);
  ASSERT_NO_FATAL_FAILURE(CheckInvariants(*t));
}

}  // namespace
}  // namespace icecache
