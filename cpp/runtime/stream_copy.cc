// stream_copy: see stream_copy.h.
#include "runtime/stream_copy.h"

#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#else
#include <atomic>
#endif

namespace blockd {

namespace {

constexpr uintptr_t kLine = 64;

}  // namespace

void stream_copy(void* target, const void* source, size_t length) noexcept {
  auto* out = static_cast<uint8_t*>(target);
  const auto* in = static_cast<const uint8_t*>(source);
#if defined(__SSE2__)
  const auto address = reinterpret_cast<uintptr_t>(out);
  const uintptr_t first_line = (address + kLine - 1) & ~(kLine - 1);
  const uintptr_t end_line = (address + length) & ~(kLine - 1);
  if (first_line < end_line) {
    const size_t head = first_line - address;
    std::memcpy(out, in, head);
    out += head;
    in += head;
    for (uintptr_t line = first_line; line < end_line; line += kLine, out += kLine, in += kLine) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(out), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(out + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(out + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(out + 48), d);
    }
    length = address + length - end_line;  // the tail
  }
#endif
  std::memcpy(out, in, length);
}

void stream_fence() noexcept {
#if defined(__SSE2__)
  _mm_sfence();
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

}  // namespace blockd
