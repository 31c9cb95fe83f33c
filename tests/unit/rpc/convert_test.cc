#include "server/rpc/convert.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "common/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace icecache::rpc {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

v1::SessionConfig GoodProto() {
  v1::SessionConfig p;
  auto* m = p.mutable_model();
  m->set_layers(32);
  m->set_kv_heads(8);
  m->set_q_heads(32);
  m->set_head_dim(128);
  m->set_dtype(v1::DTYPE_BFLOAT16);
  p.set_page_tokens(32);
  p.set_layer_reuse(2);
  p.mutable_selector()->set_kind(v1::SELECTOR_KIND_QUEST);
  p.mutable_selector()->mutable_mdci()->set_field_of_view(12);
  p.set_ttl_ms(30000);
  p.set_pinned(true);
  return p;
}

TEST(ConvertTest, SessionConfigFromProtoCopiesEveryField) {
  SelectDefaults d{512, 8, 16};
  auto c = SessionConfigFromProto(GoodProto(), d);
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->layers, 32);
  EXPECT_EQ(c->kv_heads, 8);
  EXPECT_EQ(c->q_heads, 32);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->dtype, DType::kBF16);
  EXPECT_EQ(c->page_tokens, 32);
  EXPECT_EQ(c->layer_reuse, 2);
  EXPECT_EQ(c->selector, SelectorKind::kQuest);
  EXPECT_EQ(c->mdci.field_of_view, 12);
  EXPECT_EQ(c->mdci.num_composite, MdciParams().num_composite);  // 0 -> default
  EXPECT_EQ(c->ttl, absl::Seconds(30));
  EXPECT_TRUE(c->pinned);
  EXPECT_EQ(c->default_select.budget_tokens, 512);  // daemon defaults fill unset
  EXPECT_EQ(c->default_select.sink_tokens, 8);
  EXPECT_EQ(c->default_select.recent_tokens, 16);
}

TEST(ConvertTest, SessionConfigRoundTripsThroughProto) {
  auto c = SessionConfigFromProto(GoodProto(), SelectDefaults{});
  ASSERT_THAT(c, IsOk());
  const v1::SessionConfig back = SessionConfigToProto(*c);
  auto again = SessionConfigFromProto(back, SelectDefaults{1, 1, 1});
  ASSERT_THAT(again, IsOk());
  EXPECT_EQ(again->layers, c->layers);
  EXPECT_EQ(again->dtype, c->dtype);
  EXPECT_EQ(again->selector, c->selector);
  EXPECT_EQ(again->ttl, c->ttl);
  EXPECT_EQ(again->mdci.field_of_view, c->mdci.field_of_view);
  EXPECT_EQ(again->mdci.pq_factor, 0.0f);  // unset: the tree's descent
  v1::SessionConfig scan = GoodProto();
  scan.mutable_selector()->mutable_mdci()->set_pq_factor(16);
  auto with_scan = SessionConfigFromProto(scan, SelectDefaults{1, 1, 1});
  ASSERT_THAT(with_scan, IsOk());
  EXPECT_EQ(with_scan->mdci.pq_factor, 16.0f);
  EXPECT_EQ(SessionConfigToProto(*with_scan).selector().mdci().pq_factor(), 16.0f);
  // The carry's keep factor: unset is the core's default, 0 keeps every
  // candidate, and either travels back.
  EXPECT_EQ(again->mdci.carry_keep_factor, MdciParams{}.carry_keep_factor);
  v1::SessionConfig keep_all = GoodProto();
  keep_all.mutable_selector()->mutable_mdci()->set_carry_keep_factor(0);
  auto with_all = SessionConfigFromProto(keep_all, SelectDefaults{1, 1, 1});
  ASSERT_THAT(with_all, IsOk());
  EXPECT_EQ(with_all->mdci.carry_keep_factor, 0.0f);
  auto all_again = SessionConfigFromProto(SessionConfigToProto(*with_all), SelectDefaults{1, 1, 1});
  ASSERT_THAT(all_again, IsOk());
  EXPECT_EQ(all_again->mdci.carry_keep_factor, 0.0f);
  // The decode insert's fit: unset is the core's default, 0 routes every
  // key, and either travels back.
  EXPECT_EQ(again->mdci.insert_fit, MdciParams{}.insert_fit);
  for (float fit : {0.0f, 3.5f}) {
    v1::SessionConfig with_fit = GoodProto();
    with_fit.mutable_selector()->mutable_mdci()->set_insert_fit(fit);
    auto got = SessionConfigFromProto(with_fit, SelectDefaults{1, 1, 1});
    ASSERT_THAT(got, IsOk());
    EXPECT_EQ(got->mdci.insert_fit, fit);
    auto back_again = SessionConfigFromProto(SessionConfigToProto(*got), SelectDefaults{1, 1, 1});
    ASSERT_THAT(back_again, IsOk());
    EXPECT_EQ(back_again->mdci.insert_fit, fit);
  }
  // The query basis: unset is on; off travels back.
  EXPECT_TRUE(again->mdci.query_basis);
  v1::SessionConfig no_basis = GoodProto();
  no_basis.mutable_selector()->mutable_mdci()->set_query_basis(false);
  auto without_basis = SessionConfigFromProto(no_basis, SelectDefaults{1, 1, 1});
  ASSERT_THAT(without_basis, IsOk());
  EXPECT_FALSE(without_basis->mdci.query_basis);
  auto basis_again =
      SessionConfigFromProto(SessionConfigToProto(*without_basis), SelectDefaults{1, 1, 1});
  ASSERT_THAT(basis_again, IsOk());
  EXPECT_FALSE(basis_again->mdci.query_basis);
  // Session defaults travel explicitly, so other daemon defaults do not leak in.
  EXPECT_EQ(again->default_select.budget_tokens, c->default_select.budget_tokens);
  EXPECT_EQ(again->default_select.sink_tokens, c->default_select.sink_tokens);
}

