// End to end through a real daemon: prefill + decode loop with every fetched
// page checked byte for byte, the SelectPages + FetchPages path, inline
// appends, and eight concurrent clients.
#include <atomic>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/index/quality.h"
#include "tests/integration/harness.h"
#include "tests/support/status_matchers.h"

namespace icecache::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::SizeIs;

// Runs prefill (tokens - steps*append) then `steps` decode steps appending
// `append` tokens each, one DecodeStep per layer; checks every page.
// Returns the number of page blocks verified.
absl::StatusOr<int64_t> PrefillAndDecode(
    Client& client, const TestModel& m, int steps, int append, bool inline_kv,
    std::vector<double>* mass = nullptr,
    SelectionGranularity granularity = SelectionGranularity::kDefault) {
  ASSIGN_OR_RETURN(SessionInfo s, client.CreateSession(m.spec));
  const int64_t prefill = m.dump.tokens - static_cast<int64_t>(steps) * append;
  ASSIGN_OR_RETURN(ShmBuffer kv_buf, client.CreateShmBuffer(m.kv.ChunkBytes(0, prefill)));
  const size_t page_bytes = 2 * 16 * m.spec.head_dim * 2;
  ASSIGN_OR_RETURN(ShmBuffer out, client.CreateShmBuffer(m.spec.kv_heads * 80 * page_bytes));
  uint64_t tokens = 0;
  if (inline_kv) {
    ASSIGN_OR_RETURN(tokens, client.AppendKvInline(s.id, m.kv.Chunk(0, prefill), prefill));
  } else {
    m.kv.FillChunk(0, prefill, kv_buf.data());
    ASSIGN_OR_RETURN(tokens,
                     client.AppendKv(s.id, kv_buf, 0, m.kv.ChunkBytes(0, prefill), prefill));
  }
  if (tokens != static_cast<uint64_t>(prefill)) return absl::InternalError("prefill token count");
  SelectOptions opt;
  opt.budget_tokens = 64;
  opt.sink_tokens = 4;
  opt.want_positions = true;
  opt.granularity = granularity;
  int64_t verified = 0;
  for (int step = 0; step < steps; ++step) {
    const int64_t t = static_cast<int64_t>(tokens);
    m.kv.FillChunk(t, t + append, kv_buf.data());
    ASSIGN_OR_RETURN(tokens,
                     client.AppendKv(s.id, kv_buf, 0, m.kv.ChunkBytes(t, t + append), append));
    for (int layer = 0; layer < m.spec.layers; ++layer) {
      ASSIGN_OR_RETURN(StepResult r, client.DecodeStep(s.id, layer, Queries(m, step, layer),
                                                       out.buffer_id(), 0, opt));
      if (r.heads.size() != static_cast<size_t>(m.spec.kv_heads)) {
        return absl::InternalError("one HeadSelection per KV head expected");
      }
      ASSIGN_OR_RETURN(int64_t n, VerifyFetch(m.kv, static_cast<int64_t>(tokens), r.layout, r.heads,
                                              out.data(), out.size()));
      verified += n;
      if (mass != nullptr) {
        for (const HeadSelection& h : r.heads) {
          ASSIGN_OR_RETURN(
              ExactAttention ex,
              ComputeExactAttention(m.dump.key(layer, h.kv_head), nullptr,
                                    static_cast<int64_t>(tokens), m.spec.head_dim,
                                    m.dump.query(step, layer, h.kv_head), m.dump.group_size()));
          ASSIGN_OR_RETURN(double v, MassRecall(ex, h.positions));
          mass->push_back(v);
        }
      }
    }
  }
  RETURN_IF_ERROR(client.DropSession(s.id));
  return verified;
}

