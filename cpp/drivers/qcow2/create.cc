// blockdev-create for qcow2; see create.h.
#include "drivers/qcow2/create.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "block/backend.h"

namespace blockd::drivers::qcow2 {
namespace {

constexpr uint64_t kSectorSize = 512;
constexpr uint64_t kDefaultClusterSize = uint64_t{1} << kDefaultClusterBits;
constexpr uint64_t kMinExtendedL2ClusterSize = 16384;
constexpr uint64_t kSmallClusterSize = 4096;
// The largest image length QEMU handles: INT64_MAX rounded down to a multiple of 1 GiB.
constexpr uint64_t kMaxImageLength = static_cast<uint64_t>(INT64_MAX) & ~((uint64_t{1} << 30) - 1);
// Metadata and zeroes are written in pieces of at most this size.
constexpr uint64_t kWriteChunk = 1u << 20;

constexpr const char* kUseV3 = " (use version=v3 or greater)";

uint64_t divide_up(uint64_t value, uint64_t divisor) {
  return value / divisor + (value % divisor != 0);
}

// QEMU's checks of the options, in QEMU's order, then blockd's refusals.
Status check_options(const CreateOptions& options, uint32_t version, uint64_t cluster_size,
                     int64_t refcount_bits) {
  if (options.size % kSectorSize != 0) {
    return Status::generic("Image size must be a multiple of 512 bytes");
  }
  if (options.extended_l2) {
    if (cluster_size < kMinExtendedL2ClusterSize) {
      return Status::generic(
          "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
    }
    if (version < 3) {
      return Status::generic(
          std::string("Extended L2 entries are only supported with compatibility level 1.1 "
                      "and above") +
          kUseV3);
    }
  }
  if (!std::has_single_bit(cluster_size) || cluster_size < (uint64_t{1} << kMinClusterBits) ||
      cluster_size > (uint64_t{1} << kMaxClusterBits)) {
    return Status::generic("Cluster size must be a power of two between 512 and 2048k");
  }
  if (options.backing_file && options.preallocation != Preallocation::kOff &&
      !options.extended_l2) {
    return Status::generic(
        "Backing file and preallocation can only be used at the same time if extended_l2 is on");
  }
  if (options.backing_format && !options.backing_file) {
    return Status::generic("Backing format cannot be used without backing file");
  }
  if (version < 3 && options.lazy_refcounts) {
    return Status::generic(
        std::string("Lazy refcounts only supported with compatibility level 1.1 and above") +
        kUseV3);
  }
  if (refcount_bits <= 0 || refcount_bits > 64 ||
      !std::has_single_bit(static_cast<uint64_t>(refcount_bits))) {
    return Status::generic("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (version < 3 && refcount_bits != 16) {
    return Status::generic(
        std::string("Different refcount widths than 16 bits require compatibility level 1.1 or "
                    "above") +
        kUseV3);
  }
  if (options.data_file_raw && !options.data_file) {
    return Status::generic("data-file-raw requires data-file");
  }
  if (options.data_file_raw && options.backing_file) {
    return Status::generic("Backing file and data-file-raw cannot be used at the same time");
  }
  if (options.data_file && version < 3) {
    return Status::generic(
        std::string("External data files are only supported with compatibility level 1.1 and "
                    "above") +
        kUseV3);
  }
  if (options.zstd && version < 3) {
    return Status::generic(
        std::string("Non-zlib compression type is only supported with compatibility level 1.1 "
                    "and above") +
        kUseV3);
  }
  if (options.extended_l2) {
    return Status::generic("Extended L2 entries are not supported by blockd");
  }
  if (options.data_file) return Status::generic("External data files are not supported by blockd");
  if (options.encrypt) return Status::generic("Encrypted images are not supported by blockd");
  return Status::ok();
}

Status backing_error(const CreateOptions& options, int error) {
  return Status::generic("Could not assign backing file '" + *options.backing_file +
                         "' with format '" + options.backing_format.value_or("(null)") +
                         "': " + errno_text(error));
}

// A buffer of whole clusters, zero filled.
std::vector<uint8_t> clusters(uint64_t count, uint64_t cluster_size) {
  return std::vector<uint8_t>(count * cluster_size, 0);
}

}  // namespace

Expected<CreatePlan> plan_image(const CreateOptions& options) {
  const uint32_t version = options.version.value_or(kVersion3);
  const uint64_t cluster_size = options.cluster_size.value_or(kDefaultClusterSize);
  const int64_t refcount_bits = options.refcount_bits.value_or(16);
  BLOCKD_RETURN_IF_ERROR(check_options(options, version, cluster_size, refcount_bits));

  CreatePlan plan;
  plan.preallocation = options.preallocation;
  Header& header = plan.header;
  header.version = version;
  header.cluster_bits = static_cast<uint32_t>(std::countr_zero(cluster_size));
  header.refcount_order = static_cast<uint32_t>(std::countr_zero(static_cast<uint64_t>(refcount_bits)));
  header.header_length = version >= 3 ? kHeaderV3Length : kHeaderV2Length;
  header.size = options.size;
  if (options.lazy_refcounts) header.compatible_features |= kCompatLazyRefcounts;
  if (options.zstd) {
    header.incompatible_features |= kIncompatCompression;
    header.compression_type = kCompressionZstd;
  }

  // QEMU's limits on any image length (its BDRV_MAX_LENGTH), checked when it sizes the image.
  if (options.size > static_cast<uint64_t>(INT64_MAX)) {
    return Status::generic("Could not resize image: Image size cannot be negative");
  }
  if (options.size > kMaxImageLength) {
    return Status::generic("Could not resize image: offset(" + std::to_string(options.size) +
                           ") exceeds maximum(" + std::to_string(kMaxImageLength) + ")");
  }
  const uint64_t l1_entries = l1_entries_for(options.size, header.cluster_bits);
  if (l1_entries > kMaxL1TableBytes / sizeof(uint64_t)) {
    return Status::generic("Could not resize image: Failed to grow the L1 table: " +
                           errno_text(-EFBIG));
  }
  header.l1_size = static_cast<uint32_t>(l1_entries);
  const uint64_t l1_clusters = divide_up(l1_entries * sizeof(uint64_t), cluster_size);

  if (options.preallocation != Preallocation::kOff) {
    plan.data_clusters = divide_up(options.size, cluster_size);
    plan.l2_tables = divide_up(plan.data_clusters, header.l2_entries());
  }

  // The refcount blocks must count every cluster, themselves and the table that points at them
  // included: grow both until they cover the whole image.
  const uint64_t fixed_clusters = 1 + l1_clusters + plan.data_clusters + plan.l2_tables;
  const uint64_t block_entries = header.refcount_block_entries();
  uint64_t table_clusters = 1;
  uint64_t block_count = 0;
  for (;;) {
    const uint64_t total = fixed_clusters + table_clusters + block_count;
    const uint64_t blocks = divide_up(total, block_entries);
    const uint64_t table = divide_up(blocks * sizeof(uint64_t), cluster_size);
    if (blocks == block_count && table == table_clusters) break;
    block_count = blocks;
    table_clusters = std::max(table_clusters, table);
  }
  if (table_clusters * cluster_size > kMaxRefcountTableBytes) {
    return Status::generic("Could not resize image: the refcount table would exceed " +
                           std::to_string(kMaxRefcountTableBytes >> 20) + " MiB");
  }

  // Header, refcount table, refcount blocks, L1 table, data, L2 tables.
  uint64_t next = cluster_size;
  header.refcount_table_offset = next;
  header.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  next += table_clusters * cluster_size;
  plan.refcount_block_offset = next;
  plan.refcount_block_count = block_count;
  next += block_count * cluster_size;
  header.l1_table_offset = l1_entries > 0 ? next : 0;
  next += l1_clusters * cluster_size;
  plan.data_offset = next;
  next += plan.data_clusters * cluster_size;
  plan.l2_offset = next;
  next += plan.l2_tables * cluster_size;
  plan.total_clusters = next / cluster_size;

  if (options.backing_file) {
    if (options.backing_file->size() > kMaxBackingFileNameLength) {
      return backing_error(options, -EINVAL);
    }
    header.backing_file = *options.backing_file;
    if (options.backing_format) header.set_backing_format(*options.backing_format);
  }
  // The feature name table lets tools name feature bits. Like QEMU, leave it out of clusters of
  // 4 KiB and less, where it would take much of the room a backing file name needs.
  if (version >= 3 && cluster_size > kSmallClusterSize) {
    header.set_extension(kExtFeatureTable, standard_feature_name_table());
  }
  if (!header.encode()) {
    if (options.backing_file) return backing_error(options, -ENOSPC);
    return Status::generic("The qcow2 header does not fit in one cluster");
  }
  return plan;
}

namespace {

// Writes the planned metadata, data preallocation and finally the header.
class ImageWriter {
 public:
  ImageWriter(block::Node& file, const CreatePlan& plan, const CancelCheck& cancelled)
      : file_(file), plan_(plan), cancelled_(cancelled), cluster_size_(plan.header.cluster_size()) {}

  Task<Status> write() {
    BLOCKD_CO_RETURN_IF_ERROR(co_await write_refcount_table());
    BLOCKD_CO_RETURN_IF_ERROR(co_await write_refcount_blocks());
    BLOCKD_CO_RETURN_IF_ERROR(co_await write_l1_table());
    BLOCKD_CO_RETURN_IF_ERROR(co_await write_data());
    BLOCKD_CO_RETURN_IF_ERROR(co_await write_l2_tables());
    // Everything the header points at is durable before the header makes it an image.
    BLOCKD_CO_RETURN_IF_ERROR(co_await flush());
    auto header = plan_.header.encode();
    if (!header) co_return header.status();
    BLOCKD_CO_RETURN_IF_ERROR(co_await put(0, header->data(), header->size()));
    co_return co_await flush();
  }

 private:
  Task<Status> put(uint64_t offset, const void* data, uint64_t length) {
    const auto* bytes = static_cast<const uint8_t*>(data);
    for (uint64_t done = 0; done < length;) {
      if (cancelled_ && cancelled_()) co_return Status::generic(errno_text(-ECANCELED));
      const uint64_t chunk = std::min(length - done, kWriteChunk);
      const int64_t ret = co_await file_.write(offset + done, chunk, bytes + done, 0);
      if (ret < 0) co_return Status::generic("Could not write qcow2 image: " + errno_text(ret));
      done += chunk;
    }
    co_return Status::ok();
  }

  Task<Status> flush() {
    const int64_t ret = co_await file_.flush();
    if (ret < 0) co_return Status::generic("Could not flush qcow2 image: " + errno_text(ret));
    co_return Status::ok();
  }

  Task<Status> write_refcount_table() {
    const Header& header = plan_.header;
    std::vector<uint8_t> table = clusters(header.refcount_table_clusters, cluster_size_);
    for (uint64_t i = 0; i < plan_.refcount_block_count; ++i) {
      store_be64(table.data() + i * sizeof(uint64_t), plan_.refcount_block_offset + i * cluster_size_);
    }
    co_return co_await put(header.refcount_table_offset, table.data(), table.size());
  }

  // Refcount 1 for clusters [0, total_clusters), 0 beyond; written a batch of blocks at a time.
  Task<Status> write_refcount_blocks() {
    const uint32_t order = plan_.header.refcount_order;
    const uint64_t per_block = plan_.header.refcount_block_entries();
    const uint64_t blocks_per_write = std::max<uint64_t>(1, kWriteChunk / cluster_size_);
    for (uint64_t first = 0; first < plan_.refcount_block_count; first += blocks_per_write) {
      const uint64_t count = std::min(blocks_per_write, plan_.refcount_block_count - first);
      std::vector<uint8_t> blocks = clusters(count, cluster_size_);
      const uint64_t first_cluster = first * per_block;
      const uint64_t end_cluster = std::min(plan_.total_clusters, (first + count) * per_block);
      for (uint64_t cluster = first_cluster; cluster < end_cluster; ++cluster) {
        const uint64_t index = cluster - first_cluster;
        set_refcount(blocks.data() + (index / per_block) * cluster_size_, index % per_block, order,
                     1);
      }
      BLOCKD_CO_RETURN_IF_ERROR(co_await put(plan_.refcount_block_offset + first * cluster_size_,
                                          blocks.data(), blocks.size()));
    }
    co_return Status::ok();
  }

  // Only the table's own bytes are written (as QEMU does), so an image without preallocation ends
  // right after its L1 table.
  Task<Status> write_l1_table() {
    const Header& header = plan_.header;
    if (header.l1_size == 0) co_return Status::ok();
    std::vector<uint8_t> table(uint64_t{header.l1_size} * sizeof(uint64_t), 0);
    for (uint64_t i = 0; i < plan_.l2_tables; ++i) {
      store_be64(table.data() + i * sizeof(uint64_t),
                 (plan_.l2_offset + i * cluster_size_) | kEntryCopied);
    }
    co_return co_await put(header.l1_table_offset, table.data(), table.size());
  }

  // falloc reserves the data's host space, full writes zeroes; metadata leaves a hole, which the
  // L2 tables written after it extend the file over.
  Task<Status> write_data() {
    const uint64_t length = plan_.data_clusters * cluster_size_;
    if (length == 0) co_return Status::ok();
    if (plan_.preallocation == Preallocation::kFalloc) {
      for (uint64_t done = 0; done < length;) {
        if (cancelled_ && cancelled_()) co_return Status::generic(errno_text(-ECANCELED));
        const uint64_t chunk = std::min<uint64_t>(length - done, 1u << 30);
        const int64_t ret = co_await file_.write_zeroes(plan_.data_offset + done, chunk, 0);
        if (ret < 0) {
          co_return Status::generic("Could not preallocate new data: " + errno_text(ret));
        }
        done += chunk;
      }
    } else if (plan_.preallocation == Preallocation::kFull) {
      const std::vector<uint8_t> zeroes(std::min(length, kWriteChunk), 0);
      for (uint64_t done = 0; done < length; done += zeroes.size()) {
        BLOCKD_CO_RETURN_IF_ERROR(co_await put(plan_.data_offset + done, zeroes.data(),
                                            std::min<uint64_t>(zeroes.size(), length - done)));
      }
    }
    co_return Status::ok();
  }

  // Table i maps data clusters [i * l2_entries, (i + 1) * l2_entries), each with refcount 1.
  Task<Status> write_l2_tables() {
    const uint64_t per_table = plan_.header.l2_entries();
    const uint64_t tables_per_write = std::max<uint64_t>(1, kWriteChunk / cluster_size_);
    for (uint64_t first = 0; first < plan_.l2_tables; first += tables_per_write) {
      const uint64_t count = std::min(tables_per_write, plan_.l2_tables - first);
      std::vector<uint8_t> tables = clusters(count, cluster_size_);
      const uint64_t first_cluster = first * per_table;
      const uint64_t end_cluster = std::min(plan_.data_clusters, (first + count) * per_table);
      for (uint64_t cluster = first_cluster; cluster < end_cluster; ++cluster) {
        store_be64(tables.data() + (cluster - first_cluster) * sizeof(uint64_t),
                   (plan_.data_offset + cluster * cluster_size_) | kEntryCopied);
      }
      BLOCKD_CO_RETURN_IF_ERROR(
          co_await put(plan_.l2_offset + first * cluster_size_, tables.data(), tables.size()));
    }
    co_return Status::ok();
  }

  block::Node& file_;
  const CreatePlan& plan_;
  const CancelCheck& cancelled_;
  const uint64_t cluster_size_;
};

}  // namespace

Task<Status> create_image(std::shared_ptr<block::Node> file, CreateOptions options,
                          CancelCheck cancelled) {
  auto plan = plan_image(options);
  if (!plan) co_return plan.status();
  if (file->read_only()) co_return Status::generic("Block node is read-only");
  // The image is written to the node directly (it grows past the node's current end); the backend
  // only holds the permissions, as QEMU's creation holds them through an unnamed block device.
  block::BlockBackend user("an unnamed block device");
  BLOCKD_CO_RETURN_IF_ERROR(
      user.attach(file, block::kPermWrite | block::kPermResize, block::kPermAll));
  ImageWriter writer(*file, *plan, cancelled);
  Status written = co_await writer.write();
  user.detach();
  co_return written;
}

}  // namespace blockd::drivers::qcow2
