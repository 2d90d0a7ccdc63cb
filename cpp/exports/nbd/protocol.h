// The NBD wire protocol: constants, message layouts and the pure rules of the protocol.
//
// Implements the fixed newstyle handshake and the transmission phase of the NBD protocol as
// specified in NetworkBlockDevice/nbd doc/proto.md ("Fixed newstyle negotiation", "Option types",
// "Option reply types", "Request message", "Simple reply message", "Structured reply chunk
// message", "Metadata contexts", "Error values") and the extended headers extension
// (NBD_OPT_EXTENDED_HEADERS, on the spec's extension-ext-header branch). Everything here is free of I/O so that it can be
// unit tested and fuzzed: the connection code (connection.cc) reads bytes, calls these functions
// and writes what they return.
//
// All multi-byte integers on the wire are big-endian.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace blockd::exports::nbd {

// ---- Magic numbers.
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;     // "NBDMAGIC"
inline constexpr uint64_t kOptionMagic = 0x49484156454F5054ull;  // "IHAVEOPT"
inline constexpr uint64_t kOptionReplyMagic = 0x3e889045565a9ull;
inline constexpr uint32_t kRequestMagic = 0x25609513u;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698u;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33efu;
inline constexpr uint32_t kExtendedRequestMagic = 0x21e41c71u;
inline constexpr uint32_t kExtendedReplyMagic = 0x6e8a278cu;

// ---- Handshake flags (server) and client flags.
inline constexpr uint16_t kFlagFixedNewstyle = 1u << 0;
inline constexpr uint16_t kFlagNoZeroes = 1u << 1;
inline constexpr uint32_t kClientFlagFixedNewstyle = 1u << 0;
inline constexpr uint32_t kClientFlagNoZeroes = 1u << 1;

// ---- Transmission flags.
inline constexpr uint16_t kFlagHasFlags = 1u << 0;
inline constexpr uint16_t kFlagReadOnly = 1u << 1;
inline constexpr uint16_t kFlagSendFlush = 1u << 2;
inline constexpr uint16_t kFlagSendFua = 1u << 3;
inline constexpr uint16_t kFlagRotational = 1u << 4;
inline constexpr uint16_t kFlagSendTrim = 1u << 5;
inline constexpr uint16_t kFlagSendWriteZeroes = 1u << 6;
inline constexpr uint16_t kFlagSendDf = 1u << 7;
inline constexpr uint16_t kFlagCanMultiConn = 1u << 8;
inline constexpr uint16_t kFlagSendResize = 1u << 9;
inline constexpr uint16_t kFlagSendCache = 1u << 10;
inline constexpr uint16_t kFlagSendFastZero = 1u << 11;
inline constexpr uint16_t kFlagBlockStatusPayload = 1u << 12;

// ---- Options.
enum Option : uint32_t {
  kOptExportName = 1,
  kOptAbort = 2,
  kOptList = 3,
  kOptPeekExport = 4,
  kOptStartTls = 5,
  kOptInfo = 6,
  kOptGo = 7,
  kOptStructuredReply = 8,
  kOptListMetaContext = 9,
  kOptSetMetaContext = 10,
  kOptExtendedHeaders = 11,
};

// ---- Option reply types.
inline constexpr uint32_t kRepAck = 1;
inline constexpr uint32_t kRepServer = 2;
inline constexpr uint32_t kRepInfo = 3;
inline constexpr uint32_t kRepMetaContext = 4;
inline constexpr uint32_t kRepErrorBit = 1u << 31;
inline constexpr uint32_t kRepErrUnsup = kRepErrorBit + 1;
inline constexpr uint32_t kRepErrPolicy = kRepErrorBit + 2;
inline constexpr uint32_t kRepErrInvalid = kRepErrorBit + 3;
inline constexpr uint32_t kRepErrPlatform = kRepErrorBit + 4;
inline constexpr uint32_t kRepErrTlsReqd = kRepErrorBit + 5;
inline constexpr uint32_t kRepErrUnknown = kRepErrorBit + 6;
inline constexpr uint32_t kRepErrShutdown = kRepErrorBit + 7;
inline constexpr uint32_t kRepErrBlockSizeReqd = kRepErrorBit + 8;
inline constexpr uint32_t kRepErrTooBig = kRepErrorBit + 9;
inline constexpr uint32_t kRepErrExtHeaderReqd = kRepErrorBit + 10;

