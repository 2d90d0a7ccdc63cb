// Creating qcow2 images: blockdev-create for the qcow2 driver.
//
// Implements image creation per QEMU's docs/interop/qcow2.txt: a new image is one header cluster,
// a refcount table and its refcount blocks, an L1 table and (with preallocation) L2 tables and
// data clusters, every cluster in use with refcount 1 and nothing leaked, so `qemu-img check`
// finds no errors. The options and their checks follow QEMU 7.2's qcow2 creation, in QEMU's order
// and with its error texts; the features blockd does not implement (external data files, extended
// L2 entries, encryption) are refused with a message saying so.
//
// The layout differs from QEMU's only in where the preallocated L2 tables go: after the data
// clusters, so that writing them also extends the file over the (still sparse) data.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "block/node.h"
#include "drivers/create.h"
#include "drivers/qcow2/format.h"
#include "runtime/status.h"
#include "runtime/task.h"

namespace blockd::drivers::qcow2 {

// The settings of a new image (QAPI's BlockdevCreateOptionsQcow2 without the node references).
// Unset optionals take QEMU's defaults.
struct CreateOptions {
  uint64_t size = 0;                     // virtual size, a multiple of 512
  std::optional<uint32_t> version;       // 2 or 3 (default 3)
  std::optional<uint64_t> cluster_size;  // a power of two, 512 B to 2 MiB (default 64 KiB)
  std::optional<int64_t> refcount_bits;  // a power of two up to 64 (default 16)
  bool lazy_refcounts = false;
  std::optional<std::string> backing_file;
  std::optional<std::string> backing_format;  // a block driver name
  Preallocation preallocation = Preallocation::kOff;
  bool zstd = false;  // compression type zstd instead of zlib
  // Requested features blockd refuses; recorded so that the refusal comes after QEMU's own checks
  // of the same options.
  bool data_file = false;
  bool data_file_raw = false;
  bool extended_l2 = false;
  bool encrypt = false;
};

// Where everything of a new image goes. All offsets are in bytes and cluster aligned.
struct CreatePlan {
  Header header;  // complete, with extensions and backing file name
  uint64_t refcount_block_offset = 0;  // the first refcount block; the others follow
  uint64_t refcount_block_count = 0;
  uint64_t data_offset = 0;   // first preallocated data cluster (preallocation only)
  uint64_t data_clusters = 0;
  uint64_t l2_offset = 0;  // first preallocated L2 table (preallocation only)
  uint64_t l2_tables = 0;
  uint64_t total_clusters = 0;  // clusters in use: every one has refcount 1
  Preallocation preallocation = Preallocation::kOff;
};

// Checks `options` and lays the image out. Pure; any thread.
//
// Errors (GenericError), QEMU's texts where QEMU has the check, e.g.
//   "Image size must be a multiple of 512 bytes"
//   "Cluster size must be a power of two between 512 and 2048k"
//   "Refcount width must be a power of two and may not exceed 64 bits"
//   "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or
//    greater)"
//   "Backing format cannot be used without backing file"
//   "Backing file and preallocation can only be used at the same time if extended_l2 is on"
//   "Could not resize image: Image size cannot be negative"   (2^63 and more)
//   "Could not resize image: offset(<size>) exceeds maximum(<limit>)"
//   "Could not resize image: Failed to grow the L1 table: File too large"
//   "Could not assign backing file '<name>' with format '<format>': Invalid argument"
// and blockd's refusals: "Extended L2 entries are not supported by blockd", "External data files
// are not supported by blockd", "Encrypted images are not supported by blockd".
Expected<CreatePlan> plan_image(const CreateOptions& options);

// Creates the image on `file`: checks the options (as plan_image), takes the write and resize
// permissions on `file` as an unnamed block device (failing with the permission conflict, or
// "Block node is read-only"), writes every structure, the header last, and flushes. Runs on the
// loop of `file` (the main loop). Long preallocation polls `cancelled` and stops with "Operation
// canceled", leaving a file without a valid header.
Task<Status> create_image(std::shared_ptr<block::Node> file, CreateOptions options,
                          CancelCheck cancelled);

}  // namespace blockd::drivers::qcow2
