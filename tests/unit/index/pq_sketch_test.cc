// PqSketch (the 4-bit product-quantised copy of mdci's keys) and mdci with
// MdciParams::pq_factor: the fast scan's page estimates equal a scalar
// reference over the same codes and tables, the codes rebuilt from the
// frames (a warm restart) equal the codes Build and Insert wrote, and the
// scan picks pages that hold the mass.
#include "server/index/pq_sketch.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/index/kernels.h"
#include "server/index/mdci_selector.h"
#include "server/index/selector.h"
#include "tests/unit/index/mdci_test_util.h"

namespace icecache {
namespace {

constexpr int kDim = 64;
constexpr int kPage = 16;

// The estimate of one page and query from ApproxDot (the float tables, no
// uint8 rounding): log-sum-exp of the page's rows by the max + mean rule.
double ReferenceLse(const PqSketch& pq, const float* q, float scale, uint32_t page, int page_tokens,
                    uint32_t fill, const std::vector<float>& mean) {
  double mx = -std::numeric_limits<double>::infinity(), sum = 0.0;
  double qm = 0.0;
  for (int d = 0; d < kDim; ++d) qm += q[d] * mean[d];
  for (uint32_t r = 0; r < fill; ++r) {
    const double v = scale * (pq.ApproxDot(q, static_cast<uint64_t>(page) * page_tokens + r) + qm);
    mx = std::max(mx, v);
    sum += v;
  }
  const double avg = sum / fill;
  return mx + std::log1p((fill - 1) * std::exp(avg - mx));
}

// The keys placed in order into pages of `page_tokens`, every `every`th page
// (from page `first`) left with `partial` rows: the placements, each page's
// fill and the rows in placement order.
struct PlacedKeys {
  std::vector<Placement> pl;
  std::vector<uint32_t> fill;
  std::vector<float> placed;
};
PlacedKeys PlaceWithPartialPages(const std::vector<float>& keys, int64_t n, int dim,
                                 int page_tokens, uint32_t every, uint32_t first,
                                 uint32_t partial) {
  PlacedKeys k;
  int64_t next = 0;
  for (uint32_t page = 0; next < n; ++page) {
    const uint32_t f = page % every == first ? partial : static_cast<uint32_t>(page_tokens);
    k.fill.push_back(std::min<uint32_t>(f, static_cast<uint32_t>(n - next)));
    for (uint32_t r = 0; r < k.fill.back(); ++r, ++next) {
      k.pl.push_back(Placement{page, r});
      k.placed.insert(k.placed.end(), &keys[next * dim], &keys[(next + 1) * dim]);
    }
  }
  return k;
}

TEST(PqSketchTest, TheFastScanMatchesTheScalarReferenceOverTheSameCodes) {
  for (int page_tokens : {16, 8, 32, 5}) {
    const int64_t n = 1000;
    const std::vector<float> keys = mdci_test::ClusteredKeys(n, kDim, 12, 0.5f, 4);
    PqSketch pq(kDim, page_tokens);
    pq.Train(keys.data(), n);
    ASSERT_TRUE(pq.trained());
    // Positional placement, some pages left partly filled.
    std::vector<Placement> pl;
    std::vector<uint32_t> fill;
    std::vector<float> placed;
    int64_t next = 0;
    for (uint32_t page = 0; next < n; ++page) {
      const uint32_t f = page % 7 == 3 ? static_cast<uint32_t>(page_tokens) / 2 + 1 : page_tokens;
      fill.push_back(std::min<uint32_t>(f, static_cast<uint32_t>(n - next)));
      for (uint32_t r = 0; r < fill.back(); ++r, ++next) {
        pl.push_back(Placement{page, r});
        placed.insert(placed.end(), &keys[next * kDim], &keys[(next + 1) * kDim]);
      }
    }
    pq.Write(pl, placed.data(), DType::kF32);
    const uint32_t pages = static_cast<uint32_t>(fill.size());
    pq.CoverPages(pages);
    // The mean the codes are taken around: the sample's mean (every row here).
    std::vector<float> mean(kDim, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      for (int d = 0; d < kDim; ++d) mean[d] += keys[i * kDim + d] / n;
    }
    const std::vector<float> q = mdci_test::GaussianRows(3, kDim, 2.0f, 8);
    const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
    std::vector<float> mass(pages * 3), ref(3);
    pq.EstimatePageMass(q.data(), 3, scale, pages, fill.data(), mass.data(), ref.data());
    for (int j = 0; j < 3; ++j) {
      double top = -std::numeric_limits<double>::infinity();
      for (uint32_t p = 0; p < pages; ++p) {
        for (uint32_t r = 0; r < fill[p]; ++r) {
          double qm = 0.0;
          for (int d = 0; d < kDim; ++d) qm += q[j * kDim + d] * mean[d];
          top = std::max(
              top, scale * (pq.ApproxDot(&q[j * kDim], static_cast<uint64_t>(p) * page_tokens + r) +
                            qm));
        }
      }
      // The tables are rounded to uint8 steps of (largest range / 255): the
      // sum over 16 sub-spaces is within 16 half-steps.
      const double tol = 0.15;
      EXPECT_NEAR(ref[j], top, tol) << page_tokens << " q" << j;
      for (uint32_t p = 0; p < pages; ++p) {
        const double want = ReferenceLse(pq, &q[j * kDim], scale, p, page_tokens, fill[p], mean);
        ASSERT_GT(mass[p * 3 + j], 0.0f) << page_tokens << " page " << p;
        EXPECT_NEAR(std::log(mass[p * 3 + j]) + ref[j], want, tol)
            << page_tokens << " page " << p << " q" << j;
      }
    }
    // An empty page has no mass.
    pq.CoverPages(pages + 2);
    std::vector<float> more((pages + 2) * 3);
    std::vector<uint32_t> more_fill = fill;
    more_fill.resize(pages + 2, 0u);
    pq.EstimatePageMass(q.data(), 3, scale, pages + 2, more_fill.data(), more.data(), ref.data());
    EXPECT_EQ(more[pages * 3], 0.0f);
    EXPECT_EQ(more[(pages + 1) * 3 + 2], 0.0f);
  }
}

// The scan kernels this CPU has: the AVX2 shuffles always, the AVX-512
// shuffles and the byte-lookup scan (VBMI + VNNI) where it has them.
// Select(k) makes EstimatePageMass take kernel k; Reset() puts the CPU's
// own choice back.
struct ScanKernels {
  static std::vector<PqSketch::ScanKernelId> Available() {
    std::vector<PqSketch::ScanKernelId> k = {PqSketch::ScanKernelId::kAvx2};
    if (ForceKernelIsa("avx512")) {
      k.push_back(PqSketch::ScanKernelId::kAvx512);
      if (PqSketch::AllowByteLookupScan(true)) k.push_back(PqSketch::ScanKernelId::kByteLookup);
    }
    Reset();
    return k;
  }
  static void Select(PqSketch::ScanKernelId k) {
    ASSERT_TRUE(ForceKernelIsa(k == PqSketch::ScanKernelId::kAvx2 ? "avx2" : "avx512"));
    PqSketch::AllowByteLookupScan(k == PqSketch::ScanKernelId::kByteLookup);
    ASSERT_EQ(PqSketch::ActiveScanKernel(), k);
  }
  static void Reset() {
    ForceKernelIsa("auto");
    PqSketch::AllowByteLookupScan(true);
  }
};

// Every scan kernel (the AVX-512 shuffles: two code lines per shuffle; the
// byte-lookup scan: byte permutes and VNNI sums) gives the AVX2 scan's
// estimates bit for bit, at dims of an even and an odd number of lines
// (dim / 8), with 1-5 queries (the pairs and the odd one out), full and
// partly filled pages.
TEST(PqSketchTest, EveryScanKernelGivesTheAvx2ScansEstimates) {
  const std::vector<PqSketch::ScanKernelId> kernels = ScanKernels::Available();
  if (kernels.size() == 1) GTEST_SKIP() << "this CPU has no AVX-512: only the AVX2 scan runs";
  for (int dim : {64, 24, 8, 128}) {
    const int64_t n = 1500;
    const std::vector<float> keys = mdci_test::ClusteredKeys(n, dim, 12, 0.5f, 4);
    PqSketch pq(dim, kPage);
    pq.Train(keys.data(), n);
    const PlacedKeys k = PlaceWithPartialPages(keys, n, dim, kPage, 9, 4, 7);
    const std::vector<uint32_t>& fill = k.fill;
    pq.Write(k.pl, k.placed.data(), DType::kF32);
    const uint32_t pages = static_cast<uint32_t>(fill.size());
    const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
    for (int nq : {1, 2, 3, 4, 5}) {
      const std::vector<float> q = mdci_test::GaussianRows(nq, dim, 2.0f, 10 + nq);
      std::vector<std::vector<float>> mass(kernels.size()), ref(kernels.size()),
          bulk(kernels.size());
      for (size_t i = 0; i < kernels.size(); ++i) {
        ScanKernels::Select(kernels[i]);
        mass[i].assign(static_cast<size_t>(pages) * nq, -1.0f);
        bulk[i].assign(mass[i].size(), -1.0f);
        ref[i].assign(nq, 0.0f);
        pq.EstimatePageMass(q.data(), nq, scale, pages, fill.data(), mass[i].data(), ref[i].data(),
                            bulk[i].data());
      }
      ScanKernels::Reset();
      for (size_t i = 1; i < kernels.size(); ++i) {
        const std::string what = absl::StrCat("kernel ", static_cast<int>(kernels[i]), ", dim ",
                                              dim, ", ", nq, " queries");
        EXPECT_EQ(mass[0], mass[i]) << what;
        EXPECT_EQ(bulk[0], bulk[i]) << what;
        EXPECT_EQ(ref[0], ref[i]) << what;
      }
      // Not a vacuous equality: the estimates differ between pages.
      EXPECT_NE(*std::max_element(mass[0].begin(), mass[0].end()),
                *std::min_element(mass[0].begin(), mass[0].end()));
    }
  }
}

// The scan's software prefetch (PqSketch::SetScanPrefetch) only asks for
// lines: every distance, none to past the last group, gives the same
// estimates bit for bit, partly filled pages and a query basis included.
TEST(PqSketchTest, ThePrefetchDistanceChangesNoEstimate) {
  const int dim = 32;
  const int64_t n = 2000;
  const std::vector<float> keys = mdci_test::ClusteredKeys(n, dim, 12, 0.5f, 4);
  PqSketch pq(dim, kPage);
  pq.Train(keys.data(), n);
  const PlacedKeys k = PlaceWithPartialPages(keys, n, dim, kPage, 9, 4, 7);
  pq.Write(k.pl, k.placed.data(), DType::kF32);
  const uint32_t pages = static_cast<uint32_t>(k.fill.size());
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const int nq = 4;
  const std::vector<float> q = mdci_test::GaussianRows(nq, dim, 2.0f, 3);
  auto estimate = [&](int distance) {
    const int before = PqSketch::SetScanPrefetch(distance);
    std::vector<float> mass(static_cast<size_t>(pages) * nq), ref(nq), bulk(mass.size());
    pq.EstimatePageMass(q.data(), nq, scale, pages, k.fill.data(), mass.data(), ref.data(),
                        bulk.data());
    PqSketch::SetScanPrefetch(before);
    mass.insert(mass.end(), bulk.begin(), bulk.end());
    mass.insert(mass.end(), ref.begin(), ref.end());
    return mass;
  };
  const std::vector<float> none = estimate(0);
  for (int distance : {1, PqSketch::kScanPrefetchGroups, 64, 1000}) {
    EXPECT_EQ(estimate(distance), none) << "distance " << distance;
  }
  EXPECT_EQ(PqSketch::SetScanPrefetch(PqSketch::kScanPrefetchGroups),
            PqSketch::kScanPrefetchGroups);  // each call put back the one before
  EXPECT_EQ(PqSketch::ScanPrefetchGroups(), uint64_t{PqSketch::kScanPrefetchGroups});
}

// Each query is estimated on its own: a batch (4 and 8 queries take the
// four-query fold, FoldHalves4; 6 takes it once, then a pair) gives every
// query's column bit for bit what that query alone gets (the pair and
// single paths), on both scans, for pages of 16 and 32 (two halves of one
// page folded in order), full and partly filled. The page count is a
// multiple of 8, so no query's cells reach the scalar exp tail.
TEST(PqSketchTest, ABatchOfQueriesEstimatesEachAsItWouldAlone) {
  const std::vector<PqSketch::ScanKernelId> kernels = ScanKernels::Available();
  for (int page_tokens : {16, 32}) {
    for (int dim : {128, 64}) {
      const int64_t n = 3000;
      const std::vector<float> keys = mdci_test::ClusteredKeys(n, dim, 12, 0.5f, 5);
      PqSketch pq(dim, page_tokens);
      pq.Train(keys.data(), n);
      const PlacedKeys k = PlaceWithPartialPages(keys, n, dim, page_tokens, 11, 5, 9);
      std::vector<uint32_t> fill = k.fill;
      while (fill.size() % 8 != 0) fill.push_back(0);
      pq.Write(k.pl, k.placed.data(), DType::kF32);
      const uint32_t pages = static_cast<uint32_t>(fill.size());
      pq.CoverPages(pages);
      const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
      for (const PqSketch::ScanKernelId kernel : kernels) {
        ScanKernels::Select(kernel);
        const int isa = static_cast<int>(kernel);
        for (int nq : {4, 6, 8}) {
          const std::vector<float> q = mdci_test::GaussianRows(nq, dim, 3.0f, 40 + nq);
          std::vector<float> mass(static_cast<size_t>(pages) * nq), bulk(mass.size()), ref(nq);
          pq.EstimatePageMass(q.data(), nq, scale, pages, fill.data(), mass.data(), ref.data(),
                              bulk.data());
          for (int j = 0; j < nq; ++j) {
            std::vector<float> one(pages), one_bulk(pages);
            float one_ref = 0.0f;
            pq.EstimatePageMass(&q[static_cast<size_t>(j) * dim], 1, scale, pages, fill.data(),
                                one.data(), &one_ref, one_bulk.data());
            EXPECT_EQ(ref[j], one_ref) << isa << " page " << page_tokens << " dim " << dim;
            int differ = 0;
            for (uint32_t p = 0; p < pages; ++p) {
              differ += mass[static_cast<size_t>(p) * nq + j] != one[p] ||
                        bulk[static_cast<size_t>(p) * nq + j] != one_bulk[p];
            }
            EXPECT_EQ(differ, 0) << isa << ", pages of " << page_tokens << ", dim " << dim << ", "
                                 << nq << " queries, query " << j;
          }
          EXPECT_NE(*std::max_element(mass.begin(), mass.end()),
                    *std::min_element(mass.begin(), mass.end()));
        }
      }
      ScanKernels::Reset();
    }
  }
}

TEST(PqSketchTest, ApproximateLogitsTrackTheExactOnesWhateverTheNorms) {
  const int64_t n = 4000;
  std::vector<float> keys = mdci_test::ClusteredKeys(n, kDim, 30, 0.5f, 6);
  // Heavy-tailed norms: every 50th key 8x longer (the mass takers).
  for (int64_t i = 0; i < n; i += 50) {
    for (int d = 0; d < kDim; ++d) keys[i * kDim + d] *= 8.0f;
  }
  PqSketch pq(kDim, kPage);
  pq.Train(keys.data(), n);
  std::vector<Placement> pl;
  for (int64_t i = 0; i < n; ++i) {
    pl.push_back(Placement{static_cast<uint32_t>(i / kPage), static_cast<uint32_t>(i % kPage)});
  }
  pq.Write(pl, keys.data(), DType::kF32);
  std::vector<float> mean(kDim, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    for (int d = 0; d < kDim; ++d) mean[d] += keys[i * kDim + d] / n;
  }
  // The norm kept is the centred key's (fp16).
  for (int64_t i = 0; i < n; i += 97) {
    double n2 = 0.0;
    for (int d = 0; d < kDim; ++d) {
      const double c = keys[i * kDim + d] - mean[d];
      n2 += c * c;
    }
    EXPECT_NEAR(pq.norm(static_cast<uint64_t>(i)), std::sqrt(n2), 2e-3 * std::sqrt(n2)) << i;
  }
  const std::vector<float> q = mdci_test::GaussianRows(1, kDim, 1.0f, 2);
  std::vector<double> exact(n), approx(n);
  for (int64_t i = 0; i < n; ++i) {
    double e = 0.0;
    for (int d = 0; d < kDim; ++d) e += q[d] * (keys[i * kDim + d] - mean[d]);
    exact[i] = e;
    approx[i] = pq.ApproxDot(q.data(), static_cast<uint64_t>(i));
  }
  auto corr = [&](int64_t step) {
    double sxy = 0, sxx = 0, syy = 0, sx = 0, sy = 0, k = 0;
    for (int64_t i = 0; i < n; i += step, ++k) {
      sx += exact[i];
      sy += approx[i];
      sxy += exact[i] * approx[i];
      sxx += exact[i] * exact[i];
      syy += approx[i] * approx[i];
    }
    const double cov = sxy / k - sx / k * sy / k;
    return cov / std::sqrt((sxx / k - sx / k * sx / k) * (syy / k - sy / k * sy / k));
  };
  EXPECT_GT(corr(1), 0.85);
  // The long keys, which take the mass, are ranked as well as the rest.
  EXPECT_GT(corr(50), 0.85);
  // The largest exact logits are among the largest approximate ones.
  std::vector<int64_t> by_exact(n), by_approx(n);
  std::iota(by_exact.begin(), by_exact.end(), 0);
  by_approx = by_exact;
  std::sort(by_exact.begin(), by_exact.end(),
            [&](int64_t a, int64_t b) { return exact[a] > exact[b]; });
  std::sort(by_approx.begin(), by_approx.end(),
            [&](int64_t a, int64_t b) { return approx[a] > approx[b]; });
  int found = 0;
  for (int i = 0; i < 10; ++i) {
    found += std::find(by_approx.begin(), by_approx.begin() + 100, by_exact[i]) !=
             by_approx.begin() + 100;
  }
  EXPECT_GE(found, 8) << "corr " << corr(1) << " long keys " << corr(50);
  // An untrained sketch (zero codebooks) gives every row the same estimate.
  PqSketch untrained(kDim, kPage);
  EXPECT_FALSE(untrained.trained());
}

SelectorConfig Config(float pq_factor) { return mdci_test::MdciConfig(kDim, kPage, pq_factor); }

using Built = mdci_test::BuiltSelector;

Built BuildWithInserts(const std::vector<float>& keys, int64_t n, int64_t inserts,
                       float pq_factor) {
  return mdci_test::BuildWithInserts(Config(pq_factor), keys, n, inserts);
}

TEST(PqSketchTest, BadConfigsAndParamsAreRefused) {
  mdci_test::TestPageKeys keys(kDim, kPage, DType::kF16);
  SelectorConfig c = Config(-1.0f);
  EXPECT_EQ(Selector::Create(c, &keys).status().code(), absl::StatusCode::kInvalidArgument);
  c = Config(std::numeric_limits<float>::infinity());
  EXPECT_EQ(Selector::Create(c, &keys).status().code(), absl::StatusCode::kInvalidArgument);
  c = Config(4.0f);
  c.head_dim = 60;  // not a multiple of 8
  auto bad = Selector::Create(c, &keys);
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("multiple of 8"), std::string::npos);
  c = Config(4.0f);
  c.num_query_heads = 65;
  EXPECT_EQ(Selector::Create(c, &keys).status().code(), absl::StatusCode::kInvalidArgument);

