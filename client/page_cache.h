// The page cache of one offloaded layer (internal to libicecache_client): per KV head,
// `slots` page frames of working memory (device memory in CUDA mode), replaced least recently
// used by decode step. A page is known by its arena frame (segment, frame) and is current at
// one version: a page resident at the version a select returns is a hit and is not moved
// again; at another version it is refetched into the same slot. Only bookkeeping lives here;
// the memory and the gather belong to the caller.
//
// Thread safety: none (one owner, the layer).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "proto/icecache/v1/abi.h"

namespace icecache::client_internal {

class PageCache {
 public:
  // `slots` >= 1 per head.
  PageCache(uint32_t num_heads, uint32_t slots);

  struct Placement {
    uint32_t slot = 0;   // where the page is (or goes) within the head's slots
    bool fetch = false;  // the slot does not hold this page at this version: gather it
  };
  // Places page `ref` of head `head` for decode step `step` (steps increase from 1; a step
  // may place several pages). INTERNAL when every slot of the head already serves this step
  // (the cache is smaller than one step's selection). INVALID_ARGUMENT for a head out of
  // range or a page with no segment.
  absl::StatusOr<Placement> Place(uint32_t head, const abi::SelectedPageRef& ref, uint64_t step);

  uint32_t num_heads() const { return num_heads_; }
  uint32_t slots() const { return slots_; }
  // Pages resident in `head` (tests, statistics).
  uint32_t resident(uint32_t head) const;
  // Forgets every page (the memory keeps whatever it holds).
  void Clear();

 private:
  struct Entry {
    uint32_t segment = abi::kNoSegment;
    uint32_t frame = 0;
    uint32_t version = 0;
    uint64_t last_used = 0;  // step that last placed it (0: never)
  };
  static uint64_t Key(uint32_t segment, uint32_t frame) {
    return (uint64_t{segment} << 32) | frame;
  }

  uint32_t num_heads_, slots_;
  std::vector<Entry> entries_;                                  // [head][slot]
  std::vector<absl::flat_hash_map<uint64_t, uint32_t>> where_;  // per head: frame -> slot
};

}  // namespace icecache::client_internal
