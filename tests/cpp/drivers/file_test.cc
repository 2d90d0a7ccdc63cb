// file driver tests: data checked on disk with an independent descriptor (pread), sparse files,
// O_DIRECT bounce buffers, image locks against this process and against QEMU's own tools.
#include "drivers/file.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "block/backend.h"
#include "test_support.h"

namespace blockd::drivers {
namespace {

using ::testing::HasSubstr;
using testing::run;

constexpr uint32_t kReadWrite = block::kPermConsistentRead | block::kPermWrite;

std::string aio_name(FileOptions::Aio aio) {
  switch (aio) {
    case FileOptions::Aio::kThreads:
      return "threads";
    case FileOptions::Aio::kNative:
      return "native";
    case FileOptions::Aio::kIoUring:
      return "io_uring";
  }
  return "?";
}

bool have_program(const char* name) {
  std::string command = std::string("command -v ") + name + " >/dev/null 2>&1";
  return std::system(command.c_str()) == 0;
}

// Runs a shell command; returns its exit status and combined output.
std::pair<int, std::string> shell(const std::string& command) {
  std::string output;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return {-1, ""};
  char chunk[512];
  size_t got;
  while ((got = fread(chunk, 1, sizeof chunk, pipe)) > 0) output.append(chunk, got);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

class FileTest : public ::testing::TestWithParam<FileOptions::Aio> {
 protected:
  void SetUp() override { path_ = dir_.file("img"); }

  // Creates the image with `size` bytes of a pattern (byte i = i % 251), or sparse when !fill.
  void create(uint64_t size, bool fill = true) {
    int fd = open(path_.c_str(), O_CREAT | O_TRUNC | O_RDWR, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, size), 0);
    model_.assign(size, 0);
    if (fill) {
      for (size_t i = 0; i < size; ++i) model_[i] = static_cast<char>(i % 251);
      ASSERT_EQ(pwrite(fd, model_.data(), size, 0), static_cast<ssize_t>(size));
    }
    close(fd);
  }

  Expected<std::shared_ptr<block::Node>> open_node(block::NodeOptions common,
                                                   FileOptions options = {}) {
    if (options.filename.empty()) options.filename = path_;
    options.aio = GetParam();
    if (common.node_name.empty()) common.node_name = "file0";
    return open_file_node(std::move(common), options, *loop_);
  }

  std::shared_ptr<block::Node> node(block::NodeOptions common = {}, FileOptions options = {}) {
    auto opened = open_node(std::move(common), std::move(options));
    EXPECT_TRUE(opened.has_value()) << opened.status().message();
    return opened.has_value() ? *opened : nullptr;
  }

  std::vector<char> on_disk(uint64_t offset, size_t length) {
    std::vector<char> out(length);
    int fd = open(path_.c_str(), O_RDONLY);
    EXPECT_EQ(pread(fd, out.data(), length, offset), static_cast<ssize_t>(length));
    close(fd);
    return out;
  }
  std::vector<char> on_disk_all() {
    struct stat st;
    EXPECT_EQ(stat(path_.c_str(), &st), 0);
    return on_disk(0, st.st_size);
  }
  int64_t blocks() {
    struct stat st;
    EXPECT_EQ(stat(path_.c_str(), &st), 0);
    return st.st_blocks;
  }

  std::unique_ptr<Loop> loop_ = testing::make_loop();
  testing::TempDir dir_;
  std::string path_;
  std::vector<char> model_;
};

TEST_P(FileTest, ReadWriteFlushFua) {
  create(1 << 20);
  auto file = node();
  ASSERT_TRUE(file);
  EXPECT_EQ(file->driver_name(), "file");
  EXPECT_EQ(file->size(), 1 << 20);
  EXPECT_EQ(file->filename(), path_);
  EXPECT_EQ(file->open_options(), nlohmann::json({{"driver", "file"}, {"filename", path_}}));

  std::vector<char> buffer(100000);
  EXPECT_EQ(run(*loop_, file->read(777, buffer.size(), buffer.data(), 0)), 0);
  EXPECT_EQ(buffer, std::vector<char>(model_.begin() + 777, model_.begin() + 777 + 100000));

  std::vector<char> data(70000, 'a');
  EXPECT_EQ(run(*loop_, file->write(4097, data.size(), data.data(), 0)), 0);
  EXPECT_EQ(on_disk(4097, data.size()), data);
  std::vector<char> durable(4096, 'f');
  EXPECT_EQ(run(*loop_, file->write(0, durable.size(), durable.data(), block::kRequestFua)), 0);
  EXPECT_EQ(on_disk(0, durable.size()), durable);
  EXPECT_EQ(run(*loop_, file->flush()), 0);
}

TEST_P(FileTest, LargeRequests) {
  create(8 << 20, /*fill=*/false);
  auto file = node();
  std::vector<char> data(5 << 20);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 7);
  EXPECT_EQ(run(*loop_, file->write(1 << 20, data.size(), data.data(), 0)), 0);
  std::vector<char> back(data.size());
  EXPECT_EQ(run(*loop_, file->read(1 << 20, back.size(), back.data(), 0)), 0);
  EXPECT_EQ(back, data);
}

TEST_P(FileTest, ShortFileReadsZeroesPastTheEnd) {
  create(1000);
  auto file = node();
  EXPECT_EQ(file->size(), 1024);  // whole sectors, as QEMU
  std::vector<char> buffer(1024, 'x');
  EXPECT_EQ(run(*loop_, file->read(0, 1024, buffer.data(), 0)), 0);
  std::vector<char> expected(model_);
  expected.resize(1024, 0);
  EXPECT_EQ(buffer, expected);
  // Writing the tail grows the file.
  std::vector<char> data(24, 't');
  EXPECT_EQ(run(*loop_, file->write(1000, data.size(), data.data(), 0)), 0);
  EXPECT_EQ(on_disk(1000, 24), data);
}

TEST_P(FileTest, EmptyFile) {
  create(0);
  auto file = node();
  EXPECT_EQ(file->size(), 0);
}

TEST_P(FileTest, WritesPastTheEndGrowTheNode) {
  create(0);
  auto file = node();
  std::vector<char> data(1000, 'g');
  EXPECT_EQ(run(*loop_, file->write(1 << 20, data.size(), data.data(), 0)), 0);
  EXPECT_EQ(file->size(), (1 << 20) + 1024);  // whole sectors, as at open
  EXPECT_EQ(run(*loop_, file->write_zeroes(4 << 20, 4096, 0)), 0);
  EXPECT_EQ(file->size(), (4 << 20) + 4096);
  EXPECT_EQ(run(*loop_, file->write(0, data.size(), data.data(), 0)), 0);
  EXPECT_EQ(file->size(), (4 << 20) + 4096);  // writes inside never shrink it
}

TEST_P(FileTest, OpenErrors) {
  auto missing = open_node({}, {.filename = dir_.file("missing")});
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.status().message(),
            "Could not open '" + dir_.file("missing") + "': No such file or directory");
  auto directory = open_node({}, {.filename = dir_.path()});
  ASSERT_FALSE(directory.has_value());
  EXPECT_EQ(directory.status().message(), "Could not open '" + dir_.path() + "': Is a directory");
  auto directory_ro = open_node({.read_only = true}, {.filename = dir_.path()});
  ASSERT_FALSE(directory_ro.has_value());
  EXPECT_EQ(directory_ro.status().message(),
            "Could not open '" + dir_.path() + "': Is a directory");

