// Accounting of the host memory the daemon promises to its clients, against --memory-limit.
//
// Every byte the daemon will hold for a client (today: a sequence's KV bytes) is reserved
// here before anything is allocated, so that the limit is enforced by the daemon with a
// RESOURCE_EXHAUSTED error instead of by the kernel's OOM killer.
//
// Thread safety: all methods are thread-safe.
#pragma once

#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace icecache {

class MemoryAccountant {
 public:
  explicit MemoryAccountant(uint64_t limit_bytes) : limit_(limit_bytes) {}
  MemoryAccountant(const MemoryAccountant&) = delete;
  MemoryAccountant& operator=(const MemoryAccountant&) = delete;

  // Reserves `bytes` if used + bytes <= limit. On RESOURCE_EXHAUSTED nothing changes; the
  // message says what was asked, what is used and the limit. `what` names the requester in
  // that message (e.g. "sequence").
  absl::Status Reserve(uint64_t bytes, const char* what);
  // Returns bytes reserved earlier. Releasing more than is reserved is a broken invariant
  // and aborts.
  void Release(uint64_t bytes);

  uint64_t used() const;
  uint64_t limit() const { return limit_; }
  // Reserve calls refused since construction (and refusals recorded by callers that check a
  // tighter bound, such as a per-client quota, before reserving).
  uint64_t rejections() const;
  void RecordRejection();

 private:
  const uint64_t limit_;
  mutable absl::Mutex mu_;
  uint64_t used_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t rejections_ ABSL_GUARDED_BY(mu_) = 0;
};

// Reserves `bytes` in `inner` (a client's quota) and then `outer` (the daemon's limit): both
// or neither. The message of a refusal comes from the accountant that refused.
absl::Status ReserveNested(MemoryAccountant* inner, MemoryAccountant* outer, uint64_t bytes,
                           const char* what);
void ReleaseNested(MemoryAccountant* inner, MemoryAccountant* outer, uint64_t bytes);

}  // namespace icecache
