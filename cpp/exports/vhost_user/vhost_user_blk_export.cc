// The vhost-user-blk export (see vhost_user_blk_export.h).
//
// Messages served (docs/interop/vhost-user.rst): GET_FEATURES / SET_FEATURES (virtio-blk's bits,
// VERSION_1, INDIRECT_DESC, EVENT_IDX, PROTOCOL_FEATURES), GET_PROTOCOL_FEATURES /
// SET_PROTOCOL_FEATURES (MQ, REPLY_ACK, CONFIG), SET_OWNER, RESET_OWNER, GET_QUEUE_NUM,
// SET_MEM_TABLE, SET_VRING_NUM / ADDR / BASE / KICK / CALL / ERR / ENABLE, GET_VRING_BASE,
// GET_CONFIG, SET_CONFIG (the write-cache byte). Anything else, and any malformed message, drops
// the connection with a log line saying why; a malformed ring or chain stops that queue only.
//
// A queue serves requests once it has its addresses and a kick descriptor, as libvhost-user
// based back-ends do, whether or not SET_VRING_ENABLE has been seen. Each kick wakes a watcher
// coroutine (an io_uring poll on the kick eventfd) that takes every available chain and starts
// a coroutine per request. GET_VRING_BASE stops the watcher and waits for the queue's requests
// before it answers, so the base it returns covers everything completed. A new memory table
// waits for every request in flight (they point into the old mappings) before it replaces them.
//
// The write cache: as with qemu-storage-daemon 7.2, the guest first sees the configuration's
// writeback byte at 0 (a write-through device, to which it sends no flushes). Unlike it, blockd
// then keeps that promise: while the byte is 0 every write is flushed before it completes. A guest
// that turns the byte on (SET_CONFIG, e.g. "write back" into /sys/block/vda/queue/write_cache)
// gets the node's own caching, with writethrough=on still flushing every write.

#include "exports/vhost_user/vhost_user_blk_export.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "runtime/hop.h"
#include "runtime/unix_listen.h"

namespace blockd::exports::vhost_user {

namespace {

constexpr int kBacklog = 1;

void close_fd(int& fd) noexcept {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

}  // namespace

struct VhostUserBlkExport::Queue {
  ~Queue() {
    close_fd(kick_fd);
    close_fd(call_fd);
    close_fd(err_fd);
  }
  uint32_t index = 0;
  SplitQueue ring;
  VringAddress address;
  bool has_address = false;
  int kick_fd = -1;
  int call_fd = -1;
  int err_fd = -1;
  bool enabled = false;
  bool broken = false;
  bool watching = false;
  bool stop_watching = false;
  Completion* pending_poll = nullptr;
  uint32_t in_flight = 0;
  Event changed;
};

struct VhostUserBlkExport::Connection {
  ~Connection() {
    for (int& fd : fds) close_fd(fd);
    close_fd(fd);
  }
  int fd = -1;
  uint64_t features = 0;
  uint64_t protocol_features = 0;
  GuestMemory memory;
  bool paused = false;  // a new memory table is being installed
  std::vector<std::unique_ptr<Queue>> queues;
  // The message being handled and the descriptors it brought (closed unless taken).
  Header header;
  std::vector<uint8_t> payload;
  std::vector<int> fds;
  Completion* pending_poll = nullptr;

  // Takes the first descriptor of the message (-1 when there is none).
  int take_fd() noexcept {
    if (fds.empty()) return -1;
    const int taken = fds.front();
    fds.erase(fds.begin());
    return taken;
  }
};

namespace {

using Connection = VhostUserBlkExport::Connection;

// Waits until the connection's socket reports `events`; false when the wait was cancelled.
Task<bool> wait_socket(Loop& loop, Connection& connection, unsigned events) {
  auto ready = loop.poll(connection.fd, events);
  connection.pending_poll = &ready;
  const int result = co_await ready;
  connection.pending_poll = nullptr;
  co_return result >= 0;
}

// Reads exactly `length` bytes, keeping the descriptors that come with them. 1: done, 0: the
// front-end closed the connection, negative errno: failure.
Task<int> receive_exactly(Loop& loop, Connection& connection, uint8_t* buffer, size_t length) {
  size_t got = 0;
  while (got < length) {
    iovec vector{buffer + got, length - got};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    msghdr message{};
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    message.msg_control = control;
    message.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(connection.fd, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) co_return -errno;
      if (!co_await wait_socket(loop, connection, POLLIN)) co_return 0;
      continue;
    }
    for (cmsghdr* header = CMSG_FIRSTHDR(&message); header != nullptr;
         header = CMSG_NXTHDR(&message, header)) {
      if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(header) + i * sizeof(int), sizeof fd);
        connection.fds.push_back(fd);
      }
    }
    if (message.msg_flags & MSG_CTRUNC) co_return -EMSGSIZE;
    if (n == 0) co_return 0;
    got += static_cast<size_t>(n);
  }
  co_return 1;
}