TEST(EndToEndTest, PrefillAndDecodeLoopFetchesByteIdenticalPages) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  // Positions past the end of the dump are never fetched: the dump is
  // truncated to what was appended when the verifier reads keys.
  // The second run: mdci with the tree's descent only (pq_factor 0); the
  // third: mdci as the daemon makes it by default, with product-quantised
  // codes (MdciParams.pq_factor unset: 8) and the scan.
  for (int run = 0; run < 3; ++run) {
    const SelectorType sel = run == 0 ? SelectorType::kExact : SelectorType::kMdci;
    SCOPED_TRACE(std::string(SelectorTypeName(sel)) + (run == 1 ? " tree only" : ""));
    TestModel m = MakeModel(/*layers=*/2, /*kv_heads=*/2, /*tokens=*/1024, /*steps=*/6, sel);
    if (run == 1) m.spec.mdci_pq_factor = 0.0f;
    // Keys of the dump are laid out over all 1024 tokens; exact attention is
    // computed over the first `tokens` rows of each (layer, head), which is
    // what was appended at that step.
    std::vector<double> mass;
    auto verified = PrefillAndDecode(**client, m, 6, 16, /*inline_kv=*/false, &mass);
    ASSERT_THAT(verified, IsOk());
    EXPECT_GT(*verified, 6 * 2 * 2);  // several pages per head per layer per step
    ASSERT_FALSE(mass.empty());
    double mean = 0;
    for (double v : mass) {
      EXPECT_GT(v, 0.0);
      EXPECT_LE(v, 1.0 + 1e-6);
      mean += v;
    }
    mean /= mass.size();
    // 64 of ~1000 tokens with sinks: far above the 6% a random pick holds.
    EXPECT_GT(mean, 0.3) << "mean attention-mass recall " << mean;
    if (run >= 1) {  // the session kept the factor (GetSession reads it back)
      auto s = (*client)->CreateSession(m.spec);
      ASSERT_THAT(s, IsOk());
      auto info = (*client)->GetSession(s->id);
      ASSERT_THAT(info, IsOk());
      EXPECT_EQ(info->spec.mdci_pq_factor, run == 1 ? 0.0f : 8.0f);
      EXPECT_THAT((*client)->DropSession(s->id), IsOk());
    }
  }
}

TEST(EndToEndTest, InlineAppendAndSelectThenFetchMatch) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  TestModel m = MakeModel(2, 2, 512, 2);
  auto verified = PrefillAndDecode(**client, m, 2, 16, /*inline_kv=*/true);
  ASSERT_THAT(verified, IsOk());

  // SelectPages, then FetchPages of exactly those pages.
  auto s = (*client)->CreateSession(m.spec);
  ASSERT_THAT(s, IsOk());
  ASSERT_THAT((*client)->AppendKvInline(s->id, m.kv.Chunk(0, 512), 512), IsOk());
  SelectOptions opt;
  opt.budget_tokens = 48;
  opt.want_positions = true;
  auto sel = (*client)->SelectPages(s->id, 1, Queries(m, 0, 1), opt);
  ASSERT_THAT(sel, IsOk());
  ASSERT_THAT(*sel, SizeIs(2));
  for (const auto& h : *sel) {
    int64_t filled = 0;
    for (uint32_t f : h.fills) filled += f;
    EXPECT_GE(filled, 48);
    EXPECT_EQ(static_cast<size_t>(filled), h.positions.size());
  }
  auto out = (*client)->CreateShmBuffer(1 << 20);
  ASSERT_THAT(out, IsOk());
  auto layout = (*client)->FetchPages(s->id, 1, *sel, out->buffer_id(), 4096, true);
  ASSERT_THAT(layout, IsOk());
  EXPECT_EQ(layout->offset, 4096u);
  ASSERT_THAT(layout->heads, SizeIs(2));
  for (size_t h = 0; h < 2; ++h) EXPECT_EQ(layout->heads[h].pages, (*sel)[h].pages);
  auto n = VerifyFetch(m.kv, 512, *layout, *sel, out->data(), out->size());
  ASSERT_THAT(n, IsOk());
  EXPECT_GT(*n, 0);
  // Nothing was written before the requested offset.
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(out->data()[i], 0) << "byte " << i;
  auto info = (*client)->GetSession(s->id);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->tokens, 512u);
  EXPECT_GT(info->bytes, 0u);
  EXPECT_THAT((*client)->DropSession(s->id), IsOk());
  EXPECT_THAT((*client)->GetSession(s->id), StatusIs(absl::StatusCode::kNotFound));
}

