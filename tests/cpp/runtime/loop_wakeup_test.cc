// Stress and regression tests for Loop's cross-thread wake-up (post, call, HopTo).
//
// A lost wake-up shows as a loop blocked in io_uring_enter while work is queued for it: the test
// would hang. Every test therefore runs under a Watchdog: past its deadline it records the
// failure and interrupts the loop threads with a signal, which makes a blocked io_uring_enter
// return (as attaching a debugger does), so the loop finds its queued work and the test ends,
// failed, instead of hanging.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "runtime/hop.h"
#include "runtime/loop.h"
#include "test_support.h"

namespace blockd {
namespace {

using namespace std::chrono_literals;
using testing::make_loop;

constexpr int kWatchdogSignal = SIGUSR2;

class Watchdog {
 public:
  // Watches the threads `tids` (kernel thread ids of loop threads) until finish() or destruction.
  Watchdog(std::string what, std::vector<int> tids, std::chrono::milliseconds limit)
      : what_(std::move(what)), tids_(std::move(tids)) {
    struct sigaction action {};
    action.sa_handler = [](int) {};  // no SA_RESTART: a blocked system call returns EINTR
    sigemptyset(&action.sa_mask);
    sigaction(kWatchdogSignal, &action, nullptr);
    thread_ = std::thread([this, limit] { watch(limit); });
  }
  ~Watchdog() { finish(); }

