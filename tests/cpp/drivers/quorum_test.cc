// quorum driver tests over file children (and blkdebug filters for injected errors).
#include "drivers/quorum.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "drivers/blkdebug.h"
#include "drivers/file.h"
#include "drivers/thread_pool.h"
#include "runtime/fault_guard.h"
#include "test_support.h"

namespace blockd::drivers {
namespace {

using block::Node;
using testing::run;

constexpr size_t kImageSize = 1 << 20;

// The children's files live in `parent`: on disk (/var/tmp) their reads wait for io_uring and the
// quorum reads every child at once; in memory (/dev/shm) they complete at once and the quorum takes
// its compare path (one child after another, piece by piece). Both must behave alike.
class QuorumFixture : public ::testing::Test {
 protected:
  explicit QuorumFixture(const std::string& parent = "/var/tmp") : dir_(parent) {}

  void SetUp() override {
    for (int i = 0; i < 3; ++i) {
      paths_.push_back(dir_.file("c" + std::to_string(i)));
      std::vector<char> data(kImageSize);
      for (size_t j = 0; j < data.size(); ++j) data[j] = static_cast<char>(j % 251);
      write_file(i, 0, data);
    }
  }

  void write_file(int child, uint64_t offset, const std::vector<char>& data) {
    int fd = open(paths_[child].c_str(), O_CREAT | O_RDWR, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, data.data(), data.size(), offset), static_cast<ssize_t>(data.size()));
    close(fd);
  }

  std::vector<char> read_file(int child, uint64_t offset, size_t length) {
    std::vector<char> out(length);
    int fd = open(paths_[child].c_str(), O_RDONLY);
    EXPECT_EQ(pread(fd, out.data(), length, offset), static_cast<ssize_t>(length));
    close(fd);
    return out;
  }

  // A thread that shrinks child `child`'s file to half its size and writes the lost half back,
  // over and over until `stop`.
  std::thread shrink_repeatedly(int child, std::atomic<bool>& stop) {
    std::vector<char> tail = read_file(child, kImageSize / 2, kImageSize / 2);
    return std::thread([path = paths_[child], tail = std::move(tail), &stop] {
      const int fd = open(path.c_str(), O_RDWR);
      while (!stop.load()) {
        (void)!ftruncate(fd, kImageSize / 2);
        (void)!pwrite(fd, tail.data(), tail.size(), kImageSize / 2);
      }
      close(fd);
    });
  }

  std::shared_ptr<Node> file_node(int child) {
    FileOptions options;
    options.filename = paths_[child];
    options.locking = FileOptions::Locking::kOff;
    auto node = open_file_node(block::NodeOptions{.node_name = "c" + std::to_string(child)},
                               options, *loop_);
    EXPECT_TRUE(node.has_value()) << node.status().message();
    return *node;
  }

  // A blkdebug node named "d<child>" over child `child`'s file.
  std::shared_ptr<Node> blkdebug_node(int child, std::vector<BlkdebugInjectError> rules,
                                      std::vector<BlkdebugSetState> states = {}) {
    BlkdebugOptions options;
    options.inject_error = std::move(rules);
    options.set_state = std::move(states);
    auto node = open_blkdebug_node(block::NodeOptions{.node_name = "d" + std::to_string(child)},
                                   std::move(options), file_node(child), *loop_);
    EXPECT_TRUE(node.has_value()) << node.status().message();
    return *node;
  }

  Expected<std::shared_ptr<Node>> quorum(QuorumOptions options,
                                         std::vector<std::shared_ptr<Node>> children = {}) {
    if (children.empty()) {
      for (int i = 0; i < 3; ++i) children.push_back(file_node(i));
    }
    options.events = [this](const QuorumEvent& event) { events_.push_back(event); };
    return open_quorum_node(block::NodeOptions{.node_name = "q"}, std::move(options),
                            std::move(children), *loop_);
  }

  static QuorumOptions threshold(int64_t votes) {
    QuorumOptions options;
    options.vote_threshold = votes;
    return options;
  }

  int64_t read(Node& node, uint64_t offset, std::vector<char>& out) {
    return run(*loop_, node.read(offset, out.size(), out.data(), 0));
  }

  static std::vector<char> pattern(size_t length, char byte) {
    return std::vector<char>(length, byte);
  }

