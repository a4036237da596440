// The low-level data-plane connection to icecached: attach over the unix socket, map the
// arena the daemon hands over, and exchange requests through its slots (protocol:
// proto/icecache/v1/abi.h). The Client API (icecache/client.h) builds on it; tools and tests
// use it directly.
//
// Lifetime: the attachment lives as long as this object; destroying it (or exiting, or
// crashing) closes the connection and the daemon frees the client's sequences and arena.
//
// Thread safety: all methods are thread-safe. A slot is used by one thread at a time:
// Acquire -> fill -> Submit -> Wait -> Release.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/icecache/v1/abi.h"

namespace icecache {

// The payload that marks AcquireSlot's RESOURCE_EXHAUSTED (every request slot in use), so
// callers tell it from a memory limit without matching message text.
absl::Status SlotsExhaustedError();
bool IsSlotsExhausted(const absl::Status& status);

class Attachment {
 public:
  struct Options {
    // The daemon's control socket; the attach socket next to it is derived from it.
    // Empty: the default (DefaultSocketPath()).
    std::string socket;
    // An operator attachment (no arena; its token sees every client's sequences).
    bool as_operator = false;
    // The client registers the arena's segments with a device (abi::kAttachPinsSegments):
    // the daemon then never frees a segment's memory under it.
    bool pins_segments = false;
    // ABI version to announce (tests set others to check the refusal).
    uint32_t abi_version = abi::kAbiVersion;
    absl::Duration timeout = absl::Seconds(5);
    // A recovery attach (abi::kAttachRecover): the attachment of a daemon that went away,
    // whose arena (still held here) is handed to the new daemon to restore sequences from.
    Attachment* previous = nullptr;
  };

  // UNAVAILABLE: no daemon at the socket. PERMISSION_DENIED: the daemon refused this uid.
  // FAILED_PRECONDITION: ABI version mismatch. RESOURCE_EXHAUSTED: the daemon is full.
  static absl::StatusOr<std::unique_ptr<Attachment>> Attach(const Options& options);
  Attachment(const Attachment&) = delete;
  Attachment& operator=(const Attachment&) = delete;
  ~Attachment();

  const std::string& token() const { return token_; }
  uint64_t client_id() const { return client_id_; }
  bool is_operator() const { return control_ == nullptr; }

  // ---- requests
  // A free slot. RESOURCE_EXHAUSTED marked by IsSlotsExhausted() when every slot is in use.
  absl::StatusOr<uint32_t> AcquireSlot();
  abi::SlotHeader* slot(uint32_t index) const;
  uint8_t* payload(uint32_t index) const { return abi::SlotPayload(slot(index)); }
  uint32_t payload_capacity() const { return payload_capacity_; }
  // Publishes the filled slot (state kSubmitted, queue entry, doorbell when the daemon sleeps).
  void Submit(uint32_t index);
  // Waits for the slot's response: its status (code and message) as an absl::Status.
  // DEADLINE_EXCEEDED when `timeout` passes first.
  absl::Status Wait(uint32_t index, absl::Duration timeout = absl::Seconds(60));
  // True once the slot is answered (does not wait).
  bool Done(uint32_t index) const;
  // Gives the slot back. One still submitted or running (a Wait that timed out) is not handed
  // out again until the daemon has answered it: its late answer would land in the next
  // request's slot (and that request's own queue entry would be refused), so the next request
  // would see an answer that is not its own.
  void ReleaseSlot(uint32_t index);

