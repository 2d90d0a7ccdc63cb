// Unit tests of the virtio-blk request handling (cpp/exports/vhost_user/blk.h): requests built in
// a ring in ordinary memory, run on a file node, checked through the file itself.
#include "exports/vhost_user/blk.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "drivers/file.h"
#include "test_support.h"
#include "vhost_user_ring.h"

namespace blockd::exports::vhost_user {
namespace {

using testing::TestRing;
constexpr uint64_t kB = TestRing::kBuffers;
constexpr uint64_t kSize = 1 << 20;

class BlkTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("disk.img");
    const int fd = ::open(path_.c_str(), O_RDWR | O_CREAT, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, kSize), 0);
    ::close(fd);
    drivers::FileOptions file;
    file.filename = path_;
    auto node = drivers::open_file_node(block::NodeOptions{.node_name = "f0"}, file, *loop_);
    ASSERT_TRUE(node.has_value()) << node.status().message();
    ASSERT_TRUE(backend_.attach(*node, block::kPermConsistentRead | block::kPermWrite,
                                block::kPermAll));
    options_.size = kSize;
    options_.writable = true;
  }
  void TearDown() override { backend_.detach(); }

  // Builds a request of `type` at `sector`: header, then `out` bytes of data (device-readable,
  // in two buffers) or `in` bytes to receive (device-writable, in two buffers), then the status.
  // Returns the used length and leaves the status in status().
  uint32_t request(uint32_t type, uint64_t sector, uint32_t out, uint32_t in,
                   std::vector<uint8_t> payload = {}) {
    uint8_t* header = ring_.at(kB);
    store32(header, type);
    store32(header + 4, 0);
    store64(header + 8, sector);
    uint16_t index = 0;
    auto add = [&](uint64_t address, uint32_t length, uint16_t flags) {
      ring_.describe(index, address, length, flags | kDescNext, static_cast<uint16_t>(index + 1));
      ++index;
    };
    add(kB, 16, 0);
    if (!payload.empty()) {
      std::memcpy(ring_.at(kB + 0x1000), payload.data(), payload.size());
      add(kB + 0x1000, static_cast<uint32_t>(payload.size()), 0);
    }
    // Data buffers are not adjacent, so a bounce buffer is exercised.
    if (out > 0) {
      add(kB + 0x10000, out / 2, 0);
      add(kB + 0x30000, out - out / 2, 0);
    }
    if (in > 0) {
      add(kB + 0x50000, in / 2, kDescWrite);
      add(kB + 0x70000, in - in / 2, kDescWrite);
    }
    ring_.describe(index, kB + 0x90000, 1, kDescWrite);
    ring_.offer(0);
    Chain chain;
    std::string error;
    EXPECT_EQ(ring_.queue.pop(ring_.memory, chain, error), 1) << error;
    return blockd::testing::run(*loop_, run_blk_request(backend_, options_, chain));
  }
  uint8_t status() { return *ring_.at(kB + 0x90000); }
  void fill_out(uint32_t length, uint8_t seed) {
    for (uint32_t i = 0; i < length / 2; ++i) ring_.at(kB + 0x10000)[i] = seed + i;
    for (uint32_t i = length / 2; i < length; ++i) ring_.at(kB + 0x30000)[i - length / 2] = seed + i;
  }
  std::vector<uint8_t> file_bytes(uint64_t offset, size_t length) {
    std::vector<uint8_t> bytes(length);
    const int fd = ::open(path_.c_str(), O_RDONLY);
    EXPECT_EQ(::pread(fd, bytes.data(), length, offset), static_cast<ssize_t>(length));
    ::close(fd);
    return bytes;
  }

  std::unique_ptr<Loop> loop_ = blockd::testing::make_loop();
  blockd::testing::TempDir dir_{"/dev/shm"};
  std::string path_;
  block::BlockBackend backend_{"block export 'vhost0'"};
  BlkDeviceOptions options_;
  TestRing ring_{16};
};

TEST_F(BlkTest, WritesThenReadsBackThroughScatteredBuffers) {
  fill_out(8192, 7);
  EXPECT_EQ(request(kBlkTypeOut, 8, 8192, 0), 1u);
  EXPECT_EQ(status(), kBlkStatusOk);
  const auto written = file_bytes(4096, 8192);
  for (uint32_t i = 0; i < 8192; ++i) ASSERT_EQ(written[i], static_cast<uint8_t>(7 + i)) << i;
  EXPECT_EQ(request(kBlkTypeIn, 8, 0, 8192), 8193u);
  EXPECT_EQ(status(), kBlkStatusOk);
  EXPECT_EQ(ring_.at(kB + 0x50000)[5], static_cast<uint8_t>(7 + 5));
  EXPECT_EQ(ring_.at(kB + 0x70000)[0], static_cast<uint8_t>(7 + 4096));
}

TEST_F(BlkTest, RangesFollowQemusRules) {
  EXPECT_EQ(request(kBlkTypeIn, kSize / 512 - 1, 0, 1024), 1025u);  // past the end
  EXPECT_EQ(status(), kBlkStatusIoError);
  EXPECT_EQ(request(kBlkTypeIn, 0, 0, 100), 101u);  // not whole sectors
  EXPECT_EQ(status(), kBlkStatusIoError);
  options_.logical_block_size = 4096;
  EXPECT_EQ(request(kBlkTypeIn, 1, 0, 4096), 4097u);  // not on a logical block
  EXPECT_EQ(status(), kBlkStatusIoError);
  EXPECT_EQ(request(kBlkTypeIn, 8, 0, 4096), 4097u);
  EXPECT_EQ(status(), kBlkStatusOk);
  EXPECT_EQ(request(kBlkTypeIn, ~uint64_t{0}, 0, 512), 513u);  // no overflow
  EXPECT_EQ(status(), kBlkStatusIoError);
}