  std::unique_ptr<Loop> loop_ = testing::make_loop();
  testing::TempDir dir_;
  std::vector<std::string> paths_;
  std::vector<QuorumEvent> events_;
};

class QuorumTest : public QuorumFixture, public ::testing::WithParamInterface<std::string> {
 protected:
  QuorumTest() : QuorumFixture(GetParam()) {}
  void SetUp() override {
    struct statfs fs {};
    if (GetParam() == "/dev/shm" && (statfs("/dev/shm", &fs) != 0 || fs.f_type != TMPFS_MAGIC)) {
      GTEST_SKIP() << "/dev/shm is not a tmpfs here";
    }
    QuorumFixture::SetUp();
  }
};

INSTANTIATE_TEST_SUITE_P(Files, QuorumTest, ::testing::Values("/var/tmp", "/dev/shm"),
                         [](const auto& info) {
                           return info.param == "/dev/shm" ? "InMemory" : "OnDisk";
                         });

TEST_P(QuorumTest, ValidationFollowsQemu) {
  auto message = [this](QuorumOptions options, size_t children) {
    return validate_quorum_options(options, children).message();
  };
  EXPECT_EQ(message(threshold(1), 0), "Number of provided children must be 1 or more");
  EXPECT_EQ(message(threshold(0), 3), "Parameter 'vote-threshold' expects a value >= 1");
  EXPECT_EQ(message(threshold(4), 3), "threshold may not exceed children count");
  QuorumOptions blkverify = threshold(2);
  blkverify.blkverify = true;
  EXPECT_EQ(message(blkverify, 3),
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2");
  EXPECT_TRUE(validate_quorum_options(blkverify, 2).is_ok());
  blkverify.rewrite_corrupted = true;
  EXPECT_EQ(message(blkverify, 2), "rewrite-corrupted=on cannot be used with blkverify=on");
  QuorumOptions fifo = threshold(2);
  fifo.read_pattern = QuorumOptions::ReadPattern::kFifo;
  fifo.rewrite_corrupted = true;
  EXPECT_TRUE(validate_quorum_options(fifo, 2).is_ok());
}

TEST_P(QuorumTest, ChildrenOfDifferentLengthsAreRefused) {
  ASSERT_EQ(truncate(paths_[2].c_str(), 2 * kImageSize), 0);
  auto node = quorum(threshold(2));
  ASSERT_FALSE(node.has_value());
  EXPECT_EQ(node.status().message(), "Could not refresh total sector count: Input/output error");
}

TEST_P(QuorumTest, ReadsOutvoteACorruptChild) {
  write_file(1, 4096 + 100, pattern(50, 'X'));
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value()) << node.status().message();
  EXPECT_EQ((*node)->size(), static_cast<int64_t>(kImageSize));
  std::vector<char> out(8192);
  ASSERT_EQ(read(**node, 1000, out), 0);
  EXPECT_EQ(out, read_file(0, 1000, 8192));
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].kind, QuorumEvent::Kind::kReportBad);
  EXPECT_EQ(events_[0].op, QuorumEvent::Op::kRead);
  EXPECT_EQ(events_[0].node_name, "c1");
  EXPECT_FALSE(events_[0].error.has_value());
  // Bytes [1000, 9192) are sectors 1 to 17 inclusive.
  EXPECT_EQ(events_[0].sector_num, 1);
  EXPECT_EQ(events_[0].sectors_count, 17);
  // Without rewrite-corrupted the child stays corrupt.
  EXPECT_EQ(read_file(1, 4096 + 100, 50), pattern(50, 'X'));
}

TEST_P(QuorumTest, CorruptChild0LosesAndTheCallerGetsTheWinner) {
  write_file(0, 0, pattern(512, 'X'));
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value());
  std::vector<char> out(4096);
  ASSERT_EQ(read(**node, 0, out), 0);
  EXPECT_EQ(out, read_file(2, 0, 4096));
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].node_name, "c0");
}

TEST_P(QuorumTest, RewriteCorruptedRepairsTheLoser) {
  write_file(2, 65536, pattern(4096, 'Y'));
  QuorumOptions options = threshold(2);
  options.rewrite_corrupted = true;
  auto node = quorum(options);
  ASSERT_TRUE(node.has_value());
  std::vector<char> out(4096);
  ASSERT_EQ(read(**node, 65536, out), 0);
  EXPECT_EQ(read_file(2, 65536, 4096), read_file(0, 65536, 4096));
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].node_name, "c2");
  events_.clear();
  ASSERT_EQ(read(**node, 65536, out), 0);
  EXPECT_TRUE(events_.empty());
  // A difference in a later piece of a large read is repaired too.
  write_file(1, 200000, pattern(3, 'Z'));
  std::vector<char> large(262144);
  ASSERT_EQ(read(**node, 0, large), 0);
  EXPECT_EQ(large, read_file(0, 0, large.size()));
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].node_name, "c1");
  EXPECT_EQ(read_file(1, 0, large.size()), large);
}

TEST_P(QuorumTest, NoMajorityFailsWithEio) {
  write_file(1, 0, pattern(512, 'A'));
  write_file(2, 0, pattern(512, 'B'));
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value());
  std::vector<char> out(1024);
  EXPECT_EQ(read(**node, 0, out), -EIO);
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].kind, QuorumEvent::Kind::kFailure);
  EXPECT_EQ(events_[0].node_name, "q");
  EXPECT_EQ(events_[0].sector_num, 0);
  EXPECT_EQ(events_[0].sectors_count, 2);
  // Children that differ from child 0 in different pieces of a large read agree with nobody.
  write_file(1, 70000, pattern(1, 'X'));
  write_file(2, 140000, pattern(1, 'Y'));
  events_.clear();
  std::vector<char> large(196608);
  EXPECT_EQ(read(**node, 65536, large), -EIO);
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].kind, QuorumEvent::Kind::kFailure);
  EXPECT_EQ(events_[0].sector_num, 128);
  EXPECT_EQ(events_[0].sectors_count, 384);
}

TEST_P(QuorumTest, TwoAgreeingCorruptChildrenWin) {
  write_file(1, 0, pattern(512, 'A'));
  write_file(2, 0, pattern(512, 'A'));
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value());
  std::vector<char> out(512);
  ASSERT_EQ(read(**node, 0, out), 0);
  EXPECT_EQ(out, pattern(512, 'A'));
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].node_name, "c0");
}

TEST_P(QuorumTest, TiesGoToTheVersionOfTheHighestChild) {
  write_file(1, 0, pattern(512, 'A'));
  write_file(2, 0, pattern(512, 'B'));
  auto node = quorum(threshold(1));
  ASSERT_TRUE(node.has_value());
  std::vector<char> out(512);
  ASSERT_EQ(read(**node, 0, out), 0);
  EXPECT_EQ(out, pattern(512, 'B'));  // as qemu-storage-daemon 7.2
  EXPECT_EQ(events_.size(), 2u);
}

TEST_P(QuorumTest, FailingChildIsReportedWithItsError) {
  BlkdebugInjectError rule;
  rule.event = "read_aio";
  auto node = quorum(threshold(2), {file_node(0), blkdebug_node(1, {rule}), file_node(2)});
  ASSERT_TRUE(node.has_value()) << node.status().message();
  std::vector<char> out(4096);
  ASSERT_EQ(read(**node, 0, out), 0);
  EXPECT_EQ(out, read_file(0, 0, 4096));
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].node_name, "d1");
  EXPECT_EQ(events_[0].error, "Input/output error");
  EXPECT_EQ(events_[0].sectors_count, 8);
}

