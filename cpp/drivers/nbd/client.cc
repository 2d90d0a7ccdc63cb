// The nbd block driver; see client.h for what it implements and reply.h for the checks applied to
// every byte the server sends.
#include "drivers/nbd/client.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <vector>

#include "drivers/nbd/reply.h"
#include "drivers/qemu_json.h"
#include "nbd/wire.h"
#include "runtime/event.h"
#include "runtime/fd_io.h"
#include "runtime/hop.h"
#include "tls/session.h"

namespace blockd::drivers {
namespace {

using namespace blockd::nbd;                // NOLINT(google-build-using-namespace)
using namespace blockd::drivers::nbd_client;  // NOLINT(google-build-using-namespace)
using Clock = std::chrono::steady_clock;

// Requests in flight on one connection; more wait for a free slot.
constexpr size_t kMaxInFlight = 64;
// A handshake that has not finished after this long is abandoned (when no open-timeout bounds it).
constexpr auto kHandshakeTimeout = std::chrono::seconds(30);
// Pauses between reconnection attempts grow from the first to the last.
constexpr auto kFirstRetryPause = std::chrono::milliseconds(50);
constexpr auto kLastRetryPause = std::chrono::seconds(1);
// Largest option reply payload accepted during the handshake.
constexpr uint32_t kMaxOptionReplyLength = 64u << 10;
// Result of a request whose connection was lost before its reply: it is sent again.
constexpr int kLost = -ENOTCONN;

// ---- Small I/O helpers on the loop.

// A sleep that another coroutine can cut short with cancel().
class Alarm {
 public:
  // Sleeps for `duration`; true when it ran its full course, false when cancelled.
  Task<bool> sleep(Loop& loop, std::chrono::nanoseconds duration) {
    cancelled_ = false;
    auto operation = loop.sleep(duration);
    pending_ = &operation;
    const int result = co_await operation;
    pending_ = nullptr;
    co_return result == 0 && !cancelled_;
  }
  void cancel(Loop& loop) {
    cancelled_ = true;
    if (pending_ != nullptr) loop.cancel(pending_);
  }

 private:
  Completion* pending_ = nullptr;
  bool cancelled_ = false;
};

// Buffered reads from a stream socket; payloads of reads go straight to their destination.
class SocketReader {
 public:
  SocketReader(Loop& loop, int fd) : loop_(&loop), fd_(fd), buffer_(new uint8_t[kBufferSize]) {}

  // Reads from `fd` from now on (the cleartext end of a TLS tunnel); nothing may be buffered.
  void switch_to(int fd) noexcept { fd_ = fd; }
  bool empty() const noexcept { return start_ == end_; }

  // Reads exactly `length` bytes into `out` (null: discard them). 0, or a negative errno
  // (-ECONNRESET for end of stream).
  Task<int> read_exact(void* out, size_t length) {
    auto* target = static_cast<uint8_t*>(out);
    while (length > 0) {
      if (start_ < end_) {
        const size_t take = std::min(end_ - start_, length);
        if (target != nullptr) {
          std::memcpy(target, buffer_.get() + start_, take);
          target += take;
        }
        start_ += take;
        length -= take;
        continue;
      }
      start_ = end_ = 0;
      const bool direct = target != nullptr && length >= kBufferSize / 2;
      const int got = co_await loop_->recv(fd_, direct ? target : buffer_.get(),
                                           direct ? length : kBufferSize, 0);
      if (got == -EINTR || got == -EAGAIN) continue;
      if (got < 0) co_return got;
      if (got == 0) co_return -ECONNRESET;
      if (direct) {
        target += got;
        length -= static_cast<size_t>(got);
      } else {
        end_ = static_cast<size_t>(got);
      }
    }
    co_return 0;
  }

 private:
  static constexpr size_t kBufferSize = 64u << 10;
  Loop* loop_;
  int fd_;
  std::unique_ptr<uint8_t[]> buffer_;
  size_t start_ = 0;
  size_t end_ = 0;
};

// Sends every byte of `vectors` (modified as it goes). 0 or a negative errno.
Task<int> send_all(Loop& loop, int fd, iovec* vectors, size_t count) {
  while (count > 0) {
    msghdr message{};
    message.msg_iov = vectors;
    message.msg_iovlen = count;
    const int sent = co_await loop.sendmsg(fd, &message, MSG_NOSIGNAL);
    if (sent == -EINTR || sent == -EAGAIN) continue;
    if (sent <= 0) co_return sent < 0 ? sent : -EPIPE;
    advance_iovecs(vectors, count, static_cast<size_t>(sent));
  }
  co_return 0;
}

Task<int> send_bytes(Loop& loop, int fd, const void* data, size_t length) {
  iovec vector{const_cast<void*>(data), length};
  co_return co_await send_all(loop, fd, &vector, 1);
}

std::string describe(const StreamAddress& address) {
  if (address.kind == StreamAddress::Kind::kUnix) return address.path;
  return address.host + ":" + address.port;
}

// ---- Connecting and negotiating.

// What the handshake established.
struct Negotiated {
  ExportInfo info;
  bool structured = false;
  bool base_allocation = false;  // base:allocation was selected, with this id:
  uint32_t meta_context_id = 0;
};

// An established connection, ready for the transmission phase.
struct Connection {
  int fd = -1;
  std::unique_ptr<SocketReader> reader;
  Negotiated negotiated;
};

// A handshake failure: `message` for the user; `fatal` when retrying cannot help (the export does
// not exist, the server is read-only), as opposed to a server that is not there (yet).
struct Failure {
  std::string message;
  bool fatal = false;
};

// Cuts a connection attempt short after its time budget: shuts the socket down, which ends a
// pending connect or receive. A plain completion rather than a coroutine: the ring owns it from
// arm() until its timeout completes (expired or cancelled), and it frees itself then.
class AttemptDeadline final : public Completion {
 public:
  // Starts the timer; the returned object stays valid until finish() has been called.
  static AttemptDeadline* arm(Loop& loop, int fd, std::chrono::nanoseconds budget) {
    auto* deadline = new AttemptDeadline(loop, fd);
    const auto count = std::max<int64_t>(budget.count(), 0);
    deadline->timeout_.tv_sec = count / 1'000'000'000;
    deadline->timeout_.tv_nsec = count % 1'000'000'000;
    io_uring_sqe* sqe = loop.get_sqe();
    io_uring_prep_timeout(sqe, &deadline->timeout_, 0, 0);
    io_uring_sqe_set_data(sqe, static_cast<Completion*>(deadline));
    return deadline;
  }
  bool timed_out() const noexcept { return timed_out_; }
  // The attempt is over (the socket may be closed now): stops the timer. The object must not be
  // used afterwards.
  void finish() {
    if (expired_) {
      delete this;  // the timer's completion has come and gone
      return;
    }
    finished_ = true;
    loop_.cancel(this);
  }
  // Shuts the attempt's socket down now (the node is being closed).
  void abort() {
    if (!finished_) ::shutdown(fd_, SHUT_RDWR);
  }

