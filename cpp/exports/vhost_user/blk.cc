// virtio-blk request handling (see blk.h).
#include "exports/vhost_user/blk.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace blockd::exports::vhost_user {

namespace {

constexpr size_t kHeaderBytes = 16;
constexpr size_t kSegmentBytes = 16;
constexpr const char kSerial[] = "vhost_user_blk";

size_t total_length(const std::vector<iovec>& segments) noexcept {
  size_t total = 0;
  for (const iovec& segment : segments) total += segment.iov_len;
  return total;
}

// Calls `visit(piece, done, take)` for each run of the `length` bytes that start `offset` bytes
// into `segments` (`done` bytes visited before it); returns how many bytes there were.
template <typename Visit>
size_t for_each_piece(const std::vector<iovec>& segments, size_t offset, size_t length,
                      Visit visit) noexcept {
  size_t done = 0;
  for (const iovec& segment : segments) {
    if (done == length) break;
    if (offset >= segment.iov_len) {
      offset -= segment.iov_len;
      continue;
    }
    const size_t take = std::min(segment.iov_len - offset, length - done);
    visit(static_cast<uint8_t*>(segment.iov_base) + offset, done, take);
    done += take;
    offset = 0;
  }
  return done;
}

// The host address of `length` bytes from `offset` on when they are one contiguous run of
// memory (adjacent guest pages usually are), else null.
uint8_t* contiguous_run(const std::vector<iovec>& segments, size_t offset, size_t length) noexcept {
  uint8_t* start = nullptr;
  bool contiguous = true;
  const size_t found = for_each_piece(segments, offset, length,
                                      [&](uint8_t* piece, size_t done, size_t) {
                                        if (start == nullptr) {
                                          start = piece;
                                        } else if (piece != start + done) {
                                          contiguous = false;
                                        }
                                      });
  return found == length && contiguous ? start : nullptr;
}

struct FreeDeleter {
  void operator()(void* p) const noexcept { std::free(p); }
};
using BounceBuffer = std::unique_ptr<uint8_t, FreeDeleter>;

BounceBuffer allocate_bounce(size_t length) noexcept {
  const size_t rounded = (length + 4095) & ~size_t{4095};
  return BounceBuffer(static_cast<uint8_t*>(std::aligned_alloc(4096, std::max<size_t>(rounded, 4096))));
}

// QEMU's range rules for a request of `bytes` at `sector`.
bool range_ok(const BlkDeviceOptions& options, uint64_t sector, uint64_t bytes) noexcept {
  if (bytes % kBlkSectorSize != 0 || bytes > kBlkMaxTransfer) return false;
  if (sector > (UINT64_MAX >> 9) || (sector * kBlkSectorSize) % options.logical_block_size != 0) {
    return false;
  }
  const uint64_t total_sectors = options.size / kBlkSectorSize;
  const uint64_t sectors = bytes / kBlkSectorSize;
  return sector <= total_sectors && sectors <= total_sectors - sector;
}

Task<uint8_t> read_into(block::BlockBackend& backend, uint64_t offset,
                        const std::vector<iovec>& segments, size_t length) noexcept {
  if (length == 0) co_return kBlkStatusOk;
  if (uint8_t* run = contiguous_run(segments, 0, length)) {
    co_return co_await backend.read(offset, length, run, 0) < 0 ? kBlkStatusIoError : kBlkStatusOk;
  }
  BounceBuffer bounce = allocate_bounce(length);
  if (!bounce) co_return kBlkStatusIoError;
  if (co_await backend.read(offset, length, bounce.get(), 0) < 0) co_return kBlkStatusIoError;
  scatter(segments, 0, bounce.get(), length);
  co_return kBlkStatusOk;
}

Task<uint8_t> write_from(block::BlockBackend& backend, uint64_t offset,
                         const std::vector<iovec>& segments, size_t skip, size_t length) noexcept {
  if (length == 0) co_return kBlkStatusOk;
  if (const uint8_t* run = contiguous_run(segments, skip, length)) {
    co_return co_await backend.write(offset, length, run, 0) < 0 ? kBlkStatusIoError
                                                                 : kBlkStatusOk;
  }
  BounceBuffer bounce = allocate_bounce(length);
  if (!bounce) co_return kBlkStatusIoError;
  gather(segments, skip, bounce.get(), length);
  co_return co_await backend.write(offset, length, bounce.get(), 0) < 0 ? kBlkStatusIoError
                                                                        : kBlkStatusOk;
}

Task<uint8_t> discard_or_zero(block::BlockBackend& backend, const BlkDeviceOptions& options,
                              const std::vector<iovec>& readable, uint32_t type) noexcept {
  // One segment only, as the configuration says (max_*_seg = 1).
  if (total_length(readable) - kHeaderBytes > kSegmentBytes) co_return kBlkStatusUnsupported;
  uint8_t segment[kSegmentBytes];
  if (gather(readable, kHeaderBytes, segment, kSegmentBytes) != kSegmentBytes) {
    co_return kBlkStatusIoError;
  }
  const uint64_t sector = load64(segment);
  const uint32_t sectors = load32(segment + 8);
  const uint32_t flags = load32(segment + 12);
  const uint32_t limit =
      type == kBlkTypeWriteZeroes ? kBlkMaxWriteZeroesSectors : kBlkMaxDiscardSectors;
  const uint64_t bytes = uint64_t{sectors} * kBlkSectorSize;
  if (sectors > limit || !range_ok(options, sector, bytes)) co_return kBlkStatusIoError;
  if (flags & ~kBlkWriteZeroesUnmap) co_return kBlkStatusUnsupported;
  const uint64_t offset = sector * kBlkSectorSize;
  if (type == kBlkTypeWriteZeroes) {
    const uint32_t request_flags = (flags & kBlkWriteZeroesUnmap) ? uint32_t{block::kRequestMayUnmap} : 0u;
    co_return co_await backend.write_zeroes(offset, bytes, request_flags) < 0 ? kBlkStatusIoError
                                                                              : kBlkStatusOk;
  }
  if (flags & kBlkWriteZeroesUnmap) co_return kBlkStatusUnsupported;
  co_return co_await backend.discard(offset, bytes) < 0 ? kBlkStatusIoError : kBlkStatusOk;
}

}  // namespace

