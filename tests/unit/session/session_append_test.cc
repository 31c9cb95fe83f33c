// The pure steps of an append (server/session/session_append.h).
#include "server/session/session_append.h"

#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {

// Found by argument-dependent lookup (SlotRun is in icecache).
bool operator==(const SlotRun& a, const SlotRun& b) {
  return a.page == b.page && a.begin == b.begin && a.end == b.end;
}

namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;

TEST(UnwrittenSlotsTest, FullNewPagesNeedNoZeroing) {
  std::vector<Placement> placed;
  for (uint32_t p = 3; p < 5; ++p)
    for (uint32_t slot = 0; slot < 4; ++slot) placed.push_back({p, slot});
  EXPECT_TRUE(UnwrittenSlots(placed, 3, 5, 4).empty());
}

TEST(UnwrittenSlotsTest, PartialPageGivesItsTail) {
  // Page 7 (old, partly filled before) takes a row; page 8 is new with two.
  const std::vector<Placement> placed = {{7, 2}, {8, 0}, {8, 1}};
  const std::vector<SlotRun> want = {{8, 2, 16}};
  EXPECT_EQ(UnwrittenSlots(placed, 8, 9, 16), want);
}

TEST(UnwrittenSlotsTest, GapsAndUntouchedNewPagesAreRuns) {
  // Slots written out of order with a gap; page 11 opened but not written;
  // 70-slot pages span two bitmask words.
  const std::vector<Placement> placed = {{10, 5}, {10, 0}, {10, 64}, {10, 65}};
  const std::vector<SlotRun> want = {{10, 1, 5}, {10, 6, 64}, {10, 66, 70}, {11, 0, 70}};
  EXPECT_EQ(UnwrittenSlots(placed, 10, 12, 70), want);
}

TEST(UnwrittenSlotsTest, NoNewPagesNoRuns) {
  const std::vector<Placement> placed = {{0, 3}};
  EXPECT_TRUE(UnwrittenSlots(placed, 1, 1, 4).empty());
}

// 2 layers x 3 KV heads x 1000 tokens x 8 dims: the check scans blocks of
// 2048 elements, so these positions sit on and around block boundaries.
SessionConfig CheckConfig(DType dtype) {
  SessionConfig c;
  c.layers = 2;
  c.kv_heads = 3;
  c.q_heads = 3;
  c.head_dim = 8;
  c.dtype = dtype;
  return c;
}

// Element `e` of the keys (values: `in_values`) set to the bytes of `bad`.
std::vector<uint8_t> WithElement(const SessionConfig& c, int64_t e, bool in_values,
                                 const std::vector<uint8_t>& bad) {
  const int64_t n = 1000;
  const size_t esize = DTypeSize(c.dtype);
  std::vector<uint8_t> bytes(2 * c.layers * c.kv_heads * n * c.head_dim * esize, 0);
  const size_t half = bytes.size() / 2;
  std::memcpy(bytes.data() + (in_values ? half : 0) + e * esize, bad.data(), esize);
  return bytes;
}

TEST(CheckAppendInputTest, NamesTheFirstBadElementAcrossScanBlocks) {
  const int64_t n = 1000;
  struct Case {
    DType dtype;
    std::vector<uint8_t> bad;  // little-endian bytes of one element
    bool keys_only;            // a huge finite value: refused in keys only
    const char* why;
  };
  const std::vector<Case> cases = {
      {DType::kF16, {0x00, 0x7e}, false, "NaN or Inf"},                 // NaN
      {DType::kF16, {0x00, 0xfc}, false, "NaN or Inf"},                 // -Inf
      {DType::kBF16, {0x80, 0x7f}, false, "NaN or Inf"},                // +Inf
      {DType::kBF16, {0x00, 0x5d}, true, "magnitude 2^59"},             // 2^59
      {DType::kF32, {0x00, 0x00, 0xc0, 0x7f}, false, "NaN or Inf"},     // NaN
      {DType::kF32, {0x00, 0x00, 0x00, 0xdd}, true, "magnitude 2^59"},  // -2^59
  };
  const int64_t per_layer = 3 * n * 8;
  for (const Case& k : cases) {
    const SessionConfig c = CheckConfig(k.dtype);
    for (int64_t e : {int64_t{0}, int64_t{2047}, int64_t{2048}, int64_t{2049}, int64_t{4095},
                      per_layer + 4096, 2 * per_layer - 1}) {
      for (bool values : {false, true}) {
        const std::vector<uint8_t> bytes = WithElement(c, e, values, k.bad);
        absl::StatusOr<AppendInput> in = CheckAppendInput(c, n, n, {0, 0}, bytes);
        const std::string where = absl::StrCat(std::string(DTypeName(k.dtype)), " element ", e,
                                               values ? " of the values" : " of the keys");
        // Checked in steps (the copy's), a step straddling the keys' end
        // included: clean exactly when CheckAppendInput accepts.
        const uint64_t half = bytes.size() / 2;
        for (uint64_t step : {uint64_t{4096}, half / 3, uint64_t{bytes.size()}}) {
          step -= step % 4;
          bool clean = true;
          for (uint64_t at = 0; at < bytes.size(); at += step) {
            clean &= AppendBytesClean(k.dtype, half, at, bytes.data() + at,
                                      std::min<uint64_t>(step, bytes.size() - at));
          }
          EXPECT_EQ(clean, in.ok()) << where << ", steps of " << step;
        }
        if (values && k.keys_only) {
          EXPECT_THAT(in, IsOk()) << where;
          continue;
        }
        const std::string want =
            absl::StrCat(values ? "value" : "key", " of layer ", e / per_layer, ", kv head ",
                         (e % per_layer) / (n * 8), ", token ", (e % (n * 8)) / 8, " ");
        EXPECT_THAT(
            in, StatusIs(absl::StatusCode::kInvalidArgument,
                         ::testing::AllOf(::testing::HasSubstr(want), ::testing::HasSubstr(k.why))))
            << where;
      }
    }
    EXPECT_THAT(CheckAppendInput(c, n, n, {0, 0}, WithElement(c, 5, false, {0, 0, 0, 0})), IsOk());
  }
}

TEST(CheckAppendInputTest, TheFirstOfTwoBadElementsIsNamed) {
  const SessionConfig c = CheckConfig(DType::kF16);
  std::vector<uint8_t> bytes = WithElement(c, 5000, false, {0x00, 0x7c});
  bytes[2 * 3001 + 1] = 0x7c;  // an earlier Inf in another block
  EXPECT_THAT(CheckAppendInput(c, 1000, 1000, {0, 0}, bytes),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::HasSubstr("key of layer 0, kv head 0, token 375 ")));
}

}  // namespace
}  // namespace icecache
