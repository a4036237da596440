// The stored KV cache of one sequence: for every offloaded layer, one index per KV head (a
// KvIndex from selection/index_factory.h: the DCI tree of the daemon's preset) over pages that live
// in the owning client's arena, laid out by the index (the tokens of a cluster share a page; a
// freshly built layer's pages take consecutive frames).
//
// Operations (the data plane runs them on its worker pool):
//   Prefill(layer, staging)  build the layer's index for every KV head from a staging buffer
//                            holding the prompt's offloaded K and V, and fill its pages;
//   Append(layer, staging)   insert a window page of new tokens into every head's index;
//   Select(layer, queries)   the best pages per KV head for the queries of every query head.
//
// Concurrency (the scheme): each (layer, head) tree has a reader-writer lock (see
// server/index/kv_index.h): selects share it, an append holds it exclusively for its
// metadata update and page rewrites, so a select sees a layer's pages either before or after
// an append, never in between. Appends to one layer are serialised by the layer's mutex (in
// order of arrival); different layers and sequences proceed in parallel. A layer's state
// (empty -> building -> ready, or failed) is guarded by the same mutex; selects and appends
// on a layer that is not ready get FAILED_PRECONDITION.
//
// Thread safety: all methods are thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "common/thread_pool.h"
#include "proto/icecache/v1/abi.h"
#include "selection/index_factory.h"
#include "server/core/arena.h"
#include "server/core/geometry.h"
#include "server/index/kv_index.h"

namespace icecache {

// Where a select's recall sample goes, and other things worth counting (the daemon wires it
// to its metrics). Methods are called from worker threads.
class KvObserver {
 public:
  virtual ~KvObserver() = default;
  virtual void OnBuild(double seconds, uint64_t tokens) = 0;
  virtual void OnInsert(double seconds, uint64_t tokens) = 0;
  virtual void OnSelect(double seconds) = 0;
  virtual void OnRecallSample(double recall) = 0;
};

// Owned by a shared_ptr (as the daemon owns it), a sequence's recall samples keep it alive
// until they have run, so the last reference may go anywhere, a pool worker included;
// otherwise its destructor waits for them (never let such a one go on a pool worker).
class SequenceKv : public std::enable_shared_from_this<SequenceKv> {
 public:
  enum class LayerState : uint8_t { kEmpty, kBuilding, kReady, kFailed };

  // The sequence keeps its arena alive; `pool` and `observer` (may be null) must outlive it.
  SequenceKv(const Geometry& geometry, const selection::IndexSpec& index_spec,
             std::shared_ptr<Arena> arena, ThreadPool* pool, KvObserver* observer);
  ~SequenceKv();  // frees every frame

  const Geometry& geometry() const { return geometry_; }
  // Bytes of one staged token (K and V of every KV head).
  uint64_t StagingBytesPerToken() const;

  // `k_rows`/`v_rows`: [num_kv_heads][tokens][head_dim] of the sequence's dtype (the staging
  // layout of abi::StageResponse). Positions first_position.. are reported in layouts.
  // INVALID_ARGUMENT: layer out of range or a full-KV layer, tokens 0 or above max_tokens,
  //   non-finite keys. FAILED_PRECONDITION: the layer is not empty.
  // RESOURCE_EXHAUSTED: no frames for its pages. On error the layer stays as it was, except
  //   that a failure inside the build leaves it kFailed.
  // `cancel`: when it becomes true the build stops early with CANCELLED (the layer fails).
  absl::Status Prefill(uint32_t layer, const uint8_t* k_rows, const uint8_t* v_rows,
                       uint32_t tokens, uint32_t first_position,
                       const std::atomic<bool>* cancel = nullptr);

  // 1..page_size new tokens (one window page). FAILED_PRECONDITION unless the layer is ready;
  // RESOURCE_EXHAUSTED when the sequence would exceed max_tokens or frames run out.
  absl::Status Append(uint32_t layer, const uint8_t* k_rows, const uint8_t* v_rows, uint32_t tokens,
                      uint32_t first_position);

  // The pages per KV head a select of `requested` pages returns: the geometry's selected
  // pages when 0 (the one place that default is applied).
  uint32_t SelectK(uint32_t requested) const {
    return requested == 0 ? geometry_.selected_pages() : requested;
  }

  // queries: [num_q_heads][head_dim] fp32. `k` pages per KV head (SelectK); fewer when a head
  // holds fewer pages. out: [num_kv_heads][k], unused
  // entries have segment abi::kNoSegment. Returns the number of entries per head (k).
  // `sample_recall`: also score every key exactly afterwards (on the pool, off the caller's
  // path) and report the recall of the returned pages to the observer. `head_mask`
  // ([num_kv_heads], optional): only heads with a non-zero byte are searched; the others get
  // unused entries. `tail` (optional; used when the geometry keeps summaries): the tail
  // partials of every query head, [num_q_heads][abi::TailPartialFloats(head_dim)] (the layout
  // of proto/icecache/v1/abi.h): the estimated unselected pages of its KV head; empty
  // partials (sum 0) for masked heads.
  absl::StatusOr<uint32_t> Select(uint32_t layer, const float* queries, uint32_t k,
                                  std::vector<abi::SelectedPageRef>* out, bool sample_recall,
                                  const uint8_t* head_mask = nullptr,
                                  std::vector<float>* tail = nullptr);

