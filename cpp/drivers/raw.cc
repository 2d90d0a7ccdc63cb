// The raw format driver; see raw.h.
#include "drivers/raw.h"

#include <algorithm>
#include <cstring>

#include "drivers/qemu_json.h"

namespace blockd::drivers {
namespace {

using block::BlockStatus;

constexpr uint64_t kSectorSize = 512;

class RawNode final : public block::Node {
 public:
  RawNode(block::NodeOptions common, const RawOptions& options)
      : Node(std::move(common)), raw_options_(options), offset_(options.offset.value_or(0)) {}

  Status init();

  std::string_view driver_name() const noexcept override { return "raw"; }

  std::string filename() const override {
    // A plain raw node is known by its file's name, unless that itself needs "json:".
    if (!raw_options_.offset && !raw_options_.size) {
      std::string name = file().filename();
      if (name.rfind("json:", 0) != 0) return name;
    }
    return json_filename(open_options());
  }

  nlohmann::json open_options() const override {
    nlohmann::json options = {{"driver", "raw"}, {"file", file().open_options()}};
    if (raw_options_.offset) options["offset"] = *raw_options_.offset;
    if (raw_options_.size) options["size"] = *raw_options_.size;
    return options;
  }

  int64_t allocated_size() const override { return file().allocated_size(); }
  uint32_t request_alignment() const noexcept override { return file().request_alignment(); }
  uint64_t max_transfer() const noexcept override { return file().max_transfer(); }
  bool supports_discard() const noexcept override { return file().supports_discard(); }
  bool supports_write_zeroes() const noexcept override { return file().supports_write_zeroes(); }

  Task<int64_t> read(uint64_t offset, uint64_t length, void* buffer,
                     uint32_t flags) noexcept override {
    if (!in_bounds(offset, length)) co_return -EINVAL;
    // With an unaligned offset the node size is rounded up past the child's end (as in QEMU);
    // that tail reads as zeroes.
    const uint64_t readable = readable_length(offset, length);
    if (readable < length) std::memset(static_cast<char*>(buffer) + readable, 0, length - readable);
    if (readable == 0) co_return 0;
    co_return co_await file().read(offset_ + offset, readable, buffer, flags);
  }

  // Raw passes bytes through unchanged: a range that lies wholly within the child maps to where
  // the child has it.
  block::FileRange map_file(uint64_t offset, uint64_t length,
                            block::MapAccess access) noexcept override {
    if (!in_bounds(offset, length) || readable_length(offset, length) < length) return {};
    return file().map_file(offset_ + offset, length, access);
  }
  Task<block::FileRange> map_file_async(uint64_t offset, uint64_t length,
                                        block::MapAccess access) noexcept override {
    if (!in_bounds(offset, length) || readable_length(offset, length) < length) {
      co_return block::FileRange{};
    }
    co_return co_await file().map_file_async(offset_ + offset, length, access);
  }
  // The range is the child's own: it ends the mapping it granted.
  void release_file(const block::FileRange& range, block::MapAccess access) noexcept override {
    file().release_file(range, access);
  }

  // Only a raw node that shows its child from the start, with no size of its own, is its child's
  // file.
  int host_file() const noexcept override {
    return offset_ == 0 && !raw_options_.size ? file().host_file() : -1;
  }

  Task<int64_t> write(uint64_t offset, uint64_t length, const void* buffer,
                      uint32_t flags) noexcept override {
    if (!in_bounds(offset, length)) co_return -EINVAL;
    co_return co_await file().write(offset_ + offset, length, buffer, flags);
  }

  Task<int64_t> flush() noexcept override {
    if (options_.cache_no_flush) co_return 0;
    co_return co_await file().flush();
  }

  Task<int64_t> discard(uint64_t offset, uint64_t length) noexcept override {
    if (options_.discard != "unmap") co_return 0;
    if (!in_bounds(offset, length)) co_return -EINVAL;
    co_return co_await file().discard(offset_ + offset, length);
  }

