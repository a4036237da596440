// The daemon's data plane: client attachment over a unix socket with peer credentials, one
// shared-memory arena per client, and the request slots through which clients stage KV,
// prefill and append layers and select pages (protocol: proto/icecache/v1/abi.h).
//
// Threads
//   - the attach thread accepts connections, authenticates them (SO_PEERCRED against the
//     allowlists), creates arenas, and watches every attach connection: a connection that
//     closes (detach, exit, crash, SIGKILL) hands its client to the reaper;
//   - one dispatcher thread per client drains its submission queue (polling for
//     `poll_spin` after activity, then sleeping on the doorbell eventfd): stage, release and
//     select run inline (select spreads its KV heads over the pool); prefill runs on the pool;
//     appends run on the pool in order, one (sequence, layer) at a time;
//   - the reaper thread detaches dead clients: stops the dispatcher, waits for the client's
//     operations in flight, drops its sequences and frees its arena.
//
// Untrusted input: everything a client writes into its arena is read once into private
// memory and checked (slot index and state, op, handle ownership, layer, counts, staging
// references, payload sizes) before use; a bad request gets an error status in its slot, an
// unusable slot reference is counted and skipped, and nothing a client does reaches another
// client's arena or sequences.
//
// Thread safety: all public methods are thread-safe.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/accept_shedder.h"
#include "common/log_throttle.h"
#include "common/paths.h"
#include "common/thread_pool.h"
#include "selection/index_factory.h"
#include "server/core/arena.h"
#include "server/core/memory_accountant.h"
#include "server/core/promise.h"
#include "server/core/sequence_kv.h"
#include "server/core/sequence_registry.h"

namespace icecache {

struct DataPlaneOptions {
  // The attach socket (absolute path).
  std::string attach_socket;
  // Uids allowed to attach (empty: the daemon's own uid only).
  std::vector<uid_t> allowed_uids;
  // Uids allowed to attach as operators (empty: the daemon's own uid only).
  std::vector<uid_t> operator_uids;
  // Who may connect to the attach socket (mode and group); SO_PEERCRED decides who attaches.
  SocketAccess socket_access;
  // Bytes of arena memory (segments) one client may hold; 0 = the daemon's memory limit.
  uint64_t client_quota = 0;
  uint32_t max_clients = 256;
  // Attached clients of one uid (operator attachments included).
  uint32_t max_clients_per_uid = 64;
  // Attach handshakes in progress (connected, admitted uid, request not read yet), in all and
  // per uid. A connection beyond them is refused at once, before anything is read from it.
  uint32_t max_pending_attaches = 128;
  uint32_t max_pending_attaches_per_uid = 8;
  // A connection whose attach request has not fully arrived by then is closed.
  absl::Duration handshake_timeout = absl::Seconds(2);
  // Sequences one client may own at once (CreateSequence: RESOURCE_EXHAUSTED beyond).
  uint32_t max_sequences_per_client = 1024;
  // Protocol errors (queue entries naming no submitted slot, a queue tail beyond the ring,
  // unknown ops): a client may make `protocol_error_burst` of them, refilled at
  // `protocol_errors_per_second`; past that its dispatcher pauses `protocol_error_pause` per
  // pass (throttled), and a client still throttled after `protocol_error_grace` is detached.
  uint32_t protocol_error_burst = 64;
  double protocol_errors_per_second = 16;
  absl::Duration protocol_error_pause = absl::Milliseconds(20);
  absl::Duration protocol_error_grace = absl::Seconds(2);
  ArenaOptions arena;
  // One select in N also scores every key exactly (off the critical path) to record the
  // recall of the returned pages; 0 turns sampling off.
  uint32_t recall_sample_every = 64;
  // How long a dispatcher keeps polling its queue after activity before it sleeps.
  absl::Duration poll_spin = absl::Microseconds(50);
  // Index of every (sequence, layer, KV head): the daemon's preset.
  selection::IndexSpec index_spec;
  // One dispatcher thread per client. Off (fuzzing only): clients' queues are drained by
  // DispatchForTesting on the caller's thread.
  bool dispatcher_threads = true;
};

// Counters the daemon exports. Methods are called from any thread.
class DataPlaneObserver : public KvObserver {
 public:
  virtual void OnAttach(bool ok) = 0;
  virtual void OnDetach() = 0;
  virtual void OnRequest(uint32_t op, int code, double seconds) = 0;
  virtual void OnProtocolError() = 0;  // a slot or queue entry that could not be answered
  // A client detached by the daemon because it kept making protocol errors.
  virtual void OnClientEvicted() = 0;
};

// Sums over clients, for metrics and GetStats.
struct DataPlaneStats {
  uint64_t clients = 0;
  uint64_t arena_bytes = 0;  // segments of every arena
  // The most segments one client's arena has (of kMaxArenaSegments).
  uint64_t max_client_segments = 0;
  // Segments the live clients' arenas added beyond what their sequences were promised.
  uint64_t beyond_promise_segments = 0;
  uint64_t frame_bytes = 0;    // page frames in use
  uint64_t staging_bytes = 0;  // staging buffers in use
  uint64_t pages = 0;          // frames in use
  uint64_t queue_depth = 0;    // submitted requests not yet taken, all clients
  uint64_t in_flight = 0;      // requests taken and not answered, all clients
  // Client-published counters (abi::ClientStats), summed over live and departed clients.
  uint64_t cache_hits = 0, cache_misses = 0, fetched_bytes = 0, fetch_nanoseconds = 0,
           decode_steps = 0, prefetched_selects = 0, drift_fallback_heads = 0;
};

class DataPlane {
 public:
  // All pointers must outlive the data plane.
  DataPlane(const DataPlaneOptions& options, SequenceRegistry* registry, MemoryAccountant* memory,
            ThreadPool* pool, DataPlaneObserver* observer);
  DataPlane(const DataPlane&) = delete;
  DataPlane& operator=(const DataPlane&) = delete;
  ~DataPlane();  // Stop()

