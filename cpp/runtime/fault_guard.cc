// run_fault_guarded: see fault_guard.h.
#include "runtime/fault_guard.h"

#include <atomic>
#include <cerrno>
#include <csetjmp>
#include <csignal>
#include <mutex>

namespace blockd {
namespace {

// Where a fault inside a guarded call resumes: the innermost guarded call of the thread.
struct GuardFrame {
  sigjmp_buf jump;
};

// Initial-exec TLS: the handler also runs on threads that never made a guarded call, and the
// first use of a lazily allocated TLS block (a dlopen'ed Python extension's default) could
// allocate inside the signal handler.
__attribute__((tls_model("initial-exec"))) thread_local GuardFrame* current_frame = nullptr;

// Serialises installations; the handler itself takes no lock.
std::mutex install_mutex;
// The disposition the handler found when it installed itself: where every SIGBUS it does not
// take goes.
struct sigaction previous_action;
// Faults turned into errors (guarded_fault_count).
std::atomic<uint64_t> guarded_faults{0};
// Set when the handler passed a SIGBUS on since it was installed: if the same fault comes back to
// it, the chain loops, and the default action ends it.
std::atomic<bool> passed_on{false};

void on_sigbus(int signal, siginfo_t* info, void* /*ucontext*/) {
  GuardFrame* const frame = current_frame;
  // Only a fault the kernel raised here (si_code > 0), not a SIGBUS someone sent.
  if (frame != nullptr && info != nullptr && info->si_code > 0) {
    guarded_faults.fetch_add(1, std::memory_order_relaxed);
    siglongjmp(frame->jump, 1);
  }
  const int saved_errno = errno;
  if (passed_on.exchange(true)) {
    struct sigaction default_action {};
    default_action.sa_handler = SIG_DFL;
    sigemptyset(&default_action.sa_mask);
    sigaction(SIGBUS, &default_action, nullptr);
  } else {
    sigaction(SIGBUS, &previous_action, nullptr);
  }
  // A fault happens again when the handler returns (the faulting instruction re-executes); a
  // sent signal must be sent again. It stays pending until the handler returns.
  if (info == nullptr || info->si_code <= 0) raise(signal);
  errno = saved_errno;
}

bool handler_installed() noexcept {
  struct sigaction current {};
  if (sigaction(SIGBUS, nullptr, &current) != 0) return false;
  return (current.sa_flags & SA_SIGINFO) != 0 && current.sa_sigaction == on_sigbus;
}

void install_handler() noexcept {
  std::lock_guard lock(install_mutex);
  if (handler_installed()) return;  // another thread was first
  struct sigaction found {};
  sigaction(SIGBUS, nullptr, &found);
  previous_action = found;
  passed_on.store(false);
  struct sigaction ours {};
  ours.sa_sigaction = on_sigbus;
  ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&ours.sa_mask);
  struct sigaction replaced {};
  sigaction(SIGBUS, &ours, &replaced);
  // Someone installed a handler between the look and the installation: that one is the previous.
  if (replaced.sa_handler != found.sa_handler || replaced.sa_flags != found.sa_flags) {
    previous_action = replaced;
  }
}

}  // namespace

uint64_t guarded_fault_count() noexcept { return guarded_faults.load(std::memory_order_relaxed); }

int64_t run_fault_guarded(int64_t (*function)(void* context) noexcept, void* context) noexcept {
  if (!handler_installed()) install_handler();
  GuardFrame frame;
  GuardFrame* const outer = current_frame;
  // The mask is saved (1) because SIGBUS is blocked while its handler runs: the jump out of the
  // handler must unblock it again, or the next fault would kill the process.
  if (sigsetjmp(frame.jump, 1) != 0) {
    current_frame = outer;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    return -EFAULT;
  }
  current_frame = &frame;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  const int64_t result = function(context);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  current_frame = outer;
  return result;
}

}  // namespace blockd
