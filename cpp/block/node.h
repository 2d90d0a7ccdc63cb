// Block nodes: the vertices of the block graph.
//
// A Node is an opened driver instance (a file, a raw or qcow2 format layer, a null device, ...). It
// may have children (edges to the nodes it reads from, e.g. a raw node's "file") and is used by
// parents: other nodes' Child edges and BlockBackends. Every use declares which permissions it
// takes on the node and which it lets others take; Node enforces that no two uses conflict.
//
// Threads: the graph (creating nodes, attaching and detaching uses, permissions) changes only on
// the main loop. A node's I/O methods run on the loop that owns the node (its AioContext in QEMU
// terms), which is the main loop unless the node was moved to an iothread.
//
// Data-path methods are noexcept coroutines returning 0 or a positive count on success and a
// negative errno on failure; they never throw and never allocate per request.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/loop.h"
#include "runtime/status.h"
#include "runtime/task.h"

namespace blockd::block {

// Permissions a user may take on a node (the bits QEMU calls BLK_PERM_*; the order matters because
// the file driver's image locks use the bit index as the lock byte offset).
enum Permission : uint32_t {
  kPermConsistentRead = 1u << 0,
  kPermWrite = 1u << 1,
  kPermWriteUnchanged = 1u << 2,
  kPermResize = 1u << 3,
  kPermAll = (1u << 4) - 1,
};

// Names of the permissions in `mask`, comma separated ("write, resize"), as QEMU prints them.
std::string permission_names(uint32_t mask);

// Request flags for the data path.
enum RequestFlag : uint32_t {
  kRequestFua = 1u << 0,         // write: durable before the request completes
  kRequestMayUnmap = 1u << 1,    // write_zeroes: may deallocate instead of writing zeroes
  kRequestNoFallback = 1u << 2,  // write_zeroes: fail with -ENOTSUP rather than write slowly
};

// What block_status reports for a range.
enum StatusFlag : uint32_t {
  kStatusData = 1u << 0,       // the range holds data (not a hole)
  kStatusZero = 1u << 1,       // the range reads as zeroes
  kStatusAllocated = 1u << 2,  // allocated in this node (rather than from a backing file)
};

struct BlockStatus {
  int64_t bytes = 0;   // length of the run starting at the queried offset (> 0), or negative errno
  uint32_t flags = 0;  // StatusFlag bits valid for the whole run
};

// Where a node's bytes lie unchanged in a host file (Node::map_file); fd -1 when they do not.
struct FileRange {
  int fd = -1;
  uint64_t offset = 0;
  // The same bytes in a shared mapping of that file the node keeps, or null when it has none
  // covering the whole range. Read-only unless the range was mapped with kWriteMemory. If another
  // process shrinks the file, touching the memory here raises SIGBUS: hand it to the kernel
  // (sendmsg, write), which fails the transfer with EFAULT, or touch it only inside
  // run_fault_guarded (runtime/fault_guard.h).
  const uint8_t* memory = nullptr;
};

// What the caller of Node::map_file will do with the range. A write mapping promises more than a
// read one: that writing the bytes in the file is all a write needs (no copy-on-write, no
// metadata to update), for as long as the mapping lasts. kWriteMemory is a write mapping whose
// caller would rather copy the bytes into FileRange::memory itself (small writes, where a copy
// costs less than a system call): the driver then hands out a writable mapping where it can, and
// memory stays null where it cannot (the caller writes through the descriptor instead).
enum class MapAccess { kRead, kWrite, kWriteMemory };

class Node;

// A use of a node: a parent node's Child edge or a BlockBackend. Holds permissions on the node.
class User {
 public:
  virtual ~User() = default;
  // Who this use is, for conflict messages: "node 'raw0'", "block export 'exp0'".
  virtual std::string user_description() const = 0;
  // The role of the node for this use: the child name ("file") or "root" for a BlockBackend.
  virtual std::string role() const = 0;

  Node* node() const noexcept { return node_; }
  uint32_t permissions() const noexcept { return permissions_; }
  uint32_t shared_permissions() const noexcept { return shared_; }

 protected:
  friend class Node;
  Node* node_ = nullptr;
  uint32_t permissions_ = 0;
  uint32_t shared_ = kPermAll;
};

// The edge from a parent node to one of its children ("file", "children.0", ...).
class Child final : public User {
 public:
  Child(Node* parent, std::string name) : parent_(parent), name_(std::move(name)) {}
  ~Child() override;
  std::string user_description() const override;
  std::string role() const override { return name_; }

  Node* parent() const noexcept { return parent_; }
  const std::string& name() const noexcept { return name_; }

