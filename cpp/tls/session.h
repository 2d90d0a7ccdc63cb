// A TLS session over a stream socket served by a Loop, with GnuTLS doing the cryptography.
//
// GnuTLS never touches the socket: its transport functions read from and append to two byte
// buffers, and the session's coroutines fill and drain those buffers with the loop's recv and send,
// so the loop thread never blocks on the network. After the handshake, relay() turns the session
// into a tunnel: plaintext written to the other end of a socket pair (the NBD connection's
// socket) leaves encrypted, and what the peer sends arrives there decrypted. The NBD code above
// keeps reading and writing an ordinary socket.
//
// Threads: a session belongs to the loop that runs its handshake and relay.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/event.h"
#include "runtime/loop.h"
#include "runtime/status.h"
#include "runtime/task.h"
#include "tls/credentials.h"

struct gnutls_session_int;

namespace blockd::tls {

class Session {
 public:
  // A session for the endpoint `credentials` are for. `hostname` (client side only): the name the
  // server's certificate must carry; empty for none. Errors (GenericError): an invalid priority
  // string.
  static Expected<std::unique_ptr<Session>> create(std::shared_ptr<const Credentials> credentials,
                                                   std::string_view hostname = {});
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Runs the TLS handshake with the peer on socket `fd`. `early`: bytes already read from `fd`
  // that belong to the handshake. Fails (GenericError, with GnuTLS's reason) when the peer's
  // credentials are refused, it speaks something else than TLS, or the socket ends; shutting
  // `fd` down from elsewhere (a timeout) ends a pending handshake.
  Task<Status> handshake(Loop& loop, int fd, std::span<const uint8_t> early = {});

  // Creates the socket pair for relay(): its cleartext end goes to the user of the session, the
  // other end to relay(). Its buffers are enlarged (where the system allows) so that a reply
  // stream is not held to a socket buffer's worth between the two. 0 or a negative errno.
  static int open_pair(int fds[2]) noexcept;

  // After a successful handshake: relays between the peer on `fd` and the cleartext socket
  // `plain_fd` until either side ends, then closes both descriptors. Owns the session meanwhile.
  static Task<void> relay(std::unique_ptr<Session> session, Loop& loop, int fd, int plain_fd);

 private:
  explicit Session(std::shared_ptr<const Credentials> credentials)
      : credentials_(std::move(credentials)) {}
  static ssize_t pull(void* self, void* data, size_t length) noexcept;
  static ssize_t push(void* self, const void* data, size_t length) noexcept;
  // Receives more bytes from the peer into incoming_; false when the socket ended or failed.
  Task<bool> fill();
  // Sends everything in outgoing_; false when the socket failed. Concurrent callers share one
  // send at a time and each returns once what it queued has gone.
  Task<bool> flush();
  Task<void> peer_to_plain(int plain_fd);
  Task<void> plain_to_peer(int plain_fd);

  std::shared_ptr<const Credentials> credentials_;
  std::string hostname_;
  gnutls_session_int* session_ = nullptr;
  Loop* loop_ = nullptr;
  int fd_ = -1;
  std::vector<uint8_t> incoming_;  // received, not yet taken by GnuTLS: [start, end)
  size_t incoming_start_ = 0;
  size_t incoming_end_ = 0;
  std::vector<uint8_t> outgoing_;  // produced by GnuTLS, not yet sent
  std::vector<uint8_t> sending_;   // what the current flush is sending
  bool flushing_ = false;
  bool failed_ = false;
  Event flushed_;
};

}  // namespace blockd::tls
