#include "server/index/sample_schedule.h"

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

SampleScheduleOptions Opts(int warmup, int min_every, int max_every, double share) {
  SampleScheduleOptions o;
  o.warmup = warmup;
  o.min_every = min_every;
  o.max_every = max_every;
  o.share = share;
  return o;
}

// Steps `n` selections of cost `select_ns`, taking every due measurement at
// cost `reference_ns`; returns how many were taken.
int Drive(SampleSchedule* s, int n, int64_t select_ns, int64_t reference_ns) {
  int taken = 0;
  for (int i = 0; i < n; ++i) {
    if (!s->Step(select_ns)) continue;
    s->Taken();
    s->Reference(reference_ns);
    ++taken;
  }
  return taken;
}

TEST(SampleScheduleTest, WarmUpSamplesEveryStep) {
  SampleSchedule s(Opts(5, 10, 100, 0.05));
  EXPECT_EQ(Drive(&s, 5, 100, 1000), 5);
  EXPECT_TRUE(s.warm());
}

TEST(SampleScheduleTest, IntervalKeepsTheReferencesWithinTheShare) {
  SampleSchedule s(Opts(4, 1, 1 << 20, 0.05));
  Drive(&s, 4, 100, 3000);
  EXPECT_EQ(s.Interval(), 600);  // 3000 / (0.05 x 100)
  const int taken = Drive(&s, 60000, 100, 3000);
  EXPECT_EQ(taken, 100);
  EXPECT_LE(taken * 3000.0 / (60000 * 100.0), 0.05);
}

TEST(SampleScheduleTest, IntervalStaysWithinItsBounds) {
  SampleSchedule cheap(Opts(1, 64, 1024, 0.05));
  Drive(&cheap, 1, 1000, 1000);  // reference = selection: 20 apart would do
  EXPECT_EQ(cheap.Interval(), 64);
  SampleSchedule dear(Opts(1, 64, 1024, 0.05));
  Drive(&dear, 1, 10, 1'000'000);  // 2,000,000 apart would do: the floor rate wins
  EXPECT_EQ(dear.Interval(), 1024);
  SampleSchedule untimed(Opts(1, 64, 1024, 0.05));
  Drive(&untimed, 3, 0, 0);  // no costs: the shortest interval
  EXPECT_EQ(untimed.Interval(), 64);
}

TEST(SampleScheduleTest, FollowsAChangingSelectionCost) {
  SampleSchedule s(Opts(2, 1, 1 << 20, 0.1));
  Drive(&s, 2, 100, 1000);
  EXPECT_EQ(s.Interval(), 100);
  Drive(&s, 400, 1000, 1000);  // the selection got ten times dearer (a wider width)
  EXPECT_NEAR(s.Interval(), 10, 1);
}

TEST(SampleScheduleTest, ADueMeasurementStaysDueUntilTaken) {
  SampleSchedule s(Opts(0, 3, 3, 0.05));
  EXPECT_FALSE(s.Step(1));
  EXPECT_FALSE(s.Step(1));
  EXPECT_TRUE(s.Step(1));
  EXPECT_TRUE(s.Step(1));  // not taken: still due
  s.Taken();
  EXPECT_FALSE(s.Step(1));
}

TEST(SampleScheduleTest, RejectsBadOptions) {
  EXPECT_THAT(ValidateSampleSchedule(Opts(16, 64, 1024, 0.05)), IsOk());
  EXPECT_THAT(ValidateSampleSchedule(Opts(-1, 64, 1024, 0.05)),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("warmup")));
  EXPECT_THAT(ValidateSampleSchedule(Opts(16, 0, 1024, 0.05)),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("sample_every")));
  EXPECT_THAT(
      ValidateSampleSchedule(Opts(16, 64, 32, 0.05)),
      StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("max_sample_every")));
  EXPECT_THAT(ValidateSampleSchedule(Opts(16, 64, 1024, 0.0)),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("cpu_share")));
}

TEST(SampleScheduleTest, ShortenedWarmupTakesOnlyWhatIsLeft) {
  SampleSchedule s(Opts(16, 10, 100, 0.05));
  s.ShortenWarmup(2);
  EXPECT_FALSE(s.warm());
  EXPECT_EQ(Drive(&s, 2, 100, 1000), 2);
  EXPECT_TRUE(s.warm());
  // Warm: the next measurement is an interval away, not the next step.
  EXPECT_FALSE(s.Step(100));
  // The credit is part of the state and survives a restore.
  const SampleScheduleState st = s.state();
  EXPECT_EQ(st.warmup_credit, 14);
  SampleSchedule r(Opts(16, 10, 100, 0.05));
  ASSERT_THAT(r.Restore(st), IsOk());
  EXPECT_TRUE(r.warm());
  // Shortening never adds warm-up, and a credit past the warm-up is refused.
  SampleSchedule t(Opts(4, 10, 100, 0.05));
  t.ShortenWarmup(10);
  EXPECT_EQ(Drive(&t, 4, 100, 1000), 4);
  SampleScheduleState bad = st;
  bad.warmup_credit = 17;
  EXPECT_THAT(r.Restore(bad),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("warmup_credit")));
}

}  // namespace
}  // namespace icecache
