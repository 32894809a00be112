// thread_pool.h: a persistent pool; workers spin briefly, then sleep, between jobs.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace luthier {

// One step of a spin-wait: the CPU's pause hint, or a yield where there is none
inline void spin_pause() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Waits until done() holds: spins briefly, then yields (on a loaded machine the thread it
// waits for may have lost its core and must get it back)
template <typename F>
void spin_until(F done) {
  for (int spins = 0; !done(); ++spins) {
    if (spins < 2000) spin_pause();
    else std::this_thread::yield();
  }
}

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  int size() const { return int(workers_.size()) + 1; }
  // Runs fn(task) for task in [0, n_tasks) on all threads (the caller included); returns
  // when all are done. fn must not throw. No allocation: fn is passed by reference.
  void run(int64_t n_tasks, const std::function<void(int64_t)>& fn);

 private:
  void worker_loop();
  void work();
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> busy_{0};
  int64_t n_tasks_ = 0;
  const std::function<void(int64_t)>* fn_ = nullptr;
  bool stop_ = false;
};

// The process-wide pool, resized (recreated) when a call asks for another thread count.
ThreadPool& global_pool(int n_threads);

}  // namespace luthier
