// One NBD client connection (private to the NBD server).
//
// A connection runs as one coroutine (run): the handshake, then the transmission phase. In the
// transmission phase the reading coroutine decodes requests and spawns one Task per request; the
// tasks complete in any order and hand their replies to a writer coroutine that gathers the
// replies ready at the same time into one sendmsg. Small reads and writes of a file in memory
// need no task: the reader completes them and queues their replies itself. The reader stops taking requests while too many
// are in flight or too many payload bytes are buffered, so a client cannot make the server
// allocate without bound.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <coroutine>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "exports/nbd/protocol.h"
#include "exports/nbd/server.h"
#include "runtime/event.h"
#include "runtime/loop.h"
#include "runtime/task.h"

namespace blockd::exports::nbd {

// A request payload buffer, 4 KiB aligned so O_DIRECT nodes need no bounce buffer.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t capacity);
  Buffer(Buffer&& other) noexcept;
  Buffer& operator=(Buffer&& other) noexcept;
  ~Buffer();
  uint8_t* data() const noexcept { return data_; }
  size_t capacity() const noexcept { return capacity_; }
  explicit operator bool() const noexcept { return data_ != nullptr; }

 private:
  uint8_t* data_ = nullptr;
  size_t capacity_ = 0;
};

// Recycles payload buffers of a connection: power-of-two sizes up to 1 MiB, at most 16 MiB in all
// (a client streaming 1 MiB requests at queue depth 16 reuses every buffer; a buffer that is freed
// and allocated again costs a page fault per 4 KiB), and nothing once the connection is gone.
class BufferPool {
 public:
  Buffer get(size_t size);
  void put(Buffer buffer);

