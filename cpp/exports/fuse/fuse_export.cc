// The FUSE export over libfuse3's low-level API (see fuse_export.h).
//
// The file system has one inode, the root, which is the regular file over which it is mounted.
// Operations (FUSE opcodes of include/uapi/linux/fuse.h): GETATTR, SETATTR (size: resize when
// writable; mode, owner and times are kept in memory), OPEN (direct I/O, parallel direct writes),
// READ, WRITE, FSYNC (flush), FALLOCATE, LSEEK (SEEK_DATA/SEEK_HOLE from block status). The rest
// gets libfuse's default replies (ENOSYS, or success for RELEASE and the like).
//
// Request flow. libfuse mounts and handles INIT, but the requests are read here, by one reader
// coroutine on the export's loop: /dev/fuse is made non-blocking, and the reader reads every
// pending request (up to kReadBatch at a time) with plain read(2) calls, each into a buffer of its
// own ("slot"), then waits for more with one io_uring poll. So one wake-up hands the loop every
// request that has queued up meanwhile, for one poll and one read(2) per request, without worker
// threads (an io_uring read of /dev/fuse, which has no FMODE_NOWAIT, costs a poll of its own per
// request, and blocks a worker thread when another read took the request first). Each request is
// handed to libfuse's decoder (fuse_session_process_buf), which calls the handlers below; those
// that need the node start a coroutine that replies when the node has answered, and keep the slot
// while they run. So up to max_requests_in_flight requests proceed at once, with no lock and no
// thread of our own.
//
// Threads. The serving loop is the node's: the main loop, or an iothread's once block-export-add
// iothread=... has moved the node there (the QMP handler moves it before create(), so the export
// never changes loops while it runs). Everything above happens on that loop alone: the reader,
// libfuse's decoding and its replies, the handlers, the node I/O and the export's request state.
// The main loop only creates the export (mount, permissions), lists it (immutable fields) and
// shuts it down: shut_down() hops to the serving loop to unmount, stop the reader and wait for
// the handlers, and comes back for the graph work (moving the node back, detaching). The one
// graph change a request makes, borrowing the resize permission for a truncate, hops to the main
// loop for the permission update and back. Post() orders each hop after what came before it on
// the other thread, so no state is shared without that order. The node's host_file() and
// allocated_size() (passthrough, GETATTR) are called on the serving loop: they only read what the
// node fixed when it opened (its descriptor), and a node in an iothread gets no other parent.
//
// Replies. READ and WRITE replies are written to /dev/fuse through io_uring too, not with a
// write(2) each: the replies of one loop iteration then reach the kernel in one io_uring_enter,
// which wakes the clients together instead of handing the CPU to a client after every reply (on
// a small machine the loop otherwise loses its CPU to the client it has just woken). libfuse still
// sends the rare error and metadata replies itself.
//
// Copies. A slot is 1 MiB + 8 KiB, page aligned. The kernel writes a request so that the payload
// of a WRITE (after the 80-byte fuse_in_header + fuse_write_in) starts on a page boundary, and the
// node writes straight from there; a READ's data is read into the same slot (its request has been
// decoded by then) and sent from there. Files are opened with FOPEN_DIRECT_IO so that the page
// cache neither copies nor delays anything and every read reaches the node.
//
// Large reads. With FOPEN_DIRECT_IO the kernel turns a synchronous read (pread: psync, dd) into
// one request per max_read bytes and sends them one after the other, so a 1 MiB pread is a
// single request here and its caller waits for all of it; handed to the node whole, it reaches a
// disk as one 1 MiB request at queue depth 1. So a READ longer than kPieceBytes that arrives
// while no other read is in progress goes to the node as pieces of at most kPieceBytes (cut on
// multiples of kPieceBytes in the node), all in flight at once, and is answered when the last
// has finished, with the first error if any failed. A client that keeps several requests in
// flight gives the node that parallelism itself. On this project's virtual disk the pieces did
// about as well as whole requests when the disk was otherwise idle and up to twice as well when
// other I/O competed for it. WRITEs stay whole: in pieces they cost io_uring writes at queue
// depth 8 some 15% on an idle disk. What remains between a synchronous 1 MiB read here and one
// on the image itself is the copy of the reply into the caller's pages and two more wake-ups.
// Letting the kernel split such requests instead (no FOPEN_DIRECT_IO for O_DIRECT opens, which
// then take its asynchronous direct I/O path, with a smaller max_read/max_write) did no better:
// each piece costs a FUSE round trip of its own.
//
// Large writes. A WRITE reaches us whole (up to max_write, kMaxTransfer): the kernel copies its
// payload from the writer's pages into the slot inside read(2), some 200-250 us per MiB here,
// and only then can the node write start. The reader hands the node write of a large WRITE to the
// kernel as soon as libfuse has decoded it (Loop::submit_now), not after the rest of the batch,
// so with several writes queued the disk starts on the first while the next is being copied:
// io_uring 1 MiB writes at QD8 went from a median 601 to 793 MiB/s (direct on the image: 880).
// For a synchronous writer (psync, QD1) there is nothing to overlap: each 1 MiB pwrite costs the
// copy, the disk write and two wake-ups in a row. Letting the kernel cut such writes into pieces
// sent all at once (no FOPEN_DIRECT_IO for O_DIRECT writers, which then take its asynchronous
// direct I/O path, with a 256 KiB max_write and each piece submitted at once) did overlap copy
// and disk, and gained about 10% on psync 1 MiB writes, but that path holds the inode lock for
// a synchronous write's whole round trip, which made 16 psync 4 KiB writers some five times
// slower; it also mixes badly with passthrough (the kernel refuses one inode both kinds of open).
//
// Passthrough. Kernels with FUSE passthrough (protocol 7.40, Linux 6.9) can serve the reads of an
// open file from a host file themselves, without a request to us: the server registers the host
// file on /dev/fuse (ioctl FUSE_DEV_IOC_BACKING_OPEN, which needs CAP_SYS_ADMIN) and names the
// backing id it got in its OPEN reply (FOPEN_PASSTHROUGH); the kernel then opens that file anew
// for the open file, with the caller's open flags, and reads, splices and maps it directly. The
// kernel reads the image itself only where that is exactly what the export's own path does:
//   - read-only opens: writes stay here (growable, the node's size, write permission);
//   - a node whose bytes are a host file's, unchanged and from offset 0 (Node::host_file: a
//     `file` node, or `raw` without offset or size over one), when the file is exactly as long
//     as the node (the node counts whole sectors) and is the one first registered;
//   - with the node's own caching: an O_DIRECT open on a cache.direct=on node (the caller then
//     reads the image with O_DIRECT, whose alignment rules apply, where this path would bounce
//     unaligned requests), a buffered open on a cache.direct=off node (the image's page cache,
//     which the node uses too). Never the page cache for a cache.direct=on node.
// The kernel wants every open of an inode that has a passthrough open to be a passthrough open as
// well (it fails others with EIO), so on such a node every other open names the backing file too,
// but with FOPEN_DIRECT_IO, which takes precedence for read and write: those still come here.
// What the kernel does not leave to FOPEN_DIRECT_IO is mmap, which then maps the image itself
// (through its page cache) instead of failing for MAP_SHARED. Nodes of other kinds, and every
// open when the kernel did not offer passthrough or the registration failed (EPERM without
// CAP_SYS_ADMIN, ELOOP on stacked file systems), take the path above. libfuse 3.14 predates
// passthrough: its INIT reply is amended on the way out (a custom writev), and the OPEN reply is
// built here.
// Caveats: a file opened in passthrough mode does not depend on this process. It keeps reading
// the image after block-export-del (which only unmounts), and even after the daemon is gone, until
// it is closed. And while one is open, opens fail with EIO once the export's node has been
// replaced by one that is not the same host file.
#define FUSE_USE_VERSION 312

