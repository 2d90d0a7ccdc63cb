// An NBD client connection: the fixed newstyle handshake and the transmission phase of
// NetworkBlockDevice/nbd doc/proto.md.
//
// Handshake: the server greets with NBDMAGIC, IHAVEOPT and the handshake flags FIXED_NEWSTYLE and
// NO_ZEROES; the client answers with its flags (unknown flags end the connection) and sends
// options until one of them (EXPORT_NAME or GO) starts the transmission phase. Supported options:
// EXPORT_NAME, ABORT, LIST, INFO, GO (with INFO_EXPORT, NAME, DESCRIPTION and BLOCK_SIZE),
// STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (base:allocation); other options get
// NBD_REP_ERR_UNSUP. A client that has not finished the handshake (TLS included) within
// ServerOptions::handshake_timeout is dropped.
//
// TLS ("TLS support" in proto.md): without credentials the server runs in NOTLS mode and refuses
// STARTTLS with NBD_REP_ERR_POLICY. With them it runs in FORCEDTLS mode: every option but STARTTLS
// and ABORT gets NBD_REP_ERR_TLS_REQD (EXPORT_NAME, which cannot be refused, ends the
// connection); STARTTLS is acknowledged, the TLS handshake follows, and from then on the
// connection reads and writes the cleartext end of a socket pair whose other end a TLS tunnel
// (tls/session.h) relays to the client, so the code below is the same with and without TLS. A
// failed handshake ends only that connection.
//
// Transmission: READ (structured data and hole chunks when structured replies were negotiated,
// simple replies otherwise; DF), WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO),
// CACHE, BLOCK_STATUS (base:allocation, REQ_ONE) and DISC. Requests run concurrently and are
// answered as they complete.
//
// Files in memory (Node::map_file): the data of a large read that is one data run goes from the
// file to the socket with sendfile after its reply header, and a large write payload goes from
// the socket into the node's writable mapping of the file with recv (without that mapping,
// through a pipe with splice), so the loop thread copies no byte of it (the kernel copies a write
// once). A small read goes from the node's mapping of the file
// (FileRange::memory) in the sendmsg that carries its header: no read system call. The reader
// completes such reads itself, and small writes whose payload came whole with the header,
// queueing their replies with no task, no buffer and no trip through the node's coroutines
// (complete_inline). Those payloads are copied from the receive buffer into a writable mapping
// of the file, all the writes of one receive in one run_fault_guarded call (no system call per
// write); if another process shrank the file, the guard turns the SIGBUS into an error and the
// batch is written again with pwrite. Once a read's header is on the wire, a failed transfer
// (the file shrunk: EFAULT) can only end the connection, as proto.md requires of a reply that
// cannot be completed.
//
// A mapping may hold its node busy (a qcow2 node cannot flush, discard or snapshot meanwhile), so
// a client must not keep one alive by not reading or by trickling a payload: after kStallGrace
// without progress, the waiting reads are copied into buffers and their mappings end, and a write
// payload is finished through a buffer and the ordinary write path.
#include "exports/nbd/connection.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "runtime/fault_guard.h"
#include "runtime/fd_io.h"
#include "runtime/hop.h"
#include "runtime/stream_copy.h"

namespace blockd::exports::nbd {

namespace {

// How long a transfer between a mapped file and the socket may make no progress before the
// mapping is given up. A client that reads its replies empties a full send buffer within
// microseconds to a few milliseconds, so this only catches clients that stopped (or nearly).
constexpr std::chrono::milliseconds kStallGrace{50};

// Part of a copy into a writable shared mapping of a file: `length` bytes from `source` go to
// `target`, and every page of [target, target + span) is touched first (span >= length).
struct MappingFill {
  uint8_t* target;
  size_t span;
  const uint8_t* source;
  size_t length;
};

// Copies to_fill(item) for every item of `items` into the mapping, all in one fault-guarded call
// (the guard costs two system calls, about what one pwrite costs). False when touching the
// mapping raised SIGBUS (another process shrank the file): the copy stopped there, and the
// caller writes the data again through the descriptor. Every page of every piece is read before
// any is written: a read fault maps the neighbouring pages of the file too (fault-around), a
// write fault only its own, so random writes to a fresh mapping fault a sixteenth as often; and
// the cache misses of all the pages overlap. The copy writes whole cache lines without reading
// them (stream_copy): a random write's lines are rarely in the cache, and an ordinary copy would
// fetch each from memory only to overwrite it.
template <typename Items, typename ToFill>
bool fill_mapping(const Items& items, ToFill to_fill) noexcept {
  auto fill = [&items, &to_fill]() noexcept -> int64_t {
    for (const auto& item : items) {
      const MappingFill piece = to_fill(item);
      const auto start = reinterpret_cast<uintptr_t>(piece.target);
      for (uintptr_t page = start & ~uintptr_t{4095}; page < start + piece.span; page += 4096) {
        (void)*reinterpret_cast<const volatile uint8_t*>(page);
      }
    }
    for (const auto& item : items) {
      const MappingFill piece = to_fill(item);
      stream_copy(piece.target, piece.source, piece.length);
    }
    stream_fence();  // before the replies say the data is there
    return 0;
  };
  return run_fault_guarded(fill) == 0;
}

}  // namespace

// ---- Buffers.

Buffer::Buffer(size_t capacity) {
  const size_t rounded = (std::max<size_t>(capacity, 1) + 4095) & ~size_t(4095);
  data_ = static_cast<uint8_t*>(std::aligned_alloc(4096, rounded));
  capacity_ = data_ ? rounded : 0;
}
Buffer::Buffer(Buffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), capacity_(std::exchange(other.capacity_, 0)) {}
Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    std::free(data_);
    data_ = std::exchange(other.data_, nullptr);
    capacity_ = std::exchange(other.capacity_, 0);
  }
  return *this;
}
Buffer::~Buffer() { std::free(data_); }

Buffer BufferPool::get(size_t size) {
  size_t rounded = 4096;
  while (rounded < size) rounded <<= 1;
  if (rounded <= kMaxCachedSize) {
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->capacity() == rounded) {
        cached_bytes_ -= rounded;
        Buffer buffer = std::move(*it);
        *it = std::move(free_.back());
        free_.pop_back();
        return buffer;
      }
    }
    return Buffer(rounded);
  }
  return Buffer(size);
}

void BufferPool::put(Buffer buffer) {
  if (!buffer || buffer.capacity() > kMaxCachedSize ||
      cached_bytes_ + buffer.capacity() > kMaxCachedBytes) {
    return;
  }
  cached_bytes_ += buffer.capacity();
  free_.push_back(std::move(buffer));
}

// ---- Connection.

Connection::Connection(Server& server, int fd) : server_(server), loop_(&server.loop()), fd_(fd) {}

Connection::~Connection() {
  if (fd_ >= 0) ::close(fd_);
  if (pipe_read_ >= 0) ::close(pipe_read_);
  if (pipe_write_ >= 0) ::close(pipe_write_);
}

void Connection::disconnect() noexcept {
  if (disconnected_ || fd_ < 0) return;
  disconnected_ = true;
  // In an iothread the transmission state belongs to that thread: shutting the socket down is
  // enough, the reader sees it and winds down there.
  if (!on_export_loop_) closing_ = true;
  ::shutdown(fd_, SHUT_RDWR);
}

