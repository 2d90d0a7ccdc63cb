// What an NBD server sends to the client driver, decoded and checked: option replies of the fixed
// newstyle handshake and the simple and structured replies of the transmission phase.
//
// NetworkBlockDevice/nbd doc/proto.md: "Option reply types" (NBD_REP_ACK, NBD_REP_INFO,
// NBD_REP_META_CONTEXT, errors), "NBD_INFO_EXPORT" and "NBD_INFO_BLOCK_SIZE", "Simple reply
// message", "Structured reply chunk message" and "Structured reply types". Everything here is pure
// (no I/O) because every byte it looks at comes from a server the client does not trust: the
// driver (client.cc) reads a header, asks these functions whether it is acceptable for the request
// it answers, reads the payload and asks again. Anything they reject is a protocol violation after
// which the client drops the connection. Fuzzed by tests/fuzz/nbd_reply_fuzz.cc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "nbd/wire.h"

namespace blockd::drivers::nbd_client {

// Maps an NBD error value from the server to a negative errno of the block layer. Unknown values
// become -EINVAL, as the spec asks clients to treat them.
int nbd_error_to_errno(uint32_t error) noexcept;

// ---- Handshake.

// The fixed part of an option reply: magic, option, reply type and payload length.
struct OptionReply {
  uint32_t option = 0;
  uint32_t type = 0;
  uint32_t length = 0;
};
// Decodes a 20-byte option reply header; nullopt when the magic is wrong.
std::optional<OptionReply> parse_option_reply(
    std::span<const uint8_t, nbd::kOptionReplyHeaderSize> bytes) noexcept;

// What the server told us about the export (NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE).
struct ExportInfo {
  bool have_export = false;  // NBD_INFO_EXPORT seen (mandatory before NBD_REP_ACK of NBD_OPT_GO)
  uint64_t size = 0;
  uint16_t transmission_flags = 0;
  bool have_block_size = false;
  uint32_t minimum_block = 1;
  uint32_t preferred_block = 4096;
  uint32_t maximum_payload = 32u << 20;
};

// Applies the payload of an NBD_REP_INFO reply to `info`. Unknown information types are ignored;
// returns an error text when a known type has the wrong length or impossible values (a minimum
// block size that is not a power of two up to 64 KiB, a maximum below the minimum, ...).
std::optional<std::string> apply_info_reply(std::span<const uint8_t> payload, ExportInfo& info);

// The payload of an NBD_REP_META_CONTEXT reply: the context id the server assigned and its name.
struct MetaContextReply {
  uint32_t id = 0;
  std::string name;
};
std::optional<MetaContextReply> parse_meta_context_reply(std::span<const uint8_t> payload);

// The message text of an option error reply (the payload is an optional string), made printable:
// at most kMaxStringLength bytes, control characters replaced.
std::string option_error_text(std::span<const uint8_t> payload);

// ---- Transmission phase.

// The part of a reply header that names the request: both reply kinds start with a 32-bit magic;
// a simple reply is 16 bytes, a structured chunk header 20.
// Returns the header size for `magic`, or 0 when it is neither reply magic.
size_t reply_header_size(uint32_t magic) noexcept;

struct ReplyHeader {
  bool structured = false;
  uint64_t cookie = 0;
  uint32_t error = 0;   // simple reply: the NBD error (0 on success)
  uint16_t flags = 0;   // structured: chunk flags (kReplyFlagDone)
  uint16_t type = 0;    // structured: chunk type
  uint32_t length = 0;  // structured: payload length
};
// Decodes a header of reply_header_size(magic) bytes; nullopt when the magic is unknown or the size
// does not match it.
std::optional<ReplyHeader> parse_reply_header(std::span<const uint8_t> bytes) noexcept;

// The request a reply answers, as far as checking the reply needs it.
struct PendingRequest {
  uint16_t command = 0;
  uint16_t flags = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
  uint32_t meta_context_id = 0;  // BLOCK_STATUS: the id of base:allocation
};

// Checks a structured chunk header before its payload is read: the type must be valid for the
// command and the length consistent with the type (OFFSET_DATA >= 9 bytes and no more than the
// request, OFFSET_HOLE exactly 12, BLOCK_STATUS 4 + 8n and bounded, error chunks >= 6 (14 with an
// offset) and bounded, NONE only as the final chunk with no payload). Unknown error types are
// acceptable (they fail the request); any other unknown type is not. Returns the violation.
std::optional<std::string> check_chunk_header(const ReplyHeader& header,
                                              const PendingRequest& request);

// The 8-byte offset that opens an OFFSET_DATA payload, checked against the request for a data run
// of `data_length` bytes. Returns the position of the data inside the request's buffer, or nullopt
// when it lies outside the request.
std::optional<uint64_t> data_chunk_position(std::span<const uint8_t, 8> offset_bytes,
                                            uint32_t data_length, const PendingRequest& request);

// An OFFSET_HOLE payload (12 bytes): the position inside the request's buffer and the hole size,
// or nullopt when it is empty or lies outside the request.
struct HolePosition {
  uint64_t position = 0;
  uint32_t length = 0;
};
std::optional<HolePosition> hole_chunk_position(std::span<const uint8_t> payload,
                                                const PendingRequest& request);

// An error chunk's payload: the NBD error and the server's message. nullopt when the message
// length does not fit the payload or the error is zero.
struct ErrorChunk {
  uint32_t error = 0;
  std::string message;
};
std::optional<ErrorChunk> parse_error_chunk(std::span<const uint8_t> payload, uint16_t type);

// The allocation of the run at the start of a BLOCK_STATUS request, from a BLOCK_STATUS payload
// for base:allocation: the first extent (clipped to the request) and its kStateHole/kStateZero
// flags. Chunks for another context id yield `length` 0 and are to be ignored. nullopt when the
// payload is malformed (zero-length first extent, an extent longer than the request with REQ_ONE).
struct Extent {
  uint32_t length = 0;
  uint32_t flags = 0;
};
std::optional<Extent> parse_block_status_chunk(std::span<const uint8_t> payload,
                                               const PendingRequest& request);

// Longest BLOCK_STATUS payload accepted (the spec's advice to servers: at most 2^20 extents).
inline constexpr uint32_t kMaxBlockStatusPayload = 4 + 8 * (1u << 20);

}  // namespace blockd::drivers::nbd_client