 private:
  AttemptDeadline(Loop& loop, int fd) : loop_(loop), fd_(fd) {
    complete = [](Completion* self, int, unsigned) {
      auto* deadline = static_cast<AttemptDeadline*>(self);
      if (!deadline->finished_) {
        deadline->timed_out_ = true;
        ::shutdown(deadline->fd_, SHUT_RDWR);
        // The attempt still calls finish(), whose cancel finds nothing; free then.
        deadline->expired_ = true;
        return;
      }
      delete deadline;
    };
  }

  Loop& loop_;
  int fd_;
  __kernel_timespec timeout_{};
  bool finished_ = false;
  bool timed_out_ = false;
  bool expired_ = false;
};

class Handshake {
 public:
  Handshake(Loop& loop, int fd, SocketReader& reader) : loop_(loop), fd_(fd), reader_(reader) {}

  // The socket the handshake ended on: the server's, or the cleartext end of a TLS tunnel.
  int fd() const noexcept { return fd_; }

  Task<std::optional<Failure>> run(const NbdClientOptions& options, Negotiated& out) {
    const std::string& export_name = options.export_name;
    uint8_t greeting[18];
    if (int rc = co_await reader_.read_exact(greeting, sizeof greeting); rc < 0) {
      co_return lost("while reading the greeting", rc);
    }
    if (load64(greeting) != kNbdMagic) co_return violation("the server's greeting has a bad magic");
    if (load64(greeting + 8) == kOldstyleMagic) {
      co_return violation("the server speaks the old-style protocol, which blockd does not support");
    }
    if (load64(greeting + 8) != kOptionMagic) co_return violation("the server's greeting has a bad option magic");
    const uint16_t server_flags = load16(greeting + 16);
    if (!(server_flags & kFlagFixedNewstyle)) {
      co_return violation("the server does not support fixed newstyle negotiation");
    }
    no_zeroes_ = server_flags & kFlagNoZeroes;
    uint8_t client_flags[4];
    store32(client_flags, kClientFlagFixedNewstyle | (no_zeroes_ ? kClientFlagNoZeroes : 0));
    if (int rc = co_await send_bytes(loop_, fd_, client_flags, sizeof client_flags); rc < 0) {
      co_return lost("while sending the client flags", rc);
    }
    if (options.tls_credentials) {
      if (auto failure = co_await start_tls(options); failure) co_return failure;
    }

    // Structured replies, then base:allocation (which needs them), then the export.
    if (auto failure = co_await option(kOptStructuredReply, {}); failure) co_return failure;
    if (reply_.type == kRepAck) {
      out.structured = true;
    } else if (!(reply_.type & kRepErrorBit)) {
      co_return violation("unexpected reply to NBD_OPT_STRUCTURED_REPLY");
    }
    if (out.structured) {
      std::vector<uint8_t> query(4 + export_name.size() + 8 + kBaseAllocation.size());
      store32(query.data(), static_cast<uint32_t>(export_name.size()));
      std::memcpy(query.data() + 4, export_name.data(), export_name.size());
      uint8_t* p = query.data() + 4 + export_name.size();
      store32(p, 1);
      store32(p + 4, static_cast<uint32_t>(kBaseAllocation.size()));
      std::memcpy(p + 8, kBaseAllocation.data(), kBaseAllocation.size());
      if (auto failure = co_await option(kOptSetMetaContext, query); failure) co_return failure;
      while (reply_.type == kRepMetaContext) {
        auto context = parse_meta_context_reply(payload_);
        if (!context) co_return violation("malformed NBD_REP_META_CONTEXT");
        if (context->name == kBaseAllocation) {
          out.base_allocation = true;
          out.meta_context_id = context->id;
        }
        if (auto failure = co_await next_reply(kOptSetMetaContext); failure) co_return failure;
      }
      if (reply_.type != kRepAck && !(reply_.type & kRepErrorBit)) {
        co_return violation("unexpected reply to NBD_OPT_SET_META_CONTEXT");
      }
      if (reply_.type != kRepAck) out.base_allocation = false;
    }

    std::vector<uint8_t> go(4 + export_name.size() + 4);
    store32(go.data(), static_cast<uint32_t>(export_name.size()));
    std::memcpy(go.data() + 4, export_name.data(), export_name.size());
    store16(go.data() + 4 + export_name.size(), 1);
    store16(go.data() + 6 + export_name.size(), kInfoBlockSize);
    if (auto failure = co_await option(kOptGo, go); failure) co_return failure;
    while (reply_.type == kRepInfo) {
      if (auto problem = apply_info_reply(payload_, out.info)) co_return violation(*problem);
      if (auto failure = co_await next_reply(kOptGo); failure) co_return failure;
    }
    if (reply_.type == kRepAck) {
      if (!out.info.have_export) co_return violation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT");
      co_return std::nullopt;
    }
    if (reply_.type == kRepErrUnsup) co_return co_await export_name_option(export_name, out);
    if (reply_.type == kRepErrUnknown) co_return Failure{"Requested export not available", true};
    if (reply_.type & kRepErrorBit) {
      std::string text = "Server refused export '" + export_name + "' (" + error_name(reply_.type) + ")";
      if (!payload_.empty()) text += ": " + option_error_text(payload_);
      co_return Failure{std::move(text), reply_.type != kRepErrShutdown};
    }
    co_return violation("unexpected reply to NBD_OPT_GO");
  }

