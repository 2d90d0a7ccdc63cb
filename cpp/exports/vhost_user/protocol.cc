// Decoding of vhost-user messages (see protocol.h).
#include "exports/vhost_user/protocol.h"

namespace blockd::exports::vhost_user {

std::string request_name(uint32_t request) {
  switch (static_cast<Request>(request)) {
    case Request::kNone: return "NONE";
    case Request::kGetFeatures: return "GET_FEATURES";
    case Request::kSetFeatures: return "SET_FEATURES";
    case Request::kSetOwner: return "SET_OWNER";
    case Request::kResetOwner: return "RESET_OWNER";
    case Request::kSetMemTable: return "SET_MEM_TABLE";
    case Request::kSetLogBase: return "SET_LOG_BASE";
    case Request::kSetLogFd: return "SET_LOG_FD";
    case Request::kSetVringNum: return "SET_VRING_NUM";
    case Request::kSetVringAddr: return "SET_VRING_ADDR";
    case Request::kSetVringBase: return "SET_VRING_BASE";
    case Request::kGetVringBase: return "GET_VRING_BASE";
    case Request::kSetVringKick: return "SET_VRING_KICK";
    case Request::kSetVringCall: return "SET_VRING_CALL";
    case Request::kSetVringErr: return "SET_VRING_ERR";
    case Request::kGetProtocolFeatures: return "GET_PROTOCOL_FEATURES";
    case Request::kSetProtocolFeatures: return "SET_PROTOCOL_FEATURES";
    case Request::kGetQueueNum: return "GET_QUEUE_NUM";
    case Request::kSetVringEnable: return "SET_VRING_ENABLE";
    case Request::kSetBackendReqFd: return "SET_BACKEND_REQ_FD";
    case Request::kSetVringEndian: return "SET_VRING_ENDIAN";
    case Request::kGetConfig: return "GET_CONFIG";
    case Request::kSetConfig: return "SET_CONFIG";
    case Request::kGetInflightFd: return "GET_INFLIGHT_FD";
    case Request::kSetInflightFd: return "SET_INFLIGHT_FD";
    case Request::kResetDevice: return "RESET_DEVICE";
    case Request::kGetMaxMemSlots: return "GET_MAX_MEM_SLOTS";
  }
  return "request " + std::to_string(request);
}

Expected<Header> parse_header(std::span<const uint8_t, kHeaderSize> bytes) {
  Header header;
  header.request = load32(bytes.data());
  header.flags = load32(bytes.data() + 4);
  header.size = load32(bytes.data() + 8);
  if ((header.flags & kVersionMask) != kVersion) {
    return Status::generic("unsupported vhost-user version " +
                           std::to_string(header.flags & kVersionMask) + " in " +
                           request_name(header.request));
  }
  if (header.size > kMaxPayload) {
    return Status::generic(request_name(header.request) + " payload of " +
                           std::to_string(header.size) + " bytes is too large");
  }
  return header;
}

void store_header(uint8_t* out, const Header& header) noexcept {
  store32(out, header.request);
  store32(out + 4, header.flags);
  store32(out + 8, header.size);
}

namespace {

Status wrong_size(const char* what, size_t got, size_t want) {
  return Status::generic(std::string(what) + " payload has " + std::to_string(got) +
                         " bytes, expected " + std::to_string(want));
}

}  // namespace

Expected<std::vector<MemoryRegion>> parse_memory_table(std::span<const uint8_t> payload,
                                                       size_t fd_count) {
  constexpr size_t kRegionSize = 32;
  if (payload.size() < 8) return wrong_size("SET_MEM_TABLE", payload.size(), 8);
  const uint32_t count = load32(payload.data());
  if (count == 0 || count > kMaxRegions) {
    return Status::generic("SET_MEM_TABLE with " + std::to_string(count) +
                           " regions (1 to " + std::to_string(kMaxRegions) + " supported)");
  }
  if (payload.size() != 8 + count * kRegionSize) {
    return wrong_size("SET_MEM_TABLE", payload.size(), 8 + count * kRegionSize);
  }
  if (fd_count != count) {
    return Status::generic("SET_MEM_TABLE with " + std::to_string(count) + " regions but " +
                           std::to_string(fd_count) + " file descriptors");
  }
  std::vector<MemoryRegion> regions(count);
  for (uint32_t i = 0; i < count; ++i) {
    const uint8_t* p = payload.data() + 8 + i * kRegionSize;
    MemoryRegion& region = regions[i];
    region.guest_address = load64(p);
    region.size = load64(p + 8);
    region.user_address = load64(p + 16);
    region.mmap_offset = load64(p + 24);
    if (region.size == 0 || region.guest_address + region.size < region.guest_address ||
        region.user_address + region.size < region.user_address ||
        region.mmap_offset + region.size < region.mmap_offset) {
      return Status::generic("SET_MEM_TABLE region " + std::to_string(i) +
                             " is empty or wraps around");
    }
  }
  return regions;
}

Expected<VringState> parse_vring_state(std::span<const uint8_t> payload) {
  if (payload.size() != 8) return wrong_size("vring state", payload.size(), 8);
  return VringState{load32(payload.data()), load32(payload.data() + 4)};
}

Expected<VringAddress> parse_vring_address(std::span<const uint8_t> payload) {
  if (payload.size() != 40) return wrong_size("SET_VRING_ADDR", payload.size(), 40);
  VringAddress address;
  address.index = load32(payload.data());
  address.flags = load32(payload.data() + 4);
  address.descriptors = load64(payload.data() + 8);
  address.used = load64(payload.data() + 16);
  address.available = load64(payload.data() + 24);
  address.log = load64(payload.data() + 32);
  return address;
}

Expected<uint64_t> parse_u64(std::span<const uint8_t> payload) {
  if (payload.size() != 8) return wrong_size("u64", payload.size(), 8);
  return load64(payload.data());
}

Expected<ConfigRange> parse_config(std::span<const uint8_t> payload) {
  if (payload.size() < kConfigHeaderSize) {
    return wrong_size("config", payload.size(), kConfigHeaderSize);
  }
  ConfigRange range;
  range.offset = load32(payload.data());
  range.size = load32(payload.data() + 4);
  range.flags = load32(payload.data() + 8);
  if (range.size == 0 || range.size > kMaxConfig) {
    return Status::generic("config access of " + std::to_string(range.size) + " bytes");
  }
  if (payload.size() < kConfigHeaderSize + range.size) {
    return wrong_size("config", payload.size(), kConfigHeaderSize + range.size);
  }
  range.bytes = payload.subspan(kConfigHeaderSize, range.size);
  return range;
}

}  // namespace blockd::exports::vhost_user
