// raw format driver tests, over file and null-co nodes.
#include "drivers/raw.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <numeric>
#include <cstring>
#include <vector>

#include "block/backend.h"
#include "drivers/file.h"
#include "drivers/null.h"
#include "test_support.h"

namespace blockd::drivers {
namespace {

using testing::run;

class RawTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("img");
    int fd = open(path_.c_str(), O_CREAT | O_RDWR, 0644);
    ASSERT_GE(fd, 0);
    // 1 MiB with a recognisable pattern: byte i holds i % 251.
    image_.resize(1 << 20);
    for (size_t i = 0; i < image_.size(); ++i) image_[i] = static_cast<char>(i % 251);
    ASSERT_EQ(pwrite(fd, image_.data(), image_.size(), 0), static_cast<ssize_t>(image_.size()));
    close(fd);
  }

  std::shared_ptr<block::Node> file_node(const std::string& path = "") {
    FileOptions options;
    options.filename = path.empty() ? path_ : path;
    auto node = open_file_node(block::NodeOptions{.node_name = "file0"}, options, *loop_);
    EXPECT_TRUE(node.has_value()) << node.status().message();
    return *node;
  }

  Expected<std::shared_ptr<block::Node>> raw(const RawOptions& options,
                                             std::shared_ptr<block::Node> file = nullptr) {
    return open_raw_node(block::NodeOptions{.node_name = "raw0"}, options,
                         file ? file : file_node(), *loop_);
  }

  std::vector<char> pread_file(uint64_t offset, size_t length) {
    std::vector<char> out(length);
    int fd = open(path_.c_str(), O_RDONLY);
    EXPECT_EQ(pread(fd, out.data(), length, offset), static_cast<ssize_t>(length));
    close(fd);
    return out;
  }

  std::unique_ptr<Loop> loop_ = testing::make_loop();
  testing::TempDir dir_;
  std::string path_;
  std::vector<char> image_;
};

TEST_F(RawTest, PlainRawPassesThrough) {
  auto node = raw({});
  ASSERT_TRUE(node.has_value()) << node.status().message();
  EXPECT_EQ((*node)->driver_name(), "raw");
  EXPECT_EQ((*node)->size(), 1 << 20);
  EXPECT_EQ((*node)->filename(), path_);
  EXPECT_EQ(
      (*node)->open_options(),
      nlohmann::json({{"driver", "raw"}, {"file", {{"driver", "file"}, {"filename", path_}}}}));

  std::vector<char> buffer(8192);
  EXPECT_EQ(run(*loop_, (*node)->read(4096, buffer.size(), buffer.data(), 0)), 0);
  EXPECT_EQ(buffer, std::vector<char>(image_.begin() + 4096, image_.begin() + 4096 + 8192));
  std::vector<char> data(1000, 'w');
  EXPECT_EQ(run(*loop_, (*node)->write(12345, data.size(), data.data(), block::kRequestFua)), 0);
  EXPECT_EQ(pread_file(12345, data.size()), data);
  EXPECT_EQ(run(*loop_, (*node)->flush()), 0);
}

TEST_F(RawTest, OffsetAndSizeWindow) {
  auto node = raw({.offset = 4096, .size = 65536});
  ASSERT_TRUE(node.has_value()) << node.status().message();
  EXPECT_EQ((*node)->size(), 65536);
  EXPECT_EQ((*node)->filename(),
            "json:{\"offset\": 4096, \"driver\": \"raw\", \"size\": 65536, "
            "\"file\": {\"driver\": \"file\", \"filename\": \"" +
                path_ + "\"}}");
  std::vector<char> buffer(512);
  EXPECT_EQ(run(*loop_, (*node)->read(0, buffer.size(), buffer.data(), 0)), 0);
  EXPECT_EQ(buffer, std::vector<char>(image_.begin() + 4096, image_.begin() + 4096 + 512));
  std::vector<char> data(512, 'z');
  EXPECT_EQ(run(*loop_, (*node)->write(65536 - 512, 512, data.data(), 0)), 0);
  EXPECT_EQ(pread_file(4096 + 65536 - 512, 512), data);
  EXPECT_EQ(pread_file(4096 + 65536, 16),
            std::vector<char>(image_.begin() + 4096 + 65536, image_.begin() + 4096 + 65536 + 16));
  // The window is enforced by the node itself.
  EXPECT_EQ(run(*loop_, (*node)->write(65536 - 256, 512, data.data(), 0)), -EINVAL);
  EXPECT_EQ(run(*loop_, (*node)->read(65536, 1, buffer.data(), 0)), -EINVAL);
}

