#include "runtime/loop.h"

#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace blockd {
namespace {
thread_local Loop* current_loop = nullptr;

// How many non-blocking iterations run() may add after stop() to submit what the last ones queued.
constexpr int kSettleRounds = 8;
// How many times run() cancels what is still in flight when it ends, and how long each time it
// waits for operations that complete later than their cancellation (I/O in a kernel worker).
constexpr int kDrainRounds = 16;
constexpr __kernel_timespec kDrainPause{.tv_sec = 0, .tv_nsec = 10'000'000};

// A negative duration counts as zero.
__kernel_timespec to_kernel_timespec(std::chrono::nanoseconds duration) noexcept {
  const auto count = duration.count() < 0 ? 0 : duration.count();
  return {.tv_sec = count / 1'000'000'000, .tv_nsec = count % 1'000'000'000};
}
}  // namespace

Loop::Loop(unsigned entries) : entries_(entries) {}

Expected<std::unique_ptr<Loop>> Loop::create(unsigned entries) {
  std::unique_ptr<Loop> loop(new Loop(entries));
  BLOCKD_RETURN_IF_ERROR(loop->init());
  return loop;
}

Status Loop::init() {
  io_uring_params params{};
  // The completion queue is sized generously: a burst of completions must never overflow it.
  params.flags = IORING_SETUP_CQSIZE;
  params.cq_entries = entries_ * 4;
  int ret = io_uring_queue_init_params(entries_, &ring_, &params);
  if (ret < 0) return Status::generic("Failed to set up io_uring: " + errno_text(ret));
  ring_ready_ = true;
  wakeup_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wakeup_fd_ < 0) return Status::generic("Failed to create eventfd: " + errno_text(-errno));
  return Status::ok();
}

Loop::~Loop() {
  if (ring_ready_) io_uring_queue_exit(&ring_);
  if (wakeup_fd_ >= 0) close(wakeup_fd_);
}

Loop* Loop::current() noexcept { return current_loop; }

io_uring_sqe* Loop::get_sqe() noexcept {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  while (sqe == nullptr) {
    // The submission queue is full: hand what we have to the kernel and try again.
    io_uring_submit(&ring_);
    pending_submissions_ = 0;
    sqe = io_uring_get_sqe(&ring_);
  }
  ++pending_submissions_;
  ++in_flight_;
  return sqe;
}

void Loop::submit_now() noexcept {
  if (pending_submissions_ == 0) return;
  io_uring_submit(&ring_);
  pending_submissions_ = 0;
}

void Loop::arm_wakeup() {
  if (wakeup_armed_) return;
  wakeup_armed_ = true;
  io_uring_sqe* sqe = get_sqe();
  io_uring_prep_read(sqe, wakeup_fd_, &wakeup_buffer_, sizeof wakeup_buffer_, 0);
  io_uring_sqe_set_data(sqe, static_cast<Completion*>(&wakeup_completion_));
  --in_flight_;  // the wake-up read is always pending; it is not work in flight
}

void Loop::post(std::function<void()> work) {
  // The wake-up is written before the lock goes. Once the lock is released the loop thread may
  // run `work`, which may finish what the loop's owner waits for (a pool worker posts the
  // completion of the last request), and the owner may then destroy the loop: after the unlock
  // this thread must not touch the loop, not even to read wakeup_fd_, whose number may by then
  // name another open file.
  std::lock_guard lock(posted_mutex_);
  const bool was_empty = posted_.empty();
  posted_.push_back(std::move(work));
  if (was_empty) {
    uint64_t one = 1;
    // The eventfd counter cannot overflow in practice; a failed write only delays the wake-up of a
    // loop that is about to look at the queue anyway.
    [[maybe_unused]] ssize_t written = ::write(wakeup_fd_, &one, sizeof one);
  }
}

bool Loop::run_posted() {
  // The batch is local: posted work may itself run the loop (run_until from a QMP handler waiting
  // for I/O), and that nested run must neither see nor re-run the batch being executed.
  std::vector<std::function<void()>> batch;
  {
    std::lock_guard lock(posted_mutex_);
    batch.swap(posted_);
  }
  for (auto& work : batch) work();
  return !batch.empty();
}

