// Guest memory as the front-end shares it with SET_MEM_TABLE: regions of guest physical memory,
// each mapped here from a file descriptor, with the addresses the front-end itself maps them at
// (which SET_VRING_ADDR uses). Every translation checks that the whole range lies inside one
// mapped region; nothing outside the regions is ever handed out.
//
// Threads: built on the export's loop and used there.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "exports/vhost_user/protocol.h"
#include "runtime/status.h"

namespace blockd::exports::vhost_user {

class GuestMemory {
 public:
  GuestMemory() = default;
  ~GuestMemory();
  GuestMemory(GuestMemory&& other) noexcept;
  GuestMemory& operator=(GuestMemory&& other) noexcept;
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;

  // Maps each region from its descriptor (fds[i] for regions[i], shared, read-write). The
  // descriptors stay the caller's. Errors: mmap failures (with the region and strerror), regions
  // whose guest ranges overlap.
  static Expected<GuestMemory> map(const std::vector<MemoryRegion>& regions,
                                   const std::vector<int>& fds);

  // Adds a region over memory the caller owns and keeps alive (unit tests, fuzzing).
  void add_borrowed(uint64_t guest_address, uint64_t size, uint64_t user_address, uint8_t* host);

  bool empty() const noexcept { return regions_.empty(); }

  // The host address of guest physical [address, address + length) when all of it lies inside
  // one region; else null. A zero length is allowed inside a region.
  uint8_t* guest_range(uint64_t address, uint64_t length) const noexcept;
  // The host address of `address` and how many bytes from there on lie in the same region
  // (`contiguous`, at most `length`); null when `address` is in no region.
  uint8_t* guest_prefix(uint64_t address, uint64_t length, uint64_t& contiguous) const noexcept;
  // The same as guest_range for an address in the front-end's own mapping (SET_VRING_ADDR).
  uint8_t* user_range(uint64_t address, uint64_t length) const noexcept;

 private:
  struct Region {
    uint64_t guest_address;
    uint64_t size;
    uint64_t user_address;
    uint8_t* host;
    void* mapping;  // what to munmap (null when borrowed)
    size_t mapping_length;
  };
  void unmap() noexcept;
  // The host address of [address, address + length) inside one region, `base` naming which of
  // the region's start addresses `address` is relative to; else null.
  uint8_t* find(uint64_t Region::*base, uint64_t address, uint64_t length) const noexcept;
  std::vector<Region> regions_;
};

}  // namespace blockd::exports::vhost_user
