// The vhost-user wire protocol, back-end side (docs/interop/vhost-user.rst in QEMU's tree): the
// message header, the request numbers and feature bits blockd uses, and the decoding of the
// payloads it accepts. Every decoder checks the payload's size against what the request needs
// and says what is wrong; nothing here touches guest memory or file descriptors beyond counting
// them.
//
// Threads: pure functions, any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "runtime/status.h"

namespace blockd::exports::vhost_user {

// Front-end requests (the numbers of the VHOST_USER_* messages).
enum class Request : uint32_t {
  kNone = 0,
  kGetFeatures = 1,
  kSetFeatures = 2,
  kSetOwner = 3,
  kResetOwner = 4,
  kSetMemTable = 5,
  kSetLogBase = 6,
  kSetLogFd = 7,
  kSetVringNum = 8,
  kSetVringAddr = 9,
  kSetVringBase = 10,
  kGetVringBase = 11,
  kSetVringKick = 12,
  kSetVringCall = 13,
  kSetVringErr = 14,
  kGetProtocolFeatures = 15,
  kSetProtocolFeatures = 16,
  kGetQueueNum = 17,
  kSetVringEnable = 18,
  kSetBackendReqFd = 21,
  kSetVringEndian = 23,
  kGetConfig = 24,
  kSetConfig = 25,
  kGetInflightFd = 31,
  kSetInflightFd = 32,
  kResetDevice = 34,
  kGetMaxMemSlots = 36,
};

// A request's name for log lines ("SET_MEM_TABLE"), or "request <n>".
std::string request_name(uint32_t request);

// Header flags.
constexpr uint32_t kVersion = 0x1;            // bits 0-1
constexpr uint32_t kVersionMask = 0x3;
constexpr uint32_t kFlagReply = 1u << 2;      // a back-end's reply
constexpr uint32_t kFlagNeedReply = 1u << 3;  // REPLY_ACK requested

constexpr size_t kHeaderSize = 12;
// The largest payload blockd accepts: a memory table of kMaxRegions regions is 8 + 8 * 32 bytes,
// a config message 12 + 256 bytes.
constexpr size_t kMaxPayload = 4096;
constexpr size_t kMaxRegions = 8;
// The most file descriptors one message may carry (a memory table: one per region).
constexpr size_t kMaxFds = kMaxRegions;
constexpr size_t kMaxConfig = 256;

// Feature bits (GET_FEATURES) that are not device specific.
constexpr uint64_t kFeatureIndirectDesc = 1ull << 28;  // VIRTIO_RING_F_INDIRECT_DESC
constexpr uint64_t kFeatureEventIdx = 1ull << 29;      // VIRTIO_RING_F_EVENT_IDX
constexpr uint64_t kFeatureProtocolFeatures = 1ull << 30;  // VHOST_USER_F_PROTOCOL_FEATURES
constexpr uint64_t kFeatureVersion1 = 1ull << 32;      // VIRTIO_F_VERSION_1

// Protocol feature bits (GET_PROTOCOL_FEATURES).
constexpr uint64_t kProtocolMq = 1ull << 0;
constexpr uint64_t kProtocolReplyAck = 1ull << 3;
constexpr uint64_t kProtocolConfig = 1ull << 9;

// SET_VRING_KICK/CALL/ERR: the queue index is in bits 0-7; bit 8 says no descriptor is attached.
constexpr uint64_t kVringIndexMask = 0xff;
constexpr uint64_t kVringNoFd = 1ull << 8;

// The largest split ring (entries).
constexpr uint32_t kMaxQueueSize = 32768;

struct Header {
  uint32_t request = 0;
  uint32_t flags = 0;
  uint32_t size = 0;
};

// Reads the 12-byte header. Errors: wrong version, a payload larger than kMaxPayload.
Expected<Header> parse_header(std::span<const uint8_t, kHeaderSize> bytes);
void store_header(uint8_t* out, const Header& header) noexcept;

// One region of SET_MEM_TABLE.
struct MemoryRegion {
  uint64_t guest_address = 0;  // guest physical address
  uint64_t size = 0;
  uint64_t user_address = 0;   // where the front-end maps it (SET_VRING_ADDR addresses)
  uint64_t mmap_offset = 0;    // offset of the region in its file descriptor
};

// SET_MEM_TABLE: u32 count, u32 padding, then `count` regions, one descriptor per region.
// Errors: a count of 0 or above kMaxRegions, a payload of another size, a descriptor count
// other than the region count, an empty region, a region whose end overflows.
Expected<std::vector<MemoryRegion>> parse_memory_table(std::span<const uint8_t> payload,
                                                       size_t fd_count);

// SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE: u32 index, u32 value.
struct VringState {
  uint32_t index = 0;
  uint32_t value = 0;
};
Expected<VringState> parse_vring_state(std::span<const uint8_t> payload);

// SET_VRING_ADDR: front-end virtual addresses of the three parts of a split ring.
struct VringAddress {
  uint32_t index = 0;
  uint32_t flags = 0;  // bit 0: log the used ring (migration; blockd does not log)
  uint64_t descriptors = 0;
  uint64_t used = 0;
  uint64_t available = 0;
  uint64_t log = 0;
};
Expected<VringAddress> parse_vring_address(std::span<const uint8_t> payload);

// A u64 payload (features, SET_VRING_KICK/CALL/ERR).
Expected<uint64_t> parse_u64(std::span<const uint8_t> payload);

// GET_CONFIG / SET_CONFIG: u32 offset, u32 size, u32 flags, then `size` bytes. Errors: size 0
// or above kMaxConfig, a payload shorter than the header plus size.
struct ConfigRange {
  uint32_t offset = 0;
  uint32_t size = 0;
  uint32_t flags = 0;
  std::span<const uint8_t> bytes;  // SET_CONFIG's new bytes (inside the payload)
};
constexpr size_t kConfigHeaderSize = 12;
Expected<ConfigRange> parse_config(std::span<const uint8_t> payload);

// Little-endian loads and stores (virtio 1.0 is little-endian; so is every host blockd runs on).
inline uint16_t load16(const uint8_t* p) noexcept {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t load32(const uint8_t* p) noexcept {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t load64(const uint8_t* p) noexcept {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline void store16(uint8_t* p, uint16_t v) noexcept { std::memcpy(p, &v, 2); }
inline void store32(uint8_t* p, uint32_t v) noexcept { std::memcpy(p, &v, 4); }
inline void store64(uint8_t* p, uint64_t v) noexcept { std::memcpy(p, &v, 8); }

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "vhost-user code assumes a little-endian host");

}  // namespace blockd::exports::vhost_user
