// A recycling allocator for coroutine frames.
//
// Every I/O request is a chain of Task coroutines, and a coroutine frame is normally
// heap-allocated. To keep the data path free of malloc, frames are carved from per-thread free
// lists of fixed size classes: after warm-up, starting a request reuses frames freed by earlier
// requests. A frame may be freed on a different thread than the one that allocated it; it then
// simply joins that thread's list. Each list is touched only by its own thread, so no locking is
// needed.
#pragma once

#include <cstddef>

namespace blockd::runtime {

// Returns storage for a coroutine frame of `size` bytes. Never returns null (throws bad_alloc like
// operator new when memory is exhausted, which terminates inside noexcept code).
void* allocate_frame(std::size_t size);

// Returns a frame obtained from allocate_frame. `size` must be the size passed there.
void free_frame(void* frame, std::size_t size) noexcept;

// Number of frames this thread obtained from the system allocator, for tests that check that
// steady-state I/O reuses frames.
std::size_t TEST_frames_allocated_from_heap() noexcept;

}  // namespace blockd::runtime
