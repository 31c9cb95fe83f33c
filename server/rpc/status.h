// The one conversion between absl::Status and grpc::Status (docs/architecture.md §8).
// Canonical codes map one to one (absl::StatusCode and grpc::StatusCode share
// numbering); the message travels unchanged. Thread-safe, pure functions.
#ifndef ICECACHE_SERVER_RPC_STATUS_H_
#define ICECACHE_SERVER_RPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace icecache::rpc {

grpc::Status ToGrpcStatus(const absl::Status& status);
// Codes outside the canonical range become UNKNOWN.
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_STATUS_H_
