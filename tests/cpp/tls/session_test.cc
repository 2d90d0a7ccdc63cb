// TLS credentials and sessions: loading tls-creds-x509 directories (and their errors), and a
// server and a client session talking over a socket pair on one loop, through their relays.
#include "tls/session.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "runtime/join.h"
#include "test_support.h"
#include "tls/credentials.h"
#include "tls/test_pki.h"

namespace blockd::tls {
namespace {

using blockd::testing::TempDir;
using blockd::testing::TestPki;

std::shared_ptr<Credentials> load(const std::string& dir, Endpoint endpoint, bool verify = true) {
  X509Options options;
  options.dir = dir;
  options.endpoint = endpoint;
  options.verify_peer = verify;
  auto loaded = Credentials::load_x509(options);
  EXPECT_TRUE(loaded) << loaded.status().message();
  return loaded ? std::move(loaded).value() : nullptr;
}

std::string load_error(const std::string& dir, Endpoint endpoint) {
  X509Options options;
  options.dir = dir;
  options.endpoint = endpoint;
  auto loaded = Credentials::load_x509(options);
  EXPECT_FALSE(loaded);
  return loaded ? "" : loaded.status().message();
}

class TlsTest : public ::testing::Test {
 protected:
  TempDir temp_;
  TestPki pki_{temp_.file("good"), "good CA"};
};

TEST_F(TlsTest, LoadsServerAndClientCredentials) {
  auto server = load(pki_.server_dir(), Endpoint::kServer);
  ASSERT_TRUE(server);
  EXPECT_EQ(server->endpoint(), Endpoint::kServer);
  // A client may go without a certificate of its own.
  std::filesystem::remove(pki_.client_dir() + "/client-cert.pem");
  std::filesystem::remove(pki_.client_dir() + "/client-key.pem");
  EXPECT_TRUE(load(pki_.client_dir(), Endpoint::kClient));
}

TEST_F(TlsTest, LoadErrorsNameTheFile) {
  EXPECT_EQ(load_error("", Endpoint::kServer), "Missing 'dir' property value");
  EXPECT_EQ(load_error(temp_.file("none"), Endpoint::kServer),
            "Unable to access credentials " + temp_.file("none") +
                "/ca-cert.pem: No such file or directory");
  EXPECT_EQ(load_error(pki_.client_dir(), Endpoint::kServer),
            "Unable to access credentials " + pki_.client_dir() +
                "/server-cert.pem: No such file or directory");
  std::ofstream(pki_.server_dir() + "/ca-cert.pem") << "not a certificate\n";
  EXPECT_EQ(load_error(pki_.server_dir(), Endpoint::kServer),
            "Unable to import CA certificate list " + pki_.server_dir() + "/ca-cert.pem");
  // A client certificate without its key.
  std::filesystem::remove(pki_.client_dir() + "/client-key.pem");
  EXPECT_EQ(load_error(pki_.client_dir(), Endpoint::kClient),
            "Unable to access credentials " + pki_.client_dir() +
                "/client-key.pem: No such file or directory");
}

// A connected server and client session pair on one loop.
struct Pair {
  std::unique_ptr<Session> server;
  std::unique_ptr<Session> client;
  int fds[2] = {-1, -1};
};

Pair make_pair(std::shared_ptr<Credentials> server, std::shared_ptr<Credentials> client,
               std::string_view hostname = "localhost") {
  Pair pair;
  auto s = Session::create(server);
  auto c = Session::create(client, hostname);
  EXPECT_TRUE(s && c);
  pair.server = std::move(s).value();
  pair.client = std::move(c).value();
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair.fds), 0);
  return pair;
}

// Runs both handshakes; returns {server status, client status}.
std::pair<Status, Status> handshake(Loop& loop, Pair& pair) {
  Status server_status, client_status;
  blockd::testing::run(loop, [](Loop& l, Pair& p, Status& ss, Status& cs) -> Task<void> {
    Join join;
    join.start(l, [](Loop& l2, Pair& p2, Status& out) -> Task<void> {
      out = co_await p2.server->handshake(l2, p2.fds[0]);
      // A failed side ends the socket so that the other side does not wait forever.
      if (!out.is_ok()) ::shutdown(p2.fds[0], SHUT_RDWR);
    }(l, p, ss));
    join.start(l, [](Loop& l2, Pair& p2, Status& out) -> Task<void> {
      out = co_await p2.client->handshake(l2, p2.fds[1]);
      if (!out.is_ok()) ::shutdown(p2.fds[1], SHUT_RDWR);
    }(l, p, cs));
    co_await join.wait();
  }(loop, pair, server_status, client_status));
  return {server_status, client_status};
}

