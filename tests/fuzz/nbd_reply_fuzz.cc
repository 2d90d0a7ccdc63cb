// libFuzzer target: arbitrary bytes from an NBD server into the client driver's reply checks
// (cpp/drivers/nbd/reply.h), walked the way the driver's reader walks a connection: the first byte
// picks the request being answered (read, block status with REQ_ONE, write), then the input is a
// stream of simple replies and structured chunks whose payloads are checked by the function the
// reader would call, until a check rejects something (where the driver would drop the connection).
// A second pass feeds the same bytes to the handshake parsers. Nothing may crash, read out of
// bounds or accept a data or hole chunk outside the request.
#include <cstddef>
#include <cstdint>
#include <span>

#include "drivers/nbd/reply.h"

namespace {

using namespace blockd::nbd;                  // NOLINT(google-build-using-namespace)
using namespace blockd::drivers::nbd_client;  // NOLINT(google-build-using-namespace)

void walk_replies(std::span<const uint8_t> in, const PendingRequest& request) {
  while (in.size() >= 4) {
    const size_t header_size = reply_header_size(load32(in.data()));
    if (header_size == 0 || in.size() < header_size) return;
    auto header = parse_reply_header(in.first(header_size));
    if (!header) __builtin_trap();  // reply_header_size accepted the magic
    in = in.subspan(header_size);
    if (!header->structured) {
      if (header->error == 0 && request.command == kCmdRead) {
        if (in.size() < request.length) return;
        in = in.subspan(request.length);
      }
      continue;
    }
    if (check_chunk_header(*header, request)) return;
    if (in.size() < header->length) return;
    const auto payload = in.first(header->length);
    in = in.subspan(header->length);
    switch (header->type) {
      case kReplyTypeOffsetData: {
        const uint32_t data_length = header->length - 8;
        auto position = data_chunk_position(payload.first<8>(), data_length, request);
        if (!position) return;
        if (*position + data_length > request.length) __builtin_trap();
        break;
      }
      case kReplyTypeOffsetHole: {
        auto hole = hole_chunk_position(payload, request);
        if (!hole) return;
        if (hole->position + hole->length > request.length || hole->length == 0) __builtin_trap();
        break;
      }
      case kReplyTypeBlockStatus: {
        auto extent = parse_block_status_chunk(payload, request);
        if (!extent) return;
        if (extent->length > request.length) __builtin_trap();
        break;
      }
      case kReplyTypeNone:
        break;
      default:
        if (!parse_error_chunk(payload, header->type)) return;
        break;
    }
  }
}

void walk_handshake(std::span<const uint8_t> in) {
  ExportInfo info;
  while (in.size() >= kOptionReplyHeaderSize) {
    auto reply = parse_option_reply(in.first<kOptionReplyHeaderSize>());
    if (!reply) return;
    in = in.subspan(kOptionReplyHeaderSize);
    if (in.size() < reply->length) return;
    const auto payload = in.first(reply->length);
    in = in.subspan(reply->length);
    if (reply->type == kRepInfo) {
      if (apply_info_reply(payload, info)) return;
      if (info.minimum_block == 0 || info.maximum_payload < info.minimum_block) __builtin_trap();
    } else if (reply->type == kRepMetaContext) {
      parse_meta_context_reply(payload);
    } else {
      option_error_text(payload);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  static const PendingRequest kRequests[] = {
      {kCmdRead, 0, 4096, 65536, 0},
      {kCmdRead, kCmdFlagDf, 0, 512, 0},
      {kCmdBlockStatus, kCmdFlagReqOne, 1 << 20, 1 << 20, 1},
      {kCmdWrite, kCmdFlagFua, 0, 4096, 0},
  };
  const PendingRequest& request = kRequests[data[0] % 4];
  std::span<const uint8_t> input(data + 1, size - 1);
  walk_replies(input, request);
  walk_handshake(input);
  return 0;
}
