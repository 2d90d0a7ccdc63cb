// The file protocol driver; see file.h for what it implements and the lock byte layout.
#include "drivers/file.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "drivers/file_locks.h"
#include "drivers/thread_pool.h"
#include "runtime/event.h"

namespace blockd::drivers {
namespace {

using block::BlockStatus;

constexpr uint64_t kSectorSize = 512;
// One system call moves at most this much; larger requests loop.
constexpr uint64_t kMaxSingleTransfer = 1u << 30;
// Size of a bounce buffer for unaligned O_DIRECT requests, and how many idle ones a node keeps.
constexpr uint64_t kBounceSize = 1u << 20;
constexpr size_t kBouncePoolLimit = 4;
// Largest read or write served inline on the loop for a file held in memory (see
// FileNode::inline_io_); a copy of this size takes tens of microseconds.
constexpr uint64_t kMaxInlineTransfer = 1u << 20;

bool is_unsupported(int64_t error) {
  return error == -EOPNOTSUPP || error == -ENOSYS || error == -ENOTTY || error == -EINVAL;
}

struct FreeDeleter {
  void operator()(char* memory) const noexcept { std::free(memory); }
};
using AlignedBuffer = std::unique_ptr<char, FreeDeleter>;

AlignedBuffer allocate_aligned(size_t alignment, size_t size) {
  return AlignedBuffer(static_cast<char*>(std::aligned_alloc(alignment, size)));
}

class FileNode final : public block::Node {
 public:
  FileNode(block::NodeOptions common, const FileOptions& options, int fd)
      : Node(std::move(common)), file_options_(options), fd_(fd) {}

  ~FileNode() override {
    if (mapping_ != nullptr) munmap(const_cast<uint8_t*>(mapping_), mapping_size_);
    if (write_mapping_ != nullptr) munmap(write_mapping_, write_mapping_size_);
    // Closing the only descriptor of the open file description releases its image locks.
    if (fd_ >= 0) close(fd_);
  }

  // Finishes opening: size, alignment, locking. Main loop.
  Status init();

  std::string_view driver_name() const noexcept override { return "file"; }
  std::string filename() const override { return file_options_.filename; }
  nlohmann::json open_options() const override {
    return {{"driver", "file"}, {"filename", file_options_.filename}};
  }
  int64_t allocated_size() const override {
    struct stat st;
    if (fstat(fd_, &st) != 0) return -errno;
    return static_cast<int64_t>(st.st_blocks) * 512;
  }
  uint32_t request_alignment() const noexcept override { return alignment_; }
  bool supports_discard() const noexcept override { return true; }
  bool supports_write_zeroes() const noexcept override { return true; }

  Task<int64_t> read(uint64_t offset, uint64_t length, void* buffer,
                     uint32_t flags) noexcept override;
  Task<int64_t> write(uint64_t offset, uint64_t length, const void* buffer,
                      uint32_t flags) noexcept override;
  Task<int64_t> flush() noexcept override;
  Task<int64_t> discard(uint64_t offset, uint64_t length) noexcept override;
  Task<int64_t> write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept override;
  Task<BlockStatus> block_status(uint64_t offset, uint64_t length) noexcept override;
  // Only files in memory without O_DIRECT: anywhere else a transfer could wait for the disk.
  block::FileRange map_file(uint64_t offset, uint64_t length,
                            block::MapAccess access) noexcept override {
    if (!inline_io_ || alignment_ != 1) return {};
    block::FileRange range{fd_, offset};
    const uint8_t* memory = mapping_;
    uint64_t mapped = mapped_length_;
    if (access == block::MapAccess::kWriteMemory) {
      map_for_writes();
      memory = write_mapping_;
      mapped = write_mapped_length_;
    }
    if (memory != nullptr && offset <= mapped && length <= mapped - offset) {
      range.memory = memory + offset;
    }
    return range;
  }
  Task<int64_t> truncate(uint64_t size) noexcept override;
  int host_file() const noexcept override { return fd_; }

 protected:
  Status check_permissions(uint32_t permissions, uint32_t shared) override;
  void apply_permissions(uint32_t permissions, uint32_t shared) override;

 private:
  enum class Op { kRead, kWrite, kSync, kFallocate };