TEST(ConvertTest, PageChecksumsConvertBothWaysAndBadOnesNameTheField) {
  v1::SessionConfig p = GoodProto();
  auto off = SessionConfigFromProto(p, SelectDefaults{});
  ASSERT_THAT(off, IsOk());
  EXPECT_EQ(off->checksums.mode, ChecksumMode::kOff);
  p.mutable_checksums()->set_mode(v1::CHECKSUM_MODE_SAMPLED);
  auto sampled = SessionConfigFromProto(p, SelectDefaults{});
  ASSERT_THAT(sampled, IsOk());
  EXPECT_EQ(sampled->checksums.mode, ChecksumMode::kSampled);
  EXPECT_DOUBLE_EQ(sampled->checksums.sample_fraction, 0.0625);  // the default
  p.mutable_checksums()->set_sample_fraction(0.5f);
  auto half = SessionConfigFromProto(p, SelectDefaults{});
  ASSERT_THAT(half, IsOk());
  const v1::SessionConfig back = SessionConfigToProto(*half);
  EXPECT_EQ(back.checksums().mode(), v1::CHECKSUM_MODE_SAMPLED);
  EXPECT_FLOAT_EQ(back.checksums().sample_fraction(), 0.5f);
  p.mutable_checksums()->set_mode(v1::CHECKSUM_MODE_EVERY_PAGE);
  EXPECT_THAT(SessionConfigFromProto(p, SelectDefaults{}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("checksums.sample_fraction")));
  p.mutable_checksums()->set_mode(static_cast<v1::ChecksumMode>(9));
  EXPECT_THAT(SessionConfigFromProto(p, SelectDefaults{}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("checksums.mode")));
}

