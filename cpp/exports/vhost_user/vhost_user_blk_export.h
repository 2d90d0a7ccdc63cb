// The vhost-user-blk export: a node served as a virtio-blk device to a vhost-user front-end (QEMU's
// vhost-user-blk-pci), over a listening unix socket.
//
// Implements the back-end side of QEMU's docs/interop/vhost-user.rst for a block device: the
// front-end shares the guest's memory (SET_MEM_TABLE, regions mapped here from the descriptors it
// sends) and hands over each virtqueue (size, base, addresses, kick and call eventfds); the export
// then takes requests straight from the split rings in guest memory (virtqueue.h), runs each on
// the node in a coroutine of its own, many at once (blk.h), puts the chain in the used ring and
// signals the call eventfd. See vhost_user_blk_export.cc for the messages served.
//
// One front-end at a time, as in qemu-storage-daemon: while one is connected, others wait in the
// listen backlog; when it goes away its requests are drained, its mappings and descriptors
// dropped, and the next is accepted.
//
// Threads: the export serves on its node's loop (the main loop, or an iothread's when the node
// was moved there before create()). The main loop creates it (permissions, listening socket),
// lists it and shuts it down; shut_down() hops to the serving loop for the front-end and back
// for the graph work.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "block/backend.h"
#include "block/node.h"
#include "exports/export.h"
#include "exports/vhost_user/blk.h"
#include "runtime/event.h"
#include "runtime/loop.h"
#include "runtime/status.h"
#include "runtime/stream_address.h"
#include "runtime/task.h"

namespace blockd::exports::vhost_user {

struct VhostUserBlkExportOptions {
  std::string id;
  StreamAddress address;  // kUnix only
  uint32_t logical_block_size = 512;
  uint16_t num_queues = 1;
  bool writable = false;
  bool writethrough = false;
};

class VhostUserBlkExport final : public Export {
 public:
  // Takes the node's permissions (consistent read, and write when writable; everything shared
  // but resize) and starts listening; front-ends are served on the node's loop. Errors
  // (GenericError): "Cannot export read-only node as writable", permission conflicts, and
  // listen_unix's ("Failed to bind socket to <path>: ..."). Main loop (`main`).
  static Expected<std::shared_ptr<VhostUserBlkExport>> create(
      Loop& main, const VhostUserBlkExportOptions& options, std::shared_ptr<block::Node> node);
  ~VhostUserBlkExport() override;

  std::string_view type_name() const noexcept override { return "vhost-user-blk"; }
  // 0: as in qemu-storage-daemon, a connected front-end does not keep block-export-del
  // (mode=safe) from removing the export; it is disconnected.
  size_t client_count() const noexcept override { return 0; }
  // Whether a front-end is connected. Serving loop.
  bool connected() const noexcept { return connected_; }
  // Stops listening, drops the front-end (after its requests have finished), releases the node
  // (moving it back to the main loop when it was served in an iothread and nothing else uses it).
  Task<void> shut_down() override;

  struct Connection;
  struct Queue;

 private:
  VhostUserBlkExport(Loop& main, Loop& serving, const VhostUserBlkExportOptions& options,
                     std::string node_name);
  Task<void> accept_loop();
  Task<void> serve(int fd);
  // Handles one message; false drops the connection (after logging why).
  Task<bool> handle(Connection& connection);
  Task<void> watch_kicks(Connection& connection, Queue& queue);
  void process_queue(Connection& connection, Queue& queue);
  Task<void> run_request(Connection& connection, Queue& queue, std::unique_ptr<Chain> chain);
  // Stops taking requests from `queue` and waits for the ones it has in flight.
  Task<void> stop_queue(Queue& queue);
  void log(const std::string& message) const;

  Loop& main_;
  Loop& loop_;  // the serving loop
  StreamAddress address_;
  BlkDeviceOptions device_;
  bool writethrough_ = false;  // the export's writethrough option
  std::unique_ptr<block::BlockBackend> backend_;
  int listen_fd_ = -1;
  bool stopping_ = false;
  bool accepting_ = false;
  bool connected_ = false;
  Completion* pending_accept_ = nullptr;
  Connection* connection_ = nullptr;
  Event progress_;
  std::vector<std::unique_ptr<Chain>> spare_chains_;
};

}  // namespace blockd::exports::vhost_user
