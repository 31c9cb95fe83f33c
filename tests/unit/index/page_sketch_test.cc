// PageSketch (the int8 scoring copy of mdci's keys) and mdci with
// MdciParams::sketch_scoring: the quantiser's error bound, the codes a
// Build/Insert writes equal the codes re-derived from the frames (a warm
// restart's LoadImage), and the sketch changes only the ranking of
// candidate pages, by a bounded amount.
#include "server/index/page_sketch.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "server/index/mdci_selector.h"
#include "server/index/selector.h"
#include "tests/unit/index/mdci_test_util.h"

namespace icecache {
namespace {

constexpr int kDim = 64;
constexpr int kPage = 16;

TEST(PageSketchTest, QuantizeRowIsWithinHalfAStepAndHitsTheExtremes) {
  std::mt19937 rng(5);
  std::normal_distribution<float> g(0.0f, 1.5f);
  for (int dim : {1, 7, 64, 128, 131}) {
    std::vector<float> x(dim);
    for (auto& v : x) v = g(rng);
    std::vector<int8_t> codes(dim);
    const float scale = PageSketch::QuantizeRow(x.data(), dim, codes.data());
    float m = 0.0f;
    for (float v : x) m = std::max(m, std::fabs(v));
    EXPECT_FLOAT_EQ(scale, m / 127.0f);
    bool extreme = false;
    for (int c = 0; c < dim; ++c) {
      EXPECT_LE(std::fabs(x[c] - codes[c] * scale), 0.5f * scale * (1.0f + 1e-5f) + 1e-7f)
          << dim << " " << c;
      EXPECT_GE(codes[c], -127);
      extreme |= codes[c] == 127 || codes[c] == -127;
    }
    EXPECT_TRUE(extreme) << dim;
  }
  std::vector<float> zero(9, 0.0f);
  std::vector<int8_t> codes(9, 3);
  EXPECT_EQ(PageSketch::QuantizeRow(zero.data(), 9, codes.data()), 0.0f);
  for (int8_t c : codes) EXPECT_EQ(c, 0);
}

SelectorConfig Config(bool sketch) {
  SelectorConfig c = mdci_test::MdciConfig(kDim, kPage, /*pq_factor=*/0.0f);
  c.mdci.sketch_scoring = sketch;
  return c;
}

using Built = mdci_test::BuiltSelector;

// Bulk build of `n` keys, then `inserts` decode tokens one at a time.
Built BuildWithInserts(const std::vector<float>& keys, int64_t n, int64_t inserts, bool sketch) {
  return mdci_test::BuildWithInserts(Config(sketch), keys, n, inserts);
}

TEST(PageSketchTest, RebuildFromTheFramesGivesTheCodesBuildAndInsertWrote) {
  const int64_t n = 3000, inserts = 70;
  const std::vector<float> keys = mdci_test::ClusteredKeys(n + inserts, kDim, 24, 0.4f, 11);
  Built b = BuildWithInserts(keys, n, inserts, /*sketch=*/true);
  const auto& m = static_cast<const MdciSelector&>(*b.sel);
  PageSketch rebuilt(kDim, kPage);
  ASSERT_TRUE(
      rebuilt.Rebuild(*b.keys, DType::kF16, m.num_pages(), [&m](uint32_t p) { return m.fill(p); })
          .ok());
  // The same keys written in page order (as Build and Insert write them)
  // give the same codes and scales as the frames read back.
  PageSketch written(kDim, kPage);
  std::vector<Placement> all;
  std::vector<float> ordered;
  for (uint32_t p = 0; p < m.num_pages(); ++p) {
    for (uint32_t slot = 0; slot < m.fill(p); ++slot) {
      all.push_back(Placement{p, slot});
      const int32_t pos = m.positions(p)[slot];
      ordered.insert(ordered.end(), &keys[pos * kDim], &keys[pos * kDim] + kDim);
    }
  }
  written.Write(all, ordered.data(), DType::kF16);
  ASSERT_EQ(written.num_pages(), rebuilt.num_pages());
  for (uint32_t p = 0; p < m.num_pages(); ++p) {
    ASSERT_EQ(std::memcmp(written.codes(p), rebuilt.codes(p), m.fill(p) * kDim), 0) << p;
    ASSERT_EQ(std::memcmp(written.scales(p), rebuilt.scales(p), m.fill(p) * sizeof(float)), 0) << p;
  }
  // A page whose frame is missing cannot be rebuilt.
  mdci_test::TestPageKeys empty(kDim, kPage, DType::kF16);
  EXPECT_EQ(rebuilt.Rebuild(empty, DType::kF16, 1, [](uint32_t) { return 1u; }).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(PageSketchTest, MdciWithTheSketchKeepsItsMassAndSurvivesAnImage) {
  const int64_t n = 6000, inserts = 50;
  const std::vector<float> keys = mdci_test::ClusteredKeys(n + inserts, kDim, 40, 0.5f, 3);
  Built exact = BuildWithInserts(keys, n, inserts, /*sketch=*/false);
  Built sketch = BuildWithInserts(keys, n, inserts, /*sketch=*/true);
  // The same tree: the sketch is beside it, not in it.
  ASSERT_EQ(exact.sel->num_pages(), sketch.sel->num_pages());
  EXPECT_EQ(sketch.sel->index_bytes() - exact.sel->index_bytes(),
            (sketch.sel->num_pages() + PageSketch::kPagesPerBlock - 1) /
                PageSketch::kPagesPerBlock * PageSketch::kPagesPerBlock *
                (kPage * kDim + kPage * sizeof(float)));
  std::string image;
  ASSERT_TRUE(sketch.sel->SaveImage(&image).ok());
  auto loaded =
      Selector::LoadImage(Config(true), sketch.keys.get(), image, sketch.sel->num_tokens());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const int64_t total = n + inserts;
  const std::vector<float> queries = mdci_test::GaussianRows(4 * 12, kDim, 1.5f, 9);
  double mass_exact = 0.0, mass_sketch = 0.0;
  int differ = 0;
  for (int step = 0; step < 12; ++step) {
    // Queries near keys, so the pages' masses are peaked and the ranking matters.
    std::vector<float> q(&queries[step * 4 * kDim], &queries[(step + 1) * 4 * kDim]);
    for (int j = 0; j < 4; ++j) {
      for (int c = 0; c < kDim; ++c)
        q[j * kDim + c] += 3.0f * keys[(step * 431 + j * 97) * kDim + c];
    }
    SelectParams sp;
    sp.budget_tokens = 128;
    Selection a, b, c, ea, eb;
    ASSERT_TRUE(exact.sel->Select(q.data(), 4, sp, &a).ok());
    ASSERT_TRUE(sketch.sel->Select(q.data(), 4, sp, &b).ok());
    ASSERT_TRUE((*loaded)->Select(q.data(), 4, sp, &c).ok());
    // The warm-restarted selector rebuilt the same sketch: the same selection, bit for bit.
    EXPECT_EQ(b.pages, c.pages);
    EXPECT_EQ(b.scores, c.scores);
    // The exact references do not use the sketch.
    sp.exhaustive = true;
    ASSERT_TRUE(exact.sel->Select(q.data(), 4, sp, &ea).ok());
    ASSERT_TRUE(sketch.sel->Select(q.data(), 4, sp, &eb).ok());
    EXPECT_EQ(ea.pages, eb.pages);
    EXPECT_EQ(ea.scores, eb.scores);
    differ += a.scores != b.scores;
    mass_exact += mdci_test::MassOf(keys.data(), total, kDim, q.data(), 4,
                                    mdci_test::SelectedPositions(*exact.sel, a));
    mass_sketch += mdci_test::MassOf(keys.data(), total, kDim, q.data(), 4,
                                     mdci_test::SelectedPositions(*sketch.sel, b));
  }
  // Approximate scores (the sketch is in use), the same mass within 1%.
  EXPECT_GT(differ, 0);
  EXPECT_GT(mass_exact, 0.0);
  EXPECT_NEAR(mass_sketch / mass_exact, 1.0, 0.01) << mass_sketch << " vs " << mass_exact;
}

}  // namespace
}  // namespace icecache
