#include "common/caller.h"

#include "absl/strings/str_cat.h"

namespace icecache {

absl::Status ValidateTenantName(std::string_view tenant) {
  if (tenant.empty()) return absl::InvalidArgumentError("tenant name is empty");
  if (tenant.size() > 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("tenant name is ", tenant.size(), " bytes; at most 128 allowed"));
  }
  for (char ch : tenant) {
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                    (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '@' || ch == ':' ||
                    ch == '-';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat("tenant name has character 0x",
                                                     absl::Hex(static_cast<unsigned char>(ch)),
                                                     "; allowed: [A-Za-z0-9._@:-]"));
    }
  }
  return absl::OkStatus();
}

}  // namespace icecache