TEST(ConvertTest, SessionConfigErrorsNameTheField) {
  struct Case {
    const char* field;
    void (*breaker)(v1::SessionConfig*);
  };
  const Case cases[] = {
      {"model", [](v1::SessionConfig* p) { p->clear_model(); }},
      {"model.dtype",
       [](v1::SessionConfig* p) { p->mutable_model()->set_dtype(v1::DTYPE_UNSPECIFIED); }},
      {"model.dtype",
       [](v1::SessionConfig* p) { p->mutable_model()->set_dtype(static_cast<v1::DType>(9)); }},
      {"model.layers", [](v1::SessionConfig* p) { p->mutable_model()->set_layers(0x80000000u); }},
      {"model.head_dim",
       [](v1::SessionConfig* p) { p->mutable_model()->set_head_dim(0xffffffffu); }},
      {"selector.kind",
       [](v1::SessionConfig* p) {
         p->mutable_selector()->set_kind(static_cast<v1::SelectorKind>(77));
       }},
      {"selector.mdci.num_simple",
       [](v1::SessionConfig* p) { p->mutable_selector()->mutable_mdci()->set_num_simple(1000); }},
      {"selector.mdci.candidate_factor",
       [](v1::SessionConfig* p) {
         p->mutable_selector()->mutable_mdci()->set_candidate_factor(NAN);
       }},
      {"selector.mdci.rebuild_fraction",
       [](v1::SessionConfig* p) {
         p->mutable_selector()->mutable_mdci()->set_rebuild_fraction(2);
       }},
      {"selector.mdci.pq_factor",
       [](v1::SessionConfig* p) { p->mutable_selector()->mutable_mdci()->set_pq_factor(600); }},
      {"selector.mdci.carry_keep_factor",
       [](v1::SessionConfig* p) {
         p->mutable_selector()->mutable_mdci()->set_carry_keep_factor(0.5f);
       }},
      {"selector.mdci.carry_keep_factor",
       [](v1::SessionConfig* p) {
         p->mutable_selector()->mutable_mdci()->set_carry_keep_factor(NAN);
       }},
      {"selector.mdci.insert_fit",
       [](v1::SessionConfig* p) { p->mutable_selector()->mutable_mdci()->set_insert_fit(-1); }},
      {"selector.mdci.insert_fit",
       [](v1::SessionConfig* p) { p->mutable_selector()->mutable_mdci()->set_insert_fit(65); }},
      {"selector.mdci.insert_fit",
       [](v1::SessionConfig* p) { p->mutable_selector()->mutable_mdci()->set_insert_fit(NAN); }},
      {"selector.mdci.pq_factor",
       [](v1::SessionConfig* p) { p->mutable_selector()->mutable_mdci()->set_pq_factor(NAN); }},
      {"selector.mdci.pq_factor",
       [](v1::SessionConfig* p) {
         p->mutable_selector()->mutable_mdci()->set_pq_factor(8);
         p->mutable_model()->set_head_dim(36);  // not a multiple of 8
       }},
      {"ttl_ms", [](v1::SessionConfig* p) { p->set_ttl_ms(~uint64_t{0}); }},
      {"defaults.budget_tokens",
       [](v1::SessionConfig* p) { p->mutable_defaults()->set_budget_tokens(0); }},
  };
  for (const Case& c : cases) {
    v1::SessionConfig p = GoodProto();
    c.breaker(&p);
    EXPECT_THAT(SessionConfigFromProto(p, SelectDefaults{}),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.field)))
        << c.field;
  }
}

TEST(ConvertTest, SelectParamsUnsetMeansSessionDefaultExplicitZeroMeansNone) {
  v1::SelectParams p;
  auto s = SelectParamsFromProto(p);
  ASSERT_THAT(s, IsOk());
  EXPECT_EQ(s->budget_tokens, 0);
  EXPECT_EQ(s->sink_tokens, 0);
  EXPECT_EQ(s->recent_tokens, 0);
  p.set_budget_tokens(128);
  p.set_sink_tokens(0);
  p.set_recent_tokens(0);
  p.set_want_positions(true);
  s = SelectParamsFromProto(p);
  ASSERT_THAT(s, IsOk());
  EXPECT_EQ(s->budget_tokens, 128);
  EXPECT_EQ(s->sink_tokens, -1);  // the core's "force 0"
  EXPECT_EQ(s->recent_tokens, -1);
  EXPECT_TRUE(s->want_positions);
  p.set_sink_tokens(4);
  EXPECT_EQ(SelectParamsFromProto(p)->sink_tokens, 4);
  p.set_budget_tokens(0);
  EXPECT_THAT(SelectParamsFromProto(p),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("budget_tokens")));
}

