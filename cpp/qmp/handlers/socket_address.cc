#include "qmp/handlers/socket_address.h"

namespace blockd::qapi {

Expected<StreamAddress> to_stream_address(const SocketAddress& address) {
  StreamAddress result;
  switch (address.type) {
    case SocketAddressType::kUnix: {
      const UnixSocketAddress& unix_address = *address.u.unix_;
      result.kind = StreamAddress::Kind::kUnix;
      result.path = unix_address.path;
      result.abstract = unix_address.abstract.value_or(false);
      result.tight = unix_address.tight.value_or(true);
      return result;
    }
    case SocketAddressType::kInet: {
      const InetSocketAddress& inet = *address.u.inet;
      result.kind = StreamAddress::Kind::kInet;
      result.host = inet.host;
      result.port = inet.port;
      result.ipv4 = inet.ipv4;
      result.ipv6 = inet.ipv6;
      return result;
    }
    case SocketAddressType::kFd:
      return Status::generic("only QEMU supports file descriptor passing");
    case SocketAddressType::kVsock:
      return Status::generic("vsock sockets are not supported by blockd");
  }
  return Status::generic("unknown socket address type");
}

}  // namespace blockd::qapi
