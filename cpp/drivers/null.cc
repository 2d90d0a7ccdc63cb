// null-co / null-aio: see null.h. QEMU reference: block/null.c behaviour (not code) in 7.2.
#include "drivers/null.h"

#include <chrono>
#include <cstring>

#include "drivers/qemu_json.h"

namespace blockd::drivers {
namespace {

constexpr int64_t kDefaultSize = int64_t{1} << 30;
constexpr int64_t kSectorSize = 512;

class NullNode final : public block::Node {
 public:
  NullNode(block::NodeOptions common, const NullOptions& options)
      : Node(std::move(common)), options_null_(options) {
    const int64_t bytes = options.size.value_or(kDefaultSize);
    // QEMU keeps sizes in 512-byte sectors, rounding up.
    set_size((bytes + kSectorSize - 1) / kSectorSize * kSectorSize);
  }

  std::string_view driver_name() const noexcept override {
    return options_null_.aio ? "null-aio" : "null-co";
  }

  std::string filename() const override {
    if (!options_null_.size && !options_null_.read_zeroes) {
      return options_null_.aio ? "null-aio://" : "null-co://";
    }
    return json_filename(open_options());
  }

  nlohmann::json open_options() const override {
    nlohmann::json options = {{"driver", std::string(driver_name())}};
    if (options_null_.size) options["size"] = *options_null_.size;
    if (options_null_.read_zeroes) options["read-zeroes"] = *options_null_.read_zeroes;
    return options;
  }

  int64_t allocated_size() const override { return 0; }

  Task<int64_t> read(uint64_t, uint64_t length, void* buffer, uint32_t) noexcept override {
    co_await delay();
    std::memset(buffer, 0, length);
    co_return 0;
  }

  Task<int64_t> write(uint64_t, uint64_t, const void*, uint32_t) noexcept override {
    co_await delay();
    co_return 0;
  }

  Task<int64_t> flush() noexcept override {
    co_await delay();
    co_return 0;
  }

  Task<block::BlockStatus> block_status(uint64_t offset, uint64_t length) noexcept override {
    const int64_t end = std::min<int64_t>(size(), static_cast<int64_t>(offset + length));
    const int64_t bytes = std::max<int64_t>(end - static_cast<int64_t>(offset), 0);
    // As QEMU: with read-zeroes the device reads as zeroes; without, nothing is allocated.
    const uint32_t flags = options_null_.read_zeroes.value_or(false)
                               ? (block::kStatusZero | block::kStatusAllocated)
                               : 0;
    co_return block::BlockStatus{bytes, flags};
  }

 private:
  // The latency-ns delay on the node's loop timer; free when the latency is zero.
  Task<void> delay() noexcept {
    if (options_null_.latency_ns > 0) {
      co_await loop().sleep(std::chrono::nanoseconds(options_null_.latency_ns));
    }
  }

  NullOptions options_null_;
};

}  // namespace

Expected<std::shared_ptr<block::Node>> open_null_node(block::NodeOptions common,
                                                      const NullOptions& options, Loop& loop) {
  if (options.size && *options.size < 0) return Status::generic("size is invalid");
  if (options.latency_ns < 0) return Status::generic("latency-ns is invalid");
  auto node = std::make_shared<NullNode>(std::move(common), options);
  node->set_loop(loop);
  return std::shared_ptr<block::Node>(std::move(node));
}

}  // namespace blockd::drivers
