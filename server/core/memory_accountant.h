// Accounting of the host memory the daemon promises to its clients, against --memory-limit.
//
// Every byte the daemon will hold for a client (its sequences' promises and its arena, through
// a ClientBudget per client) is reserved here before anything is allocated, so that the limit is
// enforced by the daemon with a RESOURCE_EXHAUSTED error instead of by the kernel's OOM killer.
//
// Thread safety: all methods are thread-safe.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

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

// What a share of a client's arena is for: page frames or staging buffers.
enum class ArenaUse { kPages, kStaging };

// The memory of one client, charged to the daemon-wide accountant as one amount:
//
//   charged = fixed + heap + max(arena promised, arena held)
//
// where `fixed` is memory the client holds by being attached (its control segment), `heap`
// the daemon's own memory its sequences were promised (index metadata, private copies),
// `arena promised` the shared memory its sequences were promised (page frames and staging at
// their worst case) and `arena held` the data segments its arena actually holds. A sequence's
// promise is reserved when it is created (the admission decision); the arena then grows
// within the promise without touching the daemon-wide accountant, so an admitted sequence is
// not refused midway. Holding more than was promised (a client staging beyond its allowance,
// or segments stranded by dropped sequences) is charged as it happens, and refused only when
// the daemon-wide limit is full.
//
// The arena's promise and holdings are also kept per use (ArenaUse): the staging share of
// each is a part of the whole. The arena sizes a new segment within its own use's headroom,
// so that staging segments (sized for a prompt) never take the room promised to page frames.
//
// `quota` bounds fixed + max(arena promised, arena held) (--client-quota).
//
// Thread safety: all methods are thread-safe (one internal mutex; `global` is called under
// it, never the other way round).
class ClientBudget {
 public:
  // `global` must outlive the budget; `segments_total` (when given: the bytes of every
  // budget's segments) is shared, since a budget can outlive its data plane (the last
  // reference to a client's arena may go on a pool worker after the plane is destroyed);
  // quota_bytes 0 means no per-client bound.
  ClientBudget(MemoryAccountant* global, uint64_t quota_bytes,
               std::shared_ptr<std::atomic<uint64_t>> segments_total = nullptr);
  ClientBudget(const ClientBudget&) = delete;
  ClientBudget& operator=(const ClientBudget&) = delete;
  ~ClientBudget();  // releases whatever is still charged

  // A sequence's promise, of which `staging_bytes` (at most `arena_bytes`) for staging.
  // RESOURCE_EXHAUSTED (nothing changes) when it does not fit the quota or the daemon-wide
  // limit; INVALID_ARGUMENT when the staging share exceeds the arena bytes; `what` names the
  // requester in the message.
  absl::Status Promise(uint64_t arena_bytes, uint64_t heap_bytes, const char* what,
                       uint64_t staging_bytes = 0);
  // Gives back part of what was promised (the same shares). Giving back more than was
  // promised, or a staging share above the arena bytes, is a broken invariant (aborts).
  void Unpromise(uint64_t arena_bytes, uint64_t heap_bytes, uint64_t staging_bytes = 0);

  // A segment the arena creates (`fixed`: the control segment) for `use`, and its release.
  // RESOURCE_EXHAUSTED (nothing changes) above the quota, or when a segment beyond the
  // promises does not fit the daemon-wide limit.
  absl::Status ChargeSegment(uint64_t bytes, bool fixed, ArenaUse use = ArenaUse::kPages);
  void ReleaseSegment(uint64_t bytes, bool fixed, ArenaUse use = ArenaUse::kPages);

  // Promised arena bytes not held yet (0 when the arena holds more than was promised).
  uint64_t headroom() const;
  // The same for one use: its share of the promises not held yet by segments of that use.
  uint64_t headroom(ArenaUse use) const;
  // Whether the arena holds more than its sequences were promised.
  bool over_promise() const;
  uint64_t charged() const;
  uint64_t arena_held() const;
  uint64_t arena_promised() const;
  uint64_t held(ArenaUse use) const;
  uint64_t promised(ArenaUse use) const;

 private:
  uint64_t Charged() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return fixed_ + heap_ + std::max(promised_, held_);
  }
  // One use's share of promised_ and held_.
  uint64_t PromisedOf(ArenaUse use) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return use == ArenaUse::kStaging ? promised_staging_ : promised_ - promised_staging_;
  }
  uint64_t HeldOf(ArenaUse use) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return use == ArenaUse::kStaging ? held_staging_ : held_ - held_staging_;
  }
  // Moves the global charge from `before` to Charged(); false (nothing reserved) when the
  // global limit refuses the growth.
  absl::Status Settle(uint64_t before, const char* what) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  MemoryAccountant* const global_;
  const uint64_t quota_;
  const std::shared_ptr<std::atomic<uint64_t>> segments_total_;
  mutable absl::Mutex mu_;
  uint64_t fixed_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t heap_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t promised_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t held_ ABSL_GUARDED_BY(mu_) = 0;
  // The staging shares of promised_ and held_.
  uint64_t promised_staging_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t held_staging_ ABSL_GUARDED_BY(mu_) = 0;
};

// Reserves `bytes` in `inner` (a client's quota) and then `outer` (the daemon's limit): both
// or neither. The message of a refusal comes from the accountant that refused.
absl::Status ReserveNested(MemoryAccountant* inner, MemoryAccountant* outer, uint64_t bytes,
                           const char* what);
void ReleaseNested(MemoryAccountant* inner, MemoryAccountant* outer, uint64_t bytes);

}  // namespace icecache