// Sends a reply to the message being handled. False when the connection failed.
Task<bool> send_reply(Loop& loop, Connection& connection, const uint8_t* payload, size_t size) {
  std::vector<uint8_t> bytes(kHeaderSize + size);
  store_header(bytes.data(), Header{connection.header.request, kVersion | kFlagReply,
                                    static_cast<uint32_t>(size)});
  if (size > 0) std::memcpy(bytes.data() + kHeaderSize, payload, size);
  size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = ::send(connection.fd, bytes.data() + sent, bytes.size() - sent,
                             MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN) co_return false;
      if (!co_await wait_socket(loop, connection, POLLOUT)) co_return false;
      continue;
    }
    sent += static_cast<size_t>(n);
  }
  co_return true;
}

Task<bool> send_u64(Loop& loop, Connection& connection, uint64_t value) {
  uint8_t bytes[8];
  store64(bytes, value);
  co_return co_await send_reply(loop, connection, bytes, sizeof bytes);
}

}  // namespace

VhostUserBlkExport::VhostUserBlkExport(Loop& main, Loop& serving,
                                       const VhostUserBlkExportOptions& options,
                                       std::string node_name)
    : Export(options.id, std::move(node_name)),
      main_(main),
      loop_(serving),
      address_(options.address),
      backend_(std::make_unique<block::BlockBackend>("block export '" + options.id + "'")) {
  device_.logical_block_size = options.logical_block_size;
  device_.num_queues = options.num_queues;
  device_.writable = options.writable;
  device_.write_cache = false;
}

VhostUserBlkExport::~VhostUserBlkExport() {
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    if (!address_.abstract) ::unlink(address_.path.c_str());
  }
}

Expected<std::shared_ptr<VhostUserBlkExport>> VhostUserBlkExport::create(
    Loop& main, const VhostUserBlkExportOptions& options, std::shared_ptr<block::Node> node) {
  if (options.writable && node->read_only()) {
    return Status::generic("Cannot export read-only node as writable");
  }
  std::shared_ptr<VhostUserBlkExport> created(
      new VhostUserBlkExport(main, node->loop(), options, node->node_name()));
  // As qemu-storage-daemon: resize is the one thing others may not do while the export runs.
  const uint32_t permissions =
      block::kPermConsistentRead | (options.writable ? block::kPermWrite : 0u);
  const uint32_t shared = block::kPermAll & ~block::kPermResize;
  BLOCKD_RETURN_IF_ERROR(created->backend_->attach(std::move(node), permissions, shared));
  created->writethrough_ = options.writethrough;
  created->backend_->set_writethrough(true);
  created->device_.size = static_cast<uint64_t>(created->backend_->size());
  auto listening = listen_unix(options.address, kBacklog);
  if (!listening) {
    created->backend_->detach();
    return listening.status();
  }
  created->listen_fd_ = *listening;
  created->accepting_ = true;
  // The accept loop starts on the serving loop; shut_down() hops there after it (post keeps the
  // order), so the export is still alive when it runs.
  VhostUserBlkExport* self = created.get();
  self->loop_.spawn_or_post([self] { return self->accept_loop(); });
  return created;
}

void VhostUserBlkExport::log(const std::string& message) const {
  std::fprintf(stderr, "blockd: vhost-user-blk export '%s': %s\n", id().c_str(), message.c_str());
}

Task<void> VhostUserBlkExport::accept_loop() {
  while (!stopping_) {
    auto readable = loop_.poll(listen_fd_, POLLIN);
    pending_accept_ = &readable;
    const int result = co_await readable;
    pending_accept_ = nullptr;
    if (stopping_ || result < 0) break;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) continue;
    co_await serve(fd);
  }
  accepting_ = false;
  progress_.notify_all();
}

