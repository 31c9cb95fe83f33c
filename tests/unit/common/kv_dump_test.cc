#include "common/kv_dump.h"

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "common/npy.h"
#include "common/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

class KvDumpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::icecache::testing::TempPathTemplate("icecache_kvdump_test_");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = tmpl;
    SyntheticConfig c = *SyntheticPreset("small");
    c.tokens = 300;
    c.steps = 3;
    c.threads = 1;
    auto d = GenerateSynthetic(c);
    ASSERT_THAT(d, IsOk());
    dump_ = std::move(*d);
    dump_.model = "tiny \"quoted\" model";
  }
  void TearDown() override { std::system(("rm -rf '" + root_ + "'").c_str()); }
  std::string Dir(const std::string& name) const { return root_ + "/" + name; }
  void WriteFile(const std::string& path, const std::string& text) {
    ::unlink(path.c_str());
    std::ofstream(path) << text;
  }

  std::string root_;
  KvDump dump_;
};

TEST_F(KvDumpTest, Float32RoundTripIsExactWithMeta) {
  const std::string dir = Dir("a/b/f32");  // nested, created on demand
  ASSERT_THAT(WriteKvDump(dump_, dir, DType::kF32), IsOk());
  auto r = ReadKvDump(dir);
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->layers, dump_.layers);
  EXPECT_EQ(r->kv_heads, dump_.kv_heads);
  EXPECT_EQ(r->q_heads, dump_.q_heads);
  EXPECT_EQ(r->tokens, dump_.tokens);
  EXPECT_EQ(r->head_dim, dump_.head_dim);
  EXPECT_EQ(r->steps, dump_.steps);
  EXPECT_EQ(r->keys, dump_.keys);
  EXPECT_EQ(r->values, dump_.values);
  EXPECT_EQ(r->queries, dump_.queries);
  EXPECT_EQ(r->model, dump_.model);
  EXPECT_EQ(r->rope_theta, dump_.rope_theta);
  auto keys = ReadNpy(dir + "/keys.npy");
  ASSERT_THAT(keys, IsOk());
  EXPECT_EQ(keys->shape,
            (std::vector<int64_t>{dump_.layers, dump_.kv_heads, dump_.tokens, dump_.head_dim}));
  auto queries = ReadNpy(dir + "/queries.npy");
  ASSERT_THAT(queries, IsOk());
  EXPECT_EQ(queries->shape,
            (std::vector<int64_t>{dump_.steps, dump_.layers, dump_.q_heads, dump_.head_dim}));
}

TEST_F(KvDumpTest, Float16RoundTripIsCloseAndTruncates) {
  const std::string dir = Dir("f16");
  ASSERT_THAT(WriteKvDump(dump_, dir, DType::kF16), IsOk());
  auto r = ReadKvDump(dir);
  ASSERT_THAT(r, IsOk());
  ASSERT_EQ(r->keys.size(), dump_.keys.size());
  for (size_t i = 0; i < r->keys.size(); ++i) {
    ASSERT_NEAR(r->keys[i], dump_.keys[i], 1e-3 * std::fabs(dump_.keys[i]) + 1e-7) << i;
  }
  auto t = ReadKvDump(dir, 100);
  ASSERT_THAT(t, IsOk());
  EXPECT_EQ(t->tokens, 100);
  EXPECT_EQ(t->queries, r->queries);
  ASSERT_EQ(t->keys.size(),
            static_cast<size_t>(dump_.layers) * dump_.kv_heads * 100 * dump_.head_dim);
  for (int l = 0; l < dump_.layers; ++l) {
    for (int h = 0; h < dump_.kv_heads; ++h) {
      for (int i = 0; i < 100 * dump_.head_dim; ++i) {
        ASSERT_EQ(t->key(l, h)[i], r->key(l, h)[i]);
        ASSERT_EQ(t->value(l, h)[i], r->value(l, h)[i]);
      }
    }
  }
  // max_tokens at or beyond the length, or <= 0, reads everything.
  EXPECT_EQ(ReadKvDump(dir, 300)->tokens, 300);
  EXPECT_EQ(ReadKvDump(dir, 1000)->tokens, 300);
  EXPECT_EQ(ReadKvDump(dir, 0)->tokens, 300);
}

