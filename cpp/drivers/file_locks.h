// QEMU-compatible image locks on open file descriptions (private to the file driver).
//
// See file.h for the layout: for permission bit i, byte 100 + i is locked (shared, F_RDLCK) while
// the permission is held and byte 200 + i while it is not shared. Used by the file node and by
// image creation (file_create.cc), which locks the new file as QEMU's create does.
#pragma once

#include <sys/types.h>

#include <cstdint>

#include "runtime/status.h"

namespace blockd::drivers {

// Lock byte offsets (QEMU's RAW_LOCK_PERM_BASE and RAW_LOCK_SHARED_BASE).
inline constexpr off_t kPermLockBase = 100;
inline constexpr off_t kSharedLockBase = 200;
inline constexpr int kPermissionBits = 4;

// Places (F_RDLCK) or releases (F_UNLCK) this open file description's lock on one byte; 0 or a
// negative errno.
int set_lock_byte(int fd, off_t byte, short type);

// 0 when no other open file description locks `byte`; -EAGAIN when one does; another negative
// errno when the test itself fails.
int test_lock_byte(int fd, off_t byte);

// Checks that another user of the file lets us take `permissions` (block::Permission bits) while
// sharing only `shared`. Errors, in QEMU's words: `Failed to get "write" lock`,
// `Failed to get shared "write" lock` (the permission name varies).
Status check_lock_bytes(int fd, uint32_t permissions, uint32_t shared);

}  // namespace blockd::drivers
