#include "common/npy.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/file_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

class NpyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::icecache::testing::TempPathTemplate("icecache_npy_test_");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::system(("rm -rf '" + dir_ + "'").c_str()); }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::string Slurp(const std::string& path) const { return ReadFileToString(path).value_or(""); }
  std::string Put(const std::string& name, const std::string& bytes) const {
    const std::string p = Path(name);
    // Unlink first: truncating an existing file makes ext4 flush it to disk
    // (auto_da_alloc), which turns the fuzz loop into seconds of I/O.
    ::unlink(p.c_str());
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return p;
  }
  // A file as numpy 1.x writes it: v1.0 header padded to 64 bytes.
  static std::string NumpyFile(const std::string& dict, const std::string& data, int major = 1,
                               size_t align = 64) {
    std::string h = std::string("\x93NUMPY", 6);
    h.push_back(static_cast<char>(major));
    h.push_back(0);
    const size_t len_bytes = major == 1 ? 2 : 4;
    size_t total = 8 + len_bytes + dict.size() + 1;
    total = (total + align - 1) / align * align;
    const size_t hl = total - 8 - len_bytes;
    for (size_t i = 0; i < len_bytes; ++i) h.push_back(static_cast<char>((hl >> (8 * i)) & 0xff));
    h += dict;
    h.append(hl - dict.size() - 1, ' ');
    h.push_back('\n');
    return h + data;
  }
  static std::string FloatBytes(const std::vector<float>& v) {
    return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  }

  std::string dir_;
};

TEST_F(NpyTest, RoundTripsFloat32AndFloat16) {
  std::vector<float> v(2 * 3 * 5);
  for (size_t i = 0; i < v.size(); ++i) v[i] = 0.25f * static_cast<float>(i) - 3.0f;
  for (DType dt : {DType::kF32, DType::kF16}) {
    const std::string p = Path(std::string(DTypeName(dt)) + ".npy");
    ASSERT_THAT(WriteNpy(p, v.data(), {2, 3, 5}, dt), IsOk());
    auto a = ReadNpy(p);
    ASSERT_THAT(a, IsOk());
    EXPECT_EQ(a->dtype, dt);
    EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3, 5}));
    EXPECT_EQ(a->data, v);  // all values are exact in fp16
    const std::string bytes = Slurp(p);
    EXPECT_EQ((bytes.size() - v.size() * DTypeSize(dt)) % 64, 0u);
    EXPECT_THAT(bytes, HasSubstr(dt == DType::kF16 ? "'descr': '<f2'" : "'descr': '<f4'"));
    EXPECT_THAT(bytes, HasSubstr("'shape': (2, 3, 5)"));
  }
  // fp16 rounds to nearest even.
  const float odd = 1.0f + 1.0f / 2048.0f;  // midpoint of 1 and 1 + 2^-10
  ASSERT_THAT(WriteNpy(Path("r.npy"), &odd, {1}, DType::kF16), IsOk());
  EXPECT_EQ(ReadNpy(Path("r.npy"))->data, std::vector<float>{1.0f});
}

TEST_F(NpyTest, ScalarsOneDimAndEmptyArrays) {
  const float x = 7.5f;
  ASSERT_THAT(WriteNpy(Path("s.npy"), &x, {}, DType::kF32), IsOk());
  auto s = ReadNpy(Path("s.npy"));
  ASSERT_THAT(s, IsOk());
  EXPECT_TRUE(s->shape.empty());
  EXPECT_EQ(s->data, std::vector<float>{7.5f});
  std::vector<float> v = {1, 2, 3};
  ASSERT_THAT(WriteNpy(Path("v.npy"), v.data(), {3}, DType::kF32), IsOk());
  EXPECT_THAT(Slurp(Path("v.npy")), HasSubstr("(3,)"));
  EXPECT_EQ(ReadNpy(Path("v.npy"))->data, v);
  ASSERT_THAT(WriteNpy(Path("e.npy"), nullptr, {0, 4}, DType::kF16), IsOk());
  auto e = ReadNpy(Path("e.npy"));
  ASSERT_THAT(e, IsOk());
  EXPECT_EQ(e->shape, (std::vector<int64_t>{0, 4}));
  EXPECT_TRUE(e->data.empty());
}

