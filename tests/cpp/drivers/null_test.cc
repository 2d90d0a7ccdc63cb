// null-co / null-aio driver tests.
#include "drivers/null.h"

#include <gtest/gtest.h>

#include <vector>

#include "drivers/qemu_json.h"
#include "test_support.h"

namespace blockd::drivers {
namespace {

using testing::run;

class NullTest : public ::testing::Test {
 protected:
  std::shared_ptr<block::Node> open(const NullOptions& options) {
    auto node = open_null_node(block::NodeOptions{.node_name = "null0"}, options, *loop_);
    EXPECT_TRUE(node.has_value()) << node.status().message();
    return node.has_value() ? *node : nullptr;
  }
  std::unique_ptr<Loop> loop_ = testing::make_loop();
};

TEST_F(NullTest, Defaults) {
  auto node = open({});
  EXPECT_EQ(node->driver_name(), "null-co");
  EXPECT_EQ(node->size(), int64_t{1} << 30);
  EXPECT_EQ(node->filename(), "null-co://");
  EXPECT_EQ(node->open_options(), nlohmann::json({{"driver", "null-co"}}));
  EXPECT_EQ(node->allocated_size(), 0);
  EXPECT_EQ(node->request_alignment(), 1u);
}

TEST_F(NullTest, NullAio) {
  auto node = open({.aio = true});
  EXPECT_EQ(node->driver_name(), "null-aio");
  EXPECT_EQ(node->filename(), "null-aio://");
}

TEST_F(NullTest, FilenameAsQemu) {
  // Strings taken from qemu-storage-daemon 7.2's query-named-block-nodes.
  EXPECT_EQ(open({.size = 4096, .read_zeroes = true})->filename(),
            "json:{\"read-zeroes\": true, \"driver\": \"null-co\", \"size\": 4096}");
  EXPECT_EQ(open({.size = 1000})->filename(), "json:{\"driver\": \"null-co\", \"size\": 1000}");
  EXPECT_EQ(open({.read_zeroes = false})->filename(),
            "json:{\"read-zeroes\": false, \"driver\": \"null-co\"}");
  // latency-ns is not part of the name.
  EXPECT_EQ(open({.latency_ns = 5})->filename(), "null-co://");
}

TEST_F(NullTest, SizeRoundsUpToSectors) {
  auto node = open({.size = 1000});
  EXPECT_EQ(node->size(), 1024);
  EXPECT_EQ(open({.size = 0})->size(), 0);
}

TEST_F(NullTest, InvalidOptions) {
  auto node = open_null_node({}, {.size = -1}, *loop_);
  ASSERT_FALSE(node.has_value());
  EXPECT_EQ(node.status().message(), "size is invalid");
  node = open_null_node({}, {.latency_ns = -5}, *loop_);
  ASSERT_FALSE(node.has_value());
  EXPECT_EQ(node.status().message(), "latency-ns is invalid");
}

TEST_F(NullTest, ReadsZeroesWritesVanish) {
  for (bool read_zeroes : {false, true}) {
    auto node = open({.size = 1 << 20, .read_zeroes = read_zeroes});
    std::vector<char> buffer(4096, 'x');
    EXPECT_EQ(run(*loop_, node->write(0, buffer.size(), buffer.data(), 0)), 0);
    // Whatever read-zeroes says, no stale memory is ever returned.
    EXPECT_EQ(run(*loop_, node->read(0, buffer.size(), buffer.data(), 0)), 0);
    EXPECT_EQ(buffer, std::vector<char>(4096, 0));
    EXPECT_EQ(run(*loop_, node->flush()), 0);
    EXPECT_EQ(run(*loop_, node->write_zeroes(0, 8192, 0)), 0);
    EXPECT_EQ(run(*loop_, node->discard(0, 8192)), 0);
  }
}

TEST_F(NullTest, BlockStatusAsQemu) {
  // qemu-img map: read-zeroes=off → not present; read-zeroes=on → present and zero.
  auto plain = open({.size = 1 << 20});
  auto status = run(*loop_, plain->block_status(4096, 1 << 20));
  EXPECT_EQ(status.bytes, (1 << 20) - 4096);
  EXPECT_EQ(status.flags, 0u);
  auto zeroes = open({.size = 1 << 20, .read_zeroes = true});
  status = run(*loop_, zeroes->block_status(0, 65536));
  EXPECT_EQ(status.bytes, 65536);
  EXPECT_EQ(status.flags, block::kStatusZero | block::kStatusAllocated);
}

TEST_F(NullTest, LatencyDelaysCompletion) {
  auto node = open({.size = 1 << 20, .latency_ns = 1'000'000});
  bool done = false;
  std::vector<char> buffer(512);
  loop_->spawn([](block::Node& n, char* data, bool& flag) -> Task<void> {
    EXPECT_EQ(co_await n.read(0, 512, data, 0), 0);
    flag = true;
  }(*node, buffer.data(), done));
  EXPECT_FALSE(done);  // waiting on the loop's timer
  EXPECT_EQ(loop_->in_flight(), 1u);
  loop_->run_until([&] { return done; });
  EXPECT_EQ(loop_->in_flight(), 0u);
}

TEST(QemuJsonTest, MatchesQemuText) {
  // Key order is QDict's hash order, separators ", " and ": ".
  nlohmann::json options = {
      {"driver", "raw"},
      {"offset", 512},
      {"size", 1024},
      {"file", {{"driver", "file"}, {"filename", "/tmp/probe/img"}}},
  };
  EXPECT_EQ(json_filename(options),
            "json:{\"offset\": 512, \"driver\": \"raw\", \"size\": 1024, \"file\": {\"driver\": "
            "\"file\", \"filename\": \"/tmp/probe/img\"}}");
  EXPECT_EQ(qemu_json_text(nlohmann::json::object()), "{}");
  EXPECT_EQ(qemu_json_text({1, "a", true, nullptr}), "[1, \"a\", true, null]");
  EXPECT_EQ(qemu_json_text("q\"\\\n\x01\x7f\xc3\xa9"), "\"q\\\"\\\\\\n\\u0001\\u007F\\u00E9\"");
  EXPECT_EQ(qemu_json_text("\xf0\x9f\x98\x80"), "\"\\uD83D\\uDE00\"");
}

}  // namespace
}  // namespace blockd::drivers