Task<bool> Connection::read_exact(void* buffer, size_t length) {
  auto* out = static_cast<uint8_t*>(buffer);
  while (length > 0) {
    const size_t buffered = receive_end_ - receive_start_;
    if (buffered > 0) {
      const size_t take = std::min(buffered, length);
      std::memcpy(out, receive_buffer_.get() + receive_start_, take);
      receive_start_ += take;
      out += take;
      length -= take;
      continue;
    }
    receive_start_ = receive_end_ = 0;
    reader_idle();
    // A large remainder goes straight to its destination; small reads refill the buffer.
    const bool direct = length >= kReceiveBufferSize / 2;
    if (!direct && !receive_buffer_) receive_buffer_.reset(new uint8_t[kReceiveBufferSize]);
    uint8_t* target = direct ? out : receive_buffer_.get();
    const size_t room = direct ? length : kReceiveBufferSize;
    // A direct read waits for the whole remainder (MSG_WAITALL): one completion per payload
    // instead of one per socket buffer's worth.
    const int got = co_await loop_->recv(fd_, target, room, direct ? MSG_WAITALL : 0);
    if (got <= 0) {
      if (got == -EINTR || got == -EAGAIN) continue;
      co_return false;
    }
    reader_busy_ = true;
    if (direct) {
      out += got;
      length -= static_cast<size_t>(got);
    } else {
      receive_end_ = static_cast<size_t>(got);
    }
  }
  co_return true;
}

Task<bool> Connection::buffer_at_least(size_t length) {
  while (receive_end_ - receive_start_ < length) {
    reader_idle();  // also copies out the small writes, whose payloads are about to move
    if (!receive_buffer_) receive_buffer_.reset(new uint8_t[kReceiveBufferSize]);
    const size_t left = receive_end_ - receive_start_;
    std::memmove(receive_buffer_.get(), receive_buffer_.get() + receive_start_, left);
    receive_start_ = 0;
    receive_end_ = left;
    const int got =
        co_await loop_->recv(fd_, receive_buffer_.get() + left, kReceiveBufferSize - left, 0);
    if (got <= 0) {
      if (got == -EINTR || got == -EAGAIN) continue;
      co_return false;
    }
    reader_busy_ = true;
    receive_end_ += static_cast<size_t>(got);
  }
  co_return true;
}

Task<bool> Connection::discard(uint64_t length) {
  while (length > 0) {
    const size_t buffered = receive_end_ - receive_start_;
    if (buffered > 0) {
      const size_t take = static_cast<size_t>(std::min<uint64_t>(buffered, length));
      receive_start_ += take;
      length -= take;
      continue;
    }
    receive_start_ = receive_end_ = 0;
    reader_idle();
    if (!receive_buffer_) receive_buffer_.reset(new uint8_t[kReceiveBufferSize]);
    // Never more than what is to be skipped: the next request may follow in the stream.
    const size_t room = static_cast<size_t>(std::min<uint64_t>(length, kReceiveBufferSize));
    const int got = co_await loop_->recv(fd_, receive_buffer_.get(), room, 0);
    if (got <= 0) {
      if (got == -EINTR || got == -EAGAIN) continue;
      co_return false;
    }
    reader_busy_ = true;
    length -= static_cast<uint64_t>(got);
  }
  co_return true;
}

Task<bool> Connection::send_all(iovec* iov, int count, int flags) {
  while (count > 0) {
    msghdr message{};
    message.msg_iov = iov;
    message.msg_iovlen = static_cast<size_t>(std::min(count, IOV_MAX));
    const int sent = co_await loop_->sendmsg(fd_, &message, MSG_NOSIGNAL | flags);
    if (sent == -EINTR) continue;
    if (sent == -EAGAIN) {
      // With MSG_DONTWAIT a full socket answers at once; wait for room here, not in the kernel.
      if ((flags & MSG_DONTWAIT) != 0 && !co_await wait_for_room()) co_return false;
      continue;
    }
    if (sent < 0) co_return false;
    advance_iovecs(iov, count, static_cast<size_t>(sent));
  }
  co_return true;
}

Task<bool> Connection::wait_for_room() {
  if (!send_stalled_) {
    const int ready = co_await loop_->poll_for(fd_, POLLOUT, kStallGrace);
    if (ready != -ETIME) co_return ready >= 0 || ready == -EINTR;
    // The client has taken nothing for a while: copy out every reply still holding a mapping
    // (later ones are copied as they come, see SendAwaiter) and wait as long as it takes.
    send_stalled_ = true;
    for (PendingReply* reply : sending_) unmap_reply(*reply);
    for (PendingReply* reply = queue_head_; reply != nullptr; reply = reply->next) {
      unmap_reply(*reply);
    }
  }
  const int ready = co_await loop_->poll(fd_, POLLOUT);
  co_return ready >= 0 || ready == -EINTR;
}

void Connection::unmap_reply(PendingReply& reply) noexcept {
  // A small read whose iovec points into the node's mapping keeps it (only file ranges move).
  if (!reply.mapped || reply.file_fd < 0) return;
  Buffer copy(reply.file_length);
  if (!copy || read_whole(reply.file_fd, copy.data(), reply.file_length, reply.file_offset) != 0) {
    mark_broken();
    return;
  }
  reply.copy = std::move(copy);
  reply.mapped = {};
}

Task<bool> Connection::send_bytes(const void* data, size_t length) {
  iovec iov{const_cast<void*>(data), length};
  co_return co_await send_all(&iov, 1);
}

Task<bool> Connection::send_file(PendingReply& reply) {
  auto position = static_cast<off_t>(reply.file_offset);
  uint64_t left = reply.file_length;
  while (left > 0) {
    if (reply.copy) {
      // The mapping ended while the client stalled: the rest comes from the copy.
      iovec iov{reply.copy.data() + (reply.file_length - left), static_cast<size_t>(left)};
      co_return co_await send_out(&iov, 1);
    }
    // The socket is blocking (the loop's operations wait in the kernel), but sendfile must not
    // wait for a client that does not read: O_NONBLOCK for the call only, so that operations
    // submitted meanwhile keep waiting in the kernel.
    const int flags = ::fcntl(fd_, F_GETFL);
    if (flags < 0 || ::fcntl(fd_, F_SETFL, flags | O_NONBLOCK) != 0) co_return false;
    const ssize_t sent =
        ::sendfile(fd_, reply.file_fd, &position, std::min<uint64_t>(left, kMaxPayload));
    const int saved = errno;
    (void)::fcntl(fd_, F_SETFL, flags);
    errno = saved;
    if (sent > 0) {
      left -= static_cast<uint64_t>(sent);
      continue;
    }
    if (sent == 0) break;  // the end of the file
    if (errno == EINTR) continue;
    // The socket buffer is full: wait until the client makes room (an error shows in the retry).
    if (errno != EAGAIN || !co_await wait_for_room()) co_return false;
  }
  // The file is shorter than the node (its size is rounded up to a sector, or the file shrank
  // under us): as in a read, the rest is zeroes.
  static const uint8_t zeroes[64u << 10] = {};
  while (left > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(left, sizeof zeroes));
    iovec iov{const_cast<uint8_t*>(zeroes), chunk};
    if (!co_await send_out(&iov, 1)) co_return false;
    left -= chunk;
  }
  co_return true;
}

bool Connection::ensure_pipe() noexcept {
  if (pipe_read_ >= 0) return true;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return false;
  pipe_read_ = fds[0];
  pipe_write_ = fds[1];
  // Room for a whole 1 MiB payload where the limit for unprivileged users allows it.
  (void)::fcntl(pipe_write_, F_SETPIPE_SZ, 1 << 20);
  const int size = ::fcntl(pipe_write_, F_GETPIPE_SZ);
  pipe_size_ = size > 0 ? static_cast<size_t>(size) : 65536;
  return true;
}