 private:
  // NBD_OPT_STARTTLS and the TLS handshake; then the server's socket goes to a tunnel and the
  // handshake goes on over the cleartext end of a socket pair.
  Task<std::optional<Failure>> start_tls(const NbdClientOptions& options) {
    if (auto failure = co_await option(kOptStartTls, {}); failure) co_return failure;
    if (reply_.type != kRepAck) {
      if (!(reply_.type & kRepErrorBit)) {
        co_return violation("unexpected reply to NBD_OPT_STARTTLS");
      }
      std::string text = "Server refused NBD_OPT_STARTTLS (" + error_name(reply_.type) + ")";
      if (!payload_.empty()) text += ": " + option_error_text(payload_);
      co_return Failure{std::move(text), true};
    }
    // The server says nothing more before our ClientHello.
    if (!reader_.empty()) co_return violation("data after the reply to NBD_OPT_STARTTLS");
    auto session = tls::Session::create(options.tls_credentials, options.tls_hostname);
    if (!session) co_return Failure{session.status().message(), true};
    const Status handshaken = co_await (*session)->handshake(loop_, fd_);
    if (!handshaken.is_ok()) co_return Failure{handshaken.message(), false};
    int pair[2];
    if (int rc = tls::Session::open_pair(pair); rc < 0) co_return lost("while starting TLS", rc);
    // The relay owns the server's socket (and pair[1]) from here on, and closes them when the
    // driver closes pair[0].
    loop_.spawn(tls::Session::relay(std::move(session).value(), loop_, fd_, pair[1]));
    fd_ = pair[0];
    reader_.switch_to(fd_);
    co_return std::nullopt;
  }

  // Servers that predate NBD_OPT_GO: the export is chosen with NBD_OPT_EXPORT_NAME, which has no
  // error reply (an unknown export closes the connection).
  Task<std::optional<Failure>> export_name_option(const std::string& export_name, Negotiated& out) {
    uint8_t header[kOptionHeaderSize];
    store64(header, kOptionMagic);
    store32(header + 8, kOptExportName);
    store32(header + 12, static_cast<uint32_t>(export_name.size()));
    iovec vectors[2] = {{header, sizeof header},
                        {const_cast<char*>(export_name.data()), export_name.size()}};
    if (int rc = co_await send_all(loop_, fd_, vectors, 2); rc < 0) co_return lost("NBD_OPT_EXPORT_NAME", rc);
    uint8_t reply[10];
    if (int rc = co_await reader_.read_exact(reply, sizeof reply); rc < 0) {
      co_return Failure{"Requested export not available", true};
    }
    if (!no_zeroes_) {
      if (int rc = co_await reader_.read_exact(nullptr, 124); rc < 0) co_return lost("NBD_OPT_EXPORT_NAME", rc);
    }
    out.info.have_export = true;
    out.info.size = load64(reply);
    out.info.transmission_flags = load16(reply + 8);
    if (out.info.size > uint64_t(INT64_MAX)) co_return violation("export size is too large");
    co_return std::nullopt;
  }

  // Sends option `code` with `data` and reads its first reply into reply_/payload_.
  Task<std::optional<Failure>> option(uint32_t code, std::span<const uint8_t> data) {
    uint8_t header[kOptionHeaderSize];
    store64(header, kOptionMagic);
    store32(header + 8, code);
    store32(header + 12, static_cast<uint32_t>(data.size()));
    iovec vectors[2] = {{header, sizeof header},
                        {const_cast<uint8_t*>(data.data()), data.size()}};
    if (int rc = co_await send_all(loop_, fd_, vectors, data.empty() ? 1 : 2); rc < 0) {
      co_return lost(std::string("while sending ") + option_label(code), rc);
    }
    co_return co_await next_reply(code);
  }

  Task<std::optional<Failure>> next_reply(uint32_t code) {
    uint8_t header[kOptionReplyHeaderSize];
    if (int rc = co_await reader_.read_exact(header, sizeof header); rc < 0) {
      co_return lost(std::string("while waiting for the reply to ") + option_label(code), rc);
    }
    auto reply = parse_option_reply(std::span<const uint8_t, kOptionReplyHeaderSize>(header));
    if (!reply) co_return violation("option reply with a bad magic");
    if (reply->option != code) co_return violation("reply to an option that was not sent");
    if (reply->length > kMaxOptionReplyLength) co_return violation("option reply is too long");
    reply_ = *reply;
    payload_.resize(reply->length);
    if (int rc = co_await reader_.read_exact(payload_.data(), payload_.size()); rc < 0) {
      co_return lost("while reading an option reply", rc);
    }
    co_return std::nullopt;
  }

  static const char* option_label(uint32_t code) {
    switch (code) {
      case kOptStructuredReply:
        return "NBD_OPT_STRUCTURED_REPLY";
      case kOptSetMetaContext:
        return "NBD_OPT_SET_META_CONTEXT";
      case kOptGo:
        return "NBD_OPT_GO";
      case kOptStartTls:
        return "NBD_OPT_STARTTLS";
      default:
        return "an option";
    }
  }

