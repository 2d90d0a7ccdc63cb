// Reading mapped files without dying when they shrink.
//
// A shared mapping of a file stays valid when another process truncates the file, but touching a
// page that no longer has file content behind it raises SIGBUS, which kills the process. Code
// that reads a mapping of a file it does not control (a node's image, which a user may truncate
// behind the engine's back) runs the reading under run_fault_guarded: a SIGBUS that the reading
// raises on that thread becomes an error value, and the process carries on.
//
// How: a process-wide SIGBUS handler (installed on the first guarded call, and again whenever a
// guarded call finds that someone replaced it, e.g. Python's faulthandler), and a thread-local
// jump buffer that marks the thread as inside a guarded call. A fault raised by the kernel on a
// thread inside a guarded call jumps back out of the call. Every other SIGBUS (another thread,
// outside a guarded call, sent with kill) goes where it would have gone without blockd: the
// handler reinstates the disposition it found when it installed itself and lets the fault happen
// again (or resends a sent signal), so that the previous handler, or the default action (death
// with a core), takes it. Should that chain lead back to this handler for the same fault (a
// handler that restores its own predecessor, which was this one, and re-raises), the default
// action ends it.
#pragma once

#include <cstdint>

namespace blockd {

// Calls `function(context)` on this thread and returns its result, or -EFAULT when touching memory
// inside it raised SIGBUS (the rest of the function is then skipped). A fault abandons the
// function midway, without unwinding: it must hold nothing that needs releasing (no allocation,
// no lock, no object with a destructor) and leave no state that matters half-updated; plain
// loops over memory (compare, copy, hash) qualify. Results of the function that equal -EFAULT
// cannot be told apart from a fault. Guarded calls may nest. Costs two system calls (a look at
// the SIGBUS disposition and the signal mask saved for the jump), so it suits work of some tens
// of microseconds and up. Any thread; async-signal-unsafe (not from a signal handler).
int64_t run_fault_guarded(int64_t (*function)(void* context) noexcept, void* context) noexcept;

// How many faults guarded calls have turned into -EFAULT in this process, on every thread. Any
// thread.
uint64_t guarded_fault_count() noexcept;

// The same for a callable `function` (e.g. a lambda: int64_t() noexcept), which the caller keeps
// alive across the call.
template <typename Function>
int64_t run_fault_guarded(Function& function) noexcept {
  return run_fault_guarded(
      [](void* context) noexcept -> int64_t { return (*static_cast<Function*>(context))(); },
      &function);
}

}  // namespace blockd