Task<bool> Connection::receive_into_file(int file_fd, uint64_t file_offset, uint8_t* memory,
                                         uint64_t length, int& file_error, uint64_t& received) {
  file_error = 0;
  received = 0;
  flush_mapped_writes();  // their payloads lie in the receive buffer, which is reused below
  auto position = static_cast<off64_t>(file_offset);
  // The start of the payload may have come in with the request header.
  const size_t buffered =
      static_cast<size_t>(std::min<uint64_t>(receive_end_ - receive_start_, length));
  const uint8_t* const start = receive_buffer_.get() + receive_start_;
  receive_start_ += buffered;
  position += static_cast<off64_t>(buffered);
  received = buffered;
  bool in_memory = false;
  if (memory != nullptr) {
    // Straight into the node's writable mapping: the start from the receive buffer here, the
    // rest from the socket with recv below. The kernel copies each byte once, with no per-page
    // work in the file system (what pwrite or splicing into the file costs). All the payload's
    // pages are touched first (fill_mapping); a file shrunk under the mapping faults here, and
    // the payload takes the ordinary way.
    const MappingFill whole{memory, static_cast<size_t>(length), start, buffered};
    in_memory = fill_mapping(std::array{whole}, std::identity{});
  }
  if (!in_memory && buffered > 0) file_error = write_whole(file_fd, start, buffered, file_offset);
  uint64_t left = length - buffered;
  if (left == 0) co_return true;
  // The mapping faulted, or the receive buffer's part failed: the caller receives the rest.
  if (memory != nullptr && !in_memory) co_return true;
  receive_start_ = receive_end_ = 0;
  while (left > 0) {
    const ssize_t got =
        memory != nullptr
            ? ::recv(fd_, memory + (length - left), static_cast<size_t>(left), MSG_DONTWAIT)
            : ::splice(fd_, nullptr, pipe_write_, nullptr,
                       static_cast<size_t>(std::min<uint64_t>(left, pipe_size_)),
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (got == 0) co_return false;  // the client is gone
    if (got < 0) {
      if (errno == EINTR) continue;
      // The file shrank since its pages were touched: a copy into a mapping past the file's end
      // fails (the kernel raises no SIGBUS), and the bytes of the socket buffer it failed in stay
      // in the socket. The caller receives them the ordinary way.
      if (memory != nullptr && errno == EFAULT) co_return true;
      // The pipe is empty here, so EAGAIN means the socket has nothing yet.
      if (errno != EAGAIN) co_return false;
      reader_idle();
      const int ready = co_await loop_->poll_for(fd_, POLLIN, kStallGrace);
      if (ready == -ETIME) co_return true;  // a stalled client: the caller takes over
      if (ready < 0 && ready != -EINTR) co_return false;
      reader_busy_ = true;
      continue;
    }
    left -= static_cast<uint64_t>(got);
    received = length - left;
    if (memory != nullptr) continue;
    // Empty the pipe into the file; after a file error, into the receive buffer, to be dropped.
    auto in_pipe = static_cast<size_t>(got);
    while (in_pipe > 0) {
      ssize_t moved;
      if (file_error == 0) {
        moved = ::splice(pipe_read_, nullptr, file_fd, &position, in_pipe, SPLICE_F_MOVE);
        if (moved == 0) {
          moved = -1;
          errno = ENOSPC;
        }
      } else {
        if (!receive_buffer_) receive_buffer_.reset(new uint8_t[kReceiveBufferSize]);
        moved = ::read(pipe_read_, receive_buffer_.get(), std::min(in_pipe, kReceiveBufferSize));
      }
      if (moved < 0) {
        if (errno == EINTR) continue;
        if (file_error != 0) co_return false;  // the pipe itself failed
        file_error = -errno;
        continue;
      }
      in_pipe -= static_cast<size_t>(moved);
    }
  }
  co_return true;
}

// ---- Handshake.

Task<bool> Connection::send_option_reply(uint32_t option, uint32_t type,
                                         std::span<const uint8_t> data) {
  uint8_t header[kOptionReplyHeaderSize];
  store64(header, kOptionReplyMagic);
  store32(header + 8, option);
  store32(header + 12, type);
  store32(header + 16, static_cast<uint32_t>(data.size()));
  iovec iov[2] = {{header, sizeof header}, {const_cast<uint8_t*>(data.data()), data.size()}};
  co_return co_await send_all(iov, data.empty() ? 1 : 2);
}

Task<bool> Connection::send_option_error(uint32_t option, uint32_t type, std::string_view message) {
  co_return co_await send_option_reply(
      option, type,
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(message.data()), message.size()));
}

Task<bool> Connection::send_info(uint32_t option, uint16_t type, std::span<const uint8_t> data) {
  std::vector<uint8_t> payload(2 + data.size());
  store16(payload.data(), type);
  std::copy(data.begin(), data.end(), payload.begin() + 2);
  co_return co_await send_option_reply(option, kRepInfo, payload);
}

void Connection::attach(NbdExport* nbd_export) {
  export_ = nbd_export->shared_from_this();
  ++export_->clients_;
  export_->clients_changed_.notify_all();
}

Task<void> Connection::watchdog(std::shared_ptr<Connection> self) {
  auto timer = self->loop_->sleep(self->server_.options().handshake_timeout);
  self->watchdog_timer_ = &timer;
  const int result = co_await timer;
  self->watchdog_timer_ = nullptr;
  if (result == 0 && !self->handshake_done_) self->disconnect();
}

namespace {

std::span<const uint8_t> as_bytes(std::string_view text) {
  return {reinterpret_cast<const uint8_t*>(text.data()), text.size()};
}

}  // namespace

Task<bool> Connection::start_tls() {
  auto session = tls::Session::create(server_.options().tls_credentials);
  if (!session) co_return false;
  // The client may have sent the start of its handshake right behind the option.
  std::vector<uint8_t> early;
  if (receive_buffer_) {
    early.assign(receive_buffer_.get() + receive_start_, receive_buffer_.get() + receive_end_);
  }
  receive_start_ = receive_end_ = 0;
  const Status handshaken = co_await (*session)->handshake(*loop_, fd_, early);
  if (!handshaken.is_ok() || disconnected_) co_return false;
  // No authorization object can exist in blockd: a client cannot be authorized.
  if (!server_.options().tls_authz.empty()) co_return false;
  int pair[2];
  if (tls::Session::open_pair(pair) != 0) co_return false;
  server_.spawn_tunnel(std::move(session).value(), fd_, pair[1]);
  fd_ = pair[0];
  tls_active_ = true;
  co_return true;
}

