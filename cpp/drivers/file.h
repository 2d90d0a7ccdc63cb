// The file driver: a block node backed by a regular file or a block device on the host.
//
// Implements QEMU 7.2's "file" protocol driver (BlockdevOptionsFile) as seen from outside: the same
// open errors, the same node size (the file length rounded up to 512 bytes, reads past the end of
// the file return zeroes), the same block status (lseek SEEK_DATA/SEEK_HOLE), and QEMU-compatible
// image locking, so that blockd and QEMU's tools (qemu-img, qemu-io, qemu-storage-daemon, QEMU
// itself) see each other's use of an image:
//
//   For each permission bit i (consistent read 0, write 1, write unchanged 2, resize 3) the node
//   holds a shared OFD lock (F_OFD_SETLK, F_RDLCK) on byte 100 + i while it holds the permission,
//   and on byte 200 + i while it does not share it. Taking permission i requires that nobody locks
//   200 + i; not sharing it requires that nobody locks 100 + i (tested with F_OFD_GETLK).
//
// Locks belong to the image's open file description, so two file nodes on one image in the same
// process conflict exactly as two processes do (as in QEMU).
//
// I/O runs on the node's loop through io_uring (aio=io_uring, and aio=native, which blockd maps to
// io_uring), or on worker threads (aio=threads) that complete back on the loop. With
// cache.direct=on the file is opened with O_DIRECT; requests whose offset, length or buffer address
// are not aligned go through aligned bounce buffers, with read-modify-write for unaligned writes
// (serialised against overlapping writes so no update is lost).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "block/node.h"
#include "runtime/loop.h"
#include "runtime/status.h"

namespace blockd::drivers {

// The members of QEMU 7.2's BlockdevOptionsFile that blockd honours. (pr-manager and
// x-check-cache-dropped are not supported; the QMP layer rejects them.)
struct FileOptions {
  // Path of the image; required.
  std::string filename;

  // How I/O is performed. QEMU's default is threads; blockd's is io_uring. kNative (Linux AIO in
  // QEMU) is served by io_uring and, as in QEMU, requires cache.direct=on.
  enum class Aio { kThreads, kNative, kIoUring };
  Aio aio = Aio::kIoUring;

  // Image locking. kAuto: on when the file system supports OFD locks, else off.
  enum class Locking { kAuto, kOn, kOff };
  Locking locking = Locking::kAuto;

  // Maximum number of requests batched into one submission (0: the loop's default). Accepted for
  // compatibility; the loop already submits once per iteration.
  int64_t aio_max_batch = 0;

  // Whether to drop the page cache when an incoming migration takes over the image. Accepted for
  // compatibility; blockd has no migration, so it has no effect.
  bool drop_cache = true;

  // Tests only: forces this request alignment (a power of two) even without O_DIRECT, so the
  // bounce-buffer path can be exercised on any file system. 0: detect (1 without O_DIRECT).
  uint32_t TEST_request_alignment = 0;
};

// Opens `options.filename` as a file node whose I/O runs on `loop`. Main loop.
//
// `common` supplies node-name, read-only (O_RDONLY), auto-read-only (fall back to read-only when
// the file cannot be opened for writing: EACCES, EROFS, EPERM), cache.direct (O_DIRECT),
// cache.no-flush (flush and FUA become no-ops) and discard ("unmap" lets discard punch holes and
// write_zeroes unmap; "ignore" makes discard a no-op).
//
// Errors (GenericError), with QEMU's texts:
//   "The 'file' block driver requires a file name"
//   "aio=native was specified, but it requires cache.direct=on, which was not specified."
//   "Could not open '<filename>': <strerror>"
//   "Could not refresh total sector count: <strerror>" (the size cannot be determined)
//   "Locking was requested but the file system does not support OFD locks" (locking=on)
//
// Permission conflicts with other processes (Node::attach) fail with QEMU's messages,
// `Failed to get "write" lock` or `Failed to get shared "write" lock` (the permission name varies).
// QEMU's command-line tools append the hint "\nIs another process using the image [<filename>]?";
// over QMP (and so here) the message has no hint; see file_lock_hint().
Expected<std::shared_ptr<block::Node>> open_file_node(block::NodeOptions common,
                                                      const FileOptions& options, Loop& loop);

// The hint QEMU prints after a lock conflict on the command line (not over QMP):
// "Is another process using the image [<filename>]?". For the daemon's CLI error output.
std::string file_lock_hint(const std::string& filename);

}  // namespace blockd::drivers
