// What the daemon promises a sequence when it admits it (CreateSequence): the most memory the
// sequence's prefill and decode can take, so that a sequence that was admitted is never
// refused midway for memory. The promise is reserved in the client's ClientBudget
// (memory_accountant.h) against --memory-limit, and released when the sequence is dropped.
//
//   pages    page frames of every offloaded (layer, KV head) at the index's worst-case page
//            count for max_tokens tokens (an index's pages are clusters, not all full);
//   staging  the staging buffers the sequence may hold at once: the prompt of `prefill_depth`
//            layers at max_tokens, plus one window page per offloaded layer;
//   heap     the daemon's own memory for it: index metadata (measured once per head geometry
//            on a calibration build of the daemon's index preset) and a fixed overhead per
//            sequence and per (layer, KV head). A sequence whose layers are all full-KV still
//            costs the fixed overhead.
//
// Once every offloaded layer is built, the promise shrinks to what the rest of the sequence
// can need (AfterPrefill): the pages it holds plus the worst case of the tokens still to come,
// and staging for window pages only. Not in the promise: the daemon's working memory (index
// build scratch, the private copy of the keys a build works on), bounded by the worker count.
//
// Thread safety: all methods are thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <tuple>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "selection/index_factory.h"
#include "server/core/geometry.h"

namespace icecache {

struct SequencePromise {
  uint64_t pages = 0;
  uint64_t staging = 0;
  uint64_t heap = 0;
  uint32_t prefill_depth = 0;  // layers the staging part covers at max_tokens

  uint64_t arena() const { return pages + staging; }
  uint64_t total() const { return pages + staging + heap; }
};

class PromiseCalculator {
 public:
  // Fixed overheads (bytes): per sequence, and per offloaded (layer, KV head).
  static constexpr uint64_t kSequenceOverhead = 16 << 10;
  static constexpr uint64_t kHeadOverhead = 4 << 10;

  // `workers`: the daemon's worker threads (how many layer builds run at once).
  PromiseCalculator(const selection::IndexSpec& spec, uint32_t workers);

  SequencePromise For(const Geometry& g);
  // The promise of a sequence whose offloaded layers are all built, holding `pages_held`
  // frames and at least `tokens` tokens in each layer: never above `before` in any part.
  SequencePromise AfterPrefill(const Geometry& g, const SequencePromise& before,
                               uint64_t pages_held, uint64_t tokens) const;

  // Page frames one (layer, KV head) of `g` can need for max_tokens tokens (the index's
  // build bound, the pages its inserts can split off, and one insert's reservation).
  uint64_t PagesPerHead(const Geometry& g) const;
  // Page frames `tokens` more tokens can add to one built (layer, KV head) by inserts.
  uint64_t InsertPagesPerHead(const Geometry& g, uint64_t tokens) const;
  // Layers whose prompt the staging part covers at once: enough to keep the workers busy
  // with builds (1 + workers / KV heads, at least 2), at most the offloaded layers.
  uint32_t PrefillDepth(const Geometry& g) const;
  // Index metadata bytes per token of one head (measured, with room for vector growth).
  uint64_t MetadataBytesPerToken(const Geometry& g);

 private:
  const selection::IndexSpec spec_;
  const uint32_t workers_;
  absl::Mutex mu_;
  // (head_dim, dtype, page_size) -> metadata bytes per token.
  std::map<std::tuple<uint32_t, int, uint32_t>, uint64_t> per_token_ ABSL_GUARDED_BY(mu_);
};

}  // namespace icecache