TEST_P(QuorumTest, TooFewSuccessfulReadsFailWithTheCommonError) {
  BlkdebugInjectError rule;
  rule.event = "read_aio";
  rule.error = ENOSPC;
  auto node = quorum(threshold(2),
                     {file_node(0), blkdebug_node(1, {rule}), blkdebug_node(2, {rule})});
  ASSERT_TRUE(node.has_value());
  std::vector<char> out(512);
  EXPECT_EQ(read(**node, 512, out), -ENOSPC);
  ASSERT_EQ(events_.size(), 3u);
  EXPECT_EQ(events_[2].kind, QuorumEvent::Kind::kFailure);
  EXPECT_EQ(events_[2].sector_num, 1);
}

TEST_P(QuorumTest, FifoReadsTheFirstChildThatWorks) {
  BlkdebugInjectError rule;
  rule.event = "read_aio";
  write_file(2, 0, pattern(512, 'Z'));  // not read: child 1 answers first
  QuorumOptions options = threshold(1);
  options.read_pattern = QuorumOptions::ReadPattern::kFifo;
  auto node = quorum(options, {blkdebug_node(0, {rule}), file_node(1), file_node(2)});
  ASSERT_TRUE(node.has_value());
  std::vector<char> out(512);
  ASSERT_EQ(read(**node, 0, out), 0);
  EXPECT_EQ(out, read_file(1, 0, 512));
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].node_name, "d0");
}

TEST_P(QuorumTest, WritesSucceedWithThresholdChildren) {
  BlkdebugInjectError rule;
  rule.event = "write_aio";
  auto node = quorum(threshold(2), {file_node(0), file_node(1), blkdebug_node(2, {rule})});
  ASSERT_TRUE(node.has_value());
  const auto data = pattern(1024, 'W');
  ASSERT_EQ(run(*loop_, (*node)->write(2048, data.size(), data.data(), 0)), 0);
  EXPECT_EQ(read_file(0, 2048, 1024), data);
  EXPECT_EQ(read_file(1, 2048, 1024), data);
  EXPECT_NE(read_file(2, 2048, 1024), data);
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].op, QuorumEvent::Op::kWrite);
  EXPECT_EQ(events_[0].node_name, "d2");
  EXPECT_EQ(events_[0].sector_num, 4);
  EXPECT_EQ(events_[0].sectors_count, 2);
}

// A large write to children in memory goes into their files from a worker thread; with FUA it
// goes through their nodes. Either way every child gets the bytes.
TEST_P(QuorumTest, LargeWritesReachEveryChild) {
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value());
  const uint64_t offset = 4096 + 512;
  for (const uint32_t flags : {0u, uint32_t{block::kRequestFua}}) {
    SCOPED_TRACE(flags);
    const auto data = pattern(524288, flags == 0 ? 'L' : 'F');
    ASSERT_EQ(run(*loop_, (*node)->write(offset, data.size(), data.data(), flags)), 0);
    for (int child = 0; child < 3; ++child) EXPECT_EQ(read_file(child, offset, data.size()), data);
  }
  EXPECT_TRUE(events_.empty());
}

class QuorumInMemoryTest : public QuorumFixture {
 protected:
  QuorumInMemoryTest() : QuorumFixture("/dev/shm") {}
};

// A child whose file refuses the write (a memfd sealed against writes: EPERM) fails alone in a
// large write written from a worker thread: it is reported with its error and the others carry the
// write.
TEST_F(QuorumInMemoryTest, LargeWriteRefusedByOneChildIsReported) {
  const int memfd = memfd_create("quorum-child", MFD_ALLOW_SEALING | MFD_CLOEXEC);
  ASSERT_GE(memfd, 0);
  const std::vector<char> original = read_file(2, 0, kImageSize);
  ASSERT_EQ(pwrite(memfd, original.data(), original.size(), 0),
            static_cast<ssize_t>(original.size()));
  FileOptions options;
  options.filename = "/proc/self/fd/" + std::to_string(memfd);
  options.locking = FileOptions::Locking::kOff;
  auto sealed = open_file_node(block::NodeOptions{.node_name = "m2"}, options, *loop_);
  ASSERT_TRUE(sealed.has_value()) << sealed.status().message();
  auto node = quorum(threshold(2), {file_node(0), file_node(1), *sealed});
  ASSERT_TRUE(node.has_value());
  ASSERT_EQ(fcntl(memfd, F_ADD_SEALS, F_SEAL_WRITE), 0);
  const auto data = pattern(524288, 'S');
  ASSERT_EQ(run(*loop_, (*node)->write(0, data.size(), data.data(), 0)), 0);
  EXPECT_EQ(read_file(0, 0, data.size()), data);
  EXPECT_EQ(read_file(1, 0, data.size()), data);
  std::vector<char> kept(kImageSize);
  ASSERT_EQ(pread(memfd, kept.data(), kept.size(), 0), static_cast<ssize_t>(kept.size()));
  EXPECT_EQ(kept, original);
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].kind, QuorumEvent::Kind::kReportBad);
  EXPECT_EQ(events_[0].op, QuorumEvent::Op::kWrite);
  EXPECT_EQ(events_[0].node_name, "m2");
  EXPECT_EQ(events_[0].error, "Operation not permitted");
  EXPECT_EQ(events_[0].sectors_count, 1024);
  close(memfd);
}

TEST_P(QuorumTest, WritesFailBelowThreshold) {
  BlkdebugInjectError rule;
  rule.event = "write_aio";
  auto node =
      quorum(threshold(2), {file_node(0), blkdebug_node(1, {rule}), blkdebug_node(2, {rule})});
  ASSERT_TRUE(node.has_value());
  const auto data = pattern(512, 'W');
  EXPECT_EQ(run(*loop_, (*node)->write(0, data.size(), data.data(), 0)), -EIO);
  ASSERT_EQ(events_.size(), 3u);
  EXPECT_EQ(events_[2].kind, QuorumEvent::Kind::kFailure);
  events_.clear();
  EXPECT_EQ(run(*loop_, (*node)->write_zeroes(0, 512, 0)), -EIO);
  ASSERT_EQ(events_.size(), 3u);
}

