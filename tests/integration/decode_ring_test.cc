// The C++ client's DecodeStep over the shared-memory ring against the gRPC
// stream, on a real daemon (docs/architecture.md §8.1). The ring's own
// protocol, bad messages and reclaim are in tests/unit/rpc/decode_ring_test.cc.
#include <csignal>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<std::unique_ptr<Client>> ConnectWith(const DaemonProcess& d, bool ring,
                                                    absl::Duration spin = absl::ZeroDuration()) {
  ClientOptions o;
  o.socket_path = d.socket_path();
  o.timeout = absl::Seconds(60);
  o.decode_ring = ring;
  o.decode_ring_spin = spin;
  return Client::Create(o);
}

// One session decoded by a ring client and a stream client, layer by layer:
// the same selections, layouts and fetched bytes; the ring client holds one
// more registered buffer (its ring). The ring client watches for its
// answers (ClientOptions::decode_ring_spin) or sleeps on the doorbell.
class DecodeRingSpinTest : public ::testing::TestWithParam<int> {};

TEST_P(DecodeRingSpinTest, RingAndStreamClientsGetTheSameStepsAndBytes) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto ring = ConnectWith(**daemon, true, absl::Microseconds(GetParam()));
  auto stream = ConnectWith(**daemon, false);
  ASSERT_THAT(ring, IsOk());
  ASSERT_THAT(stream, IsOk());
  TestModel m = MakeModel(2, 2, 512, 3);
  auto s = (*ring)->CreateSession(m.spec);
  ASSERT_THAT(s, IsOk());
  ASSERT_THAT((*ring)->AppendKvInline(s->id, m.kv.Chunk(0, 512), 512), IsOk());
  const size_t bytes = 1 << 20;
  auto out_ring = (*ring)->CreateShmBuffer(bytes);
  auto out_stream = (*ring)->CreateShmBuffer(bytes);
  ASSERT_THAT(out_ring, IsOk());
  ASSERT_THAT(out_stream, IsOk());
  SelectOptions opt;
  opt.budget_tokens = 64;
  opt.want_positions = true;
  for (int step = 0; step < 3; ++step) {
    for (uint32_t layer = 0; layer < 2; ++layer) {
      auto a =
          (*ring)->DecodeStep(s->id, layer, Queries(m, step, layer), out_ring->buffer_id(), 0, opt);
      auto b = (*stream)->DecodeStep(s->id, layer, Queries(m, step, layer), out_stream->buffer_id(),
                                     0, opt);
      ASSERT_THAT(a, IsOk());
      ASSERT_THAT(b, IsOk());
      ASSERT_EQ(a->heads.size(), b->heads.size());
      for (size_t h = 0; h < a->heads.size(); ++h) {
        EXPECT_EQ(a->heads[h].pages, b->heads[h].pages);
        EXPECT_EQ(a->heads[h].positions, b->heads[h].positions);
        EXPECT_EQ(a->layout.heads[h].byte_offsets, b->layout.heads[h].byte_offsets);
      }
      ASSERT_EQ(a->layout.total_bytes, b->layout.total_bytes);
      EXPECT_EQ(std::memcmp(out_ring->data(), out_stream->data(), a->layout.total_bytes), 0);
      auto verified = VerifyFetch(m.kv, 512, a->layout, a->heads, out_ring->data(), bytes);
      ASSERT_THAT(verified, IsOk());
      EXPECT_GT(*verified, 0);
    }
    if (step == 0) {
      auto stats = (*ring)->GetStats();
      ASSERT_THAT(stats, IsOk());
      EXPECT_EQ(stats->buffers, 3u) << "two output buffers and the ring client's ring";
    }
  }
}
INSTANTIATE_TEST_SUITE_P(SleepOrWatch, DecodeRingSpinTest, ::testing::Values(0, 1000, 100000),
                         [](const auto& info) { return absl::StrCat("spin_us_", info.param); });

