// A listening unix stream socket for a StreamAddress of kind kUnix (path or abstract name), shared
// by the NBD server and the vhost-user-blk export.
#pragma once

#include "runtime/status.h"
#include "runtime/stream_address.h"

namespace blockd {

// Creates, binds and listens; a stale socket file at the path is unlinked first. Returns the
// descriptor (close-on-exec, blocking), owned by the caller. Errors (GenericError), in QEMU's
// words: "UNIX socket path '<path>' is too long", "Failed to create socket: <strerror>",
// "Failed to unlink socket <path>: <strerror>", "Failed to bind socket to <path>: <strerror>",
// "Failed to listen on socket: <strerror>". Any thread.
Expected<int> listen_unix(const StreamAddress& address, int backlog);

}  // namespace blockd