TEST_F(RawTest, ExplicitZeroOffsetUsesJsonName) {
  auto node = raw({.offset = 0});
  ASSERT_TRUE(node.has_value());
  EXPECT_EQ((*node)->filename(),
            "json:{\"offset\": 0, \"driver\": \"raw\", \"file\": {\"driver\": "
            "\"file\", \"filename\": \"" +
                path_ + "\"}}");
}

TEST_F(RawTest, UnalignedOffsetRoundsSizeUpAndReadsZeroesPastTheEnd) {
  // As QEMU: offset 100 leaves 1048476 bytes, shown as 1048576 (whole sectors).
  auto node = raw({.offset = 100});
  ASSERT_TRUE(node.has_value());
  EXPECT_EQ((*node)->size(), 1 << 20);
  std::vector<char> buffer(512, 'x');
  EXPECT_EQ(run(*loop_, (*node)->read((1 << 20) - 512, 512, buffer.data(), 0)), 0);
  std::vector<char> expected(image_.end() - 412, image_.end());
  expected.resize(512, 0);
  EXPECT_EQ(buffer, expected);
}

TEST_F(RawTest, OpenErrorsAsQemu) {
  auto node = raw({.offset = 2000000});
  ASSERT_FALSE(node.has_value());
  EXPECT_EQ(node.status().message(),
            "Offset (2000000) cannot be greater than size of the containing file (1048576)");
  node = raw({.offset = 512, .size = 1048576});
  ASSERT_FALSE(node.has_value());
  EXPECT_EQ(node.status().message(),
            "The sum of offset (512) and size (1048576) has to be smaller or equal to the  actual "
            "size of the containing file (1048576)");
  node = raw({.offset = 1000, .size = 100});
  ASSERT_FALSE(node.has_value());
  EXPECT_EQ(node.status().message(), "Specified size is not multiple of 512");
  // Offset at the very end and an empty window are allowed.
  EXPECT_TRUE(raw({.offset = 1 << 20}).has_value());
  auto empty = raw({.offset = 512, .size = 0});
  ASSERT_TRUE(empty.has_value());
  EXPECT_EQ((*empty)->size(), 0);
}

TEST_F(RawTest, FailedOpenReleasesTheChild) {
  auto file = file_node();
  ASSERT_FALSE(raw({.offset = 2000000}, file).has_value());
  EXPECT_TRUE(file->users().empty());
}

TEST_F(RawTest, DiscardAndZeroesHonourTheDiscardOption) {
  auto blocks = [&] {
    struct stat st;
    EXPECT_EQ(stat(path_.c_str(), &st), 0);
    return st.st_blocks;
  };
  // discard=ignore on the raw node: nothing reaches the file.
  auto file = file_node();
  auto ignoring = raw({}, file);
  ASSERT_TRUE(ignoring.has_value());
  const auto before = blocks();
  EXPECT_EQ(run(*loop_, (*ignoring)->discard(0, 262144)), 0);
  EXPECT_EQ(blocks(), before);

  // discard=unmap on both raw and file: the hole is punched, at the raw offset.
  FileOptions file_options;
  file_options.filename = path_;
  auto unmapping_file = open_file_node(block::NodeOptions{.node_name = "f1", .discard = "unmap"},
                                       file_options, *loop_);
  ASSERT_TRUE(unmapping_file.has_value());
  auto unmapping = open_raw_node(block::NodeOptions{.node_name = "r1", .discard = "unmap"},
                                 {.offset = 65536}, *unmapping_file, *loop_);
  ASSERT_TRUE(unmapping.has_value());
  EXPECT_EQ(run(*loop_, (*unmapping)->discard(0, 262144)), 0);
  EXPECT_LT(blocks(), before);
  EXPECT_EQ(pread_file(65536, 262144), std::vector<char>(262144, 0));
  EXPECT_EQ(pread_file(0, 65536), std::vector<char>(image_.begin(), image_.begin() + 65536));

  auto status = run(*loop_, (*unmapping)->block_status(0, 1 << 20));
  EXPECT_EQ(status.bytes, 262144);
  EXPECT_EQ(status.flags, block::kStatusZero | block::kStatusAllocated);
  status = run(*loop_, (*unmapping)->block_status(262144, 1 << 20));
  EXPECT_EQ(status.flags, block::kStatusData | block::kStatusAllocated);

  EXPECT_EQ(run(*loop_, (*unmapping)->write_zeroes(300000, 1000, block::kRequestMayUnmap)), 0);
  EXPECT_EQ(pread_file(65536 + 300000, 1000), std::vector<char>(1000, 0));
}