  const std::vector<float> k = mdci_test::ClusteredKeys(500, kDim, 8, 0.5f, 2);
  Built b = BuildWithInserts(k, 500, 0, 4.0f);
  const std::vector<float> q = mdci_test::GaussianRows(4, kDim, 1.0f, 1);
  SelectParams sp;
  sp.pq_factor = -2.0f;
  Selection out;
  EXPECT_EQ(b.sel->Select(q.data(), 4, sp, &out).code(), absl::StatusCode::kInvalidArgument);
  // More queries than the scan takes (a direct caller; no config allows
  // it): the tree serves them.
  const std::vector<float> many = mdci_test::GaussianRows(PqSketch::kMaxQueries + 1, kDim, 1.0f, 3);
  SelectParams ok;
  ok.budget_tokens = 64;
  ASSERT_TRUE(b.sel->Select(many.data(), PqSketch::kMaxQueries + 1, ok, &out).ok());
  EXPECT_FALSE(out.pages.empty());
  for (float score : out.scores) EXPECT_FALSE(std::isnan(score));
}

TEST(PqSketchTest, MdciWithTheScanFindsTheMassAndSurvivesAnImage) {
  const int64_t n = 8000, inserts = 40;
  const std::vector<float> keys = mdci_test::ClusteredKeys(n + inserts, kDim, 60, 0.5f, 3);
  Built tree = BuildWithInserts(keys, n, inserts, 0.0f);
  Built pq = BuildWithInserts(keys, n, inserts, 8.0f);
  // The same layout: the codes sit beside the tree.
  ASSERT_EQ(tree.sel->num_pages(), pq.sel->num_pages());
  EXPECT_GT(pq.sel->index_bytes(), tree.sel->index_bytes());
  EXPECT_LT(pq.sel->index_bytes() - tree.sel->index_bytes(),
            static_cast<size_t>(n + inserts) * kDim / 8 + (256 * 32 * 8) + 64 * 1024);
  std::string image;
  ASSERT_TRUE(pq.sel->SaveImage(&image).ok());
  auto loaded = Selector::LoadImage(Config(8.0f), pq.keys.get(), image, pq.sel->num_tokens());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  // An image without the codes (the tree twin's: the same layout, what a
  // daemon before the codes were saved wrote): they are rebuilt from the
  // frames.
  std::string legacy;
  ASSERT_TRUE(tree.sel->SaveImage(&legacy).ok());
  ASSERT_EQ(image.compare(0, legacy.size(), legacy), 0) << "the codes follow the tree";
  auto rebuilt = Selector::LoadImage(Config(8.0f), pq.keys.get(), legacy, pq.sel->num_tokens());
  ASSERT_TRUE(rebuilt.ok()) << rebuilt.status();
  // A codes section of another shape, or cut short, is refused as data loss.
  {
    std::string bad = image;
    bad[legacy.size() + 4] ^= 0x01;  // the section's dim
    EXPECT_EQ(
        Selector::LoadImage(Config(8.0f), pq.keys.get(), bad, pq.sel->num_tokens()).status().code(),
        absl::StatusCode::kDataLoss);
    bad = image.substr(0, image.size() - 7);
    EXPECT_EQ(
        Selector::LoadImage(Config(8.0f), pq.keys.get(), bad, pq.sel->num_tokens()).status().code(),
        absl::StatusCode::kDataLoss);
  }
  const int64_t total = n + inserts;
  const std::vector<float> queries = mdci_test::GaussianRows(4 * 12, kDim, 1.5f, 9);
  double mass_pq = 0.0, mass_exhaustive = 0.0;
  for (int step = 0; step < 12; ++step) {
    std::vector<float> q(&queries[step * 4 * kDim], &queries[(step + 1) * 4 * kDim]);
    // Each query of the group near a different key: they disagree.
    for (int j = 0; j < 4; ++j) {
      for (int c = 0; c < kDim; ++c)
        q[j * kDim + c] += 3.0f * keys[((step * 431 + j * 1997) % n) * kDim + c];
    }
    SelectParams sp;
    sp.budget_tokens = 128;
    Selection a, c, ex;
    {
      const absl::Status st = pq.sel->Select(q.data(), 4, sp, &a);
      ASSERT_TRUE(st.ok()) << st;
    }
    Selection b;
    ASSERT_TRUE((*loaded)->Select(q.data(), 4, sp, &b).ok());
    ASSERT_TRUE((*rebuilt)->Select(q.data(), 4, sp, &c).ok());
    // The image carries the codes: a warm restart selects exactly as before.
    EXPECT_EQ(mdci_test::SelectedPositions(**loaded, b), mdci_test::SelectedPositions(*pq.sel, a))
        << step;
    // Rebuilt from the frames: the same selection up to the codebooks fitted
    // on the frames' order and fp16 keys instead of fp32.
    EXPECT_GE(a.pages.size(), 8u);
    sp.exhaustive = true;
    ASSERT_TRUE(pq.sel->Select(q.data(), 4, sp, &ex).ok());
    mass_pq += mdci_test::MassOf(keys.data(), total, kDim, q.data(), 4,
                                 mdci_test::SelectedPositions(*pq.sel, a));
    mass_exhaustive += mdci_test::MassOf(keys.data(), total, kDim, q.data(), 4,
                                         mdci_test::SelectedPositions(*pq.sel, ex));
    // The same tokens, whichever copy of the codes chose them, but for a few.
    const auto pa = mdci_test::SelectedPositions(*pq.sel, a);
    const auto pc = mdci_test::SelectedPositions(**loaded, c);
    int common = 0;
    for (int32_t p : pa) common += std::count(pc.begin(), pc.end(), p) > 0;
    EXPECT_GE(common, static_cast<int>(pa.size()) * 3 / 4) << step;
  }
  EXPECT_GT(mass_exhaustive, 0.0);
  EXPECT_GT(mass_pq / mass_exhaustive, 0.95) << mass_pq << " vs " << mass_exhaustive;
}

// A session whose first append is tiny: the codebooks fitted on 2 keys are
// refitted from the frames as the context grows, and the scan then finds
// the mass (measured: 0.96 of the exhaustive selection's; 0.51 without the
// refit).
TEST(PqSketchTest, CodebooksFromATinyFirstAppendAreRefittedAsTheContextGrows) {
  const int64_t n = 2, inserts = 6000;
  const std::vector<float> keys = mdci_test::ClusteredKeys(n + inserts, kDim, 60, 0.5f, 5);
  Built grown = BuildWithInserts(keys, n, inserts, 2.0f);
  const int64_t total = n + inserts;
  const std::vector<float> queries = mdci_test::GaussianRows(4 * 10, kDim, 1.5f, 4);
  double mass_grown = 0.0, mass_exact = 0.0;
  for (int step = 0; step < 10; ++step) {
    std::vector<float> q(&queries[step * 4 * kDim], &queries[(step + 1) * 4 * kDim]);
    for (int j = 0; j < 4; ++j) {
      for (int c = 0; c < kDim; ++c) {
        q[j * kDim + c] += 3.0f * keys[((step * 577 + j * 1499) % total) * kDim + c];
      }
    }
    SelectParams sp;
    sp.budget_tokens = 128;
    Selection a, ex;
    ASSERT_TRUE(grown.sel->Select(q.data(), 4, sp, &a).ok());
    sp.exhaustive = true;
    ASSERT_TRUE(grown.sel->Select(q.data(), 4, sp, &ex).ok());
    mass_grown += mdci_test::MassOf(keys.data(), total, kDim, q.data(), 4,
                                    mdci_test::SelectedPositions(*grown.sel, a));
    mass_exact += mdci_test::MassOf(keys.data(), total, kDim, q.data(), 4,
                                    mdci_test::SelectedPositions(*grown.sel, ex));
  }
  EXPECT_GT(mass_grown / mass_exact, 0.9) << mass_grown << " vs exhaustive " << mass_exact;
}

// Every code is the nearest centroid of its key's direction in that
// sub-space, and the lowest-numbered one where centroids coincide: a sample
// with 5 distinct rows seeds 16 centroids on them, so most are duplicates
// (the encoder takes eight keys at a time in a tournament; a scan over the
// centroids picks the first of equals, and so must it). Rows that are not a
// multiple of 8 exercise the last, partial block.
// n keys that repeat `distinct` Gaussian rows, and their placements in
// order, kPage to a page.
struct RepeatedKeys {
  std::vector<float> keys;
  std::vector<Placement> placed;
};
RepeatedKeys RepeatRows(int64_t n, int distinct, uint32_t seed) {
  RepeatedKeys r;
  const std::vector<float> base = mdci_test::GaussianRows(distinct, kDim, 1.0f, seed);
  r.keys.resize(static_cast<size_t>(n) * kDim);
  r.placed.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(&base[(i % distinct) * kDim], kDim, &r.keys[i * kDim]);
    r.placed[i].page = static_cast<uint32_t>(i / kPage);
    r.placed[i].slot = static_cast<uint32_t>(i % kPage);
  }
  return r;
}

