// The width calibrator's judgement of the candidate carry-over
// (CalibratorOptions::carry_steps): which selects may reuse a fresh one's
// candidates, how samples fall on both kinds, and when a head stops.
#include <map>
#include <memory>
#include <string>

#include "gtest/gtest.h"
#include "server/index/width_calibrator.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

std::unique_ptr<WidthCalibrator> Make(const CalibratorOptions& o) {
  auto c = WidthCalibrator::Create(o, 32, 8.0f, 8.0f);
  EXPECT_THAT(c.status(), IsOk());
  return c.ok() ? std::move(c).value() : nullptr;
}

// A head that selects as the session does: each fresh select's candidates
// serve the next `carry_steps` ones (the selector's age rule), and a taken
// sample gets `fresh` or `carried` as its ratio. Returns the carried and
// fresh samples taken.
struct Taken {
  int64_t carried = 0, fresh = 0;
  std::map<int, int64_t> by_age;  // samples per carry age (0: fresh)
};
// `second`: the ratio of carried selects of age 2 and more (< 0: `carried`).
Taken Drive(WidthCalibrator* c, int selects, double fresh, double carried, int* age,
            double second = -1.0) {
  Taken run;
  for (int i = 0; i < selects; ++i) {
    SelectParams p;
    c->Apply(&p);
    const bool is_carried = p.carry_steps > 0 && *age < p.carry_steps;
    *age = is_carried ? *age + 1 : 0;
    if (!c->ShouldSample(p, 100000, *age)) continue;
    c->Taken();
    QualitySample q;
    q.mass_ratio = q.topk_recall = !is_carried                  ? fresh
                                   : *age >= 2 && second >= 0.0 ? second
                                                                : carried;
    q.reference_ns = 1000000;
    q.carried = is_carried;
    q.carry_age = *age;
    c->Observe(q);
    ++(is_carried ? run.carried : run.fresh);
    ++run.by_age[*age];
  }
  return run;
}

CalibratorOptions CarryOptions() {
  CalibratorOptions o;
  o.carry_steps = 1;
  o.method_duel = false;  // the scan alone: its width and the carry
  return o;
}

TEST(CarryCalibrationTest, ACheapCarryStaysOnAndTheWidthHoldsTheTarget) {
  auto c = Make(CarryOptions());
  ASSERT_NE(c, nullptr);
  int age = 0;
  // Carried steps 0.01 below the fresh ones: within the margin.
  const Taken run = Drive(c.get(), 400, 0.985, 0.975, &age);
  const CalibratorReport r = c->report();
  EXPECT_EQ(r.carry_steps, 1);
  EXPECT_EQ(r.carry_stops, 0);
  EXPECT_GT(run.carried, 0);
  EXPECT_GT(run.fresh, 0);
  EXPECT_NEAR(r.carry_mean, 0.975, 1e-9);
  EXPECT_NEAR(r.fresh_mean, 0.985, 1e-9);
  EXPECT_LE(r.width, 1.0);  // both kinds meet the target: never widened
}

TEST(CarryCalibrationTest, ACarryThatSpendsTheFreshSelectsRoomStaysOn) {
  auto c = Make(CarryOptions());
  ASSERT_NE(c, nullptr);
  int age = 0;
  // Carried steps 0.06 below the fresh ones, past the margin, but the two
  // kinds mix to 0.96: over the 0.95 target, so the carry costs no width.
  Drive(c.get(), 400, 0.99, 0.93, &age);
  const CalibratorReport r = c->report();
  EXPECT_EQ(r.carry_steps, 1);
  EXPECT_EQ(r.carry_stops, 0);
  EXPECT_LE(r.width, 1.0);  // never widened
}

TEST(CarryCalibrationTest, AHeadWhoseCarriedStepsFallBehindStopsWithoutWidening) {
  CalibratorOptions o = CarryOptions();
  o.carry_retry_steps = 300;
  o.max_carry_retry_steps = 600;
  auto c = Make(o);
  ASSERT_NE(c, nullptr);
  int age = 0;
  // Queries that move fast: the carried steps lose a tenth of the mass.
  Drive(c.get(), o.warmup_samples * o.warmup_every, 0.96, 0.86, &age);
  CalibratorReport r = c->report();
  EXPECT_EQ(r.carry_steps, 0);
  EXPECT_EQ(r.carry_stops, 1);
  // The warm-up's carried samples rated the carry, not the width: the
  // fresh ones meet the target, so the head was never widened for them.
  EXPECT_DOUBLE_EQ(r.width, 1.0);
  EXPECT_EQ(r.changes, 0);
  // Stopped: no select is carried until the retry.
  SelectParams p;
  c->Apply(&p);
  EXPECT_EQ(p.carry_steps, 0);
  const Taken off = Drive(c.get(), 250, 0.96, 0.86, &age);
  EXPECT_EQ(off.carried, 0);
  // After carry_retry_steps selections it tries again, and (the data as
  // before) stops again; the next wait is doubled.
  Drive(c.get(), 60, 0.96, 0.86, &age);
  r = c->report();
  EXPECT_EQ(r.carry_steps, 1);
  EXPECT_EQ(r.carry_stops, 1);
  Drive(c.get(), 2000, 0.96, 0.86, &age);
  r = c->report();
  EXPECT_GE(r.carry_stops, 2);
  EXPECT_LE(r.carry_stops, 5);  // 300, 600, 600, ... selections apart
}

