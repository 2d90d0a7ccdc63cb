#include "exports/nbd/server.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "exports/nbd/connection.h"
#include "exports/nbd/protocol.h"
#include "runtime/unix_listen.h"

namespace blockd::exports::nbd {

// ---- NbdExport.

NbdExport::NbdExport(Server& server, const NbdExportOptions& options, std::string node_name)
    : Export(options.id, std::move(node_name)),
      server_(&server),
      name_(options.name),
      description_(options.description),
      writable_(options.writable),
      backend_(std::make_unique<block::BlockBackend>("block export '" + options.id + "'")) {}

NbdExport::~NbdExport() = default;

Task<void> NbdExport::shut_down() {
  set_shutting_down();
  if (server_ != nullptr) {
    auto& list = server_->exports_;
    list.erase(std::remove(list.begin(), list.end(), this), list.end());
    // Copy: connections remove themselves from the server's list as they end.
    for (Connection* connection : std::vector<Connection*>(server_->connections_)) {
      if (connection->attached_export() == this) connection->disconnect();
    }
  }
  while (clients_ > 0) co_await clients_changed_.wait();
  co_await backend_->drain();
  backend_->detach_to(*Loop::current());  // shut_down runs on the main loop
  server_ = nullptr;
}

Status NbdExport::move_to(Loop& loop) {
  return backend_->root()->move_to_loop(loop, backend_.get());
}

// ---- Server.

Server::Server(Loop& loop, const ServerOptions& options) : loop_(loop), options_(options) {}

Server::~Server() {
  for (auto& listener : listeners_) {
    if (listener->fd >= 0) ::close(listener->fd);
  }
  if (!unix_path_.empty()) ::unlink(unix_path_.c_str());
}

std::unique_ptr<Server> Server::create_detached(Loop& loop, const ServerOptions& options) {
  return std::unique_ptr<Server>(new Server(loop, options));
}

Expected<std::unique_ptr<Server>> Server::start(Loop& loop, const ListenAddress& address,
                                                const ServerOptions& options) {
  std::unique_ptr<Server> server(new Server(loop, options));
  BLOCKD_RETURN_IF_ERROR(server->listen(address));
  for (auto& listener : server->listeners_) {
    listener->running = true;
    loop.spawn(server->accept_loop(*listener));
  }
  return server;
}

namespace {

constexpr int kBacklog = 128;

}  // namespace

Status Server::listen(const ListenAddress& address) {
  if (address.kind == ListenAddress::Kind::kUnix) {
    auto listening = listen_unix(address, kBacklog);
    if (!listening) return listening.status();
    const int fd = *listening;
    auto listener = std::make_unique<Listener>();
    listener->fd = fd;
    listeners_.push_back(std::move(listener));
    if (!address.abstract) unix_path_ = address.path;
    return Status::ok();
  }

  addrinfo hints{};
  hints.ai_flags = AI_PASSIVE | AI_ADDRCONFIG;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_family = AF_UNSPEC;
  if (address.ipv4.value_or(false) && !address.ipv6.value_or(false)) hints.ai_family = AF_INET;
  if (address.ipv6.value_or(false) && !address.ipv4.value_or(false)) hints.ai_family = AF_INET6;
  addrinfo* results = nullptr;
  const int rc = ::getaddrinfo(address.host.empty() ? nullptr : address.host.c_str(),
                               address.port.c_str(), &hints, &results);
  if (rc != 0) {
    return Status::generic("address resolution failed for " + address.host + ":" + address.port +
                           ": " + gai_strerror(rc));
  }
  int last_error = EADDRNOTAVAIL;
  for (addrinfo* ai = results; ai != nullptr; ai = ai->ai_next) {
    int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_error = errno;
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ai->ai_family == AF_INET6) ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || ::listen(fd, kBacklog) < 0) {
      last_error = errno;
      ::close(fd);
      continue;
    }
    auto listener = std::make_unique<Listener>();
    listener->fd = fd;
    listeners_.push_back(std::move(listener));
  }
  ::freeaddrinfo(results);
  if (listeners_.empty()) {
    return Status::generic("Failed to find an available port: " + errno_text(-last_error));
  }
  return Status::ok();
}

uint16_t Server::tcp_port() const noexcept {
  for (const auto& listener : listeners_) {
    sockaddr_storage storage{};
    socklen_t length = sizeof storage;
    if (::getsockname(listener->fd, reinterpret_cast<sockaddr*>(&storage), &length) < 0) continue;
    if (storage.ss_family == AF_INET) {
      return ntohs(reinterpret_cast<sockaddr_in*>(&storage)->sin_port);
    }
    if (storage.ss_family == AF_INET6) {
      return ntohs(reinterpret_cast<sockaddr_in6*>(&storage)->sin6_port);
    }
  }
  return 0;
}

