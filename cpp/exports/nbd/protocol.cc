#include "exports/nbd/protocol.h"

#include <cerrno>

namespace blockd::exports::nbd {

uint32_t errno_to_nbd(int error) noexcept {
  if (error < 0) error = -error;
  switch (error) {
    case 0:
      return 0;
    case EPERM:
    case EROFS:
      return kEperm;
    case EIO:
      return kEio;
    case ENOMEM:
      return kEnomem;
#ifdef EDQUOT
    case EDQUOT:
#endif
    case EFBIG:
    case ENOSPC:
      return kEnospc;
    case EOVERFLOW:
      return kEoverflow;
    case ENOTSUP:
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
      return kEnotsup;
    case ESHUTDOWN:
      return kEshutdown;
    case EINVAL:
    default:
      return kEinval;
  }
}

std::optional<Request> parse_request(std::span<const uint8_t> bytes) noexcept {
  const bool extended = bytes.size() == kExtendedRequestSize;
  if (!extended && bytes.size() != kRequestSize) return std::nullopt;
  const uint8_t* p = bytes.data();
  if (load32(p) != (extended ? kExtendedRequestMagic : kRequestMagic)) return std::nullopt;
  Request request;
  request.flags = load16(p + 4);
  request.type = load16(p + 6);
  request.cookie = load64(p + 8);
  request.offset = load64(p + 16);
  request.length = extended ? load64(p + 24) : load32(p + 24);
  return request;
}

uint64_t request_payload_length(const Request& request, ReplyMode mode) noexcept {
  if (mode == ReplyMode::kExtended) {
    return (request.flags & kCmdFlagPayloadLen) ? request.length : 0;
  }
  return request.type == kCmdWrite ? request.length : 0;
}

std::optional<uint64_t> parse_block_status_payload(std::span<const uint8_t> payload,
                                                   uint32_t selected_context) noexcept {
  // An effect length, then one or more 32-bit context ids; this server offers a single context,
  // so the only valid list is that one id.
  if (payload.size() != 8 + 4) return std::nullopt;
  if (load32(payload.data() + 8) != selected_context) return std::nullopt;
  return load64(payload.data());
}

size_t encode_chunk_header(uint8_t* out, ReplyMode mode, uint16_t flags, uint16_t type,
                           const Request& request, uint64_t payload_length) noexcept {
  store16(out + 4, flags);
  store16(out + 6, type);
  store64(out + 8, request.cookie);
  if (mode == ReplyMode::kExtended) {
    store32(out, kExtendedReplyMagic);
    store64(out + 16, request.offset);
    store64(out + 24, payload_length);
    return kExtendedChunkHeaderSize;
  }
  store32(out, kStructuredReplyMagic);
  store32(out + 16, static_cast<uint32_t>(payload_length));
  return kChunkHeaderSize;
}

namespace {

bool in_bounds(const Request& request, uint64_t size) noexcept {
  return request.offset <= size && request.length <= size - request.offset;
}

}  // namespace

uint32_t validate_request(const Request& request, const RequestContext& context) noexcept {
  // Flags each command accepts. FUA is accepted (and ignored where meaningless) on every command,
  // as clients commonly set it on flushes.
  uint16_t valid_flags = kCmdFlagFua;
  switch (request.type) {
    case kCmdRead:
      if (context.structured_replies) valid_flags |= kCmdFlagDf;
      break;
    case kCmdWriteZeroes:
      valid_flags |= kCmdFlagNoHole | kCmdFlagFastZero;
      break;
    case kCmdBlockStatus:
      valid_flags |= kCmdFlagReqOne;
      break;
    case kCmdWrite:
    case kCmdDisc:
    case kCmdFlush:
    case kCmdTrim:
    case kCmdCache:
      break;
    default:
      return kEinval;
  }
  // With extended headers a write says its payload length, and no other command has a payload
  // (block status's payload form is resolved before this check).
  if (context.extended_headers && request.type == kCmdWrite) {
    if (!(request.flags & kCmdFlagPayloadLen)) return kEinval;
    valid_flags |= kCmdFlagPayloadLen;
  }
  if (request.flags & ~valid_flags) return kEinval;

  switch (request.type) {
    case kCmdRead:
    case kCmdCache:
      if (request.length > kMaxPayload) return kEinval;
      return in_bounds(request, context.export_size) ? 0 : kEinval;
    case kCmdWrite:
      if (request.length > kMaxPayload) return kEinval;
      if (!context.writable) return kEperm;
      return in_bounds(request, context.export_size) ? 0 : kEinval;
    case kCmdTrim:
    case kCmdWriteZeroes:
      if (!context.writable) return kEperm;
      return in_bounds(request, context.export_size) ? 0 : kEinval;
    case kCmdBlockStatus:
      if (!context.structured_replies || !context.base_allocation_selected) return kEinval;
      if (request.length == 0) return kEinval;
      return in_bounds(request, context.export_size) ? 0 : kEinval;
    default:  // DISC, FLUSH: offset and length are not used
      return 0;
  }
}

uint16_t transmission_flags(bool writable, bool structured_replies, bool multi_conn) noexcept {
  uint16_t flags = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendCache;
  if (writable) {
    flags |= kFlagSendTrim | kFlagSendWriteZeroes | kFlagSendFastZero;
  } else {
    flags |= kFlagReadOnly;
  }
  if (structured_replies) flags |= kFlagSendDf;
  if (multi_conn) flags |= kFlagCanMultiConn;
  return flags;
}

namespace {

// A bounds-checked reader over an option payload.
class PayloadReader {
 public:
  explicit PayloadReader(std::span<const uint8_t> bytes) : bytes_(bytes) {}
  bool u16(uint16_t& out) {
    if (remaining() < 2) return false;
    out = load16(bytes_.data() + position_);
    position_ += 2;
    return true;
  }
  bool u32(uint32_t& out) {
    if (remaining() < 4) return false;
    out = load32(bytes_.data() + position_);
    position_ += 4;
    return true;
  }
  // A string of `length` bytes, at most kMaxStringLength.
  bool string(uint32_t length, std::string& out) {
    if (length > kMaxStringLength || remaining() < length) return false;
    out.assign(reinterpret_cast<const char*>(bytes_.data() + position_), length);
    position_ += length;
    return true;
  }
  size_t remaining() const { return bytes_.size() - position_; }

