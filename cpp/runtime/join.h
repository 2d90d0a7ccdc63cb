// Join: runs several tasks concurrently on one loop and waits for all of them.
//
// Used by drivers that fan a request out to several children (quorum). Each task is started at
// once (it runs until its first suspension inside start()); `co_await join.wait()` resumes the
// caller when the last one has finished. Loop thread only; the Join must outlive its tasks, which
// waiting for them guarantees.
#pragma once

#include <coroutine>
#include <cstddef>
#include <utility>

#include "runtime/loop.h"
#include "runtime/task.h"

namespace blockd {

class Join {
 public:
  Join() = default;
  Join(const Join&) = delete;
  Join& operator=(const Join&) = delete;

  // Starts `task` on `loop`.
  void start(Loop& loop, Task<void> task) {
    ++remaining_;
    loop.spawn(run(std::move(task)));
  }

  // `co_await join.wait()` returns once every started task has finished.
  auto wait() noexcept {
    struct Awaiter {
      Join* join;
      bool await_ready() const noexcept { return join->remaining_ == 0; }
      void await_suspend(std::coroutine_handle<> handle) noexcept { join->waiter_ = handle; }
      void await_resume() const noexcept {}
    };
    return Awaiter{this};
  }

 private:
  Task<void> run(Task<void> task) {
    co_await std::move(task);
    // The waiter may destroy this Join as soon as it resumes: nothing touches `this` after.
    if (--remaining_ == 0 && waiter_) std::exchange(waiter_, {}).resume();
  }

  size_t remaining_ = 0;
  std::coroutine_handle<> waiter_;
};

}  // namespace blockd