  // ---- common requests (each acquires, submits, waits and releases a slot)
  absl::StatusOr<abi::StageResponse> Stage(const std::string& handle, uint32_t tokens);
  absl::Status Prefill(const std::string& handle, uint32_t layer, const abi::ArenaRef& staging,
                       uint32_t tokens, uint32_t first_position);
  absl::Status Append(const std::string& handle, uint32_t layer, const abi::ArenaRef& staging,
                      uint32_t tokens, uint32_t first_position);
  // Frees a staging buffer that no prefill or append consumed.
  absl::Status ReleaseStaging(const std::string& handle, const abi::ArenaRef& staging);
  // Asynchronous prefill / append / release (op): submits and returns the slot; Finish(slot)
  // waits for the answer (however long the daemon takes) and releases the slot.
  absl::StatusOr<uint32_t> SubmitStaged(uint32_t op, const std::string& handle, uint32_t layer,
                                        const abi::ArenaRef& staging, uint32_t tokens,
                                        uint32_t first_position);
  absl::Status Finish(uint32_t index);
  // queries: [num_q_heads][head_dim] fp32. Returns [num_kv_heads][k] page references.
  absl::StatusOr<std::vector<abi::SelectedPageRef>> Select(const std::string& handle,
                                                           uint32_t layer, const float* queries,
                                                           size_t query_floats, uint32_t k);
  // The same in two halves: submit (returns the slot), then wait for the pages (releases it).
  // `head_mask` ([num_kv_heads] bytes, optional): search only the heads with a non-zero byte.
  absl::StatusOr<uint32_t> SubmitSelect(const std::string& handle, uint32_t layer,
                                        const float* queries, size_t query_floats, uint32_t k,
                                        const uint8_t* head_mask = nullptr,
                                        size_t num_kv_heads = 0);
  // Every byte of the answer read as page references: for a sequence without a tail estimate.
  absl::StatusOr<std::vector<abi::SelectedPageRef>> FinishSelect(uint32_t index);
  // A sequence that keeps a tail estimate (abi.h "Tail estimate"): the answer is `refs` page
  // references ([num_kv_heads][k]) followed by `tail_floats` floats of tail partials
  // ([num_q_heads][2 + head_dim]) into *tail. INTERNAL (naming icecached) when the answer is
  // shorter.
  absl::StatusOr<std::vector<abi::SelectedPageRef>> FinishSelect(uint32_t index, size_t refs,
                                                                 size_t tail_floats,
                                                                 std::vector<float>* tail);
  absl::Status Nop();
  // A scratch buffer of `bytes` of this client's own (kOpScratch); free it with
  // ReleaseStaging("", buffer).
  absl::StatusOr<abi::StageResponse> Scratch(uint64_t bytes);
  // kOpSelectBatch: `count` abi::BatchSelectEntry at the start of `scratch` (filled by the
  // caller); returns the slot (Finish waits for it; the entries then hold their answers).
  absl::StatusOr<uint32_t> SubmitSelectBatch(uint32_t layer, const abi::ArenaRef& scratch,
                                             uint32_t count);

  // ---- arena memory
  // A data segment's mapping, mapped on first use (its descriptor arrives on the attach
  // connection). INVALID_ARGUMENT for a segment number outside the data segments.
  struct Segment {
    uint8_t* base = nullptr;
    uint64_t bytes = 0;
  };
  absl::StatusOr<Segment> MapSegment(uint32_t segment);
  // Address of `bytes` at `ref` in a data segment (MapSegment). INVALID_ARGUMENT outside it.
  absl::StatusOr<uint8_t*> Address(const abi::ArenaRef& ref, uint64_t bytes);
  // Maps every segment the daemon has announced so far (does not wait for more).
  absl::Status MapAnnouncedSegments();
  // Start of a page frame and its size (from the segment table).
  absl::StatusOr<const uint8_t*> Frame(uint32_t segment, uint32_t frame, uint32_t* page_bytes);
  // True when the daemon closed its end of the attach connection (it exited, crashed or
  // dropped this client).
  bool PeerGone() const;
  // The arena's descriptors in segment order, control segment first, after taking every
  // segment notice still buffered on the connection (also once the daemon is gone): what a
  // recovery attach hands back. The descriptors stay this attachment's.
  std::vector<int> ArenaFds();

  // The counters this client publishes for the daemon to export.
  abi::ClientStats& stats() const { return header()->stats; }
  abi::ArenaHeader* header() const { return static_cast<abi::ArenaHeader*>(control_); }

 private:
  friend class AttachmentTestPeer;  // tests/support: raw queue entries (malformed references)
  Attachment() = default;
  void SubmitRaw(uint32_t queue_entry);
  // Reads segment notices from the attach connection (blocking until `want` is mapped, when
  // want != 0; otherwise only what is already there).
  absl::Status PumpNotices(uint32_t want) ABSL_EXCLUSIVE_LOCKS_REQUIRED(map_mu_);

  int conn_fd_ = -1;
  int doorbell_fd_ = -1;
  void* control_ = nullptr;
  uint64_t control_bytes_ = 0;
  std::string token_;
  uint64_t client_id_ = 0;
  uint32_t payload_capacity_ = 0;
  absl::Duration timeout_;

  absl::Mutex slots_mu_;
  std::vector<uint32_t> free_slots_ ABSL_GUARDED_BY(slots_mu_);
  std::vector<uint32_t> unanswered_slots_ ABSL_GUARDED_BY(slots_mu_);  // released unanswered
  absl::Mutex sq_mu_;
  uint64_t next_request_id_ ABSL_GUARDED_BY(sq_mu_) = 1;

  mutable absl::Mutex map_mu_;
  struct Mapped {
    void* base = nullptr;
    uint64_t bytes = 0;
    int fd = -1;  // kept: a recovery hands it to the daemon's successor
  };
  int control_fd_ = -1;
  std::vector<Mapped> segments_ ABSL_GUARDED_BY(map_mu_);
};

}  // namespace icecache
