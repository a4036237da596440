// libicecache_client: what an inference engine links to keep its KV cache in icecached.
//
//   auto client = icecache::Client::Attach({.socket = "/run/icecache/icecached.sock"});
//   auto seq = (*client)->CreateSequence({.num_layers = 32, .num_q_heads = 32,
//       .num_kv_heads = 8, .head_dim = 128, .dtype = icecache::DType::kBF16,
//       .max_tokens = 131072, .budget_tokens = 256});
//   for (layer...) (*seq)->Prefill(layer, k, v, prompt_tokens, stream);
//   for (step...) for (layer...) (*seq)->Decode(layer, q, k_new, v_new, out, stream);
//
// Two modes with the same semantics and results (to float tolerance):
//   kCuda: every tensor argument is device memory and `stream` a cudaStream_t; the arena's
//          segments are registered with cudaHostRegister(Mapped | Portable) as they appear,
//          missed pages are gathered straight from them by one kernel launch per step, and
//          attention runs on the GPU. Calls enqueue work on the stream; Decode synchronizes
//          the stream once (the query must reach the daemon), Prefill once per layer.
//   kCpu:  every tensor argument is host memory, `stream` is ignored, and the same flow runs
//          the kernels' CPU references on a thread pool. Used where there is no GPU.
//
// Per offloaded layer the client keeps, in the mode's memory: the sink (the first
// sink_tokens positions), the window (the most recent window_tokens - page_size + 1 to
// window_tokens positions; whenever it is full its oldest page is handed to the daemon, which
// inserts it into the layer's index) and a page cache per KV head holding the selected pages (a
// page resident at the same version is a hit and is not moved again). The first full_kv_layers
// layers keep all their KV in the client and skip selection, as in the paper.
//
// Tensor layouts (dtype of the geometry, rows dense):
//   Prefill k, v:       [tokens][num_kv_heads][head_dim]   (as engines produce them)
//   Decode q, out:      [num_q_heads][head_dim]
//   Decode k_new, v_new:[num_kv_heads][head_dim]
//
// Thread safety: a Client may be shared by threads; a Sequence is used by one thread at a
// time. A Sequence must be destroyed before its Client.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/dtype.h"
#include "icecache/execution_mode.h"