TEST_P(QuorumTest, FlushReportsFailingChildrenWithoutFailure) {
  BlkdebugInjectError rule;
  rule.event = "flush_to_os";
  rule.iotype = BlkdebugIoType::kFlush;
  auto node =
      quorum(threshold(2), {file_node(0), blkdebug_node(1, {rule}), blkdebug_node(2, {rule})});
  ASSERT_TRUE(node.has_value());
  EXPECT_EQ(run(*loop_, (*node)->flush()), -EIO);
  ASSERT_EQ(events_.size(), 2u);
  for (const auto& event : events_) {
    EXPECT_EQ(event.op, QuorumEvent::Op::kFlush);
    EXPECT_EQ(event.sector_num, 0);
    EXPECT_EQ(event.sectors_count, 0);
  }
}

TEST_P(QuorumTest, BlkverifyMismatchIsAnErrorNotAnExit) {
  write_file(1, 0, pattern(512, 'X'));
  QuorumOptions options = threshold(2);
  options.blkverify = true;
  auto node = quorum(options, {file_node(0), file_node(1)});
  ASSERT_TRUE(node.has_value());
  std::vector<char> out(512);
  EXPECT_EQ(read(**node, 0, out), -EIO);
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].kind, QuorumEvent::Kind::kFailure);
  EXPECT_EQ(read(**node, 4096, out), 0);
}

TEST_P(QuorumTest, BlockStatusMergesChildren) {
  // Child 2 is sparse in its second half; the others hold data: the merge says data.
  ASSERT_EQ(truncate(paths_[2].c_str(), kImageSize / 2), 0);
  ASSERT_EQ(truncate(paths_[2].c_str(), kImageSize), 0);
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value());
  auto status = run(*loop_, (*node)->block_status(kImageSize / 2, kImageSize / 2));
  EXPECT_GT(status.bytes, 0);
  EXPECT_TRUE(status.flags & block::kStatusData);
  // When every child is a hole there, the merge says zero. (New nodes: the file driver caches
  // what it learnt of the layout, and the files change behind its back here.)
  node->reset();
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(truncate(paths_[i].c_str(), kImageSize / 2), 0);
    ASSERT_EQ(truncate(paths_[i].c_str(), kImageSize), 0);
  }
  node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value());
  status = run(*loop_, (*node)->block_status(kImageSize / 2, kImageSize / 2));
  EXPECT_EQ(status.bytes, static_cast<int64_t>(kImageSize / 2));
  EXPECT_TRUE(status.flags & block::kStatusZero);
  EXPECT_FALSE(status.flags & block::kStatusData);
}

TEST_P(QuorumTest, ChildrenComeAndGo) {
  auto node = quorum(threshold(2), {file_node(0), file_node(1)});
  ASSERT_TRUE(node.has_value());
  Node& q = **node;
  auto names = [&q] {
    std::vector<std::string> out;
    for (const auto& edge : q.children()) out.push_back(edge->name());
    return out;
  };
  EXPECT_EQ(q.remove_dynamic_child(*q.children()[0]).message(),
            "The number of children cannot be lower than the vote threshold 2");
  auto extra = file_node(2);
  ASSERT_TRUE(q.add_dynamic_child(extra).is_ok());
  EXPECT_EQ(names(), (std::vector<std::string>{"children.0", "children.1", "children.2"}));
  EXPECT_EQ(q.add_dynamic_child(extra).message(), "The node c2 already has a parent");
  // Removing the newest child gives its index back; removing another does not.
  ASSERT_TRUE(q.remove_dynamic_child(*q.children()[2]).is_ok());
  ASSERT_TRUE(q.add_dynamic_child(extra).is_ok());
  EXPECT_EQ(names(), (std::vector<std::string>{"children.0", "children.1", "children.2"}));
  ASSERT_TRUE(q.remove_dynamic_child(*q.children()[0]).is_ok());
  ASSERT_TRUE(q.add_dynamic_child(file_node(0)).is_ok());
  EXPECT_EQ(names(), (std::vector<std::string>{"children.1", "children.2", "children.3"}));
  // Reads go to the current children.
  std::vector<char> out(512);
  ASSERT_EQ(read(q, 0, out), 0);
  EXPECT_EQ(out, read_file(0, 0, 512));
}

TEST_P(QuorumTest, BlkverifyRefusesNewChildren) {
  QuorumOptions options = threshold(2);
  options.blkverify = true;
  auto node = quorum(options, {file_node(0), file_node(1)});
  ASSERT_TRUE(node.has_value());
  EXPECT_EQ((*node)->add_dynamic_child(file_node(2)).message(),
            "Cannot add a child to a quorum in blkverify mode");
}

TEST_P(QuorumTest, FileNameListsTheChildren) {
  QuorumOptions options = threshold(2);
  options.read_pattern = QuorumOptions::ReadPattern::kFifo;
  auto node = quorum(options);
  ASSERT_TRUE(node.has_value());
  const auto json = (*node)->open_options();
  EXPECT_EQ(json["driver"], "quorum");
  EXPECT_EQ(json["vote-threshold"], 2);
  EXPECT_EQ(json["read-pattern"], "fifo");
  EXPECT_EQ(json["children"].size(), 3u);
  EXPECT_EQ(json["children"][1]["filename"], paths_[1]);
  EXPECT_FALSE(json.contains("rewrite-corrupted"));
}

