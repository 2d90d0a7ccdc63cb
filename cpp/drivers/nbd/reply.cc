#include "drivers/nbd/reply.h"

#include <cerrno>

namespace blockd::drivers::nbd_client {

using namespace blockd::nbd;  // NOLINT(google-build-using-namespace): the wire constants

int nbd_error_to_errno(uint32_t error) noexcept {
  switch (error) {
    case 0:
      return 0;
    case kEperm:
      return -EPERM;
    case kEio:
      return -EIO;
    case kEnomem:
      return -ENOMEM;
    case kEnospc:
      return -ENOSPC;
    case kEoverflow:
      return -EOVERFLOW;
    case kEnotsup:
      return -ENOTSUP;
    case kEshutdown:
      return -ESHUTDOWN;
    case kEinval:
    default:
      return -EINVAL;
  }
}

std::optional<OptionReply> parse_option_reply(
    std::span<const uint8_t, kOptionReplyHeaderSize> bytes) noexcept {
  const uint8_t* p = bytes.data();
  if (load64(p) != kOptionReplyMagic) return std::nullopt;
  return OptionReply{load32(p + 8), load32(p + 12), load32(p + 16)};
}

namespace {

bool is_power_of_two(uint32_t value) { return value != 0 && (value & (value - 1)) == 0; }

}  // namespace

std::optional<std::string> apply_info_reply(std::span<const uint8_t> payload, ExportInfo& info) {
  if (payload.size() < 2) return "NBD_REP_INFO reply is too short";
  const uint8_t* p = payload.data();
  switch (load16(p)) {
    case kInfoExport:
      if (payload.size() != 12) return "NBD_INFO_EXPORT has length " + std::to_string(payload.size());
      info.have_export = true;
      info.size = load64(p + 2);
      info.transmission_flags = load16(p + 10);
      if (info.size > uint64_t(INT64_MAX)) return "export size " + std::to_string(info.size) + " is too large";
      return std::nullopt;
    case kInfoBlockSize: {
      if (payload.size() != 14) {
        return "NBD_INFO_BLOCK_SIZE has length " + std::to_string(payload.size());
      }
      const uint32_t minimum = load32(p + 2);
      const uint32_t preferred = load32(p + 6);
      const uint32_t maximum = load32(p + 10);
      if (!is_power_of_two(minimum) || minimum > (1u << 16)) {
        return "server minimum block size " + std::to_string(minimum) + " is not a power of two up to 65536";
      }
      if (!is_power_of_two(preferred) || preferred < minimum) {
        return "server preferred block size " + std::to_string(preferred) + " is invalid";
      }
      if (maximum < minimum) {
        return "server maximum payload " + std::to_string(maximum) + " is below its minimum block size";
      }
      info.have_block_size = true;
      info.minimum_block = minimum;
      info.preferred_block = preferred;
      info.maximum_payload = maximum;
      return std::nullopt;
    }
    default:  // NBD_INFO_NAME, NBD_INFO_DESCRIPTION and future types: not needed
      return std::nullopt;
  }
}

std::optional<MetaContextReply> parse_meta_context_reply(std::span<const uint8_t> payload) {
  if (payload.size() < 4 || payload.size() - 4 > kMaxStringLength) return std::nullopt;
  MetaContextReply reply;
  reply.id = load32(payload.data());
  reply.name.assign(reinterpret_cast<const char*>(payload.data() + 4), payload.size() - 4);
  return reply;
}

namespace {

std::string printable(const uint8_t* data, size_t length) {
  if (length > kMaxStringLength) length = kMaxStringLength;
  std::string text(reinterpret_cast<const char*>(data), length);
  for (char& c : text) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  }
  return text;
}

}  // namespace

std::string option_error_text(std::span<const uint8_t> payload) {
  return printable(payload.data(), payload.size());
}

size_t reply_header_size(uint32_t magic) noexcept {
  if (magic == kSimpleReplyMagic) return kSimpleReplySize;
  if (magic == kStructuredReplyMagic) return kChunkHeaderSize;
  return 0;
}

std::optional<ReplyHeader> parse_reply_header(std::span<const uint8_t> bytes) noexcept {
  if (bytes.size() < 4) return std::nullopt;
  const uint8_t* p = bytes.data();
  const uint32_t magic = load32(p);
  if (reply_header_size(magic) == 0 || bytes.size() != reply_header_size(magic)) {
    return std::nullopt;
  }
  ReplyHeader header;
  if (magic == kSimpleReplyMagic) {
    header.error = load32(p + 4);
    header.cookie = load64(p + 8);
    return header;
  }
  header.structured = true;
  header.flags = load16(p + 4);
  header.type = load16(p + 6);
  header.cookie = load64(p + 8);
  header.length = load32(p + 16);
  return header;
}