TEST_F(RawTest, OverNullNode) {
  auto null = open_null_node(block::NodeOptions{.node_name = "n3", .read_only = true},
                             {.size = 1000}, *loop_);
  ASSERT_TRUE(null.has_value());
  auto node = raw({}, *null);
  ASSERT_TRUE(node.has_value());
  EXPECT_EQ((*node)->size(), 1024);
  // A child known only by a json: name makes the raw node's name json: too (as QEMU).
  EXPECT_EQ((*node)->filename(),
            "json:{\"driver\": \"raw\", \"file\": {\"driver\": \"null-co\", \"size\": 1000}}");
  auto status = run(*loop_, (*node)->block_status(0, 1024));
  EXPECT_EQ(status.bytes, 1024);
  EXPECT_EQ(status.flags, 0u);
}

// Node::host_file: the file node's descriptor, through a raw node only when it shows the whole
// file from its start; never through other drivers.
TEST_F(RawTest, HostFileOnlyWithoutOffsetOrSize) {
  auto file = file_node();
  const int fd = file->host_file();
  ASSERT_GE(fd, 0);
  struct stat by_fd {}, by_path {};
  ASSERT_EQ(fstat(fd, &by_fd), 0);
  ASSERT_EQ(stat(path_.c_str(), &by_path), 0);
  EXPECT_EQ(by_fd.st_ino, by_path.st_ino);
  auto plain = raw({}, file);
  ASSERT_TRUE(plain.has_value());
  EXPECT_EQ((*plain)->host_file(), fd);
  auto zero = raw({.offset = 0}, file_node());
  ASSERT_TRUE(zero.has_value());
  EXPECT_GE((*zero)->host_file(), 0);
  EXPECT_EQ((*raw({.offset = 512}))->host_file(), -1);
  EXPECT_EQ((*raw({.size = 1 << 20}))->host_file(), -1);
  auto null = open_null_node(block::NodeOptions{.node_name = "n4"}, {.size = 1024}, *loop_);
  ASSERT_TRUE(null.has_value());
  EXPECT_EQ((*null)->host_file(), -1);
  EXPECT_EQ((*raw({}, *null))->host_file(), -1);
}

TEST_F(RawTest, BackendWriteOnRawTakesWriteOnFile) {
  auto file = file_node();
  auto node = raw({}, file);
  ASSERT_TRUE(node.has_value());
  block::BlockBackend backend("block export 'exp0'");
  ASSERT_TRUE(
      backend.attach(*node, block::kPermConsistentRead | block::kPermWrite, block::kPermAll));
  ASSERT_EQ(file->users().size(), 1u);
  EXPECT_TRUE(file->users()[0]->permissions() & block::kPermWrite);
  std::vector<char> data(4096, 'q');
  EXPECT_EQ(run(*loop_, backend.write(0, data.size(), data.data(), 0)), 0);
  EXPECT_EQ(pread_file(0, 4096), data);
  backend.detach();
  EXPECT_EQ(file->users()[0]->permissions(), 0u);
}

