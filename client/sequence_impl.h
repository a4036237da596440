// Sequence::Impl: one sequence's state in the client library and its prefill and decode, in
// parts (internal to libicecache_client). What a decode step of an offloaded layer does:
//
//   1. StartStep        the layer's previous step is done with its descriptors and cache;
//   2. RetireHandOver   the layer's pending daemon operation (its prompt's index build, or the
//                       insert of a window page handed over at an earlier step) is finished,
//                       and a window page it carried leaves the window (WindowPolicy::Retire);
//   3. AppendToken      the new token's K/V go to the sink or the window ring; the policy says
//                       when the window's oldest page must be handed over (after this step);
//   4. SelectPages      the queries go to the daemon, which returns pages per KV head;
//   5. PlanPages        each page is placed in the layer's PageCache (a resident page at the
//                       same version is a hit), misses become gather items; the DecodePlan
//                       lists sink, window and pages per KV head;
//   6. Launch           one descriptor copy, one gather launch, one attention launch;
//   7. HandOver         a full window page is staged and submitted to the daemon, which
//                       inserts it into the layer's index while the engine goes on.
//
// Everything the daemon does goes through a Transport (client/transport.h); everything the
// execution side does goes through a Backend (client/backend.h). So the same code runs in CPU
// and CUDA modes, and against an in-process fake daemon in unit tests.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "client/backend.h"
#include "client/buffer.h"
#include "client/decode_plan.h"
#include "client/page_cache.h"
#include "client/transport.h"
#include "icecache/client.h"
#include "kernels/page_layout.h"
#include "selection/window_policy.h"

namespace icecache::client_internal {

// What a sequence needs from its client. Pointers must outlive the sequence.
struct SequenceContext {
  Backend* backend = nullptr;
  Transport* transport = nullptr;
  std::string handle;
  ResolvedGeometry geometry;  // as the daemon resolved it
  float scale = 0;            // softmax scale; 0 = 1/sqrt(head_dim)
  double cache_factor = 2.0;  // page cache slots per (layer, KV head) / selected pages, >= 1
  bool profile = false;       // time select, fetch and attention separately (synchronizes)
  SelectionMode selection = SelectionMode::kSync;
  float drift_threshold = 0.9f;  // kAsync: cosine below which a head is searched again
};

// Makes Sequence objects (the constructor is private to the public API).
struct SequenceFactory {
  // INVALID_ARGUMENT when the context's geometry or options are unusable; errors of the
  // backend's allocations.
  static absl::StatusOr<std::unique_ptr<Sequence>> Create(SequenceContext context);
};

// A select sent one step ahead (kAsync), with the query it searched ([num_q_heads][head_dim]).
struct Prefetch {
  Ticket ticket = 0;
  std::vector<float> query;
};

// What the end-of-step callback submitted (it runs on a driver thread in CUDA mode); the
// layer's next Decode collects it after waiting for the step's done marker.
struct Mailbox {
  absl::Mutex mu;
  std::optional<Ticket> append ABSL_GUARDED_BY(mu);
  std::optional<Ticket> select ABSL_GUARDED_BY(mu);
  absl::Status append_error ABSL_GUARDED_BY(mu);  // the hand-over could not be submitted
};

// A window page copied into a staging buffer at the end of a step, to be submitted by the
// step's callback once the copies (and the step's gather) are done.
struct StagedHandOver {
  abi::StageResponse staged{};
  uint64_t first = 0;  // first position of the page
};

// A daemon operation in flight for one layer.
struct PendingOp {
  Ticket ticket = 0;
  uint32_t op = 0;  // abi::kOpPrefill / kOpAppend
  abi::ArenaRef staging{};
  bool from_window = false;  // a window page: it leaves the window when the op is done
};

struct LayerState {
  bool full_kv = false;
  bool prefilled = false;
  absl::Status failed;  // non-OK: the layer is unusable (a daemon operation failed)
  uint64_t tokens = 0;  // positions so far
  uint64_t steps = 0;   // Decode calls

  // Full-KV layers: [kv][max_tokens][row].
  Buffer full_k, full_v;

  // Offloaded layers.
  std::unique_ptr<selection::WindowPolicy> window;
  Buffer sink_k, sink_v;      // [kv][sink][row]
  Buffer ring_k, ring_v;      // [kv][ring_capacity][row]
  bool daemon_built = false;  // the daemon's layer holds an index
  std::optional<PendingOp> pending;
  Buffer cache_memory;  // [kv][cache_slots][page_bytes]
  std::unique_ptr<PageCache> cache;

