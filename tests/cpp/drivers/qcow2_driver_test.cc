// qcow2 driver tests against qemu-img and qemu-io: images they made read correctly, images we
// wrote pass `qemu-img check` and read back the same through qemu-io.
#include "drivers/qcow2/qcow2.h"

#include <gtest/gtest.h>
#include <linux/magic.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "block/backend.h"
#include "drivers/blkdebug.h"
#include "drivers/file.h"
#include "drivers/raw.h"
#include "test_support.h"

namespace blockd::drivers {
namespace {

using testing::run;

int sh(const std::string& command) { return std::system((command + " >/dev/null 2>&1").c_str()); }

std::string output_of(const std::string& command) {
  std::string out;
  FILE* pipe = popen(command.c_str(), "r");
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof buffer, pipe)) > 0) out.append(buffer, n);
  pclose(pipe);
  return out;
}

class Qcow2DriverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (sh("qemu-img --version") != 0) GTEST_SKIP() << "no qemu-img";
    path_ = dir_.file("a.qcow2");
  }

  Expected<std::shared_ptr<block::Node>> open(const std::string& path, bool read_only = false,
                                              Qcow2Options options = {}) {
    FileOptions file_options;
    file_options.filename = path;
    auto file = open_file_node(block::NodeOptions{.node_name = "f" + std::to_string(next_++),
                                                  .read_only = read_only},
                               file_options, *loop_);
    if (!file) return file.status();
    OpenBackingFile opener = [&](const std::string& name, const std::string& format)
        -> Expected<std::shared_ptr<block::Node>> {
      auto backing = open(name, true);  // a qcow2 or, failing that, raw
      if (backing || format == "qcow2") return backing;
      FileOptions raw_file;
      raw_file.filename = name;
      auto f = open_file_node(block::NodeOptions{.node_name = "b" + std::to_string(next_++),
                                                 .read_only = true},
                              raw_file, *loop_);
      if (!f) return f.status();
      return open_raw_node(block::NodeOptions{.node_name = "r" + std::to_string(next_++),
                                              .read_only = true},
                           {}, *f, *loop_);
    };
    return open_qcow2_node(
        block::NodeOptions{.node_name = "q" + std::to_string(next_++), .read_only = read_only},
        options, *file, opener, *loop_,
        [&](Task<Status> task) { return run(*loop_, std::move(task)); });
  }

  std::vector<uint8_t> read(block::Node& node, uint64_t offset, uint64_t length) {
    std::vector<uint8_t> out(length, 0xaa);
    EXPECT_EQ(run(*loop_, node.read(offset, length, out.data(), 0)), static_cast<int64_t>(length));
    return out;
  }

  void write(block::Node& node, uint64_t offset, const std::vector<uint8_t>& data) {
    ASSERT_EQ(run(*loop_, node.write(offset, data.size(), data.data(), 0)),
              static_cast<int64_t>(data.size()));
  }

  // `qemu-img check` output, or "" when the image is clean.
  std::string check(const std::string& path) {
    std::string out = output_of("qemu-img check -U " + path + " 2>&1");
    if (out.find("No errors were found") != std::string::npos) return "";
    return out;
  }

  // `qemu-img compare` of the image at path_ with `reference` as a raw file ("" when equal).
  std::string compare_with(const std::vector<uint8_t>& reference) {
    const std::string raw = dir_.file("ref.raw");
    FILE* f = std::fopen(raw.c_str(), "wb");
    std::fwrite(reference.data(), 1, reference.size(), f);
    std::fclose(f);
    return output_of("qemu-img compare -U -f raw -F qcow2 " + raw + " " + path_ +
                     " >/dev/null 2>&1 || echo differ");
  }

  std::unique_ptr<Loop> loop_ = testing::make_loop();
  testing::TempDir dir_;
  std::string path_;
  int next_ = 0;
};

std::vector<uint8_t> pattern(size_t length, uint8_t seed) {
  std::vector<uint8_t> out(length);
  for (size_t i = 0; i < length; ++i) out[i] = static_cast<uint8_t>(seed + i * 7 + i / 4096);
  return out;
}

