// JSON for every IceCache tool and report, through nlohmann-json: the value
// type (keys keep insertion order, so reports read in a stable order) and
// the one adapter that turns the library's exceptions into statuses.
//
// Not thread-safe per value; distinct values may be used on distinct threads.
#ifndef ICECACHE_COMMON_JSON_H_
#define ICECACHE_COMMON_JSON_H_

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace icecache {

using Json = nlohmann::ordered_json;

// Parses one complete JSON text. InvalidArgument naming the byte offset and
// what was wrong on malformed input (trailing text included).
absl::StatusOr<Json> ParseJson(std::string_view text);

// Serialises `value`: `indent` spaces per level, or one line when indent <= 0.
// Non-finite numbers are written as null (JSON has no NaN or Inf); bytes that
// are not UTF-8 are replaced by U+FFFD instead of throwing.
std::string DumpJson(const Json& value, int indent = 0);

}  // namespace icecache

#endif  // ICECACHE_COMMON_JSON_H_
