// Unit tests of the vhost-user message decoders (cpp/exports/vhost_user/protocol.h).
#include "exports/vhost_user/protocol.h"

#include <gtest/gtest.h>

#include <vector>

namespace blockd::exports::vhost_user {
namespace {

std::vector<uint8_t> header_bytes(uint32_t request, uint32_t flags, uint32_t size) {
  std::vector<uint8_t> bytes(kHeaderSize);
  store_header(bytes.data(), Header{request, flags, size});
  return bytes;
}

Expected<Header> decode(const std::vector<uint8_t>& bytes) {
  return parse_header(std::span<const uint8_t, kHeaderSize>(bytes.data(), kHeaderSize));
}

TEST(VhostUserHeaderTest, DecodesAndChecksVersionAndSize) {
  auto header = decode(header_bytes(5, kVersion | kFlagNeedReply, 40));
  ASSERT_TRUE(header);
  EXPECT_EQ(header->request, 5u);
  EXPECT_EQ(header->size, 40u);
  EXPECT_EQ(decode(header_bytes(1, 2, 0)).status().message(),
            "unsupported vhost-user version 2 in GET_FEATURES");
  EXPECT_EQ(decode(header_bytes(24, kVersion, 5000)).status().message(),
            "GET_CONFIG payload of 5000 bytes is too large");
  EXPECT_EQ(request_name(99), "request 99");
}

std::vector<uint8_t> memory_table(uint32_t count, uint64_t size = 4096) {
  std::vector<uint8_t> bytes(8 + 32 * count);
  store32(bytes.data(), count);
  for (uint32_t i = 0; i < count; ++i) {
    uint8_t* p = bytes.data() + 8 + 32 * i;
    store64(p, 0x100000ull * (i + 1));
    store64(p + 8, size);
    store64(p + 16, 0x7f0000000000ull + 0x100000ull * i);
    store64(p + 24, 0);
  }
  return bytes;
}

TEST(VhostUserMemoryTableTest, DecodesRegions) {
  auto regions = parse_memory_table(memory_table(2), 2);
  ASSERT_TRUE(regions);
  ASSERT_EQ(regions->size(), 2u);
  EXPECT_EQ((*regions)[1].guest_address, 0x200000u);
  EXPECT_EQ((*regions)[1].user_address, 0x7f0000100000u);
}

TEST(VhostUserMemoryTableTest, RefusesInconsistentTables) {
  EXPECT_EQ(parse_memory_table(memory_table(2), 1).status().message(),
            "SET_MEM_TABLE with 2 regions but 1 file descriptors");
  EXPECT_EQ(parse_memory_table(memory_table(0), 0).status().message(),
            "SET_MEM_TABLE with 0 regions (1 to 8 supported)");
  EXPECT_EQ(parse_memory_table(memory_table(9), 9).status().message(),
            "SET_MEM_TABLE with 9 regions (1 to 8 supported)");
  auto truncated = memory_table(2);
  truncated.pop_back();
  EXPECT_EQ(parse_memory_table(truncated, 2).status().message(),
            "SET_MEM_TABLE payload has 71 bytes, expected 72");
  EXPECT_FALSE(parse_memory_table(memory_table(1, 0), 1));
  auto wrapping = memory_table(1);
  store64(wrapping.data() + 8, 0);
  store64(wrapping.data() + 8 + 8, ~uint64_t{0});
  EXPECT_FALSE(parse_memory_table(wrapping, 1));
  EXPECT_FALSE(parse_memory_table(std::vector<uint8_t>(4), 0));
}

TEST(VhostUserPayloadTest, FixedSizePayloads) {
  std::vector<uint8_t> state(8);
  store32(state.data(), 1);
  store32(state.data() + 4, 128);
  auto decoded = parse_vring_state(state);
  ASSERT_TRUE(decoded);
  EXPECT_EQ(decoded->index, 1u);
  EXPECT_EQ(decoded->value, 128u);
  state.push_back(0);
  EXPECT_FALSE(parse_vring_state(state));
  EXPECT_FALSE(parse_vring_address(std::vector<uint8_t>(39)));
  EXPECT_TRUE(parse_vring_address(std::vector<uint8_t>(40)));
  EXPECT_FALSE(parse_u64(std::vector<uint8_t>(4)));
}

TEST(VhostUserPayloadTest, ConfigRanges) {
  std::vector<uint8_t> payload(kConfigHeaderSize + 1);
  store32(payload.data(), 32);
  store32(payload.data() + 4, 1);
  payload[12] = 1;
  auto range = parse_config(payload);
  ASSERT_TRUE(range);
  EXPECT_EQ(range->offset, 32u);
  ASSERT_EQ(range->bytes.size(), 1u);
  EXPECT_EQ(range->bytes[0], 1);
  store32(payload.data() + 4, 2);  // says two bytes, carries one
  EXPECT_FALSE(parse_config(payload));
  store32(payload.data() + 4, 0);
  EXPECT_FALSE(parse_config(payload));
  store32(payload.data() + 4, 257);
  EXPECT_FALSE(parse_config(payload));
}

}  // namespace
}  // namespace blockd::exports::vhost_user
