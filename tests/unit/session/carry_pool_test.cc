// The session's pooled judgement of the candidate carry-over (carry_pool.h).
#include "server/session/carry_pool.h"

#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace icecache {
namespace {

constexpr double kTarget = 0.95;  // the session's target mass ratio

CarryPoolOptions Small() {
  CarryPoolOptions o;
  o.judge_samples = 4;
  o.retry_selects = 100;
  o.max_retry_selects = 300;
  return o;
}

TEST(CarryPoolTest, CarriedSamplesWithinTheMarginKeepItOn) {
  CarryPool pool(Small());
  for (int i = 0; i < 50; ++i) {
    pool.Observe(0.97, /*carried=*/false, kTarget, 1);
    pool.Observe(0.95, /*carried=*/true, kTarget, 1);  // 0.02 below: within 0.03
  }
  const CarryPoolReport r = pool.report();
  EXPECT_FALSE(r.stopped);
  EXPECT_EQ(r.stops, 0);
  EXPECT_EQ(r.carried, 50);
  EXPECT_EQ(r.fresh, 50);
  EXPECT_NEAR(r.carried_mean, 0.95, 1e-12);
  EXPECT_EQ(pool.Steps(1), 1);
}

TEST(CarryPoolTest, CarriedSamplesUnderTheMarginKeepItOnWhileTheMixMeetsTheTarget) {
  // 0.06 under the fresh samples, but at carry_steps 1 the selects mix
  // (0.99 + 0.93) / 2 = 0.96: the carry spends the fresh selects' room.
  CarryPool pool(Small());
  for (int i = 0; i < 50; ++i) {
    pool.Observe(0.99, /*carried=*/false, kTarget, 1);
    pool.Observe(0.93, /*carried=*/true, kTarget, 1);
  }
  EXPECT_FALSE(pool.report().stopped);
  // At carry_steps 3 the same samples mix (0.99 + 3 x 0.93) / 4 = 0.945:
  // the carry is shortened to 2 (not stopped), where they would mix 0.95.
  CarryPool three(Small());
  for (int i = 0; i < 4; ++i) {
    three.Observe(0.99, /*carried=*/false, kTarget, 3);
    three.Observe(0.93, /*carried=*/true, kTarget, 3);
  }
  EXPECT_FALSE(three.report().stopped);
  EXPECT_EQ(three.report().steps, 2);
  EXPECT_EQ(three.report().shortened, 1);
  EXPECT_EQ(three.Steps(3), 2);
  // With no target (an uncalibrated session) the margin alone judges.
  CarryPool untargeted(Small());
  for (int i = 0; i < 4; ++i) {
    untargeted.Observe(0.99, /*carried=*/false, 0.0, 1);
    untargeted.Observe(0.93, /*carried=*/true, 0.0, 1);
  }
  EXPECT_TRUE(untargeted.report().stopped);
}

// Means 0.95 fresh and 0.91 carried, samples +-0.05 around them: 0.04 past
// the margin and a mix of 0.93 by the means alone, inside one standard error
// of both (the gap's is 0.041, the mix's 0.020). The pool (confidence_z 1)
// waits for more samples; the means alone stop at once. Many samples of the
// same spread stop it.
TEST(CarryPoolTest, NoisySamplesStopTheCarryOnlyWithConfidence) {
  auto feed = [](CarryPool& pool, int pairs, double carried_mean) {
    for (int i = 0; i < pairs; ++i) {
      const double d = i % 2 == 0 ? 0.05 : -0.05;
      pool.Observe(0.95 + d, /*carried=*/false, kTarget, 1);
      pool.Observe(carried_mean + d, /*carried=*/true, kTarget, 1);
    }
  };
  CarryPoolOptions means_alone = Small();
  means_alone.confidence_z = 0.0;
  CarryPool hasty(means_alone);
  feed(hasty, 4, 0.91);
  EXPECT_TRUE(hasty.report().stopped);

  CarryPool pool(Small());
  ASSERT_EQ(Small().confidence_z, 1.0);  // the default
  feed(pool, 4, 0.91);
  EXPECT_FALSE(pool.report().stopped);
  // 0.10 under with 40 samples of each: well past one standard error.
  CarryPool clear(Small());
  feed(clear, 40, 0.85);
  EXPECT_TRUE(clear.report().stopped);
  // The same spread and gap as the first, but the mix with room above the
  // target (0.99 / 0.95: 0.97) never stops, however many samples.
  CarryPool room(Small());
  for (int i = 0; i < 400; ++i) {
    const double d = i % 2 == 0 ? 0.005 : -0.005;
    room.Observe(0.99 + d, /*carried=*/false, kTarget, 1);
    room.Observe(0.95 + d, /*carried=*/true, kTarget, 1);
  }
  EXPECT_FALSE(room.report().stopped);
}

TEST(CarryPoolTest, StopsOnlyOnceBothKindsHaveTheirSamples) {
  CarryPool pool(Small());
  for (int i = 0; i < 10; ++i) pool.Observe(0.80, /*carried=*/true, kTarget, 1);
  for (int i = 0; i < 3; ++i) pool.Observe(0.97, /*carried=*/false, kTarget, 1);
  EXPECT_FALSE(pool.report().stopped);  // 3 fresh samples: not judged yet
  pool.Observe(0.97, /*carried=*/false, kTarget, 1);
  EXPECT_TRUE(pool.report().stopped);
  EXPECT_EQ(pool.report().stops, 1);
  EXPECT_EQ(pool.Steps(1), 0);
  // Late samples of before the stop change nothing.
  pool.Observe(0.99, /*carried=*/true, kTarget, 1);
  EXPECT_EQ(pool.report().carried, 10);
}

TEST(CarryPoolTest, RetriesAfterItsWaitAndDoublesIt) {
  CarryPool pool(Small());
  auto stop = [&] {
    for (int i = 0; i < 4; ++i) {
      pool.Observe(0.97, false, kTarget, 1);
      pool.Observe(0.80, true, kTarget, 1);
    }
  };
  stop();
  ASSERT_TRUE(pool.report().stopped);
  int refused = 0;
  while (pool.Steps(1) == 0) ++refused;
  EXPECT_EQ(refused, 99);  // the 100th selection since the stop retries
  const CarryPoolReport again = pool.report();
  EXPECT_FALSE(again.stopped);
  EXPECT_EQ(again.carried, 0);  // judged afresh
  stop();
  refused = 0;
  while (pool.Steps(1) == 0) ++refused;
  EXPECT_EQ(refused, 199);  // doubled
  stop();
  refused = 0;
  while (pool.Steps(1) == 0) ++refused;
  EXPECT_EQ(refused, 299);  // capped at max_retry_selects
  EXPECT_EQ(pool.report().stops, 3);
}

// A carry of 2 whose second reuse falls behind is shortened to 1 and
// judged at once on the fresh and first-reuse samples, where it holds; when
// the first reuse falls behind too it stops. The retry lets the heads carry
// as far as they ask again.
TEST(CarryPoolTest, ACarryIsShortenedOneReuseAtATimeThenStoppedAndRetriedInFull) {
  CarryPool pool(Small());
  EXPECT_EQ(pool.Steps(2), 2);  // no judgement yet: as asked
  for (int i = 0; i < 4; ++i) {
    pool.Observe(0.97, /*carried=*/false, kTarget, 2, 0);
    pool.Observe(0.96, /*carried=*/true, kTarget, 2, 1);
    pool.Observe(0.80, /*carried=*/true, kTarget, 2, 2);  // carried 0.88, mix 0.91
  }
  CarryPoolReport r = pool.report();
  EXPECT_FALSE(r.stopped);
  EXPECT_EQ(r.steps, 1);
  EXPECT_EQ(r.shortened, 1);
  EXPECT_EQ(r.carried, 4);  // the first reuses only
  EXPECT_NEAR(r.carried_mean, 0.96, 1e-12);
  EXPECT_EQ(pool.Steps(2), 1);
  EXPECT_EQ(pool.Steps(1), 1);
  // Queries that move faster: the first reuse falls behind too, and at one
  // reuse the carry stops.
  for (int i = 0; i < 40 && !pool.report().stopped; ++i) {
    pool.Observe(0.97, /*carried=*/false, kTarget, 1, 0);
    pool.Observe(0.60, /*carried=*/true, kTarget, 1, 1);
  }
  r = pool.report();
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.stops, 1);
  EXPECT_EQ(r.shortened, 1);
  EXPECT_EQ(pool.Steps(2), 0);
  int refused = 1;
  while (pool.Steps(2) == 0) ++refused;
  EXPECT_EQ(refused, 99);  // the 100th selection since the stop retries
  r = pool.report();
  EXPECT_FALSE(r.stopped);
  EXPECT_EQ(r.steps, 0);  // no sample since the retry
  EXPECT_EQ(pool.Steps(2), 2);
  pool.Observe(0.97, /*carried=*/false, kTarget, 2, 0);
  pool.Observe(0.96, /*carried=*/true, kTarget, 2, 2);
  r = pool.report();
  EXPECT_EQ(r.steps, 2);  // judged afresh at the length asked for
  EXPECT_EQ(r.carried, 1);
}

TEST(CarryPoolTest, ConcurrentSelectsAndSamplesAreSafe) {
  CarryPool pool(Small());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&pool, t] {
      for (int i = 0; i < 2000; ++i) {
        pool.Steps(1);
        pool.Observe(t % 2 == 0 ? 0.97 : 0.80, t % 2 == 1, kTarget, 1);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_GE(pool.report().stops, 1);
}

}  // namespace
}  // namespace icecache
