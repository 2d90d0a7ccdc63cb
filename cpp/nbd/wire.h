// The NBD wire format shared by the server (cpp/exports/nbd) and the client driver
// (cpp/drivers/nbd): magic numbers, flags, option, command and reply codes, fixed message sizes and
// big-endian load/store helpers, as NetworkBlockDevice/nbd doc/proto.md defines them ("Handshake",
// "Option types", "Option reply types", "Transmission", "Structured reply types", "Error values").
// Constants only; no I/O and no policy of either side.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace blockd::nbd {

// ---- Magic numbers.
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;     // "NBDMAGIC"
inline constexpr uint64_t kOptionMagic = 0x49484156454F5054ull;  // "IHAVEOPT"
inline constexpr uint64_t kOptionReplyMagic = 0x3e889045565a9ull;
// The magic an old-style server sends instead of IHAVEOPT (unsupported by both sides).
inline constexpr uint64_t kOldstyleMagic = 0x00420281861253ull;
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

// ---- Limits and names.
// Longest string (export name, description, meta context query) the protocol allows.
inline constexpr size_t kMaxStringLength = 4096;
// The metadata context that reports allocation (holes and zeroes).
inline constexpr std::string_view kBaseAllocation = "base:allocation";

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

// Writes a 28-byte request header (magic, flags, type, cookie, offset, length) to `out`.
inline void store_request(uint8_t* out, uint16_t flags, uint16_t type, uint64_t cookie,
                           uint64_t offset, uint32_t length) noexcept {
  store32(out, kRequestMagic);
  store16(out + 4, flags);
  store16(out + 6, type);
  store64(out + 8, cookie);
  store64(out + 16, offset);
  store32(out + 24, length);
}

}  // namespace blockd::nbd
