#include "server/index/width_calibrator.h"

#include <cmath>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "server/index/owned_page_keys.h"
#include "tests/support/status_matchers.h"
#include "tests/unit/index/index_test_data.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

// A head whose mass ratio grows with the width as 1 - a / w, plus noise:
// the calibrator's logic alone, on a known curve.
double Curve(double a, double w, std::mt19937* rng) {
  std::normal_distribution<double> noise(0.0, 0.005);
  return std::min(1.0, 1.0 - a / w + noise(*rng));
}

std::unique_ptr<WidthCalibrator> Make(CalibratorOptions o) {
  auto c = WidthCalibrator::Create(o, 32, 8.0f);
  EXPECT_THAT(c.status(), IsOk());
  return c.ok() ? std::move(c).value() : nullptr;
}

TEST(WidthCalibratorTest, ConvergesToTheTargetWithinAFewDozenSamples) {
  for (double a : {0.1, 0.4, 1.2}) {  // needs width 2, 8, 24 for 0.95
    std::mt19937 rng(7);
    auto c = Make({});
    ASSERT_NE(c, nullptr);
    int converged_at = -1;
    for (int i = 0; i < 48; ++i) {
      const double w = c->report().width;
      const double r = Curve(a, w, &rng);
      c->Observe({r, r});
      if (converged_at < 0 && 1.0 - a / w >= 0.95) converged_at = i;
    }
    EXPECT_GE(converged_at, 0) << "a " << a;
    EXPECT_LE(converged_at, 24) << "a " << a;
    EXPECT_GE(1.0 - a / c->report().width, 0.95 - 0.01) << "a " << a;
  }
}

// A width that misses by much is raised by its mean's shortfall, not by
// the fixed 1.5: where the mass it misses falls as 1 / width, one step of up
// to 2.25 instead of two. Fewer samples to the target (each a sampling
// interval apart once warm: hundreds of selections), and no wider than the
// fixed steps end. (Single samples far below still take the fixed step, so
// the first raises here are the same.)
TEST(WidthCalibratorTest, AMissByMuchRaisesTheWidthByItsShortfall) {
  for (double a : {0.2, 0.5}) {  // needs width 4, 10 for 0.95
    int samples[2];
    double width[2];
    std::string trace;  // the widths sampled, for a failure's message
    for (int k = 0; k < 2; ++k) {
      trace += k == 0 ? "by the shortfall:" : "; fixed:";
      CalibratorOptions o;
      if (k == 1) o.max_increase = o.increase;  // the fixed step
      auto c = Make(o);
      ASSERT_NE(c, nullptr);
      std::mt19937 rng(7);
      int n = 0;
      for (; n < 100 && 1.0 - a / c->report().width < 0.95 - 1e-9; ++n) {
        const double r = Curve(a, c->report().width, &rng);
        absl::StrAppendFormat(&trace, " %.2f (%.3f)", c->report().width, r);
        c->Observe({r, r});
      }
      samples[k] = n;
      width[k] = c->report().width;
      EXPECT_GE(1.0 - a / width[k], 0.95 - 1e-9) << "a " << a << " k " << k;
    }
    EXPECT_LT(samples[0], samples[1]) << "a " << a << ": " << trace;
    EXPECT_LE(width[0], width[1] * 1.01) << "a " << a << ": " << trace;
  }
  // A mean under the target only by its confidence bound, and a single
  // sample far below, take the fixed step.
  auto c = Make({});
  ASSERT_NE(c, nullptr);
  c->Observe({0.5, 0.5});  // far below (0.15 under): a miss on one sample
  EXPECT_DOUBLE_EQ(c->report().width, 1.5);
  for (double r : {0.99, 0.92, 0.99, 0.92}) c->Observe({r, r});  // mean 0.955, se 0.02
  EXPECT_DOUBLE_EQ(c->report().width, 1.5 * 1.5);
  // Two samples at 0.8 (mean 0.8, no spread): x (1 - 0.8) / 0.05, capped at 2.25.
  c->Observe({0.8, 0.8});
  c->Observe({0.8, 0.8});
  EXPECT_DOUBLE_EQ(c->report().width, 1.5 * 1.5 * 2.25);
}

TEST(WidthCalibratorTest, SettlesAndDoesNotOscillate) {
  std::mt19937 rng(3);
  auto c = Make({});
  ASSERT_NE(c, nullptr);
  for (int i = 0; i < 60; ++i) {
    const double r = Curve(0.4, c->report().width, &rng);
    c->Observe({r, r});
  }
  const int64_t changes_before = c->report().changes;
  double lo = 1e9, hi = 0;
  for (int i = 0; i < 1000; ++i) {
    const double w = c->report().width;
    lo = std::min(lo, w);
    hi = std::max(hi, w);
    const double r = Curve(0.4, w, &rng);
    c->Observe({r, r});
  }
  // At most a few moves in 1000 samples (the floor is retried ever more rarely).
  EXPECT_LE(c->report().changes - changes_before, 6);
  EXPECT_LE(hi / lo, 1.5 * 1.5);
  EXPECT_GE(c->report().mean_ratio, 0.94);
}

// Real steps differ in difficulty: per-sample ratios scatter widely around
// the curve. The calibrator meets the target on average at about the width
// the mean needs, instead of widening on every hard step until none misses.
TEST(WidthCalibratorTest, NoisyStepsSettleNearTheWidthTheMeanNeeds) {
  std::mt19937 rng(5);
  std::normal_distribution<double> noise(0.0, 0.04);
  auto c = Make({});
  ASSERT_NE(c, nullptr);
  const double a = 0.4;  // mean 0.95 at width 8
  double sum = 0;
  int n = 0;
  for (int i = 0; i < 600; ++i) {
    const double w = c->report().width;
    const double r = std::min(1.0, 1.0 - a / w + noise(rng));
    c->Observe({r, r});
    if (i >= 200) {
      sum += 1.0 - a / w;  // the true mean ratio at the width in use
      ++n;
    }
  }
  EXPECT_GE(sum / n, 0.95 - 0.01);
  // Every sample above 0.95 would need 0.4 / w <= 0.05 - 2.5 sd: unreachable
  // below the maximum width (64).
  EXPECT_LE(c->report().width, 8.0 * 1.5 * 1.5);
}

// A width whose samples' mean meets the target but whose spread says the
// mean may well be under it misses once settle_samples samples rest on it
// (confidence_z); the same mean with no spread holds.
TEST(WidthCalibratorTest, AMeanOnTargetWithALargeSpreadMisses) {
  const double spread[] = {0.99, 0.92, 0.99, 0.92};  // mean 0.955, se 0.02
  for (double z : {0.0, 1.0}) {
    CalibratorOptions o;
    o.confidence_z = z;
    auto c = Make(o);
    ASSERT_NE(c, nullptr);
    for (int i = 0; i < 3; ++i) c->Observe({spread[i], spread[i]});
    EXPECT_EQ(c->report().width, 1.0) << "z " << z << ": too few samples to judge the spread";
    c->Observe({spread[3], spread[3]});
    if (z > 0.0) {
      EXPECT_EQ(c->report().width, 1.5) << "z " << z;  // lower bound 0.935 < 0.95
    } else {
      EXPECT_EQ(c->report().width, 1.0) << "z " << z;  // the mean alone holds
    }
  }
  auto steady = Make({});
  ASSERT_NE(steady, nullptr);
  for (int i = 0; i < 8; ++i) steady->Observe({0.955, 0.955});
  EXPECT_EQ(steady->report().width, 1.0);  // no spread: the mean holds
}

// Noisy steps: the confidence bound settles on a width at least as wide as
// the mean alone (never narrower), where the true mean ratio holds the
// target, and it still converges well inside the widest width.
TEST(WidthCalibratorTest, TheConfidenceBoundSettlesNoNarrowerAndHoldsTheTarget) {
  for (int seed : {1, 2, 3}) {
    double true_mean[2], width[2];
    for (int k = 0; k < 2; ++k) {
      std::mt19937 rng(seed);
      std::normal_distribution<double> noise(0.0, 0.03);
      CalibratorOptions o;
      o.confidence_z = k == 0 ? 0.0 : 1.0;
      auto c = Make(o);
      ASSERT_NE(c, nullptr);
      const double a = 0.4;  // mean 0.95 at width 8
      double sum = 0;
      int n = 0;
      for (int i = 0; i < 3000; ++i) {
        const double w = c->report().width;
        const double r = std::min(1.0, 1.0 - a / w + noise(rng));
        c->Observe({r, r});
        if (i >= 300) {
          sum += 1.0 - a / w;
          ++n;
        }
      }
      true_mean[k] = sum / n;
      width[k] = c->report().width;
      EXPECT_EQ(c->report().mode, SelectMode::kTree);
    }
    EXPECT_GE(true_mean[1], 0.95) << "seed " << seed;
    EXPECT_GE(true_mean[1], true_mean[0] - 1e-9) << "seed " << seed;
    EXPECT_GE(width[1], width[0]) << "seed " << seed;
    EXPECT_LE(width[1], 32.0) << "seed " << seed;
  }
}

TEST(WidthCalibratorTest, ComesBackDownWhenTheDataGetsEasier) {
  auto c = Make({});
  ASSERT_NE(c, nullptr);
  for (int i = 0; i < 12; ++i) c->Observe({0.9, 0.9});  // not enough: wider
  EXPECT_GT(c->report().width, 4.0);
  SelectParams p;
  c->Apply(&p);
  EXPECT_EQ(p.field_of_view, static_cast<int>(std::lround(32 * c->report().width)));
  EXPECT_NEAR(p.candidate_factor, 8.0f * c->report().width, 1e-3);
  EXPECT_FALSE(p.exhaustive);
  for (int i = 0; i < 2000; ++i) c->Observe({1.0, 1.0});        // easy data from now on
  EXPECT_EQ(c->report().width, CalibratorOptions{}.min_width);  // below where it started
  EXPECT_EQ(c->report().mode, SelectMode::kTree);
}

