// The blkdebug driver; see blkdebug.h. Rule semantics follow QEMU 7.2's block/blkdebug (not its
// code).
#include "drivers/blkdebug.h"

#include <algorithm>

#include "drivers/qemu_json.h"

namespace blockd::drivers {
namespace {

using block::BlockStatus;

constexpr uint64_t kSectorSize = 512;
constexpr uint32_t kDefaultIoTypes =
    (1u << static_cast<int>(BlkdebugIoType::kRead)) |
    (1u << static_cast<int>(BlkdebugIoType::kWrite)) |
    (1u << static_cast<int>(BlkdebugIoType::kWriteZeroes)) |
    (1u << static_cast<int>(BlkdebugIoType::kDiscard)) |
    (1u << static_cast<int>(BlkdebugIoType::kBlockStatus));

class BlkdebugNode final : public block::Node {
 public:
  BlkdebugNode(block::NodeOptions common, BlkdebugOptions options)
      : Node(std::move(common)), options_(std::move(options)) {
    for (auto& rule : options_.inject_error) {
      rules_.push_back(Rule{&rule, false, false});
    }
  }

  void init() { set_size(image().size()); }

  std::string_view driver_name() const noexcept override { return "blkdebug"; }
  bool is_filter() const noexcept override { return true; }

  std::string filename() const override {
    const std::string name = image().filename();
    if (name.rfind("json:", 0) == 0) return json_filename(open_options());
    return "blkdebug::" + name;
  }

  nlohmann::json open_options() const override {
    nlohmann::json options = options_.given_rules;
    options["driver"] = "blkdebug";
    options["image"] = image().open_options();
    return options;
  }

  int64_t allocated_size() const override { return image().allocated_size(); }
  uint32_t request_alignment() const noexcept override { return image().request_alignment(); }
  uint64_t max_transfer() const noexcept override { return image().max_transfer(); }
  bool supports_discard() const noexcept override { return image().supports_discard(); }
  bool supports_write_zeroes() const noexcept override { return image().supports_write_zeroes(); }

  Task<int64_t> read(uint64_t offset, uint64_t length, void* buffer,
                     uint32_t flags) noexcept override {
    happen("read_aio");
    if (int64_t error = check(offset, length, BlkdebugIoType::kRead)) co_return error;
    co_return co_await image().read(offset, length, buffer, flags);
  }

  Task<int64_t> write(uint64_t offset, uint64_t length, const void* buffer,
                      uint32_t flags) noexcept override {
    happen("write_aio");
    happen("pwritev");
    if (int64_t error = check(offset, length, BlkdebugIoType::kWrite)) co_return error;
    co_return co_await image().write(offset, length, buffer, flags);
  }

  Task<int64_t> write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept override {
    happen("pwritev_zero");
    if (int64_t error = check(offset, length, BlkdebugIoType::kWriteZeroes)) co_return error;
    co_return co_await image().write_zeroes(offset, length, flags);
  }

  Task<int64_t> discard(uint64_t offset, uint64_t length) noexcept override {
    if (int64_t error = check(offset, length, BlkdebugIoType::kDiscard)) co_return error;
    co_return co_await image().discard(offset, length);
  }

  Task<int64_t> flush() noexcept override {
    happen("flush_to_os");
    happen("flush_to_disk");
    if (int64_t error = check(0, 0, BlkdebugIoType::kFlush)) co_return error;
    co_return co_await image().flush();
  }

  Task<BlockStatus> block_status(uint64_t offset, uint64_t length) noexcept override {
    if (int64_t error = check(offset, length, BlkdebugIoType::kBlockStatus)) {
      co_return BlockStatus{error, 0};
    }
    co_return co_await image().block_status(offset, length);
  }

  Task<int64_t> cache(uint64_t offset, uint64_t length) noexcept override {
    co_return co_await image().cache(offset, length);
  }

 private:
  struct Rule {
    const BlkdebugInjectError* options;
    bool armed;
    bool spent;  // a once rule that fired
  };

  block::Node& image() const noexcept { return *children().front()->node(); }

  // Event `name` happens: arms the matching inject-error rules (disarming the earlier ones when
  // it arms any) and applies the matching set-state rules, all against the state before it.
  void happen(std::string_view name) noexcept {
    const int64_t state = state_;
    bool arms = false;
    for (const Rule& rule : rules_) {
      arms |= !rule.spent && rule.options->event == name &&
              (rule.options->state == 0 || rule.options->state == state);
    }
    if (arms) {
      for (Rule& rule : rules_) {
        rule.armed = !rule.spent && rule.options->event == name &&
                     (rule.options->state == 0 || rule.options->state == state);
      }
    }
    for (const BlkdebugSetState& rule : options_.set_state) {
      if (rule.event == name && (rule.state == 0 || rule.state == state)) state_ = rule.new_state;
    }
  }

  // The error for a request, or 0: the first armed matching rule (in definition order) decides.
  int64_t check(uint64_t offset, uint64_t length, BlkdebugIoType type) noexcept {
    for (Rule& rule : rules_) {
      if (!rule.armed) continue;
      const BlkdebugInjectError& inject = *rule.options;
      const uint32_t types =
          inject.iotype ? 1u << static_cast<int>(*inject.iotype) : kDefaultIoTypes;
      if (!(types & (1u << static_cast<int>(type)))) continue;
      if (inject.sector >= 0) {
        const uint64_t at = static_cast<uint64_t>(inject.sector) * kSectorSize;
        if (length == 0 || at < offset || at >= offset + length) continue;
      }
      if (inject.error == 0) return 0;
      if (inject.once) {
        rule.armed = false;
        rule.spent = true;
      }
      return -inject.error;
    }
    return 0;
  }

  BlkdebugOptions options_;
  std::vector<Rule> rules_;
  int64_t state_ = 1;
};

}  // namespace

Expected<std::shared_ptr<block::Node>> open_blkdebug_node(block::NodeOptions common,
                                                          BlkdebugOptions options,
                                                          std::shared_ptr<block::Node> image,
                                                          Loop& loop) {
  auto node = std::make_shared<BlkdebugNode>(std::move(common), std::move(options));
  node->set_loop(loop);
  auto child = node->add_child("image", std::move(image));
  if (!child) return child.status();
  node->init();
  return std::shared_ptr<block::Node>(std::move(node));
}

}  // namespace blockd::drivers
