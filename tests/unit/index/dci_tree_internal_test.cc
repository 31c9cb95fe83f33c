// The bulk build's helpers (server/index/dci_tree_internal.h) against the
// plain algorithms they replace: the trees must not change.
#include "server/index/dci_tree_internal.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "server/index/dci_tree.h"

namespace icecache {
namespace {

using Scored = std::vector<std::pair<float, uint32_t>>;

// Scores with many ties and signed zeros: the cases an ordering gets wrong.
std::vector<float> TiedScores(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> level(-6, 6);
  std::vector<float> s(n);
  for (float& v : s) v = level(rng) == 0 ? -0.0f : 0.25f * static_cast<float>(level(rng));
  return s;
}

// InsertTopK over nodes in ascending order keeps exactly the first `keep`
// of all pairs sorted best first (score descending, then node), ties and
// signed zeros included: the reference is a stable sort of everything.
TEST(InsertTopKTest, EqualsTheBestOfAStableSort) {
  std::mt19937 rng(17);
  std::normal_distribution<float> nd;
  for (uint32_t n : {0u, 1u, 2u, 7u, 8u, 9u, 100u, 1000u}) {
    for (size_t keep : {1u, 2u, 3u, 8u, 9u, 200u}) {
      for (int kind = 0; kind < 3; ++kind) {
        std::vector<float> s = kind == 0 ? TiedScores(n, n * 7 + keep) : std::vector<float>(n);
        if (kind == 1)
          for (float& v : s) v = nd(rng);
        if (kind == 2)  // descending: every score lands last
          for (uint32_t i = 0; i < n; ++i) s[i] = -static_cast<float>(i);
        Scored all, got;
        for (uint32_t i = 0; i < n; ++i) {
          all.push_back({s[i], 5 + i});
          dci_internal::InsertTopK(s[i], 5 + i, keep, &got);
        }
        std::stable_sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        });
        if (all.size() > keep) all.resize(keep);
        ASSERT_EQ(got.size(), all.size()) << "n " << n << " keep " << keep << " kind " << kind;
        for (size_t i = 0; i < all.size(); ++i) {
          ASSERT_TRUE(got[i].first == all[i].first && got[i].second == all[i].second)
              << "n " << n << " keep " << keep << " kind " << kind << " at " << i;
        }
      }
    }
  }
}

TEST(TopOfScoresTest, EqualsInsertTopKInOrder) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  for (uint32_t n : {0u, 1u, 5u, 8u, 15u, 16u, 17u, 64u, 255u, 1000u}) {
    for (size_t keep : {1u, 3u, 8u, 9u, 40u}) {
      for (int kind = 0; kind < 3; ++kind) {
        std::vector<float> s = kind == 0 ? TiedScores(n, n + keep) : std::vector<float>(n);
        if (kind == 1)
          for (float& v : s) v = nd(rng);
        if (kind == 2)  // ascending: every score enters
          for (uint32_t i = 0; i < n; ++i) s[i] = static_cast<float>(i);
        Scored want, got;
        for (uint32_t i = 0; i < n; ++i) dci_internal::InsertTopK(s[i], 100 + i, keep, &want);
        dci_internal::TopOfScores(s.data(), n, 100, keep, &got);
        EXPECT_EQ(got, want) << "n " << n << " keep " << keep << " kind " << kind;
      }
    }
  }
}

struct Rec {
  float score;
  uint32_t item;
  uint32_t node;
};

TEST(SortBestFirstTest, EqualsAStableComparisonSort) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 100.0f);
  for (size_t n : {0u, 1u, 2u, 100u, 5000u}) {
    for (uint32_t max_item : {1u, 7u, 3000u, 4000000000u}) {
      std::vector<Rec> recs(n);
      const std::vector<float> tied = TiedScores(n, static_cast<uint32_t>(n));
      for (size_t i = 0; i < n; ++i) {
        recs[i].score = i % 2 ? tied[i] : nd(rng);
        recs[i].item = static_cast<uint32_t>(rng() % max_item);
        recs[i].node = static_cast<uint32_t>(i);  // input order
      }
      std::vector<Rec> want = recs, tmp;
      std::stable_sort(want.begin(), want.end(), [](const Rec& a, const Rec& b) {
        if (a.score != b.score) return a.score > b.score;
        return a.item < b.item;
      });
      dci_internal::SortBestFirst(&recs, &tmp);
      ASSERT_EQ(recs.size(), want.size());
      for (size_t i = 0; i < n; ++i) {
        ASSERT_TRUE(recs[i].score == want[i].score && recs[i].item == want[i].item &&
                    recs[i].node == want[i].node)
            << "n " << n << " max_item " << max_item << " at " << i;
      }
    }
  }
}

// The build's own input: items ascending, several candidates per item in
// their own order (the three-pass score-only path), against the same
// stable comparison sort; one record out of item order in the middle takes
// the six-pass path and must give the same order too.
TEST(SortBestFirstTest, ItemOrderedInputEqualsAStableComparisonSort) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (size_t items : {1u, 2u, 50u, 4000u}) {
    for (int per_item : {1, 3, 8}) {
      for (int kind = 0; kind < 3; ++kind) {
        std::vector<Rec> recs;
        const std::vector<float> tied = TiedScores(items * per_item, static_cast<uint32_t>(items));
        for (size_t i = 0; i < items; ++i) {
          for (int c = 0; c < per_item; ++c) {
            const size_t k = recs.size();
            const float v = kind == 0 ? tied[k] : kind == 1 ? nd(rng) : -std::abs(nd(rng));
            recs.push_back({v, static_cast<uint32_t>(i * 3), static_cast<uint32_t>(k)});
          }
        }
        if (recs.size() > 4 && kind == 2) std::swap(recs[1].item, recs[recs.size() - 2].item);
        std::vector<Rec> want = recs, tmp;
        std::stable_sort(want.begin(), want.end(), [](const Rec& a, const Rec& b) {
          if (a.score != b.score) return a.score > b.score;
          return a.item < b.item;
        });
        dci_internal::SortBestFirst(&recs, &tmp);
        ASSERT_EQ(recs.size(), want.size());
        for (size_t i = 0; i < recs.size(); ++i) {
          ASSERT_TRUE(recs[i].score == want[i].score && recs[i].item == want[i].item &&
                      recs[i].node == want[i].node)
              << "items " << items << " per item " << per_item << " kind " << kind << " at " << i;
        }
      }
    }
  }
}