  static std::string error_name(uint32_t type) {
    switch (type) {
      case kRepErrPolicy:
        return "NBD_REP_ERR_POLICY";
      case kRepErrInvalid:
        return "NBD_REP_ERR_INVALID";
      case kRepErrPlatform:
        return "NBD_REP_ERR_PLATFORM";
      case kRepErrTlsReqd:
        return "NBD_REP_ERR_TLS_REQD: the server requires TLS (tls-creds)";
      case kRepErrShutdown:
        return "NBD_REP_ERR_SHUTDOWN";
      case kRepErrBlockSizeReqd:
        return "NBD_REP_ERR_BLOCK_SIZE_REQD";
      case kRepErrTooBig:
        return "NBD_REP_ERR_TOO_BIG";
      default:
        return "error " + std::to_string(type & ~kRepErrorBit);
    }
  }

  static Failure violation(std::string what) {
    return Failure{"NBD server broke the handshake protocol: " + std::move(what), false};
  }
  static Failure lost(std::string when, int error) {
    return Failure{"Connection to the NBD server lost " + std::move(when) + ": " + errno_text(error),
                   false};
  }

  Loop& loop_;
  int fd_;
  SocketReader& reader_;
  bool no_zeroes_ = false;
  OptionReply reply_;
  std::vector<uint8_t> payload_;
};

struct ResolvedAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;
  int family = AF_UNIX;
};

// Resolves `address` (blocking for host names, as QEMU's client does). Errors as QEMU words them.
Expected<std::vector<ResolvedAddress>> resolve(const StreamAddress& address) {
  std::vector<ResolvedAddress> resolved;
  if (address.kind == StreamAddress::Kind::kUnix) {
    ResolvedAddress entry;
    auto* un = reinterpret_cast<sockaddr_un*>(&entry.storage);
    un->sun_family = AF_UNIX;
    const size_t offset = address.abstract ? 1 : 0;
    if (address.path.size() + offset >= sizeof un->sun_path) {
      return Status::generic("UNIX socket path '" + address.path + "' is too long");
    }
    std::memcpy(un->sun_path + offset, address.path.data(), address.path.size());
    entry.length = sizeof(sockaddr_un);
    if (address.abstract && address.tight) {
      entry.length =
          static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + address.path.size());
    }
    resolved.push_back(entry);
    return resolved;
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_family = AF_UNSPEC;
  if (address.ipv4.value_or(false) && !address.ipv6.value_or(false)) hints.ai_family = AF_INET;
  if (address.ipv6.value_or(false) && !address.ipv4.value_or(false)) hints.ai_family = AF_INET6;
  addrinfo* results = nullptr;
  const int rc = ::getaddrinfo(address.host.c_str(), address.port.c_str(), &hints, &results);
  if (rc != 0) {
    return Status::generic("address resolution failed for " + address.host + ":" + address.port +
                           ": " + gai_strerror(rc));
  }
  for (addrinfo* ai = results; ai != nullptr; ai = ai->ai_next) {
    ResolvedAddress entry;
    std::memcpy(&entry.storage, ai->ai_addr, ai->ai_addrlen);
    entry.length = ai->ai_addrlen;
    entry.family = ai->ai_family;
    resolved.push_back(entry);
  }
  ::freeaddrinfo(results);
  return resolved;
}

// One attempt: connect to each resolved address in turn and negotiate, within `budget`.
Task<Expected<Connection>> connect_once(Loop& loop, const NbdClientOptions& options,
                                        std::chrono::nanoseconds budget, bool& fatal,
                                        AttemptDeadline*& current) {
  fatal = false;
  auto addresses = resolve(options.server);
  if (!addresses) co_return addresses.status();
  const auto deadline = Clock::now() + budget;
  int last_error = ECONNREFUSED;
  for (const ResolvedAddress& address : *addresses) {
    const auto left = deadline - Clock::now();
    if (left <= std::chrono::nanoseconds::zero()) {
      last_error = ETIMEDOUT;
      break;
    }
    int fd = ::socket(address.family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
      last_error = errno;
      continue;
    }
    AttemptDeadline* deadline_timer = AttemptDeadline::arm(loop, fd, left);
    current = deadline_timer;
    bool timed_out = false;
    auto finish = [&] {
      timed_out = deadline_timer->timed_out();
      deadline_timer->finish();
      current = nullptr;
    };
    int error = 0;
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&address.storage), address.length) < 0) {
      error = errno;
      if (error == EINPROGRESS) {
        co_await loop.poll(fd, POLLOUT);
        socklen_t size = sizeof error;
        if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &size) < 0) error = errno;
        if (error == 0 && deadline_timer->timed_out()) error = ETIMEDOUT;
      }
    }
    if (error == 0 && Clock::now() >= deadline) error = ETIMEDOUT;
    if (error != 0) {
      finish();
      ::close(fd);
      last_error = error;
      continue;
    }
    // From here on the loop's ring waits for data; the socket itself may block.
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    if (address.family != AF_UNIX) {
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    Connection connection;
    connection.fd = fd;
    connection.reader = std::make_unique<SocketReader>(loop, fd);
    Handshake handshake(loop, fd, *connection.reader);
    auto failure = co_await handshake.run(options, connection.negotiated);
    finish();
    timed_out = timed_out || Clock::now() >= deadline;
    // With TLS, the connection goes on over the tunnel's cleartext end.
    fd = handshake.fd();
    connection.fd = fd;
    if (failure) {
      ::close(fd);
      fatal = failure->fatal;
      if (timed_out && !failure->fatal) {
        co_return Status::generic("Failed to connect to '" + describe(options.server) +
                                  "': the NBD handshake timed out");
      }
      co_return Status::generic(std::move(failure->message));
    }
    co_return connection;
  }
  co_return Status::generic("Failed to connect to '" + describe(options.server) +
                            "': " + errno_text(-last_error));
}

// ---- The node.

class Session;

