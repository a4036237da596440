// The daemon's registry of live sequences: geometry, accounting and handles.
//
// A sequence is created from a GeometrySpec (validated and defaulted by ResolveGeometry),
// its host KV bytes are reserved in the MemoryAccountant before it becomes visible, and it
// is addressed afterwards by an opaque, unguessable handle ("seq_" + 32 hex digits).
//
// Thread safety: all methods are thread-safe; each takes one short internal lock.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/random/random.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/core/clock.h"
#include "server/core/geometry.h"
#include "server/core/memory_accountant.h"

namespace icecache {

class SequenceKv;

// Who is asking. Clients see and drop only their own sequences; operators (the CLI) see all.
struct Caller {
  uint64_t client_id = 0;  // 0: nobody in particular
  bool is_operator = false;
};

struct SequenceInfo {
  std::string handle;
  Geometry geometry;
  std::string label;
  uint64_t kv_bytes = 0;    // reserved in the accountant
  uint64_t num_tokens = 0;  // tokens stored in the first offloaded layer
  absl::Time create_time;
  uint64_t owner = 0;              // client id of the attachment that created it (0: none)
  std::shared_ptr<SequenceKv> kv;  // the stored KV (null without a data plane)
  // Gives the charge back (a Charge's release); called once by the registry when the sequence
  // is dropped, never by holders of copies. Empty: kv_bytes go back to the accountant.
  std::function<void()> release;
};

struct SequencePage {
  std::vector<SequenceInfo> sequences;  // ordered by handle
  std::string next_page_token;          // empty on the last page
  uint64_t total_size = 0;              // live sequences in total
};

class SequenceRegistry {
 public:
  static constexpr uint32_t kDefaultListPageSize = 100;
  static constexpr uint32_t kMaxListPageSize = 1000;

  // `accountant` and `clock` must outlive the registry.
  SequenceRegistry(MemoryAccountant* accountant, const Clock* clock);
  SequenceRegistry(const SequenceRegistry&) = delete;
  SequenceRegistry& operator=(const SequenceRegistry&) = delete;
  ~SequenceRegistry();

  // Builds the stored KV of a new sequence once its geometry is valid and its bytes are
  // reserved; an error aborts the creation (the reservation is returned).
  using KvFactory = std::function<absl::StatusOr<std::shared_ptr<SequenceKv>>(const Geometry&)>;

  // How a sequence's memory is charged, when not by the registry's own accountant: `bytes`
  // (reported as its kv_bytes) are reserved by `reserve` before the sequence exists (an error
  // aborts the creation) and given back by `release` exactly once, when it is dropped.
  struct Charge {
    uint64_t bytes = 0;
    std::function<absl::Status()> reserve;
    std::function<void()> release;
  };
  using ChargeFactory = std::function<absl::StatusOr<Charge>(const Geometry&)>;

  struct CreateOptions {
    uint64_t owner = 0;  // client id of the creator (0: none)
    KvFactory make_kv;
    uint64_t quota_bytes = 0;  // the owner's quota for the KV bytes (0: none)
    uint32_t max_owned = 0;    // sequences `owner` may hold at once (0: no limit)
    // Empty: the geometry's host_kv_bytes() are reserved in the registry's accountant.
    ChargeFactory charge;
  };

  // INVALID_ARGUMENT: a geometry field or the label is invalid (message names it).
  // RESOURCE_EXHAUSTED: the KV bytes do not fit in the memory limit (or `quota_bytes`, the
  // owner's quota, when non-zero), or the owner already holds `max_owned` sequences. Errors
  // of `make_kv` and `charge` pass through. On error nothing changes.
  absl::StatusOr<SequenceInfo> Create(const GeometrySpec& spec, const std::string& label,
                                      const CreateOptions& options);
  absl::StatusOr<SequenceInfo> Create(const GeometrySpec& spec, const std::string& label,
                                      uint64_t owner = 0, const KvFactory& make_kv = {},
                                      uint64_t quota_bytes = 0) {
    CreateOptions options;
    options.owner = owner;
    options.make_kv = make_kv;
    options.quota_bytes = quota_bytes;
    return Create(spec, label, options);
  }

  // INVALID_ARGUMENT: malformed handle. NOT_FOUND: no live sequence with this handle that
  // `caller` may see (another client's sequence is NOT_FOUND too).
  absl::StatusOr<SequenceInfo> Get(absl::string_view handle, const Caller& caller = kAnyone) const;

  // One page of the live sequences `caller` may see, ordered by handle, starting after
  // `page_token` (a handle returned as next_page_token, or empty). page_size 0 means
  // kDefaultListPageSize.
  // INVALID_ARGUMENT: page_size above kMaxListPageSize or a malformed page_token.
  absl::StatusOr<SequencePage> List(uint32_t page_size, absl::string_view page_token,
                                    const Caller& caller = kAnyone) const;

  // Removes the sequence and releases its bytes; returns the bytes released.
  // INVALID_ARGUMENT: malformed handle. NOT_FOUND: no live sequence `caller` may see.
  absl::StatusOr<uint64_t> Drop(absl::string_view handle, const Caller& caller = kAnyone);

  // Drops every sequence of `owner` (a client that went away); returns how many.
  uint64_t DropOwnedBy(uint64_t owner);

  // A caller that sees everything (in-process users and tests).
  static constexpr Caller kAnyone = Caller{0, true};

  uint64_t size() const;
  uint64_t created_total() const;
  uint64_t dropped_total() const;

  // The durable id of a well-formed handle (its first 16 hex digits; never 0), which the frame
  // tags of its pages name (abi::FrameTag).
  static uint64_t DurableIdOf(absl::string_view handle);
  // True for strings of the handle format; says nothing about liveness.
  static bool IsWellFormedHandle(absl::string_view handle);

 private:
  std::string NewHandle() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static bool Visible(const SequenceInfo& info, const Caller& caller) {
    return caller.is_operator || info.owner == caller.client_id;
  }
  // Sets num_tokens from the stored KV. Never under mu_ (it may wait for an append).
  static void CountTokens(SequenceInfo* info);
  // Returns a dropped sequence's memory (its release, or the accountant's bytes).
  void Release(const SequenceInfo& info);

  MemoryAccountant* const accountant_;
  const Clock* const clock_;
  mutable absl::Mutex mu_;
  std::map<std::string, SequenceInfo, std::less<>> sequences_ ABSL_GUARDED_BY(mu_);
  absl::BitGen rng_ ABSL_GUARDED_BY(mu_);
  uint64_t created_total_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t dropped_total_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace icecache
