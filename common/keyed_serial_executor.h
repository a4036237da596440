// Runs tasks one after another per key, in submission order, on a ThreadPool; different keys
// run in parallel. The data plane uses it to apply each (sequence, layer)'s appends in order.
//
// A key exists only while it has work: its entry goes when its last task has run, so the
// executor holds nothing for keys (sequences) that are gone. A task may release the last
// reference to the executor's owner: the drain that runs it keeps the executor's state alive
// until it has left it.
//
// Thread safety: all methods are thread-safe. Tasks of one key never overlap.
#pragma once

#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "common/thread_pool.h"

namespace icecache {

class KeyedSerialExecutor {
 public:
  // `pool` must outlive every task submitted.
  explicit KeyedSerialExecutor(ThreadPool* pool);
  KeyedSerialExecutor(const KeyedSerialExecutor&) = delete;
  KeyedSerialExecutor& operator=(const KeyedSerialExecutor&) = delete;

  void Submit(const std::string& key, std::function<void()> task);
  // Queues `task` behind the key's work when the key has queued or running work and returns
  // true; returns false (and drops nothing: `task` is left as it was) when the key is idle, so
  // the caller may run it at once.
  bool SubmitIfBusy(const std::string& key, std::function<void()>& task);
  // Keys with queued or running work.
  size_t active_keys() const;

 private:
  struct State {
    ThreadPool* pool;
    mutable absl::Mutex mu;
    absl::flat_hash_map<std::string, std::deque<std::function<void()>>> queues ABSL_GUARDED_BY(mu);
  };
  static void Drain(std::shared_ptr<State> state, std::string key);

  std::shared_ptr<State> state_;
};

}  // namespace icecache
