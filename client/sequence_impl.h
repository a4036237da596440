// Sequence::Impl: one sequence's state in the client library, its prefill, and its share of a
// decode step (internal to libicecache_client). A decode step is always a batch (a single
// sequence is the batch of one): client/decoder.h drives it over every sequence of the batch
// through these parts, for one offloaded layer:
//
//   1. BeginStep        the layer's previous step is done with its cache and window; kAsync:
//                       what the previous step's callback submitted is collected; a pending
//                       build is waited for; the new token's K/V go to the sink or the window
//                       ring, and the window policy says whether a page is handed over after
//                       this step;
//   2. TakeQuery        (the batch's queries are on the host) the query is kept; kAsync: the
//                       pages searched one step ahead are taken and each KV head's drift
//                       checked, so that only the drifted heads are searched now;
//   3. (the decoder)    one batch select for every sequence's heads still to search;
//   4. AfterSelect      the answers merged; the window page whose insert the select followed
//                       leaves the window;
//   5. Plan             each page placed in the layer's PageCache (a hit when resident at the
//                       same version), misses become gather items; the decoder's DecodePlan
//                       lists sink, window and pages per KV head;
//   6. (the decoder)    one descriptor copy, one gather launch, one attention launch;
//   7. FinishStep       counters; the window page to hand over is staged (kAsync: submitted by
//                       the batch's end-of-step callback together with the next step's select;
//                       kSync: submitted now).
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

class Decoder;

// What a sequence needs from its client. Pointers must outlive the sequence.
struct SequenceContext {
  Backend* backend = nullptr;
  Transport* transport = nullptr;
  Decoder* decoder = nullptr;  // runs the sequence's decode steps (shared by a client)
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
  static Sequence::Impl* ImplOf(Sequence* sequence);
};

// A batch select sent one step ahead, shared by the sequences it serves: the first that needs
// the answers finishes the ticket and keeps them for the others; a ticket nobody finished is
// finished when the last holder lets go. Thread-safe.
class PrefetchBatch {
 public:
  PrefetchBatch(Transport* transport, Ticket ticket) : transport_(transport), ticket_(ticket) {}
  ~PrefetchBatch();
  PrefetchBatch(const PrefetchBatch&) = delete;
  PrefetchBatch& operator=(const PrefetchBatch&) = delete;
  // The answer of request `index` (waits for the daemon the first time).
  absl::StatusOr<SelectAnswer> Get(size_t index);

 private:
  absl::Status FinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Transport* const transport_;
  const Ticket ticket_;
  absl::Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  absl::StatusOr<std::vector<SelectAnswer>> answers_ ABSL_GUARDED_BY(mu_);
};

// A select sent one step ahead (kAsync), with the query it searched ([num_q_heads][head_dim]).
struct Prefetch {
  std::shared_ptr<PrefetchBatch> batch;
  size_t index = 0;
  std::vector<float> query;
};

// What the end-of-step callback submitted (it runs on a driver thread in CUDA mode); the
// layer's next step collects it after waiting for the step's done marker.
struct Mailbox {
  absl::Mutex mu;
  std::optional<Ticket> append ABSL_GUARDED_BY(mu);
  std::shared_ptr<PrefetchBatch> select ABSL_GUARDED_BY(mu);
  size_t select_index ABSL_GUARDED_BY(mu) = 0;
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
  uint64_t steps = 0;   // decode steps of an offloaded layer

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

  // The last step's work is done once `done` is (recorded after the batch's attention and
  // callback); the chunks it attended, per KV head, for LastAttended.
  std::unique_ptr<Marker> done;
  bool done_recorded = false;
  std::vector<AttentionChunk> last_chunks;
  std::vector<uint32_t> last_offsets;  // [num_kv_heads + 1] into last_chunks
};

// One sequence's share of a batch step.
struct StepState {
  uint32_t layer = 0;
  uint64_t pos = 0;
  bool full_kv = false;
  std::optional<uint64_t> hand_over;       // first position of the page to hand over
  bool needs_pages = false;                // offloaded with a built index: pages are selected
  std::vector<uint8_t> search;             // [num_kv_heads]: heads to search now (1)
  std::vector<abi::SelectedPageRef> refs;  // [num_kv_heads][k]: the step's pages
  // [num_q_heads][2 + head_dim]: the tail partials of the unselected pages that the step's
  // attention merges (empty: none, e.g. no tail estimate, a full-KV layer, no index yet).
  std::vector<float> tail;
  uint64_t generation = 0;  // Transport::generation() that answered refs
  DecodeBreakdown b;
  uint32_t head_base = 0;  // the sequence's first KV head in the batch
  // For a step that fails before FinishStep (AbortStep): the window before BeginStep's
  // Append, and whether Plan placed pages in the layer's cache (their gather may not run).
  std::optional<selection::WindowPolicy::Mark> window_mark;
  bool planned = false;
  bool finished = false;  // FinishStep ran: the step is kept, failed or not
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
  absl::Status Drop();
  absl::StatusOr<Sequence::AttendedRows> LastAttended(uint32_t layer, uint32_t head) const;

  const std::string& handle() const { return ctx_.handle; }
  const ResolvedGeometry& geometry() const { return ctx_.geometry; }
  const client_internal::SequenceContext& context() const { return ctx_; }
  uint64_t tokens(uint32_t layer) const {
    return layer < layers_.size() ? layers_[layer].tokens : 0;
  }
  const DecodeBreakdown& last() const { return last_; }
  uint64_t kv_device_bytes() const { return kv_device_bytes_; }

