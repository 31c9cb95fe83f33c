#include "server/rpc/status.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache::rpc {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

TEST(StatusTest, OkMapsToOk) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_THAT(FromGrpcStatus(grpc::Status::OK), IsOk());
}

TEST(StatusTest, EveryCanonicalCodeRoundTripsWithItsMessage) {
  const std::pair<absl::StatusCode, grpc::StatusCode> kPairs[] = {
      {absl::StatusCode::kCancelled, grpc::StatusCode::CANCELLED},
      {absl::StatusCode::kUnknown, grpc::StatusCode::UNKNOWN},
      {absl::StatusCode::kInvalidArgument, grpc::StatusCode::INVALID_ARGUMENT},
      {absl::StatusCode::kDeadlineExceeded, grpc::StatusCode::DEADLINE_EXCEEDED},
      {absl::StatusCode::kNotFound, grpc::StatusCode::NOT_FOUND},
      {absl::StatusCode::kAlreadyExists, grpc::StatusCode::ALREADY_EXISTS},
      {absl::StatusCode::kPermissionDenied, grpc::StatusCode::PERMISSION_DENIED},
      {absl::StatusCode::kResourceExhausted, grpc::StatusCode::RESOURCE_EXHAUSTED},
      {absl::StatusCode::kFailedPrecondition, grpc::StatusCode::FAILED_PRECONDITION},
      {absl::StatusCode::kAborted, grpc::StatusCode::ABORTED},
      {absl::StatusCode::kOutOfRange, grpc::StatusCode::OUT_OF_RANGE},
      {absl::StatusCode::kUnimplemented, grpc::StatusCode::UNIMPLEMENTED},
      {absl::StatusCode::kInternal, grpc::StatusCode::INTERNAL},
      {absl::StatusCode::kUnavailable, grpc::StatusCode::UNAVAILABLE},
      {absl::StatusCode::kDataLoss, grpc::StatusCode::DATA_LOSS},
      {absl::StatusCode::kUnauthenticated, grpc::StatusCode::UNAUTHENTICATED},
  };
  for (const auto& [acode, gcode] : kPairs) {
    const absl::Status s(acode, "session abc not found");
    const grpc::Status g = ToGrpcStatus(s);
    EXPECT_EQ(g.error_code(), gcode) << absl::StatusCodeToString(acode);
    EXPECT_EQ(g.error_message(), "session abc not found");
    const absl::Status back = FromGrpcStatus(g);
    EXPECT_THAT(back, StatusIs(acode, "session abc not found"));
  }
}

TEST(StatusTest, NonCanonicalCodesBecomeUnknown) {
  const absl::Status odd(static_cast<absl::StatusCode>(77), "odd");
  EXPECT_EQ(ToGrpcStatus(odd).error_code(), grpc::StatusCode::UNKNOWN);
  EXPECT_EQ(ToGrpcStatus(odd).error_message(), "odd");
  // grpc::StatusCode has no fixed underlying type: its values (-1..16) make
  // -32..31 the only valid ones, and 99 was undefined behaviour (UBSan).
  // 30 is valid and not a canonical code.
  const grpc::Status godd(static_cast<grpc::StatusCode>(30), "odd");
  EXPECT_THAT(FromGrpcStatus(godd), StatusIs(absl::StatusCode::kUnknown, "odd"));
}

}  // namespace
}  // namespace icecache::rpc