TEST_F(Qcow2DriverTest, ReadsWhatQemuIoWrote) {
  ASSERT_EQ(sh("qemu-img create -f qcow2 " + path_ + " 4M"), 0);
  ASSERT_EQ(sh("qemu-io -c 'write -P 0x5a 64k 128k' -c 'write -z 512k 64k' " + path_), 0);
  auto node = open(path_, true);
  ASSERT_TRUE(node.has_value()) << node.status().message();
  EXPECT_EQ((*node)->size(), 4 << 20);
  auto data = read(**node, 0, 1 << 20);
  for (size_t i = 0; i < data.size(); ++i) {
    const uint8_t want = (i >= (64 << 10) && i < (192 << 10)) ? 0x5a : 0;
    ASSERT_EQ(data[i], want) << i;
  }
  auto status = run(*loop_, (*node)->block_status(64 << 10, 1 << 20));
  EXPECT_EQ(status.bytes, 128 << 10);
  EXPECT_EQ(status.flags, block::kStatusData | block::kStatusAllocated);
  status = run(*loop_, (*node)->block_status(0, 64 << 10));
  EXPECT_EQ(status.flags, block::kStatusZero);
}

TEST_F(Qcow2DriverTest, ReadsCompressedClusters) {
  const std::string raw = dir_.file("src.raw");
  ASSERT_EQ(sh("qemu-img create -f raw " + raw + " 1M"), 0);
  ASSERT_EQ(sh("qemu-io -f raw -c 'write -P 0x11 0 300k' -c 'write -P 0x22 700k 5k' " + raw), 0);
  ASSERT_EQ(sh("qemu-img convert -c -O qcow2 -o cluster_size=4k " + raw + " " + path_), 0);
  auto node = open(path_, true);
  ASSERT_TRUE(node.has_value()) << node.status().message();
  auto data = read(**node, 0, 1 << 20);
  for (size_t i = 0; i < data.size(); ++i) {
    uint8_t want = i < 300 * 1024 ? 0x11 : (i >= 700 * 1024 && i < 705 * 1024) ? 0x22 : 0;
    ASSERT_EQ(data[i], want) << i;
  }
}

TEST_F(Qcow2DriverTest, BackingChainReadsThrough) {
  const std::string base = dir_.file("base.qcow2");
  ASSERT_EQ(sh("qemu-img create -f qcow2 " + base + " 2M"), 0);
  ASSERT_EQ(sh("qemu-io -c 'write -P 0x33 0 1M' " + base), 0);
  ASSERT_EQ(sh("qemu-img create -f qcow2 -b base.qcow2 -F qcow2 " + path_), 0);
  ASSERT_EQ(sh("qemu-io -c 'write -P 0x44 512k 64k' " + path_), 0);
  auto node = open(path_, false);
  ASSERT_TRUE(node.has_value()) << node.status().message();
  auto data = read(**node, 0, 2 << 20);
  for (size_t i = 0; i < data.size(); ++i) {
    uint8_t want = i >= (512 << 10) && i < (576 << 10) ? 0x44 : i < (1 << 20) ? 0x33 : 0;
    ASSERT_EQ(data[i], want) << i;
  }
  auto status = run(*loop_, (*node)->block_status(0, 1 << 20));
  EXPECT_EQ(status.flags & block::kStatusAllocated, 0u);
  EXPECT_EQ(status.flags & block::kStatusData, block::kStatusData);
  // A partial write copies the rest of the cluster from the backing file.
  write(**node, 4096, std::vector<uint8_t>(100, 0x55));
  ASSERT_EQ(run(*loop_, (*node)->flush()), 0);
  node->reset();
  EXPECT_EQ(check(path_), "");
  EXPECT_EQ(sh("qemu-io -c 'read -P 0x33 0 4096' -c 'read -P 0x55 4096 100' "
               "-c 'read -P 0x33 4196 60k' " + path_),
            0);
}

