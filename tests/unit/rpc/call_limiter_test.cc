#include "server/rpc/call_limiter.h"

#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache::rpc {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(CallLimiterTest, ATenantGetsAtMostItsShareAndOthersStillGetIn) {
  CallLimiter limiter(/*per_tenant=*/2, /*total=*/5);
  std::vector<CallTicket> held;
  for (int i = 0; i < 2; ++i) {
    auto t = limiter.Acquire("a");
    ASSERT_THAT(t, IsOk());
    held.push_back(*std::move(t));
  }
  EXPECT_THAT(limiter.Acquire("a"), StatusIs(absl::StatusCode::kResourceExhausted,
                                             HasSubstr("limits.max_calls_per_tenant")));
  EXPECT_THAT(limiter.Acquire("a"), StatusIs(absl::StatusCode::kResourceExhausted,
                                             HasSubstr("tenant 'a' already has 2 calls")));
  auto b = limiter.Acquire("b");
  EXPECT_THAT(b, IsOk());
  EXPECT_EQ(limiter.in_flight("a"), 2);
  EXPECT_EQ(limiter.in_flight("b"), 1);
  EXPECT_EQ(limiter.in_flight_total(), 3);
}

TEST(CallLimiterTest, TheTotalCapsAllTenantsTogether) {
  CallLimiter limiter(/*per_tenant=*/2, /*total=*/3);
  std::vector<CallTicket> held;
  for (const char* tenant : {"a", "a", "b"}) {
    auto t = limiter.Acquire(tenant);
    ASSERT_THAT(t, IsOk());
    held.push_back(*std::move(t));
  }
  EXPECT_THAT(limiter.Acquire("c"),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("limits.reserved_calls")));
  EXPECT_EQ(limiter.in_flight("c"), 0);
  held.pop_back();
  EXPECT_THAT(limiter.Acquire("c"), IsOk());
}

TEST(CallLimiterTest, ATicketReturnsItsPlaceWhenDestroyedOrMovedOver) {
  CallLimiter limiter(/*per_tenant=*/1, /*total=*/4);
  {
    auto t = limiter.Acquire("a");
    ASSERT_THAT(t, IsOk());
    CallTicket moved = *std::move(t);
    EXPECT_EQ(limiter.in_flight("a"), 1);
    CallTicket other;
    other = std::move(moved);
    EXPECT_EQ(limiter.in_flight("a"), 1);
  }
  EXPECT_EQ(limiter.in_flight("a"), 0);
  EXPECT_EQ(limiter.in_flight_total(), 0);
  EXPECT_THAT(limiter.Acquire("a"), IsOk());
}

}  // namespace
}  // namespace icecache::rpc