#include "exports/fuse/fuse_export.h"

#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <poll.h>
#include <linux/fuse.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstddef>
#include <cstring>
#include <string>
#include <thread>

extern char** environ;

#include "exports/fuse/policy.h"
#include "runtime/hop.h"
#include "runtime/join.h"

namespace blockd::exports::fuse {

namespace {

constexpr size_t kPage = 4096;
// fuse_in_header (40 bytes) + fuse_write_in (40 bytes): where a WRITE's payload starts.
constexpr size_t kWriteHeader = sizeof(fuse_in_header) + sizeof(fuse_write_in);
// What one read(2) of /dev/fuse may return: the kernel needs room for a header plus max_write.
constexpr size_t kRequestRoom = FuseExport::kMaxTransfer + kPage;
constexpr size_t kSlotBytes = FuseExport::kMaxTransfer + 2 * kPage;
// Reads longer than this reach the node in pieces, all in flight at once (see "Large reads"
// above). 256 KiB: 128 KiB pieces did worse in our runs.
constexpr uint64_t kPieceBytes = 256 * 1024;
// A WRITE at least this long has its node write handed to the kernel as soon as it is decoded.
constexpr size_t kSubmitAtOnce = 128 * 1024;
// Requests the reader takes from /dev/fuse in one go before it lets the loop run other work.
constexpr size_t kReadBatch = 32;
// How long the kernel may cache the file's attributes. Every change goes through this export,
// whose replies update the kernel's copy, so caching them is safe.
constexpr double kAttrTimeout = 1.0;

// Passthrough (protocol 7.40), which this system's linux/fuse.h may predate.
constexpr uint64_t kInitPassthrough = uint64_t{1} << 37;  // FUSE_PASSTHROUGH, in INIT flags2
constexpr uint32_t kOpenPassthrough = 1u << 7;            // FOPEN_PASSTHROUGH
// The stack depth the export claims (fuse_init_out.max_stack_depth): 1, so that host files on
// stacked file systems (overlayfs) are refused and the mount itself may still sit under one.
constexpr uint32_t kMaxStackDepth = 1;
struct BackingMap {  // struct fuse_backing_map
  int32_t fd;
  uint32_t flags;
  uint64_t padding;
};
constexpr unsigned long kIocBackingOpen = _IOW(229, 1, BackingMap);  // FUSE_DEV_IOC_BACKING_OPEN
constexpr unsigned long kIocBackingClose = _IOW(229, 2, uint32_t);   // FUSE_DEV_IOC_BACKING_CLOSE

timespec now() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

// The path of fusermount3 on PATH (or in /usr/bin, /bin), or "".
std::string find_fusermount() {
  const char* path = std::getenv("PATH");
  const std::string directories = path ? std::string(path) + ":/usr/bin:/bin" : "/usr/bin:/bin";
  size_t start = 0;
  while (start < directories.size()) {
    const size_t end = std::min(directories.find(':', start), directories.size());
    if (end > start) {
      const std::string candidate = directories.substr(start, end - start) + "/fusermount3";
      if (access(candidate.c_str(), X_OK) == 0) return candidate;
    }
    start = end + 1;
  }
  return "";
}

}  // namespace

struct FuseExport::Slot {
  explicit Slot(uint8_t* block) : memory(block) {}
  ~Slot() { std::free(memory); }
  Slot(const Slot&) = delete;
  Slot& operator=(const Slot&) = delete;
  uint8_t* request() const noexcept { return memory + kPage - kWriteHeader; }
  uint8_t* data() const noexcept { return memory + kPage; }
  uint8_t* memory;
};

// The libfuse callbacks and the coroutines that answer them.
struct FuseExport::Handlers {
  static FuseExport& self(fuse_req_t req) {
    return *static_cast<FuseExport*>(fuse_req_userdata(req));
  }

