// The FUSE export's decisions that need no kernel: write and fallocate plans, SEEK_DATA and
// SEEK_HOLE from block status, and the node resize they rely on (file and raw drivers).
#include "exports/fuse/policy.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <unistd.h>

#include <vector>

#include "drivers/file.h"
#include "drivers/raw.h"
#include "test_support.h"

namespace blockd::exports::fuse {
namespace {

using testing::run;
using Kind = FallocatePlan::Kind;

TEST(PlanWrite, InsideTheNodeIsWrittenAsAsked) {
  const WritePlan plan = plan_write(4096, 4096, 1 << 20, false);
  EXPECT_EQ(plan.error, 0);
  EXPECT_EQ(plan.length, 4096u);
  EXPECT_EQ(plan.grow_to, 0u);
}

TEST(PlanWrite, NotGrowableWritesWhatFitsAndRefusesPastTheEnd) {
  const WritePlan partial = plan_write((1 << 20) - 512, 4096, 1 << 20, false);
  EXPECT_EQ(partial.error, 0);
  EXPECT_EQ(partial.length, 512u);
  EXPECT_EQ(partial.grow_to, 0u);
  EXPECT_EQ(plan_write(1 << 20, 4096, 1 << 20, false).error, EIO);
  EXPECT_EQ(plan_write(2 << 20, 1, 1 << 20, false).error, EIO);
  // A zero-length write is harmless anywhere.
  EXPECT_EQ(plan_write(2 << 20, 0, 1 << 20, false).error, 0);
}

TEST(PlanWrite, GrowableGrowsToTheEndOfTheWrite) {
  const WritePlan plan = plan_write((1 << 20) + 100, 4096, 1 << 20, true);
  EXPECT_EQ(plan.error, 0);
  EXPECT_EQ(plan.length, 4096u);
  EXPECT_EQ(plan.grow_to, (1u << 20) + 100 + 4096);
}

TEST(PlanWrite, OverflowIsRefused) {
  EXPECT_EQ(plan_write(~uint64_t{0} - 10, 4096, 1 << 20, true).error, EFBIG);
}

TEST(PlanFallocate, PunchHoleNeedsKeepSizeAndClampsToTheNode) {
  EXPECT_EQ(plan_fallocate(FALLOC_FL_PUNCH_HOLE, 0, 4096, 8192, true).kind, Kind::kRefuse);
  const FallocatePlan plan =
      plan_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 65536, 8192, true);
  EXPECT_EQ(plan.kind, Kind::kZeroes);
  EXPECT_TRUE(plan.may_unmap);
  EXPECT_EQ(plan.offset, 4096u);
  EXPECT_EQ(plan.length, 4096u);
  EXPECT_EQ(plan.grow_to, 0u);
}

TEST(PlanFallocate, ZeroRangeGrowsUnlessKeepSize) {
  const FallocatePlan grow = plan_fallocate(FALLOC_FL_ZERO_RANGE, 4096, 65536, 8192, true);
  EXPECT_EQ(grow.kind, Kind::kZeroes);
  EXPECT_FALSE(grow.may_unmap);
  EXPECT_EQ(grow.grow_to, 4096u + 65536);
  EXPECT_EQ(grow.length, 4096u);  // only the old part needs zeroing
  const FallocatePlan keep =
      plan_fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 4096, 65536, 8192, true);
  EXPECT_EQ(keep.grow_to, 0u);
  EXPECT_EQ(keep.length, 4096u);
  const FallocatePlan refused = plan_fallocate(FALLOC_FL_ZERO_RANGE, 4096, 65536, 8192, false);
  EXPECT_EQ(refused.kind, Kind::kRefuse);
  EXPECT_EQ(refused.error, EOPNOTSUPP);
}

TEST(PlanFallocate, PlainAllocation) {
  const FallocatePlan inside = plan_fallocate(0, 0, 4096, 8192, true);
  EXPECT_EQ(inside.kind, Kind::kAllocate);
  EXPECT_EQ(inside.length, 4096u);
  const FallocatePlan beyond = plan_fallocate(0, 16384, 4096, 8192, true);
  EXPECT_EQ(beyond.kind, Kind::kAllocate);
  EXPECT_EQ(beyond.grow_to, 16384u + 4096);
  EXPECT_EQ(beyond.length, 0u);
  const FallocatePlan kept = plan_fallocate(FALLOC_FL_KEEP_SIZE, 4096, 65536, 8192, true);
  EXPECT_EQ(kept.grow_to, 0u);
  EXPECT_EQ(kept.length, 4096u);
}

TEST(PlanFallocate, OtherModesAndBadRangesAreRefused) {
  EXPECT_EQ(plan_fallocate(FALLOC_FL_COLLAPSE_RANGE, 0, 4096, 8192, true).error, EOPNOTSUPP);
  EXPECT_EQ(plan_fallocate(FALLOC_FL_INSERT_RANGE, 0, 4096, 8192, true).error, EOPNOTSUPP);
  EXPECT_EQ(plan_fallocate(0, 0, 0, 8192, true).error, EINVAL);
  EXPECT_EQ(plan_fallocate(0, ~uint64_t{0}, 2, 8192, true).error, EINVAL);
}

TEST(FuseErrno, PlainErrnoPassesAndTheRestIsEio) {
  EXPECT_EQ(fuse_errno(-ENOSPC), ENOSPC);
  EXPECT_EQ(fuse_errno(-100000), EIO);
  EXPECT_EQ(fuse_errno(0), EIO);
}

