// A fixed pool of worker threads for CPU-heavy work (index builds, searches, inserts).
//
// Thread safety: Schedule and ParallelFor may be called from any thread, including from a
// task running on the pool (ParallelFor then runs the nested loop on the calling thread,
// so nested parallelism cannot deadlock). The destructor drains queued tasks, then joins.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace icecache {

class ThreadPool {
 public:
  // `num_threads` workers; 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(size_t num_threads = 0);
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool();

  size_t size() const { return workers_.size(); }

  // Runs `task` on some worker, eventually.
  void Schedule(std::function<void()> task);

  // Runs fn(i) for every i in [0, n), spread over the workers and the calling thread, and
  // returns when all have finished. Iterations are handed out one at a time (dynamic), so
  // uneven work balances.
  void ParallelFor(size_t n, const std::function<void(size_t)>& fn);

  // True when called from one of this pool's workers.
  bool InWorker() const;

 private:
  void WorkerLoop();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace icecache