TEST(EndToEndTest, TokenGranularityFetchesTheSelectedTokensPackedIntoSlots) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  for (SelectorType sel : {SelectorType::kExact, SelectorType::kMdci}) {
    SCOPED_TRACE(std::string(SelectorTypeName(sel)));
    TestModel m = MakeModel(/*layers=*/2, /*kv_heads=*/2, /*tokens=*/1024, /*steps=*/4, sel);
    // DecodeStep at token granularity: every fetched row is the appended one.
    std::vector<double> page_mass, token_mass;
    ASSERT_THAT(
        PrefillAndDecode(**client, m, 4, 16, false, &page_mass, SelectionGranularity::kPage),
        IsOk());
    auto verified =
        PrefillAndDecode(**client, m, 4, 16, false, &token_mass, SelectionGranularity::kToken);
    ASSERT_THAT(verified, IsOk());
    EXPECT_EQ(*verified, 4 * 2 * 2 * 4);  // 64 tokens = 4 full slots per head, layer and step
    double pm = 0, tm = 0;
    for (double v : page_mass) pm += v;
    for (double v : token_mass) tm += v;
    if (sel == SelectorType::kExact) {
      EXPECT_GE(tm, pm) << "the best tokens hold at least the best pages' mass";
    }

    // SelectPages, then FetchPages of the selection's tokens.
    auto s = (*client)->CreateSession(m.spec);
    ASSERT_THAT(s, IsOk());
    ASSERT_THAT((*client)->AppendKvInline(s->id, m.kv.Chunk(0, 500), 500), IsOk());
    SelectOptions opt;
    opt.budget_tokens = 40;
    opt.sink_tokens = 4;
    opt.granularity = SelectionGranularity::kToken;
    auto heads = (*client)->SelectPages(s->id, 1, Queries(m, 0, 1), opt);
    ASSERT_THAT(heads, IsOk());
    ASSERT_THAT(*heads, SizeIs(2));
    for (const HeadSelection& h : *heads) {
      EXPECT_TRUE(h.pages.empty());
      EXPECT_THAT(h.fills, ::testing::ElementsAre(16, 16, 8));
      ASSERT_THAT(h.positions, SizeIs(40));
      EXPECT_THAT(std::vector<int32_t>(h.positions.begin(), h.positions.begin() + 4),
                  ::testing::ElementsAre(0, 1, 2, 3));
    }
    auto out = (*client)->CreateShmBuffer(1 << 20);
    ASSERT_THAT(out, IsOk());
    auto layout = (*client)->FetchPages(s->id, 1, *heads, out->buffer_id(), 0, true);
    ASSERT_THAT(layout, IsOk());
    ASSERT_THAT(layout->heads, SizeIs(2));
    for (size_t h = 0; h < 2; ++h) {
      EXPECT_THAT(layout->heads[h].pages, ::testing::Each(UINT32_MAX));
      EXPECT_EQ(layout->heads[h].fills, (*heads)[h].fills);
      EXPECT_EQ(layout->heads[h].positions, (*heads)[h].positions);
    }
    auto n = VerifyFetch(m.kv, 500, *layout, *heads, out->data(), out->size());
    ASSERT_THAT(n, IsOk());
    EXPECT_EQ(*n, 6);
    // Any positions, in any order, duplicates included.
    layout = (*client)->FetchTokens(s->id, 0, {{499, 7, 7}, {0}}, out->buffer_id(), 0, true);
    ASSERT_THAT(layout, IsOk());
    ASSERT_THAT(VerifyFetch(m.kv, 500, *layout, {}, out->data(), out->size()), IsOk());
    // Bad requests name the head and the position.
    EXPECT_THAT((*client)->FetchTokens(s->id, 0, {{1}, {500}}, out->buffer_id(), 0),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         ::testing::HasSubstr("position 500 of kv head 1")));
    EXPECT_THAT((*client)->FetchTokens(s->id, 0, {{1}, {}}, out->buffer_id(), 0),
                StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("heads[1]")));
    EXPECT_THAT((*client)->DropSession(s->id), IsOk());
  }
}