TEST_F(NpyTest, ReadsNumpyStyleV1AndV2Headers) {
  const std::vector<float> v = {1.5f, -2.0f, 3.25f, 4.0f};
  const std::string v1 =
      NumpyFile("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", FloatBytes(v));
  auto a = ReadNpy(Put("v1.npy", v1));
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ(a->data, v);
  // v2.0, double quotes, no trailing comma, odd spacing, 16-byte alignment.
  const std::string v2 = NumpyFile("{\"shape\":(4,),\"fortran_order\" : False,  \"descr\":\"<f4\"}",
                                   FloatBytes(v), 2, 16);
  auto b = ReadNpy(Put("v2.npy", v2));
  ASSERT_THAT(b, IsOk());
  EXPECT_EQ(b->shape, std::vector<int64_t>{4});
  EXPECT_EQ(b->data, v);
  // float16 data written by hand: 1.0, -2.0.
  const std::string f2 = NumpyFile("{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }",
                                   std::string("\x00\x3c\x00\xc0", 4));
  auto c = ReadNpy(Put("f2.npy", f2));
  ASSERT_THAT(c, IsOk());
  EXPECT_EQ(c->data, (std::vector<float>{1.0f, -2.0f}));
}

TEST_F(NpyTest, MalformedFilesAreInvalidArgumentNamingTheProblem) {
  const std::string data = FloatBytes({1, 2, 3, 4});
  const std::string ok_dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
  struct Case {
    std::string name;
    std::string bytes;
    std::string expect;
  };
  std::string bad_magic = NumpyFile(ok_dict, data);
  bad_magic[1] = 'M';
  std::string v3 = NumpyFile(ok_dict, data);
  v3[6] = 3;
  std::string v11 = NumpyFile(ok_dict, data);
  v11[7] = 1;
  const std::vector<Case> cases = {
      {"magic.npy", bad_magic, "bad magic"},
      {"version.npy", v3, "unsupported format version 3.0"},
      {"minor.npy", v11, "unsupported format version 1.1"},
      {"f8.npy", NumpyFile("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", data),
       "unsupported dtype '<f8'"},
      {"be.npy", NumpyFile("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 2), }", data),
       "unsupported dtype '>f4'"},
      {"fortran.npy", NumpyFile("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", data),
       "Fortran"},
      {"trailing.npy", NumpyFile("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", data),
       "size mismatch"},
      {"short.npy", NumpyFile("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }", data),
       "truncated data"},
      {"garbage.npy", NumpyFile("{'descr' '<f4', 'fortran_order': False, 'shape': (2, 2), }", data),
       "unparsable header"},
      {"nokey.npy", NumpyFile("{'descr': '<f4', 'shape': (2, 2), }", data), "unparsable header"},
      {"extra.npy",
       NumpyFile("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), 'x': 1}", data),
       "unexpected key"},
      {"negshape.npy",
       NumpyFile("{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 2), }", data),
       "non-negative"},
      {"huge.npy",
       NumpyFile("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }",
                 data),
       "2^40"},
      {"misaligned.npy", NumpyFile(ok_dict, "", 1, 1) + data, "misaligned"},
      {"tiny.npy", std::string("\x93NUM", 4), "too short"},
      {"empty.npy", "", "too short"},
  };
  for (const Case& c : cases) {
    if (c.name == "misaligned.npy") {
      // Make the total length deliberately not a multiple of 16.
      std::string b = NumpyFile(ok_dict, "", 1, 1);
      ASSERT_NE(b.size() % 16, 0u) << "fixture must be misaligned";
    }
    const std::string p = Put(c.name, c.bytes);
    EXPECT_THAT(ReadNpy(p), StatusIs(absl::StatusCode::kInvalidArgument,
                                     ::testing::AllOf(HasSubstr(c.name), HasSubstr(c.expect))))
        << c.name;
  }
  EXPECT_THAT(ReadNpy(Path("missing.npy")),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("missing.npy")));
  EXPECT_THAT(ReadNpy(dir_),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a regular file")));
}