  // Binds the attach socket (removing a stale file; the caller holds the socket lock) and
  // starts the attach and reaper threads. UNAVAILABLE when the socket cannot be bound.
  absl::Status Start();
  // Closes the socket, detaches every client and joins every thread. Idempotent.
  void Stop();

  // The identity behind an attachment token (gRPC metadata). UNAUTHENTICATED when unknown.
  absl::StatusOr<Caller> Authenticate(absl::string_view token) const;

  // Creates a sequence owned by `caller` with its KV in the caller's arena, promising it what
  // its prefill and decode can need (server/core/promise.h) in the caller's budget.
  // UNAUTHENTICATED for operator or anonymous callers; RESOURCE_EXHAUSTED when the promise
  // does not fit (the memory limit or the client quota) or the caller holds
  // max_sequences_per_client sequences; otherwise as SequenceRegistry::Create.
  absl::StatusOr<SequenceInfo> CreateSequence(const Caller& caller, const GeometrySpec& spec,
                                              const std::string& label);

  // Rebuilds a sequence of the caller's previous arena (handed back by a recovery attach,
  // abi::kAttachRecover) after the daemon that held it went away: creates a sequence of `spec`
  // as CreateSequence does (a new handle), then replays each layer's acknowledged history
  // (`layers`) on the rows found under `previous_handle`'s frame tags, so that it selects what
  // the lost sequence would have. `last`: the previous arena is let go after this call.
  // FAILED_PRECONDITION: no previous arena. INVALID_ARGUMENT: a malformed handle or journal.
  // DATA_LOSS: a token of the journal is in no frame. CANCELLED once `cancel` (when given)
  // becomes true: within a layer's index build, or between appends or layers (a restore of a
  // 128k-token layer builds for seconds). On error no sequence is left; the previous arena's
  // rows stay, so a later restore of the same handle can succeed.
  absl::StatusOr<SequenceInfo> RestoreSequence(const Caller& caller, const GeometrySpec& spec,
                                               const std::string& label,
                                               const std::string& previous_handle,
                                               const std::vector<SequenceKv::LayerJournal>& layers,
                                               bool last,
                                               const std::atomic<bool>* cancel = nullptr);

  // The uid behind an attachment (for binding control calls to the caller's identity).
  // UNAUTHENTICATED when the token is unknown.
  absl::StatusOr<uid_t> TokenUid(absl::string_view token) const;

  // Shutdown: from now on every request is answered UNAVAILABLE ("shutting down") and attach
  // is refused; requests in flight finish. Returns once none is in flight or `grace` passed.
  void Drain(absl::Duration grace);

