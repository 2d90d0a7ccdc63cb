// The qcow2 format driver: a node that maps guest clusters to host clusters of its "file" child
// through L1/L2 tables, with reference-counted clusters, copy-on-write, a backing chain and
// internal snapshots.
//
// Implements QEMU's docs/interop/qcow2.txt (versions 2 and 3) as QEMU 7.2's "qcow2" driver
// (BlockdevOptionsQcow2) behaves towards the guest and the image: images are interchangeable with
// qemu-img and qemu-storage-daemon.
//
// Supported: cluster sizes 512 B to 2 MiB, refcount widths 1 to 64 bits, zero clusters, reading
// zlib-compressed clusters, backing files (with the backing-format extension), unknown header
// extensions kept, lazy refcounts (accepted; blockd always updates refcounts), the corrupt bit
// (the image opens read-only), the dirty bit (a dirty image opened read-write has its refcounts
// recounted, as QEMU does), internal snapshots. Refused with a clear message: encryption,
// external data files, extended L2 entries, zstd compression.
//
// Metadata (L2 tables, refcount blocks) lives in a write-back cache sized by l2-cache-size and
// refcount-cache-size. Its writes are ordered so that a crash at any point leaves at worst leaked
// clusters: refcount increments are flushed before an L2 or L1 entry that needs them, decrements
// are applied only after the entry that dropped the reference is on disk (see qcow2_node.h).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "block/node.h"
#include "drivers/qcow2/format.h"
#include "runtime/loop.h"
#include "runtime/status.h"

namespace blockd::drivers {

// The members of QEMU 7.2's BlockdevOptionsQcow2 that blockd honours. (encrypt and data-file are
// refused by the QMP layer.)
struct Qcow2Options {
  std::optional<bool> lazy_refcounts;
  std::optional<bool> pass_discard_request;  // default: discard=unmap
  std::optional<bool> pass_discard_snapshot;  // default: on
  std::optional<bool> pass_discard_other;     // default: off
  std::optional<int64_t> cache_size;          // l2 + refcount cache, bytes
  std::optional<int64_t> l2_cache_size;
  std::optional<int64_t> refcount_cache_size;
  // The backing option: unset = use the image's backing file name; null (set, nullptr) = no
  // backing file; a node = that node.
  bool backing_given = false;
  std::shared_ptr<block::Node> backing;
};

// Opens the backing file named in an image header: `filename` as written in the image (already
// made absolute relative to the image's directory), `format` from the backing-format extension
// (empty when the image does not say). Returns a read-only node. Provided by the QMP layer.
using OpenBackingFile = std::function<Expected<std::shared_ptr<block::Node>>(
    const std::string& filename, const std::string& format)>;

// Opens a qcow2 node over `file` whose I/O runs on `loop`. Main loop. The image is read by a
// task that `run` must run to completion on `loop` and whose result it returns (QMP handlers pass
// Context::run_nested; tests a loop runner); the backing file is opened afterwards, outside it.
//
// Errors (GenericError): every header validation error of qcow2::parse_header, and
//   "Unsupported qcow2 feature(s): <names>" (unknown incompatible feature bits)
//   "qcow2: Image is corrupt; cannot be opened read/write" is not raised: a corrupt image opens
//      read-only (see read_only_reason()).
//   "Could not open backing file: <reason>", "L2 cache size too big", ...
Expected<std::shared_ptr<block::Node>> open_qcow2_node(block::NodeOptions common,
                                                       const Qcow2Options& options,
                                                       std::shared_ptr<block::Node> file,
                                                       const OpenBackingFile& open_backing,
                                                       Loop& loop,
                                                       const std::function<Status(Task<Status>)>& run);

// Internal snapshots of a qcow2 node. All functions run on the main loop and perform their I/O by
// awaiting on the node's loop; call them through Context::run_nested (or a test's run()).
class Qcow2Snapshots {
 public:
  virtual ~Qcow2Snapshots() = default;
  // The snapshot table, in image order.
  virtual std::vector<qcow2::SnapshotEntry> snapshots() const = 0;
  // Creates a snapshot of the current state named `name` with the next free numeric id. Errors:
  // -EEXIST (name in use), -EROFS, -EFBIG (refcount overflow), I/O errors.
  virtual Task<int> create_snapshot(std::string name) noexcept = 0;
  // Deletes the snapshot at `index` of snapshots(). Errors: -ENOENT, -EROFS, I/O errors.
  virtual Task<int> delete_snapshot(size_t index) noexcept = 0;
  // Makes the snapshot at `index` the current state (the current state is lost). The virtual
  // size must equal the snapshot's. Errors: -ENOENT, -EROFS, -ENOTSUP (size differs), I/O errors.
  virtual Task<int> revert_snapshot(size_t index) noexcept = 0;
  // The header as currently on disk (for image info).
  virtual const qcow2::Header& header() const = 0;
  // Why the node is read-only although the user did not ask for it ("" if not).
  virtual std::string read_only_reason() const = 0;
};

// The snapshot interface of `node` if it is a qcow2 node, else null.
Qcow2Snapshots* qcow2_snapshots(block::Node& node);

}  // namespace blockd::drivers