// ---- NBD_OPT_INFO / NBD_OPT_GO information types.
inline constexpr uint16_t kInfoExport = 0;
inline constexpr uint16_t kInfoName = 1;
inline constexpr uint16_t kInfoDescription = 2;
inline constexpr uint16_t kInfoBlockSize = 3;

// ---- Commands and command flags.
enum Command : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
};
inline constexpr uint16_t kCmdFlagFua = 1u << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1u << 1;
inline constexpr uint16_t kCmdFlagDf = 1u << 2;
inline constexpr uint16_t kCmdFlagReqOne = 1u << 3;
inline constexpr uint16_t kCmdFlagFastZero = 1u << 4;
inline constexpr uint16_t kCmdFlagPayloadLen = 1u << 5;

// ---- Structured reply chunks.
inline constexpr uint16_t kReplyFlagDone = 1u << 0;
inline constexpr uint16_t kReplyTypeNone = 0;
inline constexpr uint16_t kReplyTypeOffsetData = 1;
inline constexpr uint16_t kReplyTypeOffsetHole = 2;
inline constexpr uint16_t kReplyTypeBlockStatus = 5;
inline constexpr uint16_t kReplyTypeBlockStatusExt = 6;
inline constexpr uint16_t kReplyTypeError = (1u << 15) + 1;
inline constexpr uint16_t kReplyTypeErrorOffset = (1u << 15) + 2;

// ---- base:allocation flags.
inline constexpr uint32_t kStateHole = 1u << 0;
inline constexpr uint32_t kStateZero = 1u << 1;

// ---- Error values (the NBD errno space).
inline constexpr uint32_t kEperm = 1;
inline constexpr uint32_t kEio = 5;
inline constexpr uint32_t kEnomem = 12;
inline constexpr uint32_t kEinval = 22;
inline constexpr uint32_t kEnospc = 28;
inline constexpr uint32_t kEoverflow = 75;
inline constexpr uint32_t kEnotsup = 95;
inline constexpr uint32_t kEshutdown = 108;

// ---- Limits.
// Longest string (export name, description, meta context query) the protocol allows.
inline constexpr size_t kMaxStringLength = 4096;
// Largest READ/WRITE payload the server accepts; advertised as the maximum block size.
inline constexpr uint32_t kMaxPayload = 32u << 20;
// Largest option payload read into memory; longer options are skipped and refused.
inline constexpr uint32_t kMaxOptionLength = 64u << 10;
// The metadata context this server offers and the id it gets when selected.
inline constexpr std::string_view kBaseAllocation = "base:allocation";
inline constexpr uint32_t kBaseAllocationId = 1;

// Sizes of fixed wire messages.
inline constexpr size_t kRequestSize = 28;
inline constexpr size_t kExtendedRequestSize = 32;
inline constexpr size_t kSimpleReplySize = 16;
inline constexpr size_t kChunkHeaderSize = 20;
inline constexpr size_t kExtendedChunkHeaderSize = 32;
inline constexpr size_t kOptionHeaderSize = 16;
inline constexpr size_t kOptionReplyHeaderSize = 20;

// ---- Big-endian helpers.
inline uint16_t load16(const uint8_t* p) noexcept { return uint16_t(p[0] << 8 | p[1]); }
inline uint32_t load32(const uint8_t* p) noexcept {
  return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | uint32_t(p[3]);
}
inline uint64_t load64(const uint8_t* p) noexcept {
  return uint64_t(load32(p)) << 32 | load32(p + 4);
}
inline void store16(uint8_t* p, uint16_t v) noexcept {
  p[0] = uint8_t(v >> 8);
  p[1] = uint8_t(v);
}
inline void store32(uint8_t* p, uint32_t v) noexcept {
  store16(p, uint16_t(v >> 16));
  store16(p + 2, uint16_t(v));
}
inline void store64(uint8_t* p, uint64_t v) noexcept {
  store32(p, uint32_t(v >> 32));
  store32(p + 4, uint32_t(v));
}

// Maps a negative (or positive) errno from the block layer to the NBD error sent to the client.
// The one table of this export: EPERM/EROFS -> EPERM, EIO, ENOMEM, ENOSPC/EFBIG/EDQUOT -> ENOSPC,
// EOVERFLOW, ENOTSUP/EOPNOTSUPP, ESHUTDOWN, EINVAL; anything else -> EINVAL (as QEMU's server
// does).
uint32_t errno_to_nbd(int error) noexcept;

