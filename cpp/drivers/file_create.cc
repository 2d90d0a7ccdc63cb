// blockdev-create for the file driver; see file_create.h.
#include "drivers/file_create.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "block/node.h"
#include "drivers/file_locks.h"

namespace blockd::drivers {
namespace {

// Zeroes are written in pieces of this size (full preallocation, and the fallocate fallback).
constexpr uint64_t kZeroChunk = 1u << 20;
// The first block of a new file is written so that later alignment probes find data (as QEMU
// does); this much at most.
constexpr uint64_t kFirstBlock = 4096;

// Closes the descriptor (and so drops its locks) on every path.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  int get() const noexcept { return fd_; }
  // Closes now; returns 0 or a negative errno.
  int close() noexcept {
    const int ret = ::close(fd_);
    fd_ = -1;
    return ret == 0 ? 0 : -errno;
  }

 private:
  int fd_;
};

// Locks the new file as a user that writes and resizes and shares everything but resizing, then
// checks that nobody else holds a conflicting lock. File systems without OFD locks are not locked.
Status lock_for_creation(int fd) {
  constexpr uint32_t kPermissions = block::kPermWrite | block::kPermResize;
  constexpr uint32_t kShared = block::kPermAll & ~block::kPermResize;
  std::vector<off_t> bytes;
  for (int bit = 0; bit < kPermissionBits; ++bit) {
    const uint32_t mask = 1u << bit;
    if (kPermissions & mask) bytes.push_back(kPermLockBase + bit);
    if (!(kShared & mask)) bytes.push_back(kSharedLockBase + bit);
  }
  for (const off_t byte : bytes) {
    if (const int ret = set_lock_byte(fd, byte, F_RDLCK); ret < 0) {
      if (ret == -EINVAL || ret == -ENOLCK || ret == -EOPNOTSUPP) return Status::ok();
      return Status::generic("Failed to lock byte " + std::to_string(byte) + ": " +
                             errno_text(ret));
    }
  }
  return check_lock_bytes(fd, kPermissions, kShared);
}

// Best-effort file attributes: failures are ignored, as in QEMU (which only warns).
void set_nocow(int fd) {
  int flags = 0;
  if (ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0) {
    flags |= FS_NOCOW_FL;
    (void)ioctl(fd, FS_IOC_SETFLAGS, &flags);
  }
}

void set_extent_size_hint(int fd, uint64_t hint) {
  fsxattr attributes{};
  if (ioctl(fd, FS_IOC_FSGETXATTR, &attributes) != 0) return;
  attributes.fsx_xflags |= FS_XFLAG_EXTSIZE;
  attributes.fsx_extsize = static_cast<uint32_t>(hint);
  (void)ioctl(fd, FS_IOC_FSSETXATTR, &attributes);
}

// Writes zeroes over [offset, end) through the loop's ring; 0 or a negative errno (-ECANCELED when
// cancelled between pieces).
Task<int64_t> write_zeroes(Loop& loop, int fd, uint64_t offset, uint64_t end,
                           const CancelCheck& cancelled) {
  const std::vector<char> zeroes(std::min(kZeroChunk, end - offset));
  while (offset < end) {
    if (cancelled && cancelled()) co_return -ECANCELED;
    const auto length = static_cast<unsigned>(std::min<uint64_t>(zeroes.size(), end - offset));
    const int ret = co_await loop.write(fd, zeroes.data(), length, offset);
    if (ret == -EINTR || ret == -EAGAIN) continue;
    if (ret < 0) co_return ret;
    if (ret == 0) co_return -ENOSPC;
    offset += static_cast<uint64_t>(ret);
  }
  co_return 0;
}

// Grows the empty file to `size` with `preallocation`.
Task<Status> grow(Loop& loop, int fd, uint64_t size, Preallocation preallocation,
                  const CancelCheck& cancelled) {
  if (size > static_cast<uint64_t>(INT64_MAX)) {
    co_return Status::generic("Could not resize file: " + errno_text(-EINVAL));
  }
  switch (preallocation) {
    case Preallocation::kOff:
      if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
        co_return Status::generic("Could not resize file: " + errno_text(-errno));
      }
      if (size > 0) (void)co_await write_zeroes(loop, fd, 0, std::min(size, kFirstBlock), {});
      co_return Status::ok();
    case Preallocation::kFalloc: {
      if (size == 0) co_return Status::ok();
      int ret = co_await loop.fallocate(fd, 0, 0, size);
      if (ret == -EOPNOTSUPP) {
        // As posix_fallocate does where the file system cannot: write the zeroes.
        ret = static_cast<int>(co_await write_zeroes(loop, fd, 0, size, cancelled));
      }
      if (ret == -ECANCELED) co_return Status::generic(errno_text(ret));
      if (ret < 0) co_return Status::generic("Could not preallocate new data: " + errno_text(ret));
      (void)co_await write_zeroes(loop, fd, 0, std::min(size, kFirstBlock), {});
      co_return Status::ok();
    }
    case Preallocation::kFull: {
      // Setting the final size first lets the file system plan the allocation.
      if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
        co_return Status::generic("Could not resize file: " + errno_text(-errno));
      }
      if (size == 0) co_return Status::ok();
      const int64_t ret = co_await write_zeroes(loop, fd, 0, size, cancelled);
      if (ret == -ECANCELED) co_return Status::generic(errno_text(-ECANCELED));
      if (ret < 0) {
        co_return Status::generic("Could not write zeros for preallocation: " +
                                  errno_text(static_cast<int>(ret)));
      }
      const int synced = co_await loop.fsync(fd, false);
      if (synced < 0) co_return Status::generic("Could not flush file to disk: " + errno_text(synced));
      co_return Status::ok();
    }
    case Preallocation::kMetadata:
      break;
  }
  co_return Status::generic("Unsupported preallocation mode: metadata");
}

}  // namespace

Task<Status> create_file(FileCreateOptions options, Loop& loop, CancelCheck cancelled) {
  if (options.extent_size_hint > UINT32_MAX) {
    co_return Status::generic("Extent size hint is too large");
  }
  FileDescriptor fd(::open(options.filename.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (fd.get() < 0) {
    co_return Status::generic("Could not create '" + options.filename + "': " + errno_text(-errno));
  }
  if (Status locked = lock_for_creation(fd.get()); !locked) co_return locked;
  if (ftruncate(fd.get(), 0) != 0) {
    co_return Status::generic("Could not resize file: " + errno_text(-errno));
  }
  if (options.nocow) set_nocow(fd.get());
  if (options.extent_size_hint > 0) set_extent_size_hint(fd.get(), options.extent_size_hint);
  Status grown = co_await grow(loop, fd.get(), options.size, options.preallocation, cancelled);
  if (!grown) co_return grown;
  if (const int ret = fd.close(); ret < 0) {
    co_return Status::generic("Could not close the new file: " + errno_text(ret));
  }
  co_return Status::ok();
}

}  // namespace blockd::drivers