  // Starts a coroutine that answers a request; the export waits for it before going away.
  static void start(FuseExport& e, Task<void> task) {
    ++e.handlers_;
    e.loop_->spawn([](FuseExport& owner, Task<void> inner) -> Task<void> {
      co_await std::move(inner);
      --owner.handlers_;
      owner.progress_.notify_all();
    }(e, std::move(task)));
  }

  // The current request keeps its buffer until `release_slot`.
  static Slot* keep_slot(FuseExport& e) {
    e.current_taken_ = true;
    return e.current_;
  }

  static void init(void*, fuse_conn_info* conn) {
    conn->max_write = kMaxTransfer;
    conn->max_read = kMaxTransfer;  // must match the max_read mount option
    // Direct I/O requests from an asynchronous submitter (io_uring, libaio) stay asynchronous.
    if (conn->capable & FUSE_CAP_ASYNC_DIO) conn->want |= FUSE_CAP_ASYNC_DIO;
    conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE |
                    FUSE_CAP_WRITEBACK_CACHE);
    // Asynchronous direct I/O travels as background requests; the default limit (12) would cap
    // the queue depth clients can reach.
    conn->max_background = 128;
    conn->congestion_threshold = 96;
  }

  static void getattr(fuse_req_t req, fuse_ino_t, fuse_file_info*) {
    struct stat st;
    self(req).fill_stat(st);
    fuse_reply_attr(req, &st, kAttrTimeout);
  }

  static void setattr(fuse_req_t req, fuse_ino_t, struct stat* attr, int to_set,
                      fuse_file_info*) {
    FuseExport& e = self(req);
    if (to_set & FUSE_SET_ATTR_MODE) {
      if ((attr->st_mode & S_IFMT) != 0 && (attr->st_mode & S_IFMT) != S_IFREG) {
        fuse_reply_err(req, EINVAL);
        return;
      }
      // The mode tells whether the file is writable; it cannot promise what the export refuses.
      if (!e.writable_ && (attr->st_mode & 0222)) {
        fuse_reply_err(req, EROFS);
        return;
      }
    }
    if ((to_set & FUSE_SET_ATTR_SIZE) && !e.writable_) {
      fuse_reply_err(req, EACCES);
      return;
    }
    start(e, finish_setattr(e, req, *attr, to_set));
  }

  static Task<void> finish_setattr(FuseExport& e, fuse_req_t req, struct stat attr, int to_set) {
    if (to_set & FUSE_SET_ATTR_SIZE) {
      const int64_t ret = co_await e.resize(static_cast<uint64_t>(attr.st_size), false);
      if (ret < 0) {
        fuse_reply_err(req, fuse_errno(ret));
        co_return;
      }
      e.mtime_ = now();
    }
    if (to_set & FUSE_SET_ATTR_MODE) e.mode_ = attr.st_mode & 07777;
    if (to_set & FUSE_SET_ATTR_UID) e.uid_ = attr.st_uid;
    if (to_set & FUSE_SET_ATTR_GID) e.gid_ = attr.st_gid;
    if (to_set & FUSE_SET_ATTR_ATIME) e.atime_ = attr.st_atim;
    if (to_set & FUSE_SET_ATTR_ATIME_NOW) e.atime_ = now();
    if (to_set & FUSE_SET_ATTR_MTIME) e.mtime_ = attr.st_mtim;
    if (to_set & FUSE_SET_ATTR_MTIME_NOW) e.mtime_ = now();
    e.ctime_ = now();
    struct stat st;
    e.fill_stat(st);
    fuse_reply_attr(req, &st, kAttrTimeout);
  }

