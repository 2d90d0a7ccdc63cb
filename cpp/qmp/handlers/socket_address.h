// Translation of the schema's SocketAddress into the runtime's StreamAddress, shared by the NBD
// server commands (exports.cc) and the nbd block driver's options (block.cc).
#pragma once

#include "qapi/types.h"
#include "runtime/status.h"
#include "runtime/stream_address.h"

namespace blockd::qapi {

// Unix and inet addresses convert; fd and vsock addresses are refused (GenericError):
// "only QEMU supports file descriptor passing", "vsock sockets are not supported by blockd".
Expected<StreamAddress> to_stream_address(const SocketAddress& address);

}  // namespace blockd::qapi
