// The vhost-user-blk export end to end: a front-end written here (a thread speaking the protocol
// over the export's unix socket, guest memory in a memfd) sets up a ring, submits requests,
// waits for the call eventfd, and checks the data through the image file. Also: malformed
// messages drop the front-end and the next one is served; a malformed chain stops its queue.
#include "exports/vhost_user/vhost_user_blk_export.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

#include "drivers/file.h"
#include "test_support.h"

namespace blockd::exports::vhost_user {
namespace {

constexpr uint64_t kImageSize = 1 << 20;
constexpr uint64_t kMemory = 1 << 20;
constexpr uint64_t kUserBase = 0x7f0000000000;
constexpr uint32_t kRing = 16;
constexpr uint64_t kDescriptors = 0x0;
constexpr uint64_t kAvailable = 0x1000;
constexpr uint64_t kUsed = 0x2000;
constexpr uint64_t kData = 0x10000;

// The front-end: blocking I/O on its own thread.
class Frontend {
 public:
  explicit Frontend(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::snprintf(address.sun_path, sizeof address.sun_path, "%s", path.c_str());
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0;
  }
  ~Frontend() { ::close(fd_); }
  bool connected() const { return connected_; }

  bool send(Request request, const std::vector<uint8_t>& payload, int fd = -1,
            uint32_t flags = kVersion) {
    std::vector<uint8_t> bytes(kHeaderSize + payload.size());
    store_header(bytes.data(),
                 Header{static_cast<uint32_t>(request), flags, static_cast<uint32_t>(payload.size())});
    std::copy(payload.begin(), payload.end(), bytes.begin() + kHeaderSize);
    iovec vector{bytes.data(), bytes.size()};
    msghdr message{};
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    if (fd >= 0) {
      message.msg_control = control;
      message.msg_controllen = sizeof control;
      cmsghdr* header = CMSG_FIRSTHDR(&message);
      header->cmsg_level = SOL_SOCKET;
      header->cmsg_type = SCM_RIGHTS;
      header->cmsg_len = CMSG_LEN(sizeof(int));
      std::memcpy(CMSG_DATA(header), &fd, sizeof fd);
    }
    return ::sendmsg(fd_, &message, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size());
  }
  // The reply's payload; empty when the connection closed.
  std::vector<uint8_t> receive(Request expected) {
    uint8_t header[kHeaderSize];
    if (!read_all(header, kHeaderSize)) return {};
    EXPECT_EQ(load32(header), static_cast<uint32_t>(expected));
    EXPECT_EQ(load32(header + 4), kVersion | kFlagReply);
    std::vector<uint8_t> payload(load32(header + 8));
    if (!read_all(payload.data(), payload.size())) return {};
    return payload;
  }
  uint64_t get_u64(Request request) {
    EXPECT_TRUE(send(request, {}));
    auto payload = receive(request);
    return payload.size() == 8 ? load64(payload.data()) : ~uint64_t{0};
  }
  // True when the back-end has closed the connection.
  bool closed() {
    uint8_t byte;
    pollfd p{fd_, POLLIN, 0};
    return ::poll(&p, 1, 5000) == 1 && ::recv(fd_, &byte, 1, 0) == 0;
  }

 private:
  bool read_all(uint8_t* out, size_t length) {
    size_t got = 0;
    while (got < length) {
      const ssize_t n = ::recv(fd_, out + got, length - got, 0);
      if (n <= 0) return false;
      got += static_cast<size_t>(n);
    }
    return true;
  }
  int fd_ = -1;
  bool connected_ = false;
};

std::vector<uint8_t> u64(uint64_t value) {
  std::vector<uint8_t> bytes(8);
  store64(bytes.data(), value);
  return bytes;
}
std::vector<uint8_t> state(uint32_t index, uint32_t value) {
  std::vector<uint8_t> bytes(8);
  store32(bytes.data(), index);
  store32(bytes.data() + 4, value);
  return bytes;
}

class VhostUserBlkExportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    image_ = dir_.file("disk.img");
    const int fd = ::open(image_.c_str(), O_RDWR | O_CREAT, 0600);
    ASSERT_EQ(::ftruncate(fd, kImageSize), 0);
    ::close(fd);
    drivers::FileOptions file;
    file.filename = image_;
    auto node = drivers::open_file_node(block::NodeOptions{.node_name = "f0"}, file, *loop_);
    ASSERT_TRUE(node.has_value());
    VhostUserBlkExportOptions options;
    options.id = "vhost0";
    options.address.path = dir_.file("vhost.sock");
    options.writable = true;
    auto created = VhostUserBlkExport::create(*loop_, options, *node);
    ASSERT_TRUE(created.has_value()) << created.status().message();
    export_ = *created;
    socket_ = options.address.path;

