#include "exports/fuse/policy.h"

#include <linux/falloc.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace blockd::exports::fuse {

WritePlan plan_write(uint64_t offset, uint64_t length, uint64_t size, bool growable) noexcept {
  WritePlan plan;
  if (length > UINT64_MAX - offset) {
    plan.error = EFBIG;
    return plan;
  }
  plan.length = length;
  const uint64_t end = offset + length;
  if (end <= size || length == 0) return plan;
  if (growable) {
    plan.grow_to = end;
  } else if (offset >= size) {
    plan.error = EIO;
    plan.length = 0;
  } else {
    plan.length = size - offset;
  }
  return plan;
}

FallocatePlan plan_fallocate(int mode, uint64_t offset, uint64_t length, uint64_t size,
                             bool may_resize) noexcept {
  FallocatePlan plan;
  if (length == 0 || length > UINT64_MAX - offset) {
    plan.error = EINVAL;
    return plan;
  }
  const uint64_t end = offset + length;
  const bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
  const int operation = mode & ~FALLOC_FL_KEEP_SIZE;
  if (operation == FALLOC_FL_PUNCH_HOLE) {
    if (!keep_size) {
      plan.error = EOPNOTSUPP;
      return plan;
    }
    plan.kind = FallocatePlan::Kind::kZeroes;
    plan.may_unmap = true;
  } else if (operation == FALLOC_FL_ZERO_RANGE) {
    plan.kind = FallocatePlan::Kind::kZeroes;
  } else if (operation == 0) {
    plan.kind = FallocatePlan::Kind::kAllocate;
  } else {
    plan.error = EOPNOTSUPP;
    return plan;
  }
  if (end > size && !keep_size) {
    if (!may_resize) {
      plan.kind = FallocatePlan::Kind::kRefuse;
      plan.error = EOPNOTSUPP;
      return plan;
    }
    plan.grow_to = end;
  }
  // A freshly grown tail already reads as zeroes: only the old part needs work. (Allocation of
  // the new tail is the resize's business.)
  const uint64_t work_end = std::min(end, size);
  plan.offset = offset;
  plan.length = offset < work_end ? work_end - offset : 0;
  return plan;
}

Task<int64_t> seek(block::BlockBackend& backend, uint64_t offset, int whence) noexcept {
  const uint64_t size = static_cast<uint64_t>(backend.size());
  if (whence != SEEK_DATA && whence != SEEK_HOLE) co_return -EINVAL;
  if (offset >= size) co_return -ENXIO;
  uint64_t position = offset;
  while (position < size) {
    const block::BlockStatus status = co_await backend.block_status(position, size - position);
    if (status.bytes < 0) co_return status.bytes;
    if (status.bytes == 0) break;
    const bool hole = status.flags & block::kStatusZero;
    if (hole == (whence == SEEK_HOLE)) co_return static_cast<int64_t>(position);
    position += static_cast<uint64_t>(status.bytes);
  }
  // Only holes up to the end: no more data. Only data: the end is the hole.
  if (whence == SEEK_DATA) co_return -ENXIO;
  co_return static_cast<int64_t>(size);
}

int fuse_errno(int64_t ret) noexcept {
  if (ret >= 0 || ret < -4095) return EIO;
  return static_cast<int>(-ret);
}

}  // namespace blockd::exports::fuse