  static void open(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
    FuseExport& e = self(req);
    // The kernel checks the mode, but not for root: refuse writing through a read-only export.
    if ((fi->flags & O_ACCMODE) != O_RDONLY && !e.writable_) {
      fuse_reply_err(req, EACCES);
      return;
    }
    // libfuse 3.14 has no field for FOPEN_PARALLEL_DIRECT_WRITES nor for passthrough, so the
    // reply is built here.
    fuse_open_out out{};
    out.fh = 0;
    out.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
    const Passthrough passthrough = e.passthrough_for(fi->flags);
    if (passthrough.backing_id > 0) {
      out.padding = static_cast<uint32_t>(passthrough.backing_id);  // backing_id since 7.40
      // Without FOPEN_DIRECT_IO the kernel reads the image itself; with it, reads and writes
      // still come here (see "Passthrough" above).
      out.open_flags = passthrough.kernel_reads
                           ? kOpenPassthrough
                           : kOpenPassthrough | FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
    }
    iovec iov{&out, sizeof out};
    fuse_reply_iov(req, &iov, 1);
  }

  // The header's `unique`, which a reply must carry.
  static uint64_t unique_of(const Slot* slot) {
    return reinterpret_cast<const fuse_in_header*>(slot->request())->unique;
  }

  // Sends a successful reply, `head` then `data`, through io_uring (see "Replies" above); libfuse
  // only frees its record of the request.
  static Task<void> reply(FuseExport& e, fuse_req_t req, uint64_t unique, const void* head,
                          size_t head_size, const void* data, size_t data_size) {
    fuse_out_header header{};
    header.len = static_cast<uint32_t>(sizeof header + head_size + data_size);
    header.unique = unique;
    iovec parts[3] = {{&header, sizeof header},
                      {const_cast<void*>(head), head_size},
                      {const_cast<void*>(data), data_size}};
    fuse_reply_none(req);
    // Errors need no answer: ENOENT means the request was interrupted meanwhile, ENODEV that the
    // connection has gone.
    (void)co_await e.loop_->writev(e.fd_, parts, 3, 0);
  }

  static void read(fuse_req_t req, fuse_ino_t, size_t size, off_t offset, fuse_file_info*) {
    FuseExport& e = self(req);
    Slot* slot = keep_slot(e);
    start(e, finish_read(e, req, slot, unique_of(slot), size, static_cast<uint64_t>(offset)));
  }

  static Task<void> finish_read(FuseExport& e, fuse_req_t req, Slot* slot, uint64_t unique,
                                size_t size, uint64_t offset) {
    const uint64_t node_size = static_cast<uint64_t>(e.backend_->size());
    const uint64_t length =
        offset >= node_size
            ? 0
            : std::min<uint64_t>({size, node_size - offset, uint64_t{kMaxTransfer}});
    const int64_t ret =
        length ? co_await e.read_node(offset, length, slot->data()) : int64_t{0};
    if (ret < 0) {
      fuse_reply_err(req, fuse_errno(ret));
    } else {
      co_await reply(e, req, unique, nullptr, 0, slot->data(), length);
    }
    e.release_slot(slot);
  }

  static void write(fuse_req_t req, fuse_ino_t, const char* buffer, size_t size, off_t offset,
                    fuse_file_info*) {
    FuseExport& e = self(req);
    if (!e.writable_) {
      fuse_reply_err(req, EACCES);
      return;
    }
    Slot* slot = keep_slot(e);
    start(e, finish_write(e, req, slot, unique_of(slot), buffer, size,
                          static_cast<uint64_t>(offset)));
  }

  static Task<void> finish_write(FuseExport& e, fuse_req_t req, Slot* slot, uint64_t unique,
                                 const char* buffer, size_t size, uint64_t offset) {
    while (e.allocating_) co_await e.writes_changed_.wait();
    ++e.writes_;
    WritePlan plan =
        plan_write(offset, size, static_cast<uint64_t>(e.backend_->size()), e.growable_);
    if (plan.error == 0 && plan.grow_to != 0) {
      const int64_t ret = co_await e.resize(plan.grow_to, true);
      if (ret < 0) plan.error = fuse_errno(ret);
    }
    if (plan.error == 0 && plan.length != 0) {
      const int64_t ret = co_await e.backend_->write(offset, plan.length, buffer, 0);
      if (ret < 0) plan.error = fuse_errno(ret);
    }
    if (--e.writes_ == 0 && e.writes_changed_.has_waiters()) e.writes_changed_.notify_all();
    if (plan.error != 0) {
      fuse_reply_err(req, plan.error);
    } else {
      e.mtime_ = e.ctime_ = now();
      fuse_write_out out{};
      out.size = static_cast<uint32_t>(plan.length);
      co_await reply(e, req, unique, &out, sizeof out, nullptr, 0);
    }
    e.release_slot(slot);
  }

  static void fsync(fuse_req_t req, fuse_ino_t, int, fuse_file_info*) {
    FuseExport& e = self(req);
    start(e, [](FuseExport& owner, fuse_req_t request) -> Task<void> {
      const int64_t ret = co_await owner.backend_->flush();
      fuse_reply_err(request, ret < 0 ? fuse_errno(ret) : 0);
    }(e, req));
  }

  static void fallocate(fuse_req_t req, fuse_ino_t, int mode, off_t offset, off_t length,
                        fuse_file_info*) {
    FuseExport& e = self(req);
    if (!e.writable_) {
      fuse_reply_err(req, EACCES);
      return;
    }
    if (offset < 0 || length <= 0) {
      fuse_reply_err(req, EINVAL);
      return;
    }
    start(e, finish_fallocate(e, req, mode, static_cast<uint64_t>(offset),
                              static_cast<uint64_t>(length)));
  }