TEST_F(TlsTest, HandshakeThenRelayCarriesBytesBothWays) {
  auto loop = blockd::testing::make_loop();
  Pair pair = make_pair(load(pki_.server_dir(), Endpoint::kServer),
                        load(pki_.client_dir(), Endpoint::kClient));
  auto [server_status, client_status] = handshake(*loop, pair);
  ASSERT_TRUE(server_status.is_ok()) << server_status.message();
  ASSERT_TRUE(client_status.is_ok()) << client_status.message();

  int server_plain[2], client_plain[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, server_plain), 0);
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, client_plain), 0);
  bool relays_done = false;
  loop->spawn([](Loop& l, Pair& p, int s, int c, bool& done) -> Task<void> {
    Join join;
    join.start(l, Session::relay(std::move(p.server), l, p.fds[0], s));
    join.start(l, Session::relay(std::move(p.client), l, p.fds[1], c));
    co_await join.wait();
    done = true;
  }(*loop, pair, server_plain[1], client_plain[1], relays_done));

  // 1 MiB each way, more than one TLS record and more than a socket buffer holds.
  std::vector<uint8_t> sent(1u << 20);
  for (size_t i = 0; i < sent.size(); ++i) sent[i] = static_cast<uint8_t>(i * 7 + (i >> 12));
  auto transfer = [&](int from, int to) {
    return [](Loop& l, int f, int t, std::vector<uint8_t>& data) -> Task<std::vector<uint8_t>> {
      Join join;
      join.start(l, [](Loop& l2, int f2, std::vector<uint8_t>& d) -> Task<void> {
        size_t done = 0;
        while (done < d.size()) {
          const int n = co_await l2.send(f2, d.data() + done, d.size() - done, MSG_NOSIGNAL);
          if (n <= 0) break;
          done += static_cast<size_t>(n);
        }
      }(l, f, data));
      std::vector<uint8_t> received(data.size());
      size_t got = 0;
      while (got < received.size()) {
        const int n = co_await l.recv(t, received.data() + got, received.size() - got, 0);
        if (n <= 0) break;
        got += static_cast<size_t>(n);
      }
      received.resize(got);
      co_await join.wait();
      co_return received;
    }(*loop, from, to, sent);
  };
  EXPECT_EQ(blockd::testing::run(*loop, transfer(client_plain[0], server_plain[0])), sent);
  EXPECT_EQ(blockd::testing::run(*loop, transfer(server_plain[0], client_plain[0])), sent);

  // The client side ends: the server's cleartext end sees the end too, and both relays finish.
  ::close(client_plain[0]);
  char byte;
  const int end = blockd::testing::run(*loop, [](Loop& l, int fd, char& b) -> Task<int> {
    co_return co_await l.recv(fd, &b, 1, 0);
  }(*loop, server_plain[0], byte));
  EXPECT_EQ(end, 0);
  ::close(server_plain[0]);
  loop->run_until([&] { return relays_done; });
}

TEST_F(TlsTest, UnknownCaIsRefused) {
  TestPki rogue(temp_.file("rogue"), "rogue CA");
  auto loop = blockd::testing::make_loop();
  Pair pair = make_pair(load(pki_.server_dir(), Endpoint::kServer),
                        load(rogue.client_dir(), Endpoint::kClient));
  auto [server_status, client_status] = handshake(*loop, pair);
  EXPECT_FALSE(server_status.is_ok() && client_status.is_ok());
  EXPECT_FALSE(client_status.is_ok());  // the client does not know the server's CA
  ::close(pair.fds[0]);
  ::close(pair.fds[1]);
}

TEST_F(TlsTest, ServerRequiresAClientCertificateUnlessVerifyPeerIsOff) {
  std::filesystem::remove(pki_.client_dir() + "/client-cert.pem");
  std::filesystem::remove(pki_.client_dir() + "/client-key.pem");
  auto loop = blockd::testing::make_loop();
  {
    Pair pair = make_pair(load(pki_.server_dir(), Endpoint::kServer),
                          load(pki_.client_dir(), Endpoint::kClient));
    auto [server_status, client_status] = handshake(*loop, pair);
    EXPECT_FALSE(server_status.is_ok());
    ::close(pair.fds[0]);
    ::close(pair.fds[1]);
  }
  Pair pair = make_pair(load(pki_.server_dir(), Endpoint::kServer, false),
                        load(pki_.client_dir(), Endpoint::kClient));
  auto [server_status, client_status] = handshake(*loop, pair);
  EXPECT_TRUE(server_status.is_ok()) << server_status.message();
  EXPECT_TRUE(client_status.is_ok()) << client_status.message();
  ::close(pair.fds[0]);
  ::close(pair.fds[1]);
}