class NbdNode final : public block::Node {
 public:
  NbdNode(block::NodeOptions common, NbdClientOptions options, std::shared_ptr<Session> session);
  ~NbdNode() override;

  std::string_view driver_name() const noexcept override { return "nbd"; }
  std::string filename() const override;
  nlohmann::json open_options() const override;
  uint32_t request_alignment() const noexcept override;
  uint64_t max_transfer() const noexcept override;
  bool supports_discard() const noexcept override;
  bool supports_write_zeroes() const noexcept override;

  Task<int64_t> read(uint64_t offset, uint64_t length, void* buffer,
                     uint32_t flags) noexcept override;
  Task<int64_t> write(uint64_t offset, uint64_t length, const void* buffer,
                      uint32_t flags) noexcept override;
  Task<int64_t> flush() noexcept override;
  Task<int64_t> discard(uint64_t offset, uint64_t length) noexcept override;
  Task<int64_t> write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept override;
  Task<block::BlockStatus> block_status(uint64_t offset, uint64_t length) noexcept override;
  Task<int64_t> cache(uint64_t offset, uint64_t length) noexcept override;

 private:
  bool has(uint16_t flag) const noexcept;
  // Splits [offset, offset + length) into commands of at most `limit` bytes.
  Task<int64_t> split(uint16_t command, uint16_t flags, uint64_t offset, uint64_t length,
                      uint64_t limit, const void* data, void* read_buffer) noexcept;

  NbdClientOptions options_nbd_;
  std::shared_ptr<Session> session_;
};

