// Host-side copy of a model's KV in the session dtype (fp16), the AppendKv
// chunk builder and the checker that proves fetched pages are byte-identical
// to what was appended. Shared by icecache-demo, icecache-bench-rpc and the
// integration tests. Not thread-safe to mutate; const methods may run
// concurrently.
#ifndef ICECACHE_CLIENT_KV_CHECK_H_
#define ICECACHE_CLIENT_KV_CHECK_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "common/kv_dump.h"

namespace icecache {

class HostKv {
 public:
  // Converts the dump's keys/values to fp16. Rounds the dump in place to the
  // same fp16 values, so exact attention computed from it matches what the
  // daemon holds.
  static HostKv FromDump(KvDump* dump);

  int layers() const { return layers_; }
  int kv_heads() const { return kv_heads_; }
  int head_dim() const { return head_dim_; }
  int64_t tokens() const { return tokens_; }
  size_t row_bytes() const { return static_cast<size_t>(head_dim_) * 2; }

  const uint16_t* key(int layer, int head, int64_t token) const;
  const uint16_t* value(int layer, int head, int64_t token) const;

  // Bytes of the AppendKv chunk of tokens [begin, end).
  size_t ChunkBytes(int64_t begin, int64_t end) const;
  // Writes that chunk (keys [layers][kv_heads][n][d], then values) to `out`,
  // which must hold ChunkBytes(begin, end) bytes.
  void FillChunk(int64_t begin, int64_t end, uint8_t* out) const;
  // The same for layers [first_layer, first_layer + num_layers) only (an
  // AppendKvLayers region): ChunkBytes(begin, end) x num_layers / layers().
  void FillLayers(int64_t begin, int64_t end, int first_layer, int num_layers, uint8_t* out) const;
  std::vector<uint8_t> Chunk(int64_t begin, int64_t end) const;

 private:
  int layers_ = 0, kv_heads_ = 0, head_dim_ = 0;
  int64_t tokens_ = 0;
  std::vector<uint16_t> k_, v_;
};

// Checks every block `layout` says was written into `data` (`size` bytes)
// for `layer` (or its layers, num_layers > 1): each slot below the page's
// fill holds exactly the appended K and V rows of the position the layout
// (or, without layout positions, `heads`) names, and every slot past the
// fill is zero. Positions must be < `tokens`. Returns the number of page
// blocks checked; DataLoss naming the first differing slot; Internal for an
// inconsistent layout.
absl::StatusOr<int64_t> VerifyFetch(const HostKv& kv, int64_t tokens, const FetchLayout& layout,
                                    const std::vector<HeadSelection>& heads, const uint8_t* data,
                                    size_t size);

}  // namespace icecache

#endif  // ICECACHE_CLIENT_KV_CHECK_H_