Task<bool> Connection::handshake() {
  uint8_t greeting[18];
  store64(greeting, kNbdMagic);
  store64(greeting + 8, kOptionMagic);
  store16(greeting + 16, kFlagFixedNewstyle | kFlagNoZeroes);
  if (!co_await send_bytes(greeting, sizeof greeting)) co_return false;

  uint8_t client_flags_bytes[4];
  if (!co_await read_exact(client_flags_bytes, 4)) co_return false;
  const uint32_t client_flags = load32(client_flags_bytes);
  if (client_flags & ~(kClientFlagFixedNewstyle | kClientFlagNoZeroes)) co_return false;
  fixed_newstyle_ = client_flags & kClientFlagFixedNewstyle;
  no_zeroes_ = client_flags & kClientFlagNoZeroes;

  std::vector<uint8_t> payload;
  while (true) {
    uint8_t header[kOptionHeaderSize];
    if (!co_await read_exact(header, sizeof header)) co_return false;
    if (load64(header) != kOptionMagic) co_return false;
    const uint32_t option = load32(header + 8);
    const uint32_t length = load32(header + 12);
    if (!fixed_newstyle_ && option != kOptExportName) co_return false;
    if (length > kMaxOptionLength) {
      if (option == kOptExportName) co_return false;
      if (!co_await discard(length)) co_return false;
      if (!co_await send_option_error(option, kRepErrTooBig, "option payload too long")) {
        co_return false;
      }
      continue;
    }
    payload.resize(length);
    if (length > 0 && !co_await read_exact(payload.data(), length)) co_return false;

    // FORCEDTLS: before the upgrade only STARTTLS and ABORT are served; EXPORT_NAME cannot be
    // refused politely, so it ends the connection.
    if (server_.options().tls_credentials && !tls_active_ && option != kOptStartTls &&
        option != kOptAbort) {
      if (option == kOptExportName) co_return false;
      if (!co_await send_option_error(option, kRepErrTlsReqd,
                                      "TLS negotiation required before option " +
                                          std::to_string(option) + " (" +
                                          std::string(option_name(option)) + ")")) {
        co_return false;
      }
      continue;
    }

    switch (option) {
      case kOptExportName: {
        // A client that negotiated extended headers must use NBD_OPT_GO; this option has no way
        // to refuse politely.
        if (length > kMaxStringLength || reply_mode_ == ReplyMode::kExtended) co_return false;
        std::string name(payload.begin(), payload.end());
        NbdExport* found = server_.find_export(name);
        if (found == nullptr) co_return false;
        attach(found);
        if (meta_context_export_ != name) base_allocation_ = false;
        flags_ = transmission_flags(export_->writable(), reply_mode_ != ReplyMode::kSimple,
                                    server_.options().max_connections != 1);
        uint8_t reply[10 + 124] = {};
        store64(reply, static_cast<uint64_t>(export_->backend().size()));
        store16(reply + 8, flags_);
        co_return co_await send_bytes(reply, no_zeroes_ ? 10 : sizeof reply);
      }

      case kOptAbort:
        (void)co_await send_option_reply(option, kRepAck, {});
        co_return false;

      case kOptList: {
        if (length != 0) {
          if (!co_await send_option_error(option, kRepErrInvalid,
                                          "NBD_OPT_LIST must have no payload")) {
            co_return false;
          }
          break;
        }
        // Encoded before sending: exports may go away while the replies are sent.
        std::vector<std::vector<uint8_t>> entries;
        for (NbdExport* listed : server_.exports()) {
          std::vector<uint8_t> entry(4 + listed->name().size() + listed->description().size());
          store32(entry.data(), static_cast<uint32_t>(listed->name().size()));
          std::copy(listed->name().begin(), listed->name().end(), entry.begin() + 4);
          std::copy(listed->description().begin(), listed->description().end(),
                    entry.begin() + 4 + static_cast<ptrdiff_t>(listed->name().size()));
          entries.push_back(std::move(entry));
        }
        bool failed = false;
        for (const auto& entry : entries) {
          if (!co_await send_option_reply(option, kRepServer, entry)) {
            failed = true;
            break;
          }
        }
        if (failed) co_return false;
        if (!co_await send_option_reply(option, kRepAck, {})) co_return false;
        break;
      }

      case kOptStartTls: {
        uint32_t refusal = 0;
        std::string_view why;
        if (length != 0) {
          refusal = kRepErrInvalid;
          why = "NBD_OPT_STARTTLS must have no payload";
        } else if (!server_.options().tls_credentials) {
          refusal = kRepErrPolicy;
          why = "TLS is not enabled on this server";
        } else if (tls_active_) {
          refusal = kRepErrInvalid;
          why = "TLS is already active";
        }
        if (refusal != 0) {
          if (!co_await send_option_error(option, refusal, why)) co_return false;
          break;
        }
        if (!co_await send_option_reply(option, kRepAck, {})) co_return false;
        if (!co_await start_tls()) co_return false;
        break;
      }

      case kOptInfo:
      case kOptGo: {
        auto request = parse_info_request(payload);
        if (!request) {
          if (!co_await send_option_error(
                  option, kRepErrInvalid,
                  std::string("malformed ") + std::string(option_name(option)) + " payload")) {
            co_return false;
          }
          break;
        }
        NbdExport* found = server_.find_export(request->name);
        if (found == nullptr) {
          if (!co_await send_option_error(option, kRepErrUnknown,
                                          "export '" + request->name + "' not present")) {
            co_return false;
          }
          break;
        }
        bool want_name = false;
        bool want_description = false;
        bool want_block_size = false;
        for (uint16_t type : request->info_types) {
          want_name |= type == kInfoName;
          want_description |= type == kInfoDescription;
          want_block_size |= type == kInfoBlockSize;
        }
        // Everything the replies carry is taken now: the export may go away while they are sent
        // (a GO client is attached, and so dropped by the removal).
        const std::string name = found->name();
        const std::string description = found->description();
        const uint32_t alignment =
            want_block_size ? std::max<uint32_t>(1, found->backend().root()->request_alignment())
                            : 1;
        const uint64_t size = static_cast<uint64_t>(found->backend().size());
        uint16_t flags = transmission_flags(found->writable(), reply_mode_ != ReplyMode::kSimple,
                                            server_.options().max_connections != 1);
        // The payload form of block status is offered once it can be used: extended headers
        // and a metadata context selected for this export.
        if (reply_mode_ == ReplyMode::kExtended && base_allocation_ &&
            meta_context_export_ == request->name) {
          flags |= kFlagBlockStatusPayload;
        }
        if (option == kOptGo) attach(found);
        if (want_name && !co_await send_info(option, kInfoName, as_bytes(name))) co_return false;
        if (want_description && !description.empty() &&
            !co_await send_info(option, kInfoDescription, as_bytes(description))) {
          co_return false;
        }
        uint8_t sizes[12];
        store32(sizes, alignment);
        store32(sizes + 4, std::max<uint32_t>(4096, alignment));
        store32(sizes + 8, kMaxPayload);
        if (!co_await send_info(option, kInfoBlockSize, sizes)) co_return false;
        uint8_t info[10];
        store64(info, size);
        store16(info + 8, flags);
        if (!co_await send_info(option, kInfoExport, info)) co_return false;
        if (!co_await send_option_reply(option, kRepAck, {})) co_return false;
        if (option == kOptGo) {
          if (meta_context_export_ != request->name) base_allocation_ = false;
          flags_ = flags;
          co_return true;
        }
        break;
      }

      case kOptStructuredReply:
      case kOptExtendedHeaders: {
        const bool extended = option == kOptExtendedHeaders;
        uint32_t refusal = 0;
        std::string why;
        if (length != 0) {
          refusal = kRepErrInvalid;
          why = std::string(option_name(option)) + " must have no payload";
        } else if (!extended && reply_mode_ == ReplyMode::kExtended) {
          refusal = kRepErrExtHeaderReqd;
          why = "extended headers are already negotiated and cannot be downgraded";
        }
        if (refusal != 0) {
          if (!co_await send_option_error(option, refusal, why)) co_return false;
          break;
        }
        reply_mode_ = extended ? ReplyMode::kExtended : ReplyMode::kStructured;
        if (!co_await send_option_reply(option, kRepAck, {})) co_return false;
        break;
      }

      case kOptListMetaContext:
      case kOptSetMetaContext: {
        const bool list = option == kOptListMetaContext;
        // SET replaces the previous selection, even when it fails.
        if (!list) {
          base_allocation_ = false;
          meta_context_export_.clear();
        }
        if (reply_mode_ == ReplyMode::kSimple) {
          if (!co_await send_option_error(
                  option, kRepErrInvalid,
                  "neither structured replies nor extended headers were negotiated")) {
            co_return false;
          }
          break;
        }
        auto request = parse_meta_context_request(payload);
        if (!request) {
          if (!co_await send_option_error(
                  option, kRepErrInvalid,
                  std::string("malformed ") + std::string(option_name(option)) + " payload")) {
            co_return false;
          }
          break;
        }
        if (server_.find_export(request->name) == nullptr) {
          if (!co_await send_option_error(option, kRepErrUnknown,
                                          "export '" + request->name + "' not present")) {
            co_return false;
          }
          break;
        }
        const auto selected = match_meta_contexts(request->queries, list);
        bool failed = false;
        for (std::string_view context : selected) {
          std::vector<uint8_t> entry(4 + context.size());
          store32(entry.data(), list ? 0 : kBaseAllocationId);
          std::copy(context.begin(), context.end(), entry.begin() + 4);
          if (!co_await send_option_reply(option, kRepMetaContext, entry)) {
            failed = true;
            break;
          }
        }
        if (failed) co_return false;
        if (!list && !selected.empty()) {
          base_allocation_ = true;
          meta_context_export_ = request->name;
        }
        if (!co_await send_option_reply(option, kRepAck, {})) co_return false;
        break;
      }

      default:
        if (!co_await send_option_error(option, kRepErrUnsup,
                                        "option " + std::to_string(option) + " (" +
                                            std::string(option_name(option)) +
                                            ") is not supported")) {
          co_return false;
        }
        break;
    }
  }
}