// The connection state of one nbd node, shared with the coroutines that outlive a call (the reader
// and the reconnection task), so that closing the node never leaves them with a dangling pointer.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(Loop& loop, NbdClientOptions options, Connection connection)
      : loop_(loop), options_(std::move(options)), negotiated_(connection.negotiated) {
    for (size_t i = 0; i < kMaxInFlight; ++i) free_.push_back(kMaxInFlight - 1 - i);
    install(std::move(connection));
  }
  ~Session() {
    if (fd_ >= 0) ::close(fd_);
  }

  const Negotiated& negotiated() const noexcept { return negotiated_; }
  // The loop the connection lives on (the node's loop when it was opened).
  Loop& loop() const noexcept { return loop_; }

  // Starts the reader of the first connection (after the session is owned by a shared_ptr).
  void start() { loop_.spawn(read_replies(shared_from_this(), std::move(pending_reader_))); }

  // Ends everything: no more requests, no reconnection; the coroutines finish on their own.
  void close() {
    if (closed_) return;
    closed_ = true;
    state_ = State::kClosed;
    if (fd_ >= 0) {
      // A courteous NBD_CMD_DISC; the socket is idle (the node was drained), so a non-blocking
      // send cannot interleave with a request.
      uint8_t request[kRequestSize];
      store_request(request, 0, kCmdDisc, 0, 0, 0);
      [[maybe_unused]] ssize_t sent = ::send(fd_, request, sizeof request, MSG_NOSIGNAL | MSG_DONTWAIT);
      ::shutdown(fd_, SHUT_RDWR);
    }
    if (attempt_ != nullptr) attempt_->abort();
    retry_alarm_.cancel(loop_);
    delay_alarm_.cancel(loop_);
    changed_.notify_all();
  }

  // Runs one command of at most the server's limits; retried across reconnections.
  Task<int64_t> execute(uint16_t command, uint16_t flags, uint64_t offset, uint32_t length,
                        const void* data, void* read_buffer, block::BlockStatus* status) noexcept {
    for (;;) {
      if (state_ == State::kWaiting || (state_ == State::kConnected && free_.empty())) {
        co_await changed_.wait();
        continue;
      }
      if (state_ != State::kConnected) co_return -EIO;
      const size_t index = free_.back();
      free_.pop_back();
      Slot& slot = slots_[index];
      slot = Slot{};
      slot.used = true;
      slot.cookie = (++sequence_ << 8) | index;
      slot.request = PendingRequest{command, flags, offset, length, negotiated_.meta_context_id};
      slot.read_buffer = static_cast<uint8_t*>(read_buffer);
      const uint64_t connection = connection_id_;

      while (sending_) co_await send_done_.wait();
      int sent = -EPIPE;
      if (connection == connection_id_ && state_ == State::kConnected) {
        sending_ = true;
        uint8_t header[kRequestSize];
        store_request(header, flags, command, slot.cookie, offset, length);
        iovec vectors[2] = {{header, sizeof header}, {const_cast<void*>(data), length}};
        sent = co_await send_all(loop_, fd_, vectors, command == kCmdWrite ? 2 : 1);
        sending_ = false;
        send_done_.notify_all();
      }
      if (sent < 0) {
        release(index);
        // The reader notices the broken socket and moves the state on; wait for that.
        if (connection == connection_id_ && state_ == State::kConnected) {
          ::shutdown(fd_, SHUT_RDWR);
          while (connection == connection_id_ && state_ == State::kConnected) {
            co_await changed_.wait();
          }
        }
        continue;
      }
      if (!slot.done) {
        struct Wait {
          Slot* slot;
          bool await_ready() const noexcept { return slot->done; }
          void await_suspend(std::coroutine_handle<> handle) noexcept { slot->waiter = handle; }
          void await_resume() const noexcept {}
        };
        co_await Wait{&slot};
      }
      const int result = slot.result;
      if (status != nullptr) *status = block::BlockStatus{slot.extent.length, extent_flags(slot.extent.flags)};
      release(index);
      if (result == kLost) continue;
      co_return result;
    }
  }

 private:
  enum class State { kConnected, kWaiting, kFailing, kClosed };

  struct Slot {
    bool used = false;
    bool done = false;
    uint64_t cookie = 0;
    PendingRequest request;
    uint8_t* read_buffer = nullptr;
    uint64_t covered = 0;   // READ: bytes filled by data and hole chunks
    bool have_extent = false;
    Extent extent;          // BLOCK_STATUS: the first run
    int result = 0;
    std::coroutine_handle<> waiter;
  };

  static uint32_t extent_flags(uint32_t state) {
    uint32_t flags = block::kStatusAllocated;
    if (!(state & kStateHole)) flags |= block::kStatusData;
    if (state & kStateZero) flags |= block::kStatusZero;
    return flags;
  }

  void release(size_t index) {
    slots_[index].used = false;
    free_.push_back(index);
    changed_.notify_all();
  }

  // The request a reply's cookie names, or null (an unknown, finished or forged cookie).
  Slot* find(uint64_t cookie) {
    const size_t index = cookie & 0xff;
    if (index >= kMaxInFlight) return nullptr;
    Slot& slot = slots_[index];
    if (!slot.used || slot.done || slot.cookie != cookie) return nullptr;
    return &slot;
  }

  static void finish(Slot& slot, int result) {
    slot.result = result;
    slot.done = true;
    if (auto waiter = std::exchange(slot.waiter, {})) waiter.resume();
  }

  void install(Connection connection) {
    fd_ = connection.fd;
    ++connection_id_;
    pending_reader_ = std::move(connection.reader);
    state_ = State::kConnected;
  }

  // The reader of one connection: matches each reply to its request by cookie and fills in the
  // request's buffer. Ends when the connection does, or at the first protocol violation.
  static Task<void> read_replies(std::shared_ptr<Session> self, std::unique_ptr<SocketReader> in) {
    Session& s = *self;
    const bool violated = co_await s.read_until_failure(*in);
    s.connection_lost(violated);
  }

  // True when the server broke the protocol, false when the connection ended.
  Task<bool> read_until_failure(SocketReader& in) {
    std::vector<uint8_t> payload;
    for (;;) {
      uint8_t header[kChunkHeaderSize];
      if (co_await in.read_exact(header, 4) < 0) co_return false;
      const size_t size = reply_header_size(load32(header));
      if (size == 0) co_return true;
      if (co_await in.read_exact(header + 4, size - 4) < 0) co_return false;
      auto reply = parse_reply_header(std::span<const uint8_t>(header, size));
      if (!reply) co_return true;
      Slot* slot = find(reply->cookie);
      if (slot == nullptr) co_return true;
      const PendingRequest& request = slot->request;

      if (!reply->structured) {
        if (reply->error == 0 && request.command == kCmdRead) {
          if (co_await in.read_exact(slot->read_buffer, request.length) < 0) co_return false;
        } else if (reply->error == 0 && request.command == kCmdBlockStatus) {
          co_return true;  // block status has no simple success reply
        }
        finish(*slot, result_of(nbd_error_to_errno(reply->error)));
        continue;
      }

      if (check_chunk_header(*reply, request)) co_return true;
      switch (reply->type) {
        case kReplyTypeOffsetData: {
          uint8_t offset[8];
          if (co_await in.read_exact(offset, sizeof offset) < 0) co_return false;
          const uint32_t data_length = reply->length - 8;
          auto position = data_chunk_position(std::span<const uint8_t, 8>(offset), data_length, request);
          if (!position) co_return true;
          if (co_await in.read_exact(slot->read_buffer + *position, data_length) < 0) co_return false;
          slot->covered += data_length;
          break;
        }
        case kReplyTypeOffsetHole: {
          uint8_t hole[12];
          if (co_await in.read_exact(hole, sizeof hole) < 0) co_return false;
          auto position = hole_chunk_position(hole, request);
          if (!position) co_return true;
          std::memset(slot->read_buffer + position->position, 0, position->length);
          slot->covered += position->length;
          break;
        }
        case kReplyTypeBlockStatus: {
          // Requests use REQ_ONE: one descriptor per chunk.
          if (reply->length != 12) co_return true;
          uint8_t chunk[12];
          if (co_await in.read_exact(chunk, sizeof chunk) < 0) co_return false;
          auto extent = parse_block_status_chunk(chunk, request);
          if (!extent) co_return true;
          if (extent->length > 0) {
            slot->extent = *extent;
            slot->have_extent = true;
          }
          break;
        }
        case kReplyTypeNone:
          break;
        default: {  // error chunks (check_chunk_header let nothing else through)
          payload.resize(reply->length);
          if (co_await in.read_exact(payload.data(), payload.size()) < 0) co_return false;
          auto error = parse_error_chunk(payload, reply->type);
          if (!error) co_return true;
          if (slot->result == 0) slot->result = result_of(nbd_error_to_errno(error->error));
          break;
        }
      }
      if (reply->flags & kReplyFlagDone) {
        if (slot->result == 0) {
          if (request.command == kCmdRead && slot->covered != request.length) co_return true;
          if (request.command == kCmdBlockStatus && !slot->have_extent) co_return true;
        }
        finish(*slot, slot->result);
      }
    }
  }

  // A server that is shutting down answers ESHUTDOWN: with a reconnect-delay, such a request
  // waits for the server to come back like one whose connection dropped.
  int result_of(int error) const {
    return error == -ESHUTDOWN && options_.reconnect_delay > 0 ? kLost : error;
  }

  void connection_lost(bool violated) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    ++connection_id_;
    state_ = closed_                         ? State::kClosed
             : options_.reconnect_delay > 0 ? State::kWaiting
                                             : State::kFailing;
    // Requests in flight are sent again after the reconnection, unless the server broke the
    // protocol answering them.
    for (Slot& slot : slots_) {
      if (slot.used && !slot.done) finish(slot, violated ? -EIO : kLost);
    }
    changed_.notify_all();
    if (closed_) return;
    auto self = shared_from_this();
    if (state_ == State::kWaiting) loop_.spawn(expire_delay(self, connection_id_));
    loop_.spawn(reconnect(self));
  }

  // Ends the wait of requests reconnect-delay seconds after the connection was lost.
  static Task<void> expire_delay(std::shared_ptr<Session> self, uint64_t lost_connection) {
    Session& s = *self;
    const bool expired =
        co_await s.delay_alarm_.sleep(s.loop_, std::chrono::seconds(s.options_.reconnect_delay));
    if (expired && s.connection_id_ == lost_connection && s.state_ == State::kWaiting) {
      s.state_ = State::kFailing;
      s.changed_.notify_all();
    }
  }

  static Task<void> reconnect(std::shared_ptr<Session> self) {
    Session& s = *self;
    auto pause = std::chrono::duration_cast<std::chrono::nanoseconds>(kFirstRetryPause);
    while (!s.closed_) {
      bool fatal = false;
      auto attempt = co_await connect_once(s.loop_, s.options_, std::chrono::seconds(5), fatal, s.attempt_);
      if (s.closed_) {
        if (attempt) ::close(attempt->fd);
        break;
      }
      if (attempt && attempt->negotiated.info.size == s.negotiated_.info.size &&
          (attempt->negotiated.info.transmission_flags & kFlagReadOnly) ==
              (s.negotiated_.info.transmission_flags & kFlagReadOnly)) {
        s.negotiated_ = attempt->negotiated;
        s.install(std::move(attempt).value());
        s.delay_alarm_.cancel(s.loop_);
        s.loop_.spawn(read_replies(self, std::move(s.pending_reader_)));
        s.changed_.notify_all();
        break;
      }
      // A server that came back with another size or mode is not the same export: keep trying,
      // requests fail once the delay is over.
      if (attempt) ::close(attempt->fd);
      co_await s.retry_alarm_.sleep(s.loop_, pause);
      pause = std::min<std::chrono::nanoseconds>(pause * 2, kLastRetryPause);
    }
  }

  Loop& loop_;
  NbdClientOptions options_;
  Negotiated negotiated_;
  int fd_ = -1;
  uint64_t connection_id_ = 0;
  std::unique_ptr<SocketReader> pending_reader_;  // for the reader about to start
  State state_ = State::kConnected;
  bool closed_ = false;
  Event changed_;  // state changed, a slot was freed
  std::array<Slot, kMaxInFlight> slots_;
  std::vector<size_t> free_;
  uint64_t sequence_ = 0;
  bool sending_ = false;
  Event send_done_;
  Alarm retry_alarm_;
  Alarm delay_alarm_;
  AttemptDeadline* attempt_ = nullptr;  // the reconnection attempt under way
};