// How the transmission phase is framed, as negotiated: simple replies only (the default),
// structured replies (NBD_OPT_STRUCTURED_REPLY) or extended headers (NBD_OPT_EXTENDED_HEADERS:
// 32-byte requests with 64-bit lengths, and only 32-byte reply chunks).
enum class ReplyMode : uint8_t { kSimple, kStructured, kExtended };

// A request header as read from the wire.
struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;  // the client's "handle", echoed in the reply
  uint64_t offset = 0;
  // The payload length when the request carries one (NBD_CMD_WRITE; with extended headers any
  // command flagged NBD_CMD_FLAG_PAYLOAD_LEN), otherwise the length of the range it acts on.
  uint64_t length = 0;
};

// Decodes a request header: kRequestSize bytes in the compact form, kExtendedRequestSize bytes
// once extended headers are negotiated. nullopt when the magic is wrong for that form (the
// connection must be dropped: the stream can no longer be trusted).
std::optional<Request> parse_request(std::span<const uint8_t> bytes) noexcept;

// How many payload bytes follow a request header on the wire.
uint64_t request_payload_length(const Request& request, ReplyMode mode) noexcept;

// The payload form of NBD_CMD_BLOCK_STATUS (extended headers only): a 64-bit effect length and
// the metadata context ids to report. Returns the effect length when the payload is well formed
// and names only `selected_context` (once); nullopt otherwise (the request fails with EINVAL).
std::optional<uint64_t> parse_block_status_payload(std::span<const uint8_t> payload,
                                                   uint32_t selected_context) noexcept;

// Writes the header of a reply chunk in the framing of `mode` (structured or extended; never
// kSimple) and returns its size. Extended headers echo the request's offset.
size_t encode_chunk_header(uint8_t* out, ReplyMode mode, uint16_t flags, uint16_t type,
                           const Request& request, uint64_t payload_length) noexcept;

// What the server knows about the export and the connection when it checks a request.
struct RequestContext {
  uint64_t export_size = 0;
  bool writable = false;
  bool structured_replies = false;
  bool base_allocation_selected = false;
  bool extended_headers = false;
};

// Checks a request against the protocol and the export. Returns 0 when it may be executed, or the
// NBD error to reply with (kEinval for unknown commands or flags, out-of-bounds ranges and payloads
// above kMaxPayload; kEperm for writes to a read-only export; ...). The caller must still consume
// any payload (or drop the connection) whatever this returns. With extended headers NBD_CMD_WRITE
// must carry NBD_CMD_FLAG_PAYLOAD_LEN and no other command may: the caller turns the payload form
// of NBD_CMD_BLOCK_STATUS into a plain request (parse_block_status_payload) before checking it.
uint32_t validate_request(const Request& request, const RequestContext& context) noexcept;

// The transmission flags advertised for an export.
uint16_t transmission_flags(bool writable, bool structured_replies, bool multi_conn) noexcept;

// ---- Option payloads.

// NBD_OPT_INFO / NBD_OPT_GO: export name and the information types the client asked for.
struct InfoRequest {
  std::string name;
  std::vector<uint16_t> info_types;
};
// Parses the payload; nullopt when it is malformed (lengths inconsistent, name too long).
std::optional<InfoRequest> parse_info_request(std::span<const uint8_t> payload);

// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name and queries.
struct MetaContextRequest {
  std::string name;
  std::vector<std::string> queries;
};
// Parses the payload; nullopt when it is malformed.
std::optional<MetaContextRequest> parse_meta_context_request(std::span<const uint8_t> payload);

// The metadata contexts that `queries` select from those the server offers (only base:allocation),
// following the spec's rules: for LIST, no query lists every context and a bare namespace ("base:")
// lists every context of that namespace; for SET, only exact names select, and no query selects
// nothing. Unknown namespaces and contexts are ignored; each context appears once.
std::vector<std::string_view> match_meta_contexts(const std::vector<std::string>& queries,
                                                  bool list);

// Name of an option for log and error messages ("NBD_OPT_GO"); "unknown" otherwise.
std::string_view option_name(uint32_t option) noexcept;

}  // namespace blockd::exports::nbd
