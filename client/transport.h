// What a Sequence asks of the daemon, as one interface (internal to libicecache_client): the
// data-plane requests of proto/icecache/v1/abi.h, the arena memory they refer to, and the
// control call that frees a sequence. The real transport (attachment_transport.h) speaks to
// icecached over its request slots, shared memory and gRPC; tests put an in-process fake
// daemon behind the same interface, so a Sequence is unit tested on the CPU backend with no
// sockets (tests/support/fake_daemon.h).
//
// Asynchronous requests return a Ticket; every ticket is finished exactly once (Finish or
// FinishSelect), which also frees what it holds. Submitting when every request slot is held
// returns RESOURCE_EXHAUSTED marked by IsSlotsExhausted() (icecache/attachment.h): finish an
// older ticket, then retry.
//
// Thread safety: implementations are thread-safe; a ticket is used by one thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "proto/icecache/v1/abi.h"

namespace icecache::client_internal {

using Ticket = uint32_t;

// Bytes of the arena as the client sees them.
struct ArenaSpan {
  uint8_t* host = nullptr;    // the client's mapping
  uint8_t* device = nullptr;  // the address the backend's kernels use (== host on the CPU)
};

// One sequence's select in a batch.
struct SelectRequest {
  std::string handle;
  const float* queries = nullptr;  // [num_q_heads][head_dim] fp32
  size_t query_floats = 0;
  uint32_t k = 0;                      // pages per KV head
  const uint8_t* head_mask = nullptr;  // [num_kv_heads] (1: search) or null: every head
  uint32_t num_kv_heads = 0;
  // Floats of the tail partials the answer carries after its pages (abi.h "Tail estimate"):
  // num_q_heads * (2 + head_dim) when the sequence keeps a tail estimate, else 0.
  uint32_t tail_floats = 0;
};

struct SelectAnswer {
  absl::Status status;
  std::vector<abi::SelectedPageRef> pages;  // [num_kv_heads][k]; unsearched heads unused
  // [num_q_heads][2 + head_dim] (max, sum, acc) of the unselected pages, per query head; sum 0
  // for unsearched heads. Empty when the sequence keeps no tail estimate.
  std::vector<float> tail;
  uint64_t generation = 0;  // Transport::generation() of the daemon that answered
};

class Transport {
 public:
  virtual ~Transport() = default;

  // A staging buffer for `tokens` tokens of the sequence (K then V at v_offset).
  virtual absl::StatusOr<abi::StageResponse> Stage(const std::string& handle, uint32_t tokens) = 0;
  // Hands back a staging buffer no prefill or append consumed.
  virtual absl::Status ReleaseStaging(const std::string& handle, const abi::ArenaRef& staging) = 0;

  // abi::kOpPrefill or kOpAppend of a staged buffer; the daemon consumes the buffer on success.
  virtual absl::StatusOr<Ticket> SubmitStaged(uint32_t op, const std::string& handle,
                                              uint32_t layer, const abi::ArenaRef& staging,
                                              uint32_t tokens, uint32_t first_position) = 0;
  // Waits (however long the daemon takes) for the answer of a SubmitStaged ticket.
  virtual absl::Status Finish(Ticket ticket) = 0;

  // The selects of several sequences for one layer, in one request (the daemon spreads the
  // searches over its pool). Each request's search runs after every staged op of its
  // (sequence, layer) submitted before it. Any number of tickets may be in flight at once.
  virtual absl::StatusOr<Ticket> SubmitSelectBatch(uint32_t layer,
                                                   absl::Span<const SelectRequest> requests) = 0;
  // Readies room for a batch of `requests` (only their sizes are read), so that a
  // SubmitSelectBatch from a host callback normally allocates nothing.
  virtual absl::Status PrepareSelectBatch(absl::Span<const SelectRequest> requests) = 0;
  // The answers of a SubmitSelectBatch ticket, one per request, in order. A request the daemon
  // refused has its own error; the call fails only when the whole request did.
  virtual absl::StatusOr<std::vector<SelectAnswer>> FinishSelectBatch(Ticket ticket) = 0;
  // Whether the ticket's answer is there (FinishSelect/Finish will not wait).
  virtual bool Done(Ticket ticket) const = 0;

  // `bytes` of the arena at `ref`, mapped (and registered with the backend) on first use.
  // INTERNAL when the daemon referred to memory outside its segments.
  virtual absl::StatusOr<ArenaSpan> Map(const abi::ArenaRef& ref, uint64_t bytes) = 0;
  // Frame size of a page segment (0 when `segment` is not one).
  virtual uint64_t PageBytes(uint32_t segment) const = 0;

  // Frees the sequence in the daemon (control API).
  virtual absl::Status DropSequence(const std::string& handle) = 0;

  // The counters this client publishes for the daemon to export.
  virtual abi::ClientStats& stats() = 0;
  // Changes when the daemon was replaced (a recovery): page references of an earlier
  // generation, and what a page cache holds by them, mean nothing any more.
  virtual uint64_t generation() const { return 0; }
};

}  // namespace icecache::client_internal