  static Task<void> finish_fallocate(FuseExport& e, fuse_req_t req, int mode, uint64_t offset,
                                     uint64_t length) {
    const FallocatePlan plan =
        plan_fallocate(mode, offset, length, static_cast<uint64_t>(e.backend_->size()), true);
    int64_t ret = plan.kind == FallocatePlan::Kind::kRefuse ? -plan.error : 0;
    if (ret == 0 && plan.grow_to != 0) ret = co_await e.resize(plan.grow_to, true);
    if (ret == 0 && plan.length != 0) {
      if (plan.kind == FallocatePlan::Kind::kZeroes) {
        const uint32_t flags = plan.may_unmap ? uint32_t{block::kRequestMayUnmap} : 0u;
        ret = co_await e.backend_->write_zeroes(plan.offset, plan.length, flags);
      } else {
        ret = co_await e.allocate(plan.offset, plan.length);
      }
    }
    if (ret >= 0) e.mtime_ = e.ctime_ = now();
    fuse_reply_err(req, ret < 0 ? fuse_errno(ret) : 0);
  }

  static void lseek(fuse_req_t req, fuse_ino_t, off_t offset, int whence, fuse_file_info*) {
    FuseExport& e = self(req);
    if (offset < 0) {
      fuse_reply_err(req, ENXIO);
      return;
    }
    start(e, [](FuseExport& owner, fuse_req_t request, uint64_t from, int how) -> Task<void> {
      const int64_t ret = co_await seek(*owner.backend_, from, how);
      if (ret < 0) {
        fuse_reply_err(request, fuse_errno(ret));
      } else {
        fuse_reply_lseek(request, static_cast<off_t>(ret));
      }
    }(e, req, static_cast<uint64_t>(offset), whence));
  }

  // libfuse's writes to /dev/fuse (a fuse_custom_io writev). The INIT reply accepts passthrough
  // when the kernel offered it; every reply goes out unchanged otherwise.
  static ssize_t send(int fd, iovec* iov, int count, void* userdata) {
    auto& e = *static_cast<FuseExport*>(userdata);
    if (e.init_unique_ == 0 || count != 2 || iov[0].iov_len != sizeof(fuse_out_header) ||
        static_cast<const fuse_out_header*>(iov[0].iov_base)->unique != e.init_unique_) {
      return ::writev(fd, iov, count);
    }
    e.init_unique_ = 0;
    const auto& header = *static_cast<const fuse_out_header*>(iov[0].iov_base);
    // From protocol 7.23 on the reply is a whole fuse_init_out, flags2 and max_stack_depth too.
    if (header.error != 0 || !e.passthrough_offered_ || iov[1].iov_len != sizeof(fuse_init_out)) {
      return ::writev(fd, iov, count);
    }
    fuse_init_out out;
    std::memcpy(&out, iov[1].iov_base, sizeof out);
    out.flags |= FUSE_INIT_EXT;
    out.flags2 |= static_cast<uint32_t>(kInitPassthrough >> 32);
    out.unused[0] = kMaxStackDepth;  // max_stack_depth since 7.40
    iovec patched[2] = {iov[0], {&out, sizeof out}};
    const ssize_t written = ::writev(fd, patched, 2);
    if (written >= 0) e.passthrough_ = true;
    return written;
  }

  static ssize_t receive(int fd, void* buffer, size_t length, void*) {
    return ::read(fd, buffer, length);
  }

  static const fuse_lowlevel_ops& operations() {
    static const fuse_lowlevel_ops ops = [] {
      fuse_lowlevel_ops table{};
      table.init = init;
      table.getattr = getattr;
      table.setattr = setattr;
      table.open = open;
      table.read = read;
      table.write = write;
      table.fsync = fsync;
      table.fallocate = fallocate;
      table.lseek = lseek;
      return table;
    }();
    return ops;
  }
};

// ---- FuseExport.

FuseExport::FuseExport(Loop& main, Loop& serving, const FuseExportOptions& options,
                       std::string node_name)
    : Export(options.id, std::move(node_name)),
      main_(main),
      loop_(&serving),
      mountpoint_(options.mountpoint),
      writable_(options.writable),
      growable_(options.growable),
      max_slots_(std::max<uint32_t>(1, options.max_requests_in_flight)),
      backend_(std::make_unique<block::BlockBackend>("block export '" + options.id + "'")),
      mode_(options.writable ? 0600 : 0400),
      uid_(getuid()),
      gid_(getgid()) {
  atime_ = mtime_ = ctime_ = now();
}

FuseExport::~FuseExport() {
  stop_watchdog();
  if (session_ != nullptr) {
    close_backing();
    if (mounted_) fuse_session_unmount(session_);
    fuse_session_destroy(session_);
  }
}