// In-place steps (StepOptions::in_place) on a real daemon, over the ring and
// over the stream, each into a region per layer kept between steps: every
// row holds the position its layout names, the rows of tokens selected
// again are not copied (rows_kept).
TEST(DecodeRingTest, InPlaceStepsCopyOnlyTheNewRowsOverTheRingAndTheStream) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  for (const bool use_ring : {true, false}) {
    SCOPED_TRACE(use_ring ? "ring" : "stream");
    auto c = ConnectWith(**daemon, use_ring);
    ASSERT_THAT(c, IsOk());
    TestModel m = MakeModel(2, 2, 512, 4);
    auto s = (*c)->CreateSession(m.spec);
    ASSERT_THAT(s, IsOk());
    ASSERT_THAT((*c)->AppendKvInline(s->id, m.kv.Chunk(0, 512), 512), IsOk());
    const size_t bytes = 1 << 20, region = bytes / 2;
    auto out = (*c)->CreateShmBuffer(bytes);
    ASSERT_THAT(out, IsOk());
    SelectOptions opt;
    opt.budget_tokens = 64;
    opt.sink_tokens = 4;
    opt.recent_tokens = 16;  // the same every step: always kept
    opt.want_positions = true;
    opt.granularity = SelectionGranularity::kToken;
    StepOptions in_place;
    in_place.in_place = true;
    uint64_t kept = 0;
    for (int step = 0; step < 4; ++step) {
      for (uint32_t layer = 0; layer < 2; ++layer) {
        auto r = (*c)->DecodeStep(s->id, layer, Queries(m, step, layer), out->buffer_id(),
                                  layer * region, opt, in_place);
        ASSERT_THAT(r, IsOk());
        uint64_t rows = 0;
        for (const HeadLayout& h : r->layout.heads) rows += h.positions.size();
        EXPECT_EQ(r->layout.rows_copied + r->layout.rows_kept, rows);
        if (step == 0) {
          EXPECT_EQ(r->layout.rows_kept, 0u);
        } else {
          EXPECT_GE(r->layout.rows_kept, 2u * 20u) << "the sinks and recent tokens";
        }
        kept += r->layout.rows_kept;
        auto verified = VerifyFetch(m.kv, 512, r->layout, r->heads, out->data(), bytes);
        ASSERT_THAT(verified, IsOk());
        EXPECT_GT(*verified, 0);
      }
    }
    EXPECT_GT(kept, 0u);
    ASSERT_THAT((*c)->DropSession(s->id), IsOk());
  }
}

// On the ring an error ends only its own step; the next step is served.
TEST(DecodeRingTest, AStepErrorFailsOnlyThatStep) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto c = ConnectWith(**daemon, true);
  ASSERT_THAT(c, IsOk());
  TestModel m = MakeModel(2, 2, 256, 1);
  auto s = (*c)->CreateSession(m.spec);
  ASSERT_THAT(s, IsOk());
  ASSERT_THAT((*c)->AppendKvInline(s->id, m.kv.Chunk(0, 256), 256), IsOk());
  auto out = (*c)->CreateShmBuffer(1 << 20);
  ASSERT_THAT(out, IsOk());
  ASSERT_THAT((*c)->DecodeStep(s->id, 0, Queries(m, 0, 0), out->buffer_id(), 0), IsOk());
  EXPECT_THAT((*c)->DecodeStep(s->id, 7, Queries(m, 0, 0), out->buffer_id(), 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer")));
  EXPECT_THAT((*c)->DecodeStep(s->id, 0, Queries(m, 0, 0), out->buffer_id(), 1 << 30),
              StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT((*c)->DecodeStep(s->id, 1, Queries(m, 0, 1), out->buffer_id(), 0), IsOk());
  ASSERT_THAT((*c)->DropSession(s->id), IsOk());
  EXPECT_THAT((*c)->DecodeStep(s->id, 0, Queries(m, 0, 0), out->buffer_id(), 0),
              StatusIs(absl::StatusCode::kNotFound));
}

// A daemon that stops under an open ring: the next step is UNAVAILABLE,
// never a hang.
TEST(DecodeRingTest, ADaemonThatStopsIsUnavailableNotAHang) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto c = ConnectWith(**daemon, true);
  ASSERT_THAT(c, IsOk());
  TestModel m = MakeModel(1, 2, 256, 1);
  auto s = (*c)->CreateSession(m.spec);
  ASSERT_THAT(s, IsOk());
  ASSERT_THAT((*c)->AppendKvInline(s->id, m.kv.Chunk(0, 256), 256), IsOk());
  auto out = (*c)->CreateShmBuffer(1 << 20);
  ASSERT_THAT(out, IsOk());
  ASSERT_THAT((*c)->DecodeStep(s->id, 0, Queries(m, 0, 0), out->buffer_id(), 0), IsOk());
  ASSERT_THAT((*daemon)->Signal(SIGTERM), IsOk());
  ASSERT_THAT((*daemon)->Wait(absl::Seconds(20)), IsOk());
  EXPECT_THAT((*c)->DecodeStep(s->id, 0, Queries(m, 0, 0), out->buffer_id(), 0),
              StatusIs(absl::StatusCode::kUnavailable));
}

}  // namespace
}  // namespace icecache::testing