TEST_F(Qcow2DriverTest, RandomWorkloadMatchesRawReference) {
  for (int bits : {9, 12, 16}) {
    for (int refcount_bits : {1, 16}) {
      SCOPED_TRACE("cluster bits " + std::to_string(bits) + ", refcount bits " +
                   std::to_string(refcount_bits));
      ASSERT_EQ(sh("qemu-img create -f qcow2 -o cluster_size=" + std::to_string(1 << bits) +
                   ",refcount_bits=" + std::to_string(refcount_bits) + " " + path_ + " 8M"),
                0);
      Qcow2Options options;
      options.l2_cache_size = 2 << bits;  // a tiny cache: eviction and reloads happen
      options.refcount_cache_size = 2 << bits;
      auto node = open(path_, false, options);
      ASSERT_TRUE(node.has_value()) << node.status().message();
      std::vector<uint8_t> reference(8 << 20, 0);
      std::mt19937_64 random(bits * 100 + refcount_bits);
      for (int op = 0; op < 120; ++op) {
        const uint64_t offset = random() % (8 << 20);
        const uint64_t length = std::min<uint64_t>(1 + random() % (200 << 10), (8 << 20) - offset);
        const int kind = random() % 10;
        if (kind < 7) {
          auto data = pattern(length, static_cast<uint8_t>(op));
          write(**node, offset, data);
          std::copy(data.begin(), data.end(), reference.begin() + offset);
        } else if (kind < 9) {
          ASSERT_EQ(run(*loop_, (*node)->write_zeroes(offset, length, 0)),
                    static_cast<int64_t>(length));
          std::fill_n(reference.begin() + offset, length, 0);
        } else {
          ASSERT_EQ(run(*loop_, (*node)->flush()), 0);
        }
      }
      auto data = read(**node, 0, 8 << 20);
      ASSERT_TRUE(data == reference);
      ASSERT_EQ(run(*loop_, (*node)->flush()), 0);
      node->reset();
      EXPECT_EQ(check(path_), "");
      // qemu-img sees the same bytes.
      EXPECT_EQ(compare_with(reference), "");
    }
  }
}

