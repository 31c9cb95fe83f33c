#include "common/file_util.h"

#include <unistd.h>

#include <cstdio>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"
#include "tests/support/temp_path.h"

namespace icecache {
namespace {

using ::icecache::testing::IsOk;
using ::icecache::testing::StatusIs;
using ::testing::HasSubstr;

TEST(FileUtilTest, ReadsEveryByte) {
  std::string path = ::icecache::testing::TempPathTemplate("icecache_file_util_");
  const int fd = ::mkstemp(path.data());
  ASSERT_GE(fd, 0);
  std::string data(200000, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 7);
  ASSERT_EQ(::write(fd, data.data(), data.size()), static_cast<ssize_t>(data.size()));
  ::close(fd);
  auto read = ReadFileToString(path);
  ::unlink(path.c_str());
  ASSERT_THAT(read, IsOk());
  EXPECT_EQ(*read, data);
}

TEST(FileUtilTest, MissingFileIsNotFoundNamingThePath) {
  EXPECT_THAT(ReadFileToString("/nonexistent/icecache/file"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("/nonexistent/icecache/file")));
}

TEST(FileUtilTest, WriteAtomicallyReplacesTheFileWhole) {
  std::string dir = ::icecache::testing::TempPathTemplate("icecache_file_util_");
  ASSERT_NE(::mkdtemp(dir.data()), nullptr);
  const std::string path = std::string(dir) + "/report.json";
  ASSERT_THAT(WriteFileAtomically(path, "old"), IsOk());
  ASSERT_THAT(WriteFileAtomically(path, "{\"new\": 1}"), IsOk());
  auto read = ReadFileToString(path);
  ASSERT_THAT(read, IsOk());
  EXPECT_EQ(*read, "{\"new\": 1}");
  // Nothing but the file itself is left in the directory.
  EXPECT_EQ(::unlink(path.c_str()), 0);
  EXPECT_EQ(::rmdir(dir.c_str()), 0);
}

TEST(FileUtilTest, WriteAtomicallyIntoAMissingDirectoryNamesThePath) {
  EXPECT_THAT(
      WriteFileAtomically("/nonexistent/icecache/report.json", "x"),
      StatusIs(absl::StatusCode::kNotFound, HasSubstr("/nonexistent/icecache/report.json")));
}

TEST(FileUtilTest, DirectoryIsAnError) { EXPECT_FALSE(ReadFileToString("/tmp").ok()); }

}  // namespace
}  // namespace icecache
