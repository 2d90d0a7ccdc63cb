// Whole-range file reads and writes and iovec bookkeeping for code that moves bytes by system
// calls outside the event loop (the loop's own operations are in loop.h).
#pragma once

#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

namespace blockd {

// Reads [offset, offset + length) of `fd` into `buffer`; what lies past the file's end reads as
// zeroes. 0, or a negative errno.
inline int read_whole(int fd, void* buffer, uint64_t length, uint64_t offset) noexcept {
  auto* const out = static_cast<uint8_t*>(buffer);
  uint64_t done = 0;
  while (done < length) {
    const ssize_t got = ::pread(fd, out + done, static_cast<size_t>(length - done),
                                static_cast<off_t>(offset + done));
    if (got > 0) {
      done += static_cast<uint64_t>(got);
    } else if (got == 0) {
      std::memset(out + done, 0, static_cast<size_t>(length - done));
      break;
    } else if (errno != EINTR) {
      return -errno;
    }
  }
  return 0;
}

// Writes `length` bytes from `bytes` at `offset` of `fd`. 0, or a negative errno.
inline int write_whole(int fd, const void* bytes, uint64_t length, uint64_t offset) noexcept {
  const auto* const data = static_cast<const uint8_t*>(bytes);
  uint64_t done = 0;
  while (done < length) {
    const ssize_t wrote = ::pwrite(fd, data + done, static_cast<size_t>(length - done),
                                   static_cast<off_t>(offset + done));
    if (wrote > 0) {
      done += static_cast<uint64_t>(wrote);
    } else if (wrote == 0) {
      return -ENOSPC;
    } else if (errno != EINTR) {
      return -errno;
    }
  }
  return 0;
}

// Moves `iov` (of `count` entries) past `sent` bytes, as after a partial sendmsg or writev.
template <typename Count>
void advance_iovecs(iovec*& iov, Count& count, size_t sent) noexcept {
  while (count > 0 && sent >= iov->iov_len) {
    sent -= iov->iov_len;
    ++iov;
    --count;
  }
  if (count > 0) {
    iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + sent;
    iov->iov_len -= sent;
  }
}

}  // namespace blockd