 private:
  static constexpr size_t kMaxCachedSize = 1u << 20;
  static constexpr size_t kMaxCachedBytes = 16u << 20;
  std::vector<Buffer> free_;
  size_t cached_bytes_ = 0;
};

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(Server& server, int fd);
  ~Connection();

  // The connection's whole life; ends when the client is gone and every request has finished.
  static Task<void> run(std::shared_ptr<Connection> self);

  // Drops the client: pending reads end, the connection winds down. Idempotent.
  void disconnect() noexcept;

  NbdExport* attached_export() const noexcept { return export_.get(); }

 private:
  // A reply waiting for the writer. Lives in the requesting task's frame.
  struct PendingReply {
    static constexpr int kMaxIovecs = 24;
    iovec iov[kMaxIovecs];
    int count = 0;
    size_t bytes = 0;
    bool sent = false;
    std::coroutine_handle<> waiter;
    PendingReply* next = nullptr;
    // Bytes the kernel moves from a host file to the socket after the iovecs (a read mapped onto
    // a file: no copy through a buffer); none when file_fd is -1.
    int file_fd = -1;
    uint64_t file_offset = 0;
    uint64_t file_length = 0;
    // Keeps the file range valid (and, for some drivers, the node busy) until it is sent.
    block::BlockBackend::MappedRange mapped;
    // The file range copied out, once a stalled client made the writer end the mapping early;
    // sent in its place.
    Buffer copy;
    void add(const void* base, size_t length) {
      iov[count].iov_base = const_cast<void*>(base);
      iov[count].iov_len = length;
      ++count;
      bytes += length;
    }
  };
  // The reply of a request the reader completed itself (complete_inline): no task waits on it;
  // the writer recycles it once sent. Owned by the connection (spare_replies_ or the queue).
  struct InlineReply : PendingReply {
    uint8_t header[kExtendedChunkHeaderSize + 8];
    // A write waiting in mapped_writes_: its request, and its payload's place in the receive
    // buffer and in the node's writable mapping (reply.mapped).
    Request request;
    const uint8_t* source = nullptr;
    uint8_t* target = nullptr;
    size_t length = 0;
  };
  struct SendAwaiter {
    Connection* connection;
    PendingReply* reply;
    bool await_ready() const noexcept { return connection->broken_; }
    void await_suspend(std::coroutine_handle<> handle) noexcept;
    bool await_resume() const noexcept { return reply->sent; }
  };

  // Socket helpers; false when the client is gone or the socket failed. Reads go through a
  // receive buffer so that one recv picks up every request the client has pipelined; large
  // payloads bypass it.
  Task<bool> read_exact(void* buffer, size_t length);
  Task<bool> discard(uint64_t length);
  // Receives until the receive buffer holds at least `length` (at most half its size) unread
  // bytes, moving them to its start first; false when the client is gone.
  Task<bool> buffer_at_least(size_t length);
  // Sends all of `iov`; `flags` are added to MSG_NOSIGNAL. With MSG_DONTWAIT a full socket is
  // waited for with wait_for_room() instead of in the kernel.
  Task<bool> send_all(iovec* iov, int count, int flags = 0);
  // The writer's sends (through the ring, so replies enqueued while it suspends join its next
  // batch): non-blocking, waiting for room with wait_for_room().
  Task<bool> send_out(iovec* iov, int count) { return send_all(iov, count, MSG_DONTWAIT); }
  // Waits until the socket takes more bytes. After kStallGrace without room, ends the mappings of
  // every reply not yet sent (their data is copied into buffers), so that a client that stops
  // reading cannot keep a node busy. False when the socket failed.
  Task<bool> wait_for_room();
  // Copies the file range of `reply` into reply.copy and ends its mapping; on failure the
  // connection is marked broken (the reply cannot be sent).
  void unmap_reply(PendingReply& reply) noexcept;
  Task<bool> send_bytes(const void* data, size_t length);
  // Creates the pipe receive_into_file uses, once; false when the process has no descriptors left.
  bool ensure_pipe() noexcept;
  // Receives a write payload of `length` bytes straight into a host file at `file_offset`: into
  // `memory`, the node's writable mapping of that range (what the receive buffer already holds is
  // copied from there, the rest received from the socket), or without one through the descriptor
  // (what the receive buffer holds is written from there, the rest spliced through a pipe). False when the client is gone; `file_error` is set (a negative errno) when the file
  // failed, in which case the rest of the payload is consumed and dropped. Stops early when the
  // socket stays empty for kStallGrace or the file shrank under `memory`: `received` tells how
  // much of the payload was taken (the caller ends the mapping and receives the rest another way).
  Task<bool> receive_into_file(int file_fd, uint64_t file_offset, uint8_t* memory,
                               uint64_t length, int& file_error, uint64_t& received);
  // Sends the file range of `reply` with sendfile (or from reply.copy), zeroes for what lies past
  // the file's end. False when the socket or the file failed.
  Task<bool> send_file(PendingReply& reply);

  // Handshake.
  Task<bool> handshake();
  Task<bool> send_option_reply(uint32_t option, uint32_t type, std::span<const uint8_t> data);
  Task<bool> send_option_error(uint32_t option, uint32_t type, std::string_view message);
  Task<bool> send_info(uint32_t option, uint16_t type, std::span<const uint8_t> data);
  void attach(NbdExport* nbd_export);
  // After NBD_OPT_STARTTLS was acknowledged: runs the TLS handshake on the client's socket, then
  // hands that socket to a tunnel (Server::spawn_tunnel) and continues on the cleartext end of a
  // socket pair, so everything after (options, transmission, sendfile and splice) is encrypted by
  // the tunnel. False when the handshake failed: the connection must end.
  Task<bool> start_tls();
  static Task<void> watchdog(std::shared_ptr<Connection> self);

  // Transmission.
  Task<void> transmission();
  // `written`: a write whose payload the reader already put in place (receive_into_file).
  static Task<void> handle_request(std::shared_ptr<Connection> self, Request request,
                                   uint32_t error, Buffer buffer, bool written);
  Task<void> writer();
  SendAwaiter send(PendingReply& reply) { return SendAwaiter{this, &reply}; }
  // Appends `reply` to the writer's queue (and wakes the writer when the reader is idle).
  void enqueue(PendingReply& reply) noexcept;
  // Completes a small read or write of a file in memory on the spot, with no task: a read's reply
  // points into the node's mapping (Node::map_file memory), a write's payload goes from the
  // receive buffer into the file with one pwrite. True when the request was handled (its payload
  // consumed and its reply queued); false when it must take the usual path (nothing consumed).
  bool complete_inline(const Request& request, uint64_t payload_length);
  // Copies the payloads of mapped_writes_ into the node's mapping, in one fault-guarded call (a
  // file shrunk by another process makes them all go through pwrite instead), and queues their
  // replies. Called before the receive buffer they lie in is refilled, i.e. whenever the reader
  // goes idle.
  void flush_mapped_writes() noexcept;
  // A reply from spare_replies_ (or a new one).
  InlineReply& take_reply();
  // Returns a sent (or never sent) inline reply to spare_replies_ and ends its request; the
  // caller wakes progress_.
  void recycle(InlineReply& reply) noexcept;

  Server& server_;
  Loop* loop_;  // the server's (main) loop, or the export's iothread during transmission
  int fd_;
  bool disconnected_ = false;  // main loop
  bool on_export_loop_ = false;  // main loop: the transmission runs in the export's iothread
  static constexpr size_t kReceiveBufferSize = 128u << 10;
  std::unique_ptr<uint8_t[]> receive_buffer_;
  size_t receive_start_ = 0;  // unread bytes are [receive_start_, receive_end_)
  size_t receive_end_ = 0;
  // The pipe that write payloads pass through from the socket to a file, once one did; -1 before.
  int pipe_read_ = -1;
  int pipe_write_ = -1;
  size_t pipe_size_ = 0;

  // Handshake state.
  bool fixed_newstyle_ = false;
  bool no_zeroes_ = false;
  ReplyMode reply_mode_ = ReplyMode::kSimple;
  bool base_allocation_ = false;     // base:allocation selected by SET_META_CONTEXT...
  std::string meta_context_export_;  // ...for this export name
  bool handshake_done_ = false;
  bool tls_active_ = false;
  Completion* watchdog_timer_ = nullptr;
  std::shared_ptr<NbdExport> export_;
  uint16_t flags_ = 0;  // transmission flags sent to the client

  // Transmission state.
  BufferPool pool_;
  // A range the node reported as data (not zero), so large reads inside it skip the sparseness
  // query.
  uint64_t known_data_start_ = 0;
  uint64_t known_data_end_ = 0;
  uint32_t in_flight_ = 0;
  uint64_t buffered_bytes_ = 0;
  bool closing_ = false;
  Event progress_;  // a request finished, or the writer stopped
  PendingReply* queue_head_ = nullptr;
  PendingReply* queue_tail_ = nullptr;
  Event queue_changed_;
  // Every inline reply made so far (at most max_requests_in_flight), and those ready for reuse.
  std::vector<std::unique_ptr<InlineReply>> inline_replies_;
  std::vector<InlineReply*> spare_replies_;
  // Small writes of this receive buffer's worth of requests, to be copied into a file mapping.
  std::vector<InlineReply*> mapped_writes_;
  // The replies the writer is sending now.
  std::vector<PendingReply*> sending_;
  // The client took nothing for kStallGrace while replies waited: until the queue is empty again,
  // replies carry no mapping (they are copied into buffers instead).
  bool send_stalled_ = false;
  bool writer_stop_ = false;
  bool writer_done_ = false;
  bool broken_ = false;  // a send failed: no further reply can be delivered
  // True while the reader works through requests already received: replies completed meanwhile
  // wait for it to go idle, so that they leave together in one sendmsg.
  bool reader_busy_ = false;
  void reader_idle() noexcept;
  // A send failed (or a file transfer after its header): no further reply can be delivered.
  void mark_broken() noexcept;
};

}  // namespace blockd::exports::nbd
