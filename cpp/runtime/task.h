// Task<T>: the coroutine type of every asynchronous operation in blockd.
//
// A Task is lazy: creating it runs nothing. `co_await task` starts it and resumes the awaiting
// coroutine (by symmetric transfer, so deep chains do not grow the stack) once it finishes. A Task
// is owned by whoever holds it; destroying an unstarted or finished Task frees its frame. Frames
// come from runtime::allocate_frame, so steady-state I/O does not call malloc.
//
// Tasks do not throw on the data path: T is normally an int64_t (negative errno on failure) or a
// Status/Expected on the control path. An exception escaping a Task terminates the process.
//
// To run a Task without awaiting it, hand it to Loop::spawn (fire and forget, on the loop thread).
#pragma once

#include <coroutine>
#include <cstdlib>
#include <exception>
#include <optional>
#include <utility>

#include "runtime/frame_allocator.h"

namespace blockd {

template <typename T>
class Task;

namespace detail {

struct FramePromiseBase {
  static void* operator new(std::size_t size) { return runtime::allocate_frame(size); }
  static void operator delete(void* frame, std::size_t size) noexcept {
    runtime::free_frame(frame, size);
  }

  std::coroutine_handle<> continuation_ = std::noop_coroutine();

  std::suspend_always initial_suspend() noexcept { return {}; }

  struct FinalAwaiter {
    bool await_ready() const noexcept { return false; }
    template <typename Promise>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> self) noexcept {
      return self.promise().continuation_;
    }
    void await_resume() const noexcept {}
  };
  FinalAwaiter final_suspend() noexcept { return {}; }

  [[noreturn]] void unhandled_exception() noexcept { std::terminate(); }
};

template <typename T>
struct TaskPromise : FramePromiseBase {
  std::optional<T> value_;
  Task<T> get_return_object() noexcept;
  template <typename U>
  void return_value(U&& value) {
    value_.emplace(std::forward<U>(value));
  }
  T take() { return std::move(*value_); }
};

template <>
struct TaskPromise<void> : FramePromiseBase {
  Task<void> get_return_object() noexcept;
  void return_void() noexcept {}
  void take() noexcept {}
};

}  // namespace detail

template <typename T = void>
class [[nodiscard]] Task {
 public:
  using promise_type = detail::TaskPromise<T>;
  using Handle = std::coroutine_handle<promise_type>;

  Task() = default;
  explicit Task(Handle handle) noexcept : handle_(handle) {}
  Task(Task&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
  Task& operator=(Task&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, {});
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  ~Task() { reset(); }

  bool valid() const noexcept { return static_cast<bool>(handle_); }
  bool done() const noexcept { return handle_ && handle_.done(); }

  // Awaiting starts the task and yields its result.
  auto operator co_await() && noexcept {
    struct Awaiter {
      Handle handle;
      bool await_ready() const noexcept { return false; }
      std::coroutine_handle<> await_suspend(std::coroutine_handle<> awaiting) noexcept {
        handle.promise().continuation_ = awaiting;
        return handle;
      }
      T await_resume() { return handle.promise().take(); }
    };
    return Awaiter{handle_};
  }

  // For Loop and tests: releases the frame handle to the caller, who becomes its owner.
  Handle release() noexcept { return std::exchange(handle_, {}); }

 private:
  void reset() noexcept {
    if (handle_) handle_.destroy();
    handle_ = {};
  }

  Handle handle_;
};

namespace detail {
template <typename T>
Task<T> TaskPromise<T>::get_return_object() noexcept {
  return Task<T>(std::coroutine_handle<TaskPromise<T>>::from_promise(*this));
}
inline Task<void> TaskPromise<void>::get_return_object() noexcept {
  return Task<void>(std::coroutine_handle<TaskPromise<void>>::from_promise(*this));
}
}  // namespace detail

// A fire-and-forget coroutine that destroys itself when it finishes. Used by Loop::spawn; not meant
// for direct use.
struct DetachedTask {
  struct promise_type : detail::FramePromiseBase {
    DetachedTask get_return_object() noexcept {
      return DetachedTask{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_never final_suspend() noexcept { return {}; }
    void return_void() noexcept {}
  };
  std::coroutine_handle<promise_type> handle;
};

}  // namespace blockd
