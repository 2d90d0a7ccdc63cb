// Unit tests of the NBD client's reply checks (cpp/drivers/nbd/reply.h): option replies, reply
// headers and every structured chunk type, with the violations a hostile server could send.
#include "drivers/nbd/reply.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <vector>

namespace blockd::drivers::nbd_client {
namespace {

using namespace blockd::nbd;  // NOLINT(google-build-using-namespace)

std::vector<uint8_t> chunk_header(uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length) {
  std::vector<uint8_t> bytes(kChunkHeaderSize);
  store32(bytes.data(), kStructuredReplyMagic);
  store16(bytes.data() + 4, flags);
  store16(bytes.data() + 6, type);
  store64(bytes.data() + 8, cookie);
  store32(bytes.data() + 16, length);
  return bytes;
}

ReplyHeader structured(uint16_t type, uint32_t length, uint16_t flags = kReplyFlagDone) {
  auto bytes = chunk_header(flags, type, 7, length);
  return *parse_reply_header(bytes);
}

const PendingRequest kRead{kCmdRead, 0, 4096, 8192, 0};
const PendingRequest kStatus{kCmdBlockStatus, kCmdFlagReqOne, 0, 65536, 3};

TEST(NbdReplyTest, HeadersOfBothKinds) {
  std::vector<uint8_t> simple(kSimpleReplySize);
  store32(simple.data(), kSimpleReplyMagic);
  store32(simple.data() + 4, kEnospc);
  store64(simple.data() + 8, 0x1122334455667788ull);
  ASSERT_EQ(reply_header_size(load32(simple.data())), kSimpleReplySize);
  auto header = parse_reply_header(simple);
  ASSERT_TRUE(header);
  EXPECT_FALSE(header->structured);
  EXPECT_EQ(header->cookie, 0x1122334455667788ull);
  EXPECT_EQ(nbd_error_to_errno(header->error), -ENOSPC);

  auto chunk = parse_reply_header(chunk_header(kReplyFlagDone, kReplyTypeOffsetData, 9, 100));
  ASSERT_TRUE(chunk);
  EXPECT_TRUE(chunk->structured);
  EXPECT_EQ(chunk->type, kReplyTypeOffsetData);
  EXPECT_EQ(chunk->length, 100u);

  EXPECT_EQ(reply_header_size(0xdeadbeef), 0u);
  simple.resize(kChunkHeaderSize);  // a simple magic with a chunk's size
  EXPECT_FALSE(parse_reply_header(simple));
}

TEST(NbdReplyTest, UnknownErrorsBecomeEinval) {
  EXPECT_EQ(nbd_error_to_errno(0), 0);
  EXPECT_EQ(nbd_error_to_errno(kEio), -EIO);
  EXPECT_EQ(nbd_error_to_errno(kEshutdown), -ESHUTDOWN);
  EXPECT_EQ(nbd_error_to_errno(12345), -EINVAL);
}

TEST(NbdReplyTest, ChunkTypesMustSuitTheCommand) {
  EXPECT_FALSE(check_chunk_header(structured(kReplyTypeOffsetData, 8 + 8192), kRead));
  EXPECT_TRUE(check_chunk_header(structured(kReplyTypeOffsetData, 8 + 8193), kRead));
  EXPECT_TRUE(check_chunk_header(structured(kReplyTypeOffsetData, 8), kRead));
  EXPECT_TRUE(check_chunk_header(structured(kReplyTypeOffsetData, 9), kStatus));
  EXPECT_FALSE(check_chunk_header(structured(kReplyTypeOffsetHole, 12), kRead));
  EXPECT_TRUE(check_chunk_header(structured(kReplyTypeOffsetHole, 13), kRead));
  EXPECT_FALSE(check_chunk_header(structured(kReplyTypeBlockStatus, 12), kStatus));
  EXPECT_TRUE(check_chunk_header(structured(kReplyTypeBlockStatus, 16), kStatus));
  EXPECT_TRUE(check_chunk_header(structured(kReplyTypeBlockStatus, 12), kRead));
  EXPECT_FALSE(check_chunk_header(structured(kReplyTypeNone, 0), kRead));
  EXPECT_TRUE(check_chunk_header(structured(kReplyTypeNone, 0, 0), kRead));
  EXPECT_TRUE(check_chunk_header(structured(kReplyTypeNone, 4), kRead));
  EXPECT_FALSE(check_chunk_header(structured(kReplyTypeError, 6), kRead));
  EXPECT_TRUE(check_chunk_header(structured(kReplyTypeError, 5), kRead));
  EXPECT_TRUE(check_chunk_header(structured(kReplyTypeErrorOffset, 13), kRead));
  EXPECT_TRUE(check_chunk_header(structured(kReplyTypeError, 6 + 4097), kRead));
  EXPECT_FALSE(check_chunk_header(structured(0x8000 + 77, 6), kRead));  // unknown error type
  EXPECT_TRUE(check_chunk_header(structured(77, 0), kRead));             // unknown type
}

TEST(NbdReplyTest, DataAndHolesStayInsideTheRequest) {
  uint8_t offset[8];
  store64(offset, 4096 + 100);
  auto position = data_chunk_position(offset, 8092, kRead);
  ASSERT_TRUE(position);
  EXPECT_EQ(*position, 100u);
  EXPECT_FALSE(data_chunk_position(offset, 8093, kRead));
  store64(offset, 4095);
  EXPECT_FALSE(data_chunk_position(offset, 1, kRead));
  store64(offset, ~0ull);
  EXPECT_FALSE(data_chunk_position(offset, 1, kRead));

  std::vector<uint8_t> hole(12);
  store64(hole.data(), 8192);
  store32(hole.data() + 8, 4096);
  auto found = hole_chunk_position(hole, kRead);
  ASSERT_TRUE(found);
  EXPECT_EQ(found->position, 4096u);
  EXPECT_EQ(found->length, 4096u);
  store32(hole.data() + 8, 4097);
  EXPECT_FALSE(hole_chunk_position(hole, kRead));
  store32(hole.data() + 8, 0);
  EXPECT_FALSE(hole_chunk_position(hole, kRead));
}

TEST(NbdReplyTest, ErrorChunks) {
  std::vector<uint8_t> payload(6 + 5);
  store32(payload.data(), kEnospc);
  store16(payload.data() + 4, 5);
  std::memcpy(payload.data() + 6, "full\n", 5);
  auto error = parse_error_chunk(payload, kReplyTypeError);
  ASSERT_TRUE(error);
  EXPECT_EQ(error->error, kEnospc);
  EXPECT_EQ(error->message, "full?");  // control characters are not passed on
  store16(payload.data() + 4, 6);      // message longer than the payload
  EXPECT_FALSE(parse_error_chunk(payload, kReplyTypeError));
  store16(payload.data() + 4, 0);
  store32(payload.data(), 0);  // error chunks must carry an error
  EXPECT_FALSE(parse_error_chunk(payload, kReplyTypeError));
  store32(payload.data(), kEio);
  EXPECT_FALSE(parse_error_chunk(std::span<const uint8_t>(payload.data(), 11), kReplyTypeErrorOffset));
}

TEST(NbdReplyTest, BlockStatusFirstExtent) {
  std::vector<uint8_t> payload(4 + 16);
  store32(payload.data(), 3);
  store32(payload.data() + 4, 4096);
  store32(payload.data() + 8, kStateHole | kStateZero);
  store32(payload.data() + 12, 4096);
  store32(payload.data() + 16, kStateHole | kStateZero);
  PendingRequest many = kStatus;
  many.flags = 0;
  auto extent = parse_block_status_chunk(payload, many);
  ASSERT_TRUE(extent);
  EXPECT_EQ(extent->length, 8192u);  // equal runs merge
  EXPECT_EQ(extent->flags, kStateHole | kStateZero);
  store32(payload.data(), 4);  // another context: ignored
  EXPECT_EQ(parse_block_status_chunk(payload, many)->length, 0u);
  store32(payload.data(), 3);
  store32(payload.data() + 4, 0);
  EXPECT_FALSE(parse_block_status_chunk(payload, many));
  store32(payload.data() + 4, 65537);  // longer than the request: not allowed with REQ_ONE
  EXPECT_FALSE(parse_block_status_chunk(std::span<const uint8_t>(payload.data(), 12), kStatus));
  EXPECT_EQ(parse_block_status_chunk(std::span<const uint8_t>(payload.data(), 12), many)->length,
            65536u);
}

TEST(NbdReplyTest, OptionReplies) {
  std::vector<uint8_t> header(kOptionReplyHeaderSize);
  store64(header.data(), kOptionReplyMagic);
  store32(header.data() + 8, kOptGo);
  store32(header.data() + 12, kRepInfo);
  store32(header.data() + 16, 12);
  auto reply = parse_option_reply(std::span<const uint8_t, kOptionReplyHeaderSize>(header));
  ASSERT_TRUE(reply);
  EXPECT_EQ(reply->option, uint32_t{kOptGo});
  EXPECT_EQ(reply->type, kRepInfo);
  header[0] ^= 1;
  EXPECT_FALSE(parse_option_reply(std::span<const uint8_t, kOptionReplyHeaderSize>(header)));

  ExportInfo info;
  std::vector<uint8_t> export_info(12);
  store16(export_info.data(), kInfoExport);
  store64(export_info.data() + 2, 1 << 20);
  store16(export_info.data() + 10, kFlagHasFlags | kFlagReadOnly);
  EXPECT_FALSE(apply_info_reply(export_info, info));
  EXPECT_TRUE(info.have_export);
  EXPECT_EQ(info.size, 1u << 20);
  EXPECT_EQ(info.transmission_flags, kFlagHasFlags | kFlagReadOnly);
  export_info.push_back(0);
  EXPECT_TRUE(apply_info_reply(export_info, info));

  std::vector<uint8_t> sizes(14);
  store16(sizes.data(), kInfoBlockSize);
  store32(sizes.data() + 2, 512);
  store32(sizes.data() + 6, 4096);
  store32(sizes.data() + 10, 65536);
  EXPECT_FALSE(apply_info_reply(sizes, info));
  EXPECT_EQ(info.minimum_block, 512u);
  EXPECT_EQ(info.maximum_payload, 65536u);
  store32(sizes.data() + 2, 768);  // not a power of two
  EXPECT_TRUE(apply_info_reply(sizes, info));
  store32(sizes.data() + 2, 1u << 17);  // above 64 KiB
  EXPECT_TRUE(apply_info_reply(sizes, info));
  store32(sizes.data() + 2, 512);
  store32(sizes.data() + 10, 256);  // maximum below minimum
  EXPECT_TRUE(apply_info_reply(sizes, info));

  std::vector<uint8_t> unknown = {0, 9, 1, 2, 3};
  EXPECT_FALSE(apply_info_reply(unknown, info));  // ignored

  std::vector<uint8_t> context(4 + kBaseAllocation.size());
  store32(context.data(), 5);
  std::memcpy(context.data() + 4, kBaseAllocation.data(), kBaseAllocation.size());
  auto meta = parse_meta_context_reply(context);
  ASSERT_TRUE(meta);
  EXPECT_EQ(meta->id, 5u);
  EXPECT_EQ(meta->name, kBaseAllocation);
  EXPECT_FALSE(parse_meta_context_reply(std::span<const uint8_t>(context.data(), 3)));
}

}  // namespace
}  // namespace blockd::drivers::nbd_client
