// proto <-> core conversions for the icecache.v1 services. Pure functions,
// thread-safe. Conversions from proto validate what the proto type allows
// but the core type cannot hold (enum values, integer ranges, byte lengths)
// and answer InvalidArgument naming the field; range checks of meaning
// (layers 1..512, ...) are the core's (ValidateSessionConfig).
#ifndef ICECACHE_SERVER_RPC_CONVERT_H_
#define ICECACHE_SERVER_RPC_CONVERT_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "icecache/v1/admin.pb.h"
#include "icecache/v1/buffer.pb.h"
#include "icecache/v1/config.pb.h"
#include "icecache/v1/kv.pb.h"
#include "icecache/v1/types.pb.h"
#include "server/index/selector.h"
#include "server/session/session_types.h"
#include "server/transfer/buffer_registry.h"

namespace icecache::rpc {

// DType: UNSPECIFIED and unknown values are InvalidArgument naming `field`.
absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, absl::string_view field);
v1::DType DTypeToProto(DType dtype);

// UNSPECIFIED -> kMdci.
absl::StatusOr<SelectorKind> SelectorKindFromProto(v1::SelectorKind kind);
v1::SelectorKind SelectorKindToProto(SelectorKind kind);

// Daemon-wide selection defaults (IcecachedConfig.sessions).
struct SelectDefaults {
  int budget_tokens = 256;
  int sink_tokens = 4;
  int recent_tokens = 0;
  double target_mass_ratio = 0.95;  // MDCI sessions that leave it unset
};
SelectDefaults SelectDefaultsFromConfig(const v1::IcecachedConfig& config);

// Session config. `defaults` fill SessionConfig.defaults fields left unset so
// the session carries concrete defaults. InvalidArgument ("session config:
// <field> ...") for a missing model, bad enum, values beyond int range, a
// ttl_ms beyond 100 years, an explicit default budget of 0.
absl::StatusOr<SessionConfig> SessionConfigFromProto(const v1::SessionConfig& proto,
                                                     const SelectDefaults& defaults);
v1::SessionConfig SessionConfigToProto(const SessionConfig& config);
void SessionInfoToProto(const SessionInfo& info, v1::SessionInfo* out);
// AppendKvRequest.first_layer/num_layers; InvalidArgument above 4096 (the
// session checks the range against its model).
absl::StatusOr<LayerRange> LayerRangeFromProto(uint32_t first_layer, uint32_t num_layers);

// Per-call params: unset -> 0 (the core then takes the session default);
// explicit sink/recent 0 -> -1 (the core's "force 0"); values above 2^30
// are clamped to 2^30 (the core clamps them to the session's tokens).
// InvalidArgument for an explicit budget of 0.
absl::StatusOr<SelectParams> SelectParamsFromProto(const v1::SelectParams& proto);

// SelectParams.granularity: nullopt for UNSPECIFIED (the session's default).
// InvalidArgument naming `field` for an unknown value.
absl::StatusOr<std::optional<Granularity>> GranularityFromProto(v1::Granularity granularity,
                                                                absl::string_view field);
v1::Granularity GranularityToProto(Granularity granularity);

// Query bytes of `dtype` (UNSPECIFIED = FLOAT32) to fp32. InvalidArgument
// when the length is not a multiple of the element size or is empty (and
// `allow_empty` is false). Shape (q_heads x head_dim) is checked by the core.
absl::StatusOr<std::vector<float>> QueriesFromProto(const std::string& bytes, v1::DType dtype,
                                                    bool allow_empty);

// `positions_as_bytes` (DecodeStepRequest.positions_as_bytes): the positions
// into positions_le (little-endian int32s) instead of the repeated field;
// likewise for FetchLayoutToProto and DecodeBatchResultToProto.
void SelectionToProto(const Selection& selection, int kv_head, v1::HeadSelection* out,
                      bool positions_as_bytes = false);

// Batched DecodeStep. InvalidArgument (ending the stream) when the request
// sets its own session_id, queries, offset or reuse_group_selection beside
// `batch`, or lists more than kMaxDecodeBatch entries.
inline constexpr int kMaxDecodeBatch = 1024;
absl::Status CheckDecodeBatchRequest(const v1::DecodeStepRequest& req);
// One entry of a batch, converted alone (its error names the entry and its
// session); `shared` holds the request's layer, params and num_layers, and
// `stream_buffer_id` the buffer of the stream when the entry names none.
absl::StatusOr<DecodeBatchEntry> DecodeBatchEntryFromProto(const v1::DecodeStepRequest& req,
                                                           int index,
                                                           const DecodeBatchEntry& shared,
                                                           absl::string_view stream_buffer_id);
// The answer to entry `index` (an error is prefixed with the entry and its
// session, in the caller's words).
void DecodeBatchResultToProto(int index, const DecodeBatchEntry& entry,
                              const absl::StatusOr<DecodeStepResult>& result,
                              v1::DecodeBatchResult* out, bool positions_as_bytes = false);
void FetchLayoutToProto(const FetchLayout& layout, absl::string_view buffer_id,
                        v1::FetchLayout* out, bool positions_as_bytes = false);

// FetchPagesRequest.heads -> pages per KV head. InvalidArgument unless the
// heads are listed once each, kv_head 0..n-1 in order.
absl::StatusOr<std::vector<std::vector<uint32_t>>> FetchPagesFromProto(
    const google::protobuf::RepeatedPtrField<v1::HeadPages>& heads);
// FetchPagesRequest.heads -> token positions per KV head (token
// granularity); empty when no head lists tokens. InvalidArgument when some
// heads list tokens and others do not, or a head lists pages and tokens.
absl::StatusOr<std::vector<std::vector<int32_t>>> FetchTokensFromProto(
    const google::protobuf::RepeatedPtrField<v1::HeadPages>& heads);

void TenantInfoToProto(const TenantInfo& info, v1::TenantInfo* out);
void StatsToProto(const ManagerStats& stats, const std::vector<TenantInfo>& tenants,
                  int64_t start_unix_ms, v1::GetStatsResponse* out);
void BufferInfoToProto(const BufferInfo& info, v1::RegisterBufferResponse* out);
// cuda_ipc.paged_kv -> the core's layout. InvalidArgument for an unset or
// unknown format or dtype (naming the field); the shape is checked by
// BufferRegistry::RegisterCudaIpc.
absl::StatusOr<PagedKvLayout> PagedKvFromProto(const v1::PagedKvCache& m);
// block_ids / wait_event / done_event of FetchPages and DecodeStep.
template <typename Request>
DeviceWrite DeviceWriteFromProto(const Request& req) {
  DeviceWrite d;
  d.block_ids.assign(req.block_ids().begin(), req.block_ids().end());
  d.wait_event = req.wait_event();
  d.done_event = req.done_event();
  return d;
}

// Quota in the API (0 = none) <-> the core (kUnlimitedQuota = none).
uint64_t QuotaFromProto(uint64_t quota_bytes);
uint64_t QuotaToProto(uint64_t quota_bytes);

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_CONVERT_H_
