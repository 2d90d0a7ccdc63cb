// BlockBackend tests: request bounds, writethrough, draining, detaching.
#include "block/backend.h"

#include <gtest/gtest.h>

#include <chrono>
#include <vector>

#include "drivers/null.h"
#include "test_support.h"

namespace blockd::block {
namespace {

using testing::run;

// A node that records what reaches it, to observe the backend's policy.
class RecordingNode final : public Node {
 public:
  explicit RecordingNode(int64_t size) : Node(NodeOptions{.node_name = "rec"}) { set_size(size); }
  std::string_view driver_name() const noexcept override { return "recording"; }
  nlohmann::json open_options() const override { return {{"driver", "recording"}}; }
  Task<int64_t> read(uint64_t, uint64_t, void*, uint32_t) noexcept override {
    log.push_back("read");
    co_return 0;
  }
  Task<int64_t> write(uint64_t, uint64_t, const void*, uint32_t flags) noexcept override {
    log.push_back(flags & kRequestFua ? "write+fua" : "write");
    if (latency.count() > 0) co_await loop().sleep(latency);
    ++writes_completed;
    co_return 0;
  }
  Task<int64_t> flush() noexcept override {
    log.push_back("flush");
    co_return 0;
  }
  std::vector<std::string> log;
  std::chrono::nanoseconds latency{0};
  int writes_completed = 0;
};

class BackendTest : public ::testing::Test {
 protected:
  std::unique_ptr<Loop> loop_ = testing::make_loop();
};

TEST_F(BackendTest, RequestsBeyondTheEndFail) {
  auto node = drivers::open_null_node(NodeOptions{.node_name = "n0"}, {.size = 1 << 20}, *loop_);
  ASSERT_TRUE(node.has_value());
  BlockBackend backend("block export 'exp0'");
  ASSERT_TRUE(backend.attach(*node, kPermConsistentRead | kPermWrite, kPermAll));
  std::vector<char> buffer(8192);
  const uint64_t size = 1 << 20;
  EXPECT_EQ(run(*loop_, backend.read(size - 4096, 4096, buffer.data(), 0)), 0);
  EXPECT_EQ(run(*loop_, backend.read(size, 0, buffer.data(), 0)), 0);
  EXPECT_EQ(run(*loop_, backend.read(size - 4096, 8192, buffer.data(), 0)), -EINVAL);
  EXPECT_EQ(run(*loop_, backend.read(size + 1, 0, buffer.data(), 0)), -EINVAL);
  EXPECT_EQ(run(*loop_, backend.write(size - 1, 2, buffer.data(), 0)), -EINVAL);
  EXPECT_EQ(run(*loop_, backend.write_zeroes(size, 512, 0)), -EINVAL);
  EXPECT_EQ(run(*loop_, backend.discard(~uint64_t{0}, 2)), -EINVAL);  // no overflow
  EXPECT_EQ(run(*loop_, backend.block_status(size, 1)).bytes, -EINVAL);
}

TEST_F(BackendTest, DetachedBackendHasNoMedium) {
  BlockBackend backend("block export 'exp0'");
  char byte;
  EXPECT_EQ(run(*loop_, backend.read(0, 1, &byte, 0)), -ENOMEDIUM);
  EXPECT_EQ(run(*loop_, backend.flush()), -ENOMEDIUM);
  EXPECT_EQ(backend.size(), 0);
}

TEST_F(BackendTest, WritethroughFlushesAfterEveryWrite) {
  auto node = std::make_shared<RecordingNode>(1 << 20);
  node->set_loop(*loop_);
  BlockBackend backend("block export 'exp0'");
  ASSERT_TRUE(backend.attach(node, kPermConsistentRead | kPermWrite, kPermAll));
  char data[512] = {};
  EXPECT_EQ(run(*loop_, backend.write(0, sizeof data, data, 0)), 0);
  EXPECT_EQ(node->log, (std::vector<std::string>{"write"}));

  backend.set_writethrough(true);
  node->log.clear();
  EXPECT_EQ(run(*loop_, backend.write(0, sizeof data, data, 0)), 0);
  EXPECT_EQ(run(*loop_, backend.write_zeroes(0, 4096, 0)), 0);
  // A FUA write is already durable: no extra flush.
  EXPECT_EQ(run(*loop_, backend.write(0, sizeof data, data, kRequestFua)), 0);
  EXPECT_EQ(run(*loop_, backend.read(0, sizeof data, data, 0)), 0);
  EXPECT_EQ(node->log,
            (std::vector<std::string>{"write", "flush", "write", "flush", "write+fua", "read"}));
}

TEST_F(BackendTest, DrainWaitsForRequestsInFlight) {
  // Each write takes 2 ms on the loop's timer, so all of them are in flight at once.
  auto node = std::make_shared<RecordingNode>(1 << 20);
  node->set_loop(*loop_);
  node->latency = std::chrono::milliseconds(2);
  BlockBackend backend("block export 'exp0'");
  ASSERT_TRUE(backend.attach(node, kPermConsistentRead | kPermWrite, kPermAll));

  std::vector<char> buffer(4096);
  for (int i = 0; i < 8; ++i) {
    loop_->spawn([](BlockBackend& b, char* data) -> Task<void> {
      EXPECT_EQ(co_await b.write(0, 4096, data, 0), 0);
    }(backend, buffer.data()));
  }
  EXPECT_EQ(backend.in_flight(), 8u);
  EXPECT_EQ(node->writes_completed, 0);
  // drain() returns once the last request has left the node.
  auto drained = [](BlockBackend& b, RecordingNode& n) -> Task<int> {
    co_await b.drain();
    EXPECT_EQ(b.in_flight(), 0u);
    co_return n.writes_completed;
  };
  EXPECT_EQ(run(*loop_, drained(backend, *node)), 8);
  // Draining an idle backend completes at once.
  EXPECT_EQ(run(*loop_, drained(backend, *node)), 8);
}

TEST_F(BackendTest, NullDeviceLatencyKeepsRequestsInFlight) {
  auto node = drivers::open_null_node(NodeOptions{.node_name = "slow"},
                                      {.size = 1 << 20, .latency_ns = 1'000'000}, *loop_);
  ASSERT_TRUE(node.has_value());
  BlockBackend backend("block export 'exp0'");
  ASSERT_TRUE(backend.attach(*node, kPermConsistentRead, kPermAll));
  std::vector<char> buffer(4096, 'x');
  loop_->spawn([](BlockBackend& b, char* data) -> Task<void> {
    EXPECT_EQ(co_await b.read(0, 4096, data, 0), 0);
  }(backend, buffer.data()));
  EXPECT_EQ(backend.in_flight(), 1u);
  run(*loop_, backend.drain());
  EXPECT_EQ(backend.in_flight(), 0u);
}

TEST_F(BackendTest, DetachToBringsTheNodeBackUnlessAnotherUserKeepsIt) {
  auto other_loop = testing::make_loop();
  auto node = drivers::open_null_node(NodeOptions{.node_name = "null0"}, {}, *loop_);
  ASSERT_TRUE(node.has_value());
  BlockBackend server("block export 'exp0'");
  ASSERT_TRUE(server.attach(*node, kPermConsistentRead, kPermAll));
  ASSERT_TRUE((*node)->move_to_loop(*other_loop, &server));

  // Alone on the node: it comes back with the detach.
  server.detach_to(*loop_);
  EXPECT_EQ(server.root(), nullptr);
  EXPECT_EQ(&(*node)->loop(), loop_.get());

  // Another user arrived while it ran elsewhere: the node stays where that user uses it.
  ASSERT_TRUE(server.attach(*node, kPermConsistentRead, kPermAll));
  ASSERT_TRUE((*node)->move_to_loop(*other_loop, &server));
  BlockBackend bystander("block export 'exp1'");
  ASSERT_TRUE(bystander.attach(*node, kPermConsistentRead, kPermAll));
  server.detach_to(*loop_);
  EXPECT_EQ(server.root(), nullptr);
  EXPECT_EQ(&(*node)->loop(), other_loop.get());
  bystander.detach();
}

}  // namespace
}  // namespace blockd::block
