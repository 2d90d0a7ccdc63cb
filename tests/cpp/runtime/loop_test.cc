#include "runtime/loop.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "runtime/frame_allocator.h"
#include "test_support.h"

namespace blockd {
namespace {

using testing::make_loop;
using testing::run;

Task<int> add(int a, int b) { co_return a + b; }

Task<int> nested(int depth) {
  if (depth == 0) co_return 0;
  co_return 1 + co_await nested(depth - 1);
}

TEST(TaskTest, ReturnsValue) {
  auto loop = make_loop();
  EXPECT_EQ(run(*loop, add(2, 3)), 5);
}

TEST(TaskTest, DeepChainDoesNotGrowStack) {
  auto loop = make_loop();
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || !defined(__OPTIMIZE__)
  // Without optimisation GCC does not turn symmetric transfer into a tail call, so only a
  // moderately deep chain is safe there. ThreadSanitizer keeps its own record of the call stack,
  // which every transfer deepens (it sees calls that never return), and stops the process at
  // 65536 frames.
  constexpr int kDepth = 1000;
#else
  constexpr int kDepth = 100000;
#endif
  EXPECT_EQ(run(*loop, nested(kDepth)), kDepth);
}

TEST(TaskTest, LazyUntilAwaited) {
  bool started = false;
  auto body = [](bool& flag) -> Task<int> {
    flag = true;
    co_return 1;
  };
  {
    Task<int> task = body(started);
    EXPECT_FALSE(started);
  }  // destroying an unstarted task frees it without running it
  EXPECT_FALSE(started);
}

TEST(TaskTest, FramesAreRecycled) {
  auto loop = make_loop();
  run(*loop, nested(10));
  const size_t before = runtime::TEST_frames_allocated_from_heap();
  for (int i = 0; i < 1000; ++i) run(*loop, nested(10));
#if !defined(__SANITIZE_ADDRESS__)
  EXPECT_EQ(runtime::TEST_frames_allocated_from_heap(), before);
#else
  (void)before;
#endif
}

class TempFile {
 public:
  TempFile() {
    char name[] = "/tmp/blockd-loop-test-XXXXXX";
    fd_ = mkstemp(name);
    path_ = name;
  }
  ~TempFile() {
    close(fd_);
    unlink(path_.c_str());
  }
  int fd() const { return fd_; }