  DataPlaneStats Stats() const;
  const DataPlaneOptions& options() const { return options_; }
  // One dispatch pass over the queue of the client behind `token` (dispatcher_threads off):
  // returns the requests taken. Work that runs on the pool may still be in flight.
  uint32_t DispatchForTesting(absl::string_view token);
  // What a sequence of geometry `g` is promised (for tests and GetConfig).
  SequencePromise PromiseFor(const Geometry& g) { return promises_.For(g); }
  // Tests: called by CreateSequence (and so RestoreSequence) on the caller's thread once it has
  // found the caller's attachment, with false before it claims it and with true after (to run
  // a detach at either point). Set before any CreateSequence runs.
  void SetCreateSequenceHookForTesting(std::function<void(bool claimed)> hook) {
    create_hook_for_testing_ = std::move(hook);
  }

 private:
  struct Client;
  class Dispatcher;

  struct PendingAttach;

  void AttachLoop();
  void ReaperLoop();
  // Accepts what is waiting on the attach socket: reads each peer's credentials and refuses
  // uids that may not attach, or that have too many handshakes in progress, at once.
  void AcceptNew(std::vector<PendingAttach>* pending);
  // Admits a connection whose attach request has fully arrived (or refuses it).
  void Handshake(const PendingAttach& p);
  void Refuse(int fd, uint32_t status, const std::string& why);
  void Detach(std::shared_ptr<Client> client);
  std::shared_ptr<Client> FindByFd(int fd) const;

  // The caller's client attachment (listed, not claimed), or null: none or an operator's.
  std::shared_ptr<Client> FindClient(const Caller& caller) const;
  // The caller's client attachment, claimed (BeginOp) so that the reaper drops what the
  // caller creates with it: UNAUTHENTICATED when the caller has none (operators), or when it
  // is being detached.
  absl::StatusOr<std::shared_ptr<Client>> ClaimClient(const Caller& caller,
                                                      absl::string_view what) const;

  const DataPlaneOptions options_;
  std::function<void(bool)> create_hook_for_testing_;
  SequenceRegistry* const registry_;
  MemoryAccountant* const memory_;  // --memory-limit: promises and arenas, every client
  ThreadPool* const pool_;
  DataPlaneObserver* const observer_;

  PromiseCalculator promises_;
  // Staging each live sequence may hold at once (its promise's staging part) and the tag its
  // staging buffers carry in the arena, by the sequence's stored KV.
  // A sequence's promise as it stands (it shrinks once the sequence is prefilled).
  struct SequenceCharge {
    absl::Mutex mu;
    SequencePromise promise ABSL_GUARDED_BY(mu);
    bool prefilled ABSL_GUARDED_BY(mu) = false;
  };
  struct StagingAllowance {
    uint64_t tag = 0;
    std::shared_ptr<SequenceCharge> charge;
  };
  mutable absl::Mutex allowance_mu_;
  absl::flat_hash_map<const SequenceKv*, StagingAllowance> allowances_
      ABSL_GUARDED_BY(allowance_mu_);
  // Bytes of every client's arena segments (their budgets count them).
  // Shared with every client's budget, which can outlive the plane (ClientBudget).
  const std::shared_ptr<std::atomic<uint64_t>> segment_bytes_ =
      std::make_shared<std::atomic<uint64_t>>(0);
  std::atomic<uint64_t> next_staging_tag_{1};
  std::atomic<bool> draining_{false};

  int listen_fd_ = -1;
  AcceptShedder attach_shedder_;  // the attach thread only
  LogThrottle refuse_log_;        // Refuse's lines
  int stop_fd_ = -1;              // eventfd: wakes the attach thread
  std::thread attach_thread_;
  std::thread reaper_thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> next_client_id_{1};

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Client>> by_token_ ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<Client>> reap_queue_ ABSL_GUARDED_BY(mu_);
  // Clients unlisted and not yet retired (queued or being reaped): Stats counts their
  // counters, so that the exported totals do not dip while a reap waits for a long request.
  std::vector<const Client*> reaping_ ABSL_GUARDED_BY(mu_);
  // A client's published counters (abi::ClientStats) added into `to`.
  static void AddClientCounters(const abi::ClientStats& from, DataPlaneStats* to);
  DataPlaneStats retired_ ABSL_GUARDED_BY(mu_);  // client counters of departed clients
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool reaper_exit_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace icecache