// ---- Transmission.

void Connection::SendAwaiter::await_suspend(std::coroutine_handle<> handle) noexcept {
  reply->waiter = handle;
  connection->enqueue(*reply);
}

void Connection::enqueue(PendingReply& reply) noexcept {
  reply.next = nullptr;
  // The client is not reading: this reply must not wait on it with a mapping.
  if (send_stalled_) unmap_reply(reply);
  if (queue_tail_) {
    queue_tail_->next = &reply;
  } else {
    queue_head_ = &reply;
  }
  queue_tail_ = &reply;
  if (!reader_busy_ && queue_changed_.has_waiters()) queue_changed_.notify_all();
}

void Connection::mark_broken() noexcept {
  broken_ = true;
  closing_ = true;
  ::shutdown(fd_, SHUT_RDWR);  // the reader stops at its next receive
}

void Connection::reader_idle() noexcept {
  flush_mapped_writes();
  reader_busy_ = false;
  if (queue_head_ != nullptr && queue_changed_.has_waiters()) queue_changed_.notify_all();
}

Task<void> Connection::writer() {
  // Reused from batch to batch: no allocation per reply.
  std::vector<iovec> iov;
  std::vector<PendingReply*>& batch = sending_;
  std::vector<std::coroutine_handle<>> ready;
  while (true) {
    while (queue_head_ == nullptr && !writer_stop_) co_await queue_changed_.wait();
    if (queue_head_ == nullptr) break;
    // Take everything ready now, up to what one sendmsg can carry.
    iov.clear();
    batch.clear();
    while (queue_head_ != nullptr &&
           iov.size() + static_cast<size_t>(queue_head_->count) <= size_t(IOV_MAX)) {
      PendingReply* reply = queue_head_;
      queue_head_ = reply->next;
      if (queue_head_ == nullptr) queue_tail_ = nullptr;
      iov.insert(iov.end(), reply->iov, reply->iov + reply->count);
      batch.push_back(reply);
    }
    // Replies go out in order; one that ends with a file range is sent up to its iovecs, then
    // the kernel moves the range.
    size_t sent_until = 0;
    size_t position = 0;
    for (PendingReply* reply : batch) {
      position += static_cast<size_t>(reply->count);
      if (reply->file_fd < 0 || broken_) continue;
      if (!co_await send_out(iov.data() + sent_until, static_cast<int>(position - sent_until)) ||
          !co_await send_file(*reply)) {
        mark_broken();
      }
      reply->mapped = {};  // its data is out
      sent_until = position;
    }
    if (!broken_ && sent_until < iov.size() &&
        !co_await send_out(iov.data() + sent_until, static_cast<int>(iov.size() - sent_until))) {
      mark_broken();
    }
    ready.clear();
    bool recycled = false;
    for (PendingReply* reply : batch) {
      reply->sent = !broken_;
      if (reply->waiter) {
        ready.push_back(reply->waiter);
      } else {
        recycle(static_cast<InlineReply&>(*reply));
        recycled = true;
      }
    }
    batch.clear();
    // Everything the client asked for is out: it reads again.
    if (queue_head_ == nullptr) send_stalled_ = false;
    if (recycled) progress_.notify_all();
    for (auto handle : ready) handle.resume();
  }
  writer_done_ = true;
  progress_.notify_all();
}

namespace {

// Fills a simple reply header.
void simple_reply(uint8_t* out, uint32_t error, uint64_t cookie) {
  store32(out, kSimpleReplyMagic);
  store32(out + 4, error);
  store64(out + 8, cookie);
}

// Encodes the whole reply of a request that carries no data and ends with `nbd_error` (0 for
// success): a simple reply, or a chunk where the mode needs one (extended headers) or the client
// may expect one (a failed read or block status with structured replies). Returns its size.
size_t encode_status_reply(uint8_t* out, ReplyMode mode, const Request& request,
                           uint32_t nbd_error) {
  const bool chunk = mode == ReplyMode::kExtended ||
                     (nbd_error != 0 && mode == ReplyMode::kStructured &&
                      (request.type == kCmdRead || request.type == kCmdBlockStatus));
  if (!chunk) {
    simple_reply(out, nbd_error, request.cookie);
    return kSimpleReplySize;
  }
  if (nbd_error == 0) {
    return encode_chunk_header(out, mode, kReplyFlagDone, kReplyTypeNone, request, 0);
  }
  const size_t header =
      encode_chunk_header(out, mode, kReplyFlagDone, kReplyTypeError, request, 6);
  store32(out + header, nbd_error);
  store16(out + header + 4, 0);
  return header + 6;
}

uint32_t status_to_nbd_flags(uint32_t status) {
  return ((status & block::kStatusData) ? 0 : kStateHole) |
         ((status & block::kStatusZero) ? kStateZero : 0);
}

// Reads whose sparseness is worth a block-status query before reading; smaller reads are sent as
// one data chunk (the query would cost more than the zeroes it saves).
constexpr uint32_t kSparseReadThreshold = 64u << 10;
constexpr int kMaxReadChunks = 8;
// Reads from which the kernel moves data from a file in memory straight to the socket (see
// Node::map_file): a copy saved per byte, at the price of a second system call per reply, which
// pays from some tens of KiB.
constexpr uint32_t kMappedReadThreshold = 32u << 10;
// Write payloads that go straight into a file in memory: from the receive buffer when they came
// with the request header, else spliced from the socket through a pipe (one copy instead of two,
// for a few more system calls).
constexpr uint64_t kMappedWriteThreshold = 32u << 10;
constexpr int kUnixSendBufferSize = 4 << 20;
constexpr int kMaxExtents = 256;

}  // namespace

