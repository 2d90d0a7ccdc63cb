// Image file creation (blockdev-create for file): sizes, preallocation, the emptying of an
// existing file and QEMU's image locks against other users.
#include "drivers/file_create.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "block/backend.h"
#include "drivers/file.h"
#include "test_support.h"

namespace blockd::drivers {
namespace {

using testing::run;

struct stat stat_of(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(stat(path.c_str(), &st), 0);
  return st;
}

class FileCreateTest : public ::testing::Test {
 protected:
  Status create(FileCreateOptions options, CancelCheck cancelled = {}) {
    if (options.filename.empty()) options.filename = path_;
    return run(*loop_, create_file(options, *loop_, std::move(cancelled)));
  }

  std::unique_ptr<Loop> loop_ = testing::make_loop();
  testing::TempDir dir_;
  std::string path_ = dir_.file("new.img");
};

TEST_F(FileCreateTest, CreatesASparseFileOfTheSize) {
  ASSERT_TRUE(create({.size = 8 << 20}).is_ok());
  const auto st = stat_of(path_);
  EXPECT_EQ(st.st_size, 8 << 20);
  EXPECT_EQ(st.st_mode & 0777, 0644u & ~static_cast<unsigned>(umask(umask(0))));
  EXPECT_LT(st.st_blocks * 512, 1 << 20);
  EXPECT_GT(st.st_blocks, 0);  // the first block is written, as QEMU does
}

TEST_F(FileCreateTest, EmptiesAnExistingFile) {
  int fd = open(path_.c_str(), O_CREAT | O_WRONLY, 0644);
  std::vector<char> junk(1 << 20, 'j');
  ASSERT_EQ(write(fd, junk.data(), junk.size()), static_cast<ssize_t>(junk.size()));
  close(fd);
  ASSERT_TRUE(create({.size = 4096}).is_ok());
  fd = open(path_.c_str(), O_RDONLY);
  std::vector<char> data(4096, 'x');
  EXPECT_EQ(pread(fd, data.data(), data.size(), 0), 4096);
  close(fd);
  EXPECT_EQ(data, std::vector<char>(4096, 0));
  EXPECT_EQ(stat_of(path_).st_size, 4096);
}

TEST_F(FileCreateTest, PreallocationAllocatesTheWholeFile) {
  for (Preallocation mode : {Preallocation::kFalloc, Preallocation::kFull}) {
    ASSERT_TRUE(create({.size = 3 << 20, .preallocation = mode}).is_ok());
    const auto st = stat_of(path_);
    EXPECT_EQ(st.st_size, 3 << 20);
    EXPECT_GE(st.st_blocks * 512, 3 << 20);
  }
}

TEST_F(FileCreateTest, Errors) {
  EXPECT_EQ(create({.size = 4096, .preallocation = Preallocation::kMetadata}).message(),
            "Unsupported preallocation mode: metadata");
  EXPECT_EQ(stat_of(path_).st_size, 0);  // created and emptied before the refusal, as in QEMU
  EXPECT_EQ(create({.size = 4096, .extent_size_hint = uint64_t{1} << 32}).message(),
            "Extent size hint is too large");
  EXPECT_EQ(create({.filename = dir_.file("no/such"), .size = 1}).message(),
            "Could not create '" + dir_.file("no/such") + "': No such file or directory");
  EXPECT_EQ(create({.filename = dir_.path(), .size = 1}).message(),
            "Could not create '" + dir_.path() + "': Is a directory");
  EXPECT_EQ(create({.size = uint64_t{1} << 63}).message(), "Could not resize file: Invalid argument");
}

TEST_F(FileCreateTest, CancelStopsFullPreallocation) {
  int polls = 0;
  const Status status = create({.size = 64 << 20, .preallocation = Preallocation::kFull},
                               [&polls] { return ++polls > 2; });
  EXPECT_EQ(status.message(), "Operation canceled");
  EXPECT_LT(stat_of(path_).st_blocks * 512, 64 << 20);
}

TEST_F(FileCreateTest, RefusesAnImageAnotherUserKeepsFromResizing) {
  ASSERT_TRUE(create({.size = 4096}).is_ok());
  block::NodeOptions common;
  common.node_name = "user";
  auto node = open_file_node(common, {.filename = path_}, *loop_);
  ASSERT_TRUE(node.has_value());
  block::BlockBackend user("an unnamed block device");
  ASSERT_TRUE(user.attach(*node, block::kPermConsistentRead,
                          block::kPermAll & ~block::kPermResize).is_ok());
  EXPECT_EQ(create({.size = 4096}).message(), "Failed to get \"resize\" lock");
  user.detach();
  EXPECT_TRUE(create({.size = 8192}).is_ok());
  EXPECT_EQ(stat_of(path_).st_size, 8192);
}

}  // namespace
}  // namespace blockd::drivers