// A corrupt byte anywhere in a request (first piece, a later piece, the very last byte), on any
// child, at several sizes and offsets, is outvoted and reported with the request's sectors. In
// memory, reads from 256 KiB on compare their second half on a worker thread.
TEST_P(QuorumTest, DisagreementAnywhereInTheRequestIsOutvoted) {
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value()) << node.status().message();
  const uint64_t lengths[] = {512, 4096, 65536, 65536 + 4096, 3 * 65536 + 1000, 262144, 786944};
  const uint64_t offsets[] = {0, 1536, 200704};
  for (const uint64_t length : lengths) {
    for (const uint64_t offset : offsets) {
      for (int child = 0; child < 3; ++child) {
        for (const uint64_t at : {uint64_t{0}, length / 2 + 7, length - 1}) {
          SCOPED_TRACE("length " + std::to_string(length) + " offset " + std::to_string(offset) +
                       " child " + std::to_string(child) + " at " + std::to_string(at));
          const std::vector<char> good = read_file(child, offset + at, 1);
          write_file(child, offset + at, std::vector<char>(1, static_cast<char>(good[0] ^ 0x5a)));
          events_.clear();
          std::vector<char> out(length);
          ASSERT_EQ(read(**node, offset, out), 0);
          EXPECT_EQ(out, read_file((child + 1) % 3, offset, length));
          ASSERT_EQ(events_.size(), 1u);
          EXPECT_EQ(events_[0].kind, QuorumEvent::Kind::kReportBad);
          EXPECT_EQ(events_[0].node_name, "c" + std::to_string(child));
          EXPECT_FALSE(events_[0].error.has_value());
          EXPECT_EQ(events_[0].sector_num, static_cast<int64_t>(offset / 512));
          EXPECT_EQ(events_[0].sectors_count,
                    static_cast<int64_t>((offset + length + 511) / 512 - offset / 512));
          write_file(child, offset + at, good);
        }
      }
    }
  }
  events_.clear();
  std::vector<char> out(65536 * 2);
  ASSERT_EQ(read(**node, 4096, out), 0);
  EXPECT_TRUE(events_.empty());
}

// A child file cut short behind the engine's back reads as zeroes past its new end (the node keeps
// its size): it loses the vote like any other corrupt child, small reads and large, never a crash.
TEST_P(QuorumTest, ChildTruncatedBehindTheEnginesBackIsOutvoted) {
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value()) << node.status().message();
  ASSERT_EQ(truncate(paths_[1].c_str(), 524288 + 100), 0);
  const std::pair<uint64_t, uint64_t> reads[] = {
      {524288 - 2048, 4096}, {786432, 65536}, {262144, 524288}, {0, kImageSize}};
  for (const auto& [offset, length] : reads) {
    SCOPED_TRACE("offset " + std::to_string(offset) + " length " + std::to_string(length));
    events_.clear();
    std::vector<char> out(length);
    ASSERT_EQ(read(**node, offset, out), 0);
    EXPECT_EQ(out, read_file(0, offset, length));
    ASSERT_EQ(events_.size(), 1u);
    EXPECT_EQ(events_[0].node_name, "c1");
    EXPECT_EQ(events_[0].sector_num, static_cast<int64_t>(offset / 512));
    EXPECT_EQ(events_[0].sectors_count, static_cast<int64_t>(length / 512));
  }
  // Inside what is left the child still agrees.
  events_.clear();
  std::vector<char> out(65536);
  ASSERT_EQ(read(**node, 65536, out), 0);
  EXPECT_TRUE(events_.empty());
  // Two children cut alike outvote the intact one: the majority decides, as it would for any data.
  ASSERT_EQ(truncate(paths_[1].c_str(), 0), 0);
  ASSERT_EQ(truncate(paths_[2].c_str(), 0), 0);
  ASSERT_EQ(read(**node, 0, out), 0);
  EXPECT_EQ(out, pattern(out.size(), 0));
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].node_name, "c0");
}

TEST_P(QuorumTest, ErrorInALaterPieceIsReportedAndOutvoted) {
  BlkdebugInjectError rule;
  rule.event = "read_aio";
  rule.error = EIO;
  rule.sector = (65536 + 4096) / 512;  // in the second piece of the compare path
  std::vector<std::shared_ptr<Node>> children{file_node(0), blkdebug_node(1, {rule}),
                                              file_node(2)};
  auto node = quorum(threshold(2), children);
  ASSERT_TRUE(node.has_value());
  std::vector<char> out(262144);
  ASSERT_EQ(read(**node, 0, out), 0);
  EXPECT_EQ(out, read_file(0, 0, out.size()));
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].kind, QuorumEvent::Kind::kReportBad);
  EXPECT_EQ(events_[0].node_name, "d1");
  EXPECT_EQ(events_[0].error, "Input/output error");
  EXPECT_EQ(events_[0].sector_num, 0);
  EXPECT_EQ(events_[0].sectors_count, 512);
}

TEST_P(QuorumTest, BlkverifyFailsOnADifferenceInALaterPiece) {
  write_file(1, 131072 + 10, pattern(1, 'B'));
  QuorumOptions options = threshold(2);
  options.blkverify = true;
  auto node = quorum(options, {file_node(0), file_node(1)});
  ASSERT_TRUE(node.has_value()) << node.status().message();
  std::vector<char> out(262144);
  EXPECT_EQ(read(**node, 0, out), -EIO);
  ASSERT_EQ(events_.size(), 1u);
  EXPECT_EQ(events_[0].kind, QuorumEvent::Kind::kFailure);
}

// A reader that can send a range straight from a file (the NBD export's large reads) gets child 0's
// range, and only in memory, for reads in quorum mode, once every child was found to agree.
// How a caller maps a range of node `q`: map_file, or map_file_async run to its end.
using MapFunction = block::FileRange (*)(Loop& loop, Node& q, uint64_t offset, uint64_t length,
                                         block::MapAccess access);

block::FileRange map_now(Loop&, Node& q, uint64_t offset, uint64_t length,
                         block::MapAccess access) {
  return q.map_file(offset, length, access);
}

