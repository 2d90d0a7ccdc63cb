// Guest memory regions (see memory.h).
#include "exports/vhost_user/memory.h"

#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <string>

namespace blockd::exports::vhost_user {

GuestMemory::~GuestMemory() { unmap(); }

GuestMemory::GuestMemory(GuestMemory&& other) noexcept : regions_(std::move(other.regions_)) {
  other.regions_.clear();
}

GuestMemory& GuestMemory::operator=(GuestMemory&& other) noexcept {
  if (this != &other) {
    unmap();
    regions_ = std::move(other.regions_);
    other.regions_.clear();
  }
  return *this;
}

void GuestMemory::unmap() noexcept {
  for (const Region& region : regions_) {
    if (region.mapping != nullptr) munmap(region.mapping, region.mapping_length);
  }
  regions_.clear();
}

Expected<GuestMemory> GuestMemory::map(const std::vector<MemoryRegion>& regions,
                                       const std::vector<int>& fds) {
  GuestMemory memory;
  for (size_t i = 0; i < regions.size(); ++i) {
    const MemoryRegion& wanted = regions[i];
    for (const Region& other : memory.regions_) {
      if (wanted.guest_address < other.guest_address + other.size &&
          other.guest_address < wanted.guest_address + wanted.size) {
        return Status::generic("memory region " + std::to_string(i) +
                               " overlaps another in guest physical memory");
      }
    }
    // Map from offset 0 of the file so that an mmap_offset that is not page aligned still works.
    const uint64_t length = wanted.mmap_offset + wanted.size;
    // A region that claims more than its file holds would map pages past the file's end, and the
    // first guest buffer there would kill the daemon with SIGBUS.
    struct stat file;
    if (fstat(fds[i], &file) != 0) {
      return Status::generic("cannot inspect memory region " + std::to_string(i) + ": " +
                             errno_text(-errno));
    }
    if (S_ISREG(file.st_mode) && static_cast<uint64_t>(file.st_size) < length) {
      return Status::generic("memory region " + std::to_string(i) + " ends at byte " +
                             std::to_string(length) + " of a file of " +
                             std::to_string(file.st_size) + " bytes");
    }
    void* mapping = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                         fds[i], 0);
    if (mapping == MAP_FAILED) {
      return Status::generic("cannot map memory region " + std::to_string(i) + " (" +
                             std::to_string(wanted.size) + " bytes): " + errno_text(-errno));
    }
    memory.regions_.push_back(Region{wanted.guest_address, wanted.size, wanted.user_address,
                                     static_cast<uint8_t*>(mapping) + wanted.mmap_offset, mapping,
                                     length});
  }
  return memory;
}

void GuestMemory::add_borrowed(uint64_t guest_address, uint64_t size, uint64_t user_address,
                               uint8_t* host) {
  regions_.push_back(Region{guest_address, size, user_address, host, nullptr, 0});
}

uint8_t* GuestMemory::guest_prefix(uint64_t address, uint64_t length,
                                   uint64_t& contiguous) const noexcept {
  for (const Region& region : regions_) {
    if (address >= region.guest_address && address - region.guest_address < region.size) {
      const uint64_t offset = address - region.guest_address;
      contiguous = std::min(length, region.size - offset);
      return region.host + offset;
    }
  }
  contiguous = 0;
  return nullptr;
}

uint8_t* GuestMemory::find(uint64_t Region::*base, uint64_t address,
                           uint64_t length) const noexcept {
  for (const Region& region : regions_) {
    const uint64_t start = region.*base;
    if (address >= start && address - start <= region.size &&
        length <= region.size - (address - start)) {
      return region.host + (address - start);
    }
  }
  return nullptr;
}

uint8_t* GuestMemory::guest_range(uint64_t address, uint64_t length) const noexcept {
  return find(&Region::guest_address, address, length);
}

uint8_t* GuestMemory::user_range(uint64_t address, uint64_t length) const noexcept {
  return find(&Region::user_address, address, length);
}

}  // namespace blockd::exports::vhost_user