void Loop::spawn_or_post(std::function<Task<void>()> make) {
  if (current() == this) {
    spawn(make());
  } else {
    post([this, make = std::move(make)] { spawn(make()); });
  }
}

void Loop::spawn(Task<void> task) {
  auto handle = task.release();
  // A detached wrapper owns the task's frame for as long as it runs.
  auto wrapper = [](std::coroutine_handle<detail::TaskPromise<void>> inner) -> DetachedTask {
    co_await Task<void>(inner);
  }(handle);
  // The task's first steps run now, on the calling thread, possibly before run() or run_until()
  // made this the thread's loop (a test or a QMP handler spawns, then runs the loop): they must
  // already see this loop as Loop::current(), or code that decides where to run or where to come
  // back to (a hop to another loop and back) would think it runs on no loop at all.
  Loop* previous = current_loop;
  current_loop = this;
  wrapper.handle.resume();
  current_loop = previous;
}

void Loop::iterate(bool may_block) {
  // Posted work may be what run_until waits for (a worker thread's completion resumes a task),
  // so an iteration that ran some does not block: the caller re-checks its condition first.
  const bool ran_posted = run_posted();
  arm_wakeup();
  bool has_posted;
  {
    std::lock_guard lock(posted_mutex_);
    has_posted = !posted_.empty();
  }
  const bool block =
      may_block && !ran_posted && !has_posted && !stop_requested_.load(std::memory_order_relaxed);
  int ret = block ? io_uring_submit_and_wait(&ring_, 1) : io_uring_submit(&ring_);
  (void)ret;  // -EINTR and -EBUSY are retried by the next iteration
  pending_submissions_ = 0;

  io_uring_cqe* cqe;
  unsigned head;
  unsigned seen = 0;
  // Completions are collected first and resumed after the ring is advanced, because a resumed
  // coroutine may submit new work.
  Completion* ready[256];
  int results[256];
  unsigned flags[256];
  unsigned count = 0;
  io_uring_for_each_cqe(&ring_, head, cqe) {
    if (count == 256) break;
    ++seen;
    auto* completion = static_cast<Completion*>(io_uring_cqe_get_data(cqe));
    if (completion == &wakeup_completion_) {
      // The wake-up read is spent: note it now, not in the loop below. A completion handled
      // before it in this batch may run the loop nested (run_until from a QMP handler); that
      // nested iteration must see the read as gone and arm a new one, or it would block in the
      // kernel with nothing to wake it when another thread posts, a lost wake-up.
      wakeup_armed_ = false;
      continue;
    }
    ready[count] = completion;
    results[count] = cqe->res;
    flags[count] = cqe->flags;
    ++count;
  }
  io_uring_cq_advance(&ring_, seen);
  for (unsigned i = 0; i < count; ++i) {
    if (ready[i] == nullptr) continue;  // a cancel request's own completion
    --in_flight_;
    ready[i]->complete(ready[i], results[i], flags[i]);
  }
}

void Loop::run() {
  Loop* previous = current_loop;
  current_loop = this;
  while (!stop_requested_.load(std::memory_order_acquire)) iterate(true);
  stop_requested_.store(false, std::memory_order_relaxed);
  // The last iteration's completions may have queued submissions, typically the cancellation of
  // a timer whose completion frees its owner: hand them to the kernel and handle what completes
  // at once, or those owners would leak with the ring. Bounded, never blocking: operations that
  // wait for something (a socket, a timer not cancelled) stay pending as before.
  for (int round = 0; round < kSettleRounds && pending_submissions_ > 0; ++round) iterate(false);
  // Operations that still wait (a receive from a client that sends nothing, a timer) would go
  // with the ring, and the coroutines awaiting them with their frames and all they hold, never
  // resumed. Cancel everything in flight and hand each operation its completion (-ECANCELED, or
  // its result if it finished first), so that its coroutine carries on to its end; what those
  // submit meanwhile is cancelled by the next round. Bounded: an operation that ignores its
  // cancellation for all the rounds is left as before.
  for (int round = 0; round < kDrainRounds && in_flight_ > 0; ++round) {
    io_uring_sqe* cancel = get_sqe();
    io_uring_prep_cancel(cancel, nullptr, IORING_ASYNC_CANCEL_ANY);
    io_uring_sqe_set_data(cancel, nullptr);
    --in_flight_;  // the cancel request's own completion is not counted
    iterate(false);
    if (in_flight_ == 0) break;
    // Some completions come later than the cancellation: wait for one, or a moment.
    __kernel_timespec pause = kDrainPause;
    io_uring_sqe* timer = get_sqe();
    io_uring_prep_timeout(timer, &pause, 0, 0);
    io_uring_sqe_set_data(timer, nullptr);
    --in_flight_;
    iterate(true);
  }
  run_posted();
  current_loop = previous;
}