NbdNode::NbdNode(block::NodeOptions common, NbdClientOptions options,
                 std::shared_ptr<Session> session)
    : Node(std::move(common)), options_nbd_(std::move(options)), session_(std::move(session)) {
  set_size(static_cast<int64_t>(session_->negotiated().info.size));
}

NbdNode::~NbdNode() { session_->close(); }

std::string NbdNode::filename() const {
  const StreamAddress& server = options_nbd_.server;
  if (server.kind == StreamAddress::Kind::kUnix && !server.abstract) {
    return "nbd+unix:///" + options_nbd_.export_name + "?socket=" + server.path;
  }
  if (server.kind == StreamAddress::Kind::kInet) {
    const bool ipv6 = server.host.find(':') != std::string::npos;
    return "nbd://" + (ipv6 ? "[" + server.host + "]" : server.host) + ":" + server.port + "/" +
           options_nbd_.export_name;
  }
  return json_filename(open_options());
}

nlohmann::json NbdNode::open_options() const {
  const StreamAddress& server = options_nbd_.server;
  nlohmann::json address;
  if (server.kind == StreamAddress::Kind::kUnix) {
    address = {{"type", "unix"}, {"path", server.path}};
    if (server.abstract) address["abstract"] = true;
  } else {
    address = {{"type", "inet"}, {"host", server.host}, {"port", server.port}};
  }
  nlohmann::json options = {{"driver", "nbd"}, {"server", address}};
  if (!options_nbd_.export_name.empty()) options["export"] = options_nbd_.export_name;
  return options;
}

bool NbdNode::has(uint16_t flag) const noexcept {
  return session_->negotiated().info.transmission_flags & flag;
}

uint32_t NbdNode::request_alignment() const noexcept {
  return session_->negotiated().info.minimum_block;
}

uint64_t NbdNode::max_transfer() const noexcept {
  const auto& info = session_->negotiated().info;
  // The largest payload every server must accept, unless this one allows less; aligned down.
  const uint64_t limit = std::min<uint64_t>(info.maximum_payload, 32u << 20);
  return std::max<uint64_t>(limit / info.minimum_block * info.minimum_block, info.minimum_block);
}

bool NbdNode::supports_discard() const noexcept { return has(kFlagSendTrim); }
bool NbdNode::supports_write_zeroes() const noexcept { return has(kFlagSendWriteZeroes); }

Task<int64_t> NbdNode::split(uint16_t command, uint16_t flags, uint64_t offset, uint64_t length,
                             uint64_t limit, const void* data, void* read_buffer) noexcept {
  co_await HopTo{session_->loop()};
  uint64_t done = 0;
  int64_t rc = 0;
  do {
    const auto piece = static_cast<uint32_t>(std::min(length - done, limit));
    rc = co_await session_->execute(
        command, flags, offset + done, piece,
        data != nullptr ? static_cast<const uint8_t*>(data) + done : nullptr,
        read_buffer != nullptr ? static_cast<uint8_t*>(read_buffer) + done : nullptr, nullptr);
    done += piece;
  } while (rc >= 0 && done < length);
  co_await HopTo{loop()};
  co_return rc < 0 ? rc : 0;
}

Task<int64_t> NbdNode::read(uint64_t offset, uint64_t length, void* buffer, uint32_t) noexcept {
  if (length == 0) co_return 0;
  co_return co_await split(kCmdRead, 0, offset, length, max_transfer(), nullptr, buffer);
}