// Every strict prefix of a valid file, and the file with single bytes
// corrupted, is rejected with InvalidArgument or (for harmless corruption)
// read with the right element count; never a crash.
TEST_F(NpyTest, FuzzTruncatedAndCorruptedFiles) {
  std::vector<float> v(24);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  for (DType dt : {DType::kF16, DType::kF32}) {
    const std::string good_path = Path("good.npy");
    ASSERT_THAT(WriteNpy(good_path, v.data(), {2, 3, 4}, dt), IsOk());
    const std::string good = Slurp(good_path);
    for (size_t len = 0; len < good.size(); ++len) {
      auto r = ReadNpy(Put("prefix.npy", good.substr(0, len)));
      ASSERT_THAT(r, StatusIs(absl::StatusCode::kInvalidArgument)) << "prefix " << len;
    }
    std::mt19937 rng(5);
    const size_t header_end = good.size() - v.size() * DTypeSize(dt);
    for (int trial = 0; trial < 3000; ++trial) {
      std::string bad = good;
      const int flips = 1 + static_cast<int>(rng() % 3);
      for (int f = 0; f < flips; ++f) bad[rng() % header_end] = static_cast<char>(rng() & 0xff);
      auto r = ReadNpy(Put("corrupt.npy", bad));
      if (r.ok()) {
        EXPECT_EQ(static_cast<int64_t>(r->data.size()), [&] {
          int64_t n = 1;
          for (int64_t d : r->shape) n *= d;
          return n;
        }());
      } else {
        ASSERT_THAT(r, StatusIs(absl::StatusCode::kInvalidArgument)) << r.status();
      }
    }
  }
}

TEST_F(NpyTest, PrefixReadKeepsTheFirstEntriesOfOneAxis) {
  // [2, 3, 4]: element (a, b, c) = 100a + 10b + c.
  std::vector<float> v;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 3; ++b)
      for (int c = 0; c < 4; ++c) v.push_back(100.0f * a + 10.0f * b + c);
  ASSERT_THAT(WriteNpy(Path("p.npy"), v.data(), {2, 3, 4}, DType::kF16), IsOk());
  auto r = ReadNpyPrefix(Path("p.npy"), 1, 2);
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->shape, (std::vector<int64_t>{2, 2, 4}));
  std::vector<float> want;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b)
      for (int c = 0; c < 4; ++c) want.push_back(100.0f * a + 10.0f * b + c);
  EXPECT_EQ(r->data, want);
  auto all = ReadNpyPrefix(Path("p.npy"), 0, 2);
  ASSERT_THAT(all, IsOk());
  EXPECT_EQ(all->data, v);
  EXPECT_THAT(ReadNpyPrefix(Path("p.npy"), 3, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("axis")));
  EXPECT_THAT(ReadNpyPrefix(Path("p.npy"), 1, 4), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ReadNpyPrefix(Path("p.npy"), -1, 1), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(NpyTest, WriteErrors) {
  const float x = 1;
  EXPECT_THAT(WriteNpy(Path("b.npy"), &x, {1}, DType::kBF16),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(WriteNpy(Path("n.npy"), &x, {-1}, DType::kF32),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(WriteNpy(Path("nodir/x.npy"), &x, {1}, DType::kF32),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(WriteNpy(Path("z.npy"), nullptr, {2}, DType::kF32),
              StatusIs(absl::StatusCode::kInvalidArgument));
  // A long shape needs a v2.0 header.
  std::vector<int64_t> shape(30000, 1);
  auto h = EncodeNpyHeader(shape, DType::kF32);
  ASSERT_THAT(h, IsOk());
  EXPECT_EQ((*h)[6], 2);
  EXPECT_EQ(h->size() % 64, 0u);
  auto parsed = ParseNpyHeader(*h, "long");
  ASSERT_THAT(parsed, IsOk());
  EXPECT_EQ(parsed->shape, shape);
  EXPECT_EQ(parsed->data_offset, static_cast<int64_t>(h->size()));
}

}  // namespace
}  // namespace icecache
