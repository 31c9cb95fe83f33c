#include "server/rpc/decode_step.h"

#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "server/rpc/convert.h"

namespace icecache::rpc {
namespace {

// One batched request: entries that convert run together in the core; each
// entry gets its own answer. Errors of the request itself are returned.
absl::Status DecodeBatchStep(SessionManager& manager, const Caller& caller,
                             const v1::DecodeStepRequest& req, const std::string& stream_buffer_id,
                             v1::DecodeStepResponse* resp) {
  RETURN_IF_ERROR(CheckDecodeBatchRequest(req));
  DecodeBatchEntry shared;
  ASSIGN_OR_RETURN(shared.select.layer, LayerIndex(req.layer()));
  ASSIGN_OR_RETURN(shared.select.params, SelectParamsFromProto(req.params()));
  ASSIGN_OR_RETURN(shared.select.granularity,
                   GranularityFromProto(req.params().granularity(), "params.granularity"));
  ASSIGN_OR_RETURN(shared.num_layers, LayerCount(req.num_layers()));
  std::vector<absl::StatusOr<DecodeBatchEntry>> converted;
  std::vector<DecodeBatchEntry> runnable;
  for (int i = 0; i < req.batch_size(); ++i) {
    converted.push_back(DecodeBatchEntryFromProto(req, i, shared, stream_buffer_id));
    if (converted.back().ok()) runnable.push_back(*converted.back());
  }
  std::vector<absl::StatusOr<DecodeStepResult>> results = manager.DecodeBatch(caller, runnable);
  resp->set_layer(req.layer());
  size_t next = 0;
  for (int i = 0; i < req.batch_size(); ++i) {
    v1::DecodeBatchResult* out = resp->add_batch();
    if (!converted[i].ok()) {
      out->set_session_id(req.batch(i).session_id());
      out->set_code(static_cast<int32_t>(converted[i].status().code()));
      out->set_message(std::string(converted[i].status().message()));
      continue;
    }
    DecodeBatchResultToProto(i, runnable[next], results[next], out, req.positions_as_bytes());
    ++next;
  }
  return absl::OkStatus();
}

// One layer of one session: the select request, then the core call.
absl::Status SingleStep(const ServiceDeps& deps, const Caller& caller,
                        const v1::DecodeStepRequest& req, const DecodeCursor& cursor,
                        v1::DecodeStepResponse* resp) {
  SelectRequest sr;
  ASSIGN_OR_RETURN(sr.layer, LayerIndex(req.layer()));
  ASSIGN_OR_RETURN(sr.queries,
                   QueriesFromProto(req.queries(), req.query_dtype(), req.reuse_group_selection()));
  ASSIGN_OR_RETURN(sr.params, SelectParamsFromProto(req.params()));
  ASSIGN_OR_RETURN(sr.granularity,
                   GranularityFromProto(req.params().granularity(), "params.granularity"));
  sr.reuse_group_selection = req.reuse_group_selection();
  ASSIGN_OR_RETURN(const int num_layers, LayerCount(req.num_layers()));
  ASSIGN_OR_RETURN(DecodeStepResult r,
                   deps.manager->DecodeStep(caller, cursor.session_id, sr, cursor.buffer_id,
                                            req.offset(), num_layers, DeviceWriteFromProto(req),
                                            req.prefetch_group(), req.in_place()));
  resp->set_layer(req.layer());
  for (size_t h = 0; h < r.selection.heads.size(); ++h) {
    SelectionToProto(r.selection.heads[h], static_cast<int>(h), resp->add_heads(),
                     req.positions_as_bytes());
  }
  resp->set_reused(r.selection.reused);
  resp->set_prefetching(r.prefetching);
  resp->set_prefetched(r.prefetched);
  resp->set_select_ns(static_cast<uint64_t>(r.select_ns));
  resp->set_gather_ns(static_cast<uint64_t>(r.gather_ns));
  resp->set_step_ns(static_cast<uint64_t>(r.step_ns));
  FetchLayoutToProto(r.layout, cursor.buffer_id, resp->mutable_layout(), req.positions_as_bytes());
  RecordFetchBytes(*deps.metrics, r.layout);
  return absl::OkStatus();
}

}  // namespace

absl::Status RequireId(absl::string_view id, absl::string_view field) {
  if (id.empty()) return absl::InvalidArgumentError(absl::StrCat(field, " is required"));
  if (id.size() > 256) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is longer than 256 bytes"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> LayerCount(uint32_t n) {
  if (n == 0) return 1;
  if (n > 4096) return absl::InvalidArgumentError(absl::StrCat("num_layers is too large: ", n));
  return static_cast<int>(n);
}

absl::StatusOr<int> LayerIndex(uint32_t layer) {
  if (layer > 1u << 20)
    return absl::InvalidArgumentError(absl::StrCat("layer is too large: ", layer));
  return static_cast<int>(layer);
}

absl::Status HandleDecodeMessage(const ServiceDeps& deps, const Caller& caller,
                                 const v1::DecodeStepRequest& req, DecodeCursor* cursor,
                                 v1::DecodeStepResponse* resp) {
  const auto t0 = std::chrono::steady_clock::now();
  resp->Clear();
  if (!req.buffer_id().empty()) cursor->buffer_id = req.buffer_id();
  const int64_t index = cursor->index++;
  if (req.batch_size() > 0) {
    RETURN_IF_ERROR(DecodeBatchStep(*deps.manager, caller, req, cursor->buffer_id, resp));
  } else {
    if (!req.session_id().empty()) cursor->session_id = req.session_id();
    if (cursor->session_id.empty() || cursor->buffer_id.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("DecodeStep request ", index,
                       ": session_id and buffer_id are required in the first request"));
    }
    RETURN_IF_ERROR(RequireId(cursor->session_id, "session_id"));
    RETURN_IF_ERROR(RequireId(cursor->buffer_id, "buffer_id"));
    RETURN_IF_ERROR(SingleStep(deps, caller, req, *cursor, resp));
  }
  deps.metrics->decode_step_seconds->WithLabels({})->Observe(SecondsSince(t0));
  return absl::OkStatus();
}

}  // namespace icecache::rpc