// map_file_async: the export's way to map large reads, the comparison on a worker while the loop
// could serve other requests.
block::FileRange map_waiting(Loop& loop, Node& q, uint64_t offset, uint64_t length,
                             block::MapAccess access) {
  return run(loop, q.map_file_async(offset, length, access));
}

class QuorumMapTest : public QuorumFixture,
                      public ::testing::WithParamInterface<std::tuple<std::string, MapFunction>> {
 protected:
  QuorumMapTest() : QuorumFixture(std::get<0>(GetParam())) {}
  void SetUp() override {
    struct statfs fs {};
    if (in_memory() && (statfs("/dev/shm", &fs) != 0 || fs.f_type != TMPFS_MAGIC)) {
      GTEST_SKIP() << "/dev/shm is not a tmpfs here";
    }
    QuorumFixture::SetUp();
  }
  bool in_memory() const { return std::get<0>(GetParam()) == "/dev/shm"; }
  block::FileRange map(Node& q, uint64_t offset, uint64_t length, block::MapAccess access) {
    return std::get<1>(GetParam())(*loop_, q, offset, length, access);
  }
};

INSTANTIATE_TEST_SUITE_P(Files, QuorumMapTest,
                         ::testing::Combine(::testing::Values("/var/tmp", "/dev/shm"),
                                            ::testing::Values(&map_now, &map_waiting)),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) == "/dev/shm" ? "InMemory"
                                                                                    : "OnDisk") +
                                  (std::get<1>(info.param) == &map_now ? "Now" : "Waiting");
                         });

TEST_P(QuorumMapTest, LargeReadsMapChild0OnceTheChildrenAgree) {
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value()) << node.status().message();
  Node& q = **node;
  const uint64_t offset = 65536 + 512;
  const uint64_t length = 524288;
  EXPECT_EQ(map(q, offset, 4096, block::MapAccess::kRead).fd, -1);
  EXPECT_EQ(map(q, offset, length, block::MapAccess::kWrite).fd, -1);
  const block::FileRange range = map(q, offset, length, block::MapAccess::kRead);
  if (!in_memory()) {
    EXPECT_EQ(range.fd, -1);
    return;
  }
  ASSERT_GE(range.fd, 0);
  EXPECT_EQ(range.offset, offset);
  const std::vector<char> expected = read_file(0, offset, length);
  std::vector<char> through(length);
  ASSERT_EQ(pread(range.fd, through.data(), length, static_cast<off_t>(range.offset)),
            static_cast<ssize_t>(length));
  EXPECT_EQ(through, expected);
  ASSERT_NE(range.memory, nullptr);
  EXPECT_EQ(std::memcmp(range.memory, expected.data(), length), 0);
  q.release_file(range, block::MapAccess::kRead);
  // Every mapping ended: a child edge can go (it waits for requests in flight, mappings included).
  ASSERT_TRUE(q.remove_dynamic_child(*q.children()[2]).is_ok());
  ASSERT_TRUE(q.add_dynamic_child(file_node(2)).is_ok());
  // A child that differs anywhere, child 0 included: nothing is granted and nothing reported; the
  // read that the caller makes instead votes and reports.
  for (int child = 0; child < 3; ++child) {
    SCOPED_TRACE("child " + std::to_string(child));
    const uint64_t at = offset + length - 1 - static_cast<uint64_t>(child) * 100000;
    const std::vector<char> good = read_file(child, at, 1);
    write_file(child, at, pattern(1, static_cast<char>(good[0] ^ 1)));
    EXPECT_EQ(map(q, offset, length, block::MapAccess::kRead).fd, -1);
    EXPECT_TRUE(events_.empty());
    std::vector<char> out(length);
    ASSERT_EQ(read(q, offset, out), 0);
    EXPECT_EQ(out, read_file((child + 1) % 3, offset, length));
    ASSERT_EQ(events_.size(), 1u);
    EXPECT_EQ(events_[0].node_name, "c" + std::to_string(child));
    EXPECT_EQ(events_[0].sector_num, static_cast<int64_t>(offset / 512));
    EXPECT_EQ(events_[0].sectors_count, static_cast<int64_t>(length / 512));
    events_.clear();
    write_file(child, at, good);
  }
  // A hole in one child's range (not in the page cache) is not read through its mapping (that
  // would allocate it): nothing is granted, and the child stays as sparse as it was.
  const int fd = open(paths_[1].c_str(), O_RDWR);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 262144, 65536), 0);
  close(fd);
  struct stat punched {};
  ASSERT_EQ(stat(paths_[1].c_str(), &punched), 0);
  EXPECT_EQ(map(q, offset, length, block::MapAccess::kRead).fd, -1);
  EXPECT_TRUE(events_.empty());
  struct stat after {};
  ASSERT_EQ(stat(paths_[1].c_str(), &after), 0);
  EXPECT_EQ(after.st_blocks, punched.st_blocks);
  // fifo reads no child but the first that works: no mapping (it would skip nothing, but fifo is
  // not what this path is for).
  QuorumOptions fifo = threshold(1);
  fifo.read_pattern = QuorumOptions::ReadPattern::kFifo;
  auto other = quorum(fifo);
  ASSERT_TRUE(other.has_value());
  EXPECT_EQ(map(**other, offset, length, block::MapAccess::kRead).fd, -1);
}

