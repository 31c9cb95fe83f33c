// Request validation and proto-to-core conversion for the RPCs: the first
// byte picks a message, the rest is parsed as that message (wire format)
// and handed to the converters the handlers call. Every input must give a
// value or a status; no crash, no undefined behaviour, no huge allocation.
#include <cstddef>
#include <cstdint>
#include <string>

#include "icecache/v1/kv.pb.h"
#include "icecache/v1/session.pb.h"
#include "server/rpc/convert.h"

namespace {

using namespace icecache;       // NOLINT: a fuzz target
using namespace icecache::rpc;  // NOLINT

template <typename M>
bool Parse(const uint8_t* data, size_t size, M* m) {
  return m->ParseFromArray(data, static_cast<int>(size));
}

void Session(const uint8_t* data, size_t size) {
  v1::CreateSessionRequest req;
  if (!Parse(data, size, &req)) return;
  auto c = SessionConfigFromProto(req.config(), SelectDefaults{});
  if (c.ok()) (void)SessionConfigToProto(*c);
}

void Select(const uint8_t* data, size_t size) {
  v1::SelectPagesRequest req;
  if (!Parse(data, size, &req)) return;
  (void)SelectParamsFromProto(req.params());
  (void)QueriesFromProto(req.queries(), req.query_dtype(), req.reuse_group_selection());
}

void Fetch(const uint8_t* data, size_t size) {
  v1::FetchPagesRequest req;
  if (!Parse(data, size, &req)) return;
  (void)FetchPagesFromProto(req.heads());
}

void Append(const uint8_t* data, size_t size) {
  v1::AppendKvRequest req;
  if (!Parse(data, size, &req)) return;
  (void)LayerRangeFromProto(req.first_layer(), req.num_layers());
}

void Decode(const uint8_t* data, size_t size) {
  v1::DecodeStepRequest req;
  if (!Parse(data, size, &req)) return;
  (void)SelectParamsFromProto(req.params());
  (void)QueriesFromProto(req.queries(), req.query_dtype(), req.reuse_group_selection());
  if (!CheckDecodeBatchRequest(req).ok()) return;
  DecodeBatchEntry shared;
  for (int i = 0; i < req.batch_size(); ++i) {
    (void)DecodeBatchEntryFromProto(req, i, shared, "stream-buffer");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t which = data[0] % 5;
  ++data;
  --size;
  switch (which) {
    case 0:
      Session(data, size);
      break;
    case 1:
      Select(data, size);
      break;
    case 2:
      Fetch(data, size);
      break;
    case 3:
      Append(data, size);
      break;
    default:
      Decode(data, size);
      break;
  }
  return 0;
}
