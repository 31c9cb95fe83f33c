// The .npy reader's header parser (every KV dump and query file goes through
// it): any bytes give a header or a status; a parsed header's sizes are
// consistent (no overflow in the element count).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "common/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto h = icecache::ParseNpyHeader(std::string_view(reinterpret_cast<const char*>(data), size),
                                    "fuzz.npy");
  if (!h.ok()) return 0;
  // A header that parsed must re-encode (shape and dtype are ones we write).
  (void)h->num_elements();
  (void)icecache::EncodeNpyHeader(h->shape, h->dtype);
  return 0;
}