Expected<std::shared_ptr<FuseExport>> FuseExport::create(Loop& main,
                                                         const FuseExportOptions& options,
                                                         std::shared_ptr<block::Node> node) {
  if (options.writable && node->read_only()) {
    return Status::generic("Cannot export read-only node as writable");
  }
  struct stat st;
  if (stat(options.mountpoint.c_str(), &st) != 0) {
    return Status::generic("Failed to stat '" + options.mountpoint + "': " + errno_text(-errno));
  }
  if (!S_ISREG(st.st_mode)) {
    return Status::generic("'" + options.mountpoint + "' is not a regular file");
  }
  std::shared_ptr<FuseExport> created(
      new FuseExport(main, node->loop(), options, node->node_name()));
  // As qemu-storage-daemon: consistent reads, writes when writable, resize when growable, and
  // everything shared.
  const uint32_t permissions = block::kPermConsistentRead |
                               (options.writable ? block::kPermWrite : 0u) |
                               (options.growable ? block::kPermResize : 0u);
  BLOCKD_RETURN_IF_ERROR(created->backend_->attach(std::move(node), permissions, block::kPermAll));
  created->backend_->set_writethrough(options.writethrough);

  Status mounted = Status::generic("Failed to mount FUSE session to export");
  if (options.allow_other != AllowOther::kOff) mounted = created->mount(true);
  if (!mounted.is_ok() && options.allow_other != AllowOther::kOn) mounted = created->mount(false);
  if (!mounted.is_ok()) {
    created->backend_->detach();
    return mounted;
  }
  // The reader starts on the serving loop; shut_down() hops there after it (post keeps the order),
  // so the export is still alive when it runs.
  created->reading_ = true;
  FuseExport* self = created.get();
  self->loop_->spawn_or_post([self] { return self->reader(); });
  return created;
}

Status FuseExport::mount(bool allow_other) {
  std::string mount_options = "max_read=" + std::to_string(kMaxTransfer) + ",default_permissions";
  if (allow_other) mount_options += ",allow_other";
  char program[] = "blockd";
  char dash_o[] = "-o";
  char* argv[] = {program, dash_o, mount_options.data(), nullptr};
  fuse_args args = FUSE_ARGS_INIT(3, argv);
  const fuse_lowlevel_ops& ops = Handlers::operations();
  fuse_session* session = fuse_session_new(&args, &ops, sizeof ops, this);
  fuse_opt_free_args(&args);
  if (session == nullptr || fuse_session_mount(session, mountpoint_.c_str()) != 0) {
    if (session != nullptr) fuse_session_destroy(session);
    return Status::generic("Failed to mount FUSE session to export");
  }
  session_ = session;
  fd_ = fuse_session_fd(session);
  // libfuse's replies pass through Handlers::send (for the INIT reply; see "Passthrough"). Without
  // it the export works as before, only without passthrough.
  fuse_custom_io io{};
  io.writev = Handlers::send;
  io.read = Handlers::receive;
  (void)fuse_session_custom_io(session, &io, fd_);
  // The reader reads until EAGAIN (libfuse itself never reads: it only unmounts).
  const int flags = fcntl(fd_, F_GETFL);
  if (flags >= 0) (void)fcntl(fd_, F_SETFL, flags | O_NONBLOCK);
  mounted_ = true;
  start_watchdog();
  return Status::ok();
}