// The comparison in place walks a large range as several parts side by side, each from a point
// inside it and around, prefetching ahead, and leaves a tail to a plain loop: a single differing
// byte on any child is found wherever it lies (first and last bytes of each part and of the tail,
// the lines around each part's end, around the prefetch distance before it and around where its
// walk begins, every page boundary of the files), for three children and for two, at ranges that
// start on a page, mid-page and at odd offsets.
TEST_P(QuorumMapTest, OneDifferingByteAnywhereGrantsNothing) {
  if (!in_memory()) GTEST_SKIP() << "only files in memory are compared in place";
  struct Range {
    uint64_t offset, length;
  };
  const Range ranges[] = {{0, kImageSize}, {1536, kImageSize - 1536 - 4096}, {3001, 41160}};
  for (const size_t count : {size_t{3}, size_t{2}}) {
    std::vector<std::shared_ptr<Node>> children;
    for (size_t i = 0; i < count; ++i) children.push_back(file_node(static_cast<int>(i)));
    auto node = quorum(threshold(count == 3 ? 2 : 1), std::move(children));
    ASSERT_TRUE(node.has_value()) << node.status().message();
    Node& q = **node;
    for (const Range& range : ranges) {
      // Where the parts end and where their walks begin and wrap (see equal_parts in quorum.cc:
      // four parts of whole 64-byte lines, part i's walk starting i KiB in).
      const uint64_t part = range.length / 256 * 64;
      std::vector<uint64_t> positions;
      for (uint64_t index = 0; index <= 4; ++index) {
        const uint64_t end = index * part;
        for (const int64_t delta : {-1025, -1024, -65, -64, -1, 0, 1, 63, 64}) {
          positions.push_back(end + static_cast<uint64_t>(delta));
        }
        for (const int64_t delta : {-1, 0, 1, 63, 64}) {
          positions.push_back(end + index * 1024 + static_cast<uint64_t>(delta));
        }
      }
      for (uint64_t at = 0; at < range.length; ++at) {
        if ((range.offset + at) % 4096 == 0) {
          positions.push_back(at - 1);
          positions.push_back(at);
        }
      }
      positions.push_back(range.length - 1);
      for (int child = 0; child < static_cast<int>(count); ++child) {
        for (const uint64_t at : positions) {
          if (at >= range.length) continue;  // wrapped below 0 or past the end
          SCOPED_TRACE("children " + std::to_string(count) + " offset " +
                       std::to_string(range.offset) + " length " + std::to_string(range.length) +
                       " child " + std::to_string(child) + " at " + std::to_string(at));
          const std::vector<char> good = read_file(child, range.offset + at, 1);
          write_file(child, range.offset + at, pattern(1, static_cast<char>(good[0] ^ 0x10)));
          const block::FileRange granted = map(q, range.offset, range.length,
                                               block::MapAccess::kRead);
          if (granted.fd >= 0) q.release_file(granted, block::MapAccess::kRead);
          write_file(child, range.offset + at, good);
          ASSERT_EQ(granted.fd, -1);
        }
      }
      const block::FileRange granted = map(q, range.offset, range.length, block::MapAccess::kRead);
      ASSERT_GE(granted.fd, 0);
      q.release_file(granted, block::MapAccess::kRead);
    }
  }
  EXPECT_TRUE(events_.empty());
}

// Child 2's file shrinks and grows back over and over while the children are compared for
// mappings: a comparison that touches a page just gone takes the fault (on the thread that
// compares: the loop's or a worker) and nothing is granted for it; what is granted is child 0's
// unchanged bytes. The process lives.
TEST_P(QuorumMapTest, ChildShrinkingDuringMappingGrantsNothing) {
  if (!in_memory()) GTEST_SKIP() << "only files in memory are compared in place";
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value());
  Node& q = **node;
  const std::vector<char> expected = read_file(0, 0, kImageSize);
  std::atomic<bool> stop{false};
  std::thread shrinker = shrink_repeatedly(2, stop);
  const uint64_t faults = guarded_fault_count();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  int attempts = 0;
  while ((guarded_fault_count() == faults || attempts < 50) &&
         std::chrono::steady_clock::now() < deadline) {
    const block::FileRange range = map(q, 0, kImageSize, block::MapAccess::kRead);
    if (range.fd >= 0) {
      EXPECT_EQ(std::memcmp(range.memory, expected.data(), kImageSize), 0);
      q.release_file(range, block::MapAccess::kRead);
    }
    ++attempts;
  }
  stop = true;
  shrinker.join();
  EXPECT_TRUE(events_.empty());
  EXPECT_GT(guarded_fault_count(), faults) << "no comparison met a shrunk page in " << attempts;
}

// Reading a hole through a mapping of a file in memory would allocate it: large reads over holes
// compare through pread instead, and leave the children as sparse as they were.
TEST_P(QuorumTest, LargeReadsLeaveHolesInTheChildren) {
  for (int child = 0; child < 3; ++child) {
    const int fd = open(paths_[child].c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 262144, 524288), 0);
    close(fd);
  }
  auto allocated = [this](int child) {
    struct stat st {};
    EXPECT_EQ(stat(paths_[child].c_str(), &st), 0);
    return st.st_blocks;
  };
  const blkcnt_t before = allocated(0);
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value());
  std::vector<char> out(kImageSize);
  ASSERT_EQ(read(**node, 0, out), 0);
  EXPECT_EQ(out, read_file(1, 0, kImageSize));
  EXPECT_EQ(std::vector<char>(out.begin() + 262144, out.begin() + 786432), pattern(524288, 0));
  EXPECT_EQ((*node)->map_file(262144, 524288, block::MapAccess::kRead).fd, -1);
  EXPECT_TRUE(events_.empty());
  for (int child = 0; child < 3; ++child) EXPECT_EQ(allocated(child), before);
}

// Child 0's file shrinks and grows back over and over while large reads compare in place: a read
// whose comparison touches a page that has just gone takes a fault (SIGBUS), which counts as a
// difference; the children are then read again through their nodes and vote. Every read returns
// the majority's data, and the process lives.
TEST_P(QuorumTest, ChildShrinkingDuringLargeReadsIsOutvoted) {
  if (GetParam() != "/dev/shm") GTEST_SKIP() << "only files in memory are compared in place";
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value());
  std::atomic<bool> stop{false};
  std::thread shrinker = shrink_repeatedly(0, stop);
  const std::vector<char> expected = read_file(1, 0, kImageSize);
  const uint64_t faults = guarded_fault_count();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  int reads = 0;
  while ((guarded_fault_count() == faults || reads < 50) &&
         std::chrono::steady_clock::now() < deadline) {
    std::vector<char> out(kImageSize);
    const int64_t result = read(**node, 0, out);
    if (result != 0 || out != expected) {
      ADD_FAILURE() << "read " << reads << " returned " << result << " or other data";
      break;
    }
    for (const QuorumEvent& event : events_) EXPECT_EQ(event.node_name, "c0");
    events_.clear();
    ++reads;
  }
  stop = true;
  shrinker.join();
  EXPECT_GT(guarded_fault_count(), faults) << "no read met a shrunk page in " << reads << " reads";
}

