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
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/thread_pool.h"
#include "selection/index_factory.h"
#include "server/core/arena.h"
#include "server/core/memory_accountant.h"
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
  // Bytes of arena memory (segments) one client may hold; 0 = the daemon's memory limit.
  uint64_t client_quota = 0;
  uint32_t max_clients = 256;
  ArenaOptions arena;
  // One select in N also scores every key exactly (off the critical path) to record the
  // recall of the returned pages; 0 turns sampling off.
  uint32_t recall_sample_every = 64;
  // How long a dispatcher keeps polling its queue after activity before it sleeps.
  absl::Duration poll_spin = absl::Microseconds(50);
  // Index of every (sequence, layer, KV head): the daemon's preset.
  selection::IndexSpec index_spec;
};

// Counters the daemon exports. Methods are called from any thread.
class DataPlaneObserver : public KvObserver {
 public:
  virtual void OnAttach(bool ok) = 0;
  virtual void OnDetach() = 0;
  virtual void OnRequest(uint32_t op, int code, double seconds) = 0;
  virtual void OnProtocolError() = 0;  // a slot or queue entry that could not be answered
};

// Sums over clients, for metrics and GetStats.
struct DataPlaneStats {
  uint64_t clients = 0;
  uint64_t arena_bytes = 0;    // segments of every arena
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
  DataPlane(const DataPlaneOptions& options, SequenceRegistry* registry,
            MemoryAccountant* arena_limit, ThreadPool* pool, DataPlaneObserver* observer);
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

  // Creates a sequence owned by `caller` with its KV in the caller's arena.
  // UNAUTHENTICATED for operator or anonymous callers; otherwise as SequenceRegistry::Create.
  absl::StatusOr<SequenceInfo> CreateSequence(const Caller& caller, const GeometrySpec& spec,
                                              const std::string& label);

  DataPlaneStats Stats() const;
  const DataPlaneOptions& options() const { return options_; }

 private:
  struct Client;
  class Dispatcher;

  void AttachLoop();
  void ReaperLoop();
  void Accept();
  void Detach(std::shared_ptr<Client> client);
  std::shared_ptr<Client> FindByFd(int fd) const;

  const DataPlaneOptions options_;
  SequenceRegistry* const registry_;
  MemoryAccountant* const arena_limit_;
  ThreadPool* const pool_;
  DataPlaneObserver* const observer_;

  int listen_fd_ = -1;
  int stop_fd_ = -1;  // eventfd: wakes the attach thread
  std::thread attach_thread_;
  std::thread reaper_thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> next_client_id_{1};

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Client>> by_token_ ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<Client>> reap_queue_ ABSL_GUARDED_BY(mu_);
  DataPlaneStats retired_ ABSL_GUARDED_BY(mu_);  // client counters of departed clients
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool reaper_exit_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace icecache