TEST(EndToEndTest, LayerGroupFetchWritesEveryLayerOfTheGroup) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(/*layers=*/4, /*kv_heads=*/2, /*tokens=*/512, /*steps=*/2);
  m.spec.layer_reuse = 2;  // layers {0,1} and {2,3} share a layout
  auto s = c.CreateSession(m.spec);
  ASSERT_THAT(s, IsOk());
  EXPECT_EQ(s->spec.layer_reuse, 2);
  ASSERT_THAT(c.AppendKvInline(s->id, m.kv.Chunk(0, 512), 512), IsOk());
  auto out = c.CreateShmBuffer(4 << 20);
  ASSERT_THAT(out, IsOk());
  SelectOptions opt;
  opt.budget_tokens = 48;
  opt.want_positions = true;
  for (uint32_t first : {0u, 2u}) {
    // One request fetches both layers of the group with the first layer's
    // selection.
    auto r = c.DecodeStep(s->id, first, Queries(m, 0, first), out->buffer_id(), 0, opt,
                          /*num_layers=*/2);
    ASSERT_THAT(r, IsOk());
    EXPECT_EQ(r->layout.first_layer, first);
    EXPECT_EQ(r->layout.num_layers, 2u);
    EXPECT_GT(r->layout.layer_stride_bytes, 0u);
    EXPECT_EQ(r->layout.total_bytes, 2 * r->layout.layer_stride_bytes);
    auto n = VerifyFetch(m.kv, 512, r->layout, r->heads, out->data(), out->size());
    ASSERT_THAT(n, IsOk());
    // Both layers were checked: twice the pages of one layer.
    int64_t pages = 0;
    for (const auto& h : r->layout.heads) pages += static_cast<int64_t>(h.pages.size());
    EXPECT_EQ(*n, 2 * pages);
    // The group's second layer reuses that selection without new queries.
    SelectOptions reuse = opt;
    reuse.reuse_group_selection = true;
    auto again = c.SelectPages(s->id, first + 1, {}, reuse);
    ASSERT_THAT(again, IsOk());
    ASSERT_EQ(again->size(), r->heads.size());
    for (size_t h = 0; h < again->size(); ++h) EXPECT_EQ((*again)[h].pages, r->heads[h].pages);
  }
  // A range crossing the group boundary is refused.
  EXPECT_THAT(c.DecodeStep(s->id, 1, Queries(m, 0, 1), out->buffer_id(), 0, opt, 2),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST(EndToEndTest, LayerRangesReturnWhileTheirTreesBuildInTheBackground) {
  // A prefill of 4 layers x 8 KV heads sent layer by layer under a short
  // unary deadline: each call returns once its bytes are taken and its
  // frames admitted, and the trees (32 builds, seconds of work on a small
  // machine) are built by the daemon in the background. A decode step on
  // layer 0 waits only for layer 0's trees. (The deadline leaves room for
  // a loaded 2-core machine: there a call alone, copy and admission, takes
  // up to a second, and the 32 builds several.)
  auto daemon = StartDaemon("pool { capacity_bytes: 1073741824 }\n");
  ASSERT_THAT(daemon, IsOk());
  ClientOptions o;
  o.socket_path = (*daemon)->socket_path();
  o.timeout = Scaled(absl::Seconds(2));  // sanitizer builds: slower calls and builds alike
  auto client = Client::Create(o);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  SessionSpec spec;
  spec.layers = 4;
  spec.kv_heads = 8;
  spec.q_heads = 8;
  spec.head_dim = 64;
  spec.page_tokens = 16;
  spec.selector = SelectorType::kMdci;
  auto s = c.CreateSession(spec);
  ASSERT_THAT(s, IsOk());
  const uint32_t n = 16384;
  const size_t layer_bytes = spec.ChunkBytes(n) / spec.layers;
  auto kv = c.CreateShmBuffer(layer_bytes);
  ASSERT_THAT(kv, IsOk());
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> row(layer_bytes / 2);
  for (float& x : row) x = u(rng);
  FromFloat(DType::kF16, row.data(), kv->data(), row.size());
  for (uint32_t layer = 0; layer < 4; ++layer) {
    auto next = c.AppendKvLayers(s->id, kv->buffer_id(), 0, layer_bytes, n, layer, 1);
    ASSERT_THAT(next, IsOk()) << "layer " << layer;
    EXPECT_EQ(*next, layer < 3 ? layer + 1 : 0u);
  }
  // The decode steps wait for trees (seconds on a loaded machine, minutes
  // under a sanitizer): they go through a client with a generous deadline
  // and, as a client should, retry while the daemon answers UNAVAILABLE
  // (a group still building past its build wait); only the appends are timed.
  o.timeout = Scaled(absl::Seconds(120));
  auto patient = Client::Create(o);
  ASSERT_THAT(patient, IsOk());
  Client& d = **patient;
  auto out = d.CreateShmBuffer(8 << 20);
  ASSERT_THAT(out, IsOk());
  std::vector<float> q(static_cast<size_t>(spec.q_heads) * spec.head_dim);
  for (float& x : q) x = u(rng);
  SelectOptions opt;
  opt.budget_tokens = 256;
  const absl::Time give_up = absl::Now() + Scaled(absl::Seconds(120));
  auto step = [&](int layer) {
    while (true) {
      auto r = d.DecodeStep(s->id, layer, q, out->buffer_id(), 0, opt);
      if (r.ok() || r.status().code() != absl::StatusCode::kUnavailable || absl::Now() > give_up) {
        return r;
      }
    }
  };
  auto first = step(0);
  ASSERT_THAT(first.status(), IsOk());
  EXPECT_THAT(first->heads, SizeIs(8));
  auto last = step(3);  // waits for its trees
  ASSERT_THAT(last.status(), IsOk());
  auto info = d.GetSession(s->id);
  ASSERT_THAT(info, IsOk());
  EXPECT_EQ(info->tokens, n);
  EXPECT_EQ(info->trees_built, 32u);
}

TEST(EndToEndTest, AClientStreamingFasterThanItsTreesBuildWaitsForStagingInsteadOfGrowingIt) {
  // Six layers sent back to back, one per call, without waiting for trees:
  // the daemon keeps a staging reserve of two chunks (pool.prefault), so
  // from the third chunk on an append waits for a build to return its
  // staging (pool.staging_wait_ms) instead of mapping fresh memory for every
  // queued chunk. Every append succeeds, every tree is built, the fetched
  // pages are the bytes sent, and no staging stays lent out at the end.
  const TestModel m =
      MakeModel(/*layers=*/6, /*kv_heads=*/8, /*tokens=*/8192, /*steps=*/1, SelectorType::kMdci);
  const int64_t n = m.dump.tokens;
  const int layers = m.spec.layers;
  const size_t layer_bytes = m.kv.ChunkBytes(0, n) / layers;
  DaemonOptions options = TestDaemonOptions(absl::StrCat(
      "pool { capacity_bytes: 536870912 prefault: true staging_reserve_bytes: ", 2 * layer_bytes,
      " }\n"));
  const int port = FreePort();
  ASSERT_GT(port, 0);
  options.metrics_port = static_cast<uint16_t>(port);
  auto daemon = DaemonProcess::Start(options);
  ASSERT_THAT(daemon, IsOk());
  ClientOptions o;
  o.socket_path = (*daemon)->socket_path();
  o.timeout = Scaled(absl::Seconds(120));
  auto client = Client::Create(o);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  const double reserve = static_cast<double>((2 * layer_bytes) >> 21 << 21);  // whole 2 MiB
  ASSERT_TRUE(Eventually(
      [&] { return MetricValue(**daemon, "icecache_staging_reserve_bytes") == reserve; }));
  auto s = c.CreateSession(m.spec);
  ASSERT_THAT(s, IsOk());
  auto kv = c.CreateShmBuffer(layer_bytes);
  ASSERT_THAT(kv, IsOk());
  for (int layer = 0; layer < layers; ++layer) {
    m.kv.FillLayers(0, n, layer, 1, kv->data());
    auto next = c.AppendKvLayers(s->id, kv->buffer_id(), 0, layer_bytes, static_cast<uint32_t>(n),
                                 static_cast<uint32_t>(layer), 1);
    ASSERT_THAT(next, IsOk()) << "layer " << layer;
  }
  EXPECT_GE(MetricValue(**daemon, "icecache_staging_waits_total{outcome=\"returned\"}"), 1.0);
  ASSERT_TRUE(Eventually(
      [&] {
        auto info = c.GetSession(s->id);
        return info.ok() && info->trees_built == static_cast<uint32_t>(layers * 8);
      },
      absl::Seconds(120)));
  ASSERT_TRUE(
      Eventually([&] { return MetricValue(**daemon, "icecache_staging_lent_bytes") == 0.0; }));
  auto out = c.CreateShmBuffer(8 * 80 * 2 * 16 * m.spec.head_dim * 2);
  ASSERT_THAT(out, IsOk());
  SelectOptions opt;
  opt.budget_tokens = 64;
  opt.sink_tokens = 4;
  opt.want_positions = true;
  for (int layer : {0, layers - 1}) {
    auto r = c.DecodeStep(s->id, layer, Queries(m, 0, layer), out->buffer_id(), 0, opt);
    ASSERT_THAT(r, IsOk());
    auto verified = VerifyFetch(m.kv, n, r->layout, r->heads, out->data(), out->size());
    ASSERT_THAT(verified, IsOk()) << "layer " << layer;
    EXPECT_GT(*verified, 0);
  }
}

TEST(EndToEndTest, BatchedDecodeAnswersEachEntryAndWritesNothingForABadOne) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  Client& c = **client;
  TestModel m = MakeModel(/*layers=*/2, /*kv_heads=*/2, /*tokens=*/512, /*steps=*/2);
  std::vector<std::string> ids;
  for (int i = 0; i < 2; ++i) {
    auto s = c.CreateSession(m.spec);
    ASSERT_THAT(s, IsOk());
    ASSERT_THAT(c.AppendKvInline(s->id, m.kv.Chunk(0, 512), 512), IsOk());
    ids.push_back(s->id);
  }
  constexpr uint64_t kRegion = 1 << 20;
  auto out = c.CreateShmBuffer(3 * kRegion);
  ASSERT_THAT(out, IsOk());
  std::memset(out->data(), 0xAB, out->size());
  SelectOptions opt;
  opt.budget_tokens = 48;
  opt.want_positions = true;
  // The middle entry names a session that does not exist.
  std::vector<DecodeBatchEntry> entries(3);
  const std::string unknown = "00000000000000000000000000000000";
  const std::string sessions[3] = {ids[0], unknown, ids[1]};
  for (int i = 0; i < 3; ++i) {
    entries[i].session_id = sessions[i];
    entries[i].queries = Queries(m, 0, 1);
    entries[i].buffer_id = out->buffer_id();
    entries[i].offset = i * kRegion;
  }
  auto results = c.DecodeBatch(1, entries, opt);
  ASSERT_THAT(results, IsOk());
  ASSERT_THAT(*results, SizeIs(3));
  EXPECT_THAT((*results)[1], StatusIs(absl::StatusCode::kNotFound, HasSubstr(unknown)));
  for (int i : {0, 2}) {
    ASSERT_THAT((*results)[i], IsOk());
    EXPECT_EQ((*results)[i]->layer, 1u);
    auto n = VerifyFetch(m.kv, 512, (*results)[i]->layout, (*results)[i]->heads, out->data(),
                         out->size());
    ASSERT_THAT(n, IsOk());
    EXPECT_GT(*n, 0);
  }
  // Nothing was written for the bad entry.
  for (uint64_t b = kRegion; b < 2 * kRegion; ++b) ASSERT_EQ(out->data()[b], 0xAB) << "byte " << b;
  // The batch stream goes on after a bad entry.
  entries.erase(entries.begin() + 1);
  auto again = c.DecodeBatch(0, entries, opt);
  ASSERT_THAT(again, IsOk());
  for (const auto& r : *again) EXPECT_THAT(r, IsOk());
  EXPECT_THAT(c.DecodeBatch(0, {}, opt), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(EndToEndTest, EightConcurrentClients) {
  auto daemon = StartDaemon();
  ASSERT_THAT(daemon, IsOk());
  constexpr int kClients = 8;
  std::vector<TestModel> models;
  for (int i = 0; i < kClients; ++i)
    models.push_back(MakeModel(2, 2, 384, 3, SelectorType::kExact, 100 + i));
  std::vector<absl::Status> results(kClients);
  std::vector<int64_t> verified(kClients, 0);
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      auto client = Connect(**daemon);  // one channel per client
      if (!client.ok()) {
        results[i] = client.status();
        return;
      }
      auto v = PrefillAndDecode(**client, models[i], 3, 16, i % 2 == 0);
      results[i] = v.status();
      if (v.ok()) verified[i] = *v;
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kClients; ++i) {
    EXPECT_THAT(results[i], IsOk()) << "client " << i;
    EXPECT_GT(verified[i], 0) << "client " << i;
  }
  auto client = Connect(**daemon);
  ASSERT_THAT(client, IsOk());
  auto stats = (*client)->GetStats();
  ASSERT_THAT(stats, IsOk());
  EXPECT_EQ(stats->sessions, 0u);
  EXPECT_GE(stats->sessions_created, static_cast<uint64_t>(kClients));
  EXPECT_EQ(stats->bytes_used, 0u);
}

}  // namespace
}  // namespace icecache::testing
