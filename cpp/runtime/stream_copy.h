// Copying into memory that will not be read again soon: pages of a file's mapping that a write
// fills, where an ordinary copy would first read every destination cache line from memory (a
// store to a line that is not in the cache fetches it), only to overwrite it whole.
#pragma once

#include <cstddef>

namespace blockd {

// Copies `length` bytes from `source` to `target` (the ranges must not overlap), like memcpy.
// The 64-byte lines of `target` that the copy covers whole are written with non-temporal stores,
// which write a line without reading it and leave it out of the cache; the partial lines at
// either end (and a copy too short to hold a whole line) are copied as usual. Non-temporal stores
// are weakly ordered: call stream_fence() after the last copy, before anything tells another
// thread or process that the bytes are there (a reply on a socket, a flag in memory). Without
// SSE2 it is memcpy. Any thread.
void stream_copy(void* target, const void* source, size_t length) noexcept;

// Orders every stream_copy of this thread before its later stores (SFENCE). Any thread.
void stream_fence() noexcept;

}  // namespace blockd
