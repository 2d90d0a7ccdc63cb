// Split virtqueue walking (see virtqueue.h).
#include "exports/vhost_user/virtqueue.h"

#include <atomic>
#include <cstdio>

namespace blockd::exports::vhost_user {

namespace {

constexpr size_t kDescriptorSize = 16;

struct Descriptor {
  uint64_t address;
  uint32_t length;
  uint16_t flags;
  uint16_t next;
};

Descriptor read_descriptor(const uint8_t* table, uint32_t index) noexcept {
  const uint8_t* p = table + size_t{index} * kDescriptorSize;
  return Descriptor{load64(p), load32(p + 8), load16(p + 12), load16(p + 14)};
}

std::string hex(uint64_t value) {
  char text[24];
  snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(value));
  return text;
}

size_t descriptor_table_bytes(uint32_t size) { return size_t{size} * kDescriptorSize; }
size_t available_ring_bytes(uint32_t size) { return 6 + 2 * size_t{size}; }
size_t used_ring_bytes(uint32_t size) { return 6 + 8 * size_t{size}; }

// Translates one descriptor's buffer into host segments appended to `out` (several when it
// crosses from one region into an adjacent one).
std::string add_buffer(const GuestMemory& memory, const Descriptor& descriptor, Chain& chain,
                       std::vector<iovec>& out) {
  uint64_t address = descriptor.address;
  uint64_t remaining = descriptor.length;
  while (remaining > 0) {
    uint64_t contiguous = 0;
    uint8_t* host = memory.guest_prefix(address, remaining, contiguous);
    if (host == nullptr) {
      return "buffer at guest address " + hex(address) + " is outside guest memory";
    }
    if (chain.readable.size() + chain.writable.size() >= kMaxChainSegments) {
      return "descriptor chain has more than " + std::to_string(kMaxChainSegments) + " buffers";
    }
    out.push_back(iovec{host, static_cast<size_t>(contiguous)});
    address += contiguous;
    remaining -= contiguous;
  }
  return "";
}

}  // namespace

std::string walk_chain(const GuestMemory& memory, const uint8_t* table, uint32_t table_size,
                       uint16_t head, bool allow_indirect, Chain& chain) {
  uint32_t index = head;
  uint32_t visited = 0;
  while (true) {
    if (index >= table_size) {
      return "descriptor index " + std::to_string(index) + " is beyond the table of " +
             std::to_string(table_size);
    }
    if (++visited > table_size) return "descriptor chain loops";
    const Descriptor descriptor = read_descriptor(table, index);
    if (descriptor.flags & kDescIndirect) {
      if (!allow_indirect) return "indirect descriptor inside an indirect table";
      if (visited != 1 || (descriptor.flags & kDescNext)) {
        return "indirect descriptor that is not a chain of its own";
      }
      if (descriptor.length == 0 || descriptor.length % kDescriptorSize != 0 ||
          descriptor.length / kDescriptorSize > kMaxIndirectDescriptors) {
        return "indirect table of " + std::to_string(descriptor.length) + " bytes";
      }
      const uint8_t* indirect = memory.guest_range(descriptor.address, descriptor.length);
      if (indirect == nullptr) return "indirect table is outside guest memory";
      return walk_chain(memory, indirect, descriptor.length / kDescriptorSize, 0, false, chain);
    }
    if (descriptor.flags & kDescWrite) {
      std::string error = add_buffer(memory, descriptor, chain, chain.writable);
      if (!error.empty()) return error;
    } else {
      if (!chain.writable.empty()) return "device-readable buffer after a device-writable one";
      std::string error = add_buffer(memory, descriptor, chain, chain.readable);
      if (!error.empty()) return error;
    }
    if (!(descriptor.flags & kDescNext)) return "";
    index = descriptor.next;
  }
}

Status SplitQueue::set_size(uint32_t size) {
  if (size == 0 || size > kMaxQueueSize || (size & (size - 1)) != 0) {
    return Status::generic("queue size " + std::to_string(size) +
                           " is not a power of two from 1 to " + std::to_string(kMaxQueueSize));
  }
  size_ = size;
  return Status::ok();
}

