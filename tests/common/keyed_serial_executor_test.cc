#include "common/keyed_serial_executor.h"

#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace icecache {
namespace {

// Waits (bounded) until the executor holds no key.
bool Drained(const KeyedSerialExecutor& e) {
  for (int i = 0; i < 2000 && e.active_keys() != 0; ++i) absl::SleepFor(absl::Milliseconds(1));
  return e.active_keys() == 0;
}

TEST(KeyedSerialExecutor, OneKeyRunsInOrderKeysRunInParallel) {
  ThreadPool pool(4);
  KeyedSerialExecutor e(&pool);
  absl::Mutex mu;
  std::vector<int> a, b;
  absl::Notification release_a;
  e.Submit("a", [&] { release_a.WaitForNotification(); });
  for (int i = 0; i < 50; ++i) {
    e.Submit("a", [&, i] {
      absl::MutexLock lock(&mu);
      a.push_back(i);
    });
    e.Submit("b", [&, i] {
      absl::MutexLock lock(&mu);
      b.push_back(i);
    });
  }
  // "b" finishes while "a" is held up by its first task.
  for (int i = 0; i < 2000; ++i) {
    {
      absl::MutexLock lock(&mu);
      if (b.size() == 50) break;
    }
    absl::SleepFor(absl::Milliseconds(1));
  }
  {
    absl::MutexLock lock(&mu);
    EXPECT_EQ(b.size(), 50u);
    EXPECT_TRUE(a.empty());
  }
  EXPECT_EQ(e.active_keys(), 1u);
  release_a.Notify();
  ASSERT_TRUE(Drained(e));
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(a[i], i);
    EXPECT_EQ(b[i], i);
  }
}

// The data plane's old per-key queues stayed in a map forever (one per sequence and layer a
// client ever had); a key now goes with its last task.
TEST(KeyedSerialExecutor, KeysGoWhenTheirWorkIsDone) {
  ThreadPool pool(2);
  KeyedSerialExecutor e(&pool);
  std::atomic<int> ran{0};
  for (int s = 0; s < 1000; ++s) {
    for (int l = 0; l < 4; ++l) e.Submit(absl::StrCat("seq", s, "/", l), [&] { ++ran; });
  }
  ASSERT_TRUE(Drained(e));
  EXPECT_EQ(ran.load(), 4000);
}

// A task may hold the last reference to the executor's owner (the data plane's tasks hold
// their client, which owns the executor): the old queue ran on freed memory after such a task
// (AddressSanitizer: heap-use-after-free in SerialQueue::Drain). Run under ASan to see it.
TEST(KeyedSerialExecutor, ATaskMayReleaseTheLastReferenceToItsOwner) {
  ThreadPool pool(2);
  struct Owner {
    explicit Owner(ThreadPool* p) : executor(p) {}
    KeyedSerialExecutor executor;
  };
  std::atomic<int> gone{0};
  std::vector<absl::Notification> queued(200);
  for (int i = 0; i < 200; ++i) {
    auto owner = std::make_shared<Owner>(&pool);
    KeyedSerialExecutor* e = &owner->executor;
    e->Submit("k", [&queued, i] { queued[i].WaitForNotification(); });
    e->Submit("k", [owner = std::move(owner), &gone]() mutable {
      owner.reset();  // the executor's owner dies inside its own task
      ++gone;
    });
    queued[i].Notify();
  }
  for (int i = 0; i < 2000 && gone.load() < 200; ++i) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_EQ(gone.load(), 200);
}

}  // namespace
}  // namespace icecache
