#include "common/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <memory>

namespace icecache {
namespace {

thread_local const ThreadPool* tls_current_pool = nullptr;

}  // namespace

ThreadPool::ThreadPool(size_t num_threads) {
  if (num_threads == 0) num_threads = std::max(1u, std::thread::hardware_concurrency());
  workers_.reserve(num_threads);
  for (size_t i = 0; i < num_threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : workers_) t.join();
}

bool ThreadPool::InWorker() const { return tls_current_pool == this; }

void ThreadPool::Schedule(std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(task));
}

void ThreadPool::WorkerLoop() {
  tls_current_pool = this;
  while (true) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](ThreadPool* p)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu_) { return p->stopping_ || !p->queue_.empty(); },
          this));
      if (queue_.empty()) return;  // stopping and drained
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();
  }
}

void ThreadPool::ParallelFor(size_t n, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  if (n == 1 || InWorker()) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<size_t> next{0};
    absl::Mutex mu;
    size_t done ABSL_GUARDED_BY(mu) = 0;
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, &fn] {
    size_t finished = 0;
    for (size_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      ++finished;
    }
    if (finished > 0) {
      absl::MutexLock lock(&state->mu);
      state->done += finished;
    }
  };
  const size_t helpers = std::min(workers_.size(), n - 1);
  for (size_t h = 0; h < helpers; ++h) Schedule(run);
  run();
  std::pair<State*, size_t> wait_for(state.get(), n);
  absl::MutexLock lock(&state->mu);
  state->mu.Await(absl::Condition(
      +[](std::pair<State*, size_t>* a)
           ABSL_NO_THREAD_SAFETY_ANALYSIS { return a->first->done == a->second; },
      &wait_for));
}

}  // namespace icecache
