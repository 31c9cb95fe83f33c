#include "server/session/quality_sampler.h"

#include <atomic>
#include <memory>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

// A sampler of options `o` at the normal priority (null, and a failure,
// where they are refused).
std::unique_ptr<QualitySampler> Created(QualitySamplerOptions o) {
  o.low_priority = false;
  auto s = QualitySampler::Create(o);
  EXPECT_THAT(s.status(), IsOk());
  return s.ok() ? std::move(s).value() : nullptr;
}

std::unique_ptr<QualitySampler> Make(int capacity, double share, absl::Duration burst) {
  QualitySamplerOptions o;
  o.queue_capacity = capacity;
  o.cpu_share = share;
  o.burst = burst;
  return Created(o);
}

// A job that spends `ns` of the worker's thread CPU time.
QualitySampler::Job Spin(int64_t ns) {
  return [ns] {
    const int64_t t0 = ThreadCpuNanos();
    while (ThreadCpuNanos() - t0 < ns) {
    }
    return SampleOutcome::kMeasured;
  };
}

TEST(QualitySamplerTest, RunsQueuedJobsAndCountsOutcomes) {
  auto s = Make(64, 1.0, absl::Seconds(10));
  ASSERT_NE(s, nullptr);
  auto account = s->NewAccount();
  std::atomic<int> ran{0};
  for (int i = 0; i < 5; ++i) {
    const SampleOutcome outcome = i % 2 == 0 ? SampleOutcome::kMeasured : SampleOutcome::kStale;
    EXPECT_EQ(s->Offer(
                  [&ran, outcome] {
                    ran.fetch_add(1);
                    return outcome;
                  },
                  account),
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

// Holds the worker inside a job of its own account until Release().
struct HeldWorker {
  absl::Notification entered, release;
  void Hold(QualitySampler& s) {
    ASSERT_EQ(s.Offer(
                  [this] {
                    entered.Notify();
                    release.WaitForNotification();
                    return SampleOutcome::kMeasured;
                  },
                  s.NewAccount()),
              OfferResult::kQueued);
    entered.WaitForNotification();
  }
};

// The worker is held inside a job, so the queue fills deterministically:
// beyond its capacity every offer is dropped and counted, never waited on.
// One account per job here: an account's own share is the next test.
TEST(QualitySamplerTest, QueueIsBoundedAndDropsAreCounted) {
  auto s = Make(3, 1.0, absl::Seconds(10));
  ASSERT_NE(s, nullptr);
  HeldWorker held;
  ASSERT_NO_FATAL_FAILURE(held.Hold(*s));
  auto quick = [] { return SampleOutcome::kMeasured; };
  for (int i = 0; i < 3; ++i) EXPECT_EQ(s->Offer(quick, s->NewAccount()), OfferResult::kQueued);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(s->Offer(quick, s->NewAccount()), OfferResult::kQueueFull);
  EXPECT_FALSE(s->Admits(*s->NewAccount()));  // full: a caller skips the copy
  EXPECT_EQ(s->stats().queue_depth, 3);
  EXPECT_EQ(s->stats().dropped_queue_full, 4u);
  held.release.Notify();
  s->WaitIdle();
  const QualitySamplerStats st = s->stats();
  EXPECT_EQ(st.measured, 4u);
  EXPECT_EQ(st.offered, 8u);
}

// The last quarter of the queue is kept for accounts under their quarter:
// a session whose heads are all due at once cannot keep the queue full for
// the others, and alone it still fills three quarters.
TEST(QualitySamplerTest, OneAccountLeavesAQuarterOfTheQueueToOthers) {
  auto s = Make(8, 1.0, absl::Seconds(10));
  ASSERT_NE(s, nullptr);
  ASSERT_EQ(s->account_queue_limit(), 2);
  HeldWorker held;
  ASSERT_NO_FATAL_FAILURE(held.Hold(*s));
  auto quick = [] { return SampleOutcome::kMeasured; };
  auto a = s->NewAccount();
  auto b = s->NewAccount();
  for (int i = 0; i < 6; ++i) EXPECT_EQ(s->Offer(quick, a), OfferResult::kQueued);
  EXPECT_FALSE(s->Admits(*a));
  EXPECT_EQ(s->Offer(quick, a), OfferResult::kQueueFull);
  EXPECT_EQ(a->queued.load(), 6);
  for (int i = 0; i < 2; ++i) {
    EXPECT_TRUE(s->Admits(*b));  // the kept quarter
    EXPECT_EQ(s->Offer(quick, b), OfferResult::kQueued);
  }
  EXPECT_EQ(s->Offer(quick, s->NewAccount()), OfferResult::kQueueFull);  // now full
  EXPECT_EQ(s->stats().dropped_queue_full, 2u);
  held.release.Notify();
  s->WaitIdle();
  EXPECT_EQ(a->queued.load(), 0);
  EXPECT_TRUE(s->Admits(*a));  // its jobs ran: room again
  EXPECT_EQ(s->stats().measured, 9u);
}

// No burst and no selection time: nothing may run. Selection time buys
// calibration time at the configured share.
TEST(QualitySamplerTest, CpuBudgetIsAShareOfSelectionTime) {
  auto s = Make(8, 0.05, absl::ZeroDuration());
  ASSERT_NE(s, nullptr);
  auto a = s->NewAccount();
  const QualitySampler::Job spin = Spin(2'000'000);
  EXPECT_EQ(s->Offer(spin, a), OfferResult::kOverBudget);
  EXPECT_FALSE(s->Admits(*a));  // counted like a refused offer
  s->AddSelectionTime(100'000'000, *a);
  EXPECT_TRUE(s->Admits(*a));  // 100 ms of selection: 5 ms of calibration
  EXPECT_EQ(s->Offer(spin, a), OfferResult::kQueued);
  s->WaitIdle();
  // Spend the rest of the budget, then the next offer is refused.
  while (s->stats().cpu_ns < 5'000'000) {
    ASSERT_EQ(s->Offer(spin, a), OfferResult::kQueued);
    s->WaitIdle();
  }
  EXPECT_EQ(s->Offer(spin, a), OfferResult::kOverBudget);
  const QualitySamplerStats st = s->stats();
  EXPECT_EQ(st.dropped_over_budget, 3u);
  EXPECT_GE(st.cpu_ns, 5'000'000);
  EXPECT_EQ(st.cpu_ns, a->cpu_ns.load());  // the job's CPU, charged to both
  EXPECT_EQ(st.selection_ns, 100'000'000);
}

// Each account has its own warm-up burst: one that spent it is refused
// while a fresh one is admitted (a global budget refused both).
TEST(QualitySamplerTest, BurstIsPerAccount) {
  auto s = Make(8, 0.05, absl::Milliseconds(1));
  ASSERT_NE(s, nullptr);
  auto first = s->NewAccount();
  ASSERT_EQ(s->Offer(Spin(2'000'000), first), OfferResult::kQueued);
  s->WaitIdle();
  EXPECT_GE(first->cpu_ns.load(), 2'000'000);
  EXPECT_FALSE(s->Admits(*first));
  EXPECT_EQ(s->Offer(Spin(1), first), OfferResult::kOverBudget);
  auto later = s->NewAccount();
  EXPECT_TRUE(s->Admits(*later));
  EXPECT_EQ(s->Offer(Spin(1), later), OfferResult::kQueued);
  s->WaitIdle();
  EXPECT_EQ(s->stats().measured, 2u);
  // An account resumed where a restored session's counters stood (its
  // burst spent) gets no second burst.
  auto restored = s->NewAccount(/*selection_ns=*/0, /*cpu_ns=*/2'000'000);
  EXPECT_FALSE(s->Admits(*restored));
}

// A job offered without the burst (Offer(..., burst=false), the caller's
// fair share of it spent) waits for the account's share of selection time.
TEST(QualitySamplerTest, AJobWithoutTheBurstWaitsForTheShare) {
  auto s = Make(8, 0.05, absl::Seconds(10));
  ASSERT_NE(s, nullptr);
  auto account = s->NewAccount();
  EXPECT_TRUE(s->Admits(*account, /*burst=*/true));
  EXPECT_FALSE(s->Admits(*account, /*burst=*/false));
  EXPECT_EQ(s->Offer(Spin(1), account, /*burst=*/false), OfferResult::kOverBudget);
  EXPECT_EQ(s->Offer(Spin(1), account, /*burst=*/true), OfferResult::kQueued);
  s->AddSelectionTime(100'000'000, *account);  // buys 5 ms of share
  EXPECT_TRUE(s->Admits(*account, /*burst=*/false));
  EXPECT_EQ(s->Offer(Spin(1), account, /*burst=*/false), OfferResult::kQueued);
  s->WaitIdle();
  EXPECT_EQ(s->stats().measured, 2u);
  EXPECT_EQ(s->stats().dropped_over_budget, 2u);  // the Admits and the Offer
  EXPECT_EQ(s->burst(), absl::Seconds(10));
}

// Selection time raises only its own account's allowance.
TEST(QualitySamplerTest, SelectionTimeBuysOnlyItsOwnAccount) {
  auto s = Make(8, 0.05, absl::ZeroDuration());
  ASSERT_NE(s, nullptr);
  auto busy = s->NewAccount();
  auto idle = s->NewAccount();
  s->AddSelectionTime(100'000'000, *busy);
  EXPECT_TRUE(s->Admits(*busy));
  EXPECT_FALSE(s->Admits(*idle));
  EXPECT_EQ(s->Offer(Spin(1), idle), OfferResult::kOverBudget);
  EXPECT_EQ(busy->selection_ns.load(), 100'000'000);
  EXPECT_EQ(idle->selection_ns.load(), 0);
  EXPECT_EQ(s->stats().selection_ns, 100'000'000);  // the global sum stays
}

TEST(QualitySamplerTest, DestructionDiscardsQueuedJobs) {
  auto s = Make(4, 1.0, absl::Seconds(10));
  ASSERT_NE(s, nullptr);
  HeldWorker worker;
  ASSERT_NO_FATAL_FAILURE(worker.Hold(*s));
  auto held = std::make_shared<int>(1);
  std::atomic<int> ran{0};
  ASSERT_EQ(s->Offer(
                [&ran, held] {
                  ran.fetch_add(1);
                  return SampleOutcome::kMeasured;
                },
                s->NewAccount()),
            OfferResult::kQueued);
  EXPECT_EQ(held.use_count(), 2);
  std::thread stopper([&] { s.reset(); });
  // The destructor takes the queue, then waits for the running job.
  while (held.use_count() != 1) std::this_thread::yield();
  worker.release.Notify();
  stopper.join();
  EXPECT_EQ(ran.load(), 0);
}

// A sampler that gives way to `activity`'s calls for up to `max` a wait.
std::unique_ptr<QualitySampler> MakeDeferring(DecodeActivity* activity, absl::Duration max) {
  QualitySamplerOptions o;
  o.defer_to = activity;
  o.defer_max = max;
  return Created(o);
}

// Queues a job that sets *ran.
void OfferFlag(QualitySampler& s, std::atomic<bool>* ran) {
  ASSERT_EQ(s.Offer(
                [ran] {
                  ran->store(true);
                  return SampleOutcome::kMeasured;
                },
                s.NewAccount()),
            OfferResult::kQueued);
}

// A job offered while a decode call is in flight starts once the call ends,
// not before (QualitySamplerOptions::defer_to).
TEST(QualitySamplerTest, AJobWaitsForTheDecodeCallInFlight) {
  DecodeActivity activity;
  std::unique_ptr<QualitySampler> s = MakeDeferring(&activity, absl::Seconds(60));
  ASSERT_NE(s, nullptr);
  auto call = std::make_unique<DecodeActivity::Call>(&activity);
  EXPECT_TRUE(s->ShouldDefer());
  std::atomic<bool> ran{false};
  OfferFlag(*s, &ran);
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_FALSE(ran.load());
  call.reset();
  s->WaitIdle();
  EXPECT_TRUE(ran.load());
  EXPECT_FALSE(s->ShouldDefer());
  EXPECT_EQ(s->stats().deferred, 1);
  EXPECT_EQ(s->stats().defer_timeouts, 0);
}

// Under calls that never end, the worker still runs its job after defer_max.
TEST(QualitySamplerTest, ADeferredJobRunsAfterTheLimit) {
  DecodeActivity activity;
  std::unique_ptr<QualitySampler> s = MakeDeferring(&activity, absl::Milliseconds(20));
  ASSERT_NE(s, nullptr);
  const DecodeActivity::Call call(&activity);
  std::atomic<bool> ran{false};
  OfferFlag(*s, &ran);
  s->WaitIdle();
  EXPECT_TRUE(ran.load());
  EXPECT_EQ(s->stats().defer_timeouts, 1);
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
  o = {};
  o.defer_max = absl::Milliseconds(-1);
  EXPECT_THAT(QualitySampler::Create(o).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("defer_max")));
}

}  // namespace
}  // namespace icecache
