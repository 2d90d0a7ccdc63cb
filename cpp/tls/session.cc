// TLS sessions over the loop's sockets: GnuTLS with memory-buffer transport functions.
#include "tls/session.h"

#include <gnutls/gnutls.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "runtime/join.h"

namespace blockd::tls {
namespace {

// Size of one receive from either socket, and of one send of decrypted bytes.
constexpr size_t kChunk = 64u << 10;
// Socket buffer size asked for on each end of a relay's socket pair.
constexpr int kPairBuffer = 2 << 20;
// The most plaintext one TLS record carries.
constexpr size_t kMaxRecord = 16u << 10;

// Sends all `length` bytes of `data` to `fd`; false when the socket failed.
Task<bool> send_all(Loop& loop, int fd, const uint8_t* data, size_t length) {
  while (length > 0) {
    const int sent = co_await loop.send(fd, data, length, MSG_NOSIGNAL);
    if (sent == -EINTR || sent == -EAGAIN) continue;
    if (sent <= 0) co_return false;
    data += sent;
    length -= static_cast<size_t>(sent);
  }
  co_return true;
}

bool retryable(ssize_t result) {
  return result == GNUTLS_E_AGAIN || result == GNUTLS_E_INTERRUPTED;
}

}  // namespace

Expected<std::unique_ptr<Session>> Session::create(std::shared_ptr<const Credentials> credentials,
                                                   std::string_view hostname) {
  const bool server = credentials->endpoint() == Endpoint::kServer;
  std::unique_ptr<Session> session(new Session(credentials));
  if (gnutls_init(&session->session_, (server ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NONBLOCK) !=
      GNUTLS_E_SUCCESS) {
    return Status::generic("Cannot initialize TLS session");
  }
  gnutls_session_t s = session->session_;
  const bool psk = credentials->kind() == Credentials::Kind::kPsk;
  std::string priority = credentials->priority();
  // Pre-shared keys need their key exchanges, which GnuTLS's defaults leave out.
  if (psk) priority = (priority.empty() ? "NORMAL" : priority) + ":+ECDHE-PSK:+DHE-PSK:+PSK";
  int result;
  if (priority.empty()) {
    result = gnutls_set_default_priority(s);
  } else {
    const char* where = nullptr;
    result = gnutls_priority_set_direct(s, priority.c_str(), &where);
  }
  if (result < 0) {
    return Status::generic("Unable to set TLS session priority " + priority + ": " +
                           gnutls_strerror(result));
  }
  if (psk) {
    result = server ? gnutls_credentials_set(s, GNUTLS_CRD_PSK, credentials->psk_server())
                    : gnutls_credentials_set(s, GNUTLS_CRD_PSK, credentials->psk_client());
  } else {
    result = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, credentials->certificates());
  }
  if (result < 0) {
    return Status::generic(std::string("Cannot set session credentials: ") +
                           gnutls_strerror(result));
  }
  if (server && !psk) {
    gnutls_certificate_server_set_request(
        s, credentials->verify_peer() ? GNUTLS_CERT_REQUIRE : GNUTLS_CERT_IGNORE);
  }
  // GnuTLS keeps a pointer to the name: the session holds it.
  session->hostname_ = std::string(hostname);
  const std::string& name = session->hostname_;
  if (!name.empty()) gnutls_server_name_set(s, GNUTLS_NAME_DNS, name.data(), name.size());
  // GnuTLS checks the peer's chain (and the server's name, when given) during the handshake.
  if (credentials->verify_peer() && !psk) {
    gnutls_session_set_verify_cert(s, name.empty() ? nullptr : name.c_str(), 0);
  }
  gnutls_transport_set_ptr(s, session.get());
  gnutls_transport_set_pull_function(s, &Session::pull);
  gnutls_transport_set_push_function(s, &Session::push);
  return session;
}

Session::~Session() {
  if (session_ != nullptr) gnutls_deinit(session_);
}

ssize_t Session::pull(void* self, void* data, size_t length) noexcept {
  auto& session = *static_cast<Session*>(self);
  const size_t available = session.incoming_end_ - session.incoming_start_;
  if (available == 0) {
    gnutls_transport_set_errno(session.session_, EAGAIN);
    return -1;
  }
  const size_t take = std::min(available, length);
  std::memcpy(data, session.incoming_.data() + session.incoming_start_, take);
  session.incoming_start_ += take;
  return static_cast<ssize_t>(take);
}

ssize_t Session::push(void* self, const void* data, size_t length) noexcept {
  auto& session = *static_cast<Session*>(self);
  const auto* bytes = static_cast<const uint8_t*>(data);
  session.outgoing_.insert(session.outgoing_.end(), bytes, bytes + length);
  return static_cast<ssize_t>(length);
}

Task<bool> Session::fill() {
  // Only called once GnuTLS has taken everything buffered.
  if (incoming_.size() < kChunk) incoming_.resize(kChunk);
  incoming_start_ = incoming_end_ = 0;
  int got;
  do {
    got = co_await loop_->recv(fd_, incoming_.data(), incoming_.size(), 0);
  } while (got == -EINTR || got == -EAGAIN);
  if (got <= 0) co_return false;
  incoming_end_ = static_cast<size_t>(got);
  co_return true;
}

Task<bool> Session::flush() {
  while (!outgoing_.empty() && !failed_) {
    if (flushing_) {
      co_await flushed_.wait();
      continue;
    }
    flushing_ = true;
    sending_.swap(outgoing_);
    const bool sent = co_await send_all(*loop_, fd_, sending_.data(), sending_.size());
    sending_.clear();
    flushing_ = false;
    if (!sent) failed_ = true;
    flushed_.notify_all();
  }
  co_return !failed_;
}

Task<Status> Session::handshake(Loop& loop, int fd, std::span<const uint8_t> early) {
  loop_ = &loop;
  fd_ = fd;
  incoming_.assign(early.begin(), early.end());
  incoming_start_ = 0;
  incoming_end_ = early.size();
  while (true) {
    const int result = gnutls_handshake(session_);
    if (!co_await flush()) co_return Status::generic("TLS handshake failed: the peer went away");
    if (result == GNUTLS_E_SUCCESS) co_return Status::ok();
    if (retryable(result)) {
      if (!co_await fill()) {
        co_return Status::generic("TLS handshake failed: the peer went away");
      }
      continue;
    }
    if (!gnutls_error_is_fatal(result)) continue;  // a warning alert: carry on
    std::string why = gnutls_strerror(result);
    if (result == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
      gnutls_datum_t text{};
      if (gnutls_certificate_verification_status_print(
              gnutls_session_get_verify_cert_status(session_), GNUTLS_CRT_X509, &text, 0) == 0) {
        why += std::string(" (") + reinterpret_cast<const char*>(text.data) + ")";
        gnutls_free(text.data);
      }
    }
    co_return Status::generic("TLS handshake failed: " + why);
  }
}

Task<void> Session::peer_to_plain(int plain_fd) {
  std::vector<uint8_t> buffer(kChunk);
  size_t have = 0;
  bool open = true;
  while (open) {
    const ssize_t got = gnutls_record_recv(session_, buffer.data() + have, buffer.size() - have);
    if (got > 0) {
      // Decrypt the records already received into one send, as long as a whole record fits.
      have += static_cast<size_t>(got);
      if (buffer.size() - have >= kMaxRecord) continue;
    } else if (got == 0 || (!retryable(got) && gnutls_error_is_fatal(static_cast<int>(got)))) {
      open = false;  // the peer closed the session (close_notify), or it failed
    } else if (!retryable(got)) {
      continue;  // a warning alert
    }
    if (have > 0) {
      if (!co_await send_all(*loop_, plain_fd, buffer.data(), have)) break;
      have = 0;
    }
    // Out of received bytes. GnuTLS may have answered something (a key update) while reading.
    if (open && got < 0 && (!co_await flush() || !co_await fill())) break;
  }
  // Ends the cleartext side: the NBD connection sees its client gone, and plain_to_peer stops.
  ::shutdown(plain_fd, SHUT_RDWR);
}

Task<void> Session::plain_to_peer(int plain_fd) {
  std::vector<uint8_t> buffer(kChunk);
  bool open = true;
  while (open) {
    const int got = co_await loop_->recv(plain_fd, buffer.data(), buffer.size(), 0);
    if (got == -EINTR || got == -EAGAIN) continue;
    if (got <= 0) break;
    size_t done = 0;
    while (done < static_cast<size_t>(got)) {
      const ssize_t sent =
          gnutls_record_send(session_, buffer.data() + done, static_cast<size_t>(got) - done);
      if (sent < 0) {
        if (retryable(sent)) continue;
        open = false;
        break;
      }
      done += static_cast<size_t>(sent);
    }
    if (!co_await flush()) break;
  }
  // Tells the peer the session ends (close_notify), then ends the socket, which also wakes
  // peer_to_plain.
  if (!failed_) {
    (void)gnutls_bye(session_, GNUTLS_SHUT_WR);
    (void)co_await flush();
  }
  ::shutdown(fd_, SHUT_RDWR);
}

int Session::open_pair(int fds[2]) noexcept {
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return -errno;
  const int size = kPairBuffer;
  for (int i = 0; i < 2; ++i) {
    (void)::setsockopt(fds[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    (void)::setsockopt(fds[i], SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  }
  return 0;
}

Task<void> Session::relay(std::unique_ptr<Session> session, Loop& loop, int fd, int plain_fd) {
  session->loop_ = &loop;
  session->fd_ = fd;
  {
    Join join;
    join.start(loop, session->peer_to_plain(plain_fd));
    join.start(loop, session->plain_to_peer(plain_fd));
    co_await join.wait();
  }
  ::close(plain_fd);
  ::close(fd);
}

}  // namespace blockd::tls