  void finish() {
    {
      std::lock_guard lock(mutex_);
      finished_ = true;
    }
    changed_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  // True when the deadline passed before finish(): a wake-up was lost (or the machine is far
  // slower than the limit allows for).
  bool fired() const { return fired_.load(); }

 private:
  void watch(std::chrono::milliseconds limit) {
    std::unique_lock lock(mutex_);
    if (changed_.wait_for(lock, limit, [this] { return finished_; })) return;
    fired_ = true;
    std::fprintf(stderr, "watchdog: %s not done after %lld ms; interrupting the loop threads\n",
                 what_.c_str(), static_cast<long long>(limit.count()));
    // Keep interrupting: each interruption lets a stuck loop run one more iteration.
    const auto give_up = std::chrono::steady_clock::now() + 10s;
    while (!finished_) {
      for (int tid : tids_) syscall(SYS_tgkill, getpid(), tid, kWatchdogSignal);
      if (std::chrono::steady_clock::now() > give_up) {
        std::fprintf(stderr, "watchdog: %s still stuck; exiting\n", what_.c_str());
        std::_Exit(1);
      }
      changed_.wait_for(lock, 10ms);
    }
  }

  std::string what_;
  std::vector<int> tids_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool finished_ = false;
  std::atomic<bool> fired_{false};
  std::thread thread_;
};

// Generous: the machines running CI are small and loaded; a lost wake-up never recovers.
constexpr auto kDeadline = 30s;

int this_thread_id() { return static_cast<int>(gettid()); }

// Waits (bounded) until thread `tid` sleeps in the kernel, so that what the caller does next
// happens while that loop is blocked rather than while it is still looking at its queue.
void wait_until_sleeping(int tid) {
  const std::string path = "/proc/self/task/" + std::to_string(tid) + "/stat";
  const auto limit = std::chrono::steady_clock::now() + 2s;
  while (std::chrono::steady_clock::now() < limit) {
    std::ifstream stat(path);
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const auto close_paren = text.rfind(')');
    if (close_paren != std::string::npos && close_paren + 2 < text.size() &&
        text[close_paren + 2] == 'S') {
      return;
    }
    std::this_thread::sleep_for(200us);
  }
}

// Regression: a completion whose coroutine runs the loop nested (as QMP handlers do through
// run_nested) while the wake-up read's own completion was reaped in the same batch, behind it.
// The nested run must still be woken by work that another thread posts.
TEST(LoopWakeupTest, NestedRunInsideACompletionIsWokenByPosts) {
  auto loop = make_loop();
  int fds[2];
  ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
  Watchdog watchdog("nested run", {this_thread_id()}, kDeadline);

  auto one_iteration = [&] {
    // Posted work keeps the iteration from blocking; the iteration submits what is queued.
    bool ran = false;
    loop->post([&] { ran = true; });
    loop->run_until([&] { return ran; });
  };
  one_iteration();  // the wake-up read is now in the kernel

  std::atomic<bool> posted_work_ran{false};
  bool finished = false;
  std::thread poster;
  const int loop_tid = this_thread_id();
  loop->spawn([](Loop& l, int fd, std::atomic<bool>& seen, bool& done, std::thread& other,
                 int tid) -> Task<void> {
    EXPECT_GT(co_await l.poll(fd, POLLIN), 0);
    other = std::thread([&l, &seen, tid] {
      wait_until_sleeping(tid);
      l.post([&seen] { seen = true; });
    });
    l.run_until([&] { return seen.load(); });
    done = true;
  }(*loop, fds[0], posted_work_ran, finished, poster, loop_tid));
  one_iteration();  // the poll is now in the kernel too

  // Complete the poll, then wake the loop: the next iteration reaps both completions, the
  // poll's first.
  ASSERT_EQ(write(fds[1], "x", 1), 1);
  loop->post([] {});
  loop->run_until([&] { return finished; });
  watchdog.finish();
  poster.join();
  EXPECT_FALSE(watchdog.fired()) << "the nested loop missed a wake-up";
  close(fds[0]);
  close(fds[1]);
}

// Several threads post bursts to one loop thread and wait for each burst to run, so the loop
// keeps going idle and blocking while others post: every post must find it.
TEST(LoopWakeupTest, BurstsFromManyThreads) {
  constexpr int kPosters = 3;
  constexpr int kRounds = 20000;
  // Declared before the loop thread: the last posted work may still touch its counter after
  // the poster saw the count complete.
  std::vector<std::atomic<int>> counters(kPosters);
  auto thread = LoopThread::start("wakeup-burst");
  ASSERT_TRUE(thread.has_value());
  Loop& loop = (*thread)->loop();
  Watchdog watchdog("bursts", {(*thread)->thread_id()}, kDeadline);

  std::vector<std::thread> posters;
  std::atomic<int64_t> total{0};
  for (int p = 0; p < kPosters; ++p) {
    posters.emplace_back([&loop, &total, &ran = counters[p], p] {
      std::minstd_rand random(p + 1);
      int expected = 0;
      for (int round = 0; round < kRounds; ++round) {
        const int burst = 1 + static_cast<int>(random() % 16);
        for (int i = 0; i < burst; ++i) {
          loop.post([&ran] {
            ran.fetch_add(1, std::memory_order_release);
            ran.notify_one();
          });
        }
        expected += burst;
        // Mostly wait for the burst (the loop then blocks before the next one); sometimes post
        // the next burst at once, racing with the loop draining its queue.
        if (random() % 4 != 0) {
          for (int seen = ran.load(); seen != expected; seen = ran.load()) ran.wait(seen);
        }
      }
      for (int seen = ran.load(); seen != expected; seen = ran.load()) ran.wait(seen);
      total += expected;
    });
  }
  for (auto& poster : posters) poster.join();
  watchdog.finish();
  EXPECT_FALSE(watchdog.fired()) << "a post did not wake the loop";
  EXPECT_GT(total.load(), int64_t{kPosters} * kRounds);
}

// Coroutines bounce between two loop threads with HopTo while another thread posts to both.
TEST(LoopWakeupTest, PingPongBetweenTwoLoopThreads) {
  constexpr int kBouncers = 3;
  constexpr int kRoundTrips = 50000;
  // Declared before the loop threads, which may touch them until they are joined.
  std::atomic<int> finished{0};
  std::atomic<int64_t> noise_ran{0};
  auto first = LoopThread::start("wakeup-ping");
  auto second = LoopThread::start("wakeup-pong");
  ASSERT_TRUE(first.has_value());
  ASSERT_TRUE(second.has_value());
  Loop& a = (*first)->loop();
  Loop& b = (*second)->loop();
  Watchdog watchdog("ping-pong", {(*first)->thread_id(), (*second)->thread_id()}, kDeadline);

  std::atomic<bool> stop_noise{false};
  std::thread noise([&] {
    std::atomic<int64_t>& ran = noise_ran;
    int64_t posted = 0;
    while (!stop_noise.load()) {
      for (Loop* loop : {&a, &b}) {
        loop->post([&ran] {
          ran.fetch_add(1);
          ran.notify_one();
        });
        ++posted;
      }
      for (int64_t seen = ran.load(); seen != posted; seen = ran.load()) ran.wait(seen);
    }
  });
  auto bounce = [](Loop& home, Loop& away, std::atomic<int>& done) -> Task<void> {
    for (int i = 0; i < kRoundTrips; ++i) {
      co_await HopTo{away};
      EXPECT_EQ(Loop::current(), &away);
      co_await HopTo{home};
    }
    done.fetch_add(1);
    done.notify_one();
  };
  for (int i = 0; i < kBouncers; ++i) {
    a.post([&, i] { a.spawn(bounce(i % 2 ? a : b, i % 2 ? b : a, finished)); });
  }
  for (int seen = finished.load(); seen != kBouncers; seen = finished.load()) finished.wait(seen);
  stop_noise = true;
  noise.join();
  watchdog.finish();
  EXPECT_FALSE(watchdog.fired()) << "a hop did not wake its target loop";
}

// The pattern of work moved to an iothread: the caller runs its own loop with run_until (as a
// QMP handler or a test does) and hops to a loop thread and back for every step.
TEST(LoopWakeupTest, RunUntilLoopAndLoopThreadHandOff) {
  auto loop = make_loop();
  auto iothread = LoopThread::start("wakeup-io");
  ASSERT_TRUE(iothread.has_value());
  Loop& away = (*iothread)->loop();
  Watchdog watchdog("hand-off", {this_thread_id(), (*iothread)->thread_id()}, kDeadline);

  constexpr int kRoundTrips = 50000;
  int trips = 0;
  testing::run(*loop, [](Loop& home, Loop& other, int& count) -> Task<void> {
    for (int i = 0; i < kRoundTrips; ++i) {
      co_await HopTo{other};
      co_await HopTo{home};
      ++count;
    }
  }(*loop, away, trips));
  watchdog.finish();
  EXPECT_EQ(trips, kRoundTrips);
  EXPECT_FALSE(watchdog.fired()) << "a hand-off did not wake the other loop";
}

// A task spawned before its loop runs (as testing::run and QMP handlers do) already runs on that
// loop: work that hops to another loop and back to Loop::current() must come back here. (Before
// spawn set the current loop, such a task saw no loop, ran its I/O against the other loop's ring
// from this thread and finished there, and run_until here waited for ever.)
TEST(LoopWakeupTest, SpawnedTaskReturnsToTheLoopItWasSpawnedOn) {
  auto loop = make_loop();
  auto iothread = LoopThread::start("wakeup-spawn");
  ASSERT_TRUE(iothread.has_value());
  Loop& away = (*iothread)->loop();
  Watchdog watchdog("spawned task", {this_thread_id(), (*iothread)->thread_id()}, kDeadline);
  EXPECT_EQ(Loop::current(), nullptr);
  Loop* seen_at_start = nullptr;
  Loop* seen_away = nullptr;
  Loop* seen_back = nullptr;
  testing::run(*loop, [](Loop& other, Loop*& start, Loop*& there, Loop*& back) -> Task<void> {
    start = Loop::current();
    Loop& home = start != nullptr ? *start : other;
    co_await HopTo{other};
    there = Loop::current();
    co_await HopTo{home};
    back = Loop::current();
  }(away, seen_at_start, seen_away, seen_back));
  watchdog.finish();
  EXPECT_EQ(seen_at_start, loop.get());
  EXPECT_EQ(seen_away, &away);
  EXPECT_EQ(seen_back, loop.get());
  EXPECT_EQ(Loop::current(), nullptr);  // spawn and run_until restore the previous loop
  EXPECT_FALSE(watchdog.fired());
}

// Stopping a loop thread is a cross-thread wake-up too: starting and stopping many (with work
// posted just before the stop) must never leave a join waiting.
TEST(LoopWakeupTest, StopWakesALoopThread) {
  Watchdog watchdog("stop", {}, kDeadline);
  int ran = 0;
  for (int i = 0; i < 100; ++i) {
    auto thread = LoopThread::start("wakeup-stop");
    ASSERT_TRUE(thread.has_value());
    if (i % 2 == 0) (*thread)->loop().call([] {});  // let it block first, sometimes
    (*thread)->loop().post([&ran] { ++ran; });
  }
  watchdog.finish();
  EXPECT_EQ(ran, 100);  // work posted before the stop still runs
  EXPECT_FALSE(watchdog.fired());
}

}  // namespace
}  // namespace blockd