// Heads start at width 1 (the selector's own) and go below it, down to
// min_width and no further, only on samples comfortably above the target; a
// head on target at width 1 stays there.
TEST(WidthCalibratorTest, StartsAtOneAndGoesNarrowerOnlyWhenComfortable) {
  const CalibratorOptions d;
  ASSERT_LT(d.min_width, 1.0);
  ASSERT_EQ(d.start_width, 1.0);
  auto easy = Make({});
  ASSERT_NE(easy, nullptr);
  EXPECT_EQ(easy->report().width, 1.0);
  SelectParams p;
  easy->Apply(&p);
  EXPECT_EQ(p.field_of_view, 32);
  EXPECT_FLOAT_EQ(p.candidate_factor, 8.0f);
  for (int i = 0; i < 64; ++i) easy->Observe({0.995, 0.995});
  EXPECT_EQ(easy->report().width, d.min_width);
  easy->Apply(&p);
  EXPECT_EQ(p.field_of_view, 16);
  EXPECT_FLOAT_EQ(p.candidate_factor, 4.0f);
  EXPECT_GE(easy->state().floor, d.min_width);

  auto on_target = Make({});
  ASSERT_NE(on_target, nullptr);
  // Above the target but within the hysteresis (0.95 + 0.02): no reason to
  // narrow, none to widen.
  for (int i = 0; i < 64; ++i) on_target->Observe({0.96, 0.96});
  EXPECT_EQ(on_target->report().width, 1.0);
  EXPECT_EQ(on_target->report().changes, 0);

  CalibratorOptions bad;
  bad.start_width = 0.25;
  EXPECT_THAT(WidthCalibrator::Create(bad, 32, 8.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("start_width")));
}

// One step of a simulated head: select with what Apply says, report a cost,
// and when a measurement is due, observe `ratio` (the tree's) or 1 (exact).
struct SimHead {
  WidthCalibrator* c;
  double tree_ns_per_width;  // the tree's cost grows with the width
  double exact_ns;
  int64_t sampled = 0;
  void Step(double tree_ratio) {
    SelectParams p;
    c->Apply(&p);
    const double w = p.candidate_factor / 8.0;
    const auto cost = static_cast<int64_t>(p.exhaustive ? exact_ns : tree_ns_per_width * w);
    if (!c->ShouldSample(p, cost)) return;
    c->Taken();
    ++sampled;
    QualitySample q{p.exhaustive ? 1.0 : tree_ratio, 1.0};
    q.reference_ns = static_cast<int64_t>(exact_ns);
    c->Observe(q);
  }
};

TEST(WidthCalibratorTest, FallsBackToExactWhenTheWidestStillMisses) {
  CalibratorOptions o;
  o.max_width = 8.0;
  o.reprobe_steps = 100;
  auto c = Make(o);
  ASSERT_NE(c, nullptr);
  SimHead h{c.get(), 10.0, 1e9};             // the tree is cheap: only the width bound stops it
  for (int i = 0; i < 40; ++i) h.Step(0.5);  // never enough
  CalibratorReport r = c->report();
  EXPECT_EQ(r.mode, SelectMode::kExact);
  EXPECT_EQ(r.width, 8.0);
  EXPECT_EQ(r.fallbacks, 1);
  SelectParams p;
  c->Apply(&p);
  EXPECT_TRUE(p.exhaustive);
  // Exact selections are never sampled: they are the reference.
  EXPECT_FALSE(c->ShouldSample(p, 1000));
}

// Two simulated heads step for step: `a` restarted from `b`'s state after
// `before` steps (a warm restart) must go on exactly as `b` does.
void ExpectRestoredGoesOnAlike(const CalibratorOptions& o, double exact_ns, int before, int after,
                               double (*ratio)(double width, int step),
                               SelectMode mode_at_restart) {
  auto b = Make(o);
  ASSERT_NE(b, nullptr);
  SimHead hb{b.get(), 10.0, exact_ns};
  for (int i = 0; i < before; ++i) hb.Step(ratio(b->report().width, i));
  ASSERT_EQ(b->report().mode, mode_at_restart);
  ASSERT_GT(b->report().width, 1.0) << "the state shows nothing";
  auto a = Make(o);
  ASSERT_NE(a, nullptr);
  ASSERT_THAT(a->Restore(b->state()), IsOk());
  SimHead ha{a.get(), 10.0, exact_ns};
  for (int i = before; i < before + after; ++i) {
    SelectParams pa, pb;
    a->Apply(&pa);
    b->Apply(&pb);
    ASSERT_EQ(pa.field_of_view, pb.field_of_view) << "step " << i;
    ASSERT_EQ(pa.candidate_factor, pb.candidate_factor) << "step " << i;
    ASSERT_EQ(pa.exhaustive, pb.exhaustive) << "step " << i;
    ha.Step(ratio(a->report().width, i));
    hb.Step(ratio(b->report().width, i));
  }
  const CalibratorReport ra = a->report(), rb = b->report();
  EXPECT_EQ(ra.width, rb.width);
  EXPECT_EQ(ra.mode, rb.mode);
  EXPECT_EQ(ra.steps, rb.steps);
  EXPECT_EQ(ra.samples, rb.samples);
  EXPECT_EQ(ra.changes, rb.changes);
  EXPECT_EQ(ra.exact_steps, rb.exact_steps);
  EXPECT_EQ(ra.fallbacks, rb.fallbacks);
  EXPECT_EQ(ra.reprobes, rb.reprobes);
  EXPECT_EQ(ra.sample_interval, rb.sample_interval);
  EXPECT_EQ(ra.mean_ratio, rb.mean_ratio);
}

TEST(WidthCalibratorTest, ARestoredStateGoesOnExactlyAsTheOriginal) {
  // Settled on the tree at a raised width, then past the warm-up.
  ExpectRestoredGoesOnAlike(
      {}, 1e6, 300, 300, [](double w, int) { return 1.0 - 0.4 / w; }, SelectMode::kTree);
  // Fallen back to exact (the widest misses), waiting to re-probe: the wait
  // and its doubling carry over.
  CalibratorOptions o;
  o.max_width = 8.0;
  o.reprobe_steps = 50;
  ExpectRestoredGoesOnAlike(
      o, 1e6, 120, 400, [](double, int) { return 0.5; }, SelectMode::kExact);
}

TEST(WidthCalibratorTest, RestoreRefusesStatesOutOfRange) {
  auto c = Make({});
  ASSERT_NE(c, nullptr);
  for (int i = 0; i < 12; ++i) c->Observe({0.9, 0.9});
  const CalibratorState good = c->state();
  std::vector<std::pair<const char*, CalibratorState>> bad;
  auto with = [&](const char* what, auto edit) {
    CalibratorState s = good;
    edit(s);
    bad.push_back({what, s});
  };
  with("width", [](CalibratorState& s) { s.width = 1e9; });
  with("width", [](CalibratorState& s) { s.width = std::nan(""); });
  with("width", [](CalibratorState& s) { s.width = 0.25; });
  with("floor", [](CalibratorState& s) { s.floor = 100.0; });
  with("steps", [](CalibratorState& s) { s.steps = -1; });
  with("samples", [](CalibratorState& s) { s.samples = -5; });
  with("last_change_step", [](CalibratorState& s) { s.last_change_step = s.steps + 1; });
  with("release_needed", [](CalibratorState& s) { s.release_needed = 0; });
  with("reprobe_wait", [](CalibratorState& s) { s.reprobe_wait = 1 << 30; });
  with("reprobe_wait", [](CalibratorState& s) {
    s.mode = SelectMode::kExact;
    s.reprobe_wait = 0;
  });
  with("mean_at_width", [](CalibratorState& s) { s.mean_at_width = INFINITY; });
  with("var_at_width", [](CalibratorState& s) { s.var_at_width = -0.5; });
  with("exact_cost", [](CalibratorState& s) { s.exact_cost = -1.0; });
  with("since", [](CalibratorState& s) { s.schedule.since = s.schedule.steps + 1; });
  with("select_ns", [](CalibratorState& s) { s.schedule.select_ns = std::nan(""); });
  for (const auto& [what, s] : bad) {
    EXPECT_THAT(c->Restore(s),
                StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr(what)));
    EXPECT_EQ(c->report().width, good.width) << what << ": a refused state changes nothing";
  }
  EXPECT_THAT(c->Restore(good), IsOk());
}

TEST(WidthCalibratorTest, FallsBackWhenTheNeededWidthCostsAsMuchAsTheExactScan) {
  // Cost 100 per unit of width, exact 1000: widths past ~6.7 cost more than
  // exact once widened again (x1.5). a = 1.2 needs width 24 (cost 2400).
  std::mt19937 rng(1);
  auto hard = Make({});
  ASSERT_NE(hard, nullptr);
  SimHead h{hard.get(), 100.0, 1000.0};
  for (int i = 0; i < 64; ++i) h.Step(Curve(1.2, hard->report().width, &rng));
  EXPECT_EQ(hard->report().mode, SelectMode::kExact);
  EXPECT_LT(hard->report().width * 100.0, 1000.0);  // left before the tree cost more
  EXPECT_LE(hard->report().last_change_step, 40);   // within a few dozen steps
  // a = 0.1 needs width 2 (cost 200 < 1000): the tree pays and stays.
  auto easy = Make({});
  ASSERT_NE(easy, nullptr);
  SimHead e{easy.get(), 100.0, 1000.0};
  for (int i = 0; i < 64; ++i) e.Step(Curve(0.1, easy->report().width, &rng));
  EXPECT_EQ(easy->report().mode, SelectMode::kTree);
  EXPECT_EQ(easy->report().fallbacks, 0);
  EXPECT_GE(1.0 - 0.1 / easy->report().width, 0.95 - 0.01);
}

// Timed costs with spikes (a first touch of fresh memory inside a
// selection's thread CPU time): a head whose first selection and one in 97
// cost 200x the rest keeps its cheap tree; the spikes do not make it look as
// costly as the exact scan.
TEST(WidthCalibratorTest, CostSpikesDoNotSendACheapHeadToExactSelection) {
  auto c = Make({});
  ASSERT_NE(c, nullptr);
  for (int i = 0; i < 2000; ++i) {
    SelectParams p;
    c->Apply(&p);
    const int64_t cost = p.exhaustive ? 1000 : (i % 97 == 0 ? 20000 : 100);
    if (!c->ShouldSample(p, cost)) continue;
    c->Taken();
    QualitySample q{0.99, 1.0};
    q.reference_ns = 1000;
    c->Observe(q);
  }
  const CalibratorReport r = c->report();
  EXPECT_EQ(r.mode, SelectMode::kTree);
  EXPECT_EQ(r.fallbacks, 0);
  EXPECT_LT(r.tree_cost_ns, 300.0);  // at most a spike's capped share above 100
  EXPECT_NEAR(r.exact_cost_ns, 1000.0, 1.0);
}

