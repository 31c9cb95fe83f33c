// Unit tests of the client library parts that need no daemon: output
// helpers, the KV chunk builder and the byte-identity checker, option
// validation, and the failure paths of ShmBuffer and DaemonProcess.
#include <dirent.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "client/client.h"
#include "client/daemon_process.h"
#include "client/kv_check.h"
#include "client/output.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(TextTableTest, AlignsColumnsAndRightAlignsNumericOnes) {
  TextTable t({"NAME", "N", "NOTE"});
  t.AddRow({"a", "1", "x"});
  t.AddRow({"long-name", "1234", "2 MiB"});
  EXPECT_EQ(t.Render(),
            "NAME          N  NOTE\n"
            "a             1  x\n"
            "long-name  1234  2 MiB\n");
}

TEST(OutputTest, GranularityTextNamesEachUnit) {
  EXPECT_EQ(GranularityText(SelectionGranularity::kDefault), "by-destination");
  EXPECT_EQ(GranularityText(SelectionGranularity::kPage), "page");
  EXPECT_EQ(GranularityText(SelectionGranularity::kToken), "token");
}

TEST(OutputTest, SessionJsonHasEveryFieldWithEpochAsString) {
  SessionInfo s;
  s.id = "s-1";
  s.tenant = "alpha \"q\"";
  s.epoch = 18446744073709551615u;
  s.spec.layers = 2;
  s.spec.kv_heads = 8;
  s.spec.q_heads = 32;
  s.spec.head_dim = 128;
  s.spec.dtype = DType::kF16;
  s.spec.page_tokens = 16;
  s.spec.selector = SelectorType::kMdci;
  s.spec.mdci_pq_factor = 8.0f;
  s.spec.mdci_insert_fit = 2.0f;
  s.spec.layer_reuse = 1;
  s.spec.ttl = absl::Seconds(2);
  s.tokens = 5;
  s.bytes = 4096;
  s.pages = 3;
  s.index_bytes = 7;
  s.decode_keys = 40;
  s.decode_keys_unrouted = 30;
  s.pinned = true;
  s.in_flight = 1;
  s.trees_built = 96;
  s.trees_total = 256;
  s.created = absl::FromUnixMillis(1000);
  s.last_use = absl::InfinitePast();
  s.expires = absl::FromUnixMillis(3000);
  s.quality.monitored = true;
  s.quality.target_mass_ratio = 0.5;
  s.quality.samples = 4;
  s.quality.mean_mass_ratio = 0.75;
  HeadQuality h;
  h.layer_group = 1;
  h.kv_head = 2;
  h.calibrated = true;
  h.width = 1.5;
  h.field_of_view = 48;
  h.candidate_factor = 12;
  h.samples = 4;
  h.seeded = true;
  h.search_method = "scan";
  h.method_trials = 2;
  h.method_switches = 1;
  h.pooled = true;
  s.quality.seeded_heads = 1;
  s.quality.pooled_heads = 2;
  s.quality.pool_width = 1.5;
  s.quality.pool_samples = 7;
  s.quality.heads.push_back(h);
  EXPECT_EQ(DumpJson(SessionJson(s)),
            R"({"session_id":"s-1","tenant":"alpha \"q\"","epoch":"18446744073709551615",)"
            R"("layers":2,"kv_heads":8,"q_heads":32,"head_dim":128,"dtype":"float16",)"
            R"("page_tokens":16,"selector":"mdci","mdci_pq_factor":8.0,"mdci_insert_fit":2.0,)"
            R"("layer_reuse":1,)"
            R"("granularity":"by-destination",)"
            R"("ttl_ms":2000,"tokens":5,)"
            R"("bytes":4096,"pages":3,"index_bytes":7,"decode_keys":40,"decode_keys_unrouted":30,)"
            R"("pinned":true,"in_flight":1,)"
            R"("trees_built":96,"trees_total":256,)"
            R"("created_unix_ms":1000,"last_use_unix_ms":0,"expires_unix_ms":3000,)"
            R"("quality":{"monitored":true,"target_mass_ratio":0.5,"samples":4,)"
            R"("samples_dropped":0,"samples_stale":0,"mean_mass_ratio":0.75,)"
            R"("recent_mass_ratio":0.0,"mean_topk_recall":0.0,"calibration_cpu_ms":0.0,)"
            R"("selection_ms":0.0,"seeded_heads":1,"pooled_heads":2,)"
            R"("pool_width":1.5,"pool_samples":7,"carried_selections":0,"carry_stopped":false,)"
            R"("carry_pool_steps":0,"carry_shortened":0,)"
            R"("heads":[{"layer_group":1,"kv_head":2,)"
            R"("calibrated":true,)"
            R"("width":1.5,"field_of_view":48,"candidate_factor":12.0,"width_changes":0,)"
            R"("samples":4,"mean_mass_ratio":0.0,"recent_mass_ratio":0.0,)"
            R"("last_mass_ratio":0.0,"mean_topk_recall":0.0,"mode":"tree","exact_selections":0,)"
            R"("fallbacks":0,"sample_interval":0,"descent_ranking":"","ranking_trial_samples":0,)"
            R"("ranking_trial_gain":0.0,"ranking_switches":0,"seeded":true,"search_method":"scan",)"
            R"("method_trials":2,"method_switches":1,"pooled":true,"carry_steps":0,)"
            R"("carry_stops":0}]}})");
}