// The descent's ranking head (SortHead), called in growing chunks as
// TakeBest does, against a sort of everything by BetterOrder: every chunk's
// head must be the reference's prefix, and the array a permutation of the
// input. RankHead (the first chunk from a plain score array) must leave
// exactly what SortHead leaves. Scores with ties and signed zeros, normal, all equal, spans that
// overflow, infinities, seconds out of order, sizes on both sides of the
// partial_sort cutoff.
TEST(SortHeadTest, ChunksEqualTheHeadOfAFullSort) {
  std::mt19937 rng(23);
  std::normal_distribution<float> nd(3.0f, 4.0f);
  DciScratch scratch;
  for (size_t n : {1u, 2u, 47u, 48u, 100u, 129u, 700u, 1120u, 2049u, 9000u}) {
    for (int kind = 0; kind < 7; ++kind) {
      std::vector<float> v = TiedScores(n, static_cast<uint32_t>(n + kind));
      for (size_t i = 0; i < n; ++i) {
        if (kind == 1) v[i] = nd(rng);
        if (kind == 2) v[i] = 1.5f;
        if (kind == 3) v[i] = i % 3 ? nd(rng) : (i % 2 ? 3e38f : -3e38f);
        if (kind == 4 && i % 17 == 3)
          v[i] = i % 2 ? std::numeric_limits<float>::infinity()
                       : -std::numeric_limits<float>::infinity();
        if (kind == 5) v[i] = 1.0f + 1e-7f * static_cast<float>(i % 5);  // a few ulps apart
        if (kind == 6) v[i] = std::round(nd(rng) * 4.0f) / 4.0f;         // coarse ties
      }
      for (size_t first_chunk : {1u, 8u, 40u, 300u}) {
        for (bool scrambled : {false, true}) {
          Scored scored(n);
          for (size_t i = 0; i < n; ++i) scored[i] = {v[i], static_cast<uint32_t>(i)};
          if (scrambled) std::shuffle(scored.begin(), scored.end(), rng);
          Scored want = scored;
          std::sort(want.begin(), want.end(), dci_internal::BetterOrder());
          size_t sorted = 0, chunk = first_chunk;
          while (sorted < n) {
            const size_t end = std::min(n, sorted + chunk);
            const size_t got = dci_internal::SortHead(&scored, &scratch, sorted, end);
            ASSERT_GE(got, end);
            ASSERT_LE(got, n);
            for (size_t i = 0; i < got; ++i) {
              ASSERT_TRUE(scored[i].second == want[i].second &&
                          std::memcmp(&scored[i].first, &want[i].first, sizeof(float)) == 0)
                  << "n " << n << " kind " << kind << " chunk " << first_chunk << " scrambled "
                  << scrambled << " at " << i << " of " << got;
            }
            sorted = got;
            chunk *= 2;
          }
          if (!scrambled) {  // RankHead: the same first chunk, laid out the same
            DciScratch rs;
            const size_t end = std::min(n, first_chunk);
            Scored head(n);
            for (size_t i = 0; i < n; ++i) head[i] = {v[i], static_cast<uint32_t>(i)};
            const size_t want_count = dci_internal::SortHead(&head, &scratch, 0, end);
            ASSERT_EQ(dci_internal::RankHead(v.data(), n, end, &rs), want_count);
            ASSERT_EQ(rs.scored.size(), n);
            for (size_t i = 0; i < n; ++i) {
              ASSERT_TRUE(rs.scored[i].second == head[i].second &&
                          std::memcmp(&rs.scored[i].first, &head[i].first, sizeof(float)) == 0)
                  << "RankHead n " << n << " kind " << kind << " chunk " << first_chunk << " at "
                  << i;
            }
          }
          Scored perm = scored;
          std::sort(perm.begin(), perm.end(),
                    [](const auto& a, const auto& b) { return a.second < b.second; });
          for (size_t i = 0; i < n; ++i) ASSERT_EQ(perm[i].second, i);
        }
      }
    }
  }
}

// With a NaN the ranking is not total: SortHead is then std::partial_sort
// of the head, the same result as before it was rewritten.
TEST(SortHeadTest, ANanTakesPartialSort) {
  std::mt19937 rng(29);
  std::normal_distribution<float> nd;
  DciScratch scratch;
  for (size_t n : {10u, 300u, 2000u}) {
    Scored scored(n);
    for (size_t i = 0; i < n; ++i) {
      scored[i] = {i % 97 == 5 ? std::nanf("") : nd(rng), static_cast<uint32_t>(i)};
    }
    Scored want = scored;
    const size_t end = n / 3;
    std::partial_sort(want.begin(), want.begin() + end, want.end(), dci_internal::BetterOrder());
    ASSERT_EQ(dci_internal::SortHead(&scored, &scratch, 0, end), end);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_TRUE(scored[i].second == want[i].second) << "n " << n << " at " << i;
    }
  }
}

}  // namespace
}  // namespace icecache