namespace icecache {

class Attachment;
class Sequence;
namespace client_internal {
struct SequenceFactory;
}

struct ClientOptions {
  // The daemon's control socket (the attach socket is derived from it). Empty: the default.
  std::string socket;
  ExecutionMode mode = ExecutionMode::kAuto;
  int device = 0;            // CUDA device (kCuda)
  uint32_t cpu_threads = 0;  // threads of the CPU mode's pool; 0 = hardware concurrency
  // Page cache slots per (layer, KV head) = ceil(cache_factor * selected pages), >= 1x.
  double cache_factor = 2.0;
  // Measure select, fetch and attention of every Decode separately (synchronizes the stream
  // between the phases; for benchmarks). Off: only what needs no extra synchronization.
  bool profile = false;
  absl::Duration timeout = absl::Seconds(60);
  // When icecached goes away (crash, restart, upgrade), how long the client keeps trying to
  // reattach to its successor and restore its sequences before an operation fails with
  // UNAVAILABLE. Until then the operation in progress stalls and then completes.
  absl::Duration reconnect_timeout = absl::Seconds(60);
};

// What surviving the daemon cost this client (Client::recovery()).
struct ClientRecovery {
  uint64_t recoveries = 0;            // daemons found gone and replaced by a successor
  uint64_t restored_sequences = 0;    // sequences the successor rebuilt (no token lost)
  uint64_t lost_sequences = 0;        // sequences it could not rebuild (they fail from then on)
  uint64_t resubmitted_requests = 0;  // requests without an answer, carried out again once
  double last_stall_seconds = 0;      // the last recovery: from finding the daemon gone to
                                      // the resubmission of what was in flight
  double total_stall_seconds = 0;
};

// How a decode step of an offloaded layer gets its pages.
enum class SelectionMode : uint8_t {
  // Each Decode sends its own query and waits for the daemon's search.
  kSync,
  // One step ahead: as soon as a layer's query is known, the search for the layer's next step
  // is sent with it and runs while the rest of the model does; the next Decode uses those
  // pages and waits for nothing in the steady state. Per KV head it checks how far the new
  // query moved from the one searched (the lowest cosine over the head's query heads) and
  // searches synchronously, for those heads only, where it fell below drift_threshold. The
  // first step after the prompt's build is synchronous.
  kAsync,
};
const char* SelectionModeName(SelectionMode mode);

// Whether the attention estimates what the selected pages leave out (icecache.v1.TailEstimate,
// selection/tail.h). With kMean or kMeanVariance the daemon keeps a summary per page (token
// count, mean key, per-dimension key variance, mean value) and answers every select with one
// softmax partial per query head over the pages it did not select, each page one virtual
// token; the attention merges it, so its softmax sees the whole context, not only the fetched
// tokens. kNone: the paper's attention over the fetched tokens alone.
enum class TailEstimate : uint8_t {
  kNone,          // drop the unselected pages
  kMean,          // one virtual token per page: count * exp(scale q . mean key), mean value
  kMeanVariance,  // ... times the log-normal correction of the keys' variance (capped)
};
const char* TailEstimateName(TailEstimate estimate);  // "none", "mean", "mean-var"

// What a sequence declares (icecache.v1.SequenceGeometry); unset optionals take the daemon's
// defaults (8-token pages, 256-token budget, 2 sink and 2 window pages of the sequence's
// page size: 16 + 16 tokens by default, 2 full-KV layers).
struct SequenceOptions {
  uint32_t num_layers = 0;
  uint32_t num_q_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kBF16;
  uint64_t max_tokens = 0;
  std::optional<uint32_t> page_size;
  std::optional<uint32_t> budget_tokens;
  std::optional<uint32_t> sink_tokens;
  std::optional<uint32_t> window_tokens;
  std::optional<uint32_t> full_kv_layers;
  std::string label;
  // Softmax scale; 0 = 1/sqrt(head_dim). Sent to the daemon (softmax_scale) when set: the tail
  // estimate is computed in the attention's units.
  float scale = 0;
  // Estimate of the unselected pages; unset: the daemon's default (kMeanVariance).
  std::optional<TailEstimate> tail_estimate;
  // Selection off the critical path (kAsync) or not; drift_threshold in [-1, 1] is the
  // cosine below which a KV head's prefetched pages are replaced by a synchronous search.
  SelectionMode selection = SelectionMode::kSync;
  float drift_threshold = 0.9f;
};

// The geometry the daemon resolved (every default applied).
struct ResolvedGeometry {
  uint32_t num_layers = 0;
  uint32_t num_q_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kBF16;
  uint64_t max_tokens = 0;
  uint32_t page_size = 0;
  uint32_t budget_tokens = 0;
  uint32_t sink_tokens = 0;
  uint32_t window_tokens = 0;
  uint32_t full_kv_layers = 0;
  TailEstimate tail_estimate = TailEstimate::kNone;
  float softmax_scale = 0;  // the attention's (SequenceOptions::scale, or 1/sqrt(head_dim))
  bool keeps_tail() const { return tail_estimate != TailEstimate::kNone; }
  // Pages selected per KV head and step (the budget split of selection/budget.h).
  uint32_t selected_pages() const;
};

// Counters of one client (all its sequences), also published to the daemon's metrics.
struct ClientCounters {
  uint64_t cache_hits = 0;
  uint64_t cache_misses = 0;
  uint64_t fetched_bytes = 0;
  uint64_t fetch_nanoseconds = 0;
  uint64_t decode_steps = 0;
  uint64_t prefetched_selects = 0;    // offloaded layer steps served by a one-step-ahead select
  uint64_t drift_fallback_heads = 0;  // KV heads searched again because their query moved
  double hit_rate() const {
    const uint64_t all = cache_hits + cache_misses;
    return all == 0 ? 0.0 : static_cast<double>(cache_hits) / static_cast<double>(all);
  }
};

// What one Decode call did (the last one of a sequence). Times in microseconds; with
// ClientOptions::profile off, fetch and attention are enqueue times in CUDA mode.
struct DecodeBreakdown {
  uint32_t layer = 0;
  bool full_kv = false;
  uint32_t attended_tokens = 0;  // summed over KV heads: sink + window + valid page tokens
  uint32_t selected_pages = 0;   // over all KV heads
  uint32_t hits = 0;
  uint32_t misses = 0;
  double wait_us = 0;    // waiting for this layer's pending prefill or append
  double select_us = 0;  // query to the daemon and back (synchronous searches)
  // Time Decode waited for the daemon's pages on its critical path: the synchronous search
  // (kSync, or the fallback of drifted heads) plus any wait for the prefetched answer.
  double select_wait_us = 0;
  bool prefetched = false;            // the step used pages selected one step ahead
  uint32_t drift_fallback_heads = 0;  // KV heads searched again because their query moved
  double fetch_us = 0;                // gather of the missed pages
  double attention_us = 0;
  double total_us = 0;
};

class Client {
 public:
  // UNAVAILABLE: no daemon. PERMISSION_DENIED: the daemon refused this uid.
  // FAILED_PRECONDITION: kCuda asked for but no usable device (or a CPU-only build).
  static absl::StatusOr<std::unique_ptr<Client>> Attach(const ClientOptions& options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  ExecutionMode mode() const;
  // INVALID_ARGUMENT (the daemon's message names the field), RESOURCE_EXHAUSTED (memory).
  absl::StatusOr<std::unique_ptr<Sequence>> CreateSequence(const SequenceOptions& options);
  ClientCounters counters() const;
  ClientRecovery recovery() const;
  Attachment& attachment();

  // One decode step of `layer` for a batch of this client's sequences (continuous batching:
  // any of them, in the engine's order, of different lengths). Each sequence appends its new
  // token's K/V and attends as Sequence::Decode does; the batch is one select request to the
  // daemon, one gather launch and one attention launch. The sequences of a batch share
  // num_q_heads, num_kv_heads, head_dim, dtype, page_size and scale; budget, sink, window,
  // full-KV layers and selection mode may differ.
  //   q, out:       [batch][num_q_heads][head_dim]
  //   k_new, v_new: [batch][num_kv_heads][head_dim]   (the dtype; device memory in kCuda)
  // `statuses` (optional) gets each sequence's own result: a sequence that fails does not
  // stop the others (its output rows are zeros). INVALID_ARGUMENT (nothing done) for an empty
  // batch, a sequence twice or of another client, sequences that do not match, or null
  // tensors; otherwise the first sequence's error, naming it, or OK.
  absl::Status DecodeBatch(uint32_t layer, const std::vector<Sequence*>& batch, const void* q,
                           const void* k_new, const void* v_new, void* out, void* stream = nullptr,
                           std::vector<absl::Status>* statuses = nullptr);

  class Impl;

 private:
  explicit Client(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class Sequence {
 public:
  ~Sequence();  // drops the sequence in the daemon (when not dropped yet)
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  const std::string& handle() const;
  const ResolvedGeometry& geometry() const;

  // The prompt's K and V of `layer` (positions 0..tokens-1). Every layer gets the same
  // number of tokens, once. The offloaded part is handed to the daemon, which builds the
  // layer's index in the background; the first Decode of the layer waits for it.
  // INVALID_ARGUMENT: layer out of range, tokens 0, null pointers, or a different prompt
  // length than earlier layers. FAILED_PRECONDITION: the layer was prefilled already.
  // RESOURCE_EXHAUSTED: more than max_tokens, or the daemon's memory limit.
  absl::Status Prefill(uint32_t layer, const void* k, const void* v, uint32_t tokens,
                       void* stream = nullptr);

  // One decode step of `layer` (the batch of one, Client::DecodeBatch): appends the new
  // token's K/V (position = tokens so far),
  // selects the pages matching q, fetches the missed ones and writes the attention of every
  // query head over sink + window + selected pages (full-KV layers: over every token) to
  // `out`. Every layer of a step must be decoded before the next step's layers.
  // FAILED_PRECONDITION: the layer was not prefilled, or is out of step with the others.
  absl::Status Decode(uint32_t layer, const void* q, const void* k_new, const void* v_new,
                      void* out, void* stream = nullptr);

  // Frees the sequence in the daemon and the client's memory for it. Later calls get
  // FAILED_PRECONDITION.
  absl::Status Drop();

  // Tokens of `layer` so far (prompt + decoded).
  uint64_t tokens(uint32_t layer) const;
  // Bytes of K/V this sequence keeps in the mode's memory (device memory in CUDA mode): the
  // full-KV layers' caches and, per offloaded layer, the sink, the window ring and the page
  // cache (layers count once prefilled).
  uint64_t kv_device_bytes() const;
  const DecodeBreakdown& last_decode() const;
  // The K and V rows the last Decode of `layer` attended for KV head `head`, in attention
  // order (sink, window, then each selected page's valid rows), copied to host memory: for
  // tests and debugging. Valid until the layer's next Decode.
  struct AttendedRows {
    uint32_t count = 0;
    std::vector<uint16_t> k, v;  // [count][head_dim] elements of the dtype
  };
  absl::StatusOr<AttendedRows> LastAttended(uint32_t layer, uint32_t head) const;

  class Impl;

 private:
  friend struct client_internal::SequenceFactory;
  explicit Sequence(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace icecache
