// Worker threads for blocking system calls (the file driver's aio=threads mode).
//
// A job is a blocking call (pread, pwrite, fdatasync, fallocate) that runs on a worker thread; the
// coroutine that awaits it is resumed on its own loop thread through Loop::post. The job record
// lives in the awaiting coroutine's frame, so submitting costs no heap allocation. Workers are
// started on demand, up to a fixed limit, and live until the process exits.
#pragma once

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
  Loop* loop = nullptr;            // where the waiter resumes
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

  // Number of worker threads started so far, for tests.
  size_t TEST_worker_count();

 private:
  ThreadPool() = default;
  void worker();

  static constexpr size_t kMaxWorkers = 64;
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