TEST_F(BlkTest, ReadOnlyExportsRefuseWrites) {
  options_.writable = false;
  EXPECT_EQ(request(kBlkTypeOut, 0, 512, 0), 1u);
  EXPECT_EQ(status(), kBlkStatusIoError);
  std::vector<uint8_t> segment(16);
  store32(segment.data() + 8, 8);
  EXPECT_EQ(request(kBlkTypeWriteZeroes, 0, 0, 0, segment), 1u);
  EXPECT_EQ(status(), kBlkStatusIoError);
  EXPECT_NE(blk_features(options_) & kBlkRo, 0u);
}

TEST_F(BlkTest, FlushGetIdAndUnknownTypes) {
  EXPECT_EQ(request(kBlkTypeFlush, 0, 0, 0), 1u);
  EXPECT_EQ(status(), kBlkStatusOk);
  EXPECT_EQ(request(kBlkTypeGetId, 0, 0, 20), 21u);
  EXPECT_EQ(status(), kBlkStatusOk);
  std::string id(reinterpret_cast<char*>(ring_.at(kB + 0x50000)), 10);
  id.append(reinterpret_cast<char*>(ring_.at(kB + 0x70000)), 5);
  EXPECT_EQ(id, std::string("vhost_user_blk\0", 15));
  EXPECT_EQ(request(99, 0, 0, 0), 1u);
  EXPECT_EQ(status(), kBlkStatusUnsupported);
}

TEST_F(BlkTest, WriteZeroesAndDiscard) {
  fill_out(4096, 1);
  ASSERT_EQ(request(kBlkTypeOut, 0, 4096, 0), 1u);
  std::vector<uint8_t> segment(16);
  store64(segment.data(), 2);  // sectors 2..5
  store32(segment.data() + 8, 4);
  store32(segment.data() + 12, kBlkWriteZeroesUnmap);
  EXPECT_EQ(request(kBlkTypeWriteZeroes, 0, 0, 0, segment), 1u);
  EXPECT_EQ(status(), kBlkStatusOk);
  const auto bytes = file_bytes(0, 4096);
  EXPECT_EQ(bytes[1023], static_cast<uint8_t>(1 + 1023));
  for (int i = 1024; i < 3072; ++i) ASSERT_EQ(bytes[i], 0) << i;
  EXPECT_EQ(bytes[3072], static_cast<uint8_t>(1 + 3072));
  // Discard with the unmap flag, unknown flags and ranges beyond the end.
  EXPECT_EQ(request(kBlkTypeDiscard, 0, 0, 0, segment), 1u);
  EXPECT_EQ(status(), kBlkStatusUnsupported);
  store32(segment.data() + 12, 2);
  EXPECT_EQ(request(kBlkTypeWriteZeroes, 0, 0, 0, segment), 1u);
  EXPECT_EQ(status(), kBlkStatusUnsupported);
  store32(segment.data() + 12, 0);
  EXPECT_EQ(request(kBlkTypeDiscard, 0, 0, 0, segment), 1u);
  EXPECT_EQ(status(), kBlkStatusOk);
  store64(segment.data(), kSize / 512);
  EXPECT_EQ(request(kBlkTypeDiscard, 0, 0, 0, segment), 1u);
  EXPECT_EQ(status(), kBlkStatusIoError);
  store32(segment.data() + 8, kBlkMaxDiscardSectors + 1);
  store64(segment.data(), 0);
  EXPECT_EQ(request(kBlkTypeDiscard, 0, 0, 0, segment), 1u);
  EXPECT_EQ(status(), kBlkStatusIoError);
}

TEST_F(BlkTest, ChainsWithoutStatusOrHeader) {
  // No device-writable byte: nothing to answer in; used length 0.
  ring_.describe(0, kB, 16, 0);
  ring_.offer(0);
  Chain chain;
  std::string error;
  ASSERT_EQ(ring_.queue.pop(ring_.memory, chain, error), 1);
  EXPECT_EQ(blockd::testing::run(*loop_, run_blk_request(backend_, options_, chain)), 0u);
  // A header shorter than 16 bytes: IOERR.
  ring_.describe(0, kB, 8, kDescNext, 1);
  ring_.describe(1, kB + 0x90000, 1, kDescWrite);
  ring_.offer(0);
  ASSERT_EQ(ring_.queue.pop(ring_.memory, chain, error), 1);
  EXPECT_EQ(blockd::testing::run(*loop_, run_blk_request(backend_, options_, chain)), 1u);
  EXPECT_EQ(status(), kBlkStatusIoError);
}

TEST(BlkConfigTest, LayoutMatchesTheVirtioSpec) {
  BlkDeviceOptions options;
  options.size = 64 << 20;
  options.logical_block_size = 4096;
  options.num_queues = 4;
  options.writable = true;
  const auto config = blk_config(options);
  EXPECT_EQ(load64(config.data()), (64u << 20) / 512);
  EXPECT_EQ(load32(config.data() + 12), kBlkSegMaxValue);
  EXPECT_EQ(load32(config.data() + 20), 4096u);
  EXPECT_EQ(config[32], 0);
  EXPECT_EQ(load16(config.data() + 34), 4);
  EXPECT_EQ(load32(config.data() + 36), kBlkMaxDiscardSectors);
  EXPECT_EQ(load32(config.data() + 44), 8u);
  EXPECT_EQ(load32(config.data() + 52), 1u);
  EXPECT_EQ(blk_features(options) & kBlkRo, 0u);
  EXPECT_NE(blk_features(options) & kBlkFlush, 0u);
}

}  // namespace
}  // namespace blockd::exports::vhost_user
