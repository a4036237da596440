#include "common/keyed_serial_executor.h"

#include <utility>

namespace icecache {

KeyedSerialExecutor::KeyedSerialExecutor(ThreadPool* pool) : state_(std::make_shared<State>()) {
  state_->pool = pool;
}

void KeyedSerialExecutor::Submit(const std::string& key, std::function<void()> task) {
  bool start = false;
  {
    absl::MutexLock lock(&state_->mu);
    auto [it, inserted] = state_->queues.try_emplace(key);
    it->second.push_back(std::move(task));
    start = inserted;  // a new key has no drain yet; an existing one's drain will get to it
  }
  if (start) {
    state_->pool->Schedule([state = state_, key] { Drain(std::move(state), key); });
  }
}

bool KeyedSerialExecutor::SubmitIfBusy(const std::string& key, std::function<void()>& task) {
  absl::MutexLock lock(&state_->mu);
  auto it = state_->queues.find(key);
  if (it == state_->queues.end()) return false;
  it->second.push_back(std::move(task));
  return true;
}

size_t KeyedSerialExecutor::active_keys() const {
  absl::MutexLock lock(&state_->mu);
  return state_->queues.size();
}

// The key's entry stays while its drain runs (front task = running); it goes when the drain
// finds nothing after the task it ran.
void KeyedSerialExecutor::Drain(std::shared_ptr<State> state, std::string key) {
  while (true) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&state->mu);
      auto it = state->queues.find(key);
      task = std::move(it->second.front());
    }
    task();
    task = nullptr;  // whatever the task held goes now, before the state is touched again
    absl::MutexLock lock(&state->mu);
    auto it = state->queues.find(key);
    it->second.pop_front();
    if (it->second.empty()) {
      state->queues.erase(it);
      return;
    }
  }
}

}  // namespace icecache
