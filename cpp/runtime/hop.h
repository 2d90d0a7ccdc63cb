// Moving a coroutine between loops.
#pragma once

#include <coroutine>

#include "runtime/loop.h"

namespace blockd {

// `co_await HopTo{loop}` resumes the awaiting coroutine on `loop`'s thread (at once when it
// already runs there). Used where one piece of work spans loops: an NBD connection whose export
// lives in an iothread, a node in an iothread whose NBD client connection lives elsewhere.
struct HopTo {
  Loop& target;
  bool await_ready() const noexcept { return Loop::current() == &target; }
  void await_suspend(std::coroutine_handle<> handle) { target.post([handle] { handle.resume(); }); }
  void await_resume() const noexcept {}
};

}  // namespace blockd
