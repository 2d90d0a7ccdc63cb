// The NBD server over a socketpair: a raw client speaks the protocol byte by byte against a server
// running on its own loop thread with a null-co node, so the tests see exactly what goes on the
// wire (handshake replies, error values, disconnects).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/magic.h>
#include <sys/socket.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "drivers/file.h"
#include "drivers/null.h"
#include "drivers/quorum.h"
#include "drivers/thread_pool.h"
#include "exports/nbd/protocol.h"
#include "exports/nbd/server.h"
#include "test_support.h"
#include "tls/test_pki.h"

namespace blockd::exports::nbd {
namespace {

constexpr uint64_t kExportSize = 1u << 20;

class NbdServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto thread = LoopThread::start("nbd-test");
    ASSERT_TRUE(thread);
    thread_ = std::move(thread).value();
    open_node(0);
  }

  // (Re)opens the exported null-co node with a per-request latency.
  void open_node(int64_t latency_ns) {
    loop().call([&] {
      block::NodeOptions common;
      common.node_name = "null0";
      drivers::NullOptions null;
      null.size = kExportSize;
      null.read_zeroes = true;
      null.latency_ns = latency_ns;
      auto node = drivers::open_null_node(common, null, loop());
      ASSERT_TRUE(node);
      node_ = std::move(node).value();
    });
  }

  void TearDown() override {
    if (client_ >= 0) ::close(client_);
    loop().call([&] {
      if (server_) {
        run_blocking(server_->stop());
        for (auto& created : exports_) run_blocking(created->shut_down());
        exports_.clear();
        server_.reset();
      }
      node_.reset();
    });
    thread_.reset();
  }

  Loop& loop() { return thread_->loop(); }

  // Runs a task to completion on the loop thread (from the loop thread).
  void run_blocking(Task<void> task) {
    bool done = false;
    loop().spawn([](Task<void> inner, bool& flag) -> Task<void> {
      co_await std::move(inner);
      flag = true;
    }(std::move(task), done));
    loop().run_until([&] { return done; });
  }

  void start(ServerOptions options = {}, bool writable = true) {
    loop().call([&] {
      server_ = Server::create_detached(loop(), options);
      NbdExportOptions export_options;
      export_options.id = "exp";
      export_options.name = "exp";
      export_options.description = "a null export";
      export_options.writable = writable;
      auto created = server_->add_export(export_options, node_);
      ASSERT_TRUE(created) << created.status().message();
      exports_.push_back(std::move(created).value());
      int fds[2];
      ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
      client_ = fds[0];
      server_->serve(fds[1]);
    });
  }

