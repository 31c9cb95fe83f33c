#include "server/session/decode_activity.h"

#include <atomic>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace icecache {
namespace {

TEST(DecodeActivityTest, NoCallInFlightDoesNotWait) {
  DecodeActivity a;
  EXPECT_FALSE(a.busy());
  EXPECT_FALSE(a.WaitQuiet(absl::Seconds(10)));
  EXPECT_EQ(a.waits(), 0);
  { const DecodeActivity::Call call(nullptr); }  // a null activity: nothing counted
  EXPECT_FALSE(a.busy());
}

TEST(DecodeActivityTest, WaitsUntilTheLastCallEnds) {
  DecodeActivity a;
  auto first = std::make_unique<DecodeActivity::Call>(&a);
  auto second = std::make_unique<DecodeActivity::Call>(&a);
  EXPECT_TRUE(a.busy());
  absl::Notification started;
  std::atomic<bool> returned{false};
  std::thread waiter([&] {
    started.Notify();
    EXPECT_TRUE(a.WaitQuiet(absl::Seconds(60)));
    returned.store(true);
  });
  started.WaitForNotification();
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_FALSE(returned.load());
  first.reset();  // one call still in flight
  absl::SleepFor(absl::Milliseconds(50));
  EXPECT_FALSE(returned.load());
  second.reset();
  waiter.join();
  EXPECT_TRUE(returned.load());
  EXPECT_FALSE(a.busy());
  EXPECT_EQ(a.waits(), 1);
  EXPECT_EQ(a.timeouts(), 0);
}

TEST(DecodeActivityTest, GivesUpAtTheLimitWhileCallsGoOn) {
  DecodeActivity a;
  const DecodeActivity::Call call(&a);
  const absl::Time t0 = absl::Now();
  EXPECT_TRUE(a.WaitQuiet(absl::Milliseconds(20)));
  EXPECT_GE(absl::Now() - t0, absl::Milliseconds(20));
  EXPECT_EQ(a.waits(), 1);
  EXPECT_EQ(a.timeouts(), 1);
}

}  // namespace
}  // namespace icecache