 private:
  std::span<const uint8_t> bytes_;
  size_t position_ = 0;
};

}  // namespace

std::optional<InfoRequest> parse_info_request(std::span<const uint8_t> payload) {
  PayloadReader reader(payload);
  InfoRequest request;
  uint32_t name_length;
  uint16_t count;
  if (!reader.u32(name_length) || !reader.string(name_length, request.name) || !reader.u16(count)) {
    return std::nullopt;
  }
  if (reader.remaining() != size_t(count) * 2) return std::nullopt;
  request.info_types.resize(count);
  for (auto& type : request.info_types) reader.u16(type);
  return request;
}

std::optional<MetaContextRequest> parse_meta_context_request(std::span<const uint8_t> payload) {
  PayloadReader reader(payload);
  MetaContextRequest request;
  uint32_t name_length;
  uint32_t count;
  if (!reader.u32(name_length) || !reader.string(name_length, request.name) || !reader.u32(count)) {
    return std::nullopt;
  }
  // Each query takes at least its 4-byte length: reject impossible counts before reserving.
  if (count > reader.remaining() / 4) return std::nullopt;
  request.queries.resize(count);
  for (auto& query : request.queries) {
    uint32_t length;
    if (!reader.u32(length) || !reader.string(length, query)) return std::nullopt;
  }
  if (reader.remaining() != 0) return std::nullopt;
  return request;
}

std::vector<std::string_view> match_meta_contexts(const std::vector<std::string>& queries,
                                                  bool list) {
  std::vector<std::string_view> selected;
  if (queries.empty()) {
    if (list) selected.push_back(kBaseAllocation);
    return selected;
  }
  for (const auto& query : queries) {
    const bool match = query == kBaseAllocation || (list && query == "base:");
    if (match && selected.empty()) selected.push_back(kBaseAllocation);
  }
  return selected;
}

std::string_view option_name(uint32_t option) noexcept {
  switch (option) {
    case kOptExportName:
      return "NBD_OPT_EXPORT_NAME";
    case kOptAbort:
      return "NBD_OPT_ABORT";
    case kOptList:
      return "NBD_OPT_LIST";
    case kOptPeekExport:
      return "NBD_OPT_PEEK_EXPORT";
    case kOptStartTls:
      return "NBD_OPT_STARTTLS";
    case kOptInfo:
      return "NBD_OPT_INFO";
    case kOptGo:
      return "NBD_OPT_GO";
    case kOptStructuredReply:
      return "NBD_OPT_STRUCTURED_REPLY";
    case kOptListMetaContext:
      return "NBD_OPT_LIST_META_CONTEXT";
    case kOptSetMetaContext:
      return "NBD_OPT_SET_META_CONTEXT";
    case kOptExtendedHeaders:
      return "NBD_OPT_EXTENDED_HEADERS";
    default:
      return "unknown";
  }
}

}  // namespace blockd::exports::nbd
