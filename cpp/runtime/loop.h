// The event loop: one io_uring per thread, driving Task coroutines.
//
// A Loop belongs to the thread that runs it. All I/O issued from that thread goes through its ring;
// submissions are batched and sent to the kernel once per loop iteration. Each awaitable operation
// keeps its completion record inside the awaiting coroutine's frame, so an operation costs no heap
// allocation.
//
// Other threads reach a loop only through post() (and the helpers built on it), which is safe from
// any thread.
#pragma once

#include <liburing.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <coroutine>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "runtime/status.h"
#include "runtime/task.h"

namespace blockd {

// Something waiting for an io_uring completion. `complete` is called on the loop thread with the
// completion's result (a byte count or a negative errno) and flags.
struct Completion {
  void (*complete)(Completion* self, int result, unsigned flags) = nullptr;
};

class Loop {
 public:
  // Creates a loop whose ring has room for `entries` submissions. Call from any thread; the loop
  // belongs to the thread that calls run() (or run_until()).
  static Expected<std::unique_ptr<Loop>> create(unsigned entries = 512);
  ~Loop();
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  // The loop running on the calling thread, or null.
  static Loop* current() noexcept;

  // Runs until stop() is called. The calling thread becomes the loop thread.
  void run();
  // Runs iterations until `done()` returns true (checked after every iteration). For tests and for
  // draining: deterministic, no sleeps; blocks in the kernel only while work is outstanding.
  void run_until(const std::function<bool()>& done);
  // Makes run() return after the current iteration and the submissions it queued. Any thread;
  // like post(), it touches nothing of the loop once run() may have returned, so the run()'s
  // caller may destroy the loop as soon as run() is back.
  void stop();

  // Queues `work` to run on the loop thread. Safe from any thread, including the loop's own. The
  // loop may be destroyed as soon as `work` has run (post touches nothing of it after queueing).
  void post(std::function<void()> work);

  // Starts `task` on this loop, detached: its frame frees itself when it finishes. Loop thread only
  // (or before the loop runs, from the thread that will run it). The task runs at once until it
  // first suspends, with Loop::current() returning this loop.
  void spawn(Task<void> task);
  // Starts the coroutine that `make` returns on this loop, from any thread: spawned at once when
  // the caller runs on this loop, else posted, so it runs after the work posted before it.
  // `make` runs on this loop's thread.
  void spawn_or_post(std::function<Task<void>()> make);

  // Runs `function` on the loop thread and waits for its result. Must not be called from the loop
  // thread itself (that would deadlock).
  template <typename F>
  auto call(F function) -> decltype(function()) {
    using R = decltype(function());
    std::promise<R> promise;
    auto future = promise.get_future();
    post([&] {
      if constexpr (std::is_void_v<R>) {
        function();
        promise.set_value();
      } else {
        promise.set_value(function());
      }
    });
    return future.get();
  }

  // Runs `task` on the loop thread and waits for it to finish; from another thread only.
  template <typename T>
  T run_task(Task<T> task) {
    std::promise<T> promise;
    auto future = promise.get_future();
    post([&] { spawn(run_and_fulfil(std::move(task), promise)); });
    return future.get();
  }

  // ---- Awaitable operations (loop thread only). Each yields an int: >= 0 on success (a byte
  // count where that makes sense), a negative errno on failure.

  struct Operation : Completion {
    Loop* loop;
    std::coroutine_handle<> waiter;
    int result = 0;
    // Called from await_suspend: the completion stores its result and resumes `handle`.
    void resume_on_completion(std::coroutine_handle<> handle) noexcept {
      waiter = handle;
      complete = [](Completion* self, int res, unsigned) {
        auto* op = static_cast<Operation*>(self);
        op->result = res;
        op->waiter.resume();
      };
    }
  };

  // Generic awaitable: `Prepare` fills the submission entry.
  template <typename Prepare>
  struct Awaitable : Operation {
    Prepare prepare;
    Awaitable(Loop* owner, Prepare prep) : prepare(std::move(prep)) { this->loop = owner; }
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> handle) noexcept {
      this->resume_on_completion(handle);
      io_uring_sqe* sqe = this->loop->get_sqe();
      prepare(sqe);
      io_uring_sqe_set_data(sqe, static_cast<Completion*>(this));
    }
    int await_resume() const noexcept { return this->result; }
  };

  template <typename Prepare>
  Awaitable<Prepare> submit(Prepare prepare) {
    return Awaitable<Prepare>(this, std::move(prepare));
  }

