// A split ring in ordinary memory for the vhost-user tests: a driver's view of it (descriptors,
// available entries, the used ring) over a GuestMemory region that borrows the buffer.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>

#include "exports/vhost_user/memory.h"
#include "exports/vhost_user/protocol.h"
#include "exports/vhost_user/virtqueue.h"

namespace blockd::exports::vhost_user::testing {

class TestRing {
 public:
  static constexpr uint64_t kGuest = 0x100000;  // guest physical address of the memory
  static constexpr uint64_t kUser = 0x7f0000000000;  // the front-end's address of the same
  static constexpr uint64_t kBytes = 1 << 20;
  static constexpr uint64_t kDescriptors = kGuest;
  static constexpr uint64_t kAvailable = kGuest + 0x4000;
  static constexpr uint64_t kUsed = kGuest + 0x8000;
  static constexpr uint64_t kBuffers = kGuest + 0x10000;  // free for the test's buffers

  explicit TestRing(uint32_t size = 8)
      : host_(static_cast<uint8_t*>(std::aligned_alloc(4096, kBytes))), size_(size) {
    std::memset(host_.get(), 0, kBytes);
    memory.add_borrowed(kGuest, kBytes, kUser, host_.get());
    if (!queue.set_size(size)) std::abort();
    if (!queue.set_guest_addresses(memory, kDescriptors, kAvailable, kUsed)) std::abort();
    queue.start();
  }

  uint8_t* at(uint64_t guest_address) { return host_.get() + (guest_address - kGuest); }

  void describe(uint16_t index, uint64_t address, uint32_t length, uint16_t flags,
                uint16_t next = 0, uint64_t table = kDescriptors) {
    uint8_t* p = at(table + 16 * uint64_t{index});
    store64(p, address);
    store32(p + 8, length);
    store16(p + 12, flags);
    store16(p + 14, next);
  }
  // Makes `head` available and publishes the new index.
  void offer(uint16_t head) {
    store16(at(kAvailable + 4 + 2 * (available_ % size_)), head);
    ++available_;
    store16(at(kAvailable + 2), available_);
  }
  void set_available_index(uint16_t value) { store16(at(kAvailable + 2), value); }
  void set_available_flags(uint16_t flags) { store16(at(kAvailable), flags); }
  void set_used_event(uint16_t value) { store16(at(kAvailable + 4 + 2 * size_), value); }
  uint16_t used_index() { return load16(at(kUsed + 2)); }
  uint32_t used_id(uint16_t slot) { return load32(at(kUsed + 4 + 8 * (slot % size_))); }
  uint32_t used_length(uint16_t slot) { return load32(at(kUsed + 8 + 8 * (slot % size_))); }
  uint16_t available_event() { return load16(at(kUsed + 4 + 8 * size_)); }

  GuestMemory memory;
  SplitQueue queue;

 private:
  struct FreeDeleter {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, FreeDeleter> host_;
  uint32_t size_;
  uint16_t available_ = 0;
};

}  // namespace blockd::exports::vhost_user::testing