TEST(OutputTest, StatsJsonNestsSizeClassesAndTenants) {
  DaemonStats s;
  s.epoch = 9;
  s.size_classes.push_back({65536, 2, 3, 327680});
  s.tenants.push_back({"beta", 10, 0, 1, 2});
  const Json j = StatsJson(s);
  EXPECT_EQ(j["epoch"], "9");
  EXPECT_EQ(j["start_unix_ms"], 0);
  EXPECT_EQ(DumpJson(j["size_classes"]),
            R"([{"frame_bytes":65536,"frames_used":2,"frames_free":3,"bytes_reserved":327680}])");
  EXPECT_EQ(DumpJson(j["tenants"]),
            R"([{"tenant":"beta","bytes_used":10,"quota_bytes":0,"sessions":1,"buffers":2}])");
}

TEST(OutputTest, HumanBytes) {
  EXPECT_EQ(HumanBytes(0), "0 B");
  EXPECT_EQ(HumanBytes(1023), "1023 B");
  EXPECT_EQ(HumanBytes(1536), "1.5 KiB");
  EXPECT_EQ(HumanBytes(32ll << 20), "32.0 MiB");
}

TEST(SelectorTypeTest, NamesRoundTrip) {
  for (SelectorType t :
       {SelectorType::kDefault, SelectorType::kMdci, SelectorType::kExactMdci, SelectorType::kExact,
        SelectorType::kQuest, SelectorType::kStreaming, SelectorType::kArkvale,
        SelectorType::kPqcache, SelectorType::kSnapkv, SelectorType::kOmnikv,
        SelectorType::kMagicpig, SelectorType::kMdciPublished}) {
    auto parsed = ParseSelectorType(SelectorTypeName(t));
    ASSERT_THAT(parsed, IsOk());
    EXPECT_EQ(*parsed, t);
  }
  EXPECT_THAT(ParseSelectorType("faiss"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("mdci")));
}

KvDump SmallDump() {
  KvDump d;
  d.layers = 2;
  d.kv_heads = 2;
  d.q_heads = 2;
  d.tokens = 5;
  d.head_dim = 4;
  d.keys.resize(2 * 2 * 5 * 4);
  d.values.resize(d.keys.size());
  for (size_t i = 0; i < d.keys.size(); ++i) {
    d.keys[i] = static_cast<float>(i) * 0.5f;
    d.values[i] = -static_cast<float>(i);
  }
  return d;
}

TEST(HostKvTest, ChunkIsKeysThenValuesLayerHeadTokenMajor) {
  KvDump d = SmallDump();
  HostKv kv = HostKv::FromDump(&d);
  EXPECT_EQ(kv.ChunkBytes(1, 3), 2u * 2 * 2 * 2 * 4 * 2);
  std::vector<uint8_t> c = kv.Chunk(1, 3);
  const uint16_t* h = reinterpret_cast<const uint16_t*>(c.data());
  // keys[l=1][h=0][t=2] is the 7th row of the key half (((1*2+0)*2+1)).
  EXPECT_EQ(std::memcmp(h + 5 * 4, kv.key(1, 0, 2), 8), 0);
  // values[l=0][h=1][t=1] is row 2 of the value half.
  EXPECT_EQ(std::memcmp(h + (8 + 2) * 4, kv.value(0, 1, 1), 8), 0);
  EXPECT_EQ(HalfToFloat(*kv.key(0, 0, 1)), 2.0f);  // 4 x 0.5
}

