// The NBD server: listening sockets, named exports and client connections.
//
// Implements the server side of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md): the fixed
// newstyle handshake and the transmission phase; see connection.cc for the protocol details and
// protocol.h for the wire format. One Server exists per nbd-server-start; it owns its listening
// sockets and its connections, and looks exports up by name. Exports (NbdExport) are created by
// the server and shared with the export registry.
//
// Threads: a Server, its exports and its connections live on one loop (the main loop); every
// method must be called there.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "block/backend.h"
#include "block/node.h"
#include "exports/export.h"
#include "runtime/event.h"
#include "runtime/loop.h"
#include "runtime/status.h"
#include "runtime/stream_address.h"
#include "runtime/task.h"
#include "tls/credentials.h"
#include "tls/session.h"

namespace blockd::exports::nbd {

class Connection;
class Server;

// Where the server listens (QEMU's SocketAddress, inet and unix only).
using ListenAddress = StreamAddress;

struct ServerOptions {
  // 0: unlimited. When reached, further clients wait in the listen backlog.
  uint32_t max_connections = 0;
  // A client that has not finished the handshake after this long is dropped.
  std::chrono::nanoseconds handshake_timeout = std::chrono::seconds(10);
  // Per-connection bounds: the reader stops taking requests while this many are in flight or this
  // many payload bytes are buffered.
  uint32_t max_requests_in_flight = 64;
  uint64_t max_buffered_bytes = 128u << 20;
  // Server-endpoint credentials: when set, clients must upgrade with NBD_OPT_STARTTLS before
  // anything else (proto.md's FORCEDTLS mode).
  std::shared_ptr<const tls::Credentials> tls_credentials;
  // The id of the authorization object clients must satisfy (tls-authz). blockd has no such
  // objects, so a client that completes the TLS handshake is then dropped, as qemu-storage-daemon
  // does when the object is missing.
  std::string tls_authz;
};

struct NbdExportOptions {
  std::string id;
  std::string name;
  std::string description;
  bool writable = false;
  bool writethrough = false;
};

// One named export of the server. Created by Server::add_export; owned jointly by the export
// registry and the connections that use it.
class NbdExport final : public Export, public std::enable_shared_from_this<NbdExport> {
 public:
  ~NbdExport() override;
  std::string_view type_name() const noexcept override { return "nbd"; }
  const std::string& name() const noexcept { return name_; }
  const std::string& description() const noexcept { return description_; }
  bool writable() const noexcept { return writable_; }
  block::BlockBackend& backend() noexcept { return *backend_; }
  size_t client_count() const noexcept override { return clients_; }
  Task<void> shut_down() override;

  // Moves the exported node (with everything below it) to `loop`, an iothread's: clients that
  // connect from then on have their requests served there. Fails, moving nothing, when anything
  // but this export uses a node of that subtree. Main loop, before any client is attached.
  Status move_to(Loop& loop);

 private:
  friend class Server;
  friend class Connection;
  NbdExport(Server& server, const NbdExportOptions& options, std::string node_name);

  Server* server_;
  std::string name_;
  std::string description_;
  bool writable_;
  std::unique_ptr<block::BlockBackend> backend_;
  size_t clients_ = 0;
  Event clients_changed_;
};

class Server {
 public:
  // Creates the listening socket(s) for `address` and starts accepting on `loop`.
  // Errors (GenericError), as QEMU words them:
  //   "UNIX socket path '<path>' is too long"
  //   "Failed to bind socket to <path>: <strerror>"
  //   "address resolution failed for <host>:<port>: <gai_strerror>"
  //   "Failed to find an available port: <strerror>"
  static Expected<std::unique_ptr<Server>> start(Loop& loop, const ListenAddress& address,
                                                 const ServerOptions& options);
  // A server with no listening socket: clients are handed over with serve() (tests, fuzzing).
  static std::unique_ptr<Server> create_detached(Loop& loop, const ServerOptions& options);
  // The server must have been stopped (stop() completed) or never had a connection.
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Adds an export of `node`. Errors (GenericError), as QEMU:
  //   "export name '<name>' too long", "description '<description>' too long",
  //   "NBD server already has export named '<name>'", "Cannot export read-only node as writable",
  // and permission conflicts on the node.
  Expected<std::shared_ptr<NbdExport>> add_export(const NbdExportOptions& options,
                                                  std::shared_ptr<block::Node> node);
  // The live export named `name`, or null.
  NbdExport* find_export(std::string_view name) const;
  // Live exports in creation order.
  std::vector<NbdExport*> exports() const;

  // Serves a connected stream socket (the server takes ownership of `fd`).
  void serve(int fd);

  // Stops listening (removing a unix socket file), drops every client and waits until every
  // connection has ended. Exports are not removed (shut them down first).
  Task<void> stop();

  size_t connection_count() const noexcept { return connections_.size(); }
  // For tests: the local port of the first TCP listener (0 if none).
  uint16_t tcp_port() const noexcept;
  const ServerOptions& options() const noexcept { return options_; }
  Loop& loop() noexcept { return loop_; }

 private:
  friend class NbdExport;
  friend class Connection;
  struct Listener {
    int fd = -1;
    Completion* pending_accept = nullptr;
    bool running = false;
  };
  Server(Loop& loop, const ServerOptions& options);
  Status listen(const ListenAddress& address);
  Task<void> accept_loop(Listener& listener);
  void connection_ended(Connection* connection);
  // Runs the TLS tunnel of a connection on the server's loop (stop() waits for it too).
  void spawn_tunnel(std::unique_ptr<tls::Session> session, int fd, int plain_fd);
  Task<void> run_tunnel(std::unique_ptr<tls::Session> session, int fd, int plain_fd);

  Loop& loop_;
  ServerOptions options_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::string unix_path_;  // removed on stop
  bool stopping_ = false;
  std::vector<NbdExport*> exports_;  // creation order; not owning
  std::vector<Connection*> connections_;
  std::vector<int> tunnel_fds_;  // the client sockets of the TLS tunnels still relaying
  Event changed_;  // a connection ended or an accept loop finished
};

}  // namespace blockd::exports::nbd
