#include "block/backend.h"

#include <cerrno>
#include <utility>

namespace blockd::block {

// Counts one request for the duration of a scope and wakes drainers when the count drops to zero.
struct BlockBackend::InFlight {
  explicit InFlight(BlockBackend& backend) : backend(backend) { ++backend.in_flight_; }
  ~InFlight() {
    if (--backend.in_flight_ == 0 && backend.idle_.has_waiters()) backend.idle_.notify_all();
  }
  BlockBackend& backend;
};

BlockBackend::BlockBackend(std::string description) : description_(std::move(description)) {}

BlockBackend::~BlockBackend() { detach(); }

Status BlockBackend::attach(std::shared_ptr<Node> node, uint32_t permissions, uint32_t shared) {
  BLOCKD_RETURN_IF_ERROR(node->attach(*this, permissions, shared));
  root_ = std::move(node);
  return Status::ok();
}

void BlockBackend::detach() noexcept {
  if (!root_) return;
  root_->detach(*this);
  root_.reset();
}

void BlockBackend::detach_to(Loop& loop) {
  if (root_ && &root_->loop() != &loop) (void)root_->move_to_loop(loop, this);
  detach();
}

int BlockBackend::check_range(uint64_t offset, uint64_t length) const noexcept {
  if (!root_) return -ENOMEDIUM;
  const uint64_t size = static_cast<uint64_t>(root_->size());
  if (offset > size || length > size - offset) return -EINVAL;
  return 0;
}

Task<int64_t> BlockBackend::read(uint64_t offset, uint64_t length, void* buffer,
                                 uint32_t flags) noexcept {
  if (int ret = check_range(offset, length)) co_return ret;
  InFlight guard(*this);
  co_return co_await root_->read(offset, length, buffer, flags);
}

Task<int64_t> BlockBackend::write(uint64_t offset, uint64_t length, const void* buffer,
                                  uint32_t flags) noexcept {
  if (int ret = check_range(offset, length)) co_return ret;
  InFlight guard(*this);
  int64_t ret = co_await root_->write(offset, length, buffer, flags);
  if (ret >= 0 && writethrough_ && !(flags & kRequestFua)) ret = co_await root_->flush();
  co_return ret;
}

Task<int64_t> BlockBackend::flush() noexcept {
  if (!root_) co_return -ENOMEDIUM;
  InFlight guard(*this);
  co_return co_await root_->flush();
}

Task<int64_t> BlockBackend::discard(uint64_t offset, uint64_t length) noexcept {
  if (int ret = check_range(offset, length)) co_return ret;
  InFlight guard(*this);
  co_return co_await root_->discard(offset, length);
}

Task<int64_t> BlockBackend::write_zeroes(uint64_t offset, uint64_t length,
                                         uint32_t flags) noexcept {
  if (int ret = check_range(offset, length)) co_return ret;
  InFlight guard(*this);
  int64_t ret = co_await root_->write_zeroes(offset, length, flags);
  if (ret >= 0 && writethrough_ && !(flags & kRequestFua)) ret = co_await root_->flush();
  co_return ret;
}

Task<BlockStatus> BlockBackend::block_status(uint64_t offset, uint64_t length) noexcept {
  if (int ret = check_range(offset, length)) co_return BlockStatus{ret, 0};
  InFlight guard(*this);
  co_return co_await root_->block_status(offset, length);
}

Task<int64_t> BlockBackend::cache(uint64_t offset, uint64_t length) noexcept {
  if (int ret = check_range(offset, length)) co_return ret;
  InFlight guard(*this);
  co_return co_await root_->cache(offset, length);
}

Task<int64_t> BlockBackend::truncate(uint64_t size) noexcept {
  if (!root_) co_return -ENOMEDIUM;
  if (!(permissions() & kPermResize)) co_return -EPERM;
  InFlight guard(*this);
  co_return co_await root_->truncate(size);
}

BlockBackend::MappedRange::MappedRange(BlockBackend* backend, FileRange range,
                                       MapAccess access) noexcept
    : backend_(backend), range_(range), access_(access) {
  ++backend_->in_flight_;
}
BlockBackend::MappedRange::MappedRange(MappedRange&& other) noexcept
    : backend_(std::exchange(other.backend_, nullptr)),
      range_(other.range_),
      access_(other.access_) {}
BlockBackend::MappedRange& BlockBackend::MappedRange::operator=(MappedRange&& other) noexcept {
  if (this != &other) {
    release();
    backend_ = std::exchange(other.backend_, nullptr);
    range_ = other.range_;
    access_ = other.access_;
  }
  return *this;
}
BlockBackend::MappedRange::~MappedRange() { release(); }

void BlockBackend::MappedRange::release() noexcept {
  if (backend_ == nullptr) return;
  BlockBackend& backend = *std::exchange(backend_, nullptr);
  // The node is still attached: a mapping counts as in flight, and detaching needs a drain.
  backend.root_->release_file(range_, access_);
  if (--backend.in_flight_ == 0 && backend.idle_.has_waiters()) backend.idle_.notify_all();
}

BlockBackend::MappedRange BlockBackend::map(uint64_t offset, uint64_t length,
                                            MapAccess access) noexcept {
  if (check_range(offset, length) != 0) return {};
  const FileRange range = root_->map_file(offset, length, access);
  if (range.fd < 0) return {};
  return MappedRange(this, range, access);
}

BlockBackend::MappedRange BlockBackend::map_read(uint64_t offset, uint64_t length) noexcept {
  return map(offset, length, MapAccess::kRead);
}

Task<BlockBackend::MappedRange> BlockBackend::map_read_async(uint64_t offset,
                                                             uint64_t length) noexcept {
  if (check_range(offset, length) != 0) co_return MappedRange{};
  InFlight guard(*this);
  const FileRange range = co_await root_->map_file_async(offset, length, MapAccess::kRead);
  if (range.fd < 0) co_return MappedRange{};
  co_return MappedRange(this, range, MapAccess::kRead);
}

BlockBackend::MappedRange BlockBackend::map_write(uint64_t offset, uint64_t length,
                                                  uint32_t flags, bool want_memory) noexcept {
  if (!(permissions() & kPermWrite) || writethrough_ || (flags & kRequestFua)) return {};
  return map(offset, length, want_memory ? MapAccess::kWriteMemory : MapAccess::kWrite);
}

Task<void> BlockBackend::drain() noexcept {
  while (in_flight_ > 0) co_await idle_.wait();
}

}  // namespace blockd::block
