#include "server/session/decode_lanes.h"

#include <atomic>
#include <chrono>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

// Index 0 returns only once index 1 has started: true when both ran at once
// (a helper beside the caller), false after `patience` without it.
bool RanTwoAtOnce(DecodeLanes& lanes, absl::Duration patience) {
  std::atomic<bool> second{false};
  std::atomic<bool> together{false};
  EXPECT_THAT(lanes.Run(2,
                        [&](int64_t i) {
                          if (i == 1) {
                            second.store(true);
                            return absl::OkStatus();
                          }
                          const absl::Time until = absl::Now() + patience;
                          while (!second.load() && absl::Now() < until) std::this_thread::yield();
                          together.store(second.load());
                          return absl::OkStatus();
                        }),
              IsOk());
  return together.load();
}

TEST(DecodeLanesTest, RunsEveryIndexOnceAndTheCallerSeesTheTasksWrites) {
  for (int helpers : {1, 3}) {
    DecodeLanes lanes(helpers, absl::Milliseconds(1));
    for (int round = 0; round < 200; ++round) {
      // Plain data, no atomics: under TSan the job's hand-over must carry
      // the caller's writes to the helpers and theirs back.
      std::vector<int64_t> in(8 + round % 5), out(in.size(), 0);
      for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int64_t>(i) * (round + 1);
      ASSERT_THAT(lanes.Run(static_cast<int64_t>(in.size()),
                            [&](int64_t i) {
                              out[i] += in[i] + 1;
                              return absl::OkStatus();
                            }),
                  IsOk());
      for (size_t i = 0; i < out.size(); ++i) {
        ASSERT_EQ(out[i], static_cast<int64_t>(i) * (round + 1) + 1)
            << "helpers " << helpers << " round " << round << " index " << i;
      }
    }
    EXPECT_EQ(lanes.jobs(), 200);
    EXPECT_EQ(lanes.fallbacks(), 0);
  }
}

TEST(DecodeLanesTest, AWatchingHelperRunsBesideTheCaller) {
  DecodeLanes lanes(1, absl::Seconds(5));
  EXPECT_TRUE(RanTwoAtOnce(lanes, absl::Seconds(30)));
  EXPECT_TRUE(RanTwoAtOnce(lanes, absl::Seconds(30)));
  EXPECT_GE(lanes.helper_tasks(), 2);
  EXPECT_EQ(lanes.jobs_alone(), 0);  // the helper ran a task of both jobs
}

// A job the caller finishes before a sleeping helper wakes counts as run
// alone (icecache_decode_lane_jobs_alone_total).
TEST(DecodeLanesTest, AJobTheCallerRanAloneIsCounted) {
  DecodeLanes lanes(1, absl::Microseconds(1));
  for (int round = 0; round < 5; ++round) {
    absl::SleepFor(absl::Milliseconds(20));  // past the watch: the helper sleeps
    ASSERT_THAT(lanes.Run(2, [](int64_t) { return absl::OkStatus(); }), IsOk());
  }
  EXPECT_EQ(lanes.jobs(), 5);
  EXPECT_GE(lanes.jobs_alone(), 1);  // two empty tasks take less than a wake-up
  EXPECT_LE(lanes.jobs_alone(), 5);
}

TEST(DecodeLanesTest, ASleepingHelperIsWokenForTheNextJob) {
  DecodeLanes lanes(1, absl::Microseconds(1));
  for (int round = 0; round < 3; ++round) {
    absl::SleepFor(absl::Milliseconds(20));  // well past the watch: the helper sleeps
    EXPECT_TRUE(RanTwoAtOnce(lanes, absl::Seconds(30))) << "round " << round;
  }
}