TEST(WidthCalibratorTest, ReprobesEverMoreRarelyWhileTheTreeDoesNotPay) {
  CalibratorOptions o;
  o.reprobe_steps = 64;
  o.max_reprobe_steps = 4096;
  auto c = Make(o);
  ASSERT_NE(c, nullptr);
  SimHead h{c.get(), 100.0, 1000.0};
  std::vector<int64_t> probe_at;
  int64_t last_probes = 0;
  for (int i = 0; i < 20000; ++i) {
    h.Step(0.7);  // the tree misses at every width
    if (c->report().reprobes != last_probes) {
      last_probes = c->report().reprobes;
      probe_at.push_back(i);
    }
  }
  const CalibratorReport r = c->report();
  EXPECT_EQ(r.mode, SelectMode::kExact);
  // Waits 64, 128, ..., 4096, 4096, ...: about 10 probes in 20000 steps.
  ASSERT_GE(probe_at.size(), 4u);
  EXPECT_LE(probe_at.size(), 12u);
  for (size_t i = 2; i < probe_at.size(); ++i) {
    EXPECT_GE(probe_at[i] - probe_at[i - 1], probe_at[i - 1] - probe_at[i - 2]) << i;
  }
  EXPECT_EQ(r.fallbacks, static_cast<int64_t>(probe_at.size()) + 1);
  // Almost every selection was exact; probes cost a few tree steps each.
  EXPECT_GE(r.exact_steps, 20000 - 16 - 8 * static_cast<int64_t>(probe_at.size()));
}

TEST(WidthCalibratorTest, AReprobeThatFindsTheTreePaysAgainStaysOnTheTree) {
  CalibratorOptions o;
  o.reprobe_steps = 64;
  auto c = Make(o);
  ASSERT_NE(c, nullptr);
  SimHead h{c.get(), 100.0, 1000.0};
  std::mt19937 rng(2);
  for (int i = 0; i < 48; ++i) h.Step(Curve(1.2, c->report().width, &rng));
  ASSERT_EQ(c->report().mode, SelectMode::kExact);
  // The data becomes easy: the next probe sees the tree meet the target.
  for (int i = 0; i < 200; ++i) h.Step(Curve(0.01, c->report().width, &rng));
  const CalibratorReport r = c->report();
  EXPECT_EQ(r.mode, SelectMode::kTree);
  EXPECT_EQ(r.fallbacks, 1);
  EXPECT_EQ(r.reprobes, 1);
}

TEST(WidthCalibratorTest, SteadySamplingStaysWithinTheShareOfSelectionCost) {
  CalibratorOptions o;
  o.warmup_samples = 8;
  o.warmup_every = 1;
  o.sample_every = 4;
  o.max_sample_every = 1024;
  o.sample_share = 0.05;
  o.min_width = 1.0;  // the cost below is the cost at width 1: it stays there
  auto c = Make(o);
  ASSERT_NE(c, nullptr);
  // The tree meets the target at width 1: 100 per selection, 4000 per reference.
  SimHead h{c.get(), 100.0, 4000.0};
  for (int i = 0; i < 8; ++i) h.Step(0.99);
  EXPECT_EQ(h.sampled, 8);  // warm-up: every step
  h.sampled = 0;
  const int kSteps = 40000;
  for (int i = 0; i < kSteps; ++i) h.Step(0.99);
  EXPECT_EQ(c->report().sample_interval, 800);  // 4000 / (0.05 x 100)
  const double overhead = h.sampled * 4000.0 / (kSteps * 100.0);
  EXPECT_LE(overhead, 0.05);
  EXPECT_GE(overhead, 0.04);
  // A reference 1000 times dearer than the selection: the floor rate wins.
  auto floor = Make(o);
  ASSERT_NE(floor, nullptr);
  SimHead f{floor.get(), 100.0, 1e5};
  for (int i = 0; i < 4096 + 8; ++i) f.Step(0.99);
  EXPECT_EQ(floor->report().sample_interval, 1024);
  EXPECT_EQ(f.sampled, 8 + 4);
}

// A head that meets the target at width 1 for `easy` steps, then needs
// width 8 (1 - 0.4 / w). Returns the step (counted from the change) at
// which the width first met the target (-1: never).
int StepsToMeetAfterHardening(const CalibratorOptions& o, int easy, int hard) {
  auto c = Make(o);
  if (c == nullptr) return -2;
  // A reference 10^4 times a selection: the steady interval is the floor rate.
  SimHead h{c.get(), 100.0, 1e6};
  for (int i = 0; i < easy; ++i) h.Step(0.99);
  for (int i = 0; i < hard; ++i) {
    const double w = c->report().width;
    if (1.0 - 0.4 / w >= 0.95) return i;
    h.Step(1.0 - 0.4 / w);
  }
  return -1;
}

TEST(WidthCalibratorTest, AFreshWidthsMissIsDecidedAtTheConfirmInterval) {
  CalibratorOptions o;
  o.warmup_samples = 8;
  o.min_width = 1.0;
  o.max_sample_every = 512;
  o.max_increase = o.increase;  // fixed steps: the misses this test counts
  // The data hardens after the warm-up. Width 8 is six raises of 1.5x. At
  // widths 1 and 1.5 one sample is a miss (far_below); at the next four a
  // miss needs two samples (miss_samples): the first at the steady
  // interval, the second confirm_every selections later.
  const int kSteady = 512;
  const int on = StepsToMeetAfterHardening(o, 600, 8192);
  EXPECT_GE(on, 0);
  EXPECT_LE(on, 6 * (kSteady + o.confirm_every) + kSteady);
  o.confirm_every = 0;  // off: both samples at the steady interval
  const int off = StepsToMeetAfterHardening(o, 600, 8192);
  EXPECT_GE(off, on + 3 * kSteady) << "on " << on;
}

TEST(WidthCalibratorTest, TheWarmUpSamplesOneSelectionInWarmupEvery) {
  CalibratorOptions o;
  o.warmup_samples = 5;
  o.warmup_every = 3;
  o.sample_every = 64;
  auto c = Make(o);
  ASSERT_NE(c, nullptr);
  std::vector<int> sampled;
  SelectParams p;
  for (int i = 0; i < 64; ++i) {
    c->Apply(&p);
    if (!c->ShouldSample(p, 100)) continue;
    c->Taken();
    sampled.push_back(i);
    QualitySample q{0.99, 1.0};
    q.reference_ns = 1000;
    c->Observe(q);
  }
  // The first at once, then every third; once warm, sample_every apart.
  EXPECT_THAT(sampled, ::testing::ElementsAre(0, 3, 6, 9, 12));
  o.warmup_every = 0;
  EXPECT_THAT(WidthCalibrator::Create(o, 32, 8.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("warmup_every")));
}

TEST(WidthCalibratorTest, ADueSampleStaysDueUntilTaken) {
  CalibratorOptions o;
  o.warmup_samples = 1;
  auto c = Make(o);
  ASSERT_NE(c, nullptr);
  SelectParams p;
  c->Apply(&p);
  EXPECT_TRUE(c->ShouldSample(p, 100));
  EXPECT_TRUE(c->ShouldSample(p, 100));  // not taken (a busy sampler): still due
  c->Taken();
  EXPECT_FALSE(c->ShouldSample(p, 100));
}

// The ranking duel: paired samples (this ranking's ratio, the other one's on
// the same step); the head switches when the other's moving mean gain
// exceeds the margin on enough samples, and each switch doubles the margin
// the next one needs.
CalibratorOptions Duel() {
  CalibratorOptions o;
  o.ranking_trial_samples = 8;
  return o;
}

TEST(WidthCalibratorTest, TheRankingDuelSwitchesToTheBetterRankingAndBack) {
  auto c = Make(Duel());
  ASSERT_NE(c, nullptr);
  SelectParams p;
  c->Apply(&p);
  EXPECT_EQ(p.ranking, DescentRanking::kLoudest);
  ASSERT_EQ(c->TrialRanking(), DescentRanking::kNormalized);
  const int n = Duel().ranking_trial_samples;
  auto paired = [&](double ratio, double other) {
    QualitySample q{ratio, ratio};
    q.trial_mass_ratio = other;
    c->Observe(q);
  };
  for (int i = 0; i + 1 < n; ++i) {
    paired(0.90, 0.96);
    ASSERT_EQ(c->report().ranking_switches, 0) << "sample " << i;
  }
  const double width_before = c->report().width;
  paired(0.90, 0.96);
  CalibratorReport r = c->report();
  EXPECT_EQ(r.ranking_switches, 1);
  EXPECT_EQ(r.ranking, DescentRanking::kNormalized);
  EXPECT_EQ(r.trial_samples, n);
  EXPECT_EQ(r.trial_gain, 0.0);  // starts over against the new ranking
  c->Apply(&p);
  EXPECT_EQ(p.ranking, DescentRanking::kNormalized);
  EXPECT_EQ(c->TrialRanking(), DescentRanking::kLoudest);  // the duel goes on
  // The deciding sample is the new ranking's first, at the same width: 0.96
  // meets the target, so the width did not move on it; the floor stays.
  EXPECT_EQ(r.width, width_before);
  EXPECT_EQ(c->state().at_width, 1);
  EXPECT_GT(c->state().floor, CalibratorOptions{}.min_width);
  // Later steps favour the loudest ranking by 0.015: past the first margin,
  // not the doubled one, so no switch back.
  for (int i = 0; i < 4 * n; ++i) paired(0.950, 0.965);
  EXPECT_EQ(c->report().ranking_switches, 1);
  // By 0.07: switched back within n more samples (the moving mean crosses
  // the doubled margin).
  int k = 0;
  for (; k < n && c->report().ranking_switches == 1; ++k) paired(0.90, 0.97);
  EXPECT_EQ(c->report().ranking_switches, 2);
  EXPECT_LE(k, n);
  EXPECT_EQ(c->report().ranking, DescentRanking::kLoudest);
  // The third switch needs a gain above 0.04.
  for (int i = 0; i < 4 * n; ++i) paired(0.90, 0.935);
  EXPECT_EQ(c->report().ranking_switches, 2);
}

TEST(WidthCalibratorTest, TheRankingDuelWithinTheMarginKeepsTheBase) {
  CalibratorOptions o = Duel();
  o.base_ranking = DescentRanking::kNormalized;
  auto c = Make(o);
  ASSERT_NE(c, nullptr);
  ASSERT_EQ(c->TrialRanking(), DescentRanking::kLoudest);
  for (int i = 0; i < 6 * o.ranking_trial_samples; ++i) {
    QualitySample q{0.96, 0.96};
    q.trial_mass_ratio = 0.96 + 0.5 * o.ranking_margin;  // better, but not by the margin
    c->Observe(q);
  }
  EXPECT_EQ(c->report().ranking_switches, 0);
  EXPECT_EQ(c->report().trial_samples, 6 * o.ranking_trial_samples);
  EXPECT_NEAR(c->report().trial_gain, 0.5 * o.ranking_margin, 1e-12);
  SelectParams p;
  c->Apply(&p);
  EXPECT_EQ(p.ranking, DescentRanking::kNormalized);
  // Samples without the other ranking's ratio never count toward a switch.
  o.base_ranking = DescentRanking::kLoudest;
  auto d = Make(o);
  ASSERT_NE(d, nullptr);
  for (int i = 0; i < 3 * o.ranking_trial_samples; ++i) d->Observe({0.96, 0.96});
  EXPECT_EQ(d->report().trial_samples, 0);
  EXPECT_EQ(d->TrialRanking(), DescentRanking::kNormalized);
  // Off: no duel at all.
  o.ranking_trial_samples = 0;
  auto off = Make(o);
  ASSERT_NE(off, nullptr);
  EXPECT_EQ(off->TrialRanking(), std::nullopt);
}