  auto unnamed = open_file_node({}, {}, *loop_);
  ASSERT_FALSE(unnamed.has_value());
  EXPECT_EQ(unnamed.status().message(), "The 'file' block driver requires a file name");

  create(4096);
  auto native = open_file_node({}, {.filename = path_, .aio = FileOptions::Aio::kNative}, *loop_);
  ASSERT_FALSE(native.has_value());
  EXPECT_EQ(native.status().message(),
            "aio=native was specified, but it requires cache.direct=on, which was not specified.");
}

TEST_P(FileTest, ReadOnly) {
  create(4096);
  auto file = node({.read_only = true});
  ASSERT_TRUE(file);
  EXPECT_TRUE(file->read_only());
  char byte = 'x';
  EXPECT_EQ(run(*loop_, file->write(0, 1, &byte, 0)), -EPERM);
  EXPECT_EQ(run(*loop_, file->write_zeroes(0, 512, 0)), -EPERM);
  EXPECT_EQ(run(*loop_, file->read(1, 1, &byte, 0)), 0);
  EXPECT_EQ(byte, 1);
}

TEST_P(FileTest, AutoReadOnlyFallsBackWhenTheFileCannotBeWritten) {
  create(4096);
  // An immutable file refuses O_RDWR with EPERM even to root.
  int fd = open(path_.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  int flags = 0;
  if (ioctl(fd, FS_IOC_GETFLAGS, &flags) != 0 ||
      (flags |= FS_IMMUTABLE_FL, ioctl(fd, FS_IOC_SETFLAGS, &flags) != 0)) {
    close(fd);
    GTEST_SKIP() << "cannot make a file immutable here (needs CAP_LINUX_IMMUTABLE and ext4/xfs)";
  }
  {
    auto refused = open_node({});
    ASSERT_FALSE(refused.has_value());
    EXPECT_EQ(refused.status().message(),
              "Could not open '" + path_ + "': Operation not permitted");
    auto file = open_node({.auto_read_only = true});
    ASSERT_TRUE(file.has_value()) << file.status().message();
    EXPECT_TRUE((*file)->read_only());
  }
  flags &= ~FS_IMMUTABLE_FL;
  EXPECT_EQ(ioctl(fd, FS_IOC_SETFLAGS, &flags), 0);
  close(fd);
}

// Drives random unaligned reads and writes, with unaligned buffers, through a node and a model;
// the file on disk must match the model.
void random_io(Loop& loop, block::Node& file, std::vector<char>& model, uint32_t seed) {
  std::mt19937 random(seed);
  std::vector<char> storage(300000 + 64);
  for (int i = 0; i < 200; ++i) {
    const uint64_t length = 1 + random() % 200000;
    const uint64_t offset = random() % (model.size() - length);
    char* buffer = storage.data() + random() % 64;
    if (random() % 2) {
      for (uint64_t k = 0; k < length; ++k) buffer[k] = static_cast<char>(random());
      ASSERT_EQ(run(loop, file.write(offset, length, buffer,
                                     (random() % 4 == 0) ? uint32_t{block::kRequestFua} : 0u)),
                0);
      std::memcpy(model.data() + offset, buffer, length);
    } else {
      ASSERT_EQ(run(loop, file.read(offset, length, buffer, 0)), 0);
      ASSERT_EQ(std::memcmp(buffer, model.data() + offset, length), 0) << offset << "+" << length;
    }
  }
}

TEST_P(FileTest, DirectIoWithUnalignedRequestsGoesThroughBounceBuffers) {
  create(2 << 20);
  auto file = open_node({.cache_direct = true});
  if (!file.has_value() && file.status().message().find("Invalid argument") != std::string::npos) {
    GTEST_SKIP() << "the file system under /var/tmp does not support O_DIRECT";
  }
  ASSERT_TRUE(file.has_value()) << file.status().message();
  const uint32_t alignment = (*file)->request_alignment();
  EXPECT_GE(alignment, 512u);
  EXPECT_EQ(alignment & (alignment - 1), 0u);
  // O_DIRECT is really in use: an unaligned pread on a descriptor like ours fails.
  int fd = open(path_.c_str(), O_RDONLY | O_DIRECT);
  char probe[2];
  EXPECT_EQ(pread(fd, probe, 1, 1), -1);
  close(fd);
  random_io(*loop_, **file, model_, 1);
  EXPECT_EQ(on_disk_all(), model_);
}

TEST_P(FileTest, ForcedAlignmentWithoutDirectIo) {
  create(2 << 20);
  auto file = node({}, {.TEST_request_alignment = 4096});
  ASSERT_TRUE(file);
  EXPECT_EQ(file->request_alignment(), 4096u);
  random_io(*loop_, *file, model_, 2);
  EXPECT_EQ(on_disk_all(), model_);
}

TEST_P(FileTest, UnalignedEndOfFileUnderDirectIo) {
  create(5000);
  auto file = open_node({.cache_direct = true});
  if (!file.has_value()) GTEST_SKIP() << file.status().message();
  EXPECT_EQ((*file)->size(), 5120);
  std::vector<char> buffer(5120, 'x');
  EXPECT_EQ(run(*loop_, (*file)->read(0, 5120, buffer.data(), 0)), 0);
  std::vector<char> expected(model_);
  expected.resize(5120, 0);
  EXPECT_EQ(buffer, expected);
  std::vector<char> data(3, 'e');
  EXPECT_EQ(run(*loop_, (*file)->write(4999, 3, data.data(), 0)), 0);
  EXPECT_EQ(on_disk(4999, 3), data);
  EXPECT_EQ(on_disk(0, 4999), std::vector<char>(model_.begin(), model_.begin() + 4999));
}

TEST_P(FileTest, ConcurrentUnalignedWritesToOneBlockAreNotLost) {
  for (bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "O_DIRECT" : "forced alignment");
    create(64 << 10, /*fill=*/false);
    auto file = open_node({.cache_direct = direct}, {.TEST_request_alignment = 4096});
    if (!file.has_value() && direct) continue;  // no O_DIRECT here; the other pass covers the logic
    ASSERT_TRUE(file.has_value()) << file.status().message();
    // 64 writers, each owning 100 bytes of the same two 4 KiB blocks (crossing the boundary), all
    // in flight together, plus aligned whole-block writes elsewhere. A lost read-modify-write
    // would leave some writer's bytes zero.
    constexpr int kWriters = 64;
    std::vector<std::vector<char>> payloads(kWriters);
    int finished = 0;
    for (int i = 0; i < kWriters; ++i) {
      payloads[i].assign(100, static_cast<char>('A' + i % 50));
      loop_->spawn([](block::Node& n, uint64_t offset, const std::vector<char>& data,
                      int& done) -> Task<void> {
        EXPECT_EQ(co_await n.write(offset, data.size(), data.data(), 0), 0);
        ++done;
      }(**file, 1000 + i * 100, payloads[i], finished));
    }
    std::vector<char> block(4096, 'Z');
    loop_->spawn([](block::Node& n, const std::vector<char>& data, int& done) -> Task<void> {
      EXPECT_EQ(co_await n.write(32768, data.size(), data.data(), 0), 0);
      ++done;
    }(**file, block, finished));
    loop_->run_until([&] { return finished == kWriters + 1; });
    for (int i = 0; i < kWriters; ++i) {
      EXPECT_EQ(on_disk(1000 + i * 100, 100), payloads[i]) << "writer " << i;
    }
    EXPECT_EQ(on_disk(32768, 4096), block);
    EXPECT_EQ(on_disk(0, 1000), std::vector<char>(1000, 0));
  }
}