  auto read(int fd, void* buffer, unsigned length, uint64_t offset) {
    return submit([=](io_uring_sqe* sqe) { io_uring_prep_read(sqe, fd, buffer, length, offset); });
  }
  auto write(int fd, const void* buffer, unsigned length, uint64_t offset) {
    return submit([=](io_uring_sqe* sqe) { io_uring_prep_write(sqe, fd, buffer, length, offset); });
  }
  auto readv(int fd, const iovec* vectors, unsigned count, uint64_t offset) {
    return submit([=](io_uring_sqe* sqe) { io_uring_prep_readv(sqe, fd, vectors, count, offset); });
  }
  auto writev(int fd, const iovec* vectors, unsigned count, uint64_t offset) {
    return submit(
        [=](io_uring_sqe* sqe) { io_uring_prep_writev(sqe, fd, vectors, count, offset); });
  }
  // fdatasync when `data_only`, else fsync.
  auto fsync(int fd, bool data_only) {
    return submit([=](io_uring_sqe* sqe) {
      io_uring_prep_fsync(sqe, fd, data_only ? IORING_FSYNC_DATASYNC : 0);
    });
  }
  auto fallocate(int fd, int mode, uint64_t offset, uint64_t length) {
    return submit(
        [=](io_uring_sqe* sqe) { io_uring_prep_fallocate(sqe, fd, mode, offset, length); });
  }
  auto recv(int fd, void* buffer, size_t length, int flags) {
    return submit([=](io_uring_sqe* sqe) { io_uring_prep_recv(sqe, fd, buffer, length, flags); });
  }
  auto send(int fd, const void* buffer, size_t length, int flags) {
    return submit([=](io_uring_sqe* sqe) { io_uring_prep_send(sqe, fd, buffer, length, flags); });
  }
  auto sendmsg(int fd, const msghdr* message, int flags) {
    return submit([=](io_uring_sqe* sqe) { io_uring_prep_sendmsg(sqe, fd, message, flags); });
  }
  auto accept(int fd) {
    return submit([=](io_uring_sqe* sqe) {
      io_uring_prep_accept(sqe, fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    });
  }
  // Waits until `fd` reports one of `events` (POLLIN, ...); yields the revents.
  auto poll(int fd, unsigned events) {
    return submit([=](io_uring_sqe* sqe) { io_uring_prep_poll_add(sqe, fd, events); });
  }

  // Like poll(), but gives up after `timeout`: yields the revents, or -ETIME when `fd` reported
  // none of `events` in that time.
  struct PollForAwaitable : Operation {
    int fd;
    unsigned events;
    __kernel_timespec timeout;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> handle) noexcept;
    int await_resume() const noexcept { return result == -ECANCELED ? -ETIME : result; }
  };
  PollForAwaitable poll_for(int fd, unsigned events, std::chrono::nanoseconds timeout);

  // Suspends the calling task for `duration`. Yields 0 (or -ECANCELED when cancelled).
  struct SleepAwaitable : Operation {
    __kernel_timespec timeout;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> handle) noexcept;
    int await_resume() const noexcept { return result == -ETIME ? 0 : result; }
  };
  SleepAwaitable sleep(std::chrono::nanoseconds duration);

  // Asks the kernel to cancel the operations whose completion record is `target` (best effort; the
  // target still completes, usually with -ECANCELED).
  void cancel(Completion* target);

  // Number of operations submitted but not yet completed; for tests and draining.
  size_t in_flight() const noexcept { return in_flight_; }

  // For the Awaitables above.
  io_uring_sqe* get_sqe() noexcept;
  // Hands the operations queued so far to the kernel now, not at the end of the iteration.
  void submit_now() noexcept;

 private:
  explicit Loop(unsigned entries);
  Status init();
  void iterate(bool may_block);
  void arm_wakeup();
  // Runs the work posted so far; returns whether there was any.
  bool run_posted();

  template <typename T>
  static Task<void> run_and_fulfil(Task<T> task, std::promise<T>& promise) {
    if constexpr (std::is_void_v<T>) {
      co_await std::move(task);
      promise.set_value();
    } else {
      promise.set_value(co_await std::move(task));
    }
  }

  io_uring ring_{};
  unsigned entries_;
  bool ring_ready_ = false;
  size_t in_flight_ = 0;
  unsigned pending_submissions_ = 0;
  int wakeup_fd_ = -1;
  uint64_t wakeup_buffer_ = 0;
  // Identifies the wake-up read's completion (iterate handles it itself; it resumes nothing).
  Completion wakeup_completion_;
  // Whether a read of wakeup_fd_ is queued or in the kernel. Other threads' post() and stop()
  // write the eventfd; that read completing is what wakes a loop blocked in io_uring_enter, so
  // the loop never blocks without one armed.
  bool wakeup_armed_ = false;
  std::atomic<bool> stop_requested_{false};
  std::mutex posted_mutex_;
  std::vector<std::function<void()>> posted_;
};

// A thread running its own Loop until destroyed (used for the main loop and for iothreads).
class LoopThread {
 public:
  // Starts the thread; `name` is set as the thread name (truncated to 15 characters).
  static Expected<std::unique_ptr<LoopThread>> start(std::string name);
  // Stops the loop and joins the thread. Work posted but not yet run is still run first.
  ~LoopThread();

  Loop& loop() noexcept { return *loop_; }
  // The kernel thread id, as query-iothreads reports it.
  int thread_id() const noexcept { return thread_id_; }

 private:
  LoopThread() = default;
  std::unique_ptr<Loop> loop_;
  std::thread thread_;
  int thread_id_ = 0;
};

}  // namespace blockd
