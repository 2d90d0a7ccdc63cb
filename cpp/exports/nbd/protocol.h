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

#include "nbd/wire.h"

namespace blockd::exports::nbd {

// The wire constants live in nbd/wire.h (shared with the client driver); this namespace sees them
// unqualified.
using namespace blockd::nbd;  // NOLINT(google-build-using-namespace)

// ---- Limits.
// Largest READ/WRITE payload the server accepts; advertised as the maximum block size.
inline constexpr uint32_t kMaxPayload = 32u << 20;
// Largest option payload read into memory; longer options are skipped and refused.
inline constexpr uint32_t kMaxOptionLength = 64u << 10;
// The id base:allocation (nbd/wire.h) gets when a client selects it.
inline constexpr uint32_t kBaseAllocationId = 1;

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