TEST_F(TlsTest, ClientChecksTheServerName) {
  auto loop = blockd::testing::make_loop();
  Pair pair = make_pair(load(pki_.server_dir(), Endpoint::kServer),
                        load(pki_.client_dir(), Endpoint::kClient), "elsewhere.example");
  auto [server_status, client_status] = handshake(*loop, pair);
  EXPECT_FALSE(client_status.is_ok());
  ::close(pair.fds[0]);
  ::close(pair.fds[1]);
}

TEST_F(TlsTest, GarbageInsteadOfAHandshakeFails) {
  auto loop = blockd::testing::make_loop();
  auto server = Session::create(load(pki_.server_dir(), Endpoint::kServer));
  ASSERT_TRUE(server);
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  const char garbage[] = "GET / HTTP/1.0\r\n\r\n";
  ASSERT_EQ(::send(fds[1], garbage, sizeof garbage, 0), static_cast<ssize_t>(sizeof garbage));
  Status status = blockd::testing::run(*loop, (*server)->handshake(*loop, fds[0]));
  EXPECT_FALSE(status.is_ok());
  ::close(fds[0]);
  ::close(fds[1]);
}

// ---- Pre-shared keys.

std::shared_ptr<Credentials> load_psk(const std::string& dir, Endpoint endpoint,
                                      const std::string& username = "") {
  PskOptions options;
  options.dir = dir;
  options.endpoint = endpoint;
  options.username = username;
  auto loaded = Credentials::load_psk(options);
  EXPECT_TRUE(loaded) << loaded.status().message();
  return loaded ? std::move(loaded).value() : nullptr;
}

std::string load_psk_error(const PskOptions& options) {
  auto loaded = Credentials::load_psk(options);
  EXPECT_FALSE(loaded);
  return loaded ? "" : loaded.status().message();
}

TEST_F(TlsTest, PskLoadErrors) {
  PskOptions options;
  options.endpoint = Endpoint::kServer;
  EXPECT_EQ(load_psk_error(options), "Missing 'dir' property value");
  options.dir = temp_.path();
  options.username = "alice";
  EXPECT_EQ(load_psk_error(options), "username should not be set when endpoint=server");
  options.username.clear();
  EXPECT_EQ(load_psk_error(options), "Unable to access credentials " + temp_.path() +
                                         "/keys.psk: No such file or directory");
  std::ofstream(temp_.file("keys.psk")) << "alice:0123456789abcdef0123456789abcdef\n";
  options.endpoint = Endpoint::kClient;
  EXPECT_EQ(load_psk_error(options),
            "Username qemu not found in PSK file " + temp_.path() + "/keys.psk");
}

TEST_F(TlsTest, PskHandshakeNeedsTheSameKey) {
  const std::string server_dir = temp_.file("server"), client_dir = temp_.file("client");
  std::filesystem::create_directories(server_dir);
  std::filesystem::create_directories(client_dir);
  std::ofstream(server_dir + "/keys.psk") << "bob:00112233445566778899aabbccddeeff\n"
                                             "alice:0123456789abcdef0123456789abcdef\n";
  std::ofstream(client_dir + "/keys.psk") << "alice:0123456789abcdef0123456789abcdef\n"
                                             "mallory:0123456789abcdef0123456789abcdee\n";
  auto loop = blockd::testing::make_loop();
  auto server = load_psk(server_dir, Endpoint::kServer);
  {
    Pair pair = make_pair(server, load_psk(client_dir, Endpoint::kClient, "alice"));
    auto [server_status, client_status] = handshake(*loop, pair);
    EXPECT_TRUE(server_status.is_ok()) << server_status.message();
    EXPECT_TRUE(client_status.is_ok()) << client_status.message();
    ::close(pair.fds[0]);
    ::close(pair.fds[1]);
  }
  Pair pair = make_pair(server, load_psk(client_dir, Endpoint::kClient, "mallory"));
  auto [server_status, client_status] = handshake(*loop, pair);
  EXPECT_FALSE(server_status.is_ok());
  EXPECT_FALSE(client_status.is_ok());
  ::close(pair.fds[0]);
  ::close(pair.fds[1]);
}

}  // namespace
}  // namespace blockd::tls