  // A write in flight while requests are aligned (alignment_ > 1), so that read-modify-write
  // cycles never interleave with overlapping writes. Lives in the writing coroutine's frame.
  struct TrackedWrite {
    uint64_t start = 0;  // aligned range covered
    uint64_t end = 0;
    uint64_t sequence = 0;
    bool read_modify_write = false;
    TrackedWrite* previous = nullptr;
    TrackedWrite* next = nullptr;
  };
  // Unregisters a TrackedWrite when the writing coroutine leaves its scope.
  struct WriteScope {
    WriteScope(FileNode* owner, TrackedWrite* tracked) : node(owner), write(tracked) {}
    WriteScope(const WriteScope&) = delete;
    WriteScope& operator=(const WriteScope&) = delete;
    FileNode* node;
    TrackedWrite* write;
    ~WriteScope() { node->end_write(*write); }
  };
  // Returns a bounce buffer to the node's pool when the request finishes.
  struct BounceLease {
    FileNode* node;
    AlignedBuffer buffer;
    ~BounceLease() { node->release_bounce(std::move(buffer)); }
  };

  // One blocking system call: what a worker thread (aio=threads) or, for a file in memory, the
  // loop itself runs. `extra` is the RWF_* flags of a write or the mode of a fallocate.
  static int64_t blocking_call(int fd, Op op, char* buffer, uint64_t length, uint64_t offset,
                               int extra) noexcept;
  // One system call (or io_uring operation): the primitive every request is built from.
  Task<int64_t> once(Op op, char* buffer, uint64_t length, uint64_t offset, int extra) noexcept;
  // Reads `length` bytes, retrying short reads; zeroes what lies beyond the end of the file.
  Task<int64_t> read_full(uint64_t offset, uint64_t length, char* buffer) noexcept;
  // Writes `length` bytes, retrying short writes; durable on return when `fua`.
  Task<int64_t> write_full(uint64_t offset, uint64_t length, const char* buffer, bool fua) noexcept;
  Task<int64_t> bounce_read(uint64_t offset, uint64_t length, char* buffer) noexcept;
  Task<int64_t> bounce_write(uint64_t offset, uint64_t length, const char* buffer,
                             bool fua) noexcept;
  Task<int64_t> fallocate_retry(int mode, uint64_t offset, uint64_t length) noexcept;
  // The fallocate part of write_zeroes; -ENOTSUP when the file system cannot do it.
  Task<int64_t> zero_range(uint64_t offset, uint64_t length, uint32_t flags) noexcept;
  Task<int64_t> sync() noexcept;
  // Writes past the end grow the file (image creation writes metadata there): keep size() in
  // step, in 512-byte sectors as at open.
  void grown_to(uint64_t end) noexcept;

  // Registers `write` and waits until no earlier conflicting write overlaps it.
  Task<void> begin_write(TrackedWrite& write) noexcept;
  void end_write(TrackedWrite& write) noexcept;
  bool conflicts(const TrackedWrite& write) const noexcept;

  AlignedBuffer acquire_bounce() noexcept;
  void release_bounce(AlignedBuffer buffer) noexcept;

  bool aligned(uint64_t offset, uint64_t length, const void* buffer) const noexcept {
    return ((offset | length) & (alignment_ - 1)) == 0 &&
           (reinterpret_cast<uintptr_t>(buffer) & (memory_alignment_ - 1)) == 0;
  }
  uint64_t align_down(uint64_t value) const noexcept { return value & ~uint64_t{alignment_ - 1}; }
  uint64_t align_up(uint64_t value) const noexcept { return align_down(value + alignment_ - 1); }

  Status probe_alignment();
  // Maps the first `length` bytes of the file (see mapping_).
  void map_content(uint64_t length);
  // Maps the file writable (see write_mapping_), on the first call while the node is writable.
  void map_for_writes() noexcept;

