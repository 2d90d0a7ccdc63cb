// StreamAddress: where a stream socket listens or connects (QEMU's SocketAddress, unix and inet
// only). Shared by the NBD server (listening) and the NBD client driver (connecting); the QMP layer
// builds it from the schema's SocketAddress.
#pragma once

#include <optional>
#include <string>

namespace blockd {

struct StreamAddress {
  enum class Kind { kUnix, kInet };
  Kind kind = Kind::kUnix;
  // kUnix
  std::string path;
  bool abstract = false;  // Linux abstract namespace
  bool tight = true;      // abstract: the address length covers only the name
  // kInet
  std::string host;
  std::string port;
  std::optional<bool> ipv4;
  std::optional<bool> ipv6;
};

}  // namespace blockd