    memfd_ = ::memfd_create("guest", MFD_CLOEXEC);
    ASSERT_EQ(::ftruncate(memfd_, kMemory), 0);
    guest_ = static_cast<uint8_t*>(
        ::mmap(nullptr, kMemory, PROT_READ | PROT_WRITE, MAP_SHARED, memfd_, 0));
    kick_ = ::eventfd(0, EFD_CLOEXEC);
    call_ = ::eventfd(0, EFD_CLOEXEC);
  }
  void TearDown() override {
    if (!export_->shutting_down()) shut_down();
    ::munmap(guest_, kMemory);
    ::close(memfd_);
    ::close(kick_);
    ::close(call_);
  }

  void shut_down() {
    bool done = false;
    loop_->spawn([](std::shared_ptr<VhostUserBlkExport> doomed, bool& finished) -> Task<void> {
      co_await doomed->shut_down();
      finished = true;
    }(export_, done));
    loop_->run_until([&] { return done; });
  }

  // Runs `frontend` on a thread while the loop serves the export.
  template <typename F>
  void with_frontend(F frontend) {
    std::atomic<bool> done{false};
    std::thread thread([&] {
      frontend();
      done = true;
      loop_->post([] {});
    });
    loop_->run_until([&] { return done.load(); });
    thread.join();
  }

  // The messages QEMU sends to start queue 0, with guest memory at guest address 0.
  void start_queue(Frontend& front) {
    EXPECT_NE(front.get_u64(Request::kGetFeatures) & kFeatureProtocolFeatures, 0u);
    const uint64_t protocol = front.get_u64(Request::kGetProtocolFeatures);
    EXPECT_EQ(protocol & (kProtocolReplyAck | kProtocolConfig | kProtocolMq),
              kProtocolReplyAck | kProtocolConfig | kProtocolMq);
    ASSERT_TRUE(front.send(Request::kSetProtocolFeatures, u64(kProtocolReplyAck | kProtocolConfig)));
    EXPECT_EQ(front.get_u64(Request::kGetQueueNum), 1u);
    ASSERT_TRUE(front.send(Request::kSetOwner, {}));
    ASSERT_TRUE(front.send(Request::kSetFeatures, u64(kFeatureVersion1 | kFeatureIndirectDesc)));
    std::vector<uint8_t> table(8 + 32);
    store32(table.data(), 1);
    store64(table.data() + 8, 0);
    store64(table.data() + 16, kMemory);
    store64(table.data() + 24, kUserBase);
    store64(table.data() + 32, 0);
    ASSERT_TRUE(front.send(Request::kSetMemTable, table, memfd_, kVersion | kFlagNeedReply));
    EXPECT_EQ(front.receive(Request::kSetMemTable), u64(0));
    ASSERT_TRUE(front.send(Request::kSetVringNum, state(0, kRing)));
    ASSERT_TRUE(front.send(Request::kSetVringBase, state(0, 0)));
    std::vector<uint8_t> address(40);
    store64(address.data() + 8, kUserBase + kDescriptors);
    store64(address.data() + 16, kUserBase + kUsed);
    store64(address.data() + 24, kUserBase + kAvailable);
    ASSERT_TRUE(front.send(Request::kSetVringAddr, address));
    ASSERT_TRUE(front.send(Request::kSetVringCall, u64(0), call_));
    ASSERT_TRUE(front.send(Request::kSetVringKick, u64(0), kick_));
    ASSERT_TRUE(front.send(Request::kSetVringEnable, state(0, 1), -1, kVersion | kFlagNeedReply));
    EXPECT_EQ(front.receive(Request::kSetVringEnable), u64(0));
  }