void Loop::run_until(const std::function<bool()>& done) {
  Loop* previous = current_loop;
  current_loop = this;
  while (!done()) iterate(true);
  current_loop = previous;
}

void Loop::stop() {
  // Under the queue's lock, as in post(): run() takes that lock once more (run_posted) before it
  // returns, so the loop cannot be gone, nor wakeup_fd_ closed, while another thread is still
  // between setting the flag and writing the wake-up.
  std::lock_guard lock(posted_mutex_);
  stop_requested_.store(true, std::memory_order_release);
  uint64_t one = 1;
  [[maybe_unused]] ssize_t written = ::write(wakeup_fd_, &one, sizeof one);
}

void Loop::SleepAwaitable::await_suspend(std::coroutine_handle<> handle) noexcept {
  resume_on_completion(handle);
  io_uring_sqe* sqe = loop->get_sqe();
  io_uring_prep_timeout(sqe, &timeout, 0, 0);
  io_uring_sqe_set_data(sqe, static_cast<Completion*>(this));
}

Loop::SleepAwaitable Loop::sleep(std::chrono::nanoseconds duration) {
  SleepAwaitable awaitable;
  awaitable.loop = this;
  awaitable.timeout = to_kernel_timespec(duration);
  return awaitable;
}

void Loop::PollForAwaitable::await_suspend(std::coroutine_handle<> handle) noexcept {
  resume_on_completion(handle);
  // The poll and its timeout must reach the kernel in one submission to stay linked.
  if (io_uring_sq_space_left(&loop->ring_) < 2) {
    io_uring_submit(&loop->ring_);
    loop->pending_submissions_ = 0;
  }
  io_uring_sqe* sqe = loop->get_sqe();
  io_uring_prep_poll_add(sqe, fd, events);
  io_uring_sqe_set_data(sqe, static_cast<Completion*>(this));
  sqe->flags |= IOSQE_IO_LINK;
  // The timeout cancels the poll (which then completes with -ECANCELED); its own completion
  // resumes nothing and is not counted as work in flight.
  io_uring_sqe* timer = loop->get_sqe();
  io_uring_prep_link_timeout(timer, &timeout, 0);
  io_uring_sqe_set_data(timer, nullptr);
  --loop->in_flight_;
}

Loop::PollForAwaitable Loop::poll_for(int fd, unsigned events, std::chrono::nanoseconds timeout) {
  PollForAwaitable awaitable;
  awaitable.loop = this;
  awaitable.fd = fd;
  awaitable.events = events;
  awaitable.timeout = to_kernel_timespec(timeout);
  return awaitable;
}

void Loop::cancel(Completion* target) {
  io_uring_sqe* sqe = get_sqe();
  io_uring_prep_cancel(sqe, target, 0);
  io_uring_sqe_set_data(sqe, nullptr);
  --in_flight_;  // the cancel request's own completion is not counted
}

Expected<std::unique_ptr<LoopThread>> LoopThread::start(std::string name) {
  auto loop = Loop::create();
  if (!loop) return loop.status();
  std::unique_ptr<LoopThread> thread(new LoopThread());
  thread->loop_ = std::move(loop).value();
  std::promise<int> started;
  auto tid = started.get_future();
  Loop* raw = thread->loop_.get();
  thread->thread_ = std::thread([raw, name, &started] {
    pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
    started.set_value(static_cast<int>(gettid()));
    raw->run();
  });
  thread->thread_id_ = tid.get();
  return thread;
}

LoopThread::~LoopThread() {
  if (thread_.joinable()) {
    loop_->stop();
    thread_.join();
  }
}

}  // namespace blockd
