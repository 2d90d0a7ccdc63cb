// libFuzzer target: untrusted bytes from a vhost-user front-end and from a guest.
//
// The first byte picks what the rest is:
//   even: a vhost-user message (12-byte header, payload) handed to the decoder its request
//         names, with the descriptor count taken from the second byte;
//   odd:  guest memory holding a split ring (size and EVENT_IDX from the second byte) whose available
//         entries are popped until the ring is empty or refused; every buffer handed out must
//         lie inside the memory, and a run must end.
// Nothing may crash or read outside the input.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "exports/vhost_user/memory.h"
#include "exports/vhost_user/protocol.h"
#include "exports/vhost_user/virtqueue.h"

namespace {

using namespace blockd::exports::vhost_user;  // NOLINT(google-build-using-namespace)

void fuzz_message(std::span<const uint8_t> in) {
  if (in.size() < 1 + kHeaderSize) return;
  const size_t fds = in[0] % (kMaxFds + 2);
  in = in.subspan(1);
  auto header = parse_header(in.first<kHeaderSize>());
  if (!header) return;
  const auto payload = in.subspan(kHeaderSize, std::min<size_t>(header->size, in.size() - kHeaderSize));
  switch (static_cast<Request>(header->request % 40)) {
    case Request::kSetMemTable: {
      auto regions = parse_memory_table(payload, fds);
      if (regions && (regions->empty() || regions->size() > kMaxRegions)) __builtin_trap();
      break;
    }
    case Request::kSetVringNum:
    case Request::kSetVringBase:
    case Request::kGetVringBase:
    case Request::kSetVringEnable:
      (void)parse_vring_state(payload);
      break;
    case Request::kSetVringAddr:
      (void)parse_vring_address(payload);
      break;
    case Request::kGetConfig:
    case Request::kSetConfig: {
      auto range = parse_config(payload);
      if (range && (range->bytes.size() != range->size ||
                    range->bytes.data() + range->size > payload.data() + payload.size())) {
        __builtin_trap();
      }
      break;
    }
    default:
      (void)parse_u64(payload);
      break;
  }
}

void fuzz_ring(std::span<const uint8_t> in) {
  if (in.size() < 2) return;
  constexpr uint64_t kGuest = 0x10000;
  constexpr size_t kBytes = 64 * 1024;
  const uint32_t size = 1u << (in[0] % 9);  // 1 to 256 entries
  const bool event_index = (in[0] & 0x80) != 0;
  in = in.subspan(1);
  // The memory: the input, then zeroes; two adjacent regions so buffers may cross between them.
  std::vector<uint8_t> first(kBytes / 2, 0);
  std::vector<uint8_t> second(kBytes / 2, 0);
  std::memcpy(first.data(), in.data(), std::min(in.size(), first.size()));
  if (in.size() > first.size()) {
    std::memcpy(second.data(), in.data() + first.size(), std::min(in.size() - first.size(), second.size()));
  }
  GuestMemory memory;
  memory.add_borrowed(kGuest, first.size(), 0, first.data());
  memory.add_borrowed(kGuest + first.size(), second.size(), first.size(), second.data());
  SplitQueue queue;
  if (!queue.set_size(size)) __builtin_trap();
  // Descriptors at the start, the available ring after them, the used ring in the second half.
  if (!queue.set_guest_addresses(memory, kGuest, kGuest + 16 * size, kGuest + kBytes / 2)) return;
  queue.start();
  queue.set_event_index(event_index);
  auto inside = [&](const iovec& segment) {
    const auto* base = static_cast<const uint8_t*>(segment.iov_base);
    auto within = [&](const std::vector<uint8_t>& region) {
      return base >= region.data() && base + segment.iov_len <= region.data() + region.size();
    };
    return within(first) || within(second);
  };
  Chain chain;
  std::string error;
  for (uint32_t taken = 0; taken <= 2 * size; ++taken) {
    const int popped = queue.pop(memory, chain, error);
    if (popped < 0) return;
    if (popped == 0) {
      if (!queue.arm_kick()) return;
      continue;
    }
    if (chain.readable.size() + chain.writable.size() > kMaxChainSegments) __builtin_trap();
    for (const iovec& segment : chain.readable) {
      if (!inside(segment)) __builtin_trap();
    }
    for (const iovec& segment : chain.writable) {
      if (!inside(segment)) __builtin_trap();
    }
    queue.push(chain.head, 1);
    (void)queue.should_notify();
  }
  // More entries than the ring holds without the available index moving again: impossible.
  __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::span<const uint8_t> in(data + 1, size - 1);
  if (data[0] % 2 == 0) {
    fuzz_message(in);
  } else {
    fuzz_ring(in);
  }
  return 0;
}