// Reads that the NBD export may hand to the kernel (sendfile): only plain bytes of a file in
// memory, seen through raw windows; everything else stays on the buffered path.
TEST_F(RawTest, MapsReadsOntoFilesInMemoryOnly) {
  struct statfs fs {};
  if (statfs("/dev/shm", &fs) != 0 || static_cast<unsigned long>(fs.f_type) != TMPFS_MAGIC) {
    GTEST_SKIP() << "/dev/shm is not a tmpfs here";
  }
  testing::TempDir shm("/dev/shm");
  const std::string in_memory = shm.file("img");
  {
    int fd = open(in_memory.c_str(), O_CREAT | O_RDWR, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, image_.data(), image_.size(), 0), static_cast<ssize_t>(image_.size()));
    close(fd);
  }
  auto file = file_node(in_memory);
  const block::FileRange whole = file->map_file(12345, 65536, block::MapAccess::kRead);
  ASSERT_GE(whole.fd, 0);
  EXPECT_EQ(whole.offset, 12345u);
  // The node keeps the file mapped: the range's bytes are there too, and follow writes.
  ASSERT_NE(whole.memory, nullptr);
  EXPECT_EQ(std::memcmp(whole.memory, image_.data() + 12345, 65536), 0);
  const std::vector<char> fresh(4096, 0x5a);
  EXPECT_EQ(run(*loop_, file->write(16384, fresh.size(), fresh.data(), 0)), 0);
  EXPECT_EQ(std::memcmp(file->map_file(16384, 4096, block::MapAccess::kRead).memory, fresh.data(), fresh.size()), 0);
  EXPECT_EQ(file->map_file(image_.size() - 4096, 4096, block::MapAccess::kRead).memory + 4096,
            whole.memory - 12345 + image_.size());
  // Past the file's end there is no mapping (the node's size may be rounded up beyond it).
  EXPECT_EQ(file->map_file(image_.size() - 4096, 4097, block::MapAccess::kRead).memory, nullptr);

  // A raw window shifts the range and refuses what leaves it.
  auto window = raw({.offset = 4096, .size = 65536}, file);
  ASSERT_TRUE(window.has_value());
  EXPECT_EQ((*window)->map_file(512, 4096, block::MapAccess::kRead).fd, whole.fd);
  EXPECT_EQ((*window)->map_file(512, 4096, block::MapAccess::kRead).offset, 4096u + 512);
  EXPECT_EQ((*window)->map_file(65536 - 512, 1024, block::MapAccess::kRead).fd, -1);
  EXPECT_EQ((*window)->map_file(512, 4096, block::MapAccess::kRead).memory,
            whole.memory - 12345 + 4096 + 512);
  // An unaligned offset rounds the node up past the file's end: that tail is not in the file.
  auto unaligned = raw({.offset = 100}, file);
  ASSERT_TRUE(unaligned.has_value());
  EXPECT_EQ((*unaligned)->map_file(0, (1 << 20) - 100, block::MapAccess::kRead).offset, 100u);
  EXPECT_EQ((*unaligned)->map_file(0, 1 << 20, block::MapAccess::kRead).fd, -1);

  // Files on disks (a transfer could wait for the device), worker threads, forced alignment.
  EXPECT_EQ(file_node()->map_file(0, 4096, block::MapAccess::kRead).fd, -1);
  FileOptions threads{.filename = in_memory, .aio = FileOptions::Aio::kThreads, .locking = FileOptions::Locking::kOff};
  auto threaded = open_file_node(block::NodeOptions{.node_name = "t"}, threads, *loop_);
  ASSERT_TRUE(threaded.has_value());
  EXPECT_EQ((*threaded)->map_file(0, 4096, block::MapAccess::kRead).fd, -1);
  FileOptions aligned{.filename = in_memory, .locking = FileOptions::Locking::kOff, .TEST_request_alignment = 4096};
  auto forced = open_file_node(block::NodeOptions{.node_name = "a"}, aligned, *loop_);
  ASSERT_TRUE(forced.has_value());
  EXPECT_EQ((*forced)->map_file(0, 4096, block::MapAccess::kRead).fd, -1);

  // Through a backend: bounds are checked, and a mapped read counts as in flight until released.
  block::BlockBackend backend("block export 'exp0'");
  ASSERT_TRUE(backend.attach(*window, block::kPermConsistentRead, block::kPermAll));
  EXPECT_FALSE(backend.map_read(65536 - 512, 1024));
  auto mapped = backend.map_read(0, 65536);
  ASSERT_TRUE(mapped);
  EXPECT_EQ(mapped.fd(), whole.fd);
  EXPECT_EQ(mapped.file_offset(), 4096u);
  EXPECT_EQ(backend.in_flight(), 1u);
  auto moved = std::move(mapped);
  EXPECT_EQ(backend.in_flight(), 1u);
  bool drained = false;
  auto drain = [](block::BlockBackend& b, bool& done) -> Task<void> {
    co_await b.drain();
    done = true;
  };
  loop_->spawn(drain(backend, drained));
  EXPECT_FALSE(drained);
  moved = {};
  loop_->run_until([&] { return drained; });
  EXPECT_EQ(backend.in_flight(), 0u);
  // Writes need the write permission, and no FUA or writethrough (the file alone cannot do them).
  EXPECT_FALSE(backend.map_write(0, 4096, 0));
  ASSERT_TRUE((*window)->update_permissions(backend, block::kPermConsistentRead | block::kPermWrite,
                                            block::kPermAll));
  EXPECT_EQ(backend.map_write(512, 4096, 0).file_offset(), 4096u + 512);
  EXPECT_FALSE(backend.map_write(512, 4096, block::kRequestFua));
  backend.set_writethrough(true);
  EXPECT_FALSE(backend.map_write(512, 4096, 0));
  EXPECT_EQ(backend.in_flight(), 0u);
  backend.detach();
}

}  // namespace
}  // namespace blockd::drivers
