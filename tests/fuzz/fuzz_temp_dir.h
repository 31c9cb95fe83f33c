// A fuzz target's private directory: made once per process under $TMPDIR
// (tests/support/temp_path.h: /tmp when unset; deploy/dev.sh points it at
// the run's own work directory) and removed with everything in it when the
// process exits
// (libFuzzer ends a run with exit(), which runs atexit handlers). A crash
// leaves it behind, beside libFuzzer's crash input.
#ifndef ICECACHE_TESTS_FUZZ_FUZZ_TEMP_DIR_H_
#define ICECACHE_TESTS_FUZZ_FUZZ_TEMP_DIR_H_

#include <stdlib.h>

#include <filesystem>
#include <string>
#include <system_error>

#include "tests/support/temp_path.h"

namespace icecache::fuzz {

// `prefix`: the directory's name before mkdtemp's six random characters.
inline const std::string& FuzzTempDir(const char* prefix) {
  static const std::string* dir = [prefix] {
    std::string tmpl = ::icecache::testing::TempPathTemplate(prefix);
    if (mkdtemp(tmpl.data()) == nullptr) abort();
    auto* d = new std::string(tmpl);
    atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(*dir, ec);
    });
    return d;
  }();
  return *dir;
}

}  // namespace icecache::fuzz

#endif  // ICECACHE_TESTS_FUZZ_FUZZ_TEMP_DIR_H_