TEST(PqSketchTest, EveryCodeIsTheNearestCentroidAndTheFirstOfEquals) {
  for (const int distinct : {5, 1000}) {
    SCOPED_TRACE(distinct);
    const int64_t n = 1003;
    const RepeatedKeys rk = RepeatRows(n, distinct, 17);
    const std::vector<float>& keys = rk.keys;
    PqSketch pq(kDim, kPage);
    pq.Train(keys.data(), n);
    pq.Write(rk.placed, keys.data(), DType::kF32);
    int duplicate_choices = 0;
    for (int64_t i = 0; i < n; ++i) {
      std::vector<double> dir(kDim);
      double n2 = 0.0;
      for (int d = 0; d < kDim; ++d) {
        dir[d] = static_cast<double>(keys[i * kDim + d] - pq.mean()[d]);
        n2 += dir[d] * dir[d];
      }
      for (double& v : dir) v /= std::sqrt(n2);
      for (int sub = 0; sub < pq.subspaces(); ++sub) {
        std::vector<double> dist(PqSketch::kCentroids);
        for (int c = 0; c < PqSketch::kCentroids; ++c) {
          double s = 0.0;
          for (int d = 0; d < PqSketch::kSubDims; ++d) {
            const double t = dir[sub * PqSketch::kSubDims + d] - pq.centroid(sub, c)[d];
            s += t * t;
          }
          dist[c] = s;
        }
        const int got = pq.code(static_cast<uint64_t>(i), sub);
        const double best = *std::min_element(dist.begin(), dist.end());
        ASSERT_LE(dist[got], best + 1e-5) << "row " << i << " sub " << sub;
        for (int c = 0; c < got; ++c) {
          // No lower-numbered centroid that is the same point.
          ASSERT_FALSE(std::equal(pq.centroid(sub, c), pq.centroid(sub, c) + PqSketch::kSubDims,
                                  pq.centroid(sub, got)))
              << "row " << i << " sub " << sub << " took " << got << ", equal to " << c;
        }
        if (distinct == 5 && got > 0) ++duplicate_choices;
      }
    }
    if (distinct == 5) {
      EXPECT_GT(duplicate_choices, 0) << "the ties were never reached";
    }
  }
}

