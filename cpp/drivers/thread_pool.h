// Worker threads for blocking system calls (the file driver's aio=threads mode).
//
// A job is a blocking call (pread, pwrite, fdatasync, fallocate) that runs on a worker thread; the
// coroutine that awaits it is resumed on its own loop thread through Loop::post. The job record
// lives in the awaiting coroutine's frame, so submitting costs no heap allocation. Workers are
// started on demand, up to a fixed limit, and live until the process exits.
#pragma once

#include <atomic>
#include <condition_variable>
#include <coroutine>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "runtime/loop.h"

namespace blockd::drivers {

// One blocking call. `run` executes on a worker thread and returns a byte count or a negative
// errno.
struct ThreadPoolJob {
  int64_t (*run)(ThreadPoolJob* self) = nullptr;
  // Where the waiter resumes. Null: nothing is posted; `run` tells the submitter itself that the
  // job is done, and the worker touches the job no more once `run` returns.
  Loop* loop = nullptr;
  std::coroutine_handle<> waiter;  // resumed on `loop` with `result` set
  int64_t result = 0;
  ThreadPoolJob* next = nullptr;  // queue link, owned by the pool while queued
};

class ThreadPool {
 public:
  // The process-wide pool. Safe from any thread.
  static ThreadPool& shared();

  // Queues `job`; a worker runs it and then posts the waiter's resumption to job->loop. The job
  // must stay alive until the waiter resumes. Safe from any thread.
  void submit(ThreadPoolJob* job);

  // Stops and joins the workers after the queue drains (process exit).
  ~ThreadPool();

  // Takes `job` back out of the queue if no worker has taken it yet (then it never runs). True
  // when it did. Safe from any thread.
  bool withdraw(ThreadPoolJob* job);

  // Runs `first(first_context)` on the calling thread while a worker runs
  // `second(second_context)`, and returns once both have returned. When no worker has taken
  // `second` by the time `first` returns (every core busy), the calling thread runs it itself
  // instead of waiting for one to be scheduled. Blocks the calling thread: for CPU-bound work of
  // some tens of microseconds and up that a caller which may not suspend (Node::map_file) wants
  // finished sooner. Not from inside `first` or `second` (one job per calling thread).
  void run_beside(void (*first)(void*) noexcept, void* first_context,
                  void (*second)(void*) noexcept, void* second_context);
  // The same for two callables (void() noexcept) that the caller keeps alive across the call.
  template <typename First, typename Second>
  void run_beside(First& first, Second& second) {
    run_beside([](void* f) noexcept { (*static_cast<First*>(f))(); }, &first,
               [](void* s) noexcept { (*static_cast<Second*>(s))(); }, &second);
  }

  // The most worker threads the pool starts.
  static constexpr size_t kMaxWorkers = 64;

  // Number of worker threads started so far, for tests.
  size_t TEST_worker_count();

 private:
  ThreadPool() = default;
  void worker();

  std::mutex mutex_;
  std::condition_variable wake_;
  ThreadPoolJob* head_ = nullptr;
  ThreadPoolJob* tail_ = nullptr;
  size_t idle_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

// `co_await RunInThread<F>{loop, f}` runs `f()` (returning int64_t, noexcept) on a pool worker and
// yields its result on the awaiting coroutine's loop thread. The awaiter (and so `f`'s captures)
// lives in the coroutine frame.
template <typename F>
struct RunInThread : ThreadPoolJob {
  F function;
  RunInThread(Loop& owner, F body) : function(std::move(body)) { this->loop = &owner; }
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> handle) noexcept {
    this->waiter = handle;
    this->run = [](ThreadPoolJob* self) -> int64_t {
      return static_cast<RunInThread*>(self)->function();
    };
    ThreadPool::shared().submit(this);
  }
  int64_t await_resume() const noexcept { return this->result; }
};

}  // namespace blockd::drivers
