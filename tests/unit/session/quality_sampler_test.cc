#include "server/session/quality_sampler.h"

#include <atomic>
#include <memory>
#include <thread>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

std::unique_ptr<QualitySampler> Make(int capacity, double share, absl::Duration burst) {
  QualitySamplerOptions o;
  o.queue_capacity = capacity;
  o.cpu_share = share;
  o.burst = burst;
  o.low_priority = false;
  auto s = QualitySampler::Create(o);
  EXPECT_THAT(s.status(), IsOk());
  return s.ok() ? std::move(s).value() : nullptr;
}

TEST(QualitySamplerTest, RunsQueuedJobsAndCountsOutcomes) {
  auto s = Make(8, 1.0, absl::Seconds(10));
  ASSERT_NE(s, nullptr);
  std::atomic<int> ran{0};
  for (int i = 0; i < 5; ++i) {
    const SampleOutcome outcome = i % 2 == 0 ? SampleOutcome::kMeasured : SampleOutcome::kStale;
    EXPECT_EQ(s->Offer([&ran, outcome] {
      ran.fetch_add(1);
      return outcome;
    }),
              OfferResult::kQueued);
  }
  s->WaitIdle();
  EXPECT_EQ(ran.load(), 5);
  const QualitySamplerStats st = s->stats();
  EXPECT_EQ(st.offered, 5u);
  EXPECT_EQ(st.queued, 5u);
  EXPECT_EQ(st.measured, 3u);
  EXPECT_EQ(st.stale, 2u);
  EXPECT_EQ(st.queue_depth, 0);
  EXPECT_EQ(st.dropped_queue_full + st.dropped_over_budget, 0u);
}

// The worker is held inside a job, so the queue fills deterministically:
// beyond its capacity every offer is dropped and counted, never waited on.
TEST(QualitySamplerTest, QueueIsBoundedAndDropsAreCounted) {
  auto s = Make(3, 1.0, absl::Seconds(10));
  ASSERT_NE(s, nullptr);
  absl::Notification entered, release;
  ASSERT_EQ(s->Offer([&] {
    entered.Notify();
    release.WaitForNotification();
    return SampleOutcome::kMeasured;
  }),
            OfferResult::kQueued);
  entered.WaitForNotification();
  auto quick = [] { return SampleOutcome::kMeasured; };
  for (int i = 0; i < 3; ++i) EXPECT_EQ(s->Offer(quick), OfferResult::kQueued);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(s->Offer(quick), OfferResult::kQueueFull);
  EXPECT_FALSE(s->Admits());  // full: a caller skips the copy
  EXPECT_EQ(s->stats().queue_depth, 3);
  EXPECT_EQ(s->stats().dropped_queue_full, 4u);
  release.Notify();
  s->WaitIdle();
  const QualitySamplerStats st = s->stats();
  EXPECT_EQ(st.measured, 4u);
  EXPECT_EQ(st.offered, 8u);
}

// No burst and no selection time: nothing may run. Selection time buys
// calibration time at the configured share.
TEST(QualitySamplerTest, CpuBudgetIsAShareOfSelectionTime) {
  auto s = Make(8, 0.05, absl::ZeroDuration());
  ASSERT_NE(s, nullptr);
  auto spin = [] {
    const int64_t t0 = ThreadCpuNanos();
    while (ThreadCpuNanos() - t0 < 2'000'000) {
    }
    return SampleOutcome::kMeasured;
  };
  EXPECT_EQ(s->Offer(spin), OfferResult::kOverBudget);
  EXPECT_FALSE(s->Admits());  // counted like a refused offer
  s->AddSelectionTime(100'000'000);
  EXPECT_TRUE(s->Admits());  // 100 ms of selection: 5 ms of calibration
  EXPECT_EQ(s->Offer(spin), OfferResult::kQueued);
  s->WaitIdle();
  // Spend the rest of the budget, then the next offer is refused.
  while (s->stats().cpu_ns < 5'000'000) {
    ASSERT_EQ(s->Offer(spin), OfferResult::kQueued);
    s->WaitIdle();
  }
  EXPECT_EQ(s->Offer(spin), OfferResult::kOverBudget);
  const QualitySamplerStats st = s->stats();
  EXPECT_EQ(st.dropped_over_budget, 3u);
  EXPECT_GE(st.cpu_ns, 5'000'000);
  EXPECT_EQ(st.selection_ns, 100'000'000);
}

TEST(QualitySamplerTest, DestructionDiscardsQueuedJobs) {
  auto s = Make(4, 1.0, absl::Seconds(10));
  ASSERT_NE(s, nullptr);
  absl::Notification entered, release;
  auto held = std::make_shared<int>(1);
  ASSERT_EQ(s->Offer([&] {
    entered.Notify();
    release.WaitForNotification();
    return SampleOutcome::kMeasured;
  }),
            OfferResult::kQueued);
  entered.WaitForNotification();
  std::atomic<int> ran{0};
  ASSERT_EQ(s->Offer([&ran, held] {
    ran.fetch_add(1);
    return SampleOutcome::kMeasured;
  }),
            OfferResult::kQueued);
  EXPECT_EQ(held.use_count(), 2);
  std::thread stopper([&] { s.reset(); });
  // The destructor takes the queue, then waits for the running job.
  while (held.use_count() != 1) std::this_thread::yield();
  release.Notify();
  stopper.join();
  EXPECT_EQ(ran.load(), 0);
}

TEST(QualitySamplerTest, BadOptionsNameTheOption) {
  QualitySamplerOptions o;
  o.queue_capacity = 0;
  EXPECT_THAT(QualitySampler::Create(o).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("queue_capacity")));
  o = {};
  o.cpu_share = 0;
  EXPECT_THAT(QualitySampler::Create(o).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("cpu_share")));
  o = {};
  o.burst = absl::Milliseconds(-1);
  EXPECT_THAT(QualitySampler::Create(o).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("burst")));
}

}  // namespace
}  // namespace icecache