TEST_P(FileTest, DiscardPunchesHolesOnlyWithUnmap) {
  create(1 << 20);
  {
    auto ignoring = node();
    const int64_t before = blocks();
    EXPECT_EQ(run(*loop_, ignoring->discard(0, 1 << 20)), 0);
    EXPECT_EQ(blocks(), before);
    EXPECT_EQ(on_disk_all(), model_);
  }
  auto file = node({.discard = "unmap"});
  EXPECT_TRUE(file->supports_discard());
  const int64_t before = blocks();
  const int64_t allocated_before = file->allocated_size();
  EXPECT_EQ(allocated_before, before * 512);
  EXPECT_EQ(run(*loop_, file->discard(65536, 524288)), 0);
  EXPECT_LE(blocks(), before - 524288 / 512);
  EXPECT_LT(file->allocated_size(), allocated_before);
  std::fill(model_.begin() + 65536, model_.begin() + 65536 + 524288, 0);
  EXPECT_EQ(on_disk_all(), model_);
}

TEST_P(FileTest, WriteZeroes) {
  create(1 << 20);
  auto file = node({.discard = "unmap"});
  EXPECT_TRUE(file->supports_write_zeroes());
  // Plain: zeroes, unaligned edges included.
  EXPECT_EQ(run(*loop_, file->write_zeroes(1000, 70000, 0)), 0);
  std::fill(model_.begin() + 1000, model_.begin() + 71000, 0);
  EXPECT_EQ(on_disk_all(), model_);
  // May unmap: the range is deallocated.
  const int64_t before = blocks();
  EXPECT_EQ(run(*loop_, file->write_zeroes(262144, 262144, block::kRequestMayUnmap)), 0);
  EXPECT_LE(blocks(), before - 262144 / 512);
  std::fill(model_.begin() + 262144, model_.begin() + 524288, 0);
  // No fallback and FUA: ext4 zeroes natively.
  EXPECT_EQ(
      run(*loop_, file->write_zeroes(600000, 5000, block::kRequestNoFallback | block::kRequestFua)),
      0);
  std::fill(model_.begin() + 600000, model_.begin() + 605000, 0);
  EXPECT_EQ(on_disk_all(), model_);

  // Without discard=unmap, may-unmap is ignored: the range stays allocated.
  auto keeping = node({.node_name = "keep"});
  const int64_t kept = blocks();
  EXPECT_EQ(run(*loop_, keeping->write_zeroes(786432, 65536, block::kRequestMayUnmap)), 0);
  EXPECT_GE(blocks(), kept);
  std::fill(model_.begin() + 786432, model_.begin() + 786432 + 65536, 0);
  EXPECT_EQ(on_disk_all(), model_);
}

