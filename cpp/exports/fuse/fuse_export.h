// The FUSE export: a node shown as one regular file, mounted over an existing regular file, so
// that ordinary tools (dd, cp, qemu-img, fio, a database) can use it.
//
// Implements the server side of the kernel's FUSE protocol (Documentation/filesystems/fuse.rst,
// include/uapi/linux/fuse.h) through libfuse3's low-level API: libfuse mounts, negotiates INIT and
// decodes requests; blockd reads the requests from /dev/fuse itself, on the node's loop, and
// answers each one from its own coroutine, so many requests are in flight at once and none waits
// for another. See fuse_export.cc for the details.
//
// Threads: the export is created, listed and shut down on the main loop, but serves on the loop
// of its node as create() finds it: the main loop, or an iothread's when the node has been moved
// there (block-export-add iothread=...). There the reader takes the requests from /dev/fuse,
// libfuse decodes them, the handlers do the node I/O and send the replies; nothing of that runs
// on the main loop, and the main loop touches none of its state while it runs (shut_down() hops to
// the serving loop to stop it, and back). See "Threads" in fuse_export.cc.
#pragma once

#include <sys/stat.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>

#include "block/backend.h"
#include "block/node.h"
#include "exports/export.h"
#include "runtime/event.h"
#include "runtime/loop.h"
#include "runtime/status.h"
#include "runtime/task.h"

struct fuse_session;

namespace blockd::exports::fuse {

// BlockExportOptionsFuse's allow-other.
enum class AllowOther { kOff, kOn, kAuto };

struct FuseExportOptions {
  std::string id;
  // An existing regular file; the export is mounted over it.
  std::string mountpoint;
  bool writable = false;
  bool writethrough = false;
  // Writes past the end grow the node (and the resize permission is held for the export's life).
  bool growable = false;
  // kAuto: mount with allow_other when the system permits it, else without.
  AllowOther allow_other = AllowOther::kAuto;
  // Requests taken from /dev/fuse before one has been answered; each holds a buffer of a little
  // over kMaxTransfer bytes, allocated when first needed.
  uint32_t max_requests_in_flight = 64;
};

class FuseExport final : public Export {
 public:
  // The largest read or write the kernel sends in one request (its max_pages limit).
  static constexpr uint32_t kMaxTransfer = 1u << 20;

  // Checks the mountpoint, takes the node's permissions and mounts. Errors (GenericError), in
  // qemu-storage-daemon's words:
  //   "Failed to stat '<mountpoint>': <strerror>", "'<mountpoint>' is not a regular file",
  //   "Cannot export read-only node as writable", "Failed to mount FUSE session to export",
  // and permission conflicts on the node. `main` is the main loop, on which this is called; the
  // export serves on `node`'s loop (which must not change while the export exists, unless the
  // export moves it back in shut_down()).
  static Expected<std::shared_ptr<FuseExport>> create(Loop& main, const FuseExportOptions& options,
                                                     std::shared_ptr<block::Node> node);
  ~FuseExport() override;

  std::string_view type_name() const noexcept override { return "fuse"; }
  // Open files do not hold a FUSE export: removal unmounts it lazily (processes that still have
  // the file open get ENOTCONN), as in qemu-storage-daemon.
  size_t client_count() const noexcept override { return 0; }
  // Unmounts, stops reading requests, waits for the ones in flight, closes /dev/fuse and releases
  // the node; a node served in an iothread goes back to the main loop unless something else
  // still uses it. Main loop; it runs the stopping on the serving loop meanwhile.
  Task<void> shut_down() override;

  const std::string& mountpoint() const noexcept { return mountpoint_; }

  // The request handlers (called by libfuse from process(); they reply themselves, possibly
  // later). Public only so that fuse_export.cc's libfuse callbacks can reach them.
  struct Slot;
  struct Handlers;