  // kAsync: the select sent for the next step, the hand-over awaiting its callback, and the
  // callback's mailbox.
  std::optional<Prefetch> prefetch;
  std::optional<StagedHandOver> staged;
  std::vector<float> next_query;  // the query the end-of-step callback sends
  std::unique_ptr<Mailbox> mailbox = std::make_unique<Mailbox>();

  // The step's descriptors: built on the host (pinned), copied to working memory.
  std::unique_ptr<DecodePlan> plan;
  DecodePlan::View plan_view;  // where the last step's descriptors are in working memory
  Buffer desc_host, desc_dev;
  Buffer scratch;
  std::unique_ptr<Marker> done, fetch_begin, fetch_end;
  bool done_recorded = false;
  bool fetch_pending_timing = false;
};

}  // namespace icecache::client_internal

namespace icecache {

class Sequence::Impl {
 public:
  explicit Impl(client_internal::SequenceContext context);
  ~Impl();
  // Sizes and buffers that do not depend on a layer.
  absl::Status Init();

  absl::Status Prefill(uint32_t layer, const void* k, const void* v, uint32_t n, void* stream);
  absl::Status Decode(uint32_t layer, const void* q, const void* k_new, const void* v_new,
                      void* out, void* stream);
  absl::Status Drop();
  absl::StatusOr<Sequence::AttendedRows> LastAttended(uint32_t layer, uint32_t head) const;

  const std::string& handle() const { return ctx_.handle; }
  const ResolvedGeometry& geometry() const { return ctx_.geometry; }
  uint64_t tokens(uint32_t layer) const {
    return layer < layers_.size() ? layers_[layer].tokens : 0;
  }
  const DecodeBreakdown& last() const { return last_; }
  uint64_t kv_device_bytes() const { return kv_device_bytes_; }

 private:
  using LayerState = client_internal::LayerState;

  absl::Status CheckUsable(uint32_t layer) const;
  absl::Status AllocateLayer(uint32_t layer);
  absl::Status AllocateKv(client_internal::Buffer* buffer, size_t bytes);

  // Daemon operations.
  absl::Status FinishPending(uint32_t layer);
  template <typename F>
  auto WithSlot(F f) -> decltype(f());
  absl::Status Submit(uint32_t layer, uint32_t op, const abi::ArenaRef& staging, uint32_t tokens,
                      uint32_t first_position, bool from_window);
  absl::StatusOr<abi::StageResponse> Stage(uint32_t tokens);

  // The decode step's parts (see the file comment).
  absl::Status StartStep(LayerState& L);
  absl::Status RetireHandOver(uint32_t layer, DecodeBreakdown* b);
  absl::StatusOr<std::optional<uint64_t>> AppendToken(LayerState& L, const void* k_new,
                                                      const void* v_new, void* stream);
  absl::StatusOr<std::vector<abi::SelectedPageRef>> SelectPages(uint32_t layer, const void* q,
                                                                void* stream, DecodeBreakdown* b);
  // A synchronous search of the heads in `mask` (all when null) with q_float_.
  absl::StatusOr<std::vector<abi::SelectedPageRef>> SearchNow(uint32_t layer, const uint8_t* mask,
                                                              DecodeBreakdown* b);
  // kAsync: takes what the layer's last callback submitted.
  absl::Status CollectMailbox(uint32_t layer);
  // kAsync: stages the step's hand-over (if any) and enqueues the callback that submits it
  // and the next step's select.
  absl::Status EndStepAsync(uint32_t layer, std::optional<uint64_t> hand_over, void* stream);
  absl::Status PlanFull(LayerState& L, uint64_t pos);
  absl::Status PlanOffloaded(LayerState& L, const std::vector<abi::SelectedPageRef>& refs,
                             uint64_t pos, DecodeBreakdown* b);
  absl::Status Launch(LayerState& L, const void* q, void* out, void* stream, DecodeBreakdown* b);
  absl::Status HandOver(uint32_t layer, uint64_t first, void* stream);

  client_internal::SequenceContext ctx_;
  client_internal::Backend* const be_;
  client_internal::Transport* const tr_;
  PageLayout layout_;
  uint64_t row_bytes_ = 0;
  uint32_t k_sel_ = 0;
  uint32_t cache_slots_ = 0;
  uint32_t offloaded_chunks_ = 0;  // per KV head and step
  uint32_t full_chunks_ = 0;
  std::vector<LayerState> layers_;
  std::deque<uint32_t> pending_order_;  // layers with a pending op, oldest first
  std::optional<uint32_t> prompt_tokens_;
  uint32_t prefilled_layers_ = 0;
  bool dropped_ = false;
  DecodeBreakdown last_;
  client_internal::Buffer q_host_;  // [num_q_heads][head_dim] of the dtype (pinned)
  std::vector<float> q_float_;
  uint64_t kv_device_bytes_ = 0;
};

}  // namespace icecache
