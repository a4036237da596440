// The real Transport: icecached's request slots and arena through an Attachment, gRPC for the
// control calls, and the backend's registration of every data segment the kernels touch (one
// cudaHostRegister per segment in CUDA mode, done here on first use, outside the
// attachment's locks). Internal to libicecache_client.
//
// Surviving the daemon (crash, restart, upgrade). Every operation that finds the daemon gone
// (UNAVAILABLE) recovers and is carried out again, so the engine sees a stall, not an error:
//   1. reconnect: attach to the daemon at the socket again, with backoff, up to
//      ClientOptions::reconnect_timeout, handing back the previous arena (a recovery attach:
//      the sequences' pages and frame tags survive in it);
//   2. settle: every request of the previous attachment whose answer had arrived counts as
//      acknowledged (an OK prefill or append enters its layer's history);
//   3. restore every live sequence with RestoreSequence (its geometry and each layer's
//      acknowledged history, which this transport records as answers arrive): the daemon
//      replays it, so the sequence selects exactly what it would have;
//   4. resubmit every request that had no answer, in its original order, exactly once
//      (a staging buffer of the old arena is copied into the new one when a request is
//      submitted with it, this resubmission or a later one: until then its owner may still be
//      writing it through the old mapping, which stays while the buffer is held).
// Sequences keep the handle they were created with; the transport maps it to the daemon's
// current one. Staging buffers are handed out as references of this transport's own
// (segment kVirtualSegment | id), valid across recoveries. Pages of a select belong to the
// generation that answered it (generation()); a page cache must be cleared when it changes.
//
// Thread safety: thread-safe. Recovery runs in the thread that finds the daemon gone, while
// every other operation waits for it; it makes no CUDA call (it may run in a host callback):
// the previous generation's registered memory is let go by a later Stage.
#pragma once

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/backend.h"
#include "client/transport.h"
#include "icecache/attachment.h"
#include "icecache/v1/icecache.grpc.pb.h"

namespace icecache::client_internal {

struct RecoveryCounters {
  uint64_t recoveries = 0;          // daemons found gone and replaced
  uint64_t restored_sequences = 0;  // sequences rebuilt by a successor
  uint64_t lost_sequences = 0;      // sequences a successor could not rebuild
  uint64_t resubmitted = 0;         // requests carried out again after a recovery
  double last_stall_seconds = 0;    // the last recovery, from loss to resubmission
  double total_stall_seconds = 0;
};

class AttachmentTransport final : public Transport {
 public:
  // Attaches to the daemon at `socket` (the control socket). `backend` must outlive the
  // transport. Errors as Attachment::Attach.
  static absl::StatusOr<std::unique_ptr<AttachmentTransport>> Create(
      Backend* backend, const std::string& socket, absl::Duration timeout,
      absl::Duration reconnect_timeout);
  ~AttachmentTransport() override;  // unregisters the segments it registered

  absl::StatusOr<abi::StageResponse> Stage(const std::string& handle, uint32_t tokens) override;
  absl::Status ReleaseStaging(const std::string& handle, const abi::ArenaRef& staging) override;
  absl::StatusOr<Ticket> SubmitStaged(uint32_t op, const std::string& handle, uint32_t layer,
                                      const abi::ArenaRef& staging, uint32_t tokens,
                                      uint32_t first_position) override;
  absl::Status Finish(Ticket ticket) override;
  absl::StatusOr<Ticket> SubmitSelectBatch(uint32_t layer,
                                           absl::Span<const SelectRequest> requests) override;
  absl::StatusOr<std::vector<SelectAnswer>> FinishSelectBatch(Ticket ticket) override;
  absl::Status PrepareSelectBatch(absl::Span<const SelectRequest> requests) override;
  bool Done(Ticket ticket) const override;
  absl::StatusOr<ArenaSpan> Map(const abi::ArenaRef& ref, uint64_t bytes) override;
  uint64_t PageBytes(uint32_t segment) const override;
  absl::Status DropSequence(const std::string& handle) override;
  abi::ClientStats& stats() override;
  uint64_t generation() const override;

  // CreateSequence through the current daemon; the sequence is then restored by recoveries.
  absl::StatusOr<v1::Sequence> CreateSequence(const v1::CreateSequenceRequest& request);
  // The current attachment (replaced by a recovery).
  Attachment& attachment();
  RecoveryCounters recovery_counters() const;
  // Leaves `handle` (a sequence created through this transport) as a recovery leaves one it
  // could not restore, with `why` as the restore's error.
  void MarkLostForTesting(const std::string& handle, absl::Status why);

  static constexpr uint32_t kVirtualSegment = 0x80000000u;