 private:
  FuseExport(Loop& main, Loop& serving, const FuseExportOptions& options, std::string node_name);
  Status mount(bool allow_other);
  // A helper process (sh, then fusermount3 -u -z) that unmounts the file should this process die
  // without unmounting it (SIGKILL, a crash). Nothing when fusermount3 is not installed.
  void start_watchdog() noexcept;
  void stop_watchdog() noexcept;
  // Reads the requests from /dev/fuse and hands them to libfuse, until the export stops.
  Task<void> reader();
  Slot* take_slot() noexcept;
  void release_slot(Slot* slot) noexcept;
  void fill_stat(struct stat& st) const noexcept;
  // Remembers the unique id of an INIT request, and whether the kernel offers passthrough.
  void note_init(const uint8_t* request, size_t length) noexcept;
  // How an OPEN with these flags is answered (see "Passthrough" in fuse_export.cc): with the
  // backing id of the node's host file (registered on first use), or 0 when there is none; and
  // whether the kernel reads that file itself for this open.
  struct Passthrough {
    int32_t backing_id = 0;
    bool kernel_reads = false;
  };
  Passthrough passthrough_for(int open_flags) noexcept;
  void close_backing() noexcept;
  // Reads [offset, offset + length) of the node into `buffer`: in pieces, all in flight at once,
  // when it is long and no other read is in progress (see "Large reads" in fuse_export.cc).
  // Returns 0 or the first piece's error (negative errno).
  Task<int64_t> read_node(uint64_t offset, uint64_t length, uint8_t* buffer) noexcept;
  // Resizes the node to `size`, one resize at a time; takes the resize permission for the
  // duration when the export does not hold it (on the main loop, where permissions change).
  Task<int64_t> resize(uint64_t size, bool only_grow) noexcept;
  // fallocate mode 0 inside the node: fills the holes of the range with allocated zeroes.
  Task<int64_t> allocate(uint64_t offset, uint64_t length) noexcept;

  Loop& main_;
  Loop* loop_;  // the serving loop
  std::string mountpoint_;
  bool writable_;
  bool growable_;
  uint32_t max_slots_;
  std::unique_ptr<block::BlockBackend> backend_;
  fuse_session* session_ = nullptr;
  int fd_ = -1;
  bool mounted_ = false;
  pid_t watchdog_pid_ = -1;
  int watchdog_pipe_ = -1;  // write end; the watchdog reads the other

  // Passthrough: the INIT request whose reply is still to go out (0: none), whether the kernel
  // offered passthrough and whether the export accepted it, and the registered host file.
  uint64_t init_unique_ = 0;
  bool passthrough_offered_ = false;
  bool passthrough_ = false;
  bool backing_failed_ = false;
  int32_t backing_id_ = 0;
  dev_t backing_dev_ = 0;
  ino_t backing_ino_ = 0;

  // File attributes the kernel may change with setattr (chmod, chown, touch).
  mode_t mode_;
  uid_t uid_;
  gid_t gid_;
  timespec atime_{};
  timespec mtime_{};
  timespec ctime_{};

  // Request buffers: `slots_` owns them, `free_` lists those not held by a request.
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<Slot*> free_;
  Slot* current_ = nullptr;  // the buffer of the request being decoded by libfuse
  bool current_taken_ = false;
  uint32_t handlers_ = 0;  // requests being answered by a coroutine
  Event progress_;         // a handler finished, a slot came free, or the reader stopped
  // The reader's poll of /dev/fuse while it waits for requests; cancelled when the export shuts
  // down.
  Completion* pending_poll_ = nullptr;
  bool reading_ = false;  // the reader is running
  bool stopping_ = false;

  // Resizes one at a time; plain allocation (fallocate mode 0) waits for in-flight writes and
  // holds new ones back, so that filling holes with zeroes cannot overwrite fresh data.
  bool resizing_ = false;
  Event resize_done_;
  uint32_t reads_ = 0;  // reads of the node in progress (read_node())
  uint32_t writes_ = 0;
  bool allocating_ = false;
  Event writes_changed_;
};

}  // namespace blockd::exports::fuse