Task<void> Server::accept_loop(Listener& listener) {
  while (!stopping_) {
    if (options_.max_connections != 0 && connections_.size() >= options_.max_connections) {
      // Further clients wait in the backlog until a connection ends.
      co_await changed_.wait();
      continue;
    }
    auto accept = loop_.accept(listener.fd);
    listener.pending_accept = &accept;
    const int fd = co_await accept;
    listener.pending_accept = nullptr;
    if (fd < 0) {
      if (stopping_) break;
      if (fd != -ECONNABORTED && fd != -EINTR && fd != -EAGAIN) {
        // Out of descriptors or memory: back off instead of spinning.
        (void)co_await loop_.sleep(std::chrono::milliseconds(100));
      }
      continue;
    }
    if (stopping_) {
      ::close(fd);
      break;
    }
    serve(fd);
  }
  listener.running = false;
  changed_.notify_all();
}

void Server::serve(int fd) {
  // The loop's socket operations wait in the kernel; the socket need not be non-blocking.
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0 && (flags & O_NONBLOCK)) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // fails harmlessly on unix
  auto connection = std::make_shared<Connection>(*this, fd);
  connections_.push_back(connection.get());
  if (stopping_) connection->disconnect();
  loop_.spawn(Connection::run(std::move(connection)));
}

void Server::connection_ended(Connection* connection) {
  connections_.erase(std::remove(connections_.begin(), connections_.end(), connection),
                     connections_.end());
  changed_.notify_all();
}

void Server::spawn_tunnel(std::unique_ptr<tls::Session> session, int fd, int plain_fd) {
  tunnel_fds_.push_back(fd);
  if (stopping_) ::shutdown(fd, SHUT_RDWR);
  loop_.spawn(run_tunnel(std::move(session), fd, plain_fd));
}

Task<void> Server::run_tunnel(std::unique_ptr<tls::Session> session, int fd, int plain_fd) {
  co_await tls::Session::relay(std::move(session), loop_, fd, plain_fd);
  // The relay closed `fd` just now, with nothing run on this loop in between: stop() cannot have
  // shut down a descriptor that was reused meanwhile.
  tunnel_fds_.erase(std::remove(tunnel_fds_.begin(), tunnel_fds_.end(), fd), tunnel_fds_.end());
  changed_.notify_all();
}

Task<void> Server::stop() {
  stopping_ = true;
  for (auto& listener : listeners_) {
    if (listener->pending_accept != nullptr) loop_.cancel(listener->pending_accept);
  }
  changed_.notify_all();  // accept loops waiting for a free connection slot
  for (Connection* connection : std::vector<Connection*>(connections_)) connection->disconnect();
  // A tunnel may be stuck sending to a client that stopped reading.
  for (int fd : tunnel_fds_) ::shutdown(fd, SHUT_RDWR);
  auto busy = [this] {
    if (!connections_.empty() || !tunnel_fds_.empty()) return true;
    return std::any_of(listeners_.begin(), listeners_.end(),
                       [](const auto& listener) { return listener->running; });
  };
  while (busy()) co_await changed_.wait();
  for (auto& listener : listeners_) {
    if (listener->fd >= 0) ::close(listener->fd);
    listener->fd = -1;
  }
  if (!unix_path_.empty()) {
    ::unlink(unix_path_.c_str());
    unix_path_.clear();
  }
}

Expected<std::shared_ptr<NbdExport>> Server::add_export(const NbdExportOptions& options,
                                                        std::shared_ptr<block::Node> node) {
  if (options.name.size() > kMaxStringLength) {
    return Status::generic("export name '" + options.name + "' too long");
  }
  if (options.description.size() > kMaxStringLength) {
    return Status::generic("description '" + options.description + "' too long");
  }
  if (find_export(options.name) != nullptr) {
    return Status::generic("NBD server already has export named '" + options.name + "'");
  }
  if (options.writable && node->read_only()) {
    return Status::generic("Cannot export read-only node as writable");
  }
  std::shared_ptr<NbdExport> created(new NbdExport(*this, options, node->node_name()));
  // As QEMU's NBD export: consistent reads (and writes when writable), sharing everything but
  // resize, since the size was announced to clients.
  const uint32_t permissions =
      block::kPermConsistentRead | (options.writable ? block::kPermWrite : 0u);
  BLOCKD_RETURN_IF_ERROR(created->backend_->attach(std::move(node), permissions,
                                                   block::kPermAll & ~block::kPermResize));
  created->backend_->set_writethrough(options.writethrough);
  exports_.push_back(created.get());
  return created;
}

NbdExport* Server::find_export(std::string_view name) const {
  for (NbdExport* candidate : exports_) {
    if (candidate->name() == name) return candidate;
  }
  return nullptr;
}

std::vector<NbdExport*> Server::exports() const { return exports_; }

}  // namespace blockd::exports::nbd