Task<int64_t> NbdNode::write(uint64_t offset, uint64_t length, const void* buffer,
                             uint32_t flags) noexcept {
  if (read_only()) co_return -EROFS;
  if (length == 0) co_return 0;
  const bool fua = flags & block::kRequestFua;
  const uint16_t command_flags = fua && has(kFlagSendFua) ? kCmdFlagFua : 0;
  int64_t rc = co_await split(kCmdWrite, command_flags, offset, length, max_transfer(), buffer,
                              nullptr);
  // Without FUA on the wire, durability comes from a flush.
  if (rc == 0 && fua && command_flags == 0) rc = co_await flush();
  co_return rc;
}

Task<int64_t> NbdNode::flush() noexcept {
  if (!has(kFlagSendFlush)) co_return 0;
  co_await HopTo{session_->loop()};
  const int64_t rc = co_await session_->execute(kCmdFlush, 0, 0, 0, nullptr, nullptr, nullptr);
  co_await HopTo{loop()};
  co_return rc;
}

namespace {
// Effect-only commands (TRIM, WRITE_ZEROES, CACHE) carry a 32-bit length; pieces stay aligned.
uint64_t effect_limit(uint32_t alignment) { return (uint64_t{1} << 31) / alignment * alignment; }
}  // namespace

Task<int64_t> NbdNode::discard(uint64_t offset, uint64_t length) noexcept {
  if (read_only()) co_return -EROFS;
  if (options_.discard != "unmap" || !has(kFlagSendTrim) || length == 0) co_return 0;
  co_return co_await split(kCmdTrim, 0, offset, length, effect_limit(request_alignment()), nullptr,
                           nullptr);
}

Task<int64_t> NbdNode::write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept {
  if (read_only()) co_return -EROFS;
  if (length == 0) co_return 0;
  const bool no_fallback = flags & block::kRequestNoFallback;
  if (!has(kFlagSendWriteZeroes) || (no_fallback && !has(kFlagSendFastZero))) {
    if (no_fallback) co_return -ENOTSUP;
    co_return co_await Node::write_zeroes(offset, length, flags);
  }
  uint16_t command_flags = 0;
  if (!(flags & block::kRequestMayUnmap) || options_.discard != "unmap") command_flags |= kCmdFlagNoHole;
  if (no_fallback) command_flags |= kCmdFlagFastZero;
  if ((flags & block::kRequestFua) && has(kFlagSendFua)) command_flags |= kCmdFlagFua;
  int64_t rc = co_await split(kCmdWriteZeroes, command_flags, offset, length,
                              effect_limit(request_alignment()), nullptr, nullptr);
  if (rc == 0 && (flags & block::kRequestFua) && !has(kFlagSendFua)) rc = co_await flush();
  co_return rc;
}

Task<block::BlockStatus> NbdNode::block_status(uint64_t offset, uint64_t length) noexcept {
  const uint64_t size = static_cast<uint64_t>(this->size());
  if (offset >= size) co_return block::BlockStatus{0, 0};
  length = std::min(length, size - offset);
  if (!session_->negotiated().base_allocation) {
    co_return block::BlockStatus{static_cast<int64_t>(length),
                                 block::kStatusData | block::kStatusAllocated};
  }
  const auto piece = static_cast<uint32_t>(std::min<uint64_t>(length, effect_limit(request_alignment())));
  block::BlockStatus status;
  co_await HopTo{session_->loop()};
  const int64_t rc = co_await session_->execute(kCmdBlockStatus, kCmdFlagReqOne, offset, piece,
                                                nullptr, nullptr, &status);
  co_await HopTo{loop()};
  if (rc < 0) co_return block::BlockStatus{rc, 0};
  co_return status;
}

Task<int64_t> NbdNode::cache(uint64_t offset, uint64_t length) noexcept {
  if (!has(kFlagSendCache)) co_return co_await Node::cache(offset, length);
  co_return co_await split(kCmdCache, 0, offset, length, effect_limit(request_alignment()), nullptr,
                           nullptr);
}

}  // namespace

Task<Expected<std::shared_ptr<block::Node>>> open_nbd_node(block::NodeOptions common,
                                                           NbdClientOptions options, Loop& loop) {
  // The first connection is retried for open-timeout seconds (at least one attempt is made).
  const auto deadline = Clock::now() + std::chrono::seconds(options.open_timeout);
  auto pause = std::chrono::duration_cast<std::chrono::nanoseconds>(kFirstRetryPause);
  AttemptDeadline* attempt_guard = nullptr;
  for (;;) {
    const auto left = deadline - Clock::now();
    const std::chrono::nanoseconds budget =
        options.open_timeout == 0 ? std::chrono::nanoseconds(kHandshakeTimeout)
                                  : std::max<std::chrono::nanoseconds>(left, std::chrono::milliseconds(1));
    bool fatal = false;
    auto connection = co_await connect_once(loop, options, budget, fatal, attempt_guard);
    if (connection) {
      const Negotiated& negotiated = connection->negotiated;
      if ((negotiated.info.transmission_flags & kFlagReadOnly) && !common.read_only) {
        if (!common.auto_read_only) {
          ::close(connection->fd);
          co_return Status::generic("Could not open image: Permission denied");
        }
        common.read_only = true;
      }
      auto session = std::make_shared<Session>(loop, options, std::move(connection).value());
      session->start();
      auto node = std::make_shared<NbdNode>(std::move(common), std::move(options), session);
      node->set_loop(loop);
      co_return std::shared_ptr<block::Node>(std::move(node));
    }
    if (fatal || Clock::now() + pause >= deadline) co_return connection.status();
    co_await loop.sleep(pause);
    pause = std::min<std::chrono::nanoseconds>(pause * 2, kLastRetryPause);
  }
}

}  // namespace blockd::drivers