TEST(WidthCalibratorTest, TheRankingDuelSurvivesARestore) {
  auto c = Make(Duel());
  ASSERT_NE(c, nullptr);
  for (int i = 0; i < 11; ++i) {
    QualitySample q{0.9, 0.9};
    q.trial_mass_ratio = 0.95;
    c->Observe(q);
  }
  CalibratorState s = c->state();
  EXPECT_EQ(s.ranking_switches, 1);
  EXPECT_EQ(s.trial_since, 3);
  EXPECT_EQ(s.trial_needed, Duel().ranking_trial_samples);
  auto d = Make(Duel());
  ASSERT_NE(d, nullptr);
  ASSERT_THAT(d->Restore(s), IsOk());
  EXPECT_EQ(d->state().trial_since, 3);
  EXPECT_EQ(d->report().ranking, DescentRanking::kNormalized);
  EXPECT_EQ(d->report().trial_gain, c->report().trial_gain);
  // An older snapshot (no ranking): the calibrator's base ranking.
  s.ranking = DescentRanking::kSelector;
  CalibratorOptions o = Duel();
  o.base_ranking = DescentRanking::kNormalized;
  auto e = Make(o);
  ASSERT_NE(e, nullptr);
  ASSERT_THAT(e->Restore(s), IsOk());
  EXPECT_EQ(e->report().ranking, DescentRanking::kNormalized);
  EXPECT_EQ(e->state().trial_needed, o.ranking_trial_samples);
  s.ranking = static_cast<DescentRanking>(7);
  EXPECT_THAT(e->Restore(s),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("ranking")));
  s.ranking = DescentRanking::kLoudest;
  s.trial_gain = std::nan("");
  EXPECT_THAT(e->Restore(s),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("trial_gain")));
  s.trial_gain = 0.0;
  s.trial_since = s.trial_n + 1;
  EXPECT_THAT(e->Restore(s),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("trial_since")));
}