// types.proto: a value above the session's tokens is clamped, whatever its
// size (2^32 - 1 included), never refused.
TEST(ConvertTest, HugeBudgetSinkAndRecentAreClampedNotRefused) {
  v1::SelectParams p;
  p.set_budget_tokens(0xffffffffu);
  p.set_sink_tokens(0xffffffffu);
  p.set_recent_tokens(0xffffffffu);
  auto s = SelectParamsFromProto(p);
  ASSERT_THAT(s, IsOk());
  EXPECT_EQ(s->budget_tokens, 1 << 30);
  EXPECT_EQ(s->sink_tokens, 1 << 30);
  EXPECT_EQ(s->recent_tokens, 1 << 30);
}

TEST(ConvertTest, QueriesConvertFromEachDtype) {
  const std::vector<float> q = {1.0f, -2.5f, 0.125f, 3.0f};
  std::string f32(reinterpret_cast<const char*>(q.data()), q.size() * 4);
  auto out = QueriesFromProto(f32, v1::DTYPE_UNSPECIFIED, false);
  ASSERT_THAT(out, IsOk());
  EXPECT_EQ(*out, q);
  out = QueriesFromProto(f32, v1::DTYPE_FLOAT32, false);
  ASSERT_THAT(out, IsOk());
  EXPECT_EQ(*out, q);

  std::vector<uint16_t> h(q.size());
  FloatToHalf(q.data(), h.data(), q.size());
  out = QueriesFromProto(std::string(reinterpret_cast<const char*>(h.data()), h.size() * 2),
                         v1::DTYPE_FLOAT16, false);
  ASSERT_THAT(out, IsOk());
  EXPECT_EQ(*out, q);  // all exactly representable in fp16

  std::vector<uint16_t> b(q.size());
  FloatToBf16(q.data(), b.data(), q.size());
  out = QueriesFromProto(std::string(reinterpret_cast<const char*>(b.data()), b.size() * 2),
                         v1::DTYPE_BFLOAT16, false);
  ASSERT_THAT(out, IsOk());
  EXPECT_EQ(*out, q);

  EXPECT_THAT(QueriesFromProto(std::string(7, 'x'), v1::DTYPE_FLOAT32, false),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("multiple")));
  EXPECT_THAT(QueriesFromProto("", v1::DTYPE_FLOAT32, false),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("empty")));
  EXPECT_THAT(QueriesFromProto("", v1::DTYPE_FLOAT32, true), IsOk());
  EXPECT_THAT(QueriesFromProto(f32, static_cast<v1::DType>(42), false),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("query_dtype")));
}

TEST(ConvertTest, FetchPagesMustListEveryHeadInOrder) {
  google::protobuf::RepeatedPtrField<v1::HeadPages> heads;
  auto* h0 = heads.Add();
  h0->set_kv_head(0);
  h0->add_pages(3);
  h0->add_pages(3);
  auto* h1 = heads.Add();
  h1->set_kv_head(1);
  auto p = FetchPagesFromProto(heads);
  ASSERT_THAT(p, IsOk());
  ASSERT_EQ(p->size(), 2u);
  EXPECT_THAT((*p)[0], ElementsAre(3u, 3u));
  EXPECT_TRUE((*p)[1].empty());
  heads[1].set_kv_head(2);
  EXPECT_THAT(FetchPagesFromProto(heads),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("heads[1].kv_head")));
}