Task<void> Connection::handle_request(std::shared_ptr<Connection> self, Request request,
                                      uint32_t error, Buffer buffer, bool written) {
  Connection& c = *self;
  block::BlockBackend& backend = c.export_->backend();
  PendingReply reply;
  // Headers and metadata of the reply; the data itself stays in `buffer`.
  uint8_t scratch[kExtendedChunkHeaderSize + 8 + kMaxExtents * 16 +
                  kMaxReadChunks * (kExtendedChunkHeaderSize + 12)];
  const ReplyMode mode = c.reply_mode_;
  const bool structured = mode != ReplyMode::kSimple;
  const uint64_t buffer_bytes = buffer.capacity();

  // A read's data in the node's mapping of its file (set by map_read); the caller adds it to the
  // reply after the headers.
  const uint8_t* mapped_data = nullptr;
  // A read served from the node's file; not while the client is not reading its replies. A read
  // from kMappedReadThreshold on is mapped before with map_read_async, which may wait (the lambda
  // cannot): its answer is in reply.mapped.
  auto map_read = [&](uint64_t offset, uint32_t length) {
    if (c.send_stalled_) {
      reply.mapped = {};
      return false;
    }
    if (length < kMappedReadThreshold) reply.mapped = backend.map_read(offset, length);
    if (!reply.mapped) return false;
    if (length < kMappedReadThreshold) {
      // Too small for sendfile to pay, but when the node keeps its file mapped the bytes go from
      // the page cache to the socket in the sendmsg that carries the header: no read system call
      // (the whole difference to a null node at queue depth 1) and no copy through the buffer.
      mapped_data = reply.mapped.memory();
      if (mapped_data == nullptr) reply.mapped = {};
      return mapped_data != nullptr;
    }
    reply.file_fd = reply.mapped.fd();
    reply.file_offset = reply.mapped.file_offset();
    reply.file_length = length;
    return true;
  };

  auto fail = [&](uint32_t nbd_error) {
    reply.count = 0;
    reply.bytes = 0;
    reply.file_fd = -1;
    reply.mapped = {};
    reply.add(scratch, encode_status_reply(scratch, mode, request, nbd_error));
  };
  auto ok = [&] { reply.add(scratch, encode_status_reply(scratch, mode, request, 0)); };
  // The reply for a command whose whole result is one block-layer return value.
  auto reply_status = [&](int64_t ret) {
    if (ret < 0) {
      fail(errno_to_nbd(static_cast<int>(ret)));
    } else {
      ok();
    }
  };

  if (error != 0) {
    fail(error);
  } else {
    switch (request.type) {
      case kCmdRead: {
        const uint64_t offset = request.offset;
        const auto length = static_cast<uint32_t>(request.length);  // validated: <= kMaxPayload
        if (!structured) {
          if (length >= kMappedReadThreshold && !c.send_stalled_) {
            reply.mapped = co_await backend.map_read_async(offset, length);
          }
          if (length && map_read(offset, length)) {
            simple_reply(scratch, 0, request.cookie);
            reply.add(scratch, kSimpleReplySize);
            if (mapped_data != nullptr) reply.add(mapped_data, length);
            break;
          }
          const int64_t ret = length ? co_await backend.read(offset, length, buffer.data(), 0) : 0;
          if (ret < 0) {
            fail(errno_to_nbd(static_cast<int>(ret)));
          } else {
            simple_reply(scratch, 0, request.cookie);
            reply.add(scratch, kSimpleReplySize);
            if (length) reply.add(buffer.data(), length);
          }
          break;
        }
        if (length == 0) {
          reply.add(scratch, encode_chunk_header(scratch, mode, kReplyFlagDone, kReplyTypeNone,
                                                 request, 0));
          break;
        }
        // Split the range into data and zero runs (at most kMaxReadChunks; the rest is data).
        struct Run {
          uint64_t start;
          uint32_t length;
          bool zero;
        } runs[kMaxReadChunks];
        int run_count = 0;
        // A range already known to hold data needs no query: a data answer never goes stale in a
        // harmful way (a read returns the real bytes, zero or not), while a zero answer could.
        const bool known_data =
            offset >= c.known_data_start_ && offset + length <= c.known_data_end_;
        if (!(request.flags & kCmdFlagDf) && length >= kSparseReadThreshold && !known_data) {
          uint64_t position = offset;
          const uint64_t end = offset + length;
          const uint64_t export_size = static_cast<uint64_t>(backend.size());
          while (position < end && run_count < kMaxReadChunks) {
            // Ask about the whole rest of the export: finding where a data run ends costs the
            // same (lseek walks to the next hole), and the answer serves the following reads.
            block::BlockStatus status =
                co_await backend.block_status(position, export_size - position);
            if (status.bytes <= 0) break;
            const uint64_t bytes =
                std::min<uint64_t>(static_cast<uint64_t>(status.bytes), end - position);
            const bool zero = status.flags & block::kStatusZero;
            if (!zero) {
              const uint64_t run_end = position + static_cast<uint64_t>(status.bytes);
              if (position <= c.known_data_end_ && run_end >= c.known_data_start_ &&
                  c.known_data_end_ > c.known_data_start_) {
                c.known_data_start_ = std::min(c.known_data_start_, position);
                c.known_data_end_ = std::max(c.known_data_end_, run_end);
              } else {
                c.known_data_start_ = position;
                c.known_data_end_ = run_end;
              }
            }
            if (run_count > 0 && runs[run_count - 1].zero == zero) {
              runs[run_count - 1].length += static_cast<uint32_t>(bytes);
            } else if (run_count == kMaxReadChunks - 1) {
              runs[run_count++] = {position, static_cast<uint32_t>(end - position), false};
              position = end;
              break;
            } else {
              runs[run_count++] = {position, static_cast<uint32_t>(bytes), zero};
            }
            position += bytes;
          }
          if (position < end) {
            if (run_count > 0 && !runs[run_count - 1].zero) {
              runs[run_count - 1].length += static_cast<uint32_t>(end - position);
            } else if (run_count < kMaxReadChunks) {
              runs[run_count++] = {position, static_cast<uint32_t>(end - position), false};
            } else {
              run_count = 0;  // cannot describe it: read it all as data
            }
          }
        }
        if (run_count == 0) runs[run_count++] = {offset, length, false};
        if (run_count == 1 && !runs[0].zero && length >= kMappedReadThreshold && !c.send_stalled_) {
          reply.mapped = co_await backend.map_read_async(offset, length);
        }
        if (run_count == 1 && !runs[0].zero && map_read(offset, length)) {
          const size_t size = encode_chunk_header(scratch, mode, kReplyFlagDone,
                                                  kReplyTypeOffsetData, request, 8 + uint64_t{length});
          store64(scratch + size, offset);
          reply.add(scratch, size + 8);
          if (mapped_data != nullptr) reply.add(mapped_data, length);
          break;
        }
        int64_t ret = 0;
        for (int i = 0; i < run_count && ret >= 0; ++i) {
          if (runs[i].zero) continue;
          ret = co_await backend.read(runs[i].start, runs[i].length,
                                      buffer.data() + (runs[i].start - offset), 0);
        }
        if (ret < 0) {
          fail(errno_to_nbd(static_cast<int>(ret)));
          break;
        }
        uint8_t* header = scratch;
        for (int i = 0; i < run_count; ++i) {
          const uint16_t flags = i == run_count - 1 ? kReplyFlagDone : 0;
          if (runs[i].zero) {
            const size_t size =
                encode_chunk_header(header, mode, flags, kReplyTypeOffsetHole, request, 12);
            store64(header + size, runs[i].start);
            store32(header + size + 8, runs[i].length);
            reply.add(header, size + 12);
            header += size + 12;
          } else {
            const size_t size = encode_chunk_header(header, mode, flags, kReplyTypeOffsetData,
                                                    request, 8 + uint64_t{runs[i].length});
            store64(header + size, runs[i].start);
            reply.add(header, size + 8);
            reply.add(buffer.data() + (runs[i].start - offset), runs[i].length);
            header += size + 8;
          }
        }
        break;
      }
      case kCmdWrite: {
        if (written) {
          ok();
          break;
        }
        const uint32_t flags = (request.flags & kCmdFlagFua) ? uint32_t{block::kRequestFua} : 0u;
        const int64_t ret = request.length ? co_await backend.write(request.offset, request.length,
                                                                    buffer.data(), flags)
                                           : 0;
        reply_status(ret);
        break;
      }
      case kCmdFlush: {
        const int64_t ret = co_await backend.flush();
        reply_status(ret);
        break;
      }
      case kCmdTrim: {
        int64_t ret = request.length ? co_await backend.discard(request.offset, request.length) : 0;
        if (ret >= 0 && (request.flags & kCmdFlagFua)) ret = co_await backend.flush();
        reply_status(ret);
        break;
      }
      case kCmdWriteZeroes: {
        uint32_t flags = 0;
        if (request.flags & kCmdFlagFua) flags |= block::kRequestFua;
        if (!(request.flags & kCmdFlagNoHole)) flags |= block::kRequestMayUnmap;
        if (request.flags & kCmdFlagFastZero) flags |= block::kRequestNoFallback;
        const int64_t ret =
            request.length ? co_await backend.write_zeroes(request.offset, request.length, flags)
                           : 0;
        reply_status(ret);
        break;
      }
      case kCmdCache: {
        const int64_t ret =
            request.length ? co_await backend.cache(request.offset, request.length) : 0;
        reply_status(ret);
        break;
      }
      case kCmdBlockStatus: {
        struct Extent {
          uint64_t length;
          uint32_t flags;
        } extents[kMaxExtents];
        int count = 0;
        uint64_t position = request.offset;
        const uint64_t end = request.offset + request.length;
        int64_t failure = 0;
        while (position < end && count < kMaxExtents) {
          block::BlockStatus status = co_await backend.block_status(position, end - position);
          if (status.bytes <= 0) {
            failure = status.bytes < 0 ? status.bytes : -EIO;
            break;
          }
          const uint64_t bytes =
              std::min<uint64_t>(static_cast<uint64_t>(status.bytes), end - position);
          const uint32_t flags = status_to_nbd_flags(status.flags);
          // Compact extents hold 32-bit lengths; a compact request never spans more.
          if (count > 0 && flags == extents[count - 1].flags &&
              (mode == ReplyMode::kExtended || extents[count - 1].length + bytes <= UINT32_MAX)) {
            extents[count - 1].length += bytes;
          } else {
            extents[count++] = {bytes, flags};
          }
          position += bytes;
          if (request.flags & kCmdFlagReqOne) break;
        }
        if (count == 0) {
          fail(errno_to_nbd(static_cast<int>(failure ? failure : -EIO)));
          break;
        }
        const bool wide = mode == ReplyMode::kExtended;
        const size_t descriptor = wide ? 16 : 8;
        const size_t prefix = wide ? 8 : 4;  // context id (and, extended, descriptor count)
        const uint64_t payload = prefix + static_cast<uint64_t>(count) * descriptor;
        const size_t header = encode_chunk_header(
            scratch, mode, kReplyFlagDone, wide ? kReplyTypeBlockStatusExt : kReplyTypeBlockStatus,
            request, payload);
        uint8_t* out = scratch + header;
        store32(out, kBaseAllocationId);
        if (wide) store32(out + 4, static_cast<uint32_t>(count));
        out += prefix;
        for (int i = 0; i < count; ++i, out += descriptor) {
          if (wide) {
            store64(out, extents[i].length);
            store64(out + 8, extents[i].flags);
          } else {
            store32(out, static_cast<uint32_t>(extents[i].length));
            store32(out + 4, extents[i].flags);
          }
        }
        reply.add(scratch, header + payload);
        break;
      }
      default:
        fail(kEinval);
        break;
    }
  }

  (void)co_await c.send(reply);

  c.pool_.put(std::move(buffer));
  c.buffered_bytes_ -= buffer_bytes;
  --c.in_flight_;
  c.progress_.notify_all();
}

