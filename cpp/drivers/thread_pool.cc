#include "drivers/thread_pool.h"

#include <pthread.h>

namespace blockd::drivers {

ThreadPool& ThreadPool::shared() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& thread : workers_) thread.join();
}

size_t ThreadPool::TEST_worker_count() {
  std::lock_guard lock(mutex_);
  return workers_.size();
}

void ThreadPool::submit(ThreadPoolJob* job) {
  job->next = nullptr;
  {
    std::lock_guard lock(mutex_);
    if (tail_ != nullptr) {
      tail_->next = job;
    } else {
      head_ = job;
    }
    tail_ = job;
    // A new worker only when every existing one is busy: the pool grows to the peak queue depth.
    if (idle_ == 0 && workers_.size() < kMaxWorkers) {
      workers_.emplace_back([this] { worker(); });
      return;  // the new worker takes the job without a notification
    }
  }
  wake_.notify_one();
}

bool ThreadPool::withdraw(ThreadPoolJob* job) {
  std::lock_guard lock(mutex_);
  ThreadPoolJob* previous = nullptr;
  for (ThreadPoolJob* queued = head_; queued != nullptr; queued = queued->next) {
    if (queued == job) {
      (previous != nullptr ? previous->next : head_) = job->next;
      if (tail_ == job) tail_ = previous;
      return true;
    }
    previous = queued;
  }
  return false;
}

namespace {

// The worker's half of ThreadPool::run_beside.
struct BesideJob : ThreadPoolJob {
  void (*function)(void*) noexcept = nullptr;
  void* context = nullptr;
  std::atomic<uint32_t> done{0};
};

}  // namespace

void ThreadPool::run_beside(void (*first)(void*) noexcept, void* first_context,
                            void (*second)(void*) noexcept, void* second_context) {
  // One job per calling thread, kept for the thread's life: the worker's wake-up call after it
  // marks the job done may come after the caller has seen the mark and returned.
  static thread_local BesideJob job;
  job.run = [](ThreadPoolJob* self) -> int64_t {
    auto* beside = static_cast<BesideJob*>(self);
    beside->function(beside->context);
    beside->done.store(1, std::memory_order_release);
    beside->done.notify_one();
    return 0;
  };
  job.loop = nullptr;
  job.function = second;
  job.context = second_context;
  job.done.store(0, std::memory_order_relaxed);
  submit(&job);
  first(first_context);
  if (withdraw(&job)) {
    second(second_context);
    return;
  }
  while (job.done.load(std::memory_order_acquire) == 0) job.done.wait(0, std::memory_order_acquire);
}

void ThreadPool::worker() {
  pthread_setname_np(pthread_self(), "blockd-worker");
  std::unique_lock lock(mutex_);
  for (;;) {
    while (head_ == nullptr && !stopping_) {
      ++idle_;
      wake_.wait(lock);
      --idle_;
    }
    if (head_ == nullptr) return;  // stopping and drained
    ThreadPoolJob* job = head_;
    head_ = job->next;
    if (head_ == nullptr) tail_ = nullptr;
    lock.unlock();
    Loop* const loop = job->loop;
    const int64_t result = job->run(job);
    // A job without a loop told its submitter in `run` and may be gone by now.
    if (loop != nullptr) {
      job->result = result;
      // The capture is one pointer, so std::function stores it inline: no allocation.
      loop->post([job] { job->waiter.resume(); });
    }
    lock.lock();
  }
}

}  // namespace blockd::drivers
