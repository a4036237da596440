// ThreadSanitizer builds only (scripts/sanitize.sh --tsan links this object into every
// executable): makes Abseil's synchronization visible to TSan.
//
// Debian's libabsl is not built with -fsanitize=thread, so absl::Mutex, absl::Notification and
// absl::BlockingCounter synchronize through atomics and futexes TSan never sees: every access
// guarded by an absl::Mutex is reported as a data race (the first run of the data plane tests
// under TSan reported MemoryAccountant::Reserve racing with itself). Here the executable
// defines those member functions itself (its definitions take precedence over the shared
// library's for every call from this repository's code), calls the library's through dlsym
// and tells TSan about the happens-before edges with __tsan_acquire / __tsan_release.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/synchronization/blocking_counter.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

// Weak: the object is also linked into CMake's try-compile checks, which have no TSan runtime.
extern "C" void __tsan_acquire(void* addr) __attribute__((weak));
extern "C" void __tsan_release(void* addr) __attribute__((weak));

namespace {

void Acquire(const void* p) {
  if (__tsan_acquire != nullptr) __tsan_acquire(const_cast<void*>(p));
}
void Release(const void* p) {
  if (__tsan_release != nullptr) __tsan_release(const_cast<void*>(p));
}

#define ICECACHE_STR2(x) #x
#define ICECACHE_STR(x) ICECACHE_STR2(x)

// The library's definition of absl::<inline namespace>::<rest>, `rest` mangled from the class
// name on (e.g. "5Mutex4LockEv"); `k` for a const member function.
void* Real(const char* rest, bool k = false) {
  const std::string ns = ICECACHE_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME);
  const std::string name =
      std::string(k ? "_ZNK4absl" : "_ZN4absl") + std::to_string(ns.size()) + ns + rest;
  void* f = ::dlsym(RTLD_NEXT, name.c_str());
  if (f == nullptr) {
    std::fprintf(stderr, "tsan_absl_sync: %s not found\n", name.c_str());
    std::abort();
  }
  return f;
}

template <typename F>
F Fn(const char* rest, bool k = false) {
  return reinterpret_cast<F>(Real(rest, k));
}

// A condition is evaluated with the mutex held, but inside the library, by the waiter or by
// the thread that unlocks: the evaluation acquires what the mutex's holders released, and
// releases what it read to the next holder.
struct Guarded {
  const absl::Condition* cond;
  const absl::Mutex* mu;
  static bool Eval(void* arg) {
    const Guarded* g = static_cast<const Guarded*>(arg);
    Acquire(g->mu);
    const bool r = g->cond->Eval();
    Release(g->mu);  // false: the mutex is given up while the waiter sleeps
    return r;
  }
};

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  static auto real = Fn<void (*)(Mutex*)>("5Mutex4LockEv");
  real(this);
  Acquire(this);
}
void Mutex::ReaderLock() {
  static auto real = Fn<void (*)(Mutex*)>("5Mutex10ReaderLockEv");
  real(this);
  Acquire(this);
}
bool Mutex::TryLock() {
  static auto real = Fn<bool (*)(Mutex*)>("5Mutex7TryLockEv");
  const bool got = real(this);
  if (got) Acquire(this);
  return got;
}
bool Mutex::ReaderTryLock() {
  static auto real = Fn<bool (*)(Mutex*)>("5Mutex13ReaderTryLockEv");
  const bool got = real(this);
  if (got) Acquire(this);
  return got;
}
void Mutex::Unlock() {
  static auto real = Fn<void (*)(Mutex*)>("5Mutex6UnlockEv");
  Release(this);
  real(this);
}
void Mutex::ReaderUnlock() {
  static auto real = Fn<void (*)(Mutex*)>("5Mutex12ReaderUnlockEv");
  Release(this);
  real(this);
}
void Mutex::LockWhen(const Condition& cond) {
  static auto real = Fn<void (*)(Mutex*, const Condition&)>("5Mutex8LockWhenERKNS0_9ConditionE");
  Guarded g{&cond, this};
  real(this, Condition(&Guarded::Eval, &g));
  Acquire(this);
}
void Mutex::ReaderLockWhen(const Condition& cond) {
  static auto real =
      Fn<void (*)(Mutex*, const Condition&)>("5Mutex14ReaderLockWhenERKNS0_9ConditionE");
  Guarded g{&cond, this};
  real(this, Condition(&Guarded::Eval, &g));
  Acquire(this);
}
bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  static auto real = Fn<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Guarded g{&cond, this};
  const bool r = real(this, Condition(&Guarded::Eval, &g), deadline);
  Acquire(this);  // held either way
  return r;
}
bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  static auto real = Fn<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Guarded g{&cond, this};
  const bool r = real(this, Condition(&Guarded::Eval, &g), timeout);
  Acquire(this);
  return r;
}
// Await* release the mutex while they wait and hold it again when they return.
void Mutex::Await(const Condition& cond) {
  static auto real = Fn<void (*)(Mutex*, const Condition&)>("5Mutex5AwaitERKNS0_9ConditionE");
  Release(this);
  Guarded g{&cond, this};
  real(this, Condition(&Guarded::Eval, &g));
  Acquire(this);
}
bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  static auto real = Fn<bool (*)(Mutex*, const Condition&, absl::Duration)>(
      "5Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Release(this);
  Guarded g{&cond, this};
  const bool r = real(this, Condition(&Guarded::Eval, &g), timeout);
  Acquire(this);
  return r;
}
bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  static auto real = Fn<bool (*)(Mutex*, const Condition&, absl::Time)>(
      "5Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Release(this);
  Guarded g{&cond, this};
  const bool r = real(this, Condition(&Guarded::Eval, &g), deadline);
  Acquire(this);
  return r;
}