void FuseExport::start_watchdog() noexcept {
  const std::string fusermount = find_fusermount();
  if (fusermount.empty()) return;
  int ends[2];
  if (pipe2(ends, O_CLOEXEC) != 0) return;
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, ends[0], STDIN_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  // The helper waits for end of file on its stdin, which comes when every copy of the pipe's
  // write end is closed: when this process is gone, however it went.
  const std::string script = "read -r line; exec \"$0\" -u -z -- \"$1\"";
  char shell[] = "/bin/sh";
  char dash_c[] = "-c";
  std::string zero = fusermount;
  std::string one = mountpoint_;
  std::string body = script;
  char* argv[] = {shell, dash_c, body.data(), zero.data(), one.data(), nullptr};
  pid_t pid = -1;
  const int spawned = posix_spawn(&pid, shell, &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(ends[0]);
  if (spawned != 0) {
    ::close(ends[1]);
    return;
  }
  watchdog_pid_ = pid;
  watchdog_pipe_ = ends[1];
}

void FuseExport::stop_watchdog() noexcept {
  if (watchdog_pid_ > 0) {
    kill(watchdog_pid_, SIGKILL);
    while (waitpid(watchdog_pid_, nullptr, 0) < 0 && errno == EINTR) {
    }
    watchdog_pid_ = -1;
  }
  if (watchdog_pipe_ >= 0) {
    ::close(watchdog_pipe_);
    watchdog_pipe_ = -1;
  }
}

FuseExport::Slot* FuseExport::take_slot() noexcept {
  if (!free_.empty()) {
    Slot* slot = free_.back();
    free_.pop_back();
    return slot;
  }
  if (slots_.size() >= max_slots_) return nullptr;
  auto* memory = static_cast<uint8_t*>(std::aligned_alloc(kPage, kSlotBytes));
  if (memory == nullptr) return nullptr;
  slots_.push_back(std::make_unique<Slot>(memory));
  return slots_.back().get();
}

void FuseExport::release_slot(Slot* slot) noexcept {
  free_.push_back(slot);
  if (progress_.has_waiters()) progress_.notify_all();
}

Task<void> FuseExport::reader() {
  bool connected = true;
  while (connected && !stopping_) {
    // Take the pending requests, at most kReadBatch, with non-blocking reads...
    for (size_t taken = 0; taken < kReadBatch && !stopping_;) {
      Slot* slot = take_slot();
      if (slot == nullptr) {
        // Every buffer is held by a request in flight (or memory ran out): wait for one.
        co_await progress_.wait();
        continue;
      }
      const ssize_t got = ::read(fd_, slot->request(), kRequestRoom);
      if (got < 0) {
        const int error = errno;
        free_.push_back(slot);
        // ENOENT: the request was interrupted before it could be read.
        if (error == EINTR || error == ENOENT) continue;
        // EAGAIN: none left. Else (ENODEV) the file system was unmounted, the connection ended.
        connected = error == EAGAIN;
        break;
      }
      ++taken;
      note_init(slot->request(), static_cast<size_t>(got));
      current_ = slot;
      current_taken_ = false;
      fuse_buf buffer{};
      buffer.mem = slot->request();
      buffer.size = static_cast<size_t>(got);
      fuse_session_process_buf(session_, &buffer);
      // A large write's node write goes to the kernel now (see "Large writes" above).
      if (current_taken_ && static_cast<size_t>(got) >= kWriteHeader + kSubmitAtOnce &&
          reinterpret_cast<const fuse_in_header*>(slot->request())->opcode == FUSE_WRITE) {
        loop_->submit_now();
      }
      if (!current_taken_) free_.push_back(slot);
      current_ = nullptr;
      if (fuse_session_exited(session_)) connected = false;
      if (!connected) break;
    }
    if (!connected || stopping_) break;
    // ...then wait until there are more (at once when the batch stopped at its limit: the loop
    // runs its other work in between).
    auto readable = loop_->poll(fd_, POLLIN);
    pending_poll_ = &readable;
    (void)co_await readable;
    pending_poll_ = nullptr;
  }
  reading_ = false;
  progress_.notify_all();
}

void FuseExport::fill_stat(struct stat& st) const noexcept {
  std::memset(&st, 0, sizeof st);
  st.st_ino = FUSE_ROOT_ID;
  st.st_mode = S_IFREG | mode_;
  st.st_nlink = 1;
  st.st_uid = uid_;
  st.st_gid = gid_;
  st.st_size = backend_->size();
  const int64_t allocated = backend_->root() ? backend_->root()->allocated_size() : -1;
  st.st_blocks = (allocated >= 0 ? allocated : st.st_size + 511) / 512;
  st.st_blksize = kPage;
  st.st_atim = atime_;
  st.st_mtim = mtime_;
  st.st_ctim = ctime_;
}

void FuseExport::note_init(const uint8_t* request, size_t length) noexcept {
  fuse_in_header header;
  std::memcpy(&header, request, sizeof header);
  if (header.opcode != FUSE_INIT) return;
  init_unique_ = header.unique;
  passthrough_offered_ = false;
  // flags2 (the upper half of the flags) exists from protocol 7.36 on, with FUSE_INIT_EXT.
  if (length < sizeof header + offsetof(fuse_init_in, flags2) + sizeof(uint32_t)) return;
  fuse_init_in in;
  std::memcpy(&in, request + sizeof header, offsetof(fuse_init_in, flags2) + sizeof(uint32_t));
  const uint64_t flags =
      in.flags | ((in.flags & FUSE_INIT_EXT) ? uint64_t{in.flags2} << 32 : uint64_t{0});
  passthrough_offered_ = (flags & kInitPassthrough) != 0;
}

FuseExport::Passthrough FuseExport::passthrough_for(int open_flags) noexcept {
  if (!passthrough_ || backing_failed_) return {};
  block::Node* node = backend_->root();
  const int fd = node != nullptr ? node->host_file() : -1;
  if (fd < 0) return {};
  struct stat st;
  const int status = fcntl(fd, F_GETFL);
  if (status < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return {};
  if (backing_id_ > 0 && (st.st_dev != backing_dev_ || st.st_ino != backing_ino_)) {
    // One backing file per inode: the kernel refuses a second one while the first is in use.
    return {};
  }
  if (backing_id_ <= 0) {
    // The kernel keeps a reference to the open file it is given, so give it one of its own,
    // without the node's image locks (which would otherwise outlive the node).
    const std::string path = "/proc/self/fd/" + std::to_string(fd);
    const int reopened = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (status & O_DIRECT));
    if (reopened < 0) return {};
    BackingMap map{reopened, 0, 0};
    const int id = ioctl(fd_, kIocBackingOpen, &map);
    ::close(reopened);
    if (id <= 0) {
      backing_failed_ = true;  // EPERM without CAP_SYS_ADMIN, ELOOP on stacked file systems, ...
      return {};
    }
    backing_id_ = id;
    backing_dev_ = st.st_dev;
    backing_ino_ = st.st_ino;
  }
  // The caller's O_DIRECT is what the kernel reads the image with: it must be the node's. The
  // size is checked on every open: a write past the end may have left the image shorter than the
  // node, which counts whole sectors.
  const bool kernel_reads = (open_flags & O_ACCMODE) == O_RDONLY && !(open_flags & O_TRUNC) &&
                            (status & O_DIRECT) == (open_flags & O_DIRECT) &&
                            st.st_size == backend_->size();
  return {backing_id_, kernel_reads};
}

void FuseExport::close_backing() noexcept {
  if (backing_id_ <= 0 || fd_ < 0) return;
  const uint32_t id = static_cast<uint32_t>(backing_id_);
  (void)ioctl(fd_, kIocBackingClose, &id);
  backing_id_ = 0;
}

Task<int64_t> FuseExport::read_node(uint64_t offset, uint64_t length, uint8_t* buffer) noexcept {
  // Pieces give the node the parallelism that a client with one request in flight does not; one
  // with several already gives it, and more, smaller requests would only cost more.
  if (length <= kPieceBytes || reads_ > 0) {
    ++reads_;
    const int64_t ret = co_await backend_->read(offset, length, buffer, 0);
    --reads_;
    co_return ret;
  }
  ++reads_;
  Join join;
  int64_t error = 0;
  uint64_t done = 0;
  while (done < length) {
    const uint64_t position = offset + done;
    const uint64_t piece = std::min(kPieceBytes - position % kPieceBytes, length - done);
    join.start(*loop_, [](block::BlockBackend& backend, uint64_t at, uint64_t bytes, uint8_t* data,
                         int64_t& first_error) -> Task<void> {
      const int64_t ret = co_await backend.read(at, bytes, data, 0);
      if (ret < 0 && first_error == 0) first_error = ret;
    }(*backend_, position, piece, buffer + done, error));
    done += piece;
  }
  co_await join.wait();
  --reads_;
  co_return error;
}

Task<int64_t> FuseExport::resize(uint64_t size, bool only_grow) noexcept {
  while (resizing_) co_await resize_done_.wait();
  if (only_grow && static_cast<uint64_t>(backend_->size()) >= size) co_return 0;
  block::Node* node = backend_->root();
  if (node == nullptr) co_return -ENOMEDIUM;
  resizing_ = true;
  int64_t ret = 0;
  // Like qemu-storage-daemon, a writable export resizes on request (truncate, fallocate) even when
  // not growable, taking the resize permission just for that.
  // Permissions are graph state, which changes on the main loop only.
  const uint32_t held = backend_->permissions();
  const bool borrow = !(held & block::kPermResize);
  if (borrow) {
    co_await HopTo{main_};
    if (!node->update_permissions(*backend_, held | block::kPermResize,
                                  backend_->shared_permissions())
             .is_ok()) {
      ret = -EPERM;
    }
    co_await HopTo{*loop_};
  }
  if (ret == 0) ret = co_await backend_->truncate(size);
  if (borrow && ret != -EPERM) {
    co_await HopTo{main_};
    (void)node->update_permissions(*backend_, held, backend_->shared_permissions());
    co_await HopTo{*loop_};
  }
  resizing_ = false;
  resize_done_.notify_all();
  co_return ret;
}

Task<int64_t> FuseExport::allocate(uint64_t offset, uint64_t length) noexcept {
  // Holes are filled with zeroes, which must not land on data written meanwhile: hold writes
  // back and wait for those in flight. One allocation at a time, so that the first to finish
  // cannot let writes through while another is still filling holes.
  while (allocating_) co_await writes_changed_.wait();
  allocating_ = true;
  while (writes_ > 0) co_await writes_changed_.wait();
  int64_t ret = 0;
  uint64_t position = offset;
  while (ret >= 0) {
    // A truncate may shrink the node meanwhile; what it cut off needs no allocating.
    const uint64_t end = std::min(offset + length, static_cast<uint64_t>(backend_->size()));
    if (position >= end) break;
    const block::BlockStatus status = co_await backend_->block_status(position, end - position);
    if (status.bytes <= 0) {
      ret = status.bytes < 0 ? status.bytes : -EIO;
      break;
    }
    const uint64_t run = std::min<uint64_t>(static_cast<uint64_t>(status.bytes), end - position);
    const bool hole = (status.flags & block::kStatusZero) && !(status.flags & block::kStatusData);
    if (hole) ret = co_await backend_->write_zeroes(position, run, 0);
    position += run;
  }
  allocating_ = false;
  writes_changed_.notify_all();
  co_return ret < 0 ? ret : 0;
}

Task<void> FuseExport::shut_down() {
  set_shutting_down();
  stop_watchdog();
  // Everything up to the drain runs where the requests are served.
  co_await HopTo{*loop_};
  // Files already open in passthrough mode keep their own reference to the image.
  close_backing();
  if (mounted_) {
    // On a helper thread: without root, unmounting runs fusermount3, which may look at the mount,
    // and its requests must still be answered here.
    bool unmounted = false;
    Event done;
    std::thread helper([this, &unmounted, &done] {
      fuse_session_unmount(session_);
      loop_->post([&unmounted, &done] {
        unmounted = true;
        done.notify_all();
      });
    });
    while (!unmounted) co_await done.wait();
    helper.join();
    mounted_ = false;
  }
  // Processes that still hold the file open keep the connection alive after the unmount; they
  // lose it when /dev/fuse is closed below.
  stopping_ = true;
  if (pending_poll_ != nullptr) loop_->cancel(pending_poll_);
  progress_.notify_all();
  while (reading_ || handlers_ > 0) co_await progress_.wait();
  co_await backend_->drain();
  // Nothing runs on the serving loop for this export any more: the rest is graph work.
  co_await HopTo{main_};
  backend_->detach_to(main_);
  fuse_session_destroy(session_);
  session_ = nullptr;
  fd_ = -1;
}

}  // namespace blockd::exports::fuse