Task<void> VhostUserBlkExport::serve(int fd) {
  Connection connection;
  connection.fd = fd;
  for (uint32_t i = 0; i < device_.num_queues; ++i) {
    connection.queues.push_back(std::make_unique<Queue>());
    connection.queues.back()->index = i;
  }
  connection_ = &connection;
  connected_ = true;
  while (!stopping_ && co_await handle(connection)) {
  }
  for (auto& queue : connection.queues) co_await stop_queue(*queue);
  connection_ = nullptr;
  connected_ = false;
  progress_.notify_all();
}

Task<void> VhostUserBlkExport::stop_queue(Queue& queue) {
  queue.stop_watching = true;
  if (queue.pending_poll != nullptr) loop_.cancel(queue.pending_poll);
  while (queue.watching || queue.in_flight > 0) co_await queue.changed.wait();
  queue.stop_watching = false;
}

Task<void> VhostUserBlkExport::watch_kicks(Connection& connection, Queue& queue) {
  while (!queue.stop_watching) {
    auto readable = loop_.poll(queue.kick_fd, POLLIN);
    queue.pending_poll = &readable;
    const int result = co_await readable;
    queue.pending_poll = nullptr;
    if (queue.stop_watching) break;
    if (result < 0) {
      log("queue " + std::to_string(queue.index) + ": waiting for a kick failed: " +
          errno_text(result));
      break;
    }
    uint64_t count;
    (void)!::read(queue.kick_fd, &count, sizeof count);
    process_queue(connection, queue);
  }
  queue.watching = false;
  queue.changed.notify_all();
}

void VhostUserBlkExport::process_queue(Connection& connection, Queue& queue) {
  if (queue.broken || connection.paused || !queue.ring.ready()) return;
  while (true) {
    std::unique_ptr<Chain> chain;
    if (spare_chains_.empty()) {
      chain = std::make_unique<Chain>();
    } else {
      chain = std::move(spare_chains_.back());
      spare_chains_.pop_back();
    }
    std::string error;
    const int popped = queue.ring.pop(connection.memory, *chain, error);
    if (popped < 0) {
      log("queue " + std::to_string(queue.index) + ": " + error + "; the queue is stopped");
      queue.broken = true;
      spare_chains_.push_back(std::move(chain));
      return;
    }
    if (popped == 0) {
      spare_chains_.push_back(std::move(chain));
      if (queue.ring.arm_kick()) continue;
      return;
    }
    loop_.spawn(run_request(connection, queue, std::move(chain)));
  }
}

Task<void> VhostUserBlkExport::run_request(Connection& connection, Queue& queue,
                                           std::unique_ptr<Chain> chain) {
  ++queue.in_flight;
  const uint32_t written = co_await run_blk_request(*backend_, device_, *chain);
  if (written == 0) {
    log("queue " + std::to_string(queue.index) + ": a request without room for its status");
  }
  queue.ring.push(chain->head, written);
  if (queue.ring.should_notify() && queue.call_fd >= 0) (void)eventfd_write(queue.call_fd, 1);
  spare_chains_.push_back(std::move(chain));
  (void)connection;
  --queue.in_flight;
  queue.changed.notify_all();
}