bool Connection::complete_inline(const Request& request, uint64_t payload_length) {
  const bool read = request.type == kCmdRead;
  if (!read && request.type != kCmdWrite) return false;
  block::BlockBackend& backend = export_->backend();
  block::BlockBackend::MappedRange mapped;
  if (read) {
    // What handle_request does with such a read (one data chunk: too small to look for holes),
    // minus the task.
    if (request.length == 0 || request.length >= kMappedReadThreshold || send_stalled_) {
      return false;
    }
    mapped = backend.map_read(request.offset, request.length);
    if (!mapped || mapped.memory() == nullptr) return false;
  } else {
    // Only a payload that came whole with its header: it goes from the receive buffer into the
    // node's writable mapping of the file (no system call) or, without one, with one pwrite,
    // where the usual path copies it into a buffer first and writes it through the node's tasks.
    if (payload_length == 0 || payload_length >= kMappedWriteThreshold ||
        receive_end_ - receive_start_ < payload_length) {
      return false;
    }
    mapped = backend.map_write(request.offset, payload_length,
                               (request.flags & kCmdFlagFua) ? uint32_t{block::kRequestFua} : 0u,
                               /*want_memory=*/true);
    if (!mapped) return false;
  }
  InlineReply& reply = take_reply();
  ++in_flight_;
  if (read) {
    size_t size = kSimpleReplySize;
    if (reply_mode_ == ReplyMode::kSimple) {
      simple_reply(reply.header, 0, request.cookie);
    } else {
      size = encode_chunk_header(reply.header, reply_mode_, kReplyFlagDone, kReplyTypeOffsetData,
                                 request, 8 + request.length);
      store64(reply.header + size, request.offset);
      size += 8;
    }
    reply.add(reply.header, size);
    reply.add(mapped.memory(), static_cast<size_t>(request.length));
    reply.mapped = std::move(mapped);
  } else if (uint8_t* target = mapped.writable_memory()) {
    // Copied in with the rest of the batch, before the receive buffer is refilled.
    reply.request = request;
    reply.source = receive_buffer_.get() + receive_start_;
    reply.target = target;
    reply.length = static_cast<size_t>(payload_length);
    reply.mapped = std::move(mapped);
    receive_start_ += reply.length;
    mapped_writes_.push_back(&reply);
    return true;
  } else {
    flush_mapped_writes();  // in the order they were sent
    const int ret = write_whole(mapped.fd(), receive_buffer_.get() + receive_start_,
                                payload_length, mapped.file_offset());
    receive_start_ += static_cast<size_t>(payload_length);
    mapped = {};
    reply.add(reply.header, encode_status_reply(reply.header, reply_mode_, request,
                                                ret < 0 ? errno_to_nbd(ret) : 0));
  }
  if (broken_) {
    recycle(reply);  // nothing more reaches the client
  } else {
    enqueue(reply);
  }
  return true;
}

void Connection::flush_mapped_writes() noexcept {
  if (mapped_writes_.empty()) return;
  // One guarded call for the whole batch: a small write alone would pay for the guard what a
  // pwrite costs.
  const bool faulted = !fill_mapping(mapped_writes_, [](const InlineReply* write) {
    return MappingFill{write->target, write->length, write->source, write->length};
  });
  for (InlineReply* write : mapped_writes_) {
    int ret = 0;
    // The file shrank under the mapping: every write of the batch goes again, in order, through
    // the descriptor, as it would have without the mapping.
    if (faulted) ret = write_whole(write->mapped.fd(), write->source, write->length,
                                   write->mapped.file_offset());
    write->mapped = {};
    write->add(write->header, encode_status_reply(write->header, reply_mode_, write->request,
                                                  ret < 0 ? errno_to_nbd(ret) : 0));
    if (broken_) {
      recycle(*write);
    } else {
      enqueue(*write);
    }
  }
  mapped_writes_.clear();
}

Connection::InlineReply& Connection::take_reply() {
  if (spare_replies_.empty()) {
    inline_replies_.push_back(std::make_unique<InlineReply>());
    spare_replies_.reserve(inline_replies_.size());  // recycle() never allocates
    mapped_writes_.reserve(inline_replies_.size());
    return *inline_replies_.back();
  }
  InlineReply* reply = spare_replies_.back();
  spare_replies_.pop_back();
  return *reply;
}