Status SplitQueue::set_addresses(const GuestMemory& memory, const VringAddress& address) {
  if (size_ == 0) return Status::generic("ring addresses set before the ring size");
  uint8_t* descriptors = memory.user_range(address.descriptors, descriptor_table_bytes(size_));
  uint8_t* available = memory.user_range(address.available, available_ring_bytes(size_) + 2);
  uint8_t* used = memory.user_range(address.used, used_ring_bytes(size_) + 2);
  if (descriptors == nullptr || available == nullptr || used == nullptr) {
    return Status::generic("ring " + std::to_string(address.index) +
                           " lies outside the memory table");
  }
  if (reinterpret_cast<uintptr_t>(available) % 2 != 0 ||
      reinterpret_cast<uintptr_t>(used) % 4 != 0) {
    return Status::generic("ring " + std::to_string(address.index) + " is misaligned");
  }
  descriptors_ = descriptors;
  available_ = available;
  used_ = used;
  return Status::ok();
}

Status SplitQueue::set_guest_addresses(const GuestMemory& memory, uint64_t descriptors,
                                       uint64_t available, uint64_t used) {
  if (size_ == 0) return Status::generic("ring addresses set before the ring size");
  descriptors_ = memory.guest_range(descriptors, descriptor_table_bytes(size_));
  available_ = memory.guest_range(available, available_ring_bytes(size_) + 2);
  used_ = memory.guest_range(used, used_ring_bytes(size_) + 2);
  if (descriptors_ == nullptr || available_ == nullptr || used_ == nullptr) {
    reset_addresses();
    return Status::generic("ring lies outside guest memory");
  }
  return Status::ok();
}

void SplitQueue::start() noexcept {
  used_index_ = __atomic_load_n(reinterpret_cast<uint16_t*>(used_ + 2), __ATOMIC_ACQUIRE);
  signalled_valid_ = false;
}

void SplitQueue::reset_addresses() noexcept {
  descriptors_ = nullptr;
  available_ = nullptr;
  used_ = nullptr;
}

uint16_t SplitQueue::available_index() const noexcept {
  return __atomic_load_n(reinterpret_cast<const uint16_t*>(available_ + 2), __ATOMIC_ACQUIRE);
}

int SplitQueue::pop(const GuestMemory& memory, Chain& chain, std::string& error) {
  chain.clear();
  const uint16_t available = available_index();
  if (available == last_available_) return 0;
  if (static_cast<uint16_t>(available - last_available_) > size_) {
    error = "available index moved " +
            std::to_string(static_cast<uint16_t>(available - last_available_)) +
            " entries ahead in a ring of " + std::to_string(size_);
    return -1;
  }
  const uint16_t head = load16(available_ + 4 + 2 * (last_available_ & (size_ - 1)));
  ++last_available_;
  chain.head = head;
  error = walk_chain(memory, descriptors_, size_, head, true, chain);
  return error.empty() ? 1 : -1;
}

bool SplitQueue::arm_kick() noexcept {
  if (!event_index_) return false;
  auto* avail_event = reinterpret_cast<uint16_t*>(used_ + 4 + 8 * size_t{size_});
  __atomic_store_n(avail_event, last_available_, __ATOMIC_RELAXED);
  // The driver must see avail_event before we look at its index again, or a kick is lost.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return available_index() != last_available_;
}

void SplitQueue::push(uint16_t head, uint32_t written) noexcept {
  uint8_t* element = used_ + 4 + 8 * size_t{used_index_ & (size_ - 1)};
  store32(element, head);
  store32(element + 4, written);
  ++used_index_;
  __atomic_store_n(reinterpret_cast<uint16_t*>(used_ + 2), used_index_, __ATOMIC_RELEASE);
}

bool SplitQueue::should_notify() noexcept {
  // The driver's flags or used_event must be read after our used index is visible to it.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const uint16_t current = used_index_;
  if (!event_index_) {
    signalled_used_ = current;
    return (load16(available_) & kAvailNoInterrupt) == 0;
  }
  const uint16_t used_event = __atomic_load_n(
      reinterpret_cast<const uint16_t*>(available_ + 4 + 2 * size_t{size_}), __ATOMIC_RELAXED);
  const uint16_t previous = signalled_used_;
  const bool valid = signalled_valid_;
  signalled_used_ = current;
  signalled_valid_ = true;
  if (!valid) return true;
  // Notify when used_event lies in (previous, current]: the driver asked to hear about it.
  return static_cast<uint16_t>(current - used_event - 1) < static_cast<uint16_t>(current - previous);
}

}  // namespace blockd::exports::vhost_user
