// qcow2 image creation: the layout plan (every cluster counted once, the refcount structures
// covering themselves), QEMU's option checks in QEMU's order, and images written to a file node
// read back through the format parsers.
#include "drivers/qcow2/create.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "block/backend.h"
#include "drivers/file.h"
#include "test_support.h"

namespace blockd::drivers::qcow2 {
namespace {

using testing::run;

uint64_t divide_up(uint64_t value, uint64_t divisor) { return (value + divisor - 1) / divisor; }

TEST(Qcow2Plan, DefaultImageIsQemusLayout) {
  auto plan = plan_image({.size = uint64_t{1} << 30});
  ASSERT_TRUE(plan.has_value()) << plan.status().message();
  const Header& header = plan->header;
  EXPECT_EQ(header.version, 3u);
  EXPECT_EQ(header.cluster_bits, 16u);
  EXPECT_EQ(header.refcount_order, 4u);
  EXPECT_EQ(header.refcount_table_offset, 0x10000u);
  EXPECT_EQ(header.refcount_table_clusters, 1u);
  EXPECT_EQ(plan->refcount_block_offset, 0x20000u);
  EXPECT_EQ(plan->refcount_block_count, 1u);
  EXPECT_EQ(header.l1_table_offset, 0x30000u);
  EXPECT_EQ(header.l1_size, 2u);
  EXPECT_EQ(plan->total_clusters, 4u);
  ASSERT_NE(header.find_extension(kExtFeatureTable), nullptr);
}

TEST(Qcow2Plan, EmptyImageHasNoL1Table) {
  auto plan = plan_image({.size = 0});
  ASSERT_TRUE(plan.has_value());
  EXPECT_EQ(plan->header.l1_size, 0u);
  EXPECT_EQ(plan->header.l1_table_offset, 0u);
  EXPECT_EQ(plan->total_clusters, 3u);
}

// Whatever the options, the refcount blocks cover every cluster in use (themselves and the table
// included) with no block to spare, and the table has room for every block.
TEST(Qcow2Plan, RefcountsCoverEveryClusterExactly) {
  for (uint64_t cluster_size : {512u, 4096u, 65536u, 2u << 20}) {
    for (int64_t bits : {1, 2, 16, 64}) {
      for (uint64_t size : {uint64_t{0}, uint64_t{1} << 20, uint64_t{100} << 30}) {
        for (Preallocation mode : {Preallocation::kOff, Preallocation::kMetadata}) {
          if (mode != Preallocation::kOff && size > (uint64_t{1} << 30) && cluster_size < 65536) {
            continue;  // millions of clusters: slow and adds nothing
          }
          auto plan = plan_image({.size = size, .cluster_size = cluster_size, .refcount_bits = bits,
                                  .preallocation = mode});
          ASSERT_TRUE(plan.has_value()) << plan.status().message();
          const Header& header = plan->header;
          const uint64_t entries = header.refcount_block_entries();
          SCOPED_TRACE(std::to_string(cluster_size) + "/" + std::to_string(bits) + "/" +
                       std::to_string(size));
          EXPECT_EQ(plan->refcount_block_count, divide_up(plan->total_clusters, entries));
          EXPECT_GE(header.refcount_table_clusters * cluster_size / 8, plan->refcount_block_count);
          const uint64_t l1_clusters = divide_up(uint64_t{header.l1_size} * 8, cluster_size);
          EXPECT_EQ(plan->total_clusters, 1 + header.refcount_table_clusters +
                                              plan->refcount_block_count + l1_clusters +
                                              plan->data_clusters + plan->l2_tables);
          if (mode == Preallocation::kMetadata) {
            EXPECT_EQ(plan->data_clusters, divide_up(size, cluster_size));
            EXPECT_EQ(plan->l2_tables, header.l1_size);
          }
        }
      }
    }
  }
}

TEST(Qcow2Plan, ChecksFollowQemusOrder) {
  auto message = [](CreateOptions options) {
    auto plan = plan_image(options);
    return plan ? std::string("ok") : plan.status().message();
  };
  // Two problems at once: QEMU reports the first it checks.
  EXPECT_EQ(message({.size = 1000, .cluster_size = 1000}),
            "Image size must be a multiple of 512 bytes");
  EXPECT_EQ(message({.size = 4096, .cluster_size = 1000, .refcount_bits = 3}),
            "Cluster size must be a power of two between 512 and 2048k");
  EXPECT_EQ(message({.size = 4096, .version = 2, .lazy_refcounts = true, .extended_l2 = true}),
            "Extended L2 entries are only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)");
  EXPECT_EQ(message({.size = 4096, .refcount_bits = 128}),
            "Refcount width must be a power of two and may not exceed 64 bits");
  EXPECT_EQ(message({.size = 4096, .version = 2, .refcount_bits = 8}),
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            "(use version=v3 or greater)");
  EXPECT_EQ(message({.size = 4096, .backing_format = "raw"}),
            "Backing format cannot be used without backing file");
  EXPECT_EQ(message({.size = 4096, .backing_file = "b", .preallocation = Preallocation::kFull}),
            "Backing file and preallocation can only be used at the same time if extended_l2 "
            "is on");
  EXPECT_EQ(message({.size = 4096, .version = 2, .zstd = true}),
            "Non-zlib compression type is only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)");
  // blockd's own refusals come after every QEMU check.
  EXPECT_EQ(message({.size = 4096, .extended_l2 = true}),
            "Extended L2 entries are not supported by blockd");
  EXPECT_EQ(message({.size = 4096, .data_file = true}),
            "External data files are not supported by blockd");
  EXPECT_EQ(message({.size = 4096, .encrypt = true}),
            "Encrypted images are not supported by blockd");
  // Then the sizing limits.
  EXPECT_EQ(message({.size = uint64_t{1} << 63}),
            "Could not resize image: Image size cannot be negative");
  EXPECT_EQ(message({.size = (uint64_t{1} << 63) - 512}),
            "Could not resize image: offset(9223372036854775296) exceeds "
            "maximum(9223372035781033984)");
  EXPECT_EQ(message({.size = uint64_t{1} << 62}),
            "Could not resize image: Failed to grow the L1 table: File too large");
  EXPECT_EQ(message({.size = uint64_t{1} << 61, .cluster_size = 2u << 20}), "ok");  // 32 MiB L1
  EXPECT_EQ(message({.size = 4096, .backing_file = std::string(1024, 'b')}),
            "Could not assign backing file '" + std::string(1024, 'b') +
                "' with format '(null)': Invalid argument");
  EXPECT_EQ(message({.size = 4096, .backing_file = std::string(1023, 'b'),
                     .backing_format = "raw"}),
            "ok");
  EXPECT_EQ(message({.size = 4096, .version = 2, .cluster_size = 512,
                     .backing_file = std::string(1000, 'b'), .backing_format = "raw"}),
            "Could not assign backing file '" + std::string(1000, 'b') +
                "' with format 'raw': No space left on device");
}

class Qcow2CreateTest : public ::testing::Test {
 protected:
  std::shared_ptr<block::Node> open_file(bool read_only = false) {
    int fd = open(path_.c_str(), O_CREAT | O_RDWR, 0644);
    close(fd);
    block::NodeOptions common;
    common.node_name = "file0";
    common.read_only = read_only;
    auto node = open_file_node(common, {.filename = path_}, *loop_);
    EXPECT_TRUE(node.has_value()) << node.status().message();
    return node.has_value() ? *node : nullptr;
  }