// A hand-made fetch of layer 1: head 0 gets pages with positions {3, 0}
// (fill 2 of 2 slots) and {4} (fill 1), head 1 gets {2, 1}.
struct FakeFetch {
  std::vector<uint8_t> buf = std::vector<uint8_t>(4096, 0);
  FetchLayout layout;
  std::vector<HeadSelection> heads;
};
FakeFetch MakeFetch(const HostKv& kv) {
  FakeFetch f;
  f.layout.page_tokens = 2;
  f.layout.head_dim = 4;
  f.layout.page_bytes = 2 * 2 * 4 * 2;
  f.layout.first_layer = 1;
  f.layout.num_layers = 1;
  f.layout.offset = 64;
  const std::vector<std::vector<std::vector<int32_t>>> pages = {{{3, 0}, {4}}, {{2, 1}}};
  uint64_t off = 64;
  for (uint32_t h = 0; h < 2; ++h) {
    HeadLayout hl;
    hl.kv_head = h;
    for (size_t p = 0; p < pages[h].size(); ++p) {
      hl.pages.push_back(static_cast<uint32_t>(p));
      hl.slots.push_back(static_cast<uint32_t>(hl.slots.size()));
      hl.fills.push_back(static_cast<uint32_t>(pages[h][p].size()));
      hl.byte_offsets.push_back(off);
      for (size_t s = 0; s < pages[h][p].size(); ++s) {
        const int32_t pos = pages[h][p][s];
        hl.positions.push_back(pos);
        std::memcpy(f.buf.data() + off + s * 8, kv.key(1, h, pos), 8);
        std::memcpy(f.buf.data() + off + 16 + s * 8, kv.value(1, h, pos), 8);
      }
      off += f.layout.page_bytes;
    }
    f.layout.heads.push_back(hl);
  }
  return f;
}

TEST(VerifyFetchTest, AcceptsExactBytesAndCatchesEveryKindOfDifference) {
  KvDump d = SmallDump();
  HostKv kv = HostKv::FromDump(&d);
  FakeFetch f = MakeFetch(kv);
  auto n = VerifyFetch(kv, 5, f.layout, f.heads, f.buf.data(), f.buf.size());
  ASSERT_THAT(n, IsOk());
  EXPECT_EQ(*n, 3);
  {
    FakeFetch g = MakeFetch(kv);
    g.buf[64 + 16 + 3] ^= 1;  // a V byte of head 0, page 0, slot 0
    EXPECT_THAT(VerifyFetch(kv, 5, g.layout, g.heads, g.buf.data(), g.buf.size()),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr("position 3")));
  }
  {
    FakeFetch g = MakeFetch(kv);
    g.buf[64 + 32 + 8] = 7;  // slot 1 of head 0 page 1 is past its fill
    EXPECT_THAT(VerifyFetch(kv, 5, g.layout, g.heads, g.buf.data(), g.buf.size()),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr("past the fill")));
  }
  {
    FakeFetch g = MakeFetch(kv);
    std::swap(g.layout.heads[0].positions[0], g.layout.heads[0].positions[1]);
    EXPECT_THAT(VerifyFetch(kv, 5, g.layout, g.heads, g.buf.data(), g.buf.size()),
                StatusIs(absl::StatusCode::kDataLoss));
  }
  // Positions beyond what was appended, blocks past the buffer.
  EXPECT_THAT(VerifyFetch(kv, 4, f.layout, f.heads, f.buf.data(), f.buf.size()),
              StatusIs(absl::StatusCode::kInternal));
  EXPECT_THAT(VerifyFetch(kv, 5, f.layout, f.heads, f.buf.data(), 100),
              StatusIs(absl::StatusCode::kInternal));
}