TEST_P(FileTest, BlockStatusOverASparseFile) {
  // The layout qemu-img map reports for this file: hole, data, hole.
  create(1 << 20, /*fill=*/false);
  std::vector<char> data(16384, 'd');
  int fd = open(path_.c_str(), O_WRONLY);
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), 65536), 16384);
  ASSERT_EQ(fsync(fd), 0);
  close(fd);
  auto file = node();
  const uint32_t kZero = block::kStatusZero | block::kStatusAllocated;
  const uint32_t kData = block::kStatusData | block::kStatusAllocated;
  auto status = run(*loop_, file->block_status(0, 1 << 20));
  EXPECT_EQ(status.bytes, 65536);
  EXPECT_EQ(status.flags, kZero);
  status = run(*loop_, file->block_status(65536, 1 << 20));
  EXPECT_EQ(status.bytes, 16384);
  EXPECT_EQ(status.flags, kData);
  status = run(*loop_, file->block_status(70000, 100));
  EXPECT_EQ(status.bytes, 100);
  EXPECT_EQ(status.flags, kData);
  status = run(*loop_, file->block_status(81920, 1 << 20));
  EXPECT_EQ(status.bytes, (1 << 20) - 81920);
  EXPECT_EQ(status.flags, kZero);
  status = run(*loop_, file->block_status(1000, 4096));
  EXPECT_EQ(status.bytes, 4096);
  EXPECT_EQ(status.flags, kZero);
}