std::optional<std::string> check_chunk_header(const ReplyHeader& header,
                                              const PendingRequest& request) {
  const uint32_t length = header.length;
  switch (header.type) {
    case kReplyTypeNone:
      if (!(header.flags & kReplyFlagDone)) return "NBD_REPLY_TYPE_NONE without the DONE flag";
      if (length != 0) return "NBD_REPLY_TYPE_NONE with a payload";
      return std::nullopt;
    case kReplyTypeOffsetData:
      if (request.command != kCmdRead) return "data chunk in reply to a command other than read";
      if (length < 9 || length - 8 > request.length) {
        return "data chunk of " + std::to_string(length) + " bytes for a read of " +
               std::to_string(request.length);
      }
      return std::nullopt;
    case kReplyTypeOffsetHole:
      if (request.command != kCmdRead) return "hole chunk in reply to a command other than read";
      if (length != 12) return "hole chunk with a payload of " + std::to_string(length) + " bytes";
      return std::nullopt;
    case kReplyTypeBlockStatus:
      if (request.command != kCmdBlockStatus) {
        return "block status chunk in reply to a command other than block status";
      }
      if (length < 12 || (length - 4) % 8 != 0 || length > kMaxBlockStatusPayload) {
        return "block status chunk with a payload of " + std::to_string(length) + " bytes";
      }
      return std::nullopt;
    default:
      break;
  }
  if (header.type & (1u << 15)) {
    // Error chunks: the fixed part, a message of at most kMaxStringLength and, for
    // ERROR_OFFSET, an offset.
    const uint32_t fixed = header.type == kReplyTypeErrorOffset ? 14 : 6;
    if (length < fixed || length > fixed + kMaxStringLength) {
      return "error chunk with a payload of " + std::to_string(length) + " bytes";
    }
    return std::nullopt;
  }
  return "unknown chunk type " + std::to_string(header.type);
}

std::optional<uint64_t> data_chunk_position(std::span<const uint8_t, 8> offset_bytes,
                                            uint32_t data_length, const PendingRequest& request) {
  const uint64_t offset = load64(offset_bytes.data());
  if (offset < request.offset) return std::nullopt;
  const uint64_t position = offset - request.offset;
  if (position > request.length || data_length > request.length - position) return std::nullopt;
  return position;
}

std::optional<HolePosition> hole_chunk_position(std::span<const uint8_t> payload,
                                                const PendingRequest& request) {
  if (payload.size() != 12) return std::nullopt;
  const uint64_t offset = load64(payload.data());
  const uint32_t length = load32(payload.data() + 8);
  if (length == 0 || offset < request.offset) return std::nullopt;
  const uint64_t position = offset - request.offset;
  if (position > request.length || length > request.length - position) return std::nullopt;
  return HolePosition{position, length};
}

std::optional<ErrorChunk> parse_error_chunk(std::span<const uint8_t> payload, uint16_t type) {
  const size_t fixed = type == kReplyTypeErrorOffset ? 14 : 6;
  if (payload.size() < fixed) return std::nullopt;
  ErrorChunk chunk;
  chunk.error = load32(payload.data());
  const uint16_t message_length = load16(payload.data() + 4);
  if (chunk.error == 0 || message_length > payload.size() - fixed) return std::nullopt;
  chunk.message = printable(payload.data() + 6, message_length);
  return chunk;
}

std::optional<Extent> parse_block_status_chunk(std::span<const uint8_t> payload,
                                               const PendingRequest& request) {
  if (payload.size() < 12 || (payload.size() - 4) % 8 != 0) return std::nullopt;
  const uint8_t* p = payload.data();
  if (load32(p) != request.meta_context_id) return Extent{};
  Extent extent{load32(p + 4), load32(p + 8)};
  if (extent.length == 0) return std::nullopt;
  if ((request.flags & kCmdFlagReqOne) && extent.length > request.length) return std::nullopt;
  if (extent.length > request.length) extent.length = request.length;
  // Later extents with the same flags extend the run.
  for (size_t at = 12; at + 8 <= payload.size() && extent.length < request.length; at += 8) {
    const uint32_t length = load32(p + at);
    if (length == 0) return std::nullopt;
    if (load32(p + at + 4) != extent.flags) break;
    extent.length = static_cast<uint32_t>(
        std::min<uint64_t>(uint64_t(extent.length) + length, request.length));
  }
  return extent;
}

}  // namespace blockd::drivers::nbd_client
