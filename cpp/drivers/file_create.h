// Creating image files on the host: blockdev-create for the file driver.
//
// Follows QEMU 7.2's file creation as seen from outside: the file is created (or opened) with mode
// 0644, locked as a user that writes and resizes and lets nobody else resize, emptied, given the
// nocow attribute and extent size hint where the file system supports them, and then grown to its
// size with the requested preallocation.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "drivers/create.h"
#include "runtime/loop.h"
#include "runtime/status.h"
#include "runtime/task.h"

namespace blockd::drivers {

struct FileCreateOptions {
  std::string filename;
  uint64_t size = 0;
  // kMetadata is refused (after the file was created and emptied, as in QEMU): a file has no
  // metadata to preallocate.
  Preallocation preallocation = Preallocation::kOff;
  // Set FS_NOCOW_FL (btrfs); silently skipped where the file system has no such flag.
  bool nocow = false;
  // Extent size hint for XFS (0: none). Silently skipped where the file system has none.
  uint64_t extent_size_hint = 1u << 20;
};

// Creates `options.filename` on `loop` (the caller's loop; preallocation runs through its ring, so
// the loop keeps serving other work). Stops early when `cancelled()` turns true during a long
// preallocation (the file then stays, partly allocated).
//
// Errors (GenericError), with QEMU's texts:
//   "Extent size hint is too large"                 (more than 4 GiB - 1)
//   "Unsupported preallocation mode: metadata"
//   "Could not create '<filename>': <strerror>"
//   `Failed to get "resize" lock` and the like       (another process uses the file)
//   "Could not resize file: <strerror>"
//   "Could not preallocate new data: <strerror>"    (falloc)
//   "Could not write zeros for preallocation: <strerror>", "Could not flush file to disk: ..."
//   "Operation canceled"                            (cancelled during preallocation)
Task<Status> create_file(FileCreateOptions options, Loop& loop, CancelCheck cancelled);

}  // namespace blockd::drivers