TEST_P(FileTest, BlockStatusSeesHolesPunchedAfterAQuery) {
  // The node remembers the last data extent it found; punching a hole must not leave it stale.
  create(1 << 20);
  auto file = node({.discard = "unmap"});
  const uint32_t kZero = block::kStatusZero | block::kStatusAllocated;
  const uint32_t kData = block::kStatusData | block::kStatusAllocated;
  auto status = run(*loop_, file->block_status(0, 4096));
  EXPECT_EQ(status.bytes, 4096);
  EXPECT_EQ(status.flags, kData);
  // Answered from the remembered extent: the rest of the fully written file is data.
  status = run(*loop_, file->block_status(4096, 1 << 20));
  EXPECT_EQ(status.bytes, (1 << 20) - 4096);
  EXPECT_EQ(status.flags, kData);
  ASSERT_EQ(run(*loop_, file->discard(65536, 65536)), 0);
  status = run(*loop_, file->block_status(65536, 4096));
  EXPECT_EQ(status.flags, kZero);
  status = run(*loop_, file->block_status(0, 1 << 20));
  EXPECT_EQ(status.bytes, 65536);
  EXPECT_EQ(status.flags, kData);
}

// ---- Image locks.

TEST_P(FileTest, TwoNodesOnOneImageConflictAsInQemu) {
  create(1 << 20);
  auto first = node({.node_name = "a"});
  auto second = node({.node_name = "b"});
  block::BlockBackend writer("block export 'a'");
  ASSERT_TRUE(writer.attach(first, kReadWrite, block::kPermAll & ~block::kPermWrite));

  block::BlockBackend other_writer("block export 'b'");
  Status status = other_writer.attach(second, kReadWrite, block::kPermAll);
  ASSERT_FALSE(status);
  EXPECT_EQ(status.message(), "Failed to get \"write\" lock");

  block::BlockBackend exclusive_reader("block export 'c'");
  status = exclusive_reader.attach(second, block::kPermConsistentRead,
                                   block::kPermAll & ~block::kPermWrite);
  ASSERT_FALSE(status);
  EXPECT_EQ(status.message(), "Failed to get shared \"write\" lock");

  // A reader that shares write is fine.
  block::BlockBackend reader("block export 'd'");
  EXPECT_TRUE(reader.attach(second, block::kPermConsistentRead, block::kPermAll));
  reader.detach();

  // Releasing the first node's permissions releases its locks.
  writer.detach();
  EXPECT_TRUE(other_writer.attach(second, kReadWrite, block::kPermAll & ~block::kPermWrite));
  status = writer.attach(first, kReadWrite, block::kPermAll);
  ASSERT_FALSE(status);
  EXPECT_EQ(status.message(), "Failed to get \"write\" lock");
  EXPECT_EQ(file_lock_hint(path_), "Is another process using the image [" + path_ + "]?");
}