TEST_F(Qcow2DriverTest, CorruptImagesGiveClearErrors) {
  ASSERT_EQ(sh("qemu-img create -f qcow2 " + path_ + " 4M"), 0);
  ASSERT_EQ(sh("truncate -s 1000 " + path_), 0);
  auto node = open(path_, true);
  ASSERT_FALSE(node.has_value());
  EXPECT_NE(node.status().message().find("outside the image file"), std::string::npos)
      << node.status().message();
  // An unknown incompatible feature bit.
  ASSERT_EQ(sh("qemu-img create -f qcow2 " + path_ + " 4M"), 0);
  ASSERT_EQ(sh("printf '\\200' | dd of=" + path_ + " bs=1 seek=72 conv=notrunc"), 0);
  node = open(path_, true);
  ASSERT_FALSE(node.has_value());
  EXPECT_EQ(node.status().message(),
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000");
  // The corrupt bit: opens read-only.
  ASSERT_EQ(sh("qemu-img create -f qcow2 " + path_ + " 4M"), 0);
  ASSERT_EQ(sh("printf '\\002' | dd of=" + path_ + " bs=1 seek=79 conv=notrunc"), 0);
  node = open(path_, false);
  ASSERT_TRUE(node.has_value()) << node.status().message();
  EXPECT_TRUE((*node)->read_only());
  EXPECT_NE(qcow2_snapshots(**node)->read_only_reason().find("corrupt"), std::string::npos);
}

TEST_F(Qcow2DriverTest, SnapshotsAgreeWithQemuImg) {
  ASSERT_EQ(sh("qemu-img create -f qcow2 " + path_ + " 4M"), 0);
  auto node = open(path_, false);
  ASSERT_TRUE(node.has_value()) << node.status().message();
  auto* snapshots = qcow2_snapshots(**node);
  write(**node, 0, std::vector<uint8_t>(100000, 0x61));
  ASSERT_EQ(run(*loop_, snapshots->create_snapshot("one")), 0);
  write(**node, 50000, std::vector<uint8_t>(100000, 0x62));
  ASSERT_EQ(run(*loop_, snapshots->create_snapshot("two")), 0);
  EXPECT_EQ(run(*loop_, snapshots->create_snapshot("two")), -EEXIST);
  write(**node, 0, std::vector<uint8_t>(10, 0x63));
  ASSERT_EQ(run(*loop_, (*node)->flush()), 0);
  ASSERT_EQ(snapshots->snapshots().size(), 2u);
  EXPECT_EQ(snapshots->snapshots()[1].id, "2");
  EXPECT_EQ(check(path_), "");
  std::string list = output_of("qemu-img snapshot -U -l " + path_);
  EXPECT_NE(list.find("one"), std::string::npos) << list;
  EXPECT_NE(list.find("two"), std::string::npos) << list;
  // Revert to "one" and check the data.
  ASSERT_EQ(run(*loop_, snapshots->revert_snapshot(0)), 0);
  auto data = read(**node, 0, 200000);
  for (size_t i = 0; i < data.size(); ++i) ASSERT_EQ(data[i], i < 100000 ? 0x61 : 0) << i;
  EXPECT_EQ(check(path_), "");
  ASSERT_EQ(run(*loop_, snapshots->delete_snapshot(0)), 0);
  EXPECT_EQ(check(path_), "");
  ASSERT_EQ(run(*loop_, snapshots->delete_snapshot(0)), 0);
  write(**node, 0, std::vector<uint8_t>(10, 0x64));
  ASSERT_EQ(run(*loop_, (*node)->flush()), 0);
  node->reset();
  EXPECT_EQ(check(path_), "");
  EXPECT_EQ(sh("qemu-io -c 'read -P 0x64 0 10' -c 'read -P 0x61 10 99990' " + path_), 0);
}

// Found by qcow2_image_fuzz: an active L1 entry pointing past the end of the file made snapshot
// deletion index past its refcount array; it must fail with EIO like a read through that entry.
TEST_F(Qcow2DriverTest, SnapshotsOfImageWithL1EntryOutsideTheFileFail) {
  ASSERT_EQ(sh("qemu-img create -f qcow2 " + path_ + " 4M"), 0);
  ASSERT_EQ(sh("qemu-img snapshot -c s0 " + path_), 0);
  // qemu-img puts the one-entry L1 table of a 4 MiB image in cluster 3 (offset 0x30000).
  ASSERT_EQ(sh("printf '\\000\\040\\000\\000\\000\\000\\000\\000' | dd of=" + path_ +
               " bs=1 seek=196608 conv=notrunc"),
            0);
  auto node = open(path_, false);
  ASSERT_TRUE(node.has_value()) << node.status().message();
  std::vector<uint8_t> buffer(4096);
  EXPECT_EQ(run(*loop_, (*node)->read(0, buffer.size(), buffer.data(), 0)), -EIO);
  EXPECT_EQ(run(*loop_, qcow2_snapshots(**node)->create_snapshot("s")), -EIO);
  EXPECT_EQ(run(*loop_, qcow2_snapshots(**node)->delete_snapshot(0)), -EIO);
  EXPECT_EQ(qcow2_snapshots(**node)->snapshots().size(), 1u);
}

// An image left dirty by a writer with lazy refcounts (qemu-io killed) opens read-only as it
// is, and read-write after blockd recounted its refcounts: then qemu-img check finds it clean.
TEST_F(Qcow2DriverTest, DirtyImageIsRepairedOnReadWriteOpen) {
  ASSERT_EQ(sh("qemu-img create -f qcow2 -o lazy_refcounts=on " + path_ + " 4M"), 0);
  ASSERT_EQ(sh("qemu-img snapshot -c before " + path_), 0);
  sh("qemu-io -c 'write -P 0x5a 0 300k' -c 'write -P 0x5b 1M 64k' -c 'sigraise 9' " + path_);
  ASSERT_NE(check(path_), "");  // refcounts were never written
  {
    auto node = open(path_, true);
    ASSERT_TRUE(node.has_value()) << node.status().message();
    EXPECT_NE(qcow2_snapshots(**node)->header().incompatible_features & qcow2::kIncompatDirty, 0u);
  }
  auto node = open(path_, false);
  ASSERT_TRUE(node.has_value()) << node.status().message();
  EXPECT_EQ(qcow2_snapshots(**node)->header().incompatible_features & qcow2::kIncompatDirty, 0u);
  node->reset();
  EXPECT_EQ(check(path_), "");
  EXPECT_EQ(sh("qemu-io -c 'read -P 0x5a 0 300k' -c 'read -P 0x5b 1M 64k' " + path_), 0);
}

// A crash during a snapshot operation leaves the writes issued before it on disk. Every such
// prefix is simulated by failing the k-th write to the file (blkdebug), for every k until the
// operation no longer reaches a failing write: each time the image must pass `qemu-img check`
// with neither errors nor leaks and hold either the old or the new state, whole.
TEST_F(Qcow2DriverTest, SnapshotOperationsSurviveACrashAtEveryWrite) {
  const std::string base = dir_.file("base.qcow2");
  ASSERT_EQ(sh("qemu-img create -f qcow2 -o cluster_size=4k " + base + " 1M"), 0);
  ASSERT_EQ(sh("qemu-io -c 'write -P 1 0 64k' -c 'write -P 1 512k 8k' " + base), 0);
  ASSERT_EQ(sh("qemu-img snapshot -c one " + base), 0);
  ASSERT_EQ(sh("qemu-io -c 'write -P 2 32k 64k' " + base), 0);
  // Fails the k-th write that reaches the file (k >= 1), through blkdebug's state machine: each
  // write_aio event counts one up; the rule fires on the pwritev event of write k only.
  auto open_failing = [&](int k) -> Expected<std::shared_ptr<block::Node>> {
    FileOptions file_options;
    file_options.filename = path_;
    auto file = open_file_node(block::NodeOptions{.node_name = "f" + std::to_string(next_++)},
                               file_options, *loop_);
    if (!file) return file.status();
    BlkdebugOptions rules;
    for (int state = 1; state <= k; ++state) rules.set_state.push_back({"write_aio", state, state + 1});
    rules.inject_error.push_back(
        {.event = "pwritev", .state = k + 1, .iotype = BlkdebugIoType::kWrite, .once = true});
    auto debug = open_blkdebug_node(block::NodeOptions{.node_name = "d" + std::to_string(next_++)},
                                    rules, *file, *loop_);
    if (!debug) return debug.status();
    return open_qcow2_node(block::NodeOptions{.node_name = "q" + std::to_string(next_++)}, {},
                           *debug, {}, *loop_,
                           [&](Task<Status> task) { return run(*loop_, std::move(task)); });
  };
  struct Case {
    const char* what;
    std::function<Task<int>(Qcow2Snapshots&)> op;
    const char* before;  // qemu-io checks of the old state, then of the new one
    const char* after;
  };
  const std::vector<Case> cases = {
      {"create", [](Qcow2Snapshots& s) { return s.create_snapshot("two"); },
       "-c 'read -P 2 32k 64k'", "-c 'read -P 2 32k 64k'"},
      {"delete", [](Qcow2Snapshots& s) { return s.delete_snapshot(0); },
       "-c 'read -P 2 32k 64k'", "-c 'read -P 2 32k 64k'"},
      {"revert", [](Qcow2Snapshots& s) { return s.revert_snapshot(0); },
       "-c 'read -P 2 32k 64k'", "-c 'read -P 1 0 64k' -c 'read -P 0 64k 32k'"},
  };
  for (const Case& c : cases) {
    int failed = 0;
    for (int k = 1;; ++k) {
      ASSERT_LT(k, 200) << c.what << " never completed";
      ASSERT_EQ(sh("cp " + base + " " + path_), 0);
      auto node = open_failing(k);
      ASSERT_TRUE(node.has_value()) << node.status().message();
      const int r = run(*loop_, c.op(*qcow2_snapshots(**node)));
      node->reset();
      EXPECT_EQ(check(path_), "") << c.what << ", write " << k << " failed";
      const std::string snapshots = output_of("qemu-img snapshot -U -l " + path_);
      if (r == 0) {
        EXPECT_EQ(sh(std::string("qemu-io -r ") + c.after + " " + path_), 0) << c.what;
        EXPECT_EQ(snapshots.find("two") != std::string::npos, std::string(c.what) == "create");
        EXPECT_EQ(snapshots.find("one") == std::string::npos, std::string(c.what) == "delete");
        break;
      }
      ++failed;
      EXPECT_EQ(r, -EIO) << c.what << ", write " << k;
      EXPECT_EQ(sh(std::string("qemu-io -r ") + c.before + " " + path_), 0)
          << c.what << ", write " << k;
      EXPECT_EQ(snapshots.find("two"), std::string::npos) << snapshots;
      EXPECT_NE(snapshots.find("one"), std::string::npos) << snapshots;
    }
    EXPECT_GE(failed, 4) << c.what << ": the operation wrote too little to test";
  }
}

// Many requests in flight on one node: writers fill disjoint sectors of the same (initially
// unallocated, then shared after a snapshot) clusters while readers run, so allocations and
// copy-on-write of one cluster race. Every sector must end up with its writer's data.
TEST_F(Qcow2DriverTest, ConcurrentRequestsOnSharedClusters) {
  ASSERT_EQ(sh("qemu-img create -f qcow2 -o cluster_size=4k " + path_ + " 1M"), 0);
  Qcow2Options options;
  options.l2_cache_size = 8192;
  auto node = open(path_, false, options);
  ASSERT_TRUE(node.has_value()) << node.status().message();
  block::Node& disk = **node;
  constexpr int kSectors = 256;  // 128 KiB: 32 clusters, 8 writers per cluster
  for (int round = 0; round < 2; ++round) {
    int finished = 0;
    std::vector<std::vector<uint8_t>> buffers;
    for (int i = 0; i < kSectors; ++i) buffers.emplace_back(512, static_cast<uint8_t>(i + round));
    std::vector<std::vector<uint8_t>> reads(kSectors, std::vector<uint8_t>(4096));
    for (int i = 0; i < kSectors; ++i) {
      // Interleave the sectors so that neighbours in a cluster are in flight together.
      const int sector = (i * 37) % kSectors;
      loop_->spawn([](block::Node& n, int s, const uint8_t* data, int& done) -> Task<void> {
        EXPECT_EQ(co_await n.write(uint64_t(s) * 512, 512, data, 0), 512);
        ++done;
      }(disk, sector, buffers[sector].data(), finished));
      loop_->spawn([](block::Node& n, int s, uint8_t* out, int& done) -> Task<void> {
        EXPECT_EQ(co_await n.read(uint64_t(s / 8) * 4096, 4096, out, 0), 4096);
        ++done;
      }(disk, sector, reads[i].data(), finished));
    }
    loop_->run_until([&] { return finished == 2 * kSectors; });
    auto data = read(disk, 0, kSectors * 512);
    for (int i = 0; i < kSectors * 512; ++i) {
      ASSERT_EQ(data[i], static_cast<uint8_t>(i / 512 + round)) << "round " << round << " byte " << i;
    }
    // Round two writes into clusters a snapshot shares.
    if (round == 0) {
      ASSERT_EQ(run(*loop_, qcow2_snapshots(disk)->create_snapshot("mid")), 0);
    }
  }
  ASSERT_EQ(run(*loop_, disk.flush()), 0);
  node->reset();
  EXPECT_EQ(check(path_), "");
  EXPECT_EQ(sh("qemu-io -c 'read -P 1 0 512' -c 'read -P 2 512 512' " + path_), 0);
}

// Allocating writes run concurrently: many requests of every size (partial clusters, runs of
// clusters, crossing L2 tables) on disjoint ranges in flight at once, mixed with write-zeroes,
// discards and flushes, on an image with a backing file and, from the second round on, a
// snapshot sharing its clusters. With a tiny cache, tables are evicted while allocations are in
// flight. The result must equal a reference and the image must check clean.
TEST_F(Qcow2DriverTest, ConcurrentAllocationsMatchReference) {
  constexpr uint64_t kSize = 4 << 20;
  const std::string base = dir_.file("base.raw");
  ASSERT_EQ(sh("qemu-img create -f raw " + base + " 3M"), 0);
  ASSERT_EQ(sh("qemu-io -f raw -c 'write -P 0x37 0 3M' " + base), 0);
  ASSERT_EQ(sh("qemu-img create -f qcow2 -o cluster_size=4k -b base.raw -F raw " + path_ +
               " 4M"),
            0);
  Qcow2Options options;
  options.l2_cache_size = 3 * 4096;  // 512 clusters per table: several tables, evicted
  options.refcount_cache_size = 2 * 4096;
  auto node = open(path_, false, options);
  ASSERT_TRUE(node.has_value()) << node.status().message();
  block::Node& disk = **node;
  std::vector<uint8_t> reference(kSize, 0);
  std::fill_n(reference.begin(), 3 << 20, 0x37);
  std::mt19937_64 random(7);
  for (int round = 0; round < 6; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    // Disjoint ranges from sorted random cut points.
    std::vector<uint64_t> cuts = {0, kSize};
    for (int i = 0; i < 60; ++i) cuts.push_back(random() % kSize);
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
    int started = 0;
    int finished = 0;
    std::vector<std::vector<uint8_t>> buffers;
    buffers.reserve(cuts.size());
    for (size_t i = 0; i + 1 < cuts.size(); ++i) {
      const uint64_t offset = cuts[i];
      const uint64_t length = cuts[i + 1] - cuts[i];
      const int kind = random() % 10;
      ++started;
      if (kind < 7) {
        buffers.push_back(pattern(length, static_cast<uint8_t>(round * 31 + i)));
        std::copy(buffers.back().begin(), buffers.back().end(), reference.begin() + offset);
        loop_->spawn([](block::Node& n, uint64_t o, uint64_t l, const uint8_t* d,
                        int& done) -> Task<void> {
          EXPECT_EQ(co_await n.write(o, l, d, 0), static_cast<int64_t>(l));
          ++done;
        }(disk, offset, length, buffers.back().data(), finished));
      } else if (kind < 9) {
        std::fill_n(reference.begin() + offset, length, 0);
        loop_->spawn([](block::Node& n, uint64_t o, uint64_t l, uint32_t flags,
                        int& done) -> Task<void> {
          EXPECT_EQ(co_await n.write_zeroes(o, l, flags), static_cast<int64_t>(l));
          ++done;
        }(disk, offset, length, kind == 8 ? block::kRequestMayUnmap : 0u, finished));
      } else {
        loop_->spawn([](block::Node& n, int& done) -> Task<void> {
          EXPECT_EQ(co_await n.flush(), 0);
          ++done;
        }(disk, finished));
      }
    }
    loop_->run_until([&] { return finished == started; });
    ASSERT_TRUE(read(disk, 0, kSize) == reference);
    if (round == 1 || round == 3) {
      ASSERT_EQ(run(*loop_, qcow2_snapshots(disk)->create_snapshot("r" + std::to_string(round))),
                0);
    }
  }
  ASSERT_EQ(run(*loop_, disk.flush()), 0);
  node->reset();
  EXPECT_EQ(check(path_), "");
  EXPECT_EQ(compare_with(reference), "");
}


// Ranges the NBD export may hand to the kernel (Node::map_file): one contiguous run of normal
// clusters whose L2 entries are cached; for writing only clusters the image owns alone. The
// mapping holds the node lock shared, so operations that free or share clusters wait for it.
TEST_F(Qcow2DriverTest, MapsContiguousNormalClustersOnly) {
  struct statfs fs {};
  if (statfs("/dev/shm", &fs) != 0 || static_cast<unsigned long>(fs.f_type) != TMPFS_MAGIC) {
    GTEST_SKIP() << "/dev/shm is not a tmpfs here";
  }
  testing::TempDir shm("/dev/shm");
  path_ = shm.file("m.qcow2");
  constexpr uint64_t K = 1024, M = 1024 * 1024, C = 64 * K;
  ASSERT_EQ(sh("qemu-img create -f qcow2 " + path_ + " 8M"), 0);
  // 0..1M data (contiguous); 1M plain zero; 2M+64k written before 2M (discontinuous); 3M
  // compressed; 4M zero with its space kept; 6M unallocated.
  ASSERT_EQ(sh("qemu-io -c 'write -P 0x11 0 1M' -c 'write -z 1M 64k' -c 'write -P 0x22 2112k 64k'"
               " -c 'write -P 0x33 2M 64k' -c 'write -c -P 0x44 3M 64k' -c 'write -P 0x55 4M 64k'"
               " -c 'write -z 4M 64k' " + path_),
            0);
  Qcow2Options options;
  auto node = open(path_, false, options);
  ASSERT_TRUE(node.has_value()) << node.status().message();
  block::Node& disk = **node;
  constexpr auto kRead = block::MapAccess::kRead;
  constexpr auto kWrite = block::MapAccess::kWrite;
  // Whether a mapping is granted (and if so, ended at once: a leaked one would hold the lock).
  auto maps = [](block::Node& n, uint64_t offset, uint64_t length, block::MapAccess access) {
    const block::FileRange range = n.map_file(offset, length, access);
    if (range.fd >= 0) n.release_file(range, access);
    return range.fd >= 0;
  };
  // The L2 table is not cached yet: no mapping (it would need a read).
  EXPECT_FALSE(maps(disk, 0, M, kRead));
  (void)read(disk, 0, 8 * M);

  // A mapping shows exactly what read() returns, at any offset within the run.
  auto expect_maps = [&](uint64_t offset, uint64_t length, block::MapAccess access) {
    SCOPED_TRACE(std::to_string(offset) + "+" + std::to_string(length));
    const block::FileRange range = disk.map_file(offset, length, access);
    ASSERT_GE(range.fd, 0);
    std::vector<uint8_t> in_file(length);
    EXPECT_EQ(pread(range.fd, in_file.data(), length, static_cast<off_t>(range.offset)),
              static_cast<ssize_t>(length));
    EXPECT_EQ(in_file, read(disk, offset, length));
    disk.release_file(range, access);
  };
  expect_maps(0, M, kRead);
  expect_maps(4097, 200000, kRead);
  expect_maps(2 * M, C, kRead);
  expect_maps(2 * M + C, C, kRead);
  expect_maps(0, M, kWrite);
  // Not mappable: crossing into a zero cluster, zero, discontinuous, compressed, zero with space
  // kept, unallocated, empty, out of bounds.
  for (auto [offset, length] : std::vector<std::pair<uint64_t, uint64_t>>{
           {M - 4096, 8192}, {M, C}, {2 * M, 2 * C}, {2 * M + C - 100, 200}, {3 * M, C},
           {4 * M, C}, {6 * M, C}, {0, 0}, {8 * M - 4096, 8192}}) {
    EXPECT_FALSE(maps(disk, offset, length, kRead)) << offset << "+" << length;
    EXPECT_FALSE(maps(disk, offset, length, kWrite)) << offset << "+" << length;
  }

  // A write through the mapping is what later reads return.
  {
    const block::FileRange range = disk.map_file(100000, 300000, kWrite);
    ASSERT_GE(range.fd, 0);
    const auto data = pattern(300000, 9);
    ASSERT_EQ(pwrite(range.fd, data.data(), data.size(), static_cast<off_t>(range.offset)),
              static_cast<ssize_t>(data.size()));
    disk.release_file(range, kWrite);
    EXPECT_EQ(read(disk, 100000, 300000), data);
  }

  // While a mapping lasts, operations that could free or share its clusters wait (here a
  // snapshot, through a backend whose MappedRange ends the mapping), and new mappings are refused
  // to a waiting snapshot rather than delaying it further.
  block::BlockBackend backend("block export 'exp0'");
  ASSERT_TRUE(backend.attach(*node, block::kPermConsistentRead | block::kPermWrite, block::kPermAll));
  auto mapped = backend.map_write(0, M, 0);
  ASSERT_TRUE(mapped);
  const uint64_t before = mapped.file_offset();
  int snapshot = 1;
  loop_->spawn([](block::Node& n, int& out) -> Task<void> {
    out = co_await qcow2_snapshots(n)->create_snapshot("s1");
  }(disk, snapshot));
  EXPECT_EQ(snapshot, 1) << "the snapshot did not wait for the mapping";
  EXPECT_FALSE(backend.map_read(0, M));
  mapped = {};
  loop_->run_until([&] { return snapshot != 1; });
  ASSERT_EQ(snapshot, 0);
  EXPECT_EQ(backend.in_flight(), 0u);

  // Now shared with the snapshot: readable in place, but a write needs copy-on-write first.
  (void)read(disk, 0, M);  // the snapshot may have given the active L1 new L2 tables
  expect_maps(0, M, kRead);
  EXPECT_FALSE(backend.map_write(0, M, 0));
  EXPECT_FALSE(maps(disk, 0, C, kWrite));
  write(disk, 0, pattern(2 * C, 3));  // copies two clusters: those are owned again
  expect_maps(0, 2 * C, kWrite);
  {
    const block::FileRange copied = disk.map_file(0, C, kRead);
    ASSERT_GE(copied.fd, 0);
    EXPECT_NE(copied.offset, before);
    disk.release_file(copied, kRead);
  }
  EXPECT_FALSE(maps(disk, 0, 3 * C, kWrite));
  backend.detach();

  ASSERT_EQ(run(*loop_, disk.flush()), 0);
  node->reset();
  EXPECT_EQ(check(path_), "");
  // A read-only node maps reads only.
  auto read_only = open(path_, true);
  ASSERT_TRUE(read_only.has_value()) << read_only.status().message();
  (void)read(**read_only, 0, M);
  EXPECT_FALSE(maps(**read_only, 0, C, kWrite));
  EXPECT_TRUE(maps(**read_only, 0, C, kRead));
}

}  // namespace
}  // namespace blockd::drivers