// A decode insert writes one key per call (PqNearest1, the centroids in the
// lanes); a build writes eight at a time (PqNearest8, the keys in the
// lanes). Each key must get the same code either way, ties included (5
// distinct rows: most centroids are duplicates).
TEST(PqSketchTest, KeysWrittenOneAtATimeGetTheCodesOfABlockWrite) {
  for (const int distinct : {5, 1000}) {
    SCOPED_TRACE(distinct);
    const int64_t n = 203;
    const RepeatedKeys rk = RepeatRows(n, distinct, 23);
    PqSketch block(kDim, kPage), single(kDim, kPage);
    block.Train(rk.keys.data(), n);
    single.Train(rk.keys.data(), n);
    block.Write(rk.placed, rk.keys.data(), DType::kF32);
    for (int64_t i = 0; i < n; ++i) {
      single.Write({rk.placed[i]}, &rk.keys[i * kDim], DType::kF32);
    }
    int nonzero = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int sub = 0; sub < block.subspaces(); ++sub) {
        const int want = block.code(static_cast<uint64_t>(i), sub);
        ASSERT_EQ(single.code(static_cast<uint64_t>(i), sub), want)
            << "row " << i << " sub " << sub;
        nonzero += want != 0 ? 1 : 0;
      }
    }
    EXPECT_GT(nonzero, 0) << "every code 0: the comparison shows nothing";
  }
}

}  // namespace
}  // namespace icecache
