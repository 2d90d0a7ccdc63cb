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
    job->result = job->run(job);
    // The capture is one pointer, so std::function stores it inline: no allocation.
    job->loop->post([job] { job->waiter.resume(); });
    lock.lock();
  }
}

}  // namespace blockd::drivers
