// BlockBackend: the handle through which an export (and later a device) uses a node.
//
// It holds permissions on its root node like any other use, keeps the node alive, counts requests
// in flight so the graph can be drained before it changes, and applies per-user policy: bounds
// checks and writethrough (a flush after every write).
//
// Threads: attach/detach on the main loop; the I/O methods on the node's loop.
#pragma once

#include <memory>
#include <string>

#include "block/node.h"
#include "runtime/event.h"

namespace blockd::block {

class BlockBackend final : public User {
 public:
  // `description` names the user in permission conflicts, e.g. "block export 'exp0'".
  explicit BlockBackend(std::string description);
  ~BlockBackend() override;
  std::string user_description() const override { return description_; }
  std::string role() const override { return "root"; }

  // Attaches to `node` taking `permissions` and sharing `shared`. Fails with the conflict, leaving
  // the backend detached.
  Status attach(std::shared_ptr<Node> node, uint32_t permissions, uint32_t shared);
  // Releases the node. In-flight requests must have been drained first.
  void detach() noexcept;
  // detach(), after bringing the node back to `loop` when it runs on another (an export that
  // served it in an iothread hands it back to the main loop), unless another user keeps it there.
  void detach_to(Loop& loop);

  Node* root() const noexcept { return root_.get(); }
  int64_t size() const noexcept { return root_ ? root_->size() : 0; }
  void set_writethrough(bool on) noexcept { writethrough_ = on; }
  bool writethrough() const noexcept { return writethrough_; }

  // Data path. Requests beyond the end of the node fail with -EINVAL (reads, writes, zeroes) as in
  // QEMU's blk_check_byte_request; requests on a detached backend fail with -ENOMEDIUM.
  Task<int64_t> read(uint64_t offset, uint64_t length, void* buffer, uint32_t flags) noexcept;
  Task<int64_t> write(uint64_t offset, uint64_t length, const void* buffer,
                      uint32_t flags) noexcept;
  Task<int64_t> flush() noexcept;
  Task<int64_t> discard(uint64_t offset, uint64_t length) noexcept;
  Task<int64_t> write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept;
  Task<BlockStatus> block_status(uint64_t offset, uint64_t length) noexcept;
  Task<int64_t> cache(uint64_t offset, uint64_t length) noexcept;
  // Resizes the node; -EPERM unless this backend holds the resize permission.
  Task<int64_t> truncate(uint64_t size) noexcept;

  // A range of the node that the kernel reads or writes straight in a host file (see
  // Node::map_file), e.g. with sendfile or splice between the file and a socket. While it exists
  // it counts as a request in flight, so drain() waits for it and the node, with its descriptor,
  // stays attached; its end hands the range back to the node (Node::release_file). Move-only;
  // loop thread of the node.
  class MappedRange {
   public:
    MappedRange() = default;
    MappedRange(MappedRange&& other) noexcept;
    MappedRange& operator=(MappedRange&& other) noexcept;
    ~MappedRange();
    explicit operator bool() const noexcept { return backend_ != nullptr; }
    int fd() const noexcept { return range_.fd; }
    uint64_t file_offset() const noexcept { return range_.offset; }
    // The range's bytes in the node's mapping of the file, or null (FileRange::memory).
    const uint8_t* memory() const noexcept { return range_.memory; }
    // The same, writable: only for a range mapped with want_memory (map_write), else null.
    uint8_t* writable_memory() const noexcept {
      return access_ == MapAccess::kWriteMemory ? const_cast<uint8_t*>(range_.memory) : nullptr;
    }

   private:
    friend class BlockBackend;
    MappedRange(BlockBackend* backend, FileRange range, MapAccess access) noexcept;
    void release() noexcept;
    BlockBackend* backend_ = nullptr;
    FileRange range_;
    MapAccess access_ = MapAccess::kRead;
  };
  // Maps a read of [offset, offset + length) onto a host file; an empty MappedRange when the range
  // is not in one (the caller reads through read() instead) or is out of bounds.
  MappedRange map_read(uint64_t offset, uint64_t length) noexcept;
  // The same through Node::map_file_async (a node may take a while to answer; this counts as a
  // request in flight meanwhile).
  Task<MappedRange> map_read_async(uint64_t offset, uint64_t length) noexcept;
  // The same for a write with request `flags`. Empty also when this backend lacks the write
  // permission and when the write needs more than the bytes in the file: FUA, writethrough.
  // `want_memory`: the caller would copy the bytes in itself (MapAccess::kWriteMemory).
  MappedRange map_write(uint64_t offset, uint64_t length, uint32_t flags,
                        bool want_memory = false) noexcept;

  // Number of requests currently in flight through this backend.
  uint64_t in_flight() const noexcept { return in_flight_; }
  // Completes once no request is in flight (immediately if none is).
  Task<void> drain() noexcept;

 private:
  struct InFlight;
  int check_range(uint64_t offset, uint64_t length) const noexcept;
  MappedRange map(uint64_t offset, uint64_t length, MapAccess access) noexcept;

  std::string description_;
  std::shared_ptr<Node> root_;
  bool writethrough_ = false;
  uint64_t in_flight_ = 0;
  Event idle_;
};

}  // namespace blockd::block