  std::vector<uint8_t> read(std::shared_ptr<block::Node>& file, uint64_t offset, uint64_t length) {
    std::vector<uint8_t> bytes(length);
    EXPECT_EQ(run(*loop_, file->read(offset, length, bytes.data(), 0)), 0);
    return bytes;
  }

  std::unique_ptr<Loop> loop_ = testing::make_loop();
  testing::TempDir dir_;
  std::string path_ = dir_.file("image.qcow2");
};

TEST_F(Qcow2CreateTest, MetadataPreallocationMapsEveryClusterOnce) {
  auto file = open_file();
  const CreateOptions options{.size = 3 << 20, .cluster_size = 4096, .refcount_bits = 8,
                              .preallocation = Preallocation::kMetadata};
  ASSERT_TRUE(run(*loop_, create_image(file, options, {})).is_ok());
  auto plan = plan_image(options);
  ASSERT_TRUE(plan.has_value());
  // The node grew with the image, so a reader sees the whole of it.
  EXPECT_EQ(static_cast<uint64_t>(file->size()), plan->total_clusters * 4096);

  auto header = parse_header(read(file, 0, 4096), static_cast<uint64_t>(file->size()));
  ASSERT_TRUE(header.has_value()) << header.status().message();
  EXPECT_EQ(header->size, 3u << 20);
  EXPECT_EQ(header->refcount_order, 3u);
  EXPECT_EQ(header->find_extension(kExtFeatureTable), nullptr);  // 4 KiB clusters: left out

  // Every cluster in use has refcount 1, and nothing beyond.
  const uint64_t entries = header->refcount_block_entries();
  auto table = read(file, header->refcount_table_offset, 4096);
  for (uint64_t cluster = 0; cluster < plan->refcount_block_count * entries; ++cluster) {
    const uint64_t block_offset = load_be64(table.data() + cluster / entries * 8);
    auto block = read(file, block_offset, 4096);
    EXPECT_EQ(get_refcount(block.data(), cluster % entries, 3), cluster < plan->total_clusters)
        << cluster;
  }
  // L1 -> L2 -> data, all COPIED, the data clusters in guest order.
  auto l1 = read(file, header->l1_table_offset, header->l1_size * 8);
  uint64_t guest_cluster = 0;
  for (uint32_t i = 0; i < header->l1_size; ++i) {
    const uint64_t l1_entry = load_be64(l1.data() + i * 8);
    ASSERT_TRUE(l1_entry & kEntryCopied);
    auto l2 = read(file, l1_entry & kOffsetMask, 4096);
    for (uint64_t j = 0; j < 512 && guest_cluster < (3u << 20) / 4096; ++j, ++guest_cluster) {
      const uint64_t l2_entry = load_be64(l2.data() + j * 8);
      EXPECT_EQ(classify_l2_entry(l2_entry, 3), ClusterKind::kNormal);
      EXPECT_EQ(l2_entry, (plan->data_offset + guest_cluster * 4096) | kEntryCopied);
    }
  }
  EXPECT_EQ(guest_cluster, (3u << 20) / 4096);
}

TEST_F(Qcow2CreateTest, BackingFileAndFormatAreStored) {
  auto file = open_file();
  ASSERT_TRUE(run(*loop_, create_image(file, {.size = 1 << 20, .backing_file = "base.raw",
                                              .backing_format = "raw"},
                                       {}))
                  .is_ok());
  auto header = parse_header(read(file, 0, 65536), static_cast<uint64_t>(file->size()));
  ASSERT_TRUE(header.has_value()) << header.status().message();
  EXPECT_EQ(header->backing_file, "base.raw");
  EXPECT_EQ(header->backing_format(), "raw");
}

TEST_F(Qcow2CreateTest, NeedsWriteAndResizeOnTheNode) {
  auto read_only = open_file(/*read_only=*/true);
  EXPECT_EQ(run(*loop_, create_image(read_only, {.size = 1 << 20}, {})).message(),
            "Block node is read-only");

  auto file = open_file();
  block::BlockBackend exporter("an unnamed block device");
  ASSERT_TRUE(exporter.attach(file, block::kPermConsistentRead,
                              block::kPermAll & ~block::kPermResize).is_ok());
  EXPECT_EQ(run(*loop_, create_image(file, {.size = 1 << 20}, {})).message(),
            "Permission conflict on node 'file0': permissions 'resize' are both required by an "
            "unnamed block device (uses node 'file0' as 'root' child) and unshared by an unnamed "
            "block device (uses node 'file0' as 'root' child).");
  EXPECT_EQ(file->size(), 0);  // nothing written
  exporter.detach();
  EXPECT_TRUE(run(*loop_, create_image(file, {.size = 1 << 20}, {})).is_ok());
  EXPECT_EQ(file->users().size(), 0u);  // the creation let go of the node
}

TEST_F(Qcow2CreateTest, CancelStopsBeforeTheHeader) {
  auto file = open_file();
  int polls = 0;
  const Status status =
      run(*loop_, create_image(file, {.size = 16 << 20, .preallocation = Preallocation::kFull},
                               [&polls] { return ++polls > 4; }));
  EXPECT_EQ(status.message(), "Operation canceled");
  auto first = read(file, 0, 4);
  EXPECT_EQ(first, std::vector<uint8_t>(4, 0));  // no header: not an image
}

}  // namespace
}  // namespace blockd::drivers::qcow2