TEST(WidthCalibratorTest, RejectsBadOptions) {
  CalibratorOptions o;
  o.target_ratio = 1.5;
  EXPECT_THAT(WidthCalibrator::Create(o, 32, 8.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  o = {};
  o.decrease = 1.0;
  EXPECT_THAT(WidthCalibrator::Create(o, 32, 8.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(WidthCalibrator::Create({}, 0, 8.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  o = {};
  o.max_sample_every = o.sample_every - 1;
  EXPECT_THAT(
      WidthCalibrator::Create(o, 32, 8.0f).status(),
      StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("max_sample_every")));
  o = {};
  o.exact_cost_ratio = -1.0;
  EXPECT_THAT(
      WidthCalibrator::Create(o, 32, 8.0f).status(),
      StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("exact_cost_ratio")));
  o = {};
  o.max_increase = o.increase - 0.1;  // under the fixed step
  EXPECT_THAT(WidthCalibrator::Create(o, 32, 8.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("max_increase")));
  o = {};
  o.confirm_every = -1;
  EXPECT_THAT(WidthCalibrator::Create(o, 32, 8.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("confirm_every")));
  o = {};
  o.ranking_trial_samples = -1;
  EXPECT_THAT(
      WidthCalibrator::Create(o, 32, 8.0f).status(),
      StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("ranking_trial_samples")));
  o = {};
  o.ranking_margin = std::nan("");
  EXPECT_THAT(WidthCalibrator::Create(o, 32, 8.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("ranking_margin")));
  o = {};
  o.ranking_window = 0;
  EXPECT_THAT(WidthCalibrator::Create(o, 32, 8.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("ranking_window")));
  o = {};
  o.method_trial_steps = 0;
  EXPECT_THAT(
      WidthCalibrator::Create(o, 32, 8.0f).status(),
      StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("method_trial_steps")));
  o = {};
  o.max_method_trial_steps = o.method_trial_steps - 1;
  EXPECT_THAT(
      WidthCalibrator::Create(o, 32, 8.0f).status(),
      StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("max_method_trial_steps")));
  o = {};
  o.base_ranking = DescentRanking::kSelector;
  EXPECT_THAT(WidthCalibrator::Create(o, 32, 8.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("base_ranking")));
  o = {};
  o.max_reprobe_steps = o.reprobe_steps - 1;
  EXPECT_THAT(WidthCalibrator::Create(o, 32, 8.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// The real selector on the realistic generator: starting from a narrow
// width, the sampled ratio reaches the target.
TEST(WidthCalibratorTest, RealMdciReachesTheTargetOnSampledSteps) {
  const int kG = 4;
  testing::HeadData h = testing::MakeSyntheticHead(8192, kG, 40, 11);
  ASSERT_GT(h.n, 0);
  SelectorConfig cfg;
  cfg.kind = SelectorKind::kMdci;
  cfg.head_dim = h.dim;
  cfg.dtype = DType::kF32;
  cfg.num_query_heads = kG;
  cfg.mdci.field_of_view = 2;  // deliberately too narrow
  cfg.mdci.candidate_factor = 1.0f;
  auto frames = OwnedPageKeys::ForSelector(cfg);
  ASSERT_THAT(frames.status(), IsOk());
  auto made = MdciSelector::Create(cfg, frames->get());
  ASSERT_THAT(made.status(), IsOk());
  MdciSelector& sel = **made;
  std::vector<Placement> pl;
  ASSERT_THAT(sel.Build(h.keys.data(), h.n, &pl), IsOk());
  ASSERT_THAT((*frames)->Apply(pl, h.keys.data()), IsOk());
  CalibratorOptions o;
  o.target_ratio = 0.95;
  o.warmup_samples = 40;
  o.warmup_every = 1;
  auto cal = WidthCalibrator::Create(o, cfg.mdci.field_of_view, cfg.mdci.candidate_factor);
  ASSERT_THAT(cal.status(), IsOk());
  double first = -1, last_mean = 0;
  for (int step = 0; step < 40; ++step) {
    SelectParams p;
    p.budget_tokens = 128;
    (*cal)->Apply(&p);
    Selection s;
    ASSERT_THAT(sel.Select(h.query(step), kG, p, &s), IsOk());
    ASSERT_TRUE((*cal)->ShouldSample(p, 0));  // warm-up: every step
    (*cal)->Taken();
    auto q = MeasureSelection(sel, h.query(step), kG, p, s);
    ASSERT_THAT(q.status(), IsOk());
    EXPECT_LE(q->mass_ratio, 1.05);  // greedy pages of unequal fill
    if (first < 0) first = q->mass_ratio;
    if (step >= 30) last_mean += q->mass_ratio / 10;
    (*cal)->Observe(*q);
  }
  EXPECT_GT((*cal)->report().width, 1.0);
  EXPECT_GE(last_mean, 0.95 - 0.02) << "first sample " << first;
}

// A selector that scans its product-quantised codes (MdciParams::pq_factor)
// is calibrated through the scan's factor: Apply scales it with the width,
// and the sampled ratio reaches the target from a factor far too small.
TEST(WidthCalibratorTest, TheScansFactorIsCalibratedLikeTheTreesWidth) {
  const int kG = 4;
  testing::HeadData h = testing::MakeSyntheticHead(8192, kG, 40, 11);
  ASSERT_GT(h.n, 0);
  ASSERT_EQ(h.dim % 8, 0);
  SelectorConfig cfg;
  cfg.kind = SelectorKind::kMdci;
  cfg.head_dim = h.dim;
  cfg.dtype = DType::kF32;
  cfg.num_query_heads = kG;
  cfg.mdci.min_candidate_pages = 1;
  cfg.mdci.pq_factor = 0.25f;  // deliberately too few pages scored exactly
  auto frames = OwnedPageKeys::ForSelector(cfg);
  ASSERT_THAT(frames.status(), IsOk());
  auto made = MdciSelector::Create(cfg, frames->get());
  ASSERT_THAT(made.status(), IsOk());
  MdciSelector& sel = **made;
  std::vector<Placement> pl;
  ASSERT_THAT(sel.Build(h.keys.data(), h.n, &pl), IsOk());
  ASSERT_THAT((*frames)->Apply(pl, h.keys.data()), IsOk());
  CalibratorOptions o;
  o.target_ratio = 0.95;
  o.warmup_samples = 40;
  o.warmup_every = 1;
  o.exact_cost_ratio = 0;  // the cost does not decide here: the ratio does
  EXPECT_THAT(WidthCalibrator::Create(o, 32, 8.0f, -1.0f).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  auto cal = WidthCalibrator::Create(o, cfg.mdci.field_of_view, cfg.mdci.candidate_factor,
                                     cfg.mdci.pq_factor);
  ASSERT_THAT(cal.status(), IsOk());
  EXPECT_FALSE((*cal)->TrialRanking().has_value());
  double first = -1, last_mean = 0;
  for (int step = 0; step < 40; ++step) {
    SelectParams p;
    p.budget_tokens = 128;
    (*cal)->Apply(&p);
    EXPECT_FLOAT_EQ(p.pq_factor, 0.25f * static_cast<float>((*cal)->report().width));
    Selection s;
    ASSERT_THAT(sel.Select(h.query(step), kG, p, &s), IsOk());
    ASSERT_TRUE((*cal)->ShouldSample(p, 0));
    (*cal)->Taken();
    auto q = MeasureSelection(sel, h.query(step), kG, p, s);
    ASSERT_THAT(q.status(), IsOk());
    if (first < 0) first = q->mass_ratio;
    if (step >= 30) last_mean += q->mass_ratio / 10;
    (*cal)->Observe(*q);
  }
  EXPECT_LT(first, 0.95);
  EXPECT_GT((*cal)->report().width, 1.0);
  EXPECT_GT((*cal)->report().pq_factor, 0.25f);
  EXPECT_GE(last_mean, 0.95 - 0.02) << "first sample " << first;
}

// An mdci selector built on one head of `h`, with its frames.
struct BuiltMdci {
  std::unique_ptr<OwnedPageKeys> frames;
  std::unique_ptr<MdciSelector> sel;
};

BuiltMdci BuildMdci(const testing::HeadData& h, int fov, float factor, bool calibrated_rest = true,
                    bool normalized_descent = false, float pq_factor = 0.0f) {
  BuiltMdci b;
  SelectorConfig cfg;
  cfg.kind = SelectorKind::kMdci;
  cfg.head_dim = h.dim;
  cfg.dtype = DType::kF32;
  cfg.num_query_heads = h.num_queries;
  cfg.mdci.field_of_view = fov;
  cfg.mdci.candidate_factor = factor;
  cfg.mdci.calibrated_rest = calibrated_rest;
  cfg.mdci.normalized_descent = normalized_descent;
  cfg.mdci.pq_factor = pq_factor;
  auto frames = OwnedPageKeys::ForSelector(cfg);
  EXPECT_THAT(frames.status(), IsOk());
  if (!frames.ok()) return b;
  auto made = MdciSelector::Create(cfg, frames->get());
  EXPECT_THAT(made.status(), IsOk());
  if (!made.ok()) return b;
  std::vector<Placement> pl;
  EXPECT_THAT((*made)->Build(h.keys.data(), h.n, &pl), IsOk());
  EXPECT_THAT((*frames)->Apply(pl, h.keys.data()), IsOk());
  b.frames = std::move(frames).value();
  b.sel = std::move(made).value();
  return b;
}

// The exact fallback's selection is the reference itself, at both
// granularities.
TEST(WidthCalibratorTest, ExhaustiveSelectionIsTheExactReference) {
  const int kG = 4;
  testing::HeadData h = testing::MakeSyntheticHead(4096, kG, 4, 5);
  ASSERT_GT(h.n, 0);
  BuiltMdci b = BuildMdci(h, 2, 1.0f);
  ASSERT_NE(b.sel, nullptr);
  for (Granularity g : {Granularity::kPage, Granularity::kToken}) {
    for (int step = 0; step < 4; ++step) {
      SelectParams p;
      p.budget_tokens = 128;
      p.granularity = g;
      p.exhaustive = true;
      Selection s;
      ASSERT_THAT(b.sel->Select(h.query(step), kG, p, &s), IsOk());
      auto q = MeasureSelection(*b.sel, h.query(step), kG, p, s);
      ASSERT_THAT(q.status(), IsOk());
      EXPECT_NEAR(q->mass_ratio, 1.0, 1e-4) << "granularity " << static_cast<int>(g);
      EXPECT_NEAR(q->topk_recall, 1.0, 1e-9);
      EXPECT_EQ(s.keys_touched, static_cast<uint64_t>(h.n));  // every key, no descent
    }
  }
}

// A family on which the tree misses at the default width and widening does
// not pay: the calibrated selections end at the target anyway (the exact
// fallback). Costs are the keys touched (the selection's exact dot products
// and representatives; the reference scans every key): deterministic. The
// tree misses here with its rest estimate uncorrected
// (MdciParams::calibrated_rest off; with it on, it meets the target at once).
TEST(WidthCalibratorTest, CalibratedSelectionReachesTheTargetWhereTheTreeMisses) {
  const int kG = 4, kSteps = 64;
  testing::HeadData h = testing::MakeSyntheticHead(16384, kG, kSteps, 3, "heavy-tailed-norms");
  ASSERT_GT(h.n, 0);
  BuiltMdci b = BuildMdci(h, 32, 8.0f, /*calibrated_rest=*/false);
  ASSERT_NE(b.sel, nullptr);
  auto cal = WidthCalibrator::Create({}, 32, 8.0f);
  ASSERT_THAT(cal.status(), IsOk());
  double first = -1, last_mean = 0;
  for (int step = 0; step < kSteps; ++step) {
    SelectParams p;
    p.budget_tokens = 256;
    (*cal)->Apply(&p);
    Selection s;
    ASSERT_THAT(b.sel->Select(h.query(step), kG, p, &s), IsOk());
    // Every step is measured here (the test's truth); the calibrator sees
    // only the ones it asks for.
    auto q = MeasureSelection(*b.sel, h.query(step), kG, p, s);
    ASSERT_THAT(q.status(), IsOk());
    if (first < 0) first = q->mass_ratio;
    if (step >= kSteps - 16) last_mean += q->mass_ratio / 16;
    if ((*cal)->ShouldSample(p, static_cast<int64_t>(s.keys_touched))) {
      (*cal)->Taken();
      q->reference_ns = h.n;
      (*cal)->Observe(*q);
    }
  }
  const CalibratorReport r = (*cal)->report();
  EXPECT_LT(first, 0.95) << "the tree meets the target at once: the test shows nothing";
  EXPECT_GE(last_mean, 0.95) << "first " << first << ", mode "
                             << (r.mode == SelectMode::kExact ? "exact" : "tree") << ", width "
                             << r.width;
}

// The token reference (SIMD exp) against a scalar double computation from
// the keys: every token's group share, and so the exact best tokens.
TEST(WidthCalibratorTest, ExactTokenSharesMatchAScalarReference) {
  const int kG = 4;
  testing::HeadData h = testing::MakeSyntheticHead(4096, kG, 2, 9);
  ASSERT_GT(h.n, 0);
  BuiltMdci b = BuildMdci(h, 32, 8.0f);
  ASSERT_NE(b.sel, nullptr);
  std::vector<float> share;
  ASSERT_THAT(b.sel->ExactTokenShares(h.query(1), kG, &share), IsOk());
  ASSERT_EQ(static_cast<int64_t>(share.size()), h.n);
  std::vector<double> want(h.n, 0.0), logits(h.n);
  const double scale = 1.0 / std::sqrt(static_cast<double>(h.dim));
  for (int j = 0; j < kG; ++j) {
    const float* q = h.query(1) + static_cast<size_t>(j) * h.dim;
    double m = -INFINITY;
    for (int64_t i = 0; i < h.n; ++i) {
      double d = 0;
      for (int k = 0; k < h.dim; ++k) d += static_cast<double>(q[k]) * h.key(i)[k];
      logits[i] = d * scale;
      m = std::max(m, logits[i]);
    }
    double z = 0;
    for (int64_t i = 0; i < h.n; ++i) z += std::exp(logits[i] - m);
    for (int64_t i = 0; i < h.n; ++i) want[i] += std::exp(logits[i] - m) / z;
  }
  double worst = 0, total = 0;
  for (int64_t i = 0; i < h.n; ++i) {
    worst = std::max(worst, std::abs(share[i] - want[i]) / std::max(want[i], 1e-3));
    total += share[i];
  }
  EXPECT_LE(worst, 1e-4);
  EXPECT_NEAR(total, kG, 1e-3);
}

// The exact scans run in chunks with a yield between them (where the
// quality sampler lets appends in): the same bits as without; a yield that
// says stop aborts; keys inserted during a yield (an append) leave the
// scan covering the pages and tokens of its start, its masses a
// distribution over what it scored.
TEST(WidthCalibratorTest, ExactScansYieldBetweenChunksAndCoverWhatTheyStartedWith) {
  const int kG = 4;
  testing::HeadData h = testing::MakeSyntheticHead(9000, kG, 2, 9);
  ASSERT_GT(h.n, 0);
  BuiltMdci b = BuildMdci(h, 32, 8.0f);
  ASSERT_NE(b.sel, nullptr);
  const uint32_t pages = b.sel->num_pages();
  ASSERT_GT(pages, 2 * MdciSelector::kScanChunkPages) << "three chunks at least";
  const int chunks =
      static_cast<int>((pages + MdciSelector::kScanChunkPages - 1) / MdciSelector::kScanChunkPages);
  std::vector<float> mass0, mass1, share0, share1;
  ASSERT_THAT(b.sel->ExactPageMasses(h.query(1), kG, &mass0), IsOk());
  ASSERT_THAT(b.sel->ExactTokenShares(h.query(1), kG, &share0), IsOk());
  int calls = 0;
  auto count = [&calls]() {
    ++calls;
    return true;
  };
  ASSERT_THAT(b.sel->ExactPageMasses(h.query(1), kG, &mass1, count), IsOk());
  EXPECT_EQ(calls, chunks - 1);
  EXPECT_EQ(mass1, mass0);
  ASSERT_THAT(b.sel->ExactTokenShares(h.query(1), kG, &share1, count), IsOk());
  EXPECT_EQ(calls, 2 * (chunks - 1));
  EXPECT_EQ(share1, share0);
  auto stop = []() { return false; };
  EXPECT_THAT(b.sel->ExactPageMasses(h.query(1), kG, &mass1, stop),
              StatusIs(absl::StatusCode::kAborted));
  EXPECT_THAT(b.sel->ExactTokenShares(h.query(1), kG, &share1, stop),
              StatusIs(absl::StatusCode::kAborted));
  // An append during the first yield: 64 keys into the tree and frames.
  bool appended = false;
  auto append = [&]() {
    if (appended) return true;
    appended = true;
    std::vector<Placement> pl;
    EXPECT_THAT(b.sel->Insert(h.key(100), 64, &pl), IsOk());
    EXPECT_THAT(b.frames->Apply(pl, h.key(100)), IsOk());
    return true;
  };
  ASSERT_THAT(b.sel->ExactPageMasses(h.query(1), kG, &mass1, append), IsOk());
  ASSERT_TRUE(appended);
  EXPECT_GT(b.sel->num_pages(), pages);
  ASSERT_EQ(mass1.size(), pages);
  double total = 0;
  for (float m : mass1) total += m;
  EXPECT_NEAR(total, 1.0, 1e-3);
  appended = false;
  const int64_t tokens = b.sel->num_tokens();
  ASSERT_THAT(b.sel->ExactTokenShares(h.query(1), kG, &share1, append), IsOk());
  ASSERT_TRUE(appended);
  ASSERT_EQ(static_cast<int64_t>(share1.size()), tokens);
  total = 0;
  for (float v : share1) total += v;
  EXPECT_GT(total, 0.5 * kG);
  EXPECT_LE(total, kG + 1e-3);
}

// SelectParams.ranking overrides the selector's own ranking: a selector
// built with the loudest ranking, asked for the normalized one, selects what
// a selector built with it selects; and the pair measurement rates both
// against one reference, as MeasureSelection rates each alone.
TEST(WidthCalibratorTest, TheRankingOverrideSelectsAsTheConfiguredRanking) {
  const int kG = 4, kSteps = 6;
  testing::HeadData h = testing::MakeSyntheticHead(8192, kG, kSteps, 9, "scattered-topics");
  ASSERT_GT(h.n, 0);
  BuiltMdci loud = BuildMdci(h, 8, 2.0f);
  BuiltMdci norm = BuildMdci(h, 8, 2.0f, /*calibrated_rest=*/true, /*normalized_descent=*/true);
  ASSERT_NE(loud.sel, nullptr);
  ASSERT_NE(norm.sel, nullptr);
  int differ = 0;
  for (int step = 0; step < kSteps; ++step) {
    SelectParams p;
    p.budget_tokens = 256;
    Selection a, b, c;
    ASSERT_THAT(loud.sel->Select(h.query(step), kG, p, &a), IsOk());
    ASSERT_THAT(norm.sel->Select(h.query(step), kG, p, &b), IsOk());
    SelectParams pn = p;
    pn.ranking = DescentRanking::kNormalized;
    ASSERT_THAT(loud.sel->Select(h.query(step), kG, pn, &c), IsOk());
    EXPECT_EQ(c.pages, b.pages) << "step " << step;
    differ += a.pages != c.pages;
    auto pair = MeasureSelectionPair(*loud.sel, h.query(step), kG, p, a, &c);
    auto alone_a = MeasureSelection(*loud.sel, h.query(step), kG, p, a);
    auto alone_c = MeasureSelection(*loud.sel, h.query(step), kG, p, c);
    ASSERT_THAT(pair.status(), IsOk());
    ASSERT_THAT(alone_a.status(), IsOk());
    ASSERT_THAT(alone_c.status(), IsOk());
    EXPECT_DOUBLE_EQ(pair->mass_ratio, alone_a->mass_ratio);
    EXPECT_DOUBLE_EQ(pair->topk_recall, alone_a->topk_recall);
    EXPECT_DOUBLE_EQ(pair->trial_mass_ratio, alone_c->mass_ratio);
    EXPECT_LT(alone_a->trial_mass_ratio, 0.0);  // no trial asked
  }
  EXPECT_GT(differ, 0) << "the two rankings should disagree on some step here";
}

TEST(WidthCalibratorTest, SeedStartsAFreshHeadAtAnEarlierSessionsWidth) {
  CalibratorOptions o;
  o.warmup_samples = 16;
  auto learnt = Make(o);
  ASSERT_NE(learnt, nullptr);
  EXPECT_FALSE(learnt->SeedOf(16).has_value());  // nothing learnt yet
  std::mt19937 rng(5);
  for (int i = 0; i < 24; ++i) {
    const double r = Curve(0.4, learnt->report().width, &rng);  // needs width 8
    learnt->Observe({r, r});
  }
  const std::optional<CalibratorSeed> seed = learnt->SeedOf(16);
  ASSERT_TRUE(seed.has_value());
  EXPECT_EQ(seed->width, learnt->report().width);
  EXPECT_GT(seed->width, 4.0);
  EXPECT_FALSE(seed->exact);

  auto next = Make(o);
  ASSERT_NE(next, nullptr);
  ASSERT_THAT(next->Seed(*seed, 2), IsOk());
  EXPECT_TRUE(next->report().seeded);
  SelectParams p;
  next->Apply(&p);
  EXPECT_EQ(p.field_of_view, static_cast<int>(std::lround(32 * seed->width)));
  EXPECT_FALSE(p.exhaustive);
  // Two warm-up samples left, then the steady interval (>= sample_every).
  int sampled = 0;
  for (int i = 0; i < 10; ++i) {
    if (next->ShouldSample(p, 1000)) {
      next->Taken();
      next->Observe({0.97, 0.97});
      ++sampled;
    }
  }
  EXPECT_EQ(sampled, 2);
  EXPECT_TRUE(next->state().seeded);
  // A seeded head passes its width on even before min_samples samples.
  auto third = Make(o);
  ASSERT_NE(third, nullptr);
  ASSERT_THAT(third->Seed(*seed, 2), IsOk());
  ASSERT_TRUE(third->SeedOf(16).has_value());
  EXPECT_EQ(third->SeedOf(16)->width, seed->width);
  // Only a fresh calibrator takes a seed.
  EXPECT_THAT(next->Seed(*seed, 2), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST(WidthCalibratorTest, SeedOfAnExactHeadSelectsExactlyAndBadSeedsAreRefused) {
  auto c = Make({});
  ASSERT_NE(c, nullptr);
  ASSERT_THAT(c->Seed({2.0, DescentRanking::kNormalized, /*exact=*/true}, 0), IsOk());
  SelectParams p;
  c->Apply(&p);
  EXPECT_TRUE(p.exhaustive);
  EXPECT_EQ(p.ranking, DescentRanking::kNormalized);
  EXPECT_EQ(c->report().mode, SelectMode::kExact);
  EXPECT_FALSE(c->ShouldSample(p, 1000));  // exact selections are not sampled
  const std::optional<CalibratorSeed> again = c->SeedOf(1000);
  ASSERT_TRUE(again.has_value());  // an exact head passes on its fallback
  EXPECT_TRUE(again->exact);

  auto d = Make({});
  ASSERT_NE(d, nullptr);
  EXPECT_THAT(d->Seed({0.25, DescentRanking::kLoudest, false}, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("width")));
  EXPECT_THAT(d->Seed({std::nan(""), DescentRanking::kLoudest, false}, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("width")));
  EXPECT_THAT(d->Seed({2.0, DescentRanking::kSelector, false}, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("ranking")));
  EXPECT_FALSE(d->report().seeded);
  EXPECT_EQ(d->report().width, 1.0);
}

// The method duel on simulated heads: each method's mass ratio grows with
// its width as 1 - a / w, and its cost as base + per_width x w.
struct SimMethod {
  double a;
  double base_ns;
  double ns_per_width;
};

constexpr float kBasePq = 8.0f;

struct SimDuelHead {
  WidthCalibrator* c;
  SimMethod scan, tree;
  double exact_ns;
  int64_t sampled = 0;   // references taken
  int64_t shadowed = 0;  // of them, with a shadow trial's selection
  std::mt19937 rng{7};
  // >= 0: with candidate carry-over (carry_steps 1), every other selection
  // reuses the last fresh one's candidates and costs this, whichever method.
  double carried_ns = -1.0;
  double tree_carry_loss = 0.0;  // the tree's carried selections' ratio falls this much
  int64_t steps = 0;
  // The simulated method, width and cost of a selection made with `p`.
  const SimMethod& MethodOf(const SelectParams& p, double* w, int64_t* cost) const {
    const bool is_scan = p.method == SearchMethod::kScan;
    const SimMethod& m = is_scan ? scan : tree;
    *w = is_scan ? p.pq_factor / kBasePq : p.candidate_factor / 8.0;
    *cost = static_cast<int64_t>(p.exhaustive ? exact_ns : m.base_ns + m.ns_per_width * *w);
    return m;
  }
  void Step() {
    SelectParams p;
    c->Apply(&p);
    double w = 0.0;
    int64_t cost = 0;
    const SimMethod& m = MethodOf(p, &w, &cost);
    const int age = p.carry_steps > 0 ? static_cast<int>(steps++ % 2) : 0;
    if (age > 0) cost = static_cast<int64_t>(carried_ns);
    if (!c->ShouldSample(p, cost, age)) return;
    c->Taken();
    ++sampled;
    QualitySample q{p.exhaustive ? 1.0 : Curve(m.a, w, &rng), 1.0};
    if (age > 0 && &m == &tree) q.mass_ratio -= tree_carry_loss;
    q.reference_ns = static_cast<int64_t>(exact_ns);
    q.carried = age > 0;
    SelectParams sp = p;
    if (c->ShadowParams(&sp)) {
      ++shadowed;
      double sw = 0.0;
      const SimMethod& sm = MethodOf(sp, &sw, &q.method_ns);
      q.method_mass_ratio = std::max(0.0, Curve(sm.a, sw, &rng));  // a mass ratio is >= 0
    }
    c->Observe(q);
  }
};

// The simulated methods' costs and widths below were set with heads that
// never go below width 1; the duel's tests keep that floor.
std::unique_ptr<WidthCalibrator> MakeDuel(CalibratorOptions o = {}) {
  o.min_width = std::max(o.min_width, 1.0);
  auto c = WidthCalibrator::Create(o, 32, 8.0f, kBasePq);
  EXPECT_THAT(c.status(), IsOk());
  return c.ok() ? std::move(c).value() : nullptr;
}

// A head on which the tree meets the target at a narrow, cheap width ends on
// the tree; one on which the tree needs a width costlier than the scan stays
// on the scan, and its trial stops as soon as the tree costs as much.
TEST(WidthCalibratorTest, TheMethodDuelKeepsTheCheaperMethodPerHead) {
  const SimMethod scan{0.02, 600.0, 0.0};  // meets the target at its base factor
  auto easy = MakeDuel();
  ASSERT_NE(easy, nullptr);
  EXPECT_EQ(easy->report().method, SearchMethod::kScan);  // the configured method first
  SimDuelHead e{easy.get(), scan, {0.02, 0.0, 100.0}, 3000.0};
  for (int i = 0; i < 200; ++i) e.Step();
  CalibratorReport r = easy->report();
  EXPECT_EQ(r.method, SearchMethod::kTree);
  EXPECT_EQ(r.mode, SelectMode::kTree);
  EXPECT_EQ(r.method_trials, 1);
  EXPECT_EQ(r.method_switches, 1);
  EXPECT_NEAR(r.other_cost_ns, 600.0, 1.0);  // the scan, parked
  SelectParams p;
  easy->Apply(&p);
  EXPECT_EQ(p.method, SearchMethod::kTree);
  EXPECT_EQ(p.pq_factor, 0.0f);

  auto hard = MakeDuel();
  ASSERT_NE(hard, nullptr);
  SimDuelHead h{hard.get(), scan, {1.2, 0.0, 100.0}, 3000.0};  // the tree needs width 24
  for (int i = 0; i < 200; ++i) h.Step();
  r = hard->report();
  EXPECT_EQ(r.method, SearchMethod::kScan);
  EXPECT_EQ(r.method_trials, 1);
  EXPECT_EQ(r.method_switches, 0);
  EXPECT_FALSE(r.method_trial);
  // The trial stopped at the width whose cost reached the scan's (600 at
  // width 6), not at the width the tree would need.
  EXPECT_LT(r.other_width, 12.0);
  EXPECT_LE(h.sampled, 40);
  hard->Apply(&p);
  EXPECT_EQ(p.method, SearchMethod::kScan);
  EXPECT_FLOAT_EQ(p.pq_factor, kBasePq * static_cast<float>(r.width));
}

// A trial rides on the samples the head takes anyway: a head whose tree
// loses its trial takes no more references than the same head without the
// duel (a trial that took over the selections sampled every one of them),
// even when the scan is judged only after the warm-up.
TEST(WidthCalibratorTest, AMethodTrialTakesNoReferenceOfItsOwn) {
  CalibratorOptions o;
  o.warmup_samples = 4;
  const SimMethod scan{0.02, 600.0, 0.0}, tree{1.2, 0.0, 100.0};  // the tree needs width 24
  auto duel = MakeDuel(o);
  ASSERT_NE(duel, nullptr);
  o.method_duel = false;
  auto alone = MakeDuel(o);
  ASSERT_NE(alone, nullptr);
  SimDuelHead d{duel.get(), scan, tree, 3000.0};
  SimDuelHead a{alone.get(), scan, tree, 3000.0};
  for (int i = 0; i < 1500; ++i) {  // within the wait before a second trial (2048)
    d.Step();
    a.Step();
  }
  const CalibratorReport r = duel->report();
  EXPECT_EQ(r.method_trials, 1);
  EXPECT_EQ(r.method_switches, 0);
  EXPECT_FALSE(r.method_trial);
  EXPECT_GE(d.shadowed, 2);  // the tree was measured ...
  EXPECT_LE(d.sampled, a.sampled) << "... on references the scan took anyway";
  EXPECT_GT(r.other_width, 1.0);  // and its width adapted on them
}

// A head whose tree wins on easy early queries, then needs a width that
// costs more than the scan did: the scan is tried again at once (not after
// the doubled wait of 2048 selections) and takes the head back.
TEST(WidthCalibratorTest, TheMethodDuelTriesAgainWhenTheWinnerGrowsCostlier) {
  CalibratorOptions o;
  o.method_trial_steps = 8192;  // no second trial by the wait in this test
  auto c = MakeDuel(o);
  ASSERT_NE(c, nullptr);
  SimDuelHead h{c.get(), {0.02, 600.0, 0.0}, {0.02, 0.0, 100.0}, 3000.0};
  for (int i = 0; i < 200; ++i) h.Step();
  CalibratorReport r = c->report();
  ASSERT_EQ(r.method, SearchMethod::kTree);
  ASSERT_EQ(r.method_trials, 1);
  h.tree.a = 0.4;  // the tree now needs width 8: 800 ns against the scan's 600
  for (int i = 0; i < 4000; ++i) h.Step();
  r = c->report();
  EXPECT_EQ(r.method, SearchMethod::kScan);
  EXPECT_EQ(r.method_trials, 2);
  EXPECT_EQ(r.method_switches, 2);

  // The same head whose tree stays cheap is not tried again in that time.
  auto calm = MakeDuel(o);
  ASSERT_NE(calm, nullptr);
  SimDuelHead k{calm.get(), {0.02, 600.0, 0.0}, {0.02, 0.0, 100.0}, 3000.0};
  for (int i = 0; i < 4200; ++i) k.Step();
  r = calm->report();
  EXPECT_EQ(r.method, SearchMethod::kTree);
  EXPECT_EQ(r.method_trials, 1);
}

// With candidate carry-over, half the selections reuse a fresh one's
// candidates and cost little, whichever the method, while a shadow trial's
// selection is always fresh. With duel_fresh_costs the duel compares fresh
// with fresh: the tree, 450 ns fresh against the scan's 600 (both 50
// carried), wins; by default, against the scan's mean over all selections
// (325), it loses.
TEST(WidthCalibratorTest, TheMethodDuelComparesFreshSelectionsWithFreshOnes) {
  CalibratorOptions o;
  o.carry_steps = 1;
  o.duel_fresh_costs = true;  // off by default: docs/bench/calib50.md
  auto c = MakeDuel(o);
  ASSERT_NE(c, nullptr);
  SimDuelHead h{c.get(), {0.02, 600.0, 0.0}, {0.02, 450.0, 0.0}, 3000.0};
  h.carried_ns = 50.0;
  for (int i = 0; i < 400; ++i) h.Step();
  const CalibratorReport r = c->report();
  EXPECT_GT(r.carry_steps, 0);  // the carry kept on: the samples rate both kinds alike
  EXPECT_EQ(r.method, SearchMethod::kTree);
  EXPECT_EQ(r.method_switches, 1);
  EXPECT_NEAR(r.fresh_cost_ns, 450.0, 1.0);
  EXPECT_NEAR(r.tree_cost_ns, 250.0, 30.0);        // the mean over fresh and carried
  EXPECT_NEAR(r.other_fresh_cost_ns, 600.0, 1.0);  // the scan, parked

  // The default (duel_fresh_costs off): the mean over all selections, and
  // the same tree loses.
  o.duel_fresh_costs = false;
  auto before = MakeDuel(o);
  ASSERT_NE(before, nullptr);
  SimDuelHead b{before.get(), {0.02, 600.0, 0.0}, {0.02, 450.0, 0.0}, 3000.0};
  b.carried_ns = 50.0;
  for (int i = 0; i < 400; ++i) b.Step();
  EXPECT_EQ(before->report().method, SearchMethod::kScan);

  // Without the carry every selection is fresh, and the same tree wins by
  // either rule.
  auto plain = MakeDuel();
  ASSERT_NE(plain, nullptr);
  SimDuelHead k{plain.get(), {0.02, 600.0, 0.0}, {0.02, 450.0, 0.0}, 3000.0};
  for (int i = 0; i < 400; ++i) k.Step();
  EXPECT_EQ(plain->report().method, SearchMethod::kTree);
  EXPECT_NEAR(plain->report().fresh_cost_ns, 450.0, 1.0);
}

// The carry's judgement rates the method in use: a head whose tree's carried
// selections fell behind (its carry stopped) carries again once the scan,
// whose carried selections hold, takes the head back.
TEST(WidthCalibratorTest, AMethodSwitchStartsTheCarryOver) {
  CalibratorOptions o;
  o.carry_steps = 1;
  o.carry_retry_steps = 1 << 20;  // no retry by the wait in this test
  o.max_carry_retry_steps = 1 << 20;
  o.method_trial_steps = 8192;
  auto c = MakeDuel(o);
  ASSERT_NE(c, nullptr);
  SimDuelHead h{c.get(), {0.02, 600.0, 0.0}, {0.02, 0.0, 100.0}, 3000.0};
  h.carried_ns = 50.0;
  h.tree_carry_loss = 0.2;
  for (int i = 0; i < 600; ++i) h.Step();
  CalibratorReport r = c->report();
  ASSERT_EQ(r.method, SearchMethod::kTree);
  ASSERT_EQ(r.carry_steps, 0) << "the tree's carried selections fall behind: the carry stops";
  ASSERT_GE(r.carry_stops, 1);
  h.tree.a = 0.4;  // the tree now needs width 8: 800 ns against the scan's 600
  for (int i = 0; i < 4000; ++i) h.Step();
  r = c->report();
  EXPECT_EQ(r.method, SearchMethod::kScan);
  EXPECT_EQ(r.carry_steps, 1) << "the scan carries again";
  EXPECT_NEAR(r.tree_cost_ns, 325.0, 40.0);  // a fresh 600 and a carried 50, alternating
}

// On data that does not change, the duel tries the other method ever more
// rarely (each trial doubles the wait) and never switches back and forth.
TEST(WidthCalibratorTest, TheMethodDuelTriesAgainEverMoreRarely) {
  CalibratorOptions o;
  o.method_trial_steps = 64;
  o.max_method_trial_steps = 16384;
  auto c = MakeDuel(o);
  ASSERT_NE(c, nullptr);
  SimDuelHead h{c.get(), {0.02, 600.0, 0.0}, {0.02, 0.0, 100.0}, 3000.0};
  std::vector<int> trial_at;
  int64_t trials = 0;
  // A trial of the scan (a shadow on the tree's samples, one every ~600
  // selections here) takes two samples to lose: the waits show past that.
  for (int i = 0; i < 80000; ++i) {
    h.Step();
    if (c->report().method_trials != trials) {
      trials = c->report().method_trials;
      trial_at.push_back(i);
    }
  }
  const CalibratorReport r = c->report();
  EXPECT_EQ(r.method, SearchMethod::kTree);
  EXPECT_EQ(r.method_switches, 1);  // the tree won its trial; the scan never wins back
  // Trials start on sampled steps, so the doubling waits show once they
  // pass the sampling interval.
  ASSERT_GE(trial_at.size(), 3u);
  EXPECT_LE(trial_at.size(), 14u);
  for (size_t i = 2; i < trial_at.size(); ++i) {
    EXPECT_GE(trial_at[i] - trial_at[i - 1], 0.9 * (trial_at[i - 1] - trial_at[i - 2]))
        << "trial " << i << ": the waits never shrink";
  }
  const size_t n = trial_at.size();
  EXPECT_GE(trial_at[n - 1] - trial_at[n - 2], 4 * (trial_at[2] - trial_at[1]));
}

// A trial is decided as soon as its probe judges it: one that starts at a
// parked width wider than the target needs (comfortable at once, so the
// sample that judges it also narrows it) ends there, and does not linger at
// the steady sampling rate.
TEST(WidthCalibratorTest, AMethodTrialEndsWhenItsProbeEnds) {
  auto c = MakeDuel();
  ASSERT_NE(c, nullptr);
  CalibratorState s = c->state();
  s.method = SearchMethod::kTree;  // the tree on trial from width 4 ...
  s.width = 4.0;
  s.probing = true;
  s.method_trial = true;
  s.method_trials = 1;
  s.trial_bar = 600.0;
  s.parked.width = 1.0;  // ... against the scan at 600 ns
  s.parked.cost = 600.0;
  s.parked.cost_n = 8;
  s.parked.tried = true;
  s.parked.release_needed = 16;
  ASSERT_THAT(c->Restore(s), IsOk());
  SimDuelHead h{c.get(), {0.02, 600.0, 0.0}, {0.02, 0.0, 100.0}, 3000.0};
  for (int i = 0; i < 8; ++i) h.Step();  // comfortable at width 4 (0.995)
  const CalibratorReport r = c->report();
  EXPECT_FALSE(r.method_trial) << "the trial lingered";
  EXPECT_EQ(r.method, SearchMethod::kTree);
  EXPECT_EQ(r.method_switches, 1);  // 400 ns at width 4 < 600
  EXPECT_LT(r.width, 4.0);          // and it narrows on as the incumbent
}

// A scan that cannot reach the target within its widths tries the tree
// before exact selection; a tree that meets it keeps the head off exact.
TEST(WidthCalibratorTest, TheMethodDuelTriesTheTreeBeforeExactSelection) {
  CalibratorOptions o;
  o.max_width = 8.0;
  auto c = MakeDuel(o);
  ASSERT_NE(c, nullptr);
  SimDuelHead h{c.get(), {4.0, 600.0, 0.0}, {0.05, 0.0, 100.0}, 3000.0};
  for (int i = 0; i < 300; ++i) h.Step();
  CalibratorReport r = c->report();
  EXPECT_EQ(r.mode, SelectMode::kTree);
  EXPECT_EQ(r.method, SearchMethod::kTree);
  EXPECT_EQ(r.fallbacks, 0);
  // Neither reaches it: exact selection, as without the duel.
  auto d = MakeDuel(o);
  ASSERT_NE(d, nullptr);
  SimDuelHead g{d.get(), {4.0, 600.0, 0.0}, {4.0, 0.0, 100.0}, 3000.0};
  for (int i = 0; i < 300; ++i) g.Step();
  r = d->report();
  EXPECT_EQ(r.mode, SelectMode::kExact);
  EXPECT_GE(r.fallbacks, 1);
  EXPECT_EQ(r.method_switches, 0);
}

// Without timed selections the duel starts no trial (it compares costs);
// with method_duel off, or a selector without codes, there is no duel.
TEST(WidthCalibratorTest, TheMethodDuelNeedsCostsAndCodes) {
  auto c = MakeDuel();
  ASSERT_NE(c, nullptr);
  for (int i = 0; i < 200; ++i) {
    SelectParams p;
    c->Apply(&p);
    if (c->ShouldSample(p, 0)) {
      c->Taken();
      c->Observe({0.99, 1.0});
    }
  }
  EXPECT_EQ(c->report().method_trials, 0);
  EXPECT_EQ(c->report().method, SearchMethod::kScan);
  CalibratorOptions off;
  off.method_duel = false;
  auto d = MakeDuel(off);
  ASSERT_NE(d, nullptr);
  SimDuelHead h{d.get(), {0.02, 600.0, 0.0}, {0.02, 0.0, 100.0}, 3000.0};
  for (int i = 0; i < 200; ++i) h.Step();
  EXPECT_EQ(d->report().method_trials, 0);
  EXPECT_EQ(d->report().method, SearchMethod::kScan);
  EXPECT_EQ(d->report().other_width, 0.0);
  auto tree = Make({});
  ASSERT_NE(tree, nullptr);
  SelectParams p;
  tree->Apply(&p);
  EXPECT_EQ(p.method, SearchMethod::kTree);
  EXPECT_EQ(tree->report().method, SearchMethod::kTree);
}

// A warm restart mid-trial goes on exactly as the original head; a state
// whose duel fields are out of range is refused and changes nothing.
TEST(WidthCalibratorTest, TheMethodDuelSurvivesARestore) {
  auto b = MakeDuel();
  ASSERT_NE(b, nullptr);
  const SimMethod scan{0.02, 600.0, 0.0}, tree{0.3, 0.0, 100.0};
  SimDuelHead hb{b.get(), scan, tree, 3000.0};
  int i = 0;
  while (!b->report().method_trial && i < 400) {
    hb.Step();
    ++i;
  }
  ASSERT_TRUE(b->report().method_trial) << "no trial within 400 steps";
  auto a = MakeDuel();
  ASSERT_NE(a, nullptr);
  ASSERT_THAT(a->Restore(b->state()), IsOk());
  SimDuelHead ha{a.get(), scan, tree, 3000.0};
  ha.rng = hb.rng;
  for (int k = 0; k < 300; ++k) {
    SelectParams pa, pb;
    a->Apply(&pa);
    b->Apply(&pb);
    ASSERT_EQ(pa.method, pb.method) << "step " << k;
    ASSERT_EQ(pa.candidate_factor, pb.candidate_factor) << "step " << k;
    ASSERT_EQ(pa.pq_factor, pb.pq_factor) << "step " << k;
    ha.Step();
    hb.Step();
  }
  EXPECT_EQ(a->report().method_trials, b->report().method_trials);
  EXPECT_EQ(a->report().method_switches, b->report().method_switches);

  const CalibratorState good = b->state();
  std::vector<std::pair<const char*, CalibratorState>> bad;
  auto with = [&](const char* what, auto edit) {
    CalibratorState s = good;
    edit(s);
    bad.push_back({what, s});
  };
  with("method", [](CalibratorState& s) { s.method = static_cast<SearchMethod>(7); });
  with("parked width", [](CalibratorState& s) { s.parked.width = 1e9; });
  with("parked means", [](CalibratorState& s) { s.parked.cost = std::nan(""); });
  with("parked counts", [](CalibratorState& s) { s.parked.release_needed = 0; });
  with("trial_bar", [](CalibratorState& s) { s.trial_bar = -1.0; });
  with("method_switches", [](CalibratorState& s) { s.method_switches = s.method_trials + 1; });
  with("shadow trial", [](CalibratorState& s) {
    s.method_shadow = true;
    s.method_trial = true;
  });
  for (const auto& [what, s] : bad) {
    EXPECT_THAT(a->Restore(s),
                StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr(what)));
  }
  // The scan on a head whose selector keeps no codes.
  auto no_codes = Make({});
  ASSERT_NE(no_codes, nullptr);
  CalibratorState scan_state = no_codes->state();
  scan_state.method = SearchMethod::kScan;
  EXPECT_THAT(
      no_codes->Restore(scan_state),
      StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("no product-quantised")));
  // An older state (no duel fields): the scan, the tree parked fresh.
  CalibratorState older = good;
  older.method = SearchMethod::kSelector;
  ASSERT_THAT(a->Restore(older), IsOk());
  EXPECT_EQ(a->report().method, SearchMethod::kScan);
  EXPECT_EQ(a->report().method_trials, 0);
}

// A seed carries its method: a head seeded with the tree's width starts on
// the tree, the scan parked.
TEST(WidthCalibratorTest, ASeedStartsOnItsMethod) {
  auto c = MakeDuel();
  ASSERT_NE(c, nullptr);
  CalibratorSeed seed{2.0, DescentRanking::kLoudest, false, SearchMethod::kTree};
  ASSERT_THAT(c->Seed(seed, 0), IsOk());
  SelectParams p;
  c->Apply(&p);
  EXPECT_EQ(p.method, SearchMethod::kTree);
  EXPECT_FLOAT_EQ(p.candidate_factor, 16.0f);
  const std::optional<CalibratorSeed> back = c->SeedOf(1);
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->method, SearchMethod::kTree);
  // The duel decided in the earlier session: no trial until a whole wait
  // has passed on the seeded method.
  SimDuelHead h{c.get(), {0.02, 600.0, 0.0}, {0.02, 0.0, 100.0}, 3000.0};
  for (int i = 0; i < 1000; ++i) h.Step();
  EXPECT_EQ(c->report().method_trials, 0);
  EXPECT_EQ(c->report().method, SearchMethod::kTree);
  auto d = MakeDuel();
  ASSERT_NE(d, nullptr);
  seed.method = static_cast<SearchMethod>(9);
  EXPECT_THAT(d->Seed(seed, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("method")));
}

// On the real selector: SelectParams::method kTree makes a selector that
// keeps codes select by the tree's descent, as the same selector without
// codes does; kScan (the calibrator's scan) is what the codes select.
TEST(WidthCalibratorTest, TheTreeMethodOnASelectorWithCodesIsTheTreesSelection) {
  const int kG = 4;
  testing::HeadData h = testing::MakeSyntheticHead(4096, kG, 8, 13);
  ASSERT_GT(h.n, 0);
  BuiltMdci with = BuildMdci(h, 32, 8.0f, true, false, /*pq_factor=*/8.0f);
  BuiltMdci without = BuildMdci(h, 32, 8.0f, true, false, 0.0f);
  ASSERT_NE(with.sel, nullptr);
  ASSERT_NE(without.sel, nullptr);
  int differ = 0;
  for (int step = 0; step < 8; ++step) {
    SelectParams p;
    p.budget_tokens = 128;
    Selection tree_sel, plain_sel, scan_sel;
    p.method = SearchMethod::kTree;
    ASSERT_THAT(with.sel->Select(h.query(step), kG, p, &tree_sel), IsOk());
    p.method = SearchMethod::kSelector;
    ASSERT_THAT(without.sel->Select(h.query(step), kG, p, &plain_sel), IsOk());
    EXPECT_EQ(tree_sel.pages, plain_sel.pages) << "step " << step;
    p.method = SearchMethod::kScan;
    ASSERT_THAT(with.sel->Select(h.query(step), kG, p, &scan_sel), IsOk());
    differ += scan_sel.pages != tree_sel.pages;
  }
  EXPECT_GT(differ, 0) << "the scan and the tree chose the same pages on every step";
}

// Pooled widths: a head with no sample of its own follows the session's
// pool (not a width change of its own); its first sample ends that, and a
// seeded, exact or duelling head, or a width out of range, never takes it.
TEST(WidthCalibratorTest, AdoptPooledMovesOnlyAnUnsampledHead) {
  CalibratorOptions o;
  o.warmup_samples = 4;
  auto c = Make(o);
  ASSERT_NE(c, nullptr);
  SelectParams p;
  c->Apply(&p);
  c->ShouldSample(p, 1000);  // a counted selection (due, not taken): still unsampled
  EXPECT_TRUE(c->AdoptPooled(3.0));
  EXPECT_TRUE(c->report().pooled);
  EXPECT_EQ(c->report().width, 3.0);
  EXPECT_EQ(c->report().changes, 0);
  c->Apply(&p);
  EXPECT_EQ(p.field_of_view, 96);
  EXPECT_FLOAT_EQ(p.candidate_factor, 24.0f);
  EXPECT_TRUE(c->AdoptPooled(2.0));  // the pool moved
  EXPECT_EQ(c->report().width, 2.0);
  EXPECT_TRUE(c->AdoptPooled(1.0));  // the default: nothing taken from the pool
  EXPECT_FALSE(c->report().pooled);
  EXPECT_TRUE(c->AdoptPooled(2.0));
  EXPECT_FALSE(c->AdoptPooled(0.25));  // outside [min_width, max_width]
  EXPECT_FALSE(c->AdoptPooled(65.0));
  EXPECT_FALSE(c->AdoptPooled(std::nan("")));
  EXPECT_EQ(c->report().width, 2.0);
  // Its first sample: the head's own samples decide from here.
  c->Apply(&p);
  ASSERT_TRUE(c->ShouldSample(p, 1000));
  c->Taken();
  c->Observe({0.5, 0.5});  // far below: widened from the pooled width
  const double own = c->report().width;
  EXPECT_EQ(own, 3.0);
  EXPECT_FALSE(c->AdoptPooled(1.0));
  EXPECT_EQ(c->report().width, own);
  EXPECT_TRUE(c->report().pooled);  // it started from the pool

  auto seeded = Make(o);
  ASSERT_NE(seeded, nullptr);
  ASSERT_THAT(seeded->Seed({4.0, DescentRanking::kLoudest, false}, 2), IsOk());
  EXPECT_FALSE(seeded->AdoptPooled(2.0));
  EXPECT_EQ(seeded->report().width, 4.0);
  EXPECT_FALSE(seeded->report().pooled);

  auto exact = Make(o);
  ASSERT_NE(exact, nullptr);
  ASSERT_THAT(exact->Seed({1.0, DescentRanking::kLoudest, true}, 0), IsOk());
  EXPECT_FALSE(exact->AdoptPooled(2.0));

  auto duel = MakeDuel();
  ASSERT_NE(duel, nullptr);
  EXPECT_FALSE(duel->AdoptPooled(2.0));  // a width is per method there
}

}  // namespace
}  // namespace icecache