  void describe(uint16_t index, uint64_t address, uint32_t length, uint16_t flags, uint16_t next) {
    uint8_t* p = guest_ + kDescriptors + 16 * index;
    store64(p, address);
    store32(p + 8, length);
    store16(p + 12, flags);
    store16(p + 14, next);
  }
  // Offers a request at descriptors first..first+2 (header, data, status) and kicks.
  void submit(uint16_t first, uint32_t type, uint64_t sector, uint64_t data, uint32_t length) {
    uint8_t* header = guest_ + kData + 0x100 * first;
    store32(header, type);
    store64(header + 8, sector);
    describe(first, kData + 0x100 * first, 16, kDescNext, first + 1);
    describe(first + 1, data, length, kDescNext | (type == 0 ? kDescWrite : 0), first + 2);
    describe(first + 2, kData + 0x100 * first + 0x80, 1, kDescWrite, 0);
    const uint16_t slot = load16(guest_ + kAvailable + 2);
    store16(guest_ + kAvailable + 4 + 2 * (slot % kRing), first);
    __atomic_store_n(reinterpret_cast<uint16_t*>(guest_ + kAvailable + 2),
                     static_cast<uint16_t>(slot + 1), __ATOMIC_RELEASE);
    ASSERT_EQ(::eventfd_write(kick_, 1), 0);
  }
  uint8_t status_of(uint16_t first) { return guest_[kData + 0x100 * first + 0x80]; }
  // Waits for the call eventfd until the used index reaches `count`.
  void wait_used(uint16_t count) {
    while (__atomic_load_n(reinterpret_cast<uint16_t*>(guest_ + kUsed + 2), __ATOMIC_ACQUIRE) !=
           count) {
      pollfd p{call_, POLLIN, 0};
      ASSERT_EQ(::poll(&p, 1, 10000), 1) << "no interrupt";
      eventfd_t value;
      ::eventfd_read(call_, &value);
    }
  }

  std::unique_ptr<Loop> loop_ = blockd::testing::make_loop();
  blockd::testing::TempDir dir_{"/dev/shm"};
  std::string image_;
  std::string socket_;
  std::shared_ptr<VhostUserBlkExport> export_;
  int memfd_ = -1;
  uint8_t* guest_ = nullptr;
  int kick_ = -1;
  int call_ = -1;
};

TEST_F(VhostUserBlkExportTest, AFrontendWritesAndReadsThroughTheRing) {
  with_frontend([&] {
    Frontend front(socket_);
    ASSERT_TRUE(front.connected());
    start_queue(front);
    std::vector<uint8_t> config_request(12 + 60);
    store32(config_request.data() + 4, 60);
    ASSERT_TRUE(front.send(Request::kGetConfig, config_request));
    const auto config = front.receive(Request::kGetConfig);
    ASSERT_EQ(config.size(), 72u);
    EXPECT_EQ(load64(config.data() + 12), kImageSize / 512);

    for (int i = 0; i < 4096; ++i) guest_[0x40000 + i] = static_cast<uint8_t>(i * 7);
    submit(0, 1, 16, 0x40000, 4096);  // OUT
    wait_used(1);
    EXPECT_EQ(status_of(0), 0);
    submit(3, 0, 16, 0x50000, 4096);  // IN
    wait_used(2);
    EXPECT_EQ(status_of(3), 0);
    EXPECT_EQ(std::memcmp(guest_ + 0x40000, guest_ + 0x50000, 4096), 0);
    EXPECT_EQ(load32(guest_ + kUsed + 4 + 8 + 4), 4097u);  // the IN's used length

    // GET_VRING_BASE stops the queue and reports where it stopped.
    ASSERT_TRUE(front.send(Request::kGetVringBase, state(0, 0)));
    EXPECT_EQ(front.receive(Request::kGetVringBase), state(0, 2));
  });
  int fd = ::open(image_.c_str(), O_RDONLY);
  std::vector<uint8_t> bytes(4096);
  ASSERT_EQ(::pread(fd, bytes.data(), 4096, 16 * 512), 4096);
  ::close(fd);
  EXPECT_EQ(std::memcmp(bytes.data(), guest_ + 0x40000, 4096), 0);
}