  // ---- the parts of a decode step (client/decoder.cc drives them; see the file comment)
  // Capacities of this sequence in a batch plan: chunks per KV head, gather items.
  uint32_t chunks_per_head() const { return std::max(offloaded_chunks_, full_chunks_); }
  uint32_t gather_items() const { return ctx_.geometry.num_kv_heads * k_sel_; }
  uint32_t selected_pages() const { return k_sel_; }
  uint64_t page_bytes() const { return layout_.page_bytes(); }
  // Floats of a select's tail partials (0 without a tail estimate).
  uint32_t tail_floats() const { return tail_floats_; }
  absl::Status BeginStep(uint32_t layer, const void* k_new, const void* v_new, void* stream,
                         client_internal::StepState* st);
  // `q_host`: this sequence's [num_q_heads][head_dim] rows of the dtype, on the host.
  absl::Status TakeQuery(const uint16_t* q_host, client_internal::StepState* st);
  // The search request of the heads still to search (TakeQuery decided which).
  client_internal::SelectRequest SearchRequest(const client_internal::StepState& st) const;
  absl::Status AfterSelect(const client_internal::SelectAnswer* searched,
                           client_internal::StepState* st);
  absl::Status Plan(client_internal::StepState* st, client_internal::DecodePlan* plan);
  // After the launch: counters, the hand-over (kSync: submitted now), the done marker.
  absl::Status FinishStep(client_internal::StepState* st, void* stream);
  // kAsync, after FinishStep: what the batch's end-of-step callback submits for this
  // sequence: its staged hand-over (if any) and, with a built index, the next step's select.
  struct EndOfStep {
    std::optional<client_internal::StagedHandOver> staged;
    uint32_t op = 0;  // of the hand-over
    bool send_select = false;
    client_internal::Mailbox* mailbox = nullptr;
  };
  EndOfStep EndOfStepWork(uint32_t layer);
  client_internal::SelectRequest PrefetchRequest(uint32_t layer) const;
  // Records the layer's done marker (after the batch's work and callback).
  absl::Status MarkDone(uint32_t layer, void* stream);
  // When every request slot is in use: finishes this sequence's oldest daemon operation.
  // False when it has none.
  bool FinishOldestPending();
  void Fail(uint32_t layer, const absl::Status& status) { layers_[layer].failed = status; }
  // Keeps this sequence's chunks of the batch plan (heads from head_base) for LastAttended.
  void KeepAttended(uint32_t layer, const client_internal::DecodePlan& plan, uint32_t head_base);
  void set_last(const DecodeBreakdown& b) { last_ = b; }
  // A step BeginStep began that ends without FinishStep (it failed, or the batch did): its
  // token is taken back from the window (a retry appends it again and hands the same page
  // over), and the layer's page cache is forgotten when Plan placed pages in it (the cache
  // records a page as resident when it plans its gather, which may never have run). The
  // decoder calls it for every step of a batch; a no-op for steps that finished or never began.
  void AbortStep(client_internal::StepState* st);

 private:
  using LayerState = client_internal::LayerState;

  absl::Status CheckUsable(uint32_t layer) const;
  // INTERNAL when an answer's tail partials are not the size the geometry says.
  absl::Status CheckTail(const client_internal::SelectAnswer& answer) const;
  absl::Status AllocateLayer(uint32_t layer);
  absl::Status AllocateKv(client_internal::Buffer* buffer, size_t bytes);

  // Daemon operations.
  absl::Status FinishPending(uint32_t layer);
  template <typename F>
  auto WithSlot(F f) -> decltype(f());
  absl::Status Submit(uint32_t layer, uint32_t op, const abi::ArenaRef& staging, uint32_t tokens,
                      uint32_t first_position, bool from_window);
  absl::StatusOr<abi::StageResponse> Stage(uint32_t tokens);
  absl::Status RetireHandOver(uint32_t layer, DecodeBreakdown* b);
  // kAsync: takes what the layer's last callback submitted.
  absl::Status CollectMailbox(uint32_t layer);
  // Copies the window page at `first` into a fresh staging buffer (stream-ordered).
  absl::StatusOr<client_internal::StagedHandOver> StageWindowPage(uint32_t layer, uint64_t first,
                                                                  void* stream);

  client_internal::SequenceContext ctx_;
  client_internal::Backend* const be_;
  client_internal::Transport* const tr_;
  PageLayout layout_;
  uint64_t row_bytes_ = 0;
  uint32_t k_sel_ = 0;
  uint32_t tail_floats_ = 0;  // num_q_heads * (2 + head_dim) when the geometry keeps a tail
  // The daemon generation the page caches hold pages of (cleared when it changes).
  uint64_t cache_generation_ = 0;
  uint32_t cache_slots_ = 0;
  uint32_t offloaded_chunks_ = 0;  // per KV head and step
  uint32_t full_chunks_ = 0;
  std::vector<LayerState> layers_;
  std::deque<uint32_t> pending_order_;  // layers with a pending op, oldest first
  std::optional<uint32_t> prompt_tokens_;
  uint32_t prefilled_layers_ = 0;
  bool dropped_ = false;
  DecodeBreakdown last_;
  std::vector<float> q_float_;  // the last step's query as fp32
  uint64_t kv_device_bytes_ = 0;
};

}  // namespace icecache
