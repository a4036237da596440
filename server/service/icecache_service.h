// gRPC handlers of icecache.v1.IceCache: translate proto <-> domain, call the core, and
// report through one wrapper (Unary) that admits each call (transport, rate), parses its
// request bytes, times it, counts it by method and code and converts the status
// (CONVENTIONS 2). Methods are registered as raw (byte) handlers so that a request that does
// not parse gets a clear INVALID_ARGUMENT rather than gRPC's bare UNIMPLEMENTED.
//
// Handlers use the callback API and never block gRPC's threads: every core call they make
// takes only short locks, except RestoreSequence, which rebuilds a sequence and runs on the
// service's own threads (long_calls_), finishing its call from there.
//
// Thread safety: all handlers may run concurrently; the service itself holds no mutable
// state except the listening information, which is guarded.
#pragma once

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/thread_pool.h"
#include "icecache/v1/icecache.grpc.pb.h"
#include "server/core/clock.h"
#include "server/core/data_plane.h"
#include "server/core/memory_accountant.h"
#include "server/core/sequence_registry.h"
#include "server/metrics/metrics.h"
#include "server/service/control_listener.h"
#include "server/service/rate_limiter.h"

namespace icecache {

// What GetConfig reports besides the core's own state.
struct ServiceInfo {
  std::string version;
  std::string socket_path;
  std::string attach_socket_path;
  std::string log_level;
  double shutdown_grace_seconds = 0;
  absl::Time start_time;
  uint64_t client_quota_bytes = 0;
  uint32_t recall_sample_every = 0;
  std::string index_preset;
  // Control calls one caller (a uid on the unix socket, a host over TCP) may make per second,
  // in bursts of control_burst; 0: no limit.
  double control_rate = 0;
  double control_burst = 0;
  // Whether the control API answers over plaintext TCP (--tcp-insecure, loopback only).
  // Otherwise plaintext TCP connections get health and reflection only.
  bool tcp_plaintext_control = false;
  bool tcp_tls = false;
  bool tcp_client_auth = false;
  uint32_t socket_mode = 0;
  uint32_t max_sequences_per_client = 0;
};

class IceCacheService final : public v1::IceCache::CallbackService {
 public:
  // All pointers must outlive the service.
  IceCacheService(SequenceRegistry* registry, const MemoryAccountant* accountant,
                  DataPlane* data_plane, Metrics* metrics, const Clock* clock, ServiceInfo info);

  // Set once the listeners are bound (their ports are known only then). `unix_peers` (may
  // be null in tests) tells the uid behind a call that came over the unix socket.
  void SetListening(const std::string& tcp_address, int metrics_port,
                    const ControlListener* unix_peers);

  // From now on every new call is answered UNAVAILABLE ("shutting down") without touching
  // the core, so that clients retry elsewhere while in-flight calls finish.
  void StartDraining() { draining_.store(true, std::memory_order_release); }

 private:
  // One RPC: the request parsed, the response to fill; returns the call's status.
  template <typename Request, typename Response>
  using Handler = absl::Status (IceCacheService::*)(grpc::CallbackServerContext*, const Request*,
                                                    Response*);
  // Serves method `method_index` of the service with `handler` through Unary: on gRPC's
  // callback thread, or, `long_running`, on the service's own threads (long_calls_).
  template <typename Request, typename Response>
  void ServeRaw(int method_index, const Metrics::RpcMethodMetrics* method,
                Handler<Request, Response> handler, bool long_running = false);
  // Every RPC goes through here: admission (draining, transport, rate), parsing of the
  // request bytes (INVALID_ARGUMENT when they are not the method's message), the handler,
  // the response's bytes, and one record under `method` (time and code); returns the status
  // the call finishes with.
  template <typename Request, typename Response>
  grpc::Status Unary(grpc::CallbackServerContext* ctx, const Metrics::RpcMethodMetrics* method,
                     Handler<Request, Response> handler, const grpc::ByteBuffer* in,
                     grpc::ByteBuffer* out);

  absl::Status OnCreateSequence(grpc::CallbackServerContext* ctx,
                                const v1::CreateSequenceRequest* request,
                                v1::CreateSequenceResponse* response);
  absl::Status OnGetSequence(grpc::CallbackServerContext* ctx,
                             const v1::GetSequenceRequest* request,
                             v1::GetSequenceResponse* response);
  absl::Status OnListSequences(grpc::CallbackServerContext* ctx,
                               const v1::ListSequencesRequest* request,
                               v1::ListSequencesResponse* response);
  absl::Status OnDropSequence(grpc::CallbackServerContext* ctx,
                              const v1::DropSequenceRequest* request,
                              v1::DropSequenceResponse* response);
  absl::Status OnGetStats(grpc::CallbackServerContext* ctx, const v1::GetStatsRequest* request,
                          v1::GetStatsResponse* response);
  absl::Status OnGetConfig(grpc::CallbackServerContext* ctx, const v1::GetConfigRequest* request,
                           v1::GetConfigResponse* response);
  absl::Status OnRestoreSequence(grpc::CallbackServerContext* ctx,
                                 const v1::RestoreSequenceRequest* request,
                                 v1::RestoreSequenceResponse* response);

  // The caller behind the call's attachment token (metadata "icecache-client-token"), which
  // must come over the unix socket from the uid the token was issued to (a token alone is no
  // identity). UNAUTHENTICATED without a token, or for a token of an attachment that has gone;
  // PERMISSION_DENIED for a token sent over TCP or by another uid.
  absl::StatusOr<Caller> CallerOf(grpc::CallbackServerContext* ctx) const;
  // Whether the call may reach the control API at all: over the unix socket, TLS, or
  // plaintext TCP with --tcp-insecure; and within its caller's rate. UNAUTHENTICATED for
  // plaintext TCP otherwise, RESOURCE_EXHAUSTED above the rate.
  absl::Status Admit(grpc::CallbackServerContext* ctx);

  SequenceRegistry* const registry_;
  DataPlane* const data_plane_;
  const MemoryAccountant* const accountant_;
  const Clock* const clock_;
  const ServiceInfo info_;

  const Metrics::RpcMethodMetrics* const m_create_;
  const Metrics::RpcMethodMetrics* const m_get_;
  const Metrics::RpcMethodMetrics* const m_list_;
  const Metrics::RpcMethodMetrics* const m_drop_;
  const Metrics::RpcMethodMetrics* const m_stats_;
  const Metrics::RpcMethodMetrics* const m_config_;
  const Metrics::RpcMethodMetrics* const m_restore_;

  std::atomic<bool> draining_{false};
  RateLimiter rate_;
  mutable absl::Mutex mu_;
  std::string tcp_address_ ABSL_GUARDED_BY(mu_);
  int metrics_port_ ABSL_GUARDED_BY(mu_) = 0;
  const ControlListener* unix_peers_ ABSL_GUARDED_BY(mu_) = nullptr;
  // Threads for calls that run long (RestoreSequence). Last: joined first, while everything
  // the calls use is still there. As many as the machine has cores, so that the restores of
  // every client after a restart go on together, as they did on gRPC's threads.
  ThreadPool long_calls_{std::max<size_t>(2, std::thread::hardware_concurrency())};
};

}  // namespace icecache
