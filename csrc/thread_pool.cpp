// thread_pool.cpp: see thread_pool.h. Workers spin on the job generation for a short
// while (decode calls arrive microseconds apart), then block on the condition variable.
#include "thread_pool.h"

#include <memory>

namespace luthier {

ThreadPool::ThreadPool(int n_threads) {
  for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::work() {
  for (;;) {
    const int64_t t = next_.fetch_add(1);
    if (t >= n_tasks_) break;
    (*fn_)(t);
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen && spins < 20000) {
      if (spins < 2000) spin_pause(); else std::this_thread::yield();
      ++spins;
    }
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return generation_.load() != seen; });
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_) return;
    work();
    busy_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::run(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
  if (workers_.empty() || n_tasks <= 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    fn_ = &fn;
    n_tasks_ = n_tasks;
    next_.store(0);
    busy_.store(int(workers_.size()));
    generation_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  work();
  // on a loaded machine a descheduled worker must get the core back (spin_until yields)
  spin_until([this] { return busy_.load(std::memory_order_acquire) == 0; });
}

ThreadPool& global_pool(int n_threads) {
  static std::unique_ptr<ThreadPool> pool;
  static std::mutex mu;
  std::lock_guard<std::mutex> lk(mu);
  if (n_threads < 1) n_threads = 1;
  if (!pool || pool->size() != n_threads) {
    pool.reset();
    pool = std::make_unique<ThreadPool>(n_threads);
  }
  return *pool;
}

}  // namespace luthier