TEST_F(KvDumpTest, MetaIsOptionalAndReadLeniently) {
  const std::string dir = Dir("meta");
  ASSERT_THAT(WriteKvDump(dump_, dir, DType::kF32), IsOk());
  ::unlink((dir + "/meta.json").c_str());
  auto r = ReadKvDump(dir);
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->rope_theta, 0.0);
  EXPECT_EQ(r->model, "");
  WriteFile(dir + "/meta.json",
            "{\"rope_theta\":10000.0 ,\"extra\": [1,2,{\"x\":3}], \"model\" :\"llama-3.1-8b\"}");
  r = ReadKvDump(dir);
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->rope_theta, 10000.0);
  EXPECT_EQ(r->model, "llama-3.1-8b");
  WriteFile(dir + "/meta.json", "this is not json {{{");
  r = ReadKvDump(dir);
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->rope_theta, 0.0);
  WriteFile(dir + "/meta.json", "{\"model\": \"unterminated, \"rope_theta\": nan}");
  EXPECT_THAT(ReadKvDump(dir), IsOk());
}

TEST_F(KvDumpTest, MissingDirectoryAndFiles) {
  EXPECT_THAT(ReadKvDump(Dir("nope")), StatusIs(absl::StatusCode::kNotFound, HasSubstr("nope")));
  const std::string dir = Dir("partial");
  ASSERT_THAT(WriteKvDump(dump_, dir, DType::kF32), IsOk());
  for (const char* name : {"keys.npy", "values.npy", "queries.npy"}) {
    const std::string other = Dir(std::string("without_") + name);
    ASSERT_THAT(WriteKvDump(dump_, other, DType::kF32), IsOk());
    ::unlink((other + "/" + name).c_str());
    EXPECT_THAT(ReadKvDump(other), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(name)))
        << name;
  }
  WriteFile(dir + "/keys.npy", "garbage");
  EXPECT_THAT(ReadKvDump(dir), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("keys.npy")));
  EXPECT_THAT(ReadKvDump(dir + "/values.npy"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a directory")));
}

TEST_F(KvDumpTest, ShapesMustAgreeBetweenFiles) {
  const int64_t L = dump_.layers, H = dump_.kv_heads, T = dump_.tokens, D = dump_.head_dim;
  const int64_t S = dump_.steps, Q = dump_.q_heads;
  struct Case {
    const char* name;
    const char* file;
    std::vector<int64_t> shape;
    std::vector<const char*> expect;
  };
  const std::vector<Case> cases = {
      {"values_tokens", "values.npy", {L, H, T - 1, D}, {"values.npy", "keys.npy", "must match"}},
      {"queries_dim", "queries.npy", {S, L, Q, D / 2}, {"queries.npy", "head_dim"}},
      {"queries_layers", "queries.npy", {S, L + 1, Q, D}, {"queries.npy", "layers"}},
      {"queries_heads", "queries.npy", {S, L, H + 1, D}, {"queries.npy", "multiple"}},
      {"queries_rank",
       "queries.npy",
       {S * L, Q, D},
       {"queries.npy", "[steps, layers, q_heads, head_dim]"}},
      {"keys_rank",
       "keys.npy",
       {L * H, T, D},
       {"keys.npy", "[layers, kv_heads, tokens, head_dim]"}},
  };
  for (const Case& c : cases) {
    const std::string dir = Dir(c.name);
    ASSERT_THAT(WriteKvDump(dump_, dir, DType::kF32), IsOk());
    int64_t n = 1;
    for (int64_t d : c.shape) n *= d;
    std::vector<float> zeros(static_cast<size_t>(n), 0.0f);
    ASSERT_THAT(WriteNpy(dir + "/" + c.file, zeros.data(), c.shape, DType::kF32), IsOk());
    auto r = ReadKvDump(dir);
    EXPECT_THAT(r, StatusIs(absl::StatusCode::kInvalidArgument)) << c.name;
    for (const char* e : c.expect) EXPECT_THAT(r.status().message(), HasSubstr(e)) << c.name;
  }
}

TEST_F(KvDumpTest, WriteRejectsInconsistentDumpsAndBadDtype) {
  EXPECT_THAT(WriteKvDump(dump_, Dir("bf16"), DType::kBF16),
              StatusIs(absl::StatusCode::kInvalidArgument));
  KvDump bad = dump_;
  bad.keys.pop_back();
  EXPECT_THAT(WriteKvDump(bad, Dir("bad1"), DType::kF32),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("keys")));
  bad = dump_;
  bad.q_heads = 3;
  EXPECT_THAT(WriteKvDump(bad, Dir("bad2"), DType::kF32),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("multiple")));
  bad = dump_;
  bad.queries.push_back(1.0f);
  EXPECT_THAT(WriteKvDump(bad, Dir("bad3"), DType::kF32),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("queries")));
  // A regular file where the directory should be.
  WriteFile(Dir("file"), "x");
  EXPECT_FALSE(WriteKvDump(dump_, Dir("file"), DType::kF32).ok());
}

}  // namespace
}  // namespace icecache
