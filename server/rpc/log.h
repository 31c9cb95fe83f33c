// Structured logs: one line per event on stderr,
//   ts=2026-11-29T16:30:00.123Z level=info msg=session_created tenant=a id=...
// Values with spaces, quotes, '=' or control characters are double-quoted
// with escapes. Thread-safe: each line is written with a single write(2).
#ifndef ICECACHE_SERVER_RPC_LOG_H_
#define ICECACHE_SERVER_RPC_LOG_H_

#include <initializer_list>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace icecache::rpc {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

// Accepts "debug", "info", "warn"/"warning", "error" (any case).
// InvalidArgument otherwise.
absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name);
absl::string_view LogLevelName(LogLevel level);

void SetLogLevel(LogLevel level);
bool LogEnabled(LogLevel level);

// One key=value field. Build with {"key", value} where value is anything
// absl::StrCat accepts.
struct LogField {
  template <typename T>
  LogField(absl::string_view k, const T& v) : key(k), value(absl::StrCat(v)) {}
  absl::string_view key;
  std::string value;
};

// Formats one line (without the timestamp when `with_time` is false; for tests).
std::string FormatLogLine(LogLevel level, absl::string_view msg,
                          std::initializer_list<LogField> fields, bool with_time = true);

// Writes the line to stderr when `level` is enabled.
void Log(LogLevel level, absl::string_view msg, std::initializer_list<LogField> fields = {});

}  // namespace icecache::rpc

#endif  // ICECACHE_SERVER_RPC_LOG_H_
