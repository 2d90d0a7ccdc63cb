#include "runtime/frame_allocator.h"

#include <array>
#include <new>

namespace blockd::runtime {
namespace {

constexpr std::size_t kGranule = 64;
constexpr std::size_t kClasses = 64;  // frames up to 4 KiB are recycled
constexpr std::size_t kMaxCachedPerClass = 4096;

struct FreeBlock {
  FreeBlock* next;
};

struct FreeLists {
  std::array<FreeBlock*, kClasses> heads{};
  std::array<std::size_t, kClasses> counts{};
  std::size_t from_heap = 0;

  ~FreeLists() {
    for (FreeBlock* head : heads) {
      while (head != nullptr) {
        FreeBlock* next = head->next;
        ::operator delete(head);
        head = next;
      }
    }
  }
};

thread_local FreeLists free_lists;

std::size_t size_class(std::size_t size) { return (size + kGranule - 1) / kGranule - 1; }

}  // namespace

// Under AddressSanitizer frames go straight to the system allocator so that a use after free of a
// frame is still caught.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kRecycle = false;
#else
constexpr bool kRecycle = true;
#endif

void* allocate_frame(std::size_t size) {
  const std::size_t index = size_class(size);
  if (!kRecycle) return ::operator new(size);
  if (index >= kClasses) return ::operator new(size);
  FreeLists& lists = free_lists;
  if (FreeBlock* block = lists.heads[index]) {
    lists.heads[index] = block->next;
    --lists.counts[index];
    return block;
  }
  ++lists.from_heap;
  return ::operator new((index + 1) * kGranule);
}

void free_frame(void* frame, std::size_t size) noexcept {
  const std::size_t index = size_class(size);
  FreeLists& lists = free_lists;
  if (!kRecycle || index >= kClasses || lists.counts[index] >= kMaxCachedPerClass) {
    ::operator delete(frame);
    return;
  }
  auto* block = static_cast<FreeBlock*>(frame);
  block->next = lists.heads[index];
  lists.heads[index] = block;
  ++lists.counts[index];
}

std::size_t TEST_frames_allocated_from_heap() noexcept { return free_lists.from_heap; }

}  // namespace blockd::runtime
