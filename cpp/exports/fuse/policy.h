// The decisions of the FUSE export that depend only on numbers: how a write, a truncate or an
// fallocate maps onto the node given its size and the export's options, and how block status
// answers SEEK_DATA and SEEK_HOLE. Kept apart from the FUSE plumbing so they can be tested alone.
//
// Errors are positive errno values, as FUSE replies carry them.
#pragma once

#include <cstdint>

#include "block/backend.h"
#include "runtime/task.h"

namespace blockd::exports::fuse {

// What to do with a write of `length` bytes at `offset` on a node of `size` bytes.
struct WritePlan {
  int error = 0;         // nonzero: refuse the write with this errno
  uint64_t length = 0;   // bytes to write (may be shorter than asked: a short write)
  uint64_t grow_to = 0;  // nonzero: resize the node to this many bytes first
};
// Inside the node: written as asked. Past the end: growable exports grow the node to the end of
// the write; the others write what fits (a short write) and refuse a write that starts at or
// after the end with EIO, as qemu-storage-daemon does.
WritePlan plan_write(uint64_t offset, uint64_t length, uint64_t size, bool growable) noexcept;

// What an fallocate(2) request (mode bits from <linux/falloc.h>) becomes.
struct FallocatePlan {
  enum class Kind {
    kRefuse,    // reply `error`
    kZeroes,    // make [offset, offset + length) read as zeroes (write_zeroes)
    kAllocate,  // allocate [offset, offset + length) without changing what it reads
  };
  Kind kind = Kind::kRefuse;
  int error = 0;
  bool may_unmap = false;  // kZeroes: the range may be deallocated (punch hole)
  uint64_t offset = 0;     // the part inside the node (after any growth); length 0: nothing
  uint64_t length = 0;
  uint64_t grow_to = 0;  // nonzero: resize the node to this many bytes first
};
// PUNCH_HOLE (with KEEP_SIZE, which Linux requires) zeroes the range inside the node and may
// deallocate it; ZERO_RANGE zeroes it and, without KEEP_SIZE, grows the node to cover it; mode 0
// allocates it and grows the node, KEEP_SIZE alone allocates only what lies inside. Other modes
// (COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE, ...) are refused with EOPNOTSUPP. Growth is
// refused with EOPNOTSUPP when `may_resize` is false.
FallocatePlan plan_fallocate(int mode, uint64_t offset, uint64_t length, uint64_t size,
                             bool may_resize) noexcept;

// Answers lseek(SEEK_DATA or SEEK_HOLE) from `offset` with the backend's block status: a hole is
// a run that reads as zeroes (kStatusZero); the end of the node is a hole. Returns the offset or
// a negative errno (-ENXIO past the end, or for SEEK_DATA in a trailing hole). Node's loop.
Task<int64_t> seek(block::BlockBackend& backend, uint64_t offset, int whence) noexcept;

// The errno a FUSE reply carries for a block-layer result `ret` (< 0): its negation when it is a
// plain errno, EIO for anything else.
int fuse_errno(int64_t ret) noexcept;

}  // namespace blockd::exports::fuse