 private:
  struct Registered {
    uint8_t* host = nullptr;
    uint8_t* device = nullptr;
    uint64_t bytes = 0;
  };
  // One daemon's attachment and the segments registered with the backend from it.
  struct Generation {
    uint64_t id = 0;
    std::unique_ptr<Attachment> attachment;
    std::vector<Registered> segments;  // [kMaxSegments]
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<v1::IceCache::Stub> stub;
  };
  // A staging buffer as the sequences know it.
  struct Staged {
    std::string handle;  // the sequence's, as it knows it
    uint32_t tokens = 0;
    Generation* gen = nullptr;
    abi::ArenaRef real{};
    uint64_t bytes = 0;
    uint64_t v_offset = 0;
    uint8_t* host = nullptr;
  };
  // What a sequence is, for restores: its request and each layer's acknowledged history.
  struct History {
    uint32_t prefill_first = 0, prefill_tokens = 0;
    bool built = false;
    std::vector<std::pair<uint32_t, uint32_t>> appends;
  };
  struct SequenceRecord {
    v1::CreateSequenceRequest request;
    std::string current;  // the handle at the current daemon ("" when it could not be restored)
    absl::Status lost;    // why, when current is ""
    std::map<uint32_t, History> layers;
  };
  // A request in flight as the sequences know it (a Ticket).
  struct Pending {
    enum Kind { kStaged, kSelect } kind = kStaged;
    Generation* gen = nullptr;
    uint32_t slot = 0;
    // Answered by a daemon that went away before it was finished (settled at recovery).
    bool settled = false;
    absl::Status settled_status;
    // kStaged
    uint32_t op = 0;
    std::string handle;  // as the sequence knows it
    uint32_t layer = 0;
    uint32_t vid = 0;  // the staging buffer
    uint32_t tokens = 0, first_position = 0;
    // kSelect: the requests, copied (queries and masks), and the batch's buffer.
    struct Select {
      std::string handle;
      std::vector<float> queries;
      std::vector<uint8_t> mask;
      uint32_t k = 0, num_kv_heads = 0;
      uint32_t tail_floats = 0;  // after the pages, in the result room
    };
    std::vector<Select> selects;
    struct Scratch {
      abi::StageResponse buffer{};
      uint8_t* host = nullptr;
    } scratch;
    // Per request: where its result room starts, its page references, the room's bytes
    // (the references and the tail partials).
    std::vector<uint64_t> result_offsets, result_capacity, result_bytes;
  };
  using Scratch = Pending::Scratch;
  struct Layout {
    std::vector<uint64_t> query_at, result_at, result_cap, result_bytes;
    uint64_t bytes = 0;
  };

  AttachmentTransport(Backend* backend, const std::string& socket, absl::Duration timeout,
                      absl::Duration reconnect_timeout);
  absl::StatusOr<std::unique_ptr<Generation>> Connect(Attachment* previous);
  // Recovers unless another thread already did since `seen` (the generation that failed).
  absl::Status Recover(uint64_t seen) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status RecoverLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The daemon's handle for a sequence's; FAILED_PRECONDITION for one that was lost.
  absl::StatusOr<std::string> Current(const std::string& handle) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::Status SubmitLocked(Pending* p) ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Submits `p` and returns its ticket; recoveries carry it out again until it is answered.
  absl::StatusOr<Ticket> Track(std::shared_ptr<Pending> p);
  // Waits for the answer to `ticket` (a request of `kind`, named `what` in errors) through
  // recoveries, then lets `answered` turn the request and its status into the result, once,
  // before the ticket goes.
  template <typename T>
  absl::StatusOr<T> Await(
      Ticket ticket, Pending::Kind kind, const char* what,
      const std::function<absl::StatusOr<T>(Pending&, const absl::Status&)>& answered);
  absl::Status MigrateStaging(uint32_t vid) ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::StatusOr<ArenaSpan> MapIn(Generation* g, const abi::ArenaRef& ref, uint64_t bytes)
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void Acknowledge(const Pending& p) ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void Unregister(Generation* g);
  void DropOldGenerations() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static Layout LayoutOf(const std::vector<Pending::Select>& requests);
  // The answers a batch select left in its buffer (`host`).
  static std::vector<SelectAnswer> ReadAnswers(const uint8_t* host, const Pending& p);
  absl::StatusOr<Scratch> AcquireScratch(uint64_t bytes) ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void ReturnScratch(Scratch scratch) ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void PrepareContext(grpc::ClientContext* ctx) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  template <typename T>
  absl::StatusOr<T> Retry(const std::function<absl::StatusOr<T>()>& f);

  Backend* const backend_;
  const std::string socket_;
  const absl::Duration timeout_;
  const absl::Duration reconnect_timeout_;

  // Readers: every operation; writer: a recovery (and the bookkeeping of tickets).
  mutable absl::Mutex mu_;
  std::unique_ptr<Generation> current_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Generation>> old_ ABSL_GUARDED_BY(mu_);
  uint64_t next_generation_ ABSL_GUARDED_BY(mu_) = 1;
  RecoveryCounters counters_ ABSL_GUARDED_BY(mu_);

  // Bookkeeping (its own lock, taken under mu_ in either mode).
  mutable absl::Mutex book_mu_ ABSL_ACQUIRED_AFTER(mu_);
  absl::flat_hash_map<std::string, SequenceRecord> sequences_ ABSL_GUARDED_BY(book_mu_);
  absl::flat_hash_map<uint32_t, Staged> staged_ ABSL_GUARDED_BY(book_mu_);
  uint32_t next_vid_ ABSL_GUARDED_BY(book_mu_) = 1;
  std::map<Ticket, std::shared_ptr<Pending>> pending_ ABSL_GUARDED_BY(book_mu_);
  Ticket next_ticket_ ABSL_GUARDED_BY(book_mu_) = 1;
  std::vector<Scratch> free_scratch_ ABSL_GUARDED_BY(book_mu_);
  static constexpr size_t kMaxFreeScratch = 8;
};

}  // namespace icecache::client_internal
