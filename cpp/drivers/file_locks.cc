#include "drivers/file_locks.h"

#include <fcntl.h>

#include <cerrno>
#include <string>

#include "block/node.h"

namespace blockd::drivers {
namespace {

Status lock_error(int error, std::string message) {
  if (error != -EAGAIN) message += ": " + errno_text(error);
  return Status::generic(std::move(message));
}

}  // namespace

int set_lock_byte(int fd, off_t byte, short type) {
  struct flock lock {};
  lock.l_whence = SEEK_SET;
  lock.l_start = byte;
  lock.l_len = 1;
  lock.l_type = type;
  return fcntl(fd, F_OFD_SETLK, &lock) == -1 ? -errno : 0;
}

int test_lock_byte(int fd, off_t byte) {
  struct flock lock {};
  lock.l_whence = SEEK_SET;
  lock.l_start = byte;
  lock.l_len = 1;
  lock.l_type = F_WRLCK;
  if (fcntl(fd, F_OFD_GETLK, &lock) == -1) return -errno;
  return lock.l_type == F_UNLCK ? 0 : -EAGAIN;
}

Status check_lock_bytes(int fd, uint32_t permissions, uint32_t shared) {
  for (int bit = 0; bit < kPermissionBits; ++bit) {
    const uint32_t mask = 1u << bit;
    if (!(permissions & mask)) continue;
    if (int ret = test_lock_byte(fd, kSharedLockBase + bit)) {
      return lock_error(ret, "Failed to get \"" + block::permission_names(mask) + "\" lock");
    }
  }
  for (int bit = 0; bit < kPermissionBits; ++bit) {
    const uint32_t mask = 1u << bit;
    if (shared & mask) continue;
    if (int ret = test_lock_byte(fd, kPermLockBase + bit)) {
      return lock_error(ret, "Failed to get shared \"" + block::permission_names(mask) + "\" lock");
    }
  }
  return Status::ok();
}

}  // namespace blockd::drivers
