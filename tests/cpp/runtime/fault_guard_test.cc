#include "runtime/fault_guard.h"

#include <gtest/gtest.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <thread>

namespace blockd {
namespace {

// A two-page file mapped whole and then shrunk to one page: the second page of the mapping has
// no file content behind it, so touching it raises SIGBUS.
class ShrunkMapping {
 public:
  ShrunkMapping() {
    char name[] = "/dev/shm/blockd-fault-guard-XXXXXX";
    fd_ = mkstemp(name);
    EXPECT_GE(fd_, 0);
    unlink(name);
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    EXPECT_EQ(ftruncate(fd_, static_cast<off_t>(2 * page_)), 0);
    void* address = mmap(nullptr, 2 * page_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    EXPECT_NE(address, MAP_FAILED);
    memory_ = static_cast<volatile uint8_t*>(address);
    memory_[0] = 7;
    memory_[page_] = 9;
    EXPECT_EQ(ftruncate(fd_, static_cast<off_t>(page_)), 0);
  }
  ~ShrunkMapping() {
    munmap(const_cast<uint8_t*>(memory_), 2 * page_);
    close(fd_);
  }
  volatile uint8_t* present() const { return memory_; }
  volatile uint8_t* gone() const { return memory_ + page_; }

 private:
  int fd_ = -1;
  size_t page_ = 0;
  volatile uint8_t* memory_ = nullptr;
};

int64_t read_byte(volatile uint8_t* address) {
  auto touch = [address]() noexcept -> int64_t { return *address; };
  return run_fault_guarded(touch);
}

bool sigbus_blocked() {
  sigset_t mask;
  pthread_sigmask(SIG_BLOCK, nullptr, &mask);
  return sigismember(&mask, SIGBUS) == 1;
}

TEST(FaultGuardTest, ReturnsTheFunctionsResult) {
  ShrunkMapping mapping;
  EXPECT_EQ(read_byte(mapping.present()), 7);
}

TEST(FaultGuardTest, FaultBecomesAnErrorAndTheProcessCarriesOn) {
  ShrunkMapping mapping;
  const uint64_t faults = guarded_fault_count();
  EXPECT_EQ(read_byte(mapping.gone()), -EFAULT);
  EXPECT_EQ(guarded_fault_count(), faults + 1);
  // The jump out of the handler unblocked SIGBUS again, so the next fault is caught as well.
  EXPECT_FALSE(sigbus_blocked());
  EXPECT_EQ(read_byte(mapping.gone()), -EFAULT);
  EXPECT_EQ(read_byte(mapping.present()), 7);
}

TEST(FaultGuardTest, NestedCallsResumeInTheInnermost) {
  ShrunkMapping mapping;
  int64_t inner = 0;
  auto outer = [&]() noexcept -> int64_t {
    inner = read_byte(mapping.gone());
    return *mapping.gone();  // the outer call's own fault
  };
  EXPECT_EQ(run_fault_guarded(outer), -EFAULT);
  EXPECT_EQ(inner, -EFAULT);
}

TEST(FaultGuardTest, WorksOnEveryThread) {
  ShrunkMapping mapping;
  int64_t results[2] = {0, 0};
  std::thread first([&] { results[0] = read_byte(mapping.gone()); });
  std::thread second([&] { results[1] = read_byte(mapping.present()); });
  first.join();
  second.join();
  EXPECT_EQ(results[0], -EFAULT);
  EXPECT_EQ(results[1], 7);
}

// A handler someone else installs (a debugger's, Python's faulthandler): ends the process with a
// status that tells it ran.
void exit_42(int, siginfo_t*, void*) { _exit(42); }

void install(void (*handler)(int, siginfo_t*, void*)) {
  struct sigaction action {};
  action.sa_sigaction = handler;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  sigaction(SIGBUS, &action, nullptr);
}

TEST(FaultGuardDeathTest, FaultOutsideAGuardStillKills) {
  ShrunkMapping mapping;
  auto fault_after_guarding = [&] {
    struct sigaction default_action {};
    default_action.sa_handler = SIG_DFL;
    sigaction(SIGBUS, &default_action, nullptr);
    EXPECT_EQ(read_byte(mapping.gone()), -EFAULT);  // installs the handler over SIG_DFL
    (void)*mapping.gone();
  };
  EXPECT_EXIT(fault_after_guarding(), ::testing::KilledBySignal(SIGBUS), "");
}

TEST(FaultGuardDeathTest, FaultOutsideAGuardGoesToTheHandlerThatReplacedOurs) {
  ShrunkMapping mapping;
  auto fault_after_replacing = [&] {
    EXPECT_EQ(read_byte(mapping.present()), 7);
    install(exit_42);  // replaces the guard's handler
    // The guarded call finds its handler replaced and installs it again, over exit_42.
    EXPECT_EQ(read_byte(mapping.gone()), -EFAULT);
    (void)*mapping.gone();
  };
  EXPECT_EXIT(fault_after_replacing(), ::testing::ExitedWithCode(42), "");
}

TEST(FaultGuardDeathTest, SentSignalOutsideAGuardGoesToThePreviousHandler) {
  auto raise_after_guarding = [] {
    install(exit_42);
    auto nothing = []() noexcept -> int64_t { return 0; };
    EXPECT_EQ(run_fault_guarded(nothing), 0);
    raise(SIGBUS);
  };
  EXPECT_EXIT(raise_after_guarding(), ::testing::ExitedWithCode(42), "");
}

// Like Python's faulthandler: on a fault, reinstates the handler it found when it was installed
// (here the guard's) and raises the signal again.
struct sigaction found_by_reraiser;
void restore_and_reraise(int signal, siginfo_t*, void*) {
  sigaction(SIGBUS, &found_by_reraiser, nullptr);
  raise(signal);
}

TEST(FaultGuardDeathTest, HandlersThatHandBackToEachOtherEndInTheDefaultAction) {
  ShrunkMapping mapping;
  auto fault_in_a_loop_of_handlers = [&] {
    EXPECT_EQ(read_byte(mapping.present()), 7);
    struct sigaction reraiser {};
    reraiser.sa_sigaction = restore_and_reraise;
    reraiser.sa_flags = SA_SIGINFO;
    sigemptyset(&reraiser.sa_mask);
    sigaction(SIGBUS, &reraiser, &found_by_reraiser);
    EXPECT_EQ(read_byte(mapping.gone()), -EFAULT);  // the guard's handler on top again
    (void)*mapping.gone();
  };
  EXPECT_EXIT(fault_in_a_loop_of_handlers(), ::testing::KilledBySignal(SIGBUS), "");
}

}  // namespace
}  // namespace blockd