  Task<int64_t> write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept override {
    if (!in_bounds(offset, length)) co_return -EINVAL;
    if (options_.discard != "unmap") flags &= ~block::kRequestMayUnmap;
    co_return co_await file().write_zeroes(offset_ + offset, length, flags);
  }

  Task<BlockStatus> block_status(uint64_t offset, uint64_t length) noexcept override {
    const uint64_t size = static_cast<uint64_t>(this->size());
    if (offset >= size) co_return BlockStatus{0, 0};
    length = std::min(length, size - offset);
    const uint64_t readable = readable_length(offset, length);
    if (readable == 0) co_return BlockStatus{static_cast<int64_t>(length), block::kStatusZero};
    co_return co_await file().block_status(offset_ + offset, readable);
  }

  Task<int64_t> cache(uint64_t offset, uint64_t length) noexcept override {
    if (!in_bounds(offset, length)) co_return -EINVAL;
    co_return co_await file().cache(offset_ + offset, length);
  }

  // Only a raw node that shows its whole file can change size (QEMU refuses the others too).
  Task<int64_t> truncate(uint64_t size) noexcept override {
    if (offset_ != 0 || raw_options_.size) co_return -ENOTSUP;
    const int64_t ret = co_await file().truncate(size);
    if (ret < 0) co_return ret;
    set_size(file().size());
    co_return 0;
  }

 private:
  block::Node& file() const noexcept { return *file_child()->node(); }

  bool in_bounds(uint64_t offset, uint64_t length) const noexcept {
    const uint64_t size = static_cast<uint64_t>(this->size());
    return offset <= size && length <= size - offset;
  }

  // How much of [offset, offset + length) lies within the child.
  uint64_t readable_length(uint64_t offset, uint64_t length) const noexcept {
    const uint64_t child_size = static_cast<uint64_t>(file().size());
    const uint64_t start = offset_ + offset;
    if (start >= child_size) return 0;
    return std::min(length, child_size - start);
  }

  RawOptions raw_options_;
  uint64_t offset_;
};

Status RawNode::init() {
  const int64_t child_size = file().size();
  if (child_size < 0) return Status::generic("Could not get image size: " + errno_text(child_size));
  const uint64_t real_size = static_cast<uint64_t>(child_size);
  if (offset_ > real_size) {
    return Status::generic("Offset (" + std::to_string(offset_) +
                           ") cannot be greater than size of the containing file (" +
                           std::to_string(real_size) + ")");
  }
  if (raw_options_.size && real_size - offset_ < *raw_options_.size) {
    return Status::generic("The sum of offset (" + std::to_string(offset_) + ") and size (" +
                           std::to_string(*raw_options_.size) +
                           ") has to be smaller or equal to the  actual size of the containing "
                           "file (" +
                           std::to_string(real_size) + ")");
  }
  if (raw_options_.size && *raw_options_.size % kSectorSize != 0) {
    return Status::generic("Specified size is not multiple of " + std::to_string(kSectorSize));
  }
  const uint64_t size = raw_options_.size.value_or(real_size - offset_);
  // Sizes are whole 512-byte sectors, rounded up, as in QEMU.
  set_size(static_cast<int64_t>((size + kSectorSize - 1) / kSectorSize * kSectorSize));
  return Status::ok();
}

}  // namespace

Expected<std::shared_ptr<block::Node>> open_raw_node(block::NodeOptions common,
                                                     const RawOptions& options,
                                                     std::shared_ptr<block::Node> file,
                                                     Loop& loop) {
  auto node = std::make_shared<RawNode>(std::move(common), options);
  node->set_loop(loop);
  auto child = node->add_child("file", std::move(file));
  if (!child) return child.status();
  BLOCKD_RETURN_IF_ERROR(node->init());
  return std::shared_ptr<block::Node>(std::move(node));
}

}  // namespace blockd::drivers
