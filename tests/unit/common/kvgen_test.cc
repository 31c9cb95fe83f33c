// Runs the icecache-kvgen binary: exit codes and the dump it writes.
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "common/kv_dump.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;

class KvgenTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::icecache::testing::TempPathTemplate("icecache_kvgen_test_");
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::system(("rm -rf '" + dir_ + "'").c_str()); }
  // Exit status of the tool with `args`; its stderr goes to `err_`.
  int Run(const std::string& args) {
    const std::string cmd = std::string(ICECACHE_KVGEN_PATH) + " " + args + " >" + dir_ +
                            "/stdout 2>" + dir_ + "/stderr";
    const int rc = std::system(cmd.c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }
  std::string Read(const std::string& name) {
    std::string s;
    if (FILE* f = std::fopen((dir_ + "/" + name).c_str(), "r")) {
      char buf[4096];
      size_t n;
      while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) s.append(buf, n);
      std::fclose(f);
    }
    return s;
  }
  std::string dir_;
};

TEST_F(KvgenTest, WritesADumpAndPrintsASummary) {
  ASSERT_EQ(Run("--preset small --tokens 700 --layers 2 --steps 3 --kv-heads 3 --seed 9 --out " +
                dir_ + "/d"),
            0)
      << Read("stderr");
  EXPECT_THAT(Read("stdout"), ::testing::HasSubstr("[2, 3, 700, 64]"));
  auto dump = ReadKvDump(dir_ + "/d");
  ASSERT_THAT(dump, IsOk());
  EXPECT_EQ(dump->layers, 2);
  EXPECT_EQ(dump->kv_heads, 3);
  EXPECT_EQ(dump->q_heads, 6);  // the preset's GQA ratio 2:1
  EXPECT_EQ(dump->tokens, 700);
  EXPECT_EQ(dump->steps, 3);
  EXPECT_EQ(dump->model, "synthetic:small");
  EXPECT_EQ(dump->rope_theta, 500000.0);
  // float32 output, same seed: the same values up to fp16 rounding.
  ASSERT_EQ(Run("--preset=small --tokens=700 --layers=2 --steps=3 --kv_heads=3 --seed=9 "
                "--dtype=float32 --out=" +
                dir_ + "/e"),
            0)
      << Read("stderr");
  auto exact = ReadKvDump(dir_ + "/e");
  ASSERT_THAT(exact, IsOk());
  ASSERT_EQ(exact->keys.size(), dump->keys.size());
  for (size_t i = 0; i < exact->keys.size(); i += 97) {
    EXPECT_NEAR(dump->keys[i], exact->keys[i], 1e-3 * std::fabs(exact->keys[i]) + 1e-6);
  }
}

TEST_F(KvgenTest, BadFlagsExitWithTwo) {
  EXPECT_EQ(Run("--preset nope --out " + dir_ + "/x"), 2);
  EXPECT_THAT(Read("stderr"), ::testing::AllOf(::testing::HasSubstr("nope"),
                                               ::testing::HasSubstr("llama3-8b-like")));
  EXPECT_EQ(Run("--preset small"), 2);  // no --out
  EXPECT_EQ(Run("--preset small --tokens abc --out " + dir_ + "/x"), 2);
  EXPECT_EQ(Run("--preset small --tokens 0 --out " + dir_ + "/x"), 2);
  EXPECT_EQ(Run("--preset small --dtype bf16 --out " + dir_ + "/x"), 2);
  EXPECT_EQ(Run("--preset small --no-such-flag 1 --out " + dir_ + "/x"), 2);
  EXPECT_EQ(Run("--preset small --kv-heads -3 --out " + dir_ + "/x"), 2);
  EXPECT_EQ(Run("--preset small --out " + dir_ + "/x stray"), 2);
  EXPECT_EQ(Run("--preset small --seed"), 2);
}

TEST_F(KvgenTest, IoErrorsExitWithOne) {
  // A regular file where the output directory would go.
  ASSERT_EQ(std::system(("touch " + dir_ + "/file").c_str()), 0);
  EXPECT_EQ(Run("--preset small --tokens 100 --out " + dir_ + "/file/sub"), 1);
  EXPECT_FALSE(Read("stderr").empty());
}

}  // namespace
}  // namespace icecache