TEST_P(FileTest, LocksUseQemuByteOffsets) {
  create(4096);
  auto file = node();
  block::BlockBackend user("block export 'a'");
  ASSERT_TRUE(user.attach(file, kReadWrite | block::kPermResize,
                          block::kPermAll & ~(block::kPermWrite | block::kPermResize)));
  // Probe each byte from another open file description.
  int fd = open(path_.c_str(), O_RDONLY);
  auto locked = [&](off_t byte) {
    struct flock lock {};
    lock.l_whence = SEEK_SET;
    lock.l_start = byte;
    lock.l_len = 1;
    lock.l_type = F_WRLCK;
    EXPECT_EQ(fcntl(fd, F_OFD_GETLK, &lock), 0);
    return lock.l_type != F_UNLCK;
  };
  EXPECT_TRUE(locked(100));   // consistent read held
  EXPECT_TRUE(locked(101));   // write held
  EXPECT_FALSE(locked(102));  // write unchanged not held
  EXPECT_TRUE(locked(103));   // resize held
  EXPECT_FALSE(locked(200));
  EXPECT_TRUE(locked(201));  // write not shared
  EXPECT_FALSE(locked(202));
  EXPECT_TRUE(locked(203));  // resize not shared
  EXPECT_FALSE(locked(0));
  user.detach();
  for (off_t byte : {100, 101, 103, 201, 203}) EXPECT_FALSE(locked(byte)) << byte;
  close(fd);
}

TEST_P(FileTest, LockingOffTakesNoLocks) {
  create(4096);
  auto first = node({.node_name = "a"}, {.locking = FileOptions::Locking::kOff});
  auto second = node({.node_name = "b"});
  block::BlockBackend writer("block export 'a'");
  ASSERT_TRUE(writer.attach(first, kReadWrite, block::kPermConsistentRead));
  block::BlockBackend other("block export 'b'");
  EXPECT_TRUE(other.attach(second, kReadWrite, block::kPermConsistentRead));
  // ...and does not look at others' locks either.
  block::BlockBackend third("block export 'c'");
  auto unlocked = node({.node_name = "c"}, {.locking = FileOptions::Locking::kOff});
  EXPECT_TRUE(third.attach(unlocked, kReadWrite, block::kPermConsistentRead));
}

