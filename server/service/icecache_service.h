// gRPC handlers of icecache.v1.IceCache: translate proto <-> domain, call the core, and
// report through one wrapper (Unary) that times each call, counts it by method and code and
// converts the status (CONVENTIONS 2).
//
// Handlers use the callback API and never block: every core call they make takes only short
// locks. Work that can take long is handed to a worker pool by the data plane, not here.
//
// Thread safety: all handlers may run concurrently; the service itself holds no mutable
// state except the listening information, which is guarded.
#pragma once

#include <atomic>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "icecache/v1/icecache.grpc.pb.h"
#include "server/core/clock.h"
#include "server/core/data_plane.h"
#include "server/core/memory_accountant.h"
#include "server/core/sequence_registry.h"
#include "server/metrics/metrics.h"

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
};

class IceCacheService final : public v1::IceCache::CallbackService {
 public:
  // All pointers must outlive the service.
  IceCacheService(SequenceRegistry* registry, const MemoryAccountant* accountant,
                  DataPlane* data_plane, Metrics* metrics, const Clock* clock, ServiceInfo info);

  // Set once the listeners are bound (their ports are known only then).
  void SetListening(const std::string& tcp_address, int metrics_port);

  // From now on every new call is answered UNAVAILABLE ("shutting down") without touching
  // the core, so that clients retry elsewhere while in-flight calls finish.
  void StartDraining() { draining_.store(true, std::memory_order_release); }

  grpc::ServerUnaryReactor* CreateSequence(grpc::CallbackServerContext* ctx,
                                           const v1::CreateSequenceRequest* request,
                                           v1::CreateSequenceResponse* response) override;
  grpc::ServerUnaryReactor* GetSequence(grpc::CallbackServerContext* ctx,
                                        const v1::GetSequenceRequest* request,
                                        v1::GetSequenceResponse* response) override;
  grpc::ServerUnaryReactor* ListSequences(grpc::CallbackServerContext* ctx,
                                          const v1::ListSequencesRequest* request,
                                          v1::ListSequencesResponse* response) override;
  grpc::ServerUnaryReactor* DropSequence(grpc::CallbackServerContext* ctx,
                                         const v1::DropSequenceRequest* request,
                                         v1::DropSequenceResponse* response) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* ctx,
                                     const v1::GetStatsRequest* request,
                                     v1::GetStatsResponse* response) override;
  grpc::ServerUnaryReactor* GetConfig(grpc::CallbackServerContext* ctx,
                                      const v1::GetConfigRequest* request,
                                      v1::GetConfigResponse* response) override;

 private:
  // Runs `fn` (returning absl::Status), records it under `method` and finishes the call.
  template <typename Fn>
  grpc::ServerUnaryReactor* Unary(grpc::CallbackServerContext* ctx,
                                  const Metrics::RpcMethodMetrics* method, Fn&& fn);

  // The caller behind the call's attachment token (metadata "icecache-client-token").
  // UNAUTHENTICATED without one, or for a token of an attachment that has gone.
  absl::StatusOr<Caller> CallerOf(grpc::CallbackServerContext* ctx) const;

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

  std::atomic<bool> draining_{false};
  mutable absl::Mutex mu_;
  std::string tcp_address_ ABSL_GUARDED_BY(mu_);
  int metrics_port_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace icecache
