// The virtio-blk device (virtio 1.x, "Block Device"): its feature bits, its configuration space
// and the handling of one request chain on a BlockBackend.
//
// A request is a 16-byte header (u32 type, u32 reserved, u64 sector in 512-byte units) in the
// device-readable buffers, then the data (device-readable for OUT, device-writable for IN), then
// one status byte at the very end of the device-writable buffers. Types served: IN, OUT, FLUSH,
// GET_ID (the serial "vhost_user_blk", as qemu-storage-daemon's vhost-user-blk export answers),
// DISCARD and WRITE_ZEROES (one segment: u64 sector, u32 sectors, u32 flags with bit 0 = unmap).
// Anything else is answered UNSUPP. Ranges follow qemu-storage-daemon's rules: a whole number of
// 512-byte sectors, starting on a logical block, inside the capacity; a write to a read-only
// export or a range that breaks these rules is IOERR.
//
// Threads: the backend's loop.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "block/backend.h"
#include "exports/vhost_user/virtqueue.h"
#include "runtime/task.h"

namespace blockd::exports::vhost_user {

// Device feature bits.
constexpr uint64_t kBlkSizeMax = 1ull << 1;
constexpr uint64_t kBlkSegMax = 1ull << 2;
constexpr uint64_t kBlkRo = 1ull << 5;
constexpr uint64_t kBlkBlockSize = 1ull << 6;
constexpr uint64_t kBlkFlush = 1ull << 9;
constexpr uint64_t kBlkTopology = 1ull << 10;
constexpr uint64_t kBlkConfigWce = 1ull << 11;
constexpr uint64_t kBlkMq = 1ull << 12;
constexpr uint64_t kBlkDiscard = 1ull << 13;
constexpr uint64_t kBlkWriteZeroes = 1ull << 14;

// Request types and status values.
constexpr uint32_t kBlkTypeIn = 0;
constexpr uint32_t kBlkTypeOut = 1;
constexpr uint32_t kBlkTypeFlush = 4;
constexpr uint32_t kBlkTypeGetId = 8;
constexpr uint32_t kBlkTypeDiscard = 11;
constexpr uint32_t kBlkTypeWriteZeroes = 13;
constexpr uint32_t kBlkTypeBarrier = 0x80000000u;  // legacy flag, ignored
constexpr uint8_t kBlkStatusOk = 0;
constexpr uint8_t kBlkStatusIoError = 1;
constexpr uint8_t kBlkStatusUnsupported = 2;
constexpr uint32_t kBlkWriteZeroesUnmap = 1;

constexpr uint32_t kBlkSectorSize = 512;
constexpr size_t kBlkConfigSize = 60;  // struct virtio_blk_config up to write_zeroes_may_unmap
constexpr size_t kBlkConfigWceOffset = 32;
constexpr uint32_t kBlkSegMaxValue = 126;
constexpr uint32_t kBlkMaxDiscardSectors = 32768;
constexpr uint32_t kBlkMaxWriteZeroesSectors = 32768;
constexpr size_t kBlkIdBytes = 20;
// The largest data transfer one request may ask for.
constexpr uint64_t kBlkMaxTransfer = 64ull << 20;

struct BlkDeviceOptions {
  uint64_t size = 0;  // bytes
  uint32_t logical_block_size = 512;
  uint16_t num_queues = 1;
  bool writable = false;
  bool write_cache = false;  // the config's writeback byte (CONFIG_WCE)
};

// The feature bits offered (GET_FEATURES), without the transport's own.
uint64_t blk_features(const BlkDeviceOptions& options) noexcept;
// The configuration space, little-endian.
std::array<uint8_t, kBlkConfigSize> blk_config(const BlkDeviceOptions& options) noexcept;

// Serves one request chain on `backend` and writes its status byte. Returns the number of bytes
// written into the chain's device-writable buffers (the used ring's length): 0 when the chain
// has no device-writable byte to put a status in (the request is then not run).
Task<uint32_t> run_blk_request(block::BlockBackend& backend, const BlkDeviceOptions& options,
                               const Chain& chain) noexcept;

// Copies `length` bytes starting `offset` bytes into the buffers `segments` to `out`; returns how
// many were there.
size_t gather(const std::vector<iovec>& segments, size_t offset, void* out, size_t length) noexcept;
// Copies `length` bytes from `in` into the buffers starting `offset` bytes in; returns how many fit.
size_t scatter(const std::vector<iovec>& segments, size_t offset, const void* in,
               size_t length) noexcept;

}  // namespace blockd::exports::vhost_user
