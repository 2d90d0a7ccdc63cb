// Listening unix sockets (see unix_listen.h).
#include "runtime/unix_listen.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>

namespace blockd {

Expected<int> listen_unix(const StreamAddress& address, int backlog) {
  sockaddr_un un{};
  un.sun_family = AF_UNIX;
  const size_t offset = address.abstract ? 1 : 0;
  if (address.path.size() + offset >= sizeof un.sun_path) {
    return Status::generic("UNIX socket path '" + address.path + "' is too long");
  }
  std::copy(address.path.begin(), address.path.end(), un.sun_path + offset);
  socklen_t length = sizeof un;
  if (address.abstract && address.tight) {
    length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + address.path.size());
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::generic("Failed to create socket: " + errno_text(-errno));
  if (!address.abstract && ::unlink(address.path.c_str()) < 0 && errno != ENOENT) {
    const int error = errno;
    ::close(fd);
    return Status::generic("Failed to unlink socket " + address.path + ": " + errno_text(-error));
  }
  if (::bind(fd, reinterpret_cast<sockaddr*>(&un), length) < 0) {
    const int error = errno;
    ::close(fd);
    return Status::generic("Failed to bind socket to " + address.path + ": " + errno_text(-error));
  }
  if (::listen(fd, backlog) < 0) {
    const int error = errno;
    ::close(fd);
    return Status::generic("Failed to listen on socket: " + errno_text(-error));
  }
  return fd;
}

}  // namespace blockd