// qemu-io in interactive mode, holding the image open until destroyed.
class QemuIo {
 public:
  explicit QemuIo(const std::string& image) {
    int to_child[2];
    int from_child[2];
    if (pipe(to_child) != 0 || pipe(from_child) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(to_child[0], 0);
      dup2(from_child[1], 1);
      dup2(from_child[1], 2);
      close(to_child[1]);
      close(from_child[0]);
      execlp("qemu-io", "qemu-io", "-f", "raw", image.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    close(to_child[0]);
    close(from_child[1]);
    input_ = to_child[1];
    output_ = from_child[0];
  }
  ~QemuIo() {
    if (input_ >= 0) close(input_);  // end of input: qemu-io exits
    if (pid_ > 0) waitpid(pid_, nullptr, 0);
    if (output_ >= 0) close(output_);
  }
  // Sends one command and reads until its reply (containing `until`) has arrived: once it has,
  // qemu-io has the image open and locked.
  std::string command(const std::string& line, const std::string& until) {
    std::string text = line + "\n";
    if (write(input_, text.data(), text.size()) != static_cast<ssize_t>(text.size())) return "";
    std::string reply;
    char chunk[256];
    while (reply.find(until) == std::string::npos) {
      const ssize_t got = read(output_, chunk, sizeof chunk);
      if (got <= 0) break;
      reply.append(chunk, got);
    }
    return reply;
  }

 private:
  pid_t pid_ = -1;
  int input_ = -1;
  int output_ = -1;
};

TEST_P(FileTest, LocksAgainstQemuIo) {
  if (!have_program("qemu-io")) GTEST_SKIP() << "qemu-io is not installed (Debian: qemu-utils)";
  create(1 << 20);
  {
    // qemu-io -f raw (read-write) holds "consistent read" and "write" and shares everything.
    QemuIo qemu_io(path_);
    ASSERT_THAT(qemu_io.command("read 0 512", "bytes at offset 0"), HasSubstr("read 512/512"));
    auto file = node();
    block::BlockBackend exclusive("block export 'a'");
    Status status =
        exclusive.attach(file, block::kPermConsistentRead, block::kPermAll & ~block::kPermWrite);
    ASSERT_FALSE(status);
    EXPECT_EQ(status.message(), "Failed to get shared \"write\" lock");
    block::BlockBackend sharing("block export 'b'");
    EXPECT_TRUE(sharing.attach(file, kReadWrite, block::kPermAll));
  }
  // The other way round: while blockd holds write without sharing it, qemu-io cannot open the
  // image read-write, and says so in QEMU's words.
  auto file = node();
  block::BlockBackend writer("block export 'a'");
  ASSERT_TRUE(writer.attach(file, kReadWrite, block::kPermAll & ~block::kPermWrite));
  auto [code, output] = shell("qemu-io -f raw -c 'read 0 512' " + path_);
  EXPECT_NE(code, 0);
  EXPECT_THAT(output,
              HasSubstr("Failed to get \"write\" lock\nIs another process using the image [" +
                        path_ + "]?"));
  // Read-only with force-share (-U) is always allowed.
  std::tie(code, output) = shell("qemu-io -r -U -f raw -c 'read 0 512' " + path_);
  EXPECT_EQ(code, 0) << output;
  writer.detach();
  std::tie(code, output) = shell("qemu-io -f raw -c 'write -P 0x55 0 512' " + path_);
  EXPECT_EQ(code, 0) << output;
  EXPECT_EQ(on_disk(0, 512), std::vector<char>(512, 0x55));
}

// A file on tmpfs is read and written with plain system calls on the loop (io_uring would hand
// each request to a kernel worker); requests above 1 MiB still go through io_uring.
TEST(FileInMemoryTest, RandomIoSmallAndLargeRequests) {
  struct statfs fs {};
  if (statfs("/dev/shm", &fs) != 0 || static_cast<unsigned long>(fs.f_type) != TMPFS_MAGIC) {
    GTEST_SKIP() << "/dev/shm is not a tmpfs here";
  }
  testing::TempDir dir("/dev/shm");
  const std::string path = dir.file("img");
  std::vector<char> model(8 << 20);
  for (size_t i = 0; i < model.size(); ++i) model[i] = static_cast<char>(i % 253);
  {
    int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_RDWR, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, model.data(), model.size(), 0), static_cast<ssize_t>(model.size()));
    close(fd);
  }
  auto loop = testing::make_loop();
  block::NodeOptions common;
  common.node_name = "shm0";
  FileOptions options;
  options.filename = path;
  auto opened = open_file_node(common, options, *loop);
  ASSERT_TRUE(opened.has_value()) << opened.status().message();
  block::Node& file = **opened;
  random_io(*loop, file, model, 7);
  std::vector<char> large(3 << 20);
  for (size_t i = 0; i < large.size(); ++i) large[i] = static_cast<char>(i * 13);
  EXPECT_EQ(run(*loop, file.write(1 << 20, large.size(), large.data(), block::kRequestFua)), 0);
  std::memcpy(model.data() + (1 << 20), large.data(), large.size());
  std::vector<char> back(model.size());
  EXPECT_EQ(run(*loop, file.read(0, back.size(), back.data(), 0)), 0);
  EXPECT_EQ(back, model);
  EXPECT_EQ(run(*loop, file.flush()), 0);
  int fd = open(path.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  std::vector<char> on_disk(model.size());
  EXPECT_EQ(pread(fd, on_disk.data(), on_disk.size(), 0), static_cast<ssize_t>(on_disk.size()));
  close(fd);
  EXPECT_EQ(on_disk, model);
}

INSTANTIATE_TEST_SUITE_P(Aio, FileTest,
                         ::testing::Values(FileOptions::Aio::kIoUring, FileOptions::Aio::kThreads),
                         [](const auto& info) { return aio_name(info.param); });

}  // namespace
}  // namespace blockd::drivers
