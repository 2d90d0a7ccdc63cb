// The nbd block driver: a node whose data is an export of an NBD server in another process or on
// another host (QEMU's BlockdevOptionsNbd, behaviour as qemu-storage-daemon 7.2).
//
// Client side of NetworkBlockDevice/nbd doc/proto.md: fixed newstyle negotiation with NO_ZEROES,
// NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT for base:allocation, NBD_OPT_GO asking for
// NBD_INFO_BLOCK_SIZE (NBD_OPT_EXPORT_NAME when the server does not know GO); then READ, WRITE
// (FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE and BLOCK_STATUS, as far as the
// server's transmission flags allow, with requests split at the server's maximum payload. Many
// requests are in flight on one connection; one reader coroutine matches replies to requests by
// cookie. Structured replies (data, hole and error chunks) are used when the server offers them,
// simple replies otherwise.
//
// TLS (proto.md "TLS support"): with tls_credentials the client sends NBD_OPT_STARTTLS right after
// the client flags, runs the TLS handshake, and then talks through a tunnel (tls/session.h) that
// relays between the server's socket and a socket pair; the rest of the driver uses the pair's
// cleartext end.
//
// Reconnection: when the connection drops, the driver reconnects in the background. Requests
// (including those that were in flight, which are sent again) wait up to reconnect-delay seconds
// for the new connection; after that they fail with EIO, as do new requests, until a reconnect
// succeeds. A reply that breaks the protocol fails the requests in flight with EIO and drops the
// connection (which is then re-established like a lost one).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "block/node.h"
#include "runtime/loop.h"
#include "runtime/status.h"
#include "runtime/stream_address.h"
#include "runtime/task.h"
#include "tls/credentials.h"

namespace blockd::drivers {

struct NbdClientOptions {
  StreamAddress server;
  std::string export_name;       // "" is the default export
  uint32_t reconnect_delay = 0;  // seconds requests wait for a reconnect (0: fail at once)
  uint32_t open_timeout = 0;     // seconds the first connection is retried (0: one attempt)
  // Client-endpoint credentials: every connection starts with NBD_OPT_STARTTLS and the TLS
  // handshake, and everything after goes through a TLS tunnel. Null for plaintext.
  std::shared_ptr<const tls::Credentials> tls_credentials;
  std::string tls_hostname;  // the name the server's certificate must carry (X.509)
};

// Connects to the server, negotiates and returns the node; runs on `loop` (the node's loop, the
// main loop), so call it from a task there (QMP handlers use Context::run_nested).
// Errors (GenericError), worded as qemu-storage-daemon 7.2 words them:
//   "Failed to connect to '<path>' / '<host>:<port>': <strerror>"
//   "address resolution failed for <host>:<port>: <gai_strerror>"
//   "Requested export not available" (the server does not know the export)
//   "Could not open image: Permission denied" (a read-only export opened read-write)
//   "Server refused NBD_OPT_STARTTLS (<error>)[: <server's message>]"
//   "TLS handshake failed: <GnuTLS's reason>"
// and a message naming the violation when the server breaks the handshake protocol.
Task<Expected<std::shared_ptr<block::Node>>> open_nbd_node(block::NodeOptions common,
                                                           NbdClientOptions options, Loop& loop);

}  // namespace blockd::drivers