// Whether `done()` became true within `patience`, looking every millisecond.
template <typename Done>
bool Within(absl::Duration patience, Done done) {
  const absl::Time until = absl::Now() + patience;
  while (!done()) {
    if (absl::Now() >= until) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

// A decode loop's calls that run no job (a layer group's later layers) keep
// the helpers awake: KeepWatching wakes sleeping ones, they watch for the
// spin from then, and sleep again once it has passed with no job or call.
TEST(DecodeLanesTest, KeepWatchingWakesSleepingHelpersForOneWatch) {
  DecodeLanes lanes(2, absl::Milliseconds(50));
  for (int round = 0; round < 3; ++round) {
    ASSERT_TRUE(Within(absl::Seconds(30), [&] { return lanes.sleeping() == 2; }))
        << "round " << round << ": the helpers sleep once their watch has passed";
    lanes.KeepWatching();
    EXPECT_TRUE(Within(absl::Seconds(30), [&] { return lanes.sleeping() == 0; }))
        << "round " << round << ": both woke to watch";
  }
  // Watching, they take a job's tasks; then they sleep again.
  lanes.KeepWatching();
  EXPECT_TRUE(RanTwoAtOnce(lanes, absl::Seconds(30)));
  EXPECT_TRUE(Within(absl::Seconds(30), [&] { return lanes.sleeping() == 2; }));
  EXPECT_EQ(lanes.jobs(), 1);
}

TEST(DecodeLanesTest, TheLowestFailingIndexsErrorComesBackNumbered) {
  DecodeLanes lanes(2, absl::Milliseconds(1));
  for (int round = 0; round < 50; ++round) {
    const absl::Status s = lanes.Run(8, [](int64_t i) {
      if (i == 3 || i == 6) return absl::NotFoundError(absl::StrCat("no head ", i));
      return absl::OkStatus();
    });
    ASSERT_THAT(s, StatusIs(absl::StatusCode::kNotFound, HasSubstr("task 3: no head 3")));
  }
  // The lanes serve the next job as before.
  std::atomic<int> ran{0};
  EXPECT_THAT(lanes.Run(8,
                        [&](int64_t) {
                          ran.fetch_add(1);
                          return absl::OkStatus();
                        }),
              IsOk());
  EXPECT_EQ(ran.load(), 8);
}

TEST(DecodeLanesTest, AThrowingTaskIsAnErrorNotACrash) {
  DecodeLanes lanes(1, absl::Milliseconds(1));
  for (int round = 0; round < 20; ++round) {
    EXPECT_THAT(lanes.Run(4,
                          [](int64_t i) -> absl::Status {
                            if (i == 2) throw std::bad_alloc();
                            return absl::OkStatus();
                          }),
                StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("task 2: out of memory")));
    EXPECT_THAT(
        lanes.Run(4,
                  [](int64_t i) -> absl::Status {
                    if (i == 1) throw std::runtime_error("boom");
                    return absl::OkStatus();
                  }),
        StatusIs(absl::StatusCode::kInternal, HasSubstr("task 1: parallel task failed: boom")));
  }
}

TEST(DecodeLanesTest, ConcurrentCallersAllFinishAndTheOverflowRunsOnTheSharedPool) {
  DecodeLanes lanes(1, absl::Milliseconds(1));
  constexpr int kCallers = 4, kRounds = 100;
  std::vector<std::thread> callers;
  std::atomic<int> wrong{0};
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      for (int round = 0; round < kRounds; ++round) {
        std::vector<int> out(8, 0);
        const absl::Status s = lanes.Run(8, [&](int64_t i) {
          out[i] = c * 1000 + round + static_cast<int>(i);
          return absl::OkStatus();
        });
        for (int i = 0; i < 8; ++i) {
          if (!s.ok() || out[i] != c * 1000 + round + i) wrong.fetch_add(1);
        }
      }
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(lanes.jobs() + lanes.fallbacks(), kCallers * kRounds);
}

TEST(DecodeLanesTest, BadArgumentsAreRefusedAsParallelForRefusesThem) {
  DecodeLanes lanes(1, absl::Milliseconds(1));
  EXPECT_THAT(lanes.Run(-1, [](int64_t) { return absl::OkStatus(); }),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(lanes.Run(4, nullptr), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(lanes.Run(0, [](int64_t) { return absl::OkStatus(); }), IsOk());
  int ran = 0;
  EXPECT_THAT(lanes.Run(1,
                        [&](int64_t) {
                          ++ran;  // one task runs on the caller
                          return absl::OkStatus();
                        }),
              IsOk());
  EXPECT_EQ(ran, 1);
}

TEST(DecodeLanesTest, StopsWhetherItsHelpersWatchOrSleep) {
  { DecodeLanes watching(2, absl::Seconds(10)); }
  {
    DecodeLanes sleeping(2, absl::Microseconds(1));
    absl::SleepFor(absl::Milliseconds(10));
  }
  DecodeLanes used(2, absl::Seconds(10));
  EXPECT_THAT(used.Run(4, [](int64_t) { return absl::OkStatus(); }), IsOk());
}

}  // namespace
}  // namespace icecache
