// Event: a one-thread signal that coroutines can wait for.
//
// Used to wait for conditions such as "no request in flight" without polling. All methods must be
// called on the loop thread that owns the waiters.
#pragma once

#include <coroutine>
#include <vector>

namespace blockd {

class Event {
 public:
  // Wakes every coroutine currently waiting. Waiters resume inside this call, in the order they
  // started waiting. Waiters that arrive later wait for the next notify.
  void notify_all() noexcept {
    std::vector<std::coroutine_handle<>> ready;
    ready.swap(waiters_);
    for (auto handle : ready) handle.resume();
  }

  bool has_waiters() const noexcept { return !waiters_.empty(); }

  // `co_await event.wait()` suspends until the next notify_all().
  auto wait() noexcept {
    struct Awaiter {
      Event* event;
      bool await_ready() const noexcept { return false; }
      void await_suspend(std::coroutine_handle<> handle) { event->waiters_.push_back(handle); }
      void await_resume() const noexcept {}
    };
    return Awaiter{this};
  }

 private:
  std::vector<std::coroutine_handle<>> waiters_;
};

}  // namespace blockd