// Token granularity: the same slots with page id kTokenSlotPage, packed.
TEST(VerifyFetchTest, TokenSlotsMustBePackedAndHoldTheSelectedPositions) {
  KvDump d = SmallDump();
  HostKv kv = HostKv::FromDump(&d);
  auto tokens = [&] {
    FakeFetch f = MakeFetch(kv);  // fills {2, 1} and {2}: packed
    for (HeadLayout& h : f.layout.heads) {
      for (uint32_t& p : h.pages) p = kTokenSlotPage;
    }
    f.heads.assign(2, HeadSelection{});
    for (int h = 0; h < 2; ++h) f.heads[h].positions = f.layout.heads[h].positions;
    return f;
  };
  FakeFetch f = tokens();
  auto n = VerifyFetch(kv, 5, f.layout, f.heads, f.buf.data(), f.buf.size());
  ASSERT_THAT(n, IsOk());
  EXPECT_EQ(*n, 3);
  {
    FakeFetch g = tokens();  // the selection named other tokens than the layout
    g.heads[1].positions = {1, 2};
    EXPECT_THAT(VerifyFetch(kv, 5, g.layout, g.heads, g.buf.data(), g.buf.size()),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr("not the selection's")));
  }
  {
    FakeFetch g = tokens();  // a partial slot before the last: not packed
    g.layout.heads[0].fills[0] = 1;
    g.layout.heads[0].positions = {3, 4};
    g.heads[0].positions = {3, 4};
    EXPECT_THAT(VerifyFetch(kv, 5, g.layout, g.heads, g.buf.data(), g.buf.size()),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr("not packed")));
  }
  {
    FakeFetch g = tokens();  // token slots and pages in one head
    g.layout.heads[0].pages[1] = 0;
    EXPECT_THAT(VerifyFetch(kv, 5, g.layout, g.heads, g.buf.data(), g.buf.size()),
                StatusIs(absl::StatusCode::kInternal, HasSubstr("mixed")));
  }
}

TEST(ClientOptionsTest, BadOptionsAreRefusedAtCreate) {
  ClientOptions o;
  o.socket_path = "relative.sock";
  EXPECT_THAT(Client::Create(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("absolute")));
  o.socket_path = "/tmp/x.sock";
  o.timeout = absl::ZeroDuration();
  EXPECT_THAT(Client::Create(o), StatusIs(absl::StatusCode::kInvalidArgument));
  ClientOptions tls;
  tls.address = "localhost:1";
  tls.ca_file = "/nonexistent/ca.pem";
  EXPECT_THAT(Client::Create(tls), StatusIs(absl::StatusCode::kNotFound));
}

int CountOwnShmFiles() {
  const std::string prefix = "icecache-" + std::to_string(::getpid()) + "-";
  int n = 0;
  DIR* dir = ::opendir("/dev/shm");
  if (dir == nullptr) return -1;
  while (dirent* e = ::readdir(dir)) {
    if (std::string(e->d_name).rfind(prefix, 0) == 0) ++n;
  }
  ::closedir(dir);
  return n;
}

TEST(ClientTest, NoDaemonMeansUnavailableAndNoShmFileLeft) {
  ClientOptions o;
  o.socket_path = "/tmp/icecache-client-test-no-daemon.sock";
  o.timeout = absl::Seconds(2);
  auto c = Client::Create(o);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ((*c)->target(), "unix:/tmp/icecache-client-test-no-daemon.sock");
  EXPECT_THAT((*c)->Health(), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_THAT((*c)->CreateShmBuffer(0), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT((*c)->CreateShmBuffer(4096), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_EQ(CountOwnShmFiles(), 0) << "a failed registration must remove its file";
  ShmBuffer empty;
  EXPECT_FALSE(empty.valid());
  EXPECT_THAT(empty.Unregister(), StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST(DaemonProcessTest, ReportsMissingAndFailingBinaries) {
  DaemonOptions o;
  EXPECT_THAT(DaemonProcess::Start(o), StatusIs(absl::StatusCode::kInvalidArgument));
  o.binary = "/nonexistent/icecached";
  EXPECT_THAT(DaemonProcess::Start(o), StatusIs(absl::StatusCode::kNotFound));
  o.binary = "/bin/false";  // exits at once, never ready
  EXPECT_THAT(DaemonProcess::Start(o),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("exited")));
}

TEST(DaemonProcessTest, ProcessRss) {
  auto rss = ProcessRssBytes(::getpid());
  ASSERT_THAT(rss, IsOk());
  EXPECT_GT(*rss, 0);
  EXPECT_THAT(ProcessRssBytes(0x7ffffff0), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace icecache
