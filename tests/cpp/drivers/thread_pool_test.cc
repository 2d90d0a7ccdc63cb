#include "drivers/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace blockd::drivers {
namespace {

// Both halves run exactly once per call, and the call returns only after both (the second ran on
// a worker, or on the caller when no worker took it in time); many calls in a row shake out
// races between a worker finishing and the next call reusing the caller's job.
TEST(ThreadPoolTest, RunBesideRunsBothHalvesBeforeReturning) {
  constexpr int kCalls = 500;
  int firsts = 0;
  std::atomic<int> seconds{0};
  int on_a_worker = 0;
  for (int i = 0; i < kCalls; ++i) {
    std::thread::id second_thread;
    // Gives a worker up to a millisecond to take the second half, so that both ways are taken.
    auto first = [&]() noexcept {
      ++firsts;
      const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(1);
      while (seconds.load() == i && std::chrono::steady_clock::now() < until) {
      }
    };
    auto second = [&]() noexcept {
      second_thread = std::this_thread::get_id();
      seconds.fetch_add(1);
    };
    ThreadPool::shared().run_beside(first, second);
    ASSERT_EQ(seconds.load(), i + 1);
    on_a_worker += second_thread != std::this_thread::get_id();
  }
  EXPECT_EQ(firsts, kCalls);
  EXPECT_GE(ThreadPool::shared().TEST_worker_count(), 1u);
  EXPECT_GT(on_a_worker, 0);
}

// A second half that no worker has taken yet when the first is done runs on the caller. Every
// worker the pool may have is kept busy first, so no worker can take it.
TEST(ThreadPoolTest, RunBesideRunsAnUntakenSecondHalfItself) {
  struct Blocker : ThreadPoolJob {
    std::atomic<int>* started = nullptr;
    std::atomic<bool>* release = nullptr;
    std::atomic<int>* finished = nullptr;
  };
  std::atomic<int> started{0};
  std::atomic<bool> release{false};
  std::atomic<int> finished{0};
  std::vector<Blocker> blockers(ThreadPool::kMaxWorkers);
  for (Blocker& blocker : blockers) {
    blocker.started = &started;
    blocker.release = &release;
    blocker.finished = &finished;
    blocker.run = [](ThreadPoolJob* self) -> int64_t {
      auto* b = static_cast<Blocker*>(self);
      b->started->fetch_add(1);
      while (!b->release->load()) std::this_thread::sleep_for(std::chrono::microseconds(100));
      b->finished->fetch_add(1);
      return 0;
    };
    ThreadPool::shared().submit(&blocker);
  }
  while (started.load() < static_cast<int>(blockers.size())) std::this_thread::yield();

  std::thread::id second_thread;
  auto first = []() noexcept {};
  auto second = [&]() noexcept { second_thread = std::this_thread::get_id(); };
  ThreadPool::shared().run_beside(first, second);
  EXPECT_EQ(second_thread, std::this_thread::get_id());

  release.store(true);
  while (finished.load() < static_cast<int>(blockers.size())) std::this_thread::yield();
}

// Calls from several threads at once each get their own job.
TEST(ThreadPoolTest, RunBesideFromSeveralThreads) {
  std::atomic<int> halves{0};
  auto caller = [&] {
    for (int i = 0; i < 500; ++i) {
      auto half = [&]() noexcept { halves.fetch_add(1); };
      ThreadPool::shared().run_beside(half, half);
    }
  };
  std::thread a(caller), b(caller), c(caller);
  a.join();
  b.join();
  c.join();
  EXPECT_EQ(halves.load(), 3 * 500 * 2);
}

}  // namespace
}  // namespace blockd::drivers