void CondVar::Wait(Mutex* mu) {
  static auto real = Fn<void (*)(CondVar*, Mutex*)>("7CondVar4WaitEPNS0_5MutexE");
  Release(mu);
  real(this, mu);
  Acquire(mu);
}
bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  static auto real = Fn<bool (*)(CondVar*, Mutex*, absl::Duration)>(
      "7CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Release(mu);
  const bool r = real(this, mu, timeout);
  Acquire(mu);
  return r;
}
bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  static auto real = Fn<bool (*)(CondVar*, Mutex*, absl::Time)>(
      "7CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Release(mu);
  const bool r = real(this, mu, deadline);
  Acquire(mu);
  return r;
}

void Notification::Notify() {
  static auto real = Fn<void (*)(Notification*)>("12Notification6NotifyEv");
  Release(this);
  real(this);
}
void Notification::WaitForNotification() const {
  static auto real =
      Fn<void (*)(const Notification*)>("12Notification19WaitForNotificationEv", true);
  real(this);
  Acquire(this);
}
bool Notification::WaitForNotificationWithTimeout(absl::Duration timeout) const {
  static auto real = Fn<bool (*)(const Notification*, absl::Duration)>(
      "12Notification30WaitForNotificationWithTimeoutENS0_8DurationE", true);
  const bool r = real(this, timeout);
  if (r) Acquire(this);
  return r;
}
bool Notification::WaitForNotificationWithDeadline(absl::Time deadline) const {
  static auto real = Fn<bool (*)(const Notification*, absl::Time)>(
      "12Notification31WaitForNotificationWithDeadlineENS0_4TimeE", true);
  const bool r = real(this, deadline);
  if (r) Acquire(this);
  return r;
}

bool BlockingCounter::DecrementCount() {
  static auto real = Fn<bool (*)(BlockingCounter*)>("15BlockingCounter14DecrementCountEv");
  Release(this);
  return real(this);
}
void BlockingCounter::Wait() {
  static auto real = Fn<void (*)(BlockingCounter*)>("15BlockingCounter4WaitEv");
  real(this);
  Acquire(this);
}

ABSL_NAMESPACE_END
}  // namespace absl