TEST(ConvertTest, SelectionAndLayoutToProto) {
  Selection s;
  s.pages = {4, 9};
  s.fills = {16, 7};
  s.scores = {std::numeric_limits<float>::infinity(), 1.5f};
  s.positions = {0, 1, 2};
  s.keys_touched = 99;
  v1::HeadSelection hs;
  SelectionToProto(s, 3, &hs);
  EXPECT_EQ(hs.kv_head(), 3u);
  EXPECT_THAT(hs.pages(), ElementsAre(4u, 9u));
  EXPECT_THAT(hs.fills(), ElementsAre(16u, 7u));
  EXPECT_TRUE(std::isinf(hs.scores(0)));
  EXPECT_THAT(hs.positions(), ElementsAre(0, 1, 2));
  EXPECT_EQ(hs.keys_touched(), 99u);

  FetchLayout l;
  l.first_layer = 2;
  l.num_layers = 2;
  l.page_tokens = 16;
  l.head_dim = 64;
  l.dtype = DType::kF16;
  l.frame_bytes = 4096;
  l.buffer_offset = 8192;
  l.layer_stride_bytes = 8192;
  l.total_bytes = 16384;
  FetchHeadLayout h;
  h.kv_head = 0;
  h.slots = {{4, 0, 16, 8192}, {9, 1, 7, 12288}};
  h.positions = {5, 6};
  l.heads.push_back(h);
  v1::FetchLayout pl;
  FetchLayoutToProto(l, "buf1", &pl);
  EXPECT_EQ(pl.buffer_id(), "buf1");
  EXPECT_EQ(pl.offset(), 8192u);
  EXPECT_EQ(pl.total_bytes(), 16384u);
  EXPECT_EQ(pl.page_bytes(), 4096u);
  EXPECT_EQ(pl.first_layer(), 2u);
  EXPECT_EQ(pl.num_layers(), 2u);
  EXPECT_EQ(pl.layer_stride_bytes(), 8192u);
  EXPECT_EQ(pl.dtype(), v1::DTYPE_FLOAT16);
  ASSERT_EQ(pl.heads_size(), 1);
  EXPECT_THAT(pl.heads(0).pages(), ElementsAre(4u, 9u));
  EXPECT_THAT(pl.heads(0).slots(), ElementsAre(0u, 1u));
  EXPECT_THAT(pl.heads(0).fills(), ElementsAre(16u, 7u));
  EXPECT_THAT(pl.heads(0).byte_offsets(), ElementsAre(8192u, 12288u));
  EXPECT_THAT(pl.heads(0).positions(), ElementsAre(5, 6));
}

TEST(ConvertTest, QuotaZeroMeansUnlimited) {
  EXPECT_EQ(QuotaFromProto(0), kUnlimitedQuota);
  EXPECT_EQ(QuotaFromProto(1024), 1024u);
  EXPECT_EQ(QuotaToProto(kUnlimitedQuota), 0u);
  EXPECT_EQ(QuotaToProto(1024), 1024u);
}

TEST(ConvertTest, EnumsMapBothWays) {
  for (DType d : {DType::kF16, DType::kBF16, DType::kF32}) {
    EXPECT_EQ(*DTypeFromProto(DTypeToProto(d), "x"), d);
  }
  for (SelectorKind k : {SelectorKind::kMdci, SelectorKind::kExactMdci, SelectorKind::kExact,
                         SelectorKind::kQuest, SelectorKind::kStreaming, SelectorKind::kArkvale,
                         SelectorKind::kPqcache, SelectorKind::kSnapkv, SelectorKind::kOmnikv,
                         SelectorKind::kMagicpig, SelectorKind::kMdciPublished}) {
    EXPECT_EQ(*SelectorKindFromProto(SelectorKindToProto(k)), k);
  }
  EXPECT_EQ(*SelectorKindFromProto(v1::SELECTOR_KIND_UNSPECIFIED), SelectorKind::kMdci);
}

}  // namespace
}  // namespace icecache::rpc
