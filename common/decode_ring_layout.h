// The byte layout of a DecodeStep ring (proto/icecache/v1/decode_ring.proto,
// docs/architecture.md §8.1), shared by the daemon (server/rpc/decode_ring.*)
// and the C++ client (client/decode_ring_client.*). Plain constants: the
// ring lives in shared memory, so both sides read and write it with
// explicit offsets, never through a struct either side could lay out
// differently.
#ifndef ICECACHE_COMMON_DECODE_RING_LAYOUT_H_
#define ICECACHE_COMMON_DECODE_RING_LAYOUT_H_

#include <cstdint>

namespace icecache::ring {

inline constexpr uint32_t kMagic = 0x47524349;  // "ICRG" little endian
inline constexpr uint32_t kVersion = 1;

inline constexpr uint64_t kHeaderBytes = 256;
// Written by the client.
inline constexpr uint64_t kMagicOffset = 0;
inline constexpr uint64_t kVersionOffset = 4;
inline constexpr uint64_t kRequestSeqOffset = 8;
inline constexpr uint64_t kRequestLenOffset = 16;
// Written by the daemon (its own cache line).
inline constexpr uint64_t kResponseSeqOffset = 64;
inline constexpr uint64_t kCodeOffset = 72;
inline constexpr uint64_t kResponseLenOffset = 76;

inline constexpr uint64_t kMinCapacity = 4096;
inline constexpr uint64_t kMaxCapacity = uint64_t{64} << 20;

// Where the areas start in the ring buffer.
inline constexpr uint64_t RequestAreaOffset() { return kHeaderBytes; }
inline constexpr uint64_t ResponseAreaOffset(uint64_t request_capacity) {
  return kHeaderBytes + request_capacity;
}
inline constexpr uint64_t RingBytes(uint64_t request_capacity, uint64_t response_capacity) {
  return kHeaderBytes + request_capacity + response_capacity;
}

}  // namespace icecache::ring

#endif  // ICECACHE_COMMON_DECODE_RING_LAYOUT_H_
