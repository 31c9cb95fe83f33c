#include "common/json.h"

#include "absl/strings/str_cat.h"

namespace icecache {

absl::StatusOr<Json> ParseJson(std::string_view text) {
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const Json::parse_error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed JSON at byte ", e.byte, ": ", e.what()));
  }
}

std::string DumpJson(const Json& value, int indent) {
  return value.dump(indent > 0 ? indent : -1, ' ', /*ensure_ascii=*/false,
                    Json::error_handler_t::replace);
}

}  // namespace icecache
