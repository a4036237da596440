// The decode step of one layer over a batch of sequences (internal to libicecache_client):
// one query copy to the host, one batch select for every sequence's heads still to search,
// one descriptor copy, one gather launch for every missed page and one attention launch for
// every sequence's heads. A single sequence's Decode is the batch of one.
//
// What the sequences of one batch must share: num_q_heads, num_kv_heads, head_dim, dtype,
// page_size and the softmax scale (one gather and one attention launch serve them). Budget,
// sink, window, full-KV layers, lengths and selection mode may differ. Each sequence fails alone:
// its output rows are zeros and its status names it; the others' step goes on.
//
// Per layer the decoder keeps a workspace (the descriptor buffers, the attention scratch),
// grown as batches need; calls for one layer are serialized, different layers may run on
// different threads.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "client/backend.h"
#include "client/buffer.h"
#include "client/decode_plan.h"
#include "client/sequence_impl.h"
#include "client/transport.h"

namespace icecache::client_internal {

class Decoder {
 public:
  // `backend` and `transport` must outlive the decoder.
  Decoder(Backend* backend, Transport* transport) : be_(backend), tr_(transport) {}
  ~Decoder();
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  // q, out: [batch][num_q_heads][head_dim]; k_new, v_new: [batch][num_kv_heads][head_dim]
  // (the sequences' dtype; device memory in CUDA mode). `statuses` (optional) gets each
  // sequence's own result. INVALID_ARGUMENT (nothing done) for an empty batch, a sequence
  // twice, sequences of another decoder, geometries that must match and do not, or null
  // tensors; otherwise the first sequence's failure (its message names it), or OK.
  absl::Status DecodeBatch(uint32_t layer, absl::Span<Sequence::Impl* const> batch, const void* q,
                           const void* k_new, const void* v_new, void* out, void* stream,
                           std::vector<absl::Status>* statuses);

 private:
  struct Workspace {
    absl::Mutex mu;
    std::unique_ptr<DecodePlan> plan;
    uint32_t heads = 0, items = 0, chunks_per_head = 0;  // the plan's capacity
    Buffer desc_host, desc_dev, scratch, q_host;
    Buffer tail_host, tail_dev;  // the batch's tail partials [q heads][2 + head_dim], fp32
    size_t scratch_bytes = 0;
    std::unique_ptr<Marker> done, fetch_begin, fetch_end;
    bool done_recorded = false;
    bool fetch_pending_timing = false;
  };
  absl::StatusOr<Workspace*> WorkspaceFor(uint32_t layer);
  absl::Status Reserve(Workspace& ws, uint32_t heads, uint32_t items, uint32_t chunks_per_head,
                       uint32_t num_q_heads, uint32_t head_dim, size_t q_bytes);

  Backend* const be_;
  Transport* const tr_;
  absl::Mutex mu_;
  std::vector<std::unique_ptr<Workspace>> workspaces_ ABSL_GUARDED_BY(mu_);
};

}  // namespace icecache::client_internal
