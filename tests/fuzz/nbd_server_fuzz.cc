// libFuzzer target: arbitrary bytes from an NBD client into the whole NBD server (handshake,
// option parsing, request decoding and validation, every command) over a socketpair, on a writable
// null-co export. The server must answer or drop each input, never crash, and end the connection
// once the client has nothing more to say.
//
// The loop runs on the fuzzing thread: between loop iterations the client side sends what the
// socket accepts and discards whatever the server answered.
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "drivers/null.h"
#include "exports/nbd/server.h"

namespace {

using blockd::Loop;
using blockd::exports::nbd::Server;

struct Harness {
  std::unique_ptr<Loop> loop;
  std::shared_ptr<blockd::block::Node> node;
  std::unique_ptr<Server> server;
  std::shared_ptr<blockd::exports::nbd::NbdExport> nbd_export;
};

Harness& harness() {
  static Harness* instance = [] {
    auto* h = new Harness();
    auto loop = Loop::create();
    if (!loop) __builtin_trap();
    h->loop = std::move(loop).value();
    blockd::block::NodeOptions common;
    common.node_name = "null0";
    blockd::drivers::NullOptions null;
    null.size = 1 << 20;
    null.read_zeroes = true;
    auto node = blockd::drivers::open_null_node(common, null, *h->loop);
    if (!node) __builtin_trap();
    h->node = std::move(node).value();
    blockd::exports::nbd::ServerOptions options;
    options.handshake_timeout = std::chrono::seconds(5);
    h->server = Server::create_detached(*h->loop, options);
    blockd::exports::nbd::NbdExportOptions export_options;
    export_options.id = "fuzz";
    export_options.name = "";  // the default export: short inputs reach the transmission phase
    export_options.description = "fuzz export";
    export_options.writable = true;
    auto created = h->server->add_export(export_options, h->node);
    if (!created) __builtin_trap();
    h->nbd_export = std::move(created).value();
    return h;
  }();
  return *instance;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Harness& h = harness();
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0) return 0;
  const int client = fds[0];
  ::fcntl(client, F_SETFL, ::fcntl(client, F_GETFL) | O_NONBLOCK);
  h.server->serve(fds[1]);
  size_t sent = 0;
  bool write_closed = false;
  uint8_t sink[65536];
  h.loop->run_until([&] {
    while (sent < size) {
      const ssize_t n = ::send(client, data + sent, size - sent, MSG_NOSIGNAL);
      if (n <= 0) break;
      sent += static_cast<size_t>(n);
    }
    if (sent == size && !write_closed) {
      ::shutdown(client, SHUT_WR);
      write_closed = true;
    }
    while (::recv(client, sink, sizeof sink, 0) > 0) {
    }
    // Done once the connection has ended and every operation it left in the ring (its cancelled
    // handshake timer) has completed, so that nothing it owned is still alive.
    return h.server->connection_count() == 0 && h.loop->in_flight() == 0;
  });
  ::close(client);
  return 0;
}