uint64_t blk_features(const BlkDeviceOptions& options) noexcept {
  uint64_t features = kBlkSizeMax | kBlkSegMax | kBlkTopology | kBlkBlockSize | kBlkFlush |
                      kBlkDiscard | kBlkWriteZeroes | kBlkConfigWce | kBlkMq;
  if (!options.writable) features |= kBlkRo;
  return features;
}

std::array<uint8_t, kBlkConfigSize> blk_config(const BlkDeviceOptions& options) noexcept {
  std::array<uint8_t, kBlkConfigSize> config{};
  uint8_t* p = config.data();
  store64(p + 0, options.size / kBlkSectorSize);  // capacity
  store32(p + 8, 0);                              // size_max: no limit
  store32(p + 12, kBlkSegMaxValue);               // seg_max
  // 16..19: geometry, unused
  store32(p + 20, options.logical_block_size);  // blk_size
  // 24: topology: physical_block_exp, alignment_offset (0), min_io_size, opt_io_size
  store16(p + 26, 1);
  store32(p + 28, 1);
  p[kBlkConfigWceOffset] = options.write_cache ? 1 : 0;
  store16(p + 34, options.num_queues);
  store32(p + 36, kBlkMaxDiscardSectors);
  store32(p + 40, 1);  // max_discard_seg
  store32(p + 44, options.logical_block_size / kBlkSectorSize);  // discard_sector_alignment
  store32(p + 48, kBlkMaxWriteZeroesSectors);
  store32(p + 52, 1);  // max_write_zeroes_seg
  // 56: write_zeroes_may_unmap = 0, 57..59 unused
  return config;
}

size_t gather(const std::vector<iovec>& segments, size_t offset, void* out,
              size_t length) noexcept {
  auto* to = static_cast<uint8_t*>(out);
  return for_each_piece(segments, offset, length, [&](uint8_t* piece, size_t done, size_t take) {
    std::memcpy(to + done, piece, take);
  });
}

size_t scatter(const std::vector<iovec>& segments, size_t offset, const void* in,
               size_t length) noexcept {
  const auto* from = static_cast<const uint8_t*>(in);
  return for_each_piece(segments, offset, length, [&](uint8_t* piece, size_t done, size_t take) {
    std::memcpy(piece, from + done, take);
  });
}

Task<uint32_t> run_blk_request(block::BlockBackend& backend, const BlkDeviceOptions& options,
                               const Chain& chain) noexcept {
  const size_t in_length = total_length(chain.writable);
  if (in_length == 0) co_return 0;
  // The status byte is the last device-writable byte; the data before it.
  const iovec& last = chain.writable.back();
  uint8_t* status = static_cast<uint8_t*>(last.iov_base) + last.iov_len - 1;
  const size_t data_in = in_length - 1;
  uint8_t header[kHeaderBytes];
  if (gather(chain.readable, 0, header, kHeaderBytes) != kHeaderBytes) {
    *status = kBlkStatusIoError;
    co_return static_cast<uint32_t>(in_length);
  }
  const uint32_t type = load32(header) & ~kBlkTypeBarrier;
  const uint64_t sector = load64(header + 8);
  uint8_t result = kBlkStatusUnsupported;
  switch (type) {
    case kBlkTypeIn:
      if (range_ok(options, sector, data_in)) {
        result = co_await read_into(backend, sector * kBlkSectorSize, chain.writable, data_in);
      } else {
        result = kBlkStatusIoError;
      }
      break;
    case kBlkTypeOut: {
      const size_t data_out = total_length(chain.readable) - kHeaderBytes;
      if (!options.writable || !range_ok(options, sector, data_out)) {
        result = kBlkStatusIoError;
      } else {
        result = co_await write_from(backend, sector * kBlkSectorSize, chain.readable,
                                     kHeaderBytes, data_out);
      }
      break;
    }
    case kBlkTypeFlush:
      result = co_await backend.flush() < 0 ? kBlkStatusIoError : kBlkStatusOk;
      break;
    case kBlkTypeGetId: {
      const size_t length = std::min({sizeof kSerial, data_in, kBlkIdBytes});
      scatter(chain.writable, 0, kSerial, length);
      result = kBlkStatusOk;
      break;
    }
    case kBlkTypeDiscard:
    case kBlkTypeWriteZeroes:
      if (options.writable) {
        result = co_await discard_or_zero(backend, options, chain.readable, type);
      } else {
        result = kBlkStatusIoError;
      }
      break;
    default:
      break;
  }
  *status = result;
  co_return static_cast<uint32_t>(in_length);
}

}  // namespace blockd::exports::vhost_user