// A carry of 2 whose second reuse falls behind (the first holds) is
// shortened to 1 and judged afresh there, where it holds: the head keeps the
// carry's saving on every other step instead of losing it all.
TEST(CarryCalibrationTest, ACarryWhoseLastReuseFallsBehindIsShortenedAndHoldsThere) {
  CalibratorOptions o = CarryOptions();
  o.carry_steps = 2;
  o.carry_retry_steps = 1 << 20;  // no retry in this test
  o.max_carry_retry_steps = 1 << 20;
  auto c = Make(o);
  ASSERT_NE(c, nullptr);
  int age = 0;
  // Fresh 0.985, first reuse 0.975, second 0.85: at 2 the carried samples
  // average 0.91, 0.07 under the fresh ones, and the mix 0.937 misses 0.95;
  // at 1 they are 0.01 under.
  Drive(c.get(), 3000, 0.985, 0.975, &age, 0.85);
  const CalibratorReport r = c->report();
  EXPECT_EQ(r.carry_steps, 1);
  EXPECT_EQ(r.carry_shortened, 1);
  EXPECT_EQ(r.carry_stops, 0);
  EXPECT_NEAR(r.carry_mean, 0.975, 1e-9) << "judged afresh: no sample of age 2 counts at 1";
  SelectParams p;
  c->Apply(&p);
  EXPECT_EQ(p.carry_steps, 1);

  // Where the first reuse falls behind too, the carry is shortened, then
  // stopped; the retry starts again at 2.
  CalibratorOptions retry = o;
  retry.carry_retry_steps = 400;
  retry.max_carry_retry_steps = 400;
  auto d = Make(retry);
  ASSERT_NE(d, nullptr);
  age = 0;
  CalibratorReport s = d->report();
  for (int i = 0; i < 20000 && s.carry_stops == 0; ++i) {
    Drive(d.get(), 1, 0.96, 0.86, &age);
    s = d->report();
    if (s.carry_stops == 0) EXPECT_EQ(s.carry_steps, s.carry_shortened == 0 ? 2 : 1);
  }
  EXPECT_EQ(s.carry_steps, 0);
  EXPECT_EQ(s.carry_shortened, 1);
  EXPECT_EQ(s.carry_stops, 1);
  bool retried_at_two = false;
  for (int i = 0; i < 500 && !retried_at_two; ++i) {
    Drive(d.get(), 1, 0.96, 0.86, &age);
    retried_at_two = d->report().carry_steps == 2;
  }
  EXPECT_TRUE(retried_at_two) << "the retry carries as far as configured";
}

TEST(CarryCalibrationTest, SamplesFallOnBothKindsWhenTheIntervalIsInStepWithTheCarry) {
  CalibratorOptions o = CarryOptions();
  o.warmup_samples = 0;
  o.sample_every = 2;  // every second select: always the same kind, unstratified
  o.max_sample_every = 2;
  o.carry_steps = 1;
  auto c = Make(o);
  ASSERT_NE(c, nullptr);
  int age = 0;
  const Taken run = Drive(c.get(), 400, 0.98, 0.98, &age);
  EXPECT_GE(run.carried, 60);
  EXPECT_GE(run.fresh, 60);
  EXPECT_LE(std::abs(run.carried - run.fresh), 2);
  // Three carried selects per fresh one: the samples in that proportion.
  o.carry_steps = 3;
  o.sample_every = o.max_sample_every = 4;
  c = Make(o);
  ASSERT_NE(c, nullptr);
  age = 0;
  const Taken three = Drive(c.get(), 800, 0.98, 0.98, &age);
  EXPECT_GE(three.fresh, 30);
  EXPECT_NEAR(static_cast<double>(three.carried) / (three.carried + three.fresh), 0.75, 0.03);
  // And each age alike: an interval in step with the period, waiting by
  // kind alone, sampled ages 0 and 1 only (a due sample that waited took
  // the next select, the first after a fresh one).
  const int64_t all = three.carried + three.fresh;
  for (int a = 0; a <= 3; ++a) {
    EXPECT_NEAR(static_cast<double>(three.by_age.count(a) ? three.by_age.at(a) : 0) / all, 0.25,
                0.03)
        << "age " << a;
  }
}

TEST(CarryCalibrationTest, OffAndExactHeadsCarryNothing) {
  auto c = Make(CalibratorOptions{});  // carry_steps 0
  ASSERT_NE(c, nullptr);
  SelectParams p;
  c->Apply(&p);
  EXPECT_EQ(p.carry_steps, 0);
  EXPECT_EQ(c->report().carry_steps, 0);
  // A head in exact fallback selects everything exactly: nothing to carry.
  CalibratorOptions o = CarryOptions();
  o.max_width = 1.0;  // the only width misses: exact fallback
  c = Make(o);
  ASSERT_NE(c, nullptr);
  int age = 0;
  Drive(c.get(), 64, 0.5, 0.5, &age);
  ASSERT_EQ(c->report().mode, SelectMode::kExact);
  c->Apply(&p);
  EXPECT_TRUE(p.exhaustive);
  EXPECT_EQ(p.carry_steps, 0);
}

TEST(CarryCalibrationTest, RejectsBadCarryOptions) {
  auto expect_bad = [](void (*set)(CalibratorOptions*), const std::string& name) {
    CalibratorOptions o;
    set(&o);
    EXPECT_THAT(WidthCalibrator::Create(o, 32, 8.0f).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr(name)));
  };
  expect_bad([](CalibratorOptions* o) { o->carry_steps = -1; }, "carry_steps");
  expect_bad([](CalibratorOptions* o) { o->carry_margin = -0.1; }, "carry_margin");
  expect_bad([](CalibratorOptions* o) { o->carry_judge_samples = 0; }, "carry_judge_samples");
  expect_bad([](CalibratorOptions* o) { o->carry_retry_steps = 0; }, "carry_retry_steps");
  expect_bad([](CalibratorOptions* o) { o->max_carry_retry_steps = o->carry_retry_steps - 1; },
             "max_carry_retry_steps");
}

}  // namespace
}  // namespace icecache