// Large writes, reads and mappings of distinct ranges, all in flight at once on the loop: from
// 256 KiB on, writes to children in memory, comparisons for reads and map_file_async run on pool
// workers, side by side, while the loop thread starts the other ranges' requests and resumes
// those that finish. Each range's task checks what it reads and maps against what it last wrote.
// This is the test to run under ThreadSanitizer (./dev tsan) for races between the loop thread
// and the workers of the quorum's paths.
TEST_P(QuorumTest, LargeRequestsOfManyRangesRunOnWorkersAtOnce) {
  auto node = quorum(threshold(2));
  ASSERT_TRUE(node.has_value());
  constexpr uint64_t kRange = 256 << 10;
  constexpr int kRanges = static_cast<int>(kImageSize / kRange);
  constexpr int kRounds = 8;
  const bool in_memory = GetParam() == "/dev/shm";
  int failures = 0;
  int finished = 0;
  auto exercise = [](Node& q, int index, bool in_memory, int& failures,
                     int& finished) -> Task<void> {
    const uint64_t offset = static_cast<uint64_t>(index) * kRange;
    std::vector<char> written(kRange);
    std::vector<char> out(kRange);
    for (int round = 0; round < kRounds; ++round) {
      std::fill(written.begin(), written.end(), static_cast<char>(index * 16 + round + 1));
      if (co_await q.write(offset, kRange, written.data(), 0) != 0) ++failures;
      if (co_await q.read(offset, kRange, out.data(), 0) != 0 || out != written) ++failures;
      const block::FileRange range =
          co_await q.map_file_async(offset, kRange, block::MapAccess::kRead);
      // Children in memory that agree and are in the page cache: the range is granted.
      if ((range.fd >= 0) != in_memory) ++failures;
      if (range.fd >= 0) {
        if (range.memory == nullptr || std::memcmp(range.memory, written.data(), kRange) != 0) {
          ++failures;
        }
        q.release_file(range, block::MapAccess::kRead);
      }
    }
    ++finished;
  };
  for (int i = 0; i < kRanges; ++i) {
    loop_->spawn(exercise(**node, i, in_memory, failures, finished));
  }
  loop_->run_until([&] { return finished == kRanges; });
  EXPECT_EQ(failures, 0);
  EXPECT_TRUE(events_.empty());
  // In memory the workers did the work (each test has a process of its own under ctest).
  if (in_memory) {
    EXPECT_GT(ThreadPool::shared().TEST_worker_count(), 0u);
  }
  for (int child = 0; child < 3; ++child) {
    for (int i = 0; i < kRanges; ++i) {
      EXPECT_EQ(read_file(child, i * kRange, kRange),
                pattern(kRange, static_cast<char>(i * 16 + kRounds)))
          << "child " << child << ", range " << i;
    }
  }
}

// ---- blkdebug on its own.

class BlkdebugTest : public QuorumFixture {};

TEST_F(BlkdebugTest, OnceFailsOnlyTheFirstMatchingRequest) {
  BlkdebugInjectError rule;
  rule.event = "read_aio";
  rule.once = true;
  auto node = blkdebug_node(0, {rule});
  std::vector<char> out(512);
  EXPECT_EQ(read(*node, 0, out), -EIO);
  EXPECT_EQ(read(*node, 0, out), 0);
}

TEST_F(BlkdebugTest, SectorLimitsTheRule) {
  BlkdebugInjectError rule;
  rule.event = "read_aio";
  rule.sector = 8;
  rule.error = ENOSPC;
  auto node = blkdebug_node(0, {rule});
  std::vector<char> out(4096);
  EXPECT_EQ(read(*node, 0, out), 0);          // sectors 0-7
  EXPECT_EQ(read(*node, 4096, out), -ENOSPC);  // sectors 8-15
  EXPECT_EQ(read(*node, 4096 + 512, out), 0);
}

TEST_F(BlkdebugTest, IotypeAndEventSelectRequests) {
  BlkdebugInjectError rule;
  rule.event = "write_aio";
  rule.iotype = BlkdebugIoType::kWrite;
  auto node = blkdebug_node(0, {rule});
  std::vector<char> out(512);
  EXPECT_EQ(read(*node, 0, out), 0);  // the rule is not armed before a write
  EXPECT_EQ(run(*loop_, node->write(0, out.size(), out.data(), 0)), -EIO);
  EXPECT_EQ(read(*node, 0, out), 0);  // armed, but for writes only
  EXPECT_EQ(run(*loop_, node->flush()), 0);
}

TEST_F(BlkdebugTest, StatesGateRules) {
  BlkdebugInjectError rule;
  rule.event = "read_aio";
  rule.state = 2;
  BlkdebugSetState to_two{"write_aio", 1, 2};
  auto node = blkdebug_node(0, {rule}, {to_two});
  std::vector<char> out(512);
  EXPECT_EQ(read(*node, 0, out), 0);  // state 1
  EXPECT_EQ(run(*loop_, node->write(0, out.size(), out.data(), 0)), 0);
  EXPECT_EQ(read(*node, 0, out), -EIO);  // state 2
  EXPECT_EQ(node->filename(), "blkdebug::" + paths_[0]);
}

}  // namespace
}  // namespace blockd::drivers