Task<bool> VhostUserBlkExport::handle(Connection& connection) {
  for (int& fd : connection.fds) close_fd(fd);
  connection.fds.clear();
  uint8_t header_bytes[kHeaderSize];
  int received = co_await receive_exactly(loop_, connection, header_bytes, kHeaderSize);
  if (received <= 0) {
    if (received < 0) log("reading a message failed: " + errno_text(received));
    co_return false;
  }
  auto header = parse_header(std::span<const uint8_t, kHeaderSize>(header_bytes, kHeaderSize));
  if (!header) {
    log(header.status().message());
    co_return false;
  }
  connection.header = *header;
  connection.payload.resize(header->size);
  if (header->size > 0) {
    received = co_await receive_exactly(loop_, connection, connection.payload.data(), header->size);
    if (received <= 0) {
      log("the front-end closed the connection inside a message");
      co_return false;
    }
  }
  const std::span<const uint8_t> payload(connection.payload);
  const std::string name = request_name(header->request);
  auto fail = [&](const std::string& why) {
    log(name + ": " + why + "; dropping the front-end");
    return false;
  };
  // The queue a vring message names, or null.
  auto queue_at = [&](uint64_t index) -> Queue* {
    return index < connection.queues.size() ? connection.queues[index].get() : nullptr;
  };
  bool ack_result = true;  // for REPLY_ACK
  bool replied = false;

  switch (static_cast<Request>(header->request)) {
    case Request::kGetFeatures:
      replied = true;
      if (!co_await send_u64(loop_, connection,
                             blk_features(device_) | kFeatureVersion1 | kFeatureIndirectDesc |
                                 kFeatureEventIdx | kFeatureProtocolFeatures)) {
        co_return false;
      }
      break;
    case Request::kSetFeatures: {
      auto value = parse_u64(payload);
      if (!value) co_return fail(value.status().message());
      connection.features = *value;
      for (auto& queue : connection.queues) {
        queue->ring.set_event_index((*value & kFeatureEventIdx) != 0);
      }
      break;
    }
    case Request::kGetProtocolFeatures:
      replied = true;
      if (!co_await send_u64(loop_, connection, kProtocolMq | kProtocolReplyAck | kProtocolConfig)) {
        co_return false;
      }
      break;
    case Request::kSetProtocolFeatures: {
      auto value = parse_u64(payload);
      if (!value) co_return fail(value.status().message());
      connection.protocol_features = *value;
      break;
    }
    case Request::kSetOwner:
      break;
    case Request::kResetOwner:
      for (auto& queue : connection.queues) {
        co_await stop_queue(*queue);
        queue->ring.reset_addresses();
        queue->has_address = false;
        close_fd(queue->kick_fd);
      }
      connection.features = 0;
      break;
    case Request::kGetQueueNum:
      replied = true;
      if (!co_await send_u64(loop_, connection, device_.num_queues)) co_return false;
      break;
    case Request::kSetMemTable: {
      auto regions = parse_memory_table(payload, connection.fds.size());
      if (!regions) co_return fail(regions.status().message());
      // Requests in flight point into the old mappings.
      connection.paused = true;
      for (auto& queue : connection.queues) {
        while (queue->in_flight > 0) co_await queue->changed.wait();
      }
      auto mapped = GuestMemory::map(*regions, connection.fds);
      if (!mapped) {
        connection.paused = false;
        co_return fail(mapped.status().message());
      }
      connection.memory = std::move(mapped).value();
      connection.paused = false;
      for (auto& queue : connection.queues) {
        if (!queue->has_address) continue;
        Status translated = queue->ring.set_addresses(connection.memory, queue->address);
        if (!translated) co_return fail(translated.message());
        process_queue(connection, *queue);
      }
      break;
    }
    case Request::kSetVringNum: {
      auto state = parse_vring_state(payload);
      if (!state) co_return fail(state.status().message());
      Queue* queue = queue_at(state->index);
      if (queue == nullptr) co_return fail("no queue " + std::to_string(state->index));
      Status sized = queue->ring.set_size(state->value);
      if (!sized) co_return fail(sized.message());
      break;
    }
    case Request::kSetVringAddr: {
      auto address = parse_vring_address(payload);
      if (!address) co_return fail(address.status().message());
      Queue* queue = queue_at(address->index);
      if (queue == nullptr) co_return fail("no queue " + std::to_string(address->index));
      Status translated = queue->ring.set_addresses(connection.memory, *address);
      if (!translated) co_return fail(translated.message());
      queue->address = *address;
      queue->has_address = true;
      break;
    }
    case Request::kSetVringBase: {
      auto state = parse_vring_state(payload);
      if (!state) co_return fail(state.status().message());
      Queue* queue = queue_at(state->index);
      if (queue == nullptr) co_return fail("no queue " + std::to_string(state->index));
      queue->ring.set_base(static_cast<uint16_t>(state->value));
      break;
    }
    case Request::kGetVringBase: {
      auto state = parse_vring_state(payload);
      if (!state) co_return fail(state.status().message());
      Queue* queue = queue_at(state->index);
      if (queue == nullptr) co_return fail("no queue " + std::to_string(state->index));
      co_await stop_queue(*queue);
      const uint16_t base = queue->ring.last_available();
      queue->ring.reset_addresses();
      queue->has_address = false;
      queue->broken = false;
      close_fd(queue->kick_fd);
      uint8_t reply[8];
      store32(reply, state->index);
      store32(reply + 4, base);
      replied = true;
      if (!co_await send_reply(loop_, connection, reply, sizeof reply)) co_return false;
      break;
    }
    case Request::kSetVringKick:
    case Request::kSetVringCall:
    case Request::kSetVringErr: {
      auto value = parse_u64(payload);
      if (!value) co_return fail(value.status().message());
      Queue* queue = queue_at(*value & kVringIndexMask);
      if (queue == nullptr) co_return fail("no queue " + std::to_string(*value & kVringIndexMask));
      const bool has_fd = (*value & kVringNoFd) == 0;
      if (has_fd && connection.fds.size() != 1) co_return fail("expected one file descriptor");
      const int fd = has_fd ? connection.take_fd() : -1;
      if (header->request == static_cast<uint32_t>(Request::kSetVringCall)) {
        close_fd(queue->call_fd);
        queue->call_fd = fd;
      } else if (header->request == static_cast<uint32_t>(Request::kSetVringErr)) {
        close_fd(queue->err_fd);
        queue->err_fd = fd;
      } else {
        if (fd < 0) co_return fail("polling a queue without a kick descriptor is not supported");
        co_await stop_queue(*queue);
        close_fd(queue->kick_fd);
        queue->kick_fd = fd;
        if (!queue->ring.ready()) co_return fail("kick descriptor for a ring without addresses");
        queue->ring.start();
        queue->broken = false;
        queue->watching = true;
        loop_.spawn(watch_kicks(connection, *queue));
        // Requests may have been queued before the kick descriptor arrived.
        process_queue(connection, *queue);
      }
      break;
    }
    case Request::kSetVringEnable: {
      auto state = parse_vring_state(payload);
      if (!state) co_return fail(state.status().message());
      Queue* queue = queue_at(state->index);
      if (queue == nullptr) co_return fail("no queue " + std::to_string(state->index));
      queue->enabled = state->value != 0;
      break;
    }
    case Request::kGetConfig: {
      auto range = parse_config(payload);
      if (!range) co_return fail(range.status().message());
      const auto config = blk_config(device_);
      std::vector<uint8_t> reply(kConfigHeaderSize + range->size, 0);
      std::memcpy(reply.data(), payload.data(), kConfigHeaderSize);
      for (uint32_t i = 0; i < range->size; ++i) {
        const uint64_t at = uint64_t{range->offset} + i;
        if (at < config.size()) reply[kConfigHeaderSize + i] = config[at];
      }
      replied = true;
      if (!co_await send_reply(loop_, connection, reply.data(), reply.size())) co_return false;
      break;
    }
    case Request::kSetConfig: {
      auto range = parse_config(payload);
      if (!range) co_return fail(range.status().message());
      // Only the writeback byte is writable, and only by the front-end itself (flags 0).
      if (range->flags != 0 || range->offset != kBlkConfigWceOffset || range->size != 1) {
        log(name + ": only the write cache byte can be changed");
        ack_result = false;
        break;
      }
      device_.write_cache = range->bytes[0] != 0;
      backend_->set_writethrough(!device_.write_cache || writethrough_);
      break;
    }
    default:
      co_return fail("not supported by blockd");
  }
  if (!replied && (connection.protocol_features & kProtocolReplyAck) &&
      (header->flags & kFlagNeedReply)) {
    if (!co_await send_u64(loop_, connection, ack_result ? 0 : 1)) co_return false;
  }
  co_return true;
}

Task<void> VhostUserBlkExport::shut_down() {
  set_shutting_down();
  // The front-end is served, and dropped, on the serving loop.
  co_await HopTo{loop_};
  stopping_ = true;
  if (pending_accept_ != nullptr) loop_.cancel(pending_accept_);
  if (connection_ != nullptr) {
    ::shutdown(connection_->fd, SHUT_RDWR);
    if (connection_->pending_poll != nullptr) loop_.cancel(connection_->pending_poll);
  }
  while (accepting_ || connected_) co_await progress_.wait();
  co_await backend_->drain();
  // The rest is graph work, on the main loop.
  co_await HopTo{main_};
  ::close(listen_fd_);
  listen_fd_ = -1;
  if (!address_.abstract) ::unlink(address_.path.c_str());
  backend_->detach_to(main_);
}

}  // namespace blockd::exports::vhost_user
