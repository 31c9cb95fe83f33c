// Google Benchmark of a DecodeStep answer's protobuf coding (the daemon's
// serialization, the client's parse), with the token positions as packed
// varints (the repeated fields) against little-endian int32 bytes
// (DecodeStepRequest.positions_as_bytes). The shape is a decode step's at
// token granularity: 8 KV heads, budget 256 tokens packed into 16 slots of
// 16, positions spread over a 32768-token context, in the selection and in
// the layout. Figures are printed, never asserted. Run:
//   build/tests/bench/icecache-proto-bench
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "icecache/v1/kv.pb.h"
#include "server/index/selector.h"
#include "server/rpc/convert.h"
#include "server/transfer/gather.h"

namespace icecache::rpc {
namespace {

constexpr int kHeads = 8, kTokens = 256, kPageTokens = 16, kContext = 32768;

v1::DecodeStepResponse Answer(bool as_bytes) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> pos(0, kContext - 1);
  v1::DecodeStepResponse r;
  FetchLayout l;
  l.page_tokens = kPageTokens;
  l.head_dim = 128;
  l.frame_bytes = 2 * kPageTokens * 128 * 2;
  for (int h = 0; h < kHeads; ++h) {
    Selection s;
    FetchHeadLayout hl;
    hl.kv_head = h;
    for (int p = 0; p < kTokens / kPageTokens; ++p) {
      s.pages.push_back(0xffffffffu);
      s.fills.push_back(kPageTokens);
      s.scores.push_back(0.01f * static_cast<float>(p));
      const uint32_t slot = static_cast<uint32_t>(h * (kTokens / kPageTokens) + p);
      hl.slots.push_back({0xffffffffu, slot, kPageTokens, slot * l.frame_bytes + (1u << 20)});
    }
    for (int t = 0; t < kTokens; ++t) s.positions.push_back(pos(rng));
    hl.positions = s.positions;
    l.heads.push_back(hl);
    SelectionToProto(s, h, r.add_heads(), as_bytes);
  }
  FetchLayoutToProto(l, "0123456789abcdef0123456789abcdef", r.mutable_layout(), as_bytes);
  return r;
}

void BM_SerializeAnswer(benchmark::State& state) {
  const v1::DecodeStepResponse r = Answer(state.range(0) != 0);
  std::string out;
  for (auto _ : state) {
    out.resize(r.ByteSizeLong());
    r.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(out.data()));
    benchmark::DoNotOptimize(out.data());
  }
  state.SetLabel(state.range(0) ? "positions_le" : "packed varints");
  state.counters["bytes"] = static_cast<double>(out.size());
}
BENCHMARK(BM_SerializeAnswer)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

void BM_ParseAnswer(benchmark::State& state) {
  const std::string bytes = Answer(state.range(0) != 0).SerializeAsString();
  for (auto _ : state) {
    v1::DecodeStepResponse r;  // a fresh message, as Client::DecodeStep parses into
    benchmark::DoNotOptimize(r.ParseFromString(bytes));
  }
  state.SetLabel(state.range(0) ? "positions_le" : "packed varints");
  state.counters["bytes"] = static_cast<double>(bytes.size());
}
BENCHMARK(BM_ParseAnswer)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

// The same into one message reused call after call (its repeated fields'
// and strings' storage kept).
void BM_ParseAnswerReused(benchmark::State& state) {
  const std::string bytes = Answer(state.range(0) != 0).SerializeAsString();
  v1::DecodeStepResponse r;
  for (auto _ : state) benchmark::DoNotOptimize(r.ParseFromString(bytes));
  state.SetLabel(state.range(0) ? "positions_le" : "packed varints");
}
BENCHMARK(BM_ParseAnswerReused)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace icecache::rpc