 private:
  int fd_;
  std::string path_;
};

TEST(LoopTest, FileWriteThenRead) {
  auto loop = make_loop();
  TempFile file;
  auto io = [](Loop& l, int fd) -> Task<std::string> {
    const char text[] = "hello, ring";
    int written = co_await l.write(fd, text, sizeof text, 4096);
    EXPECT_EQ(written, static_cast<int>(sizeof text));
    EXPECT_EQ(co_await l.fsync(fd, true), 0);
    char back[sizeof text] = {};
    int got = co_await l.read(fd, back, sizeof back, 4096);
    EXPECT_EQ(got, static_cast<int>(sizeof back));
    co_return std::string(back);
  };
  EXPECT_EQ(run(*loop, io(*loop, file.fd())), "hello, ring");
  EXPECT_EQ(loop->in_flight(), 0u);
}

TEST(LoopTest, ErrorsAreNegativeErrno) {
  auto loop = make_loop();
  auto io = [](Loop& l) -> Task<int> {
    char byte;
    co_return co_await l.read(-1, &byte, 1, 0);
  };
  EXPECT_EQ(run(*loop, io(*loop)), -EBADF);
}

TEST(LoopTest, ManyOperationsInFlight) {
  // More operations than the ring has entries: submission must flush and carry on.
  auto loop = make_loop();
  TempFile file;
  int done = 0;
  for (int i = 0; i < 500; ++i) {
    loop->spawn([](Loop& l, int fd, int index, int& counter) -> Task<void> {
      uint32_t value = index;
      int written = co_await l.write(fd, &value, sizeof value, index * sizeof value);
      EXPECT_EQ(written, 4);
      ++counter;
    }(*loop, file.fd(), i, done));
  }
  loop->run_until([&] { return done == 500; });
  for (int i = 0; i < 500; ++i) {
    uint32_t value = 0;
    ASSERT_EQ(pread(file.fd(), &value, 4, i * 4), 4);
    EXPECT_EQ(value, static_cast<uint32_t>(i));
  }
}

TEST(LoopTest, SocketSendRecv) {
  auto loop = make_loop();
  int fds[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  auto io = [](Loop& l, int a, int b) -> Task<std::string> {
    char buffer[16] = {};
    // Start the receive first: it must wait for the send.
    bool received = false;
    l.spawn([](Loop& loop, int fd, char* out, bool& flag) -> Task<void> {
      int got = co_await loop.recv(fd, out, 5, MSG_WAITALL);
      EXPECT_EQ(got, 5);
      flag = true;
    }(l, b, buffer, received));
    EXPECT_FALSE(received);
    EXPECT_EQ(co_await l.send(a, "ping!", 5, MSG_NOSIGNAL), 5);
    while (!received) co_await l.sleep(std::chrono::microseconds(1));
    co_return std::string(buffer);
  };
  EXPECT_EQ(run(*loop, io(*loop, fds[0], fds[1])), "ping!");
  close(fds[0]);
  close(fds[1]);
}

TEST(LoopTest, SubmitNowHandsQueuedOperationsToTheKernelAtOnce) {
  auto loop = make_loop();
  int fds[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  bool sent = false;
  // The send is queued when the task first suspends; the iteration would submit it later.
  loop->spawn([](Loop& l, int fd, bool& flag) -> Task<void> {
    EXPECT_EQ(co_await l.send(fd, "now", 3, MSG_NOSIGNAL), 3);
    flag = true;
  }(*loop, fds[0], sent));
  char buffer[4] = {};
  EXPECT_EQ(recv(fds[1], buffer, sizeof buffer, MSG_DONTWAIT), -1);
  EXPECT_EQ(errno, EAGAIN);
  loop->submit_now();
  // The kernel has run the send during the submission, before the loop iterated.
  EXPECT_EQ(recv(fds[1], buffer, sizeof buffer, MSG_DONTWAIT), 3);
  EXPECT_STREQ(buffer, "now");
  EXPECT_FALSE(sent);
  loop->run_until([&] { return sent; });
  EXPECT_EQ(loop->in_flight(), 0u);
  close(fds[0]);
  close(fds[1]);
}

TEST(LoopTest, TimerOrdering) {
  auto loop = make_loop();
  std::vector<int> order;
  int finished = 0;
  for (int delay : {3, 1, 2}) {
    loop->spawn([](Loop& l, int ms, std::vector<int>& out, int& count) -> Task<void> {
      EXPECT_EQ(co_await l.sleep(std::chrono::milliseconds(ms * 5)), 0);
      out.push_back(ms);
      ++count;
    }(*loop, delay, order, finished));
  }
  loop->run_until([&] { return finished == 3; });
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
}

// A completion that frees itself (the NBD client's attempt deadline) relies on its cancellation
// being completed. A cancel queued by the iteration in which stop() takes effect must still reach
// the kernel before run() returns, with the completion it ends handled.
TEST(LoopTest, RunSettlesACancelQueuedByItsLastIteration) {
  struct Timer : Completion {
    Loop* loop = nullptr;
    Timer* target = nullptr;  // cancelled, and the loop stopped, when this timer fires
    __kernel_timespec timeout{};
    int result = 1;
  };
  Timer long_timer;
  Timer short_timer;
  auto loop = make_loop();
  long_timer.timeout.tv_sec = 60;
  long_timer.complete = [](Completion* self, int result, unsigned) {
    static_cast<Timer*>(self)->result = result;
  };
  short_timer.loop = loop.get();
  short_timer.target = &long_timer;
  short_timer.complete = [](Completion* self, int, unsigned) {
    auto* timer = static_cast<Timer*>(self);
    timer->loop->cancel(timer->target);
    timer->loop->stop();
  };
  for (Timer* timer : {&long_timer, &short_timer}) {
    io_uring_sqe* sqe = loop->get_sqe();
    io_uring_prep_timeout(sqe, &timer->timeout, 0, 0);
    io_uring_sqe_set_data(sqe, static_cast<Completion*>(timer));
  }
  loop->run();
  EXPECT_EQ(long_timer.result, -ECANCELED);
  EXPECT_EQ(loop->in_flight(), 0u);
}

// Coroutines still waiting when the loop stops (on a socket nobody writes to, on a timer) are
// resumed with their operations cancelled, so that they finish and their frames, with what they
// hold, are freed rather than lost with the ring (LeakSanitizer reports those).
TEST(LoopThreadTest, StoppingFinishesTheCoroutinesStillWaiting) {
  int fds[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  auto thread = LoopThread::start("test-stop");
  ASSERT_TRUE(thread.has_value());
  Loop& loop = (*thread)->loop();
  auto held = std::make_shared<std::vector<char>>(4096);
  std::weak_ptr<std::vector<char>> watch = held;
  int received = 1;
  int slept = 1;
  loop.call([&] {
    loop.spawn([](Loop& l, int fd, std::shared_ptr<std::vector<char>> buffer,
                  int& result) -> Task<void> {
      result = co_await l.recv(fd, buffer->data(), buffer->size(), 0);
    }(loop, fds[1], std::move(held), received));
    loop.spawn([](Loop& l, int& result) -> Task<void> {
      result = co_await l.sleep(std::chrono::hours(1));
    }(loop, slept));
  });
  EXPECT_EQ(loop.call([&] { return loop.in_flight(); }), 2u);
  thread->reset();  // stops the loop and joins its thread
  EXPECT_EQ(received, -ECANCELED);
  EXPECT_EQ(slept, -ECANCELED);
  EXPECT_TRUE(watch.expired());
  close(fds[0]);
  close(fds[1]);
}

TEST(LoopThreadTest, PostAndCallAcrossThreads) {
  auto thread = LoopThread::start("test-loop");
  ASSERT_TRUE(thread.has_value());
  Loop& loop = (*thread)->loop();
  EXPECT_NE(Loop::current(), &loop);
  Loop* seen = loop.call([] { return Loop::current(); });
  EXPECT_EQ(seen, &loop);
  EXPECT_GT((*thread)->thread_id(), 0);
  EXPECT_EQ(loop.run_task(add(20, 22)), 42);
  // Many posts from this thread all run, in order.
  std::vector<int> values;
  for (int i = 0; i < 1000; ++i) loop.post([&values, i] { values.push_back(i); });
  loop.call([] {});
  ASSERT_EQ(values.size(), 1000u);
  for (int i = 0; i < 1000; ++i) EXPECT_EQ(values[i], i);
}

TEST(LoopThreadTest, SpawnOrPostStartsOnTheLoopItself) {
  auto thread = LoopThread::start("test-spawn");
  ASSERT_TRUE(thread.has_value());
  Loop& loop = (*thread)->loop();
  // From another thread: posted, after the work posted before it, and run on the loop's thread.
  std::vector<std::string> order;
  Loop* ran_on = nullptr;
  loop.post([&] { order.push_back("posted first"); });
  loop.spawn_or_post([&]() -> Task<void> {
    return [](std::vector<std::string>& out, Loop*& where) -> Task<void> {
      where = Loop::current();
      out.push_back("spawned");
      co_return;
    }(order, ran_on);
  });
  loop.call([] {});
  EXPECT_EQ(order, (std::vector<std::string>{"posted first", "spawned"}));
  EXPECT_EQ(ran_on, &loop);
  // From the loop's own thread: started at once, before spawn_or_post returns.
  bool started_inside = loop.call([&] {
    bool started = false;
    loop.spawn_or_post([&started]() -> Task<void> {
      return [](bool& flag) -> Task<void> {
        flag = true;
        co_return;
      }(started);
    });
    return started;
  });
  EXPECT_TRUE(started_inside);
}

}  // namespace
}  // namespace blockd