 private:
  friend class Node;
  Node* parent_;
  std::string name_;
  std::shared_ptr<Node> holder_;  // keeps the child node alive
};

// Common options every node has (BlockdevOptions base members that matter to us).
struct NodeOptions {
  std::string node_name;
  bool read_only = false;
  bool auto_read_only = false;
  bool cache_direct = false;
  bool cache_no_flush = false;
  bool force_share = false;
  std::string discard = "ignore";  // "ignore" or "unmap"
  std::string detect_zeroes = "off";
};

class Node {
 public:
  explicit Node(NodeOptions options);
  virtual ~Node();
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // ---- Identity and information (main loop).
  const std::string& node_name() const noexcept { return options_.node_name; }
  const NodeOptions& options() const noexcept { return options_; }
  // The driver name as in BlockdevDriver ("file", "raw", "null-co", ...).
  virtual std::string_view driver_name() const noexcept = 0;
  // The file name QEMU reports for this node ("/path", "null-co://", or "json:{...}").
  virtual std::string filename() const;
  // The options this node was opened with, as blockdev-add would take them ("json:" filenames).
  virtual nlohmann::json open_options() const = 0;
  // Bytes actually allocated on the host for this node (-1 if unknown).
  virtual int64_t allocated_size() const { return -1; }
  bool read_only() const noexcept { return options_.read_only; }
  // True when this node only passes data through to one child ("filter" in QEMU terms).
  virtual bool is_filter() const noexcept { return false; }

  // Size of the node in bytes. Cached; valid on any thread once opened.
  int64_t size() const noexcept { return size_; }
  // Alignment every request must honour (1 for most nodes; 512 or 4096 with O_DIRECT). Callers
  // that cannot align go through a node that handles it.
  virtual uint32_t request_alignment() const noexcept { return 1; }
  // Largest single request the node accepts; larger ones are split by the caller.
  virtual uint64_t max_transfer() const noexcept { return 32u << 20; }
  // Whether discard/write_zeroes are supported natively.
  virtual bool supports_discard() const noexcept { return false; }
  virtual bool supports_write_zeroes() const noexcept { return false; }

  // ---- Data path (the node's loop thread).
  virtual Task<int64_t> read(uint64_t offset, uint64_t length, void* buffer,
                             uint32_t flags) noexcept = 0;
  virtual Task<int64_t> write(uint64_t offset, uint64_t length, const void* buffer,
                              uint32_t flags) noexcept = 0;
  virtual Task<int64_t> flush() noexcept = 0;
  // Deallocates a range (a hint: it may do nothing). Default: nothing, success.
  virtual Task<int64_t> discard(uint64_t offset, uint64_t length) noexcept;
  // Makes the range read as zeroes. The default writes zero buffers (unless kRequestNoFallback).
  virtual Task<int64_t> write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept;
  // Describes the run starting at `offset` (at most `length` bytes). Default: all data.
  virtual Task<BlockStatus> block_status(uint64_t offset, uint64_t length) noexcept;
  // Prefetches a range into caches (NBD_CMD_CACHE). Default: a read that discards the data.
  virtual Task<int64_t> cache(uint64_t offset, uint64_t length) noexcept;
  // Where the `length` bytes at `offset` lie unchanged in a host file that can be read and written
  // without waiting for a device (a file in memory), so that a caller may have the kernel move
  // them between the file and a socket (sendfile, splice) instead of copying them through a
  // buffer; reading or writing them there is what read() and write() would do. fd -1 when there
  // is no such file:
  // drivers that transform or filter data (the default), O_DIRECT, files on disks (the transfer
  // would block the loop), ranges beyond a child's end. Bytes past the end of the host file read
  // as zeroes: a caller that gets fewer bytes than asked supplies zeroes for the rest. The
  // descriptor belongs to the node and stays open while the node is attached, so the caller keeps
  // its use busy (BlockBackend::MappedRange) until the transfer is over. `access` says whether the
  // kernel will read the bytes or write them (see MapAccess). A driver may hold something for
  // the mapping's lifetime (qcow2 holds its metadata lock shared, so that no cluster under the
  // mapping is freed or becomes shared meanwhile): every mapping with fd >= 0 is ended by exactly
  // one release_file with the same range and access. The same holds for the memory of a mapped
  // range (FileRange::memory). map_file never suspends. Node's loop thread.
  virtual FileRange map_file(uint64_t offset, uint64_t length, MapAccess access) noexcept;
  // map_file for a caller that can wait for the answer: a node whose mapping costs work of its
  // own (the quorum compares its children's bytes before it grants child 0's) does that work off
  // the loop thread, which meanwhile serves other requests. Otherwise as map_file, whose answer
  // the default gives.
  virtual Task<FileRange> map_file_async(uint64_t offset, uint64_t length,
                                         MapAccess access) noexcept;
  // A descriptor of the host file that holds this node's bytes unchanged at the same offsets,
  // from offset 0 on, for a caller that has the kernel read them there itself (the FUSE export's
  // passthrough opens); -1 when there is none (the default: drivers that transform, filter,
  // shift or combine data). The file may end before the node, which counts whole sectors: the
  // caller compares the sizes. The descriptor belongs to the node. Main loop.
  virtual int host_file() const noexcept { return -1; }
  // Ends a mapping that map_file granted. Default: nothing to release.
  virtual void release_file(const FileRange& range, MapAccess access) noexcept;
  // Changes the node's size to `size` bytes (the driver may round it up, as QEMU keeps sizes in
  // 512-byte sectors); new space reads as zeroes. The caller must hold the resize permission.
  // Default: -ENOTSUP (the driver cannot change its size).
  virtual Task<int64_t> truncate(uint64_t size) noexcept;