  // Returns once every recall sample scheduled so far has been reported.
  void WaitForSamples();

  // INVALID_ARGUMENT for a layer out of range or a full-KV layer.
  absl::Status CheckLayer(uint32_t layer) const;
  LayerState layer_state(uint32_t layer) const;
  uint64_t tokens(uint32_t layer) const;  // tokens stored in the layer
  uint64_t pages() const;                 // frames held by the sequence

  // The id the frame tags name as owner (abi::FrameTag): the sequence's durable id, set once
  // before its first prefill (the data plane derives it from the handle). Not 0.
  void set_durable_id(uint64_t id) { durable_id_.store(id, std::memory_order_release); }
  uint64_t durable_id() const { return durable_id_.load(std::memory_order_acquire); }
  // Layout changes applied in place because no frame was free for a copy (not crash-safe).
  uint64_t in_place_changes() const { return in_place_changes_.load(std::memory_order_relaxed); }

  // A restore's source of stored rows (a previous daemon's arena, recovery.h): fills
  // k_out/v_out, [num_kv_heads][positions.size()][head_dim], with the rows of `layer` at
  // `positions` of this sequence's previous incarnation. DATA_LOSS when one is missing.
  class RowSource {
   public:
    virtual ~RowSource() = default;
    virtual absl::Status Gather(uint32_t layer, const std::vector<uint32_t>& positions,
                                uint8_t* k_out, uint8_t* v_out) const = 0;
  };
  // One layer's history as the client saw it acknowledged: the prompt's build, then each
  // append in order. Replaying it gives the identical index (every index is deterministic in
  // its input), so the restored sequence selects what the lost one would have.
  struct AppendRun {
    uint32_t first_position = 0;  // of the run's first append
    uint32_t tokens = 0;          // per append
    uint32_t count = 0;           // appends, each at the previous one's end
  };
  struct LayerJournal {
    uint32_t layer = 0;
    uint32_t prefill_first = 0;
    uint32_t prefill_tokens = 0;
    std::vector<AppendRun> appends;  // kept as runs: never expanded (a run is 12 bytes)
  };
  // Rebuilds `journal.layer` (empty) from `source`: Prefill, then every Append, on rows copied
  // out of the source first. The journal is checked whole before anything is read or
  // allocated for it (INVALID_ARGUMENT: a prefill of 1..max_tokens tokens, appends of
  // 1..page_size tokens, positions within uint32, max_tokens in all); then errors as
  // Prefill/Append, or the source's DATA_LOSS. `cancel`: when it becomes true the restore
  // stops within its prefill's build (as Prefill's `cancel`: the layer fails) or before its
  // next append, with CANCELLED.
  absl::Status Restore(const LayerJournal& journal, const RowSource& source,
                       const std::atomic<bool>* cancel = nullptr);
  // Restore's check of a journal alone (nothing read or changed).
  absl::Status CheckJournal(const LayerJournal& journal) const;

 private:
  struct Head;
  struct Layer;

  // One validated key batch per KV head over `tokens` head-major rows of `k_rows`, at positions
  // first_position.. (filled into `positions`, which the batches point into).
  absl::Status KeyBatches(const uint8_t* k_rows, uint32_t tokens, uint32_t first_position,
                          const std::atomic<bool>* cancel, std::vector<uint32_t>* positions,
                          std::vector<index::KeyBatch>* batches) const;

  // picked: [num_kv_heads] lists of the index page ids a select returned.
  void SampleRecall(uint32_t layer, std::vector<float> queries,
                    std::vector<std::vector<uint32_t>> picked, uint64_t epoch);

  const Geometry geometry_;
  const selection::IndexSpec index_spec_;
  const std::shared_ptr<Arena> arena_;
  ThreadPool* const pool_;
  KvObserver* const observer_;
  const index::IndexGeometry index_geometry_;
  std::vector<std::unique_ptr<Layer>> layers_;  // [num_layers]; full-KV layers stay null
  std::atomic<uint64_t> pages_{0};
  std::atomic<uint64_t> durable_id_{1};
  std::atomic<uint64_t> in_place_changes_{0};
  // Recall samples in flight hold this count; the destructor waits for them.
  absl::Mutex samples_mu_;
  int samples_in_flight_ ABSL_GUARDED_BY(samples_mu_) = 0;
};

}  // namespace icecache