  // ---- Raw client helpers (blocking, on the test thread).
  void send_bytes(const std::vector<uint8_t>& bytes) {
    ASSERT_EQ(::send(client_, bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
  }
  // Reads exactly `length` bytes; returns fewer only at end of stream.
  std::vector<uint8_t> recv_bytes(size_t length) {
    std::vector<uint8_t> bytes(length);
    size_t got = 0;
    while (got < length) {
      ssize_t n = ::recv(client_, bytes.data() + got, length - got, 0);
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    bytes.resize(got);
    return bytes;
  }
  bool at_eof() {
    uint8_t byte;
    return ::recv(client_, &byte, 1, 0) == 0;
  }

  void greet(uint32_t client_flags = kClientFlagFixedNewstyle | kClientFlagNoZeroes) {
    auto greeting = recv_bytes(18);
    ASSERT_EQ(greeting.size(), 18u);
    EXPECT_EQ(load64(greeting.data()), kNbdMagic);
    EXPECT_EQ(load64(greeting.data() + 8), kOptionMagic);
    EXPECT_EQ(load16(greeting.data() + 16), kFlagFixedNewstyle | kFlagNoZeroes);
    std::vector<uint8_t> flags(4);
    store32(flags.data(), client_flags);
    send_bytes(flags);
  }

  void send_option(uint32_t option, const std::vector<uint8_t>& data) {
    std::vector<uint8_t> bytes(16);
    store64(bytes.data(), kOptionMagic);
    store32(bytes.data() + 8, option);
    store32(bytes.data() + 12, static_cast<uint32_t>(data.size()));
    bytes.insert(bytes.end(), data.begin(), data.end());
    send_bytes(bytes);
  }

  struct OptionReply {
    uint32_t option = 0;
    uint32_t type = 0;
    std::vector<uint8_t> data;
  };
  OptionReply recv_option_reply() {
    OptionReply reply;
    auto header = recv_bytes(20);
    EXPECT_EQ(header.size(), 20u);
    if (header.size() != 20) return reply;
    EXPECT_EQ(load64(header.data()), kOptionReplyMagic);
    reply.option = load32(header.data() + 8);
    reply.type = load32(header.data() + 12);
    reply.data = recv_bytes(load32(header.data() + 16));
    return reply;
  }

  static std::vector<uint8_t> go_payload(const std::string& name,
                                         std::vector<uint16_t> types = {}) {
    std::vector<uint8_t> data;
    const uint32_t length = static_cast<uint32_t>(name.size());
    for (int shift = 24; shift >= 0; shift -= 8) data.push_back(uint8_t(length >> shift));
    for (char c : name) data.push_back(uint8_t(c));
    data.push_back(uint8_t(types.size() >> 8));
    data.push_back(uint8_t(types.size()));
    for (uint16_t type : types) {
      data.push_back(uint8_t(type >> 8));
      data.push_back(uint8_t(type));
    }
    return data;
  }

  // Completes GO for "exp"; returns the transmission flags.
  uint16_t go() {
    send_option(kOptGo, go_payload("exp"));
    uint16_t flags = 0;
    while (true) {
      OptionReply reply = recv_option_reply();
      EXPECT_EQ(reply.option, kOptGo);
      if (reply.type == kRepAck) break;
      EXPECT_EQ(reply.type, kRepInfo);
      if (reply.type != kRepInfo) return 0;
      if (load16(reply.data.data()) == kInfoExport) {
        EXPECT_EQ(load64(reply.data.data() + 2), kExportSize);
        flags = load16(reply.data.data() + 10);
      }
    }
    return flags;
  }

  void send_request(uint16_t type, uint64_t offset, uint32_t length, uint64_t cookie,
                    uint16_t flags = 0, const std::vector<uint8_t>& payload = {}) {
    std::vector<uint8_t> bytes(kRequestSize);
    store32(bytes.data(), kRequestMagic);
    store16(bytes.data() + 4, flags);
    store16(bytes.data() + 6, type);
    store64(bytes.data() + 8, cookie);
    store64(bytes.data() + 16, offset);
    store32(bytes.data() + 24, length);
    bytes.insert(bytes.end(), payload.begin(), payload.end());
    send_bytes(bytes);
  }

  // Reads a simple reply; returns its error and checks the cookie.
  uint32_t recv_simple_reply(uint64_t cookie) {
    auto reply = recv_bytes(kSimpleReplySize);
    EXPECT_EQ(reply.size(), kSimpleReplySize);
    if (reply.size() != kSimpleReplySize) return ~0u;
    EXPECT_EQ(load32(reply.data()), kSimpleReplyMagic);
    EXPECT_EQ(load64(reply.data() + 8), cookie);
    return load32(reply.data() + 4);
  }

  std::unique_ptr<LoopThread> thread_;
  std::shared_ptr<block::Node> node_;
  std::unique_ptr<Server> server_;
  std::vector<std::shared_ptr<NbdExport>> exports_;
  int client_ = -1;
};

TEST_F(NbdServerTest, ListsExportsAndAnswersInfo) {
  start();
  greet();
  send_option(kOptList, {});
  OptionReply server = recv_option_reply();
  ASSERT_EQ(server.type, kRepServer);
  ASSERT_GE(server.data.size(), 7u);
  EXPECT_EQ(load32(server.data.data()), 3u);
  EXPECT_EQ(std::string(server.data.begin() + 4, server.data.begin() + 7), "exp");
  EXPECT_EQ(std::string(server.data.begin() + 7, server.data.end()), "a null export");
  EXPECT_EQ(recv_option_reply().type, kRepAck);

  send_option(kOptInfo, go_payload("exp", {kInfoName, kInfoDescription, kInfoBlockSize}));
  std::vector<uint16_t> seen;
  while (true) {
    OptionReply reply = recv_option_reply();
    if (reply.type == kRepAck) break;
    ASSERT_EQ(reply.type, kRepInfo);
    const uint16_t info = load16(reply.data.data());
    seen.push_back(info);
    if (info == kInfoName) {
      EXPECT_EQ(std::string(reply.data.begin() + 2, reply.data.end()), "exp");
    }
    if (info == kInfoDescription) {
      EXPECT_EQ(std::string(reply.data.begin() + 2, reply.data.end()), "a null export");
    }
    if (info == kInfoBlockSize) {
      EXPECT_EQ(load32(reply.data.data() + 2), 1u);
      EXPECT_EQ(load32(reply.data.data() + 10), kMaxPayload);
    }
  }
  EXPECT_EQ(seen,
            (std::vector<uint16_t>{kInfoName, kInfoDescription, kInfoBlockSize, kInfoExport}));

  send_option(kOptInfo, go_payload("nope"));
  EXPECT_EQ(recv_option_reply().type, kRepErrUnknown);
  send_option(kOptStartTls, {});
  EXPECT_EQ(recv_option_reply().type, kRepErrPolicy);
  send_option(kOptList, {1, 2, 3});
  EXPECT_EQ(recv_option_reply().type, kRepErrInvalid);
  send_option(42, {9, 9});
  EXPECT_EQ(recv_option_reply().type, kRepErrUnsup);
  send_option(kOptExtendedHeaders, {1});  // must have no payload
  EXPECT_EQ(recv_option_reply().type, kRepErrInvalid);
  // Meta contexts need structured replies first.
  std::vector<uint8_t> meta(8, 0);
  send_option(kOptSetMetaContext, meta);
  EXPECT_EQ(recv_option_reply().type, kRepErrInvalid);
  send_option(kOptAbort, {});
  EXPECT_EQ(recv_option_reply().type, kRepAck);
  EXPECT_TRUE(at_eof());
}

TEST_F(NbdServerTest, SimpleRepliesAndErrorsKeepTheConnection) {
  start();
  greet();
  const uint16_t flags = go();
  EXPECT_EQ(flags, transmission_flags(true, false, true));

  std::vector<uint8_t> data(4096, 0xab);
  send_request(kCmdWrite, 0, 4096, 1, kCmdFlagFua, data);
  EXPECT_EQ(recv_simple_reply(1), 0u);
  send_request(kCmdRead, 512, 512, 2);
  EXPECT_EQ(recv_simple_reply(2), 0u);
  EXPECT_EQ(recv_bytes(512), std::vector<uint8_t>(512, 0));  // null-co reads zeroes
  send_request(kCmdRead, kExportSize, 1, 3);
  EXPECT_EQ(recv_simple_reply(3), kEinval);
  send_request(kCmdRead, 0, kMaxPayload + 1, 4);
  EXPECT_EQ(recv_simple_reply(4), kEinval);
  send_request(kCmdWrite, kExportSize - 1, 2, 5, 0, {1, 2});
  EXPECT_EQ(recv_simple_reply(5), kEinval);
  send_request(kCmdBlockStatus, 0, 512, 6);
  EXPECT_EQ(recv_simple_reply(6), kEinval);  // no meta context negotiated
  send_request(99, 0, 0, 7);
  EXPECT_EQ(recv_simple_reply(7), kEinval);
  send_request(kCmdWriteZeroes, 0, 8192, 8, kCmdFlagNoHole);
  EXPECT_EQ(recv_simple_reply(8), 0u);
  send_request(kCmdTrim, 0, 8192, 9);
  EXPECT_EQ(recv_simple_reply(9), 0u);
  send_request(kCmdFlush, 0, 0, 10);
  EXPECT_EQ(recv_simple_reply(10), 0u);
  send_request(kCmdCache, 0, 4096, 11);
  EXPECT_EQ(recv_simple_reply(11), 0u);
  send_request(kCmdDisc, 0, 0, 12);
  EXPECT_TRUE(at_eof());
}

TEST_F(NbdServerTest, ReadOnlyExportRefusesWrites) {
  start({}, /*writable=*/false);
  greet();
  const uint16_t flags = go();
  EXPECT_TRUE(flags & kFlagReadOnly);
  EXPECT_FALSE(flags & kFlagSendTrim);
  send_request(kCmdWrite, 0, 4, 1, 0, {1, 2, 3, 4});
  EXPECT_EQ(recv_simple_reply(1), kEperm);
  send_request(kCmdWriteZeroes, 0, 4096, 2);
  EXPECT_EQ(recv_simple_reply(2), kEperm);
  send_request(kCmdTrim, 0, 4096, 3);
  EXPECT_EQ(recv_simple_reply(3), kEperm);
  send_request(kCmdRead, 0, 4, 4);
  EXPECT_EQ(recv_simple_reply(4), 0u);
  EXPECT_EQ(recv_bytes(4).size(), 4u);
}

TEST_F(NbdServerTest, StructuredRepliesAndBlockStatus) {
  start();
  greet();
  send_option(kOptStructuredReply, {});
  EXPECT_EQ(recv_option_reply().type, kRepAck);
  std::vector<uint8_t> meta(8, 0);  // export name "" (unknown), no queries
  send_option(kOptListMetaContext, meta);
  EXPECT_EQ(recv_option_reply().type, kRepErrUnknown);
  // SET_META_CONTEXT "exp" with base:allocation and an unknown query.
  std::vector<uint8_t> set;
  auto put32 = [&set](uint32_t value) {
    for (int shift = 24; shift >= 0; shift -= 8) set.push_back(uint8_t(value >> shift));
  };
  auto put = [&set](const std::string& text) {
    for (char c : text) set.push_back(uint8_t(c));
  };
  put32(3);
  put("exp");
  put32(2);
  for (std::string query : {"base:allocation", "qemu:x"}) {
    put32(static_cast<uint32_t>(query.size()));
    put(query);
  }
  send_option(kOptSetMetaContext, set);
  OptionReply context = recv_option_reply();
  ASSERT_EQ(context.type, kRepMetaContext);
  EXPECT_EQ(load32(context.data.data()), kBaseAllocationId);
  EXPECT_EQ(std::string(context.data.begin() + 4, context.data.end()), "base:allocation");
  EXPECT_EQ(recv_option_reply().type, kRepAck);
  const uint16_t flags = go();
  EXPECT_TRUE(flags & kFlagSendDf);

  send_request(kCmdBlockStatus, 0, kExportSize, 1);
  auto header = recv_bytes(kChunkHeaderSize);
  ASSERT_EQ(header.size(), kChunkHeaderSize);
  EXPECT_EQ(load32(header.data()), kStructuredReplyMagic);
  EXPECT_EQ(load16(header.data() + 4), kReplyFlagDone);
  EXPECT_EQ(load16(header.data() + 6), kReplyTypeBlockStatus);
  EXPECT_EQ(load64(header.data() + 8), 1u);
  ASSERT_EQ(load32(header.data() + 16), 12u);
  auto payload = recv_bytes(12);
  EXPECT_EQ(load32(payload.data()), kBaseAllocationId);
  EXPECT_EQ(load32(payload.data() + 4), kExportSize);
  // read-zeroes=on: zeroes that are not data, as QEMU's null-co reports them.
  EXPECT_EQ(load32(payload.data() + 8), kStateHole | kStateZero);

  // A large read of zeroes comes back as one hole chunk.
  send_request(kCmdRead, 0, 128 << 10, 2);
  header = recv_bytes(kChunkHeaderSize);
  EXPECT_EQ(load16(header.data() + 6), kReplyTypeOffsetHole);
  EXPECT_EQ(load16(header.data() + 4), kReplyFlagDone);
  payload = recv_bytes(12);
  EXPECT_EQ(load64(payload.data()), 0u);
  EXPECT_EQ(load32(payload.data() + 8), 128u << 10);

  // With DF the data comes in one data chunk.
  send_request(kCmdRead, 0, 128 << 10, 3, kCmdFlagDf);
  header = recv_bytes(kChunkHeaderSize);
  EXPECT_EQ(load16(header.data() + 6), kReplyTypeOffsetData);
  EXPECT_EQ(load32(header.data() + 16), 8u + (128u << 10));
  EXPECT_EQ(recv_bytes(8 + (128 << 10)).size(), 8u + (128u << 10));

  // An error on a read is a structured error chunk.
  send_request(kCmdRead, kExportSize, 512, 4);
  header = recv_bytes(kChunkHeaderSize);
  EXPECT_EQ(load16(header.data() + 6), kReplyTypeError);
  payload = recv_bytes(load32(header.data() + 16));
  EXPECT_EQ(load32(payload.data()), kEinval);
}

TEST_F(NbdServerTest, UnknownClientFlagsDropTheClient) {
  start();
  greet(kClientFlagFixedNewstyle | (1u << 5));
  EXPECT_TRUE(at_eof());
}

TEST_F(NbdServerTest, WrongRequestMagicDropsTheClient) {
  start();
  greet();
  go();
  std::vector<uint8_t> garbage(kRequestSize, 0x55);
  send_bytes(garbage);
  EXPECT_TRUE(at_eof());
}

TEST_F(NbdServerTest, StalledHandshakeIsDropped) {
  ServerOptions options;
  options.handshake_timeout = std::chrono::milliseconds(50);
  start(options);
  auto greeting = recv_bytes(18);
  EXPECT_EQ(greeting.size(), 18u);
  EXPECT_TRUE(at_eof());  // the server gives up on us
}

// ---- TLS (FORCEDTLS mode).

ServerOptions tls_options(const blockd::testing::TestPki& pki) {
  tls::X509Options x509;
  x509.dir = pki.server_dir();
  x509.endpoint = tls::Endpoint::kServer;
  auto credentials = tls::Credentials::load_x509(x509);
  EXPECT_TRUE(credentials) << credentials.status().message();
  ServerOptions options;
  if (credentials) options.tls_credentials = std::move(credentials).value();
  return options;
}

TEST_F(NbdServerTest, TlsServerRefusesOptionsBeforeStartTls) {
  blockd::testing::TempDir temp;
  blockd::testing::TestPki pki(temp.file("pki"), "test CA");
  start(tls_options(pki));
  greet();
  send_option(kOptList, {});
  EXPECT_EQ(recv_option_reply().type, kRepErrTlsReqd);
  send_option(kOptGo, go_payload("exp"));
  EXPECT_EQ(recv_option_reply().type, kRepErrTlsReqd);
  send_option(42, {9, 9});
  EXPECT_EQ(recv_option_reply().type, kRepErrTlsReqd);
  send_option(kOptStartTls, {1});
  EXPECT_EQ(recv_option_reply().type, kRepErrInvalid);
  // EXPORT_NAME has no error reply: the client is dropped.
  send_option(kOptExportName, {'e', 'x', 'p'});
  EXPECT_TRUE(at_eof());
}

TEST_F(NbdServerTest, TlsHandshakeIsCoveredByTheHandshakeTimeout) {
  blockd::testing::TempDir temp;
  blockd::testing::TestPki pki(temp.file("pki"), "test CA");
  ServerOptions options = tls_options(pki);
  options.handshake_timeout = std::chrono::milliseconds(100);
  start(options);
  greet();
  send_option(kOptStartTls, {});
  EXPECT_EQ(recv_option_reply().type, kRepAck);
  EXPECT_TRUE(at_eof());  // no ClientHello came: the server gives up
}

TEST_F(NbdServerTest, GarbageAfterStartTlsDropsTheClient) {
  blockd::testing::TempDir temp;
  blockd::testing::TestPki pki(temp.file("pki"), "test CA");
  start(tls_options(pki));
  greet();
  send_option(kOptStartTls, {});
  EXPECT_EQ(recv_option_reply().type, kRepAck);
  send_bytes(std::vector<uint8_t>(300, 'x'));
  EXPECT_TRUE(at_eof());
}

TEST_F(NbdServerTest, ExportNameEntersTransmission) {
  start();
  greet(kClientFlagFixedNewstyle);  // without NO_ZEROES: 124 zero bytes follow
  send_option(kOptExportName, {'e', 'x', 'p'});
  auto reply = recv_bytes(10 + 124);
  ASSERT_EQ(reply.size(), 134u);
  EXPECT_EQ(load64(reply.data()), kExportSize);
  send_request(kCmdFlush, 0, 0, 77);
  EXPECT_EQ(recv_simple_reply(77), 0u);
}

TEST_F(NbdServerTest, ShutDownDropsClientsAfterTheirRequests) {
  open_node(50'000'000);  // every request takes 50 ms
  start();
  greet();
  go();
  send_request(kCmdWrite, 0, 4, 1, 0, {1, 2, 3, 4});
  bool removed = false;
  loop().call([&] {
    EXPECT_EQ(exports_[0]->client_count(), 1u);
    // Removal waits for the write in flight, then the client is gone and the node released.
    run_blocking(exports_[0]->shut_down());
    removed = true;
    EXPECT_EQ(exports_[0]->client_count(), 0u);
    EXPECT_TRUE(exports_[0]->shutting_down());
    EXPECT_EQ(server_->find_export("exp"), nullptr);
    EXPECT_EQ(node_->users().size(), 0u);
  });
  EXPECT_TRUE(removed);
  // The write was answered before the connection went away, or the client saw the end.
  auto reply = recv_bytes(kSimpleReplySize);
  if (reply.size() == kSimpleReplySize) {
    EXPECT_EQ(load64(reply.data() + 8), 1u);
  }
  EXPECT_TRUE(at_eof());
  exports_.clear();
}

TEST_F(NbdServerTest, ManyRequestsInFlight) {
  start();
  greet();
  go();
  // Pipeline many requests without reading; every reply arrives, each with its cookie.
  constexpr int kCount = 500;
  for (int i = 0; i < kCount; ++i) send_request(kCmdRead, 0, 512, 1000 + i);
  std::vector<bool> seen(kCount, false);
  for (int i = 0; i < kCount; ++i) {
    auto reply = recv_bytes(kSimpleReplySize);
    ASSERT_EQ(reply.size(), kSimpleReplySize);
    const uint64_t cookie = load64(reply.data() + 8);
    ASSERT_GE(cookie, 1000u);
    ASSERT_LT(cookie, 1000u + kCount);
    EXPECT_FALSE(seen[cookie - 1000]);
    seen[cookie - 1000] = true;
    EXPECT_EQ(recv_bytes(512).size(), 512u);
  }
}

// A quorum of three children in files in memory (/dev/shm) behind the export. Reads from 256 KiB
// on are mapped with map_read_async, whose comparison of the children runs on a pool worker, and
// writes from 256 KiB on go into the children's files from a worker, while the loop thread
// receives and answers the other requests. Under ThreadSanitizer (./dev tsan) this is where races
// between the export's loop and the workers show.
class NbdQuorumTest : public NbdServerTest {
 protected:
  static constexpr uint32_t kRange = 256 << 10;
  static constexpr int kRanges = static_cast<int>(kExportSize / kRange);

  void SetUp() override {
    NbdServerTest::SetUp();
    struct statfs fs {};
    if (statfs("/dev/shm", &fs) != 0 || fs.f_type != TMPFS_MAGIC) {
      GTEST_SKIP() << "/dev/shm is not a tmpfs here";
    }
    dir_.emplace("/dev/shm");
    for (int child = 0; child < 3; ++child) {
      const int fd = ::open(path(child).c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644);
      ASSERT_GE(fd, 0);
      for (int range = 0; range < kRanges; ++range) {
        const std::vector<uint8_t> bytes(kRange, fill(0, range));
        ASSERT_EQ(::pwrite(fd, bytes.data(), kRange, off_t{range} * kRange), ssize_t{kRange});
      }
      ::close(fd);
    }
    loop().call([&] {
      std::vector<std::shared_ptr<block::Node>> children;
      for (int child = 0; child < 3; ++child) {
        drivers::FileOptions file;
        file.filename = path(child);
        file.locking = drivers::FileOptions::Locking::kOff;
        auto opened = drivers::open_file_node(
            block::NodeOptions{.node_name = "c" + std::to_string(child)}, file, loop());
        ASSERT_TRUE(opened) << opened.status().message();
        children.push_back(std::move(opened).value());
      }
      drivers::QuorumOptions options;
      options.vote_threshold = 2;
      auto quorum = drivers::open_quorum_node(block::NodeOptions{.node_name = "q"}, options,
                                              std::move(children), loop());
      ASSERT_TRUE(quorum) << quorum.status().message();
      node_ = std::move(quorum).value();
    });
  }

  std::string path(int child) const { return dir_->file("c" + std::to_string(child)); }
  // The byte that range `range` holds after round `round` (0: as created).
  static uint8_t fill(int round, int range) {
    return static_cast<uint8_t>(1 + round * kRanges + range);
  }

  std::optional<blockd::testing::TempDir> dir_;
};

TEST_F(NbdQuorumTest, LargeReadsAndWritesOnWorkersKeepTheData) {
  start();
  greet();
  go();
  constexpr int kRounds = 6;
  std::vector<uint8_t> current(kRanges);
  for (int range = 0; range < kRanges; ++range) current[range] = fill(0, range);
  uint64_t cookie = 0;
  for (int round = 1; round <= kRounds; ++round) {
    for (int half = 0; half < 2; ++half) {
      // This half's ranges are written while the other half's are read twice, all at once.
      struct Expected {
        bool read;
        int range;
        uint8_t byte;  // what the read returns, or what the write writes
      };
      std::map<uint64_t, Expected> requests;
      for (int range = 0; range < kRanges; ++range) {
        if (range % 2 == half) {
          requests[++cookie] = {false, range, fill(round, range)};
        } else {
          requests[++cookie] = {true, range, current[range]};
          requests[++cookie] = {true, range, current[range]};
        }
      }
      // A sender of its own: the client must keep reading replies while it sends the writes.
      std::thread sender([&] {
        for (const auto& [id, request] : requests) {
          const uint64_t offset = uint64_t{kRange} * static_cast<uint64_t>(request.range);
          if (request.read) {
            send_request(kCmdRead, offset, kRange, id);
          } else {
            send_request(kCmdWrite, offset, kRange, id, 0,
                         std::vector<uint8_t>(kRange, request.byte));
          }
        }
      });
      std::string failure;
      for (size_t i = 0; i < requests.size() && failure.empty(); ++i) {
        const auto header = recv_bytes(kSimpleReplySize);
        if (header.size() != kSimpleReplySize || load32(header.data()) != kSimpleReplyMagic) {
          failure = "no reply";
          break;
        }
        const auto found = requests.find(load64(header.data() + 8));
        if (found == requests.end() || load32(header.data() + 4) != 0) {
          failure = "unknown cookie or error " + std::to_string(load32(header.data() + 4));
          break;
        }
        const Expected& request = found->second;
        if (!request.read) continue;
        const auto data = recv_bytes(kRange);
        size_t wrong = data.size() == kRange ? 0 : kRange;
        for (uint8_t byte : data) wrong += byte != request.byte;
        if (wrong != 0) {
          failure = "range " + std::to_string(request.range) + " read " + std::to_string(wrong) +
                    " bytes other than " + std::to_string(request.byte);
        }
      }
      // On a failure the stream is out of step: end it, so that the sender cannot block.
      if (!failure.empty()) ::shutdown(client_, SHUT_RDWR);
      sender.join();
      ASSERT_EQ(failure, "") << "round " << round << ", half " << half;
      for (int range = half; range < kRanges; range += 2) current[range] = fill(round, range);
    }
  }
  // The workers did the work (this test runs in a process of its own under ctest; nothing else
  // here uses the pool).
  EXPECT_GT(drivers::ThreadPool::shared().TEST_worker_count(), 0u);
  // Every child holds the last writes.
  for (int child = 0; child < 3; ++child) {
    const int fd = ::open(path(child).c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    std::vector<uint8_t> bytes(kExportSize);
    EXPECT_EQ(::pread(fd, bytes.data(), bytes.size(), 0), static_cast<ssize_t>(kExportSize));
    ::close(fd);
    for (int range = 0; range < kRanges; ++range) {
      const auto begin = bytes.begin() + static_cast<ptrdiff_t>(range) * kRange;
      EXPECT_EQ(std::count(begin, begin + kRange, current[range]), kRange)
          << "child " << child << ", range " << range;
    }
  }
}

}  // namespace
}  // namespace blockd::exports::nbd