  FileOptions file_options_;
  int fd_;
  // The last data extent SEEK_DATA/SEEK_HOLE found, [start, end); empty when equal. On tmpfs and
  // some other file systems SEEK_HOLE walks the file's whole page cache, so asking again for
  // every read of a sequential stream costs milliseconds; the extent answers those queries.
  // Writes only add data and leave it valid; punching or zeroing ranges forgets it.
  uint64_t data_extent_start_ = 0;
  uint64_t data_extent_end_ = 0;
  bool use_threads_ = false;
  // The file lives in memory (tmpfs, ramfs, hugetlbfs): reads and writes are copies to or from
  // the page cache that never wait for a device. io_uring cannot run them without blocking (these
  // file systems offer no non-blocking I/O), so it hands each one to a kernel worker thread, two
  // context switches per request; a plain system call on the loop is cheaper. Sizes above
  // kMaxInlineTransfer still go through io_uring so that one request cannot stall the loop.
  bool inline_io_ = false;
  // A file in memory is also mapped, read-only and shared, from open on (map_file hands out its
  // bytes so that a small read goes from the page cache to a socket within the send, with no read
  // system call and no copy through a buffer). [0, mapped_length_) is file content: the length at
  // open, lowered when the node shrinks the file; a file grown later is read past it as usual.
  const uint8_t* mapping_ = nullptr;
  uint64_t mapping_size_ = 0;
  uint64_t mapped_length_ = 0;
  // The same file mapped writable and shared, for callers that copy small writes in themselves
  // (MapAccess::kWriteMemory), over the file's length when the first of them came; mapped on
  // demand, not at open, because a writable mapping keeps others from sealing a memfd against
  // writes (F_SEAL_WRITE fails with EBUSY), which nothing but such writes should cost.
  // [0, write_mapped_length_) is file content, lowered as mapped_length_ is.
  uint8_t* write_mapping_ = nullptr;
  uint64_t write_mapping_size_ = 0;
  uint64_t write_mapped_length_ = 0;
  bool write_mapping_tried_ = false;
  bool use_lock_ = false;
  bool dsync_supported_ = true;
  uint32_t alignment_ = 1;         // offsets and lengths
  uint32_t memory_alignment_ = 1;  // buffer addresses
  uint64_t bounce_size_ = kBounceSize;
  uint32_t locked_permissions_ = 0;  // bits whose byte 100 + bit we lock
  uint32_t locked_unshared_ = 0;     // bits whose byte 200 + bit we lock
  std::vector<AlignedBuffer> bounce_pool_;
  TrackedWrite* writes_head_ = nullptr;
  TrackedWrite* writes_tail_ = nullptr;
  uint64_t next_sequence_ = 0;
  Event writes_changed_;
};

// ---- Opening.

Status FileNode::init() {
  use_threads_ = file_options_.aio == FileOptions::Aio::kThreads;
  struct statfs fs {};
  if (!use_threads_ && fstatfs(fd_, &fs) == 0) {
    const auto type = static_cast<unsigned long>(fs.f_type);
    inline_io_ = type == TMPFS_MAGIC || type == RAMFS_MAGIC || type == HUGETLBFS_MAGIC;
  }

  struct stat st;
  if (fstat(fd_, &st) != 0) {
    return Status::generic("Could not open '" + file_options_.filename +
                           "': " + errno_text(-errno));
  }
  if (S_ISDIR(st.st_mode)) {
    return Status::generic("Could not open '" + file_options_.filename +
                           "': " + errno_text(-EISDIR));
  }
  const off_t length = lseek(fd_, 0, SEEK_END);
  if (length < 0) {
    return Status::generic("Could not refresh total sector count: " + errno_text(-errno));
  }
  // QEMU counts sizes in 512-byte sectors, rounding up; the tail reads as zeroes.
  set_size(static_cast<int64_t>((static_cast<uint64_t>(length) + kSectorSize - 1) / kSectorSize *
                                kSectorSize));

  if (options_.cache_direct) BLOCKD_RETURN_IF_ERROR(probe_alignment());
  if (file_options_.TEST_request_alignment > 1) {
    alignment_ = std::max(alignment_, file_options_.TEST_request_alignment);
    memory_alignment_ = std::max(memory_alignment_, file_options_.TEST_request_alignment);
  }
  bounce_size_ = std::max<uint64_t>(kBounceSize, alignment_);
  if (inline_io_ && alignment_ == 1 && length > 0) map_content(static_cast<uint64_t>(length));

  if (file_options_.locking != FileOptions::Locking::kOff) {
    // OFD locks work on almost every local file system; some network and FUSE file systems
    // refuse them. Testing one byte tells.
    const int probe = test_lock_byte(fd_, kPermLockBase);
    const bool supported = probe == 0 || probe == -EAGAIN;
    if (!supported && file_options_.locking == FileOptions::Locking::kOn) {
      return Status::generic(
          "Locking was requested but the file system does not support OFD locks");
    }
    use_lock_ = supported;
  }
  return Status::ok();
}

void FileNode::map_content(uint64_t length) {
  // Mapped through a read-only descriptor of its own: a shared mapping of a descriptor open for
  // writing counts as writable (mprotect could make it so), which would keep others from sealing
  // a memfd against writes (F_SEAL_WRITE fails with EBUSY). The descriptor is an open file
  // description of its own, without image locks (those are OFD locks on fd_), and is closed at
  // once: the mapping keeps the file. Best effort: without a mapping (no /proc, address space,
  // hugetlbfs sizes) reads take the usual path.
  const std::string self = "/proc/self/fd/" + std::to_string(fd_);
  const int reader = open(self.c_str(), O_RDONLY | O_CLOEXEC);
  if (reader < 0) return;
  void* address = mmap(nullptr, length, PROT_READ, MAP_SHARED, reader, 0);
  close(reader);
  if (address == MAP_FAILED) return;
  mapping_ = static_cast<const uint8_t*>(address);
  mapping_size_ = mapped_length_ = length;
}

void FileNode::map_for_writes() noexcept {
  if (write_mapping_tried_ || read_only()) return;
  write_mapping_tried_ = true;
  // fd_ is open for writing. Best effort: a sealed memfd (EPERM) or a lack of address space
  // leaves small writes on pwrite.
  struct stat st;
  if (fstat(fd_, &st) != 0 || st.st_size <= 0) return;
  const auto length = static_cast<uint64_t>(st.st_size);
  void* address = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (address == MAP_FAILED) return;
  write_mapping_ = static_cast<uint8_t*>(address);
  write_mapping_size_ = write_mapped_length_ = length;
}

Status FileNode::probe_alignment() {
#ifdef STATX_DIOALIGN
  struct statx stx {};
  if (statx(fd_, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN) &&
      stx.stx_dio_offset_align > 0) {
    alignment_ = stx.stx_dio_offset_align;
    memory_alignment_ = std::max<uint32_t>(stx.stx_dio_mem_align, 1);
    return Status::ok();
  }
#endif
  struct stat st;
  if (fstat(fd_, &st) == 0 && S_ISBLK(st.st_mode)) {
    int sector_size = 0;
    if (ioctl(fd_, BLKSSZGET, &sector_size) == 0 && sector_size > 0) {
      alignment_ = memory_alignment_ = static_cast<uint32_t>(sector_size);
      return Status::ok();
    }
  }
  // Probe by reading: the smallest length that O_DIRECT accepts. Reads at the end of a file succeed
  // whatever their alignment, so files shorter than a page cannot be probed: assume a page.
  alignment_ = memory_alignment_ = 4096;
  if (fstat(fd_, &st) != 0 || st.st_size < 4096) return Status::ok();
  AlignedBuffer page = allocate_aligned(8192, 8192);
  if (!page) return Status::generic("Failed to allocate memory");
  for (uint32_t candidate : {512u, 1024u, 2048u, 4096u}) {
    if (pread(fd_, page.get(), candidate, 0) >= 0) {
      alignment_ = candidate;
      break;
    }
  }
  for (uint32_t candidate : {1u, 512u, 1024u, 2048u, 4096u}) {
    if (pread(fd_, page.get() + candidate % 4096, alignment_, 0) >= 0) {
      memory_alignment_ = candidate;
      break;
    }
  }
  return Status::ok();
}

// ---- Image locks.

Status FileNode::check_permissions(uint32_t permissions, uint32_t shared) {
  if (!use_lock_) return Status::ok();
  return check_lock_bytes(fd_, permissions, shared);
}

void FileNode::apply_permissions(uint32_t permissions, uint32_t shared) {
  if (!use_lock_) return;
  const uint32_t unshared = ~shared & block::kPermAll;
  for (int bit = 0; bit < kPermissionBits; ++bit) {
    const uint32_t mask = 1u << bit;
    if ((permissions & mask) != (locked_permissions_ & mask)) {
      // Shared locks on bytes nobody write-locks cannot fail but for resource exhaustion; like
      // QEMU's commit phase, a failure here leaves the previous state.
      if (set_lock_byte(fd_, kPermLockBase + bit, (permissions & mask) ? F_RDLCK : F_UNLCK) == 0) {
        locked_permissions_ ^= mask;
      }
    }
    if ((unshared & mask) != (locked_unshared_ & mask)) {
      if (set_lock_byte(fd_, kSharedLockBase + bit, (unshared & mask) ? F_RDLCK : F_UNLCK) == 0) {
        locked_unshared_ ^= mask;
      }
    }
  }
}

// ---- I/O primitives.

int64_t FileNode::blocking_call(int fd, Op op, char* buffer, uint64_t length, uint64_t offset,
                                int extra) noexcept {
  ssize_t ret = -1;
  switch (op) {
    case Op::kRead:
      ret = pread(fd, buffer, length, static_cast<off_t>(offset));
      break;
    case Op::kWrite: {
      if (extra == 0) {
        ret = pwrite(fd, buffer, length, static_cast<off_t>(offset));
      } else {
        iovec vector{buffer, length};
        ret = pwritev2(fd, &vector, 1, static_cast<off_t>(offset), extra);
      }
      break;
    }
    case Op::kSync:
      ret = fdatasync(fd);
      break;
    case Op::kFallocate:
      ret = ::fallocate(fd, extra, static_cast<off_t>(offset), static_cast<off_t>(length));
      break;
  }
  return ret < 0 ? -errno : ret;
}

Task<int64_t> FileNode::once(Op op, char* buffer, uint64_t length, uint64_t offset,
                             int extra) noexcept {
  const int fd = fd_;
  if (use_threads_) {
    co_return co_await RunInThread(loop(), [=]() noexcept -> int64_t {
      return blocking_call(fd, op, buffer, length, offset, extra);
    });
  }
  if (inline_io_ && op != Op::kFallocate && length <= kMaxInlineTransfer) {
    co_return blocking_call(fd, op, buffer, length, offset, extra);
  }
  switch (op) {
    case Op::kRead:
      co_return co_await loop().read(fd, buffer, static_cast<unsigned>(length), offset);
    case Op::kWrite:
      co_return co_await loop().submit([=](io_uring_sqe* sqe) {
        io_uring_prep_write(sqe, fd, buffer, static_cast<unsigned>(length), offset);
        sqe->rw_flags = extra;
      });
    case Op::kSync:
      co_return co_await loop().fsync(fd, true);
    case Op::kFallocate:
      co_return co_await loop().fallocate(fd, extra, offset, length);
  }
  co_return -EINVAL;
}

Task<int64_t> FileNode::read_full(uint64_t offset, uint64_t length, char* buffer) noexcept {
  uint64_t done = 0;
  while (done < length) {
    const uint64_t chunk = std::min(length - done, kMaxSingleTransfer);
    const int64_t ret = co_await once(Op::kRead, buffer + done, chunk, offset + done, 0);
    if (ret == -EINTR || ret == -EAGAIN) continue;
    if (ret < 0) co_return ret;
    if (ret == 0) break;  // end of file
    done += static_cast<uint64_t>(ret);
    // Under O_DIRECT a short read that stops at an unaligned position can only be the end of the
    // file (and reading on from there would fail with EINVAL).
    if (static_cast<uint64_t>(ret) < chunk && alignment_ > 1 && (offset + done) % alignment_ != 0) {
      break;
    }
  }
  if (done < length) std::memset(buffer + done, 0, length - done);
  co_return 0;
}

Task<int64_t> FileNode::write_full(uint64_t offset, uint64_t length, const char* buffer,
                                   bool fua) noexcept {
  int rw_flags = fua && dsync_supported_ ? RWF_DSYNC : 0;
  uint64_t done = 0;
  while (done < length) {
    const uint64_t chunk = std::min(length - done, kMaxSingleTransfer);
    const int64_t ret =
        co_await once(Op::kWrite, const_cast<char*>(buffer + done), chunk, offset + done, rw_flags);
    if (ret == -EOPNOTSUPP && rw_flags != 0) {
      dsync_supported_ = false;  // fall back to write + fdatasync
      rw_flags = 0;
      continue;
    }
    if (ret == -EINTR || ret == -EAGAIN) continue;
    if (ret < 0) co_return ret;
    if (ret == 0) co_return -ENOSPC;
    done += static_cast<uint64_t>(ret);
  }
  if (fua && rw_flags == 0) {
    const int64_t ret = co_await sync();
    if (ret < 0) co_return ret;
  }
  co_return 0;
}

Task<int64_t> FileNode::sync() noexcept {
  for (;;) {
    const int64_t ret = co_await once(Op::kSync, nullptr, 0, 0, 0);
    if (ret != -EINTR) co_return ret < 0 ? ret : 0;
  }
}

Task<int64_t> FileNode::fallocate_retry(int mode, uint64_t offset, uint64_t length) noexcept {
  data_extent_start_ = data_extent_end_ = 0;
  for (;;) {
    const int64_t ret = co_await once(Op::kFallocate, nullptr, length, offset, mode);
    if (ret != -EINTR) co_return ret < 0 ? ret : 0;
  }
}

// ---- Serialising writes around read-modify-write.

bool FileNode::conflicts(const TrackedWrite& write) const noexcept {
  for (const TrackedWrite* other = writes_head_; other != nullptr; other = other->next) {
    if (other->sequence >= write.sequence) break;  // the list is in sequence order
    if (other->end <= write.start || write.end <= other->start) continue;
    if (write.read_modify_write || other->read_modify_write) return true;
  }
  return false;
}

Task<void> FileNode::begin_write(TrackedWrite& write) noexcept {
  write.sequence = next_sequence_++;
  write.previous = writes_tail_;
  write.next = nullptr;
  if (writes_tail_ != nullptr) {
    writes_tail_->next = &write;
  } else {
    writes_head_ = &write;
  }
  writes_tail_ = &write;
  while (conflicts(write)) co_await writes_changed_.wait();
}

void FileNode::end_write(TrackedWrite& write) noexcept {
  (write.previous ? write.previous->next : writes_head_) = write.next;
  (write.next ? write.next->previous : writes_tail_) = write.previous;
  if (writes_changed_.has_waiters()) writes_changed_.notify_all();
}

AlignedBuffer FileNode::acquire_bounce() noexcept {
  if (!bounce_pool_.empty()) {
    AlignedBuffer buffer = std::move(bounce_pool_.back());
    bounce_pool_.pop_back();
    return buffer;
  }
  const size_t alignment = std::max<size_t>({memory_alignment_, alignment_, 4096});
  return allocate_aligned(alignment, bounce_size_);
}

void FileNode::release_bounce(AlignedBuffer buffer) noexcept {
  if (buffer && bounce_pool_.size() < kBouncePoolLimit) bounce_pool_.push_back(std::move(buffer));
}

// ---- Data path.

Task<int64_t> FileNode::read(uint64_t offset, uint64_t length, void* buffer, uint32_t) noexcept {
  if (alignment_ == 1 || aligned(offset, length, buffer)) {
    co_return co_await read_full(offset, length, static_cast<char*>(buffer));
  }
  co_return co_await bounce_read(offset, length, static_cast<char*>(buffer));
}

Task<int64_t> FileNode::bounce_read(uint64_t offset, uint64_t length, char* buffer) noexcept {
  BounceLease lease{this, acquire_bounce()};
  if (!lease.buffer) co_return -ENOMEM;
  char* bounce = lease.buffer.get();
  const uint64_t end = offset + length;
  uint64_t position = offset;
  while (position < end) {
    const uint64_t start = align_down(position);
    const uint64_t stop = std::min(align_up(end), start + bounce_size_);
    const int64_t ret = co_await read_full(start, stop - start, bounce);
    if (ret < 0) co_return ret;
    const uint64_t copy_end = std::min(end, stop);
    std::memcpy(buffer, bounce + (position - start), copy_end - position);
    buffer += copy_end - position;
    position = copy_end;
  }
  co_return 0;
}

Task<int64_t> FileNode::write(uint64_t offset, uint64_t length, const void* buffer,
                              uint32_t flags) noexcept {
  if (read_only()) co_return -EPERM;
  const bool fua = (flags & block::kRequestFua) && !options_.cache_no_flush;
  const char* data = static_cast<const char*>(buffer);
  int64_t ret = 0;
  if (alignment_ == 1) {
    ret = co_await write_full(offset, length, data, fua);
  } else {
    TrackedWrite tracked;
    tracked.start = align_down(offset);
    tracked.end = align_up(offset + length);
    tracked.read_modify_write = ((offset | length) & (alignment_ - 1)) != 0;
    co_await begin_write(tracked);
    WriteScope scope{this, &tracked};
    ret = aligned(offset, length, buffer) ? co_await write_full(offset, length, data, fua)
                                          : co_await bounce_write(offset, length, data, fua);
  }
  if (ret >= 0) grown_to(offset + length);
  co_return ret;
}

void FileNode::grown_to(uint64_t end) noexcept {
  const uint64_t rounded = (end + kSectorSize - 1) / kSectorSize * kSectorSize;
  if (rounded > static_cast<uint64_t>(size())) set_size(static_cast<int64_t>(rounded));
}

Task<int64_t> FileNode::bounce_write(uint64_t offset, uint64_t length, const char* buffer,
                                     bool fua) noexcept {
  BounceLease lease{this, acquire_bounce()};
  if (!lease.buffer) co_return -ENOMEM;
  char* bounce = lease.buffer.get();
  const uint64_t end = offset + length;
  uint64_t position = offset;
  while (position < end) {
    const uint64_t start = align_down(position);
    const uint64_t stop = std::min(align_up(end), start + bounce_size_);
    const uint64_t copy_end = std::min(end, stop);
    // Partial blocks at either end keep their other bytes: read them first.
    const bool partial_head = position != start;
    const bool partial_tail = copy_end != stop;
    if (partial_head) {
      const int64_t ret = co_await read_full(start, alignment_, bounce);
      if (ret < 0) co_return ret;
    }
    if (partial_tail && !(partial_head && stop - start == alignment_)) {
      const uint64_t tail = stop - alignment_;
      const int64_t ret = co_await read_full(tail, alignment_, bounce + (tail - start));
      if (ret < 0) co_return ret;
    }
    std::memcpy(bounce + (position - start), buffer, copy_end - position);
    const int64_t ret = co_await write_full(start, stop - start, bounce, fua);
    if (ret < 0) co_return ret;
    buffer += copy_end - position;
    position = copy_end;
  }
  co_return 0;
}

Task<int64_t> FileNode::flush() noexcept {
  if (options_.cache_no_flush) co_return 0;
  co_return co_await sync();
}

Task<int64_t> FileNode::discard(uint64_t offset, uint64_t length) noexcept {
  if (options_.discard != "unmap") co_return 0;  // discard=ignore
  if (read_only()) co_return -EPERM;
  TrackedWrite tracked;
  std::optional<WriteScope> scope;
  if (alignment_ > 1) {
    tracked.start = align_down(offset);
    tracked.end = align_up(offset + length);
    co_await begin_write(tracked);
    scope.emplace(this, &tracked);
  }
  const int64_t ret =
      co_await fallocate_retry(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  // Discard is a hint: a file system that cannot punch holes simply keeps the data.
  if (ret < 0 && is_unsupported(ret)) co_return 0;
  co_return ret;
}

Task<int64_t> FileNode::zero_range(uint64_t offset, uint64_t length, uint32_t flags) noexcept {
  TrackedWrite tracked;
  std::optional<WriteScope> scope;
  if (alignment_ > 1) {
    tracked.start = align_down(offset);
    tracked.end = align_up(offset + length);
    co_await begin_write(tracked);
    scope.emplace(this, &tracked);
  }
  if (flags & block::kRequestMayUnmap) {
    const int64_t ret =
        co_await fallocate_retry(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    if (ret == 0 || !is_unsupported(ret)) co_return ret;
  }
  int64_t ret = co_await fallocate_retry(FALLOC_FL_ZERO_RANGE, offset, length);
  if (ret == 0 || !is_unsupported(ret)) co_return ret;
  // No ZERO_RANGE: punch a hole, then allocate the range again (a write_zeroes without
  // may-unmap must leave the range allocated when the file system can).
  ret = co_await fallocate_retry(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  if (ret == 0) {
    co_await fallocate_retry(0, offset, length);  // best effort; the range reads as zeroes anyway
    co_return 0;
  }
  co_return is_unsupported(ret) ? -ENOTSUP : ret;
}

Task<int64_t> FileNode::write_zeroes(uint64_t offset, uint64_t length, uint32_t flags) noexcept {
  if (read_only()) co_return -EPERM;
  if (options_.discard != "unmap") flags &= ~block::kRequestMayUnmap;
  const bool fua = (flags & block::kRequestFua) && !options_.cache_no_flush;
  // zero_range's write tracking ends before the fallback, whose writes track themselves.
  int64_t ret = co_await zero_range(offset, length, flags);
  if (ret == -ENOTSUP) {
    if (flags & block::kRequestNoFallback) co_return -ENOTSUP;
    co_return co_await Node::write_zeroes(offset, length, fua ? uint32_t{block::kRequestFua} : 0u);
  }
  if (ret < 0) co_return ret;
  grown_to(offset + length);  // ZERO_RANGE without KEEP_SIZE extends the file
  if (fua) co_return co_await sync();
  co_return 0;
}

Task<BlockStatus> FileNode::block_status(uint64_t offset, uint64_t length) noexcept {
  const uint64_t size = static_cast<uint64_t>(this->size());
  if (offset >= size) co_return BlockStatus{0, 0};
  const uint64_t end = std::min(size, offset + length);
  const uint32_t kData = block::kStatusData | block::kStatusAllocated;
  const uint32_t kZero = block::kStatusZero | block::kStatusAllocated;
  if (offset >= data_extent_start_ && offset < data_extent_end_) {
    co_return BlockStatus{static_cast<int64_t>(std::min(end, data_extent_end_) - offset), kData};
  }
  // lseek on the loop thread, as QEMU does: it does not wait for the disk.
  const off_t data = lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0) {
    // ENXIO: no data from `offset` to the end of the file. Anything else: the file system cannot
    // tell, so everything is data.
    co_return BlockStatus{static_cast<int64_t>(end - offset), errno == ENXIO ? kZero : kData};
  }
  if (static_cast<uint64_t>(data) > offset) {
    co_return BlockStatus{static_cast<int64_t>(std::min<uint64_t>(data, end) - offset), kZero};
  }
  const off_t hole = lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
  // A data run ends unaligned only at the end of the file; never report a partial block.
  if (hole <= static_cast<off_t>(offset)) {
    co_return BlockStatus{static_cast<int64_t>(end - offset), kData};  // cannot tell: all data
  }
  const uint64_t extent_end = std::min(align_up(static_cast<uint64_t>(hole)), size);
  data_extent_start_ = offset;
  data_extent_end_ = extent_end;
  co_return BlockStatus{static_cast<int64_t>(std::min(extent_end, end) - offset), kData};
}

Task<int64_t> FileNode::truncate(uint64_t size) noexcept {
  if (read_only()) co_return -EPERM;
  if (size > static_cast<uint64_t>(std::numeric_limits<off_t>::max())) co_return -EFBIG;
  // ftruncate on the loop thread, as QEMU's file driver does for a plain resize: it only changes
  // metadata.
  if (ftruncate(fd_, static_cast<off_t>(size)) != 0) co_return -errno;
  if (size < data_extent_end_) data_extent_start_ = data_extent_end_ = 0;
  mapped_length_ = std::min(mapped_length_, size);
  write_mapped_length_ = std::min(write_mapped_length_, size);
  set_size(static_cast<int64_t>((size + kSectorSize - 1) / kSectorSize * kSectorSize));
  co_return 0;
}

}  // namespace

std::string file_lock_hint(const std::string& filename) {
  return "Is another process using the image [" + filename + "]?";
}

Expected<std::shared_ptr<block::Node>> open_file_node(block::NodeOptions common,
                                                      const FileOptions& options, Loop& loop) {
  if (options.filename.empty()) {
    return Status::generic("The 'file' block driver requires a file name");
  }
  if (options.aio == FileOptions::Aio::kNative && !common.cache_direct) {
    return Status::generic(
        "aio=native was specified, but it requires cache.direct=on, which was not specified.");
  }
  const int base_flags = O_CLOEXEC | (common.cache_direct ? O_DIRECT : 0);
  int fd = open(options.filename.c_str(), base_flags | (common.read_only ? O_RDONLY : O_RDWR));
  if (fd < 0 && !common.read_only && common.auto_read_only &&
      (errno == EACCES || errno == EROFS || errno == EPERM)) {
    fd = open(options.filename.c_str(), base_flags | O_RDONLY);
    if (fd >= 0) common.read_only = true;
  }
  if (fd < 0) {
    return Status::generic("Could not open '" + options.filename + "': " + errno_text(-errno));
  }
  auto node = std::make_shared<FileNode>(std::move(common), options, fd);
  node->set_loop(loop);
  BLOCKD_RETURN_IF_ERROR(node->init());
  return std::shared_ptr<block::Node>(std::move(node));
}

}  // namespace blockd::drivers
