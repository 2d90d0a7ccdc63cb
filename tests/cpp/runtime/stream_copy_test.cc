#include "runtime/stream_copy.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace blockd {
namespace {

// Copies `length` bytes from source + source_offset to target + target_offset of 64-byte aligned
// buffers filled with different patterns, and checks that exactly those bytes changed.
void check_copy(size_t target_offset, size_t source_offset, size_t length) {
  constexpr size_t kSlack = 192;
  const size_t size = target_offset + length + kSlack;
  alignas(64) static uint8_t target[20480];
  alignas(64) static uint8_t source[20480];
  ASSERT_LE(size, sizeof(target));
  for (size_t i = 0; i < sizeof(source); ++i) {
    source[i] = static_cast<uint8_t>(i * 7 + 3);
    target[i] = static_cast<uint8_t>(0xA5 ^ (i * 13));
  }
  std::vector<uint8_t> expected(target, target + sizeof(target));
  std::memcpy(expected.data() + target_offset, source + source_offset, length);
  stream_copy(target + target_offset, source + source_offset, length);
  stream_fence();
  for (size_t i = 0; i < sizeof(target); ++i) {
    if (target[i] != expected[i]) {
      FAIL() << "byte " << i << " wrong after copying " << length << " bytes to offset "
             << target_offset << " from offset " << source_offset;
    }
  }
}

TEST(StreamCopy, EveryLengthAndTargetAlignmentUpTo300) {
  for (size_t length = 0; length <= 300; ++length) {
    for (size_t target_offset = 0; target_offset < 64; ++target_offset) {
      check_copy(target_offset, 5, length);
      if (HasFatalFailure() || HasFailure()) return;
    }
  }
}

TEST(StreamCopy, EverySourceAlignment) {
  for (size_t source_offset = 0; source_offset < 64; ++source_offset) {
    for (size_t length : {63u, 64u, 65u, 127u, 128u, 129u, 200u}) {
      check_copy(0, source_offset, length);
      check_copy(17, source_offset, length);
      if (HasFailure()) return;
    }
  }
}

TEST(StreamCopy, AroundPagesAndLines) {
  for (size_t length : {4095u, 4096u, 4097u, 8191u, 8192u, 12288u + 33u}) {
    for (size_t target_offset : {0u, 1u, 31u, 32u, 63u, 64u, 4095u, 4096u}) {
      check_copy(target_offset, 0, length);
      check_copy(target_offset, 9, length);
      if (HasFailure()) return;
    }
  }
}

}  // namespace
}  // namespace blockd
