// The daemon's config file: textproto parsing, defaulting, validation and
// redaction must answer every input with a status, never crash or hang.
#include <cstddef>
#include <cstdint>
#include <string>

#include "server/rpc/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto parsed = icecache::rpc::ParseConfigText(text);
  if (!parsed.ok()) return 0;
  icecache::rpc::IcecachedConfig c = *parsed;
  icecache::rpc::ApplyDefaults(&c);
  if (icecache::rpc::ValidateConfig(c).ok()) (void)icecache::rpc::RedactSecrets(c);
  return 0;
}