  // ---- Graph (main loop).
  const std::vector<std::unique_ptr<Child>>& children() const noexcept { return children_; }
  const std::vector<User*>& users() const noexcept { return users_; }
  // The child named "file", or null.
  Child* file_child() const noexcept;

  // Attaches `user` to this node with the given permissions, after checking them against every
  // other use (and, recursively, what this node then needs from its own children and the image
  // locks of file nodes). On failure nothing changes and the error names the conflicting use.
  Status attach(User& user, uint32_t permissions, uint32_t shared);
  // Changes the permissions of an attached use, with the same checks as attach.
  Status update_permissions(User& user, uint32_t permissions, uint32_t shared);
  // Detaches `user`; its permissions are released.
  void detach(User& user) noexcept;

  // Adds a child edge named `name` to `child` with the permissions this node needs from it given
  // its current users. The edge is owned by this node and keeps `child` alive.
  Expected<Child*> add_child(std::string name, std::shared_ptr<Node> child);

  // x-blockdev-change: attaches `child` as a new child of the driver's choosing, or detaches the
  // edge `child`. Drivers without a variable set of children refuse, with QEMU's messages ("The
  // node N does not support adding a child" / "... removing a child").
  virtual Status add_dynamic_child(std::shared_ptr<Node> child);
  virtual Status remove_dynamic_child(Child& child);

  // The loop that runs this node's I/O.
  Loop& loop() const noexcept { return *loop_; }
  void set_loop(Loop& loop) noexcept;

  // Moves this node and every node below it to `loop` (an iothread's, or back to the main loop),
  // provided that nothing outside the subtree uses any of them except `owner` (a user of this
  // node). Otherwise nothing moves and the error names the other use. Main loop; no request may
  // be in flight in the subtree.
  Status move_to_loop(Loop& loop, const User* owner);

 protected:
  // What this node needs from `child` given the combined needs of its own users (`permissions` and
  // `shared`). The default suits a format or filter: it forwards what users take, reads
  // consistently, and shares what its users share; a writable node also takes write on its file.
  virtual void child_permissions(const Child& child, uint32_t permissions, uint32_t shared,
                                 uint32_t& child_permissions, uint32_t& child_shared) const;
  // Checks that the node can grant `permissions` while letting others hold `shared`, beyond the
  // conflicts between users (e.g. the file driver tests its image locks). Must not change state.
  virtual Status check_permissions(uint32_t permissions, uint32_t shared);
  // Commits permissions that check_permissions accepted (e.g. takes the image locks).
  virtual void apply_permissions(uint32_t permissions, uint32_t shared);

  void set_size(int64_t size) noexcept { size_ = size; }
  // Drops the edge `child` (releasing its permissions, and the child node with it unless it is
  // used elsewhere). Main loop, with no request in flight on this node.
  void remove_child(Child& child) noexcept;

  NodeOptions options_;

 private:
  struct Change;
  Status check_change(const User* changing, uint32_t permissions, uint32_t shared,
                      std::vector<Change>& plan);
  void apply_plan(std::vector<Change>& plan);
  void combined_permissions(const User* replace, uint32_t replace_permissions,
                            uint32_t replace_shared, uint32_t& permissions, uint32_t& shared) const;

  std::vector<std::unique_ptr<Child>> children_;
  std::vector<User*> users_;
  int64_t size_ = 0;
  Loop* loop_ = nullptr;
};

// Validates a user-supplied node name as QEMU does: a letter first, then letters, digits, '-', '.'
// and '_', fewer than 32 characters.
Status validate_node_name(std::string_view name);

}  // namespace blockd::block
