// Split virtqueues (virtio 1.x, "Split Virtqueues"): the device side of one ring in guest memory.
//
// A ring has three parts, each little-endian in guest memory: the descriptor table (16 bytes per
// descriptor: u64 address, u32 length, u16 flags, u16 next), the available ring (u16 flags, u16
// idx, u16 ring[size], u16 used_event) that the driver fills with the heads of chains it offers,
// and the used ring (u16 flags, u16 idx, {u32 id, u32 len} ring[size], u16 avail_event) where the
// device returns them. A chain is followed through NEXT links; a descriptor with INDIRECT points
// at a table of further descriptors in guest memory. Device-writable descriptors come after the
// device-readable ones.
//
// The guest owns the ring memory and may change it at any time: each descriptor is read once into
// a local copy, every index is checked against its table, chains longer than their table are
// loops, and every buffer is translated through GuestMemory, which refuses anything outside the
// mapped regions. What is wrong is reported as a message; the queue is then unusable (the caller
// stops serving it), nothing is read or written outside guest memory.
//
// Threads: the export's loop.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

#include "exports/vhost_user/memory.h"
#include "exports/vhost_user/protocol.h"

namespace blockd::exports::vhost_user {

// Descriptor flags.
constexpr uint16_t kDescNext = 1;
constexpr uint16_t kDescWrite = 2;
constexpr uint16_t kDescIndirect = 4;
// Available ring flag: the driver wants no interrupt (without EVENT_IDX).
constexpr uint16_t kAvailNoInterrupt = 1;

// The most buffers (iovecs) one chain may gather, and the most descriptors in an indirect table.
constexpr size_t kMaxChainSegments = 1024;
constexpr uint32_t kMaxIndirectDescriptors = 1024;

// One chain taken from the available ring: its head (returned in the used ring) and its buffers
// in host memory, device-readable first.
struct Chain {
  uint16_t head = 0;
  std::vector<iovec> readable;
  std::vector<iovec> writable;
  void clear() noexcept {
    readable.clear();
    writable.clear();
  }
};

// Follows the chain starting at descriptor `head` of the table at `table` (`table_size`
// descriptors, in host memory) and appends its buffers to `chain`. An indirect descriptor is
// followed when `allow_indirect` (never inside an indirect table). Returns "" or what is wrong.
std::string walk_chain(const GuestMemory& memory, const uint8_t* table, uint32_t table_size,
                       uint16_t head, bool allow_indirect, Chain& chain);

class SplitQueue {
 public:
  // SET_VRING_NUM: a power of two from 1 to kMaxQueueSize.
  Status set_size(uint32_t size);
  uint32_t size() const noexcept { return size_; }
  // SET_VRING_ADDR: translates the three parts through the front-end's addresses in `memory`
  // (which must cover each whole part). Needs the size first.
  Status set_addresses(const GuestMemory& memory, const VringAddress& address);
  // The same from guest physical addresses (tests).
  Status set_guest_addresses(const GuestMemory& memory, uint64_t descriptors, uint64_t available,
                             uint64_t used);
  bool ready() const noexcept { return descriptors_ != nullptr; }
  // SET_VRING_BASE: where the next available entry is read. The used index is taken from the
  // ring itself when it starts (start()).
  void set_base(uint16_t base) noexcept { last_available_ = base; }
  uint16_t last_available() const noexcept { return last_available_; }
  // Reads the used index from the ring; call when the queue starts serving.
  void start() noexcept;
  // Forgets the addresses (GET_VRING_BASE, a new memory table, a disconnect).
  void reset_addresses() noexcept;

  void set_event_index(bool on) noexcept { event_index_ = on; }

  // Takes the next available chain into `chain` (cleared first): 1 when there was one, 0 when the
  // ring is empty, -1 when the ring or the chain is malformed (`error` says how).
  int pop(const GuestMemory& memory, Chain& chain, std::string& error);
  // After a run of pop()s that emptied the ring: with EVENT_IDX, asks the driver to kick for the
  // next entry (avail_event) and returns true if entries arrived meanwhile (pop again).
  bool arm_kick() noexcept;
  // Returns chain `head` to the driver with `written` bytes written into its buffers.
  void push(uint16_t head, uint32_t written) noexcept;
  // Whether the driver wants an interrupt for what push() returned since the last one that was
  // signalled; true moves that mark.
  bool should_notify() noexcept;

 private:
  uint16_t available_index() const noexcept;

  uint32_t size_ = 0;
  uint8_t* descriptors_ = nullptr;
  uint8_t* available_ = nullptr;
  uint8_t* used_ = nullptr;
  uint16_t last_available_ = 0;
  uint16_t used_index_ = 0;
  uint16_t signalled_used_ = 0;
  bool signalled_valid_ = false;
  bool event_index_ = false;
};

}  // namespace blockd::exports::vhost_user
