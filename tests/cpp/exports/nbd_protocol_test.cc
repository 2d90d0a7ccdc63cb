// Unit tests of the NBD wire rules (cpp/exports/nbd/protocol.h): request decoding and validation,
// option payload parsing, metadata context matching, transmission flags and the errno table.
#include <gtest/gtest.h>

#include <cerrno>
#include <string>
#include <vector>

#include "exports/nbd/protocol.h"

namespace blockd::exports::nbd {
namespace {

std::vector<uint8_t> encode_request(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset,
                                    uint32_t length, uint32_t magic = kRequestMagic) {
  std::vector<uint8_t> bytes(kRequestSize);
  store32(bytes.data(), magic);
  store16(bytes.data() + 4, flags);
  store16(bytes.data() + 6, type);
  store64(bytes.data() + 8, cookie);
  store64(bytes.data() + 16, offset);
  store32(bytes.data() + 24, length);
  return bytes;
}

std::optional<Request> decode(const std::vector<uint8_t>& bytes) {
  return parse_request(std::span<const uint8_t>(bytes.data(), kRequestSize));
}

TEST(NbdRequestTest, DecodesBigEndianFields) {
  auto request = decode(encode_request(kCmdFlagFua, kCmdWrite, 0x0102030405060708ull,
                                       0x1122334455667788ull, 0xdeadbeef));
  ASSERT_TRUE(request);
  EXPECT_EQ(request->flags, kCmdFlagFua);
  EXPECT_EQ(request->type, kCmdWrite);
  EXPECT_EQ(request->cookie, 0x0102030405060708ull);
  EXPECT_EQ(request->offset, 0x1122334455667788ull);
  EXPECT_EQ(request->length, 0xdeadbeefu);
}

TEST(NbdRequestTest, RejectsWrongMagic) {
  EXPECT_FALSE(decode(encode_request(0, kCmdRead, 1, 0, 512, 0x25609514)));
}

TEST(NbdRequestTest, DecodesExtendedRequestsWith64BitLengths) {
  std::vector<uint8_t> bytes(kExtendedRequestSize);
  store32(bytes.data(), kExtendedRequestMagic);
  store16(bytes.data() + 4, kCmdFlagPayloadLen);
  store16(bytes.data() + 6, kCmdWrite);
  store64(bytes.data() + 8, 42);
  store64(bytes.data() + 16, 1ull << 40);
  store64(bytes.data() + 24, 0x123456789ull);
  auto request = parse_request(bytes);
  ASSERT_TRUE(request);
  EXPECT_EQ(request->length, 0x123456789ull);
  EXPECT_EQ(request->offset, 1ull << 40);
  EXPECT_EQ(request_payload_length(*request, ReplyMode::kExtended), 0x123456789ull);
  // The compact magic in an extended header (and the reverse) is a stream out of sync.
  store32(bytes.data(), kRequestMagic);
  EXPECT_FALSE(parse_request(bytes));
  EXPECT_FALSE(decode(encode_request(0, kCmdRead, 1, 0, 512, kExtendedRequestMagic)));
  // Any other header size is refused.
  EXPECT_FALSE(parse_request(std::span<const uint8_t>(bytes.data(), 30)));
}

TEST(NbdRequestTest, PayloadLengthDependsOnTheHeaderForm) {
  Request write;
  write.type = kCmdWrite;
  write.length = 4096;
  Request trim;
  trim.type = kCmdTrim;
  trim.length = 1ull << 33;
  EXPECT_EQ(request_payload_length(write, ReplyMode::kStructured), 4096u);
  EXPECT_EQ(request_payload_length(trim, ReplyMode::kSimple), 0u);
  // Extended: only the flag says there is a payload, whatever the command.
  EXPECT_EQ(request_payload_length(write, ReplyMode::kExtended), 0u);
  EXPECT_EQ(request_payload_length(trim, ReplyMode::kExtended), 0u);
  trim.flags = kCmdFlagPayloadLen;
  EXPECT_EQ(request_payload_length(trim, ReplyMode::kExtended), 1ull << 33);
}

TEST(NbdRequestTest, BlockStatusPayloadForm) {
  uint8_t payload[16];
  store64(payload, 1ull << 35);
  store32(payload + 8, kBaseAllocationId);
  EXPECT_EQ(parse_block_status_payload(std::span<const uint8_t>(payload, 12), kBaseAllocationId),
            1ull << 35);
  EXPECT_FALSE(parse_block_status_payload(std::span<const uint8_t>(payload, 12), 9));
  EXPECT_FALSE(parse_block_status_payload(std::span<const uint8_t>(payload, 8), kBaseAllocationId));
  store32(payload + 12, kBaseAllocationId);  // the same id twice
  EXPECT_FALSE(parse_block_status_payload(payload, kBaseAllocationId));
}

TEST(NbdReplyTest, EncodesStructuredAndExtendedChunkHeaders) {
  Request request;
  request.cookie = 0x0102030405060708ull;
  request.offset = 1ull << 33;
  uint8_t out[kExtendedChunkHeaderSize];
  ASSERT_EQ(encode_chunk_header(out, ReplyMode::kStructured, kReplyFlagDone, kReplyTypeOffsetData,
                                request, 4104),
            kChunkHeaderSize);
  EXPECT_EQ(load32(out), kStructuredReplyMagic);
  EXPECT_EQ(load16(out + 4), kReplyFlagDone);
  EXPECT_EQ(load16(out + 6), kReplyTypeOffsetData);
  EXPECT_EQ(load64(out + 8), request.cookie);
  EXPECT_EQ(load32(out + 16), 4104u);
  ASSERT_EQ(encode_chunk_header(out, ReplyMode::kExtended, 0, kReplyTypeBlockStatusExt, request,
                                24),
            kExtendedChunkHeaderSize);
  EXPECT_EQ(load32(out), kExtendedReplyMagic);
  EXPECT_EQ(load16(out + 4), 0u);
  EXPECT_EQ(load16(out + 6), kReplyTypeBlockStatusExt);
  EXPECT_EQ(load64(out + 8), request.cookie);
  EXPECT_EQ(load64(out + 16), request.offset);  // echoed
  EXPECT_EQ(load64(out + 24), 24u);
}

RequestContext writable_context() {
  return RequestContext{1u << 20, /*writable=*/true, /*structured_replies=*/true,
                        /*base_allocation_selected=*/true};
}

Request make(uint16_t type, uint64_t offset, uint32_t length, uint16_t flags = 0) {
  Request request;
  request.type = type;
  request.offset = offset;
  request.length = length;
  request.flags = flags;
  return request;
}

TEST(NbdValidateTest, AcceptsInBoundsRequests) {
  const auto context = writable_context();
  EXPECT_EQ(validate_request(make(kCmdRead, 0, 4096), context), 0u);
  EXPECT_EQ(validate_request(make(kCmdRead, (1u << 20) - 512, 512), context), 0u);
  EXPECT_EQ(validate_request(make(kCmdWrite, 0, 4096, kCmdFlagFua), context), 0u);
  EXPECT_EQ(validate_request(make(kCmdFlush, 0, 0), context), 0u);
  EXPECT_EQ(validate_request(make(kCmdTrim, 0, 1u << 20), context), 0u);
  EXPECT_EQ(validate_request(make(kCmdWriteZeroes, 0, 1u << 20, kCmdFlagNoHole | kCmdFlagFastZero),
                             context),
            0u);
  EXPECT_EQ(validate_request(make(kCmdCache, 0, 4096), context), 0u);
  EXPECT_EQ(validate_request(make(kCmdBlockStatus, 0, 1u << 20, kCmdFlagReqOne), context), 0u);
  EXPECT_EQ(validate_request(make(kCmdRead, 0, 4096, kCmdFlagDf), context), 0u);
}

TEST(NbdValidateTest, OutOfBoundsIsEinval) {
  const auto context = writable_context();
  EXPECT_EQ(validate_request(make(kCmdRead, 1u << 20, 1), context), kEinval);
  EXPECT_EQ(validate_request(make(kCmdWrite, (1u << 20) - 1, 2), context), kEinval);
  EXPECT_EQ(validate_request(make(kCmdTrim, ~0ull, 1), context), kEinval);
  EXPECT_EQ(validate_request(make(kCmdWriteZeroes, ~0ull - 10, 100), context), kEinval);
  EXPECT_EQ(validate_request(make(kCmdBlockStatus, (1u << 20) + 1, 1), context), kEinval);
  EXPECT_EQ(validate_request(make(kCmdCache, 2u << 20, 1), context), kEinval);
}

TEST(NbdValidateTest, PayloadAboveMaximumIsEinval) {
  RequestContext context = writable_context();
  context.export_size = 1ull << 40;
  EXPECT_EQ(validate_request(make(kCmdRead, 0, kMaxPayload), context), 0u);
  EXPECT_EQ(validate_request(make(kCmdRead, 0, kMaxPayload + 1), context), kEinval);
  EXPECT_EQ(validate_request(make(kCmdWrite, 0, kMaxPayload + 1), context), kEinval);
  // Commands without a payload may cover more.
  EXPECT_EQ(validate_request(make(kCmdTrim, 0, 0xffffffffu), context), 0u);
  EXPECT_EQ(validate_request(make(kCmdWriteZeroes, 0, 0xffffffffu), context), 0u);
}

TEST(NbdValidateTest, WritesToReadOnlyExportAreEperm) {
  RequestContext context = writable_context();
  context.writable = false;
  EXPECT_EQ(validate_request(make(kCmdWrite, 0, 512), context), kEperm);
  EXPECT_EQ(validate_request(make(kCmdTrim, 0, 512), context), kEperm);
  EXPECT_EQ(validate_request(make(kCmdWriteZeroes, 0, 512), context), kEperm);
  EXPECT_EQ(validate_request(make(kCmdRead, 0, 512), context), 0u);
  EXPECT_EQ(validate_request(make(kCmdFlush, 0, 0), context), 0u);
}

TEST(NbdValidateTest, UnknownCommandsAndFlagsAreEinval) {
  const auto context = writable_context();
  EXPECT_EQ(validate_request(make(8, 0, 512), context), kEinval);  // RESIZE: not offered
  EXPECT_EQ(validate_request(make(0x4242, 0, 512), context), kEinval);
  EXPECT_EQ(validate_request(make(kCmdRead, 0, 512, 1u << 7), context), kEinval);
  EXPECT_EQ(validate_request(make(kCmdWrite, 0, 512, kCmdFlagNoHole), context), kEinval);
  EXPECT_EQ(validate_request(make(kCmdRead, 0, 512, kCmdFlagReqOne), context), kEinval);
  EXPECT_EQ(validate_request(make(kCmdBlockStatus, 0, 512, kCmdFlagDf), context), kEinval);
}

TEST(NbdValidateTest, DfAndBlockStatusNeedNegotiation) {
  RequestContext context = writable_context();
  context.structured_replies = false;
  EXPECT_EQ(validate_request(make(kCmdRead, 0, 512, kCmdFlagDf), context), kEinval);
  context.structured_replies = true;
  context.base_allocation_selected = false;
  EXPECT_EQ(validate_request(make(kCmdBlockStatus, 0, 512), context), kEinval);
  context.base_allocation_selected = true;
  EXPECT_EQ(validate_request(make(kCmdBlockStatus, 0, 0), context), kEinval);
}

TEST(NbdValidateTest, ExtendedHeadersRuleThePayloadFlag) {
  RequestContext context = writable_context();
  context.extended_headers = true;
  EXPECT_EQ(validate_request(make(kCmdWrite, 0, 4096, kCmdFlagPayloadLen), context), 0u);
  EXPECT_EQ(validate_request(make(kCmdWrite, 0, 4096), context), kEinval);
  EXPECT_EQ(validate_request(make(kCmdRead, 0, 4096, kCmdFlagPayloadLen), context), kEinval);
  // Effect lengths may exceed 32 bits where the command has no payload.
  context.export_size = 1ull << 40;
  Request trim = make(kCmdTrim, 0, 0);
  trim.length = 1ull << 39;
  EXPECT_EQ(validate_request(trim, context), 0u);
  trim.offset = (1ull << 40) - 1;
  EXPECT_EQ(validate_request(trim, context), kEinval);
  // The flag means nothing without extended headers.
  context.extended_headers = false;
  EXPECT_EQ(validate_request(make(kCmdWrite, 0, 4096, kCmdFlagPayloadLen), context), kEinval);
}

TEST(NbdErrnoTest, MapsTheSpecErrors) {
  EXPECT_EQ(errno_to_nbd(0), 0u);
  EXPECT_EQ(errno_to_nbd(-EPERM), kEperm);
  EXPECT_EQ(errno_to_nbd(-EROFS), kEperm);
  EXPECT_EQ(errno_to_nbd(-EIO), kEio);
  EXPECT_EQ(errno_to_nbd(-ENOMEM), kEnomem);
  EXPECT_EQ(errno_to_nbd(-ENOSPC), kEnospc);
  EXPECT_EQ(errno_to_nbd(-EFBIG), kEnospc);
  EXPECT_EQ(errno_to_nbd(-EDQUOT), kEnospc);
  EXPECT_EQ(errno_to_nbd(-EINVAL), kEinval);
  EXPECT_EQ(errno_to_nbd(-EOVERFLOW), kEoverflow);
  EXPECT_EQ(errno_to_nbd(-ENOTSUP), kEnotsup);
  EXPECT_EQ(errno_to_nbd(-EOPNOTSUPP), kEnotsup);
  EXPECT_EQ(errno_to_nbd(-ESHUTDOWN), kEshutdown);
  EXPECT_EQ(errno_to_nbd(EIO), kEio);  // positive values too
  EXPECT_EQ(errno_to_nbd(-ENOENT), kEinval);
  EXPECT_EQ(errno_to_nbd(-ENOMEDIUM), kEinval);
}

TEST(NbdFlagsTest, AdvertisesOnlyWhatTheExportDoes) {
  const uint16_t read_only = transmission_flags(false, false, true);
  EXPECT_TRUE(read_only & kFlagHasFlags);
  EXPECT_TRUE(read_only & kFlagReadOnly);
  EXPECT_FALSE(read_only & (kFlagSendTrim | kFlagSendWriteZeroes | kFlagSendFastZero));
  EXPECT_FALSE(read_only & kFlagSendDf);
  EXPECT_TRUE(read_only & kFlagCanMultiConn);
  const uint16_t writable = transmission_flags(true, true, false);
  EXPECT_FALSE(writable & kFlagReadOnly);
  EXPECT_TRUE(writable & kFlagSendTrim);
  EXPECT_TRUE(writable & kFlagSendWriteZeroes);
  EXPECT_TRUE(writable & kFlagSendFastZero);
  EXPECT_TRUE(writable & kFlagSendFua);
  EXPECT_TRUE(writable & kFlagSendFlush);
  EXPECT_TRUE(writable & kFlagSendCache);
  EXPECT_TRUE(writable & kFlagSendDf);
  EXPECT_FALSE(writable & kFlagCanMultiConn);
}

// Builders for option payloads.
void put32(std::vector<uint8_t>& out, uint32_t value) {
  out.resize(out.size() + 4);
  store32(out.data() + out.size() - 4, value);
}
void put16(std::vector<uint8_t>& out, uint16_t value) {
  out.resize(out.size() + 2);
  store16(out.data() + out.size() - 2, value);
}
void put_string(std::vector<uint8_t>& out, const std::string& text) {
  out.insert(out.end(), text.begin(), text.end());
}

TEST(NbdOptionTest, ParsesInfoRequest) {
  std::vector<uint8_t> payload;
  put32(payload, 3);
  put_string(payload, "exp");
  put16(payload, 2);
  put16(payload, kInfoName);
  put16(payload, kInfoBlockSize);
  auto request = parse_info_request(payload);
  ASSERT_TRUE(request);
  EXPECT_EQ(request->name, "exp");
  EXPECT_EQ(request->info_types, (std::vector<uint16_t>{kInfoName, kInfoBlockSize}));
}

TEST(NbdOptionTest, RejectsMalformedInfoRequests) {
  std::vector<uint8_t> payload;
  put32(payload, 10);  // name longer than the payload
  put_string(payload, "exp");
  put16(payload, 0);
  EXPECT_FALSE(parse_info_request(payload));

  payload.clear();
  put32(payload, 3);
  put_string(payload, "exp");
  put16(payload, 2);  // claims two types, carries one
  put16(payload, kInfoName);
  EXPECT_FALSE(parse_info_request(payload));

  payload.clear();
  put32(payload, 0);
  put16(payload, 0);
  put16(payload, 7);  // trailing garbage
  EXPECT_FALSE(parse_info_request(payload));

  payload.clear();
  put32(payload, 5000);  // over the string limit
  put_string(payload, std::string(5000, 'a'));
  put16(payload, 0);
  EXPECT_FALSE(parse_info_request(payload));

  EXPECT_FALSE(parse_info_request({}));
}

TEST(NbdOptionTest, ParsesMetaContextRequest) {
  std::vector<uint8_t> payload;
  put32(payload, 0);
  put32(payload, 2);
  put32(payload, 15);
  put_string(payload, "base:allocation");
  put32(payload, 8);
  put_string(payload, "qemu:foo");
  auto request = parse_meta_context_request(payload);
  ASSERT_TRUE(request);
  EXPECT_EQ(request->name, "");
  EXPECT_EQ(request->queries, (std::vector<std::string>{"base:allocation", "qemu:foo"}));
}

TEST(NbdOptionTest, RejectsMalformedMetaContextRequests) {
  std::vector<uint8_t> payload;
  put32(payload, 0);
  put32(payload, 0x40000000);  // an impossible count must not allocate
  EXPECT_FALSE(parse_meta_context_request(payload));

  payload.clear();
  put32(payload, 0);
  put32(payload, 1);
  put32(payload, 20);  // query longer than what follows
  put_string(payload, "base:");
  EXPECT_FALSE(parse_meta_context_request(payload));

  payload.clear();
  put32(payload, 0);
  put32(payload, 0);
  put32(payload, 0);  // trailing bytes
  EXPECT_FALSE(parse_meta_context_request(payload));
}

TEST(NbdMetaContextTest, FollowsTheNamespaceRules) {
  using V = std::vector<std::string_view>;
  // LIST: no query lists everything; a bare namespace lists that namespace.
  EXPECT_EQ(match_meta_contexts({}, true), V{kBaseAllocation});
  EXPECT_EQ(match_meta_contexts({"base:"}, true), V{kBaseAllocation});
  EXPECT_EQ(match_meta_contexts({"base:allocation"}, true), V{kBaseAllocation});
  // SET: nothing selects nothing; only exact names select.
  EXPECT_EQ(match_meta_contexts({}, false), V{});
  EXPECT_EQ(match_meta_contexts({"base:"}, false), V{});
  EXPECT_EQ(match_meta_contexts({"base:allocation"}, false), V{kBaseAllocation});
  // Unknown namespaces and names are ignored; duplicates collapse.
  EXPECT_EQ(match_meta_contexts({"qemu:dirty-bitmap:x", "nonsense", "base:other"}, true), V{});
  EXPECT_EQ(match_meta_contexts({"base:allocation", "base:allocation", "x-y:z"}, false),
            V{kBaseAllocation});
  EXPECT_EQ(match_meta_contexts({"BASE:allocation"}, false), V{});
}

}  // namespace
}  // namespace blockd::exports::nbd