TEST_F(VhostUserBlkExportTest, AMalformedChainStopsItsQueueOnly) {
  with_frontend([&] {
    Frontend front(socket_);
    start_queue(front);
    describe(0, kData, 16, kDescNext, 1);
    describe(1, kData, 16, kDescNext, 0);  // a loop
    store16(guest_ + kAvailable + 4, 0);
    store16(guest_ + kAvailable + 2, 1);
    ASSERT_EQ(::eventfd_write(kick_, 1), 0);
    // The kick and the messages below reach the export on different descriptors: wait until it
    // has taken the kick (it walks the ring at once, on the same thread that later answers
    // GET_VRING_BASE), or a loaded machine may let the messages overtake it.
    pollfd kicked{.fd = kick_, .events = POLLIN, .revents = 0};
    for (int waited = 0; ::poll(&kicked, 1, 0) == 1 && waited < 5000; ++waited) ::usleep(1000);
    ASSERT_EQ(::poll(&kicked, 1, 0), 0) << "the export never read its kick";
    // The connection still answers; the ring stopped after the bad entry.
    EXPECT_EQ(front.get_u64(Request::kGetQueueNum), 1u);
    ASSERT_TRUE(front.send(Request::kGetVringBase, state(0, 0)));
    EXPECT_EQ(front.receive(Request::kGetVringBase), state(0, 1));
    EXPECT_EQ(load16(guest_ + kUsed + 2), 0);
  });
}

TEST_F(VhostUserBlkExportTest, AMalformedMessageDropsTheFrontendAndTheNextIsServed) {
  with_frontend([&] {
    {
      Frontend front(socket_);
      ASSERT_TRUE(front.send(Request::kSetVringNum, state(5, 128)));  // no queue 5
      EXPECT_TRUE(front.closed());
    }
    {
      Frontend front(socket_);
      ASSERT_TRUE(front.send(Request::kSetVringNum, state(0, 100)));  // not a power of two
      EXPECT_TRUE(front.closed());
    }
    {
      Frontend front(socket_);
      ASSERT_TRUE(front.send(Request::kSetMemTable, std::vector<uint8_t>(40)));  // no regions
      EXPECT_TRUE(front.closed());
    }
    {
      // One region of twice the guest memory's file: refused, not mapped past the file's end.
      Frontend front(socket_);
      std::vector<uint8_t> table(8 + 32);
      store32(table.data(), 1);
      store64(table.data() + 16, 2 * kMemory);
      store64(table.data() + 24, kUserBase);
      ASSERT_TRUE(front.send(Request::kSetMemTable, table, memfd_, kVersion | kFlagNeedReply));
      EXPECT_TRUE(front.closed());
    }
    {
      Frontend front(socket_);
      ASSERT_TRUE(front.send(static_cast<Request>(1000), {}));
      EXPECT_TRUE(front.closed());
    }
    Frontend front(socket_);
    EXPECT_NE(front.get_u64(Request::kGetFeatures) & kFeatureVersion1, 0u);
  });
}

TEST_F(VhostUserBlkExportTest, ShuttingDownDropsTheFrontend) {
  std::atomic<bool> ready{false};
  std::atomic<bool> closed{false};
  std::thread thread([&] {
    Frontend front(socket_);
    start_queue(front);
    ready = true;
    loop_->post([] {});
    closed = front.closed();
  });
  loop_->run_until([&] { return ready.load(); });
  EXPECT_TRUE(export_->connected());
  shut_down();
  thread.join();
  EXPECT_TRUE(closed);
  EXPECT_FALSE(export_->connected());
  EXPECT_NE(::access(socket_.c_str(), F_OK), 0);
}

}  // namespace
}  // namespace blockd::exports::vhost_user