void Connection::recycle(InlineReply& reply) noexcept {
  reply.count = 0;
  reply.bytes = 0;
  reply.sent = false;
  reply.next = nullptr;
  reply.mapped = {};
  reply.copy = {};
  spare_replies_.push_back(&reply);
  --in_flight_;
}

Task<void> Connection::transmission() {
  // A unix socket's send buffer bounds how much of a reply one sendmsg or sendfile queues (the
  // default, about 200 KiB, takes several rounds per 1 MiB read). Ask for more; the kernel caps
  // it at net.core.wmem_max. TCP sockets keep the kernel's autotuning.
  int domain = 0;
  socklen_t domain_size = sizeof domain;
  if (::getsockopt(fd_, SOL_SOCKET, SO_DOMAIN, &domain, &domain_size) == 0 && domain == AF_UNIX) {
    const int size = kUnixSendBufferSize;
    (void)::setsockopt(fd_, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  }
  loop_->spawn(writer());
  const bool extended = reply_mode_ == ReplyMode::kExtended;
  const RequestContext base{static_cast<uint64_t>(export_->backend().size()), export_->writable(),
                            reply_mode_ != ReplyMode::kSimple, base_allocation_, extended};
  const ServerOptions& options = server_.options();
  const size_t header_size = extended ? kExtendedRequestSize : kRequestSize;
  uint8_t header[kExtendedRequestSize];
  while (true) {
    while (!closing_ && (in_flight_ >= options.max_requests_in_flight ||
                         buffered_bytes_ >= options.max_buffered_bytes)) {
      reader_idle();
      co_await progress_.wait();
    }
    if (closing_ || broken_) break;
    if (!co_await read_exact(header, header_size)) break;
    auto request = parse_request(std::span<const uint8_t>(header, header_size));
    if (!request) break;  // the stream is out of sync: drop the client
    if (request->type == kCmdDisc) break;
    const uint64_t payload_length = request_payload_length(*request, reply_mode_);
    // An extended header states its payload length; one above the maximum is a broken client.
    if (extended && payload_length > kMaxPayload) break;

    uint32_t error = 0;
    if (payload_length > 0 && request->type != kCmdWrite) {
      // Only block status has a payload form (when advertised); any other payload is consumed
      // and refused.
      uint8_t form[12];
      const bool readable = request->type == kCmdBlockStatus && base_allocation_ &&
                            payload_length <= sizeof form;
      if (readable) {
        if (!co_await read_exact(form, payload_length)) break;
      } else if (!co_await discard(payload_length)) {
        break;
      }
      const auto effect = readable ? parse_block_status_payload(
                                         std::span<const uint8_t>(form, payload_length),
                                         kBaseAllocationId)
                                   : std::nullopt;
      if (effect) {
        request->length = *effect;
        request->flags &= ~kCmdFlagPayloadLen;
      } else {
        error = kEinval;
      }
    }

    RequestContext context = base;
    context.export_size = static_cast<uint64_t>(export_->backend().size());
    if (error == 0) error = validate_request(*request, context);
    // A small payload that only began in this receive is received whole into the receive buffer
    // (what read_exact would do anyway), so that the write can complete inline.
    static_assert(kMappedWriteThreshold <= kReceiveBufferSize / 2);
    if (error == 0 && request->type == kCmdWrite && payload_length < kMappedWriteThreshold &&
        !co_await buffer_at_least(static_cast<size_t>(payload_length))) {
      break;
    }
    if (error == 0 && complete_inline(*request, payload_length)) continue;
    Buffer buffer;
    bool written = false;
    if (request->type == kCmdWrite) {
      block::BlockBackend::MappedRange mapped;
      if (error == 0 && payload_length >= kMappedWriteThreshold) {
        mapped = export_->backend().map_write(
            request->offset, payload_length,
            (request->flags & kCmdFlagFua) ? uint32_t{block::kRequestFua} : 0u,
            /*want_memory=*/true);
        // Without the node's mapping the payload is spliced through a pipe.
        if (mapped && mapped.writable_memory() == nullptr && !ensure_pipe()) mapped = {};
      }
      if (error != 0) {
        if (!co_await discard(payload_length)) break;
      } else if (mapped) {
        int file_error = 0;
        uint64_t received = 0;
        if (!co_await receive_into_file(mapped.fd(), mapped.file_offset(),
                                        mapped.writable_memory(), payload_length, file_error,
                                        received)) {
          break;
        }
        if (received == payload_length) {
          written = true;
        } else {
          // The client stalled mid-payload. The mapping may hold the node, so it ends now: what
          // came so far is read back from the file, the rest waits in a buffer and the request
          // writes the whole payload the ordinary way.
          if (file_error == 0) {
            buffer = pool_.get(payload_length);
            if (buffer) {
              file_error = read_whole(mapped.fd(), buffer.data(), received, mapped.file_offset());
            }
          }
          mapped = {};
          const uint64_t rest = payload_length - received;
          if (file_error != 0 || !buffer) {
            buffer = {};
            if (!co_await discard(rest)) break;
          } else if (!co_await read_exact(buffer.data() + received, rest)) {
            break;
          }
        }
        if (file_error != 0) error = errno_to_nbd(file_error);
      } else if (payload_length > 0) {
        buffer = pool_.get(payload_length);
        if (!buffer) {
          if (!co_await discard(payload_length)) break;
        } else if (!co_await read_exact(buffer.data(), payload_length)) {
          break;
        }
      }
    } else if (request->type == kCmdRead && error == 0 && request->length > 0) {
      buffer = pool_.get(request->length);
    }
    uint32_t final_error = error;
    if (error == 0 && request->length > 0 &&
        (request->type == kCmdRead || request->type == kCmdWrite) && !buffer && !written) {
      final_error = kEnomem;
    }
    // The task may do its I/O at once: the small writes received before it go first, so that
    // requests of one receive reach the node in the order they were sent.
    flush_mapped_writes();
    ++in_flight_;
    buffered_bytes_ += buffer.capacity();
    loop_->spawn(
        handle_request(shared_from_this(), *request, final_error, std::move(buffer), written));
  }
  closing_ = true;
  reader_idle();
  while (in_flight_ > 0) co_await progress_.wait();
  writer_stop_ = true;
  queue_changed_.notify_all();
  while (!writer_done_) co_await progress_.wait();
}

Task<void> Connection::run(std::shared_ptr<Connection> self) {
  Connection& c = *self;
  Loop& main = *c.loop_;
  c.loop_->spawn(watchdog(self));
  const bool transmit = co_await c.handshake();
  c.handshake_done_ = true;
  if (c.watchdog_timer_ != nullptr) c.loop_->cancel(c.watchdog_timer_);
  if (transmit && !c.disconnected_) {
    // Requests run where the exported node lives: an export in an iothread moves the whole
    // transmission phase to that thread, and the connection comes back to end.
    Loop& node_loop = c.export_->backend().root()->loop();
    if (&node_loop != &main) {
      c.on_export_loop_ = true;
      c.loop_ = &node_loop;
      co_await HopTo{node_loop};
      co_await c.transmission();
      c.loop_ = &main;
      co_await HopTo{main};
      c.on_export_loop_ = false;
    } else {
      co_await c.transmission();
    }
  }
  c.disconnected_ = true;
  if (c.fd_ >= 0) {
    ::close(c.fd_);
    c.fd_ = -1;
  }
  if (c.export_) {
    --c.export_->clients_;
    c.export_->clients_changed_.notify_all();
    c.export_.reset();
  }
  c.server_.connection_ended(&c);
}

}  // namespace blockd::exports::nbd
