// Where a test makes its temporary files and directories: under $TMPDIR, or
// /tmp when it is unset, like mktemp(1) and Python's tempfile. deploy/dev.sh
// runs each suite with TMPDIR set to a directory of its own and fails the
// suite if a test leaves anything there.
#ifndef ICECACHE_TESTS_SUPPORT_TEMP_PATH_H_
#define ICECACHE_TESTS_SUPPORT_TEMP_PATH_H_

#include <stdlib.h>

#include <string>

namespace icecache::testing {

// A mkdtemp/mkstemp template: "$TMPDIR/<prefix>XXXXXX". Pass .data().
inline std::string TempPathTemplate(const std::string& prefix) {
  const char* tmp = getenv("TMPDIR");
  return std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/" + prefix + "XXXXXX";
}

}  // namespace icecache::testing

#endif  // ICECACHE_TESTS_SUPPORT_TEMP_PATH_H_