// A file node on a sparse image: data at [64 KiB, 128 KiB) and [256 KiB, 320 KiB) of 1 MiB.
class FuseSeekTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_.file("img");
    const int fd = open(path_.c_str(), O_CREAT | O_RDWR, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, 1 << 20), 0);
    std::vector<char> data(64 << 10, 'x');
    ASSERT_EQ(pwrite(fd, data.data(), data.size(), 64 << 10), 65536);
    ASSERT_EQ(pwrite(fd, data.data(), data.size(), 256 << 10), 65536);
    close(fd);
    auto file = drivers::open_file_node({.node_name = "file0"}, {.filename = path_}, *loop_);
    ASSERT_TRUE(file.has_value()) << file.status().message();
    file_ = *file;
  }
  // Whether the file system under the test directory reports holes at all.
  bool sparse() const {
    const int fd = open(path_.c_str(), O_RDONLY);
    const off_t data = lseek(fd, 0, SEEK_DATA);
    close(fd);
    return data == (64 << 10);
  }

  std::unique_ptr<Loop> loop_ = testing::make_loop();
  testing::TempDir dir_;
  std::string path_;
  std::shared_ptr<block::Node> file_;
};

TEST_F(FuseSeekTest, DataAndHolesComeFromBlockStatus) {
  if (!sparse()) GTEST_SKIP() << "the file system under /var/tmp does not report holes";
  block::BlockBackend backend("block export 'e'");
  ASSERT_TRUE(backend.attach(file_, block::kPermConsistentRead, block::kPermAll));
  EXPECT_EQ(run(*loop_, seek(backend, 0, SEEK_DATA)), 64 << 10);
  EXPECT_EQ(run(*loop_, seek(backend, 0, SEEK_HOLE)), 0);
  EXPECT_EQ(run(*loop_, seek(backend, 70 << 10, SEEK_DATA)), 70 << 10);
  EXPECT_EQ(run(*loop_, seek(backend, 70 << 10, SEEK_HOLE)), 128 << 10);
  EXPECT_EQ(run(*loop_, seek(backend, 128 << 10, SEEK_DATA)), 256 << 10);
  // Only a hole after the last data: SEEK_DATA has nothing, SEEK_HOLE stays put.
  EXPECT_EQ(run(*loop_, seek(backend, 320 << 10, SEEK_DATA)), -ENXIO);
  EXPECT_EQ(run(*loop_, seek(backend, 320 << 10, SEEK_HOLE)), 320 << 10);
  EXPECT_EQ(run(*loop_, seek(backend, 1 << 20, SEEK_HOLE)), -ENXIO);
  EXPECT_EQ(run(*loop_, seek(backend, 0, SEEK_END)), -EINVAL);
}

TEST_F(FuseSeekTest, AFullyWrittenNodeEndsInTheImplicitHole) {
  block::BlockBackend backend("block export 'e'");
  ASSERT_TRUE(backend.attach(file_, block::kPermConsistentRead | block::kPermWrite,
                             block::kPermAll));
  std::vector<char> data(1 << 20, 'y');
  ASSERT_EQ(run(*loop_, backend.write(0, data.size(), data.data(), 0)), 0);
  EXPECT_EQ(run(*loop_, seek(backend, 4096, SEEK_DATA)), 4096);
  EXPECT_EQ(run(*loop_, seek(backend, 4096, SEEK_HOLE)), 1 << 20);
}

TEST_F(FuseSeekTest, TruncateNeedsTheResizePermissionAndRoundsToSectors) {
  block::BlockBackend reader("block export 'r'");
  ASSERT_TRUE(reader.attach(file_, block::kPermConsistentRead | block::kPermWrite,
                            block::kPermAll));
  EXPECT_EQ(run(*loop_, reader.truncate(2 << 20)), -EPERM);
  reader.detach();

  block::BlockBackend backend("block export 'e'");
  ASSERT_TRUE(backend.attach(file_, block::kPermConsistentRead | block::kPermWrite |
                                        block::kPermResize,
                             block::kPermAll));
  EXPECT_EQ(run(*loop_, backend.truncate((2 << 20) + 100)), 0);
  EXPECT_EQ(backend.size(), (2 << 20) + 512);
  struct stat st;
  ASSERT_EQ(stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, (2 << 20) + 100);
  EXPECT_EQ(run(*loop_, backend.truncate(100 << 10)), 0);
  EXPECT_EQ(backend.size(), 100 << 10);
  // The data that was cut off does not come back as data.
  EXPECT_EQ(run(*loop_, seek(backend, 0, SEEK_HOLE)), sparse() ? 0 : 100 << 10);
}

TEST_F(FuseSeekTest, RawResizesThroughItsFileUnlessItShowsAWindow) {
  {
    auto whole = drivers::open_raw_node({.node_name = "raw0"}, {}, file_, *loop_);
    ASSERT_TRUE(whole.has_value()) << whole.status().message();
    block::BlockBackend backend("block export 'e'");
    ASSERT_TRUE(backend.attach(*whole, block::kPermConsistentRead | block::kPermWrite |
                                           block::kPermResize,
                               block::kPermAll));
    EXPECT_EQ(run(*loop_, backend.truncate(3 << 20)), 0);
    EXPECT_EQ(backend.size(), 3 << 20);
    EXPECT_EQ(file_->size(), 3 << 20);
  }

  auto window = drivers::open_raw_node({.node_name = "raw1"}, {.offset = 4096}, file_, *loop_);
  ASSERT_TRUE(window.has_value()) << window.status().message();
  block::BlockBackend windowed("block export 'w'");
  ASSERT_TRUE(windowed.attach(*window, block::kPermConsistentRead | block::kPermWrite |
                                           block::kPermResize,
                              block::kPermAll));
  EXPECT_EQ(run(*loop_, windowed.truncate(4 << 20)), -ENOTSUP);
}

}  // namespace
}  // namespace blockd::exports::fuse
