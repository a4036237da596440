#include "server/service/icecache_service.h"

#include <chrono>
#include <utility>

#include "common/log.h"
#include "google/protobuf/util/time_util.h"
#include "proto/icecache/v1/abi.h"
#include "server/core/geometry.h"
#include "server/service/convert.h"

namespace icecache {

IceCacheService::IceCacheService(SequenceRegistry* registry, const MemoryAccountant* accountant,
                                 DataPlane* data_plane, Metrics* metrics, const Clock* clock,
                                 ServiceInfo info)
    : registry_(registry),
      data_plane_(data_plane),
      accountant_(accountant),
      clock_(clock),
      info_(std::move(info)),
      m_create_(metrics->RpcMethod("CreateSequence")),
      m_get_(metrics->RpcMethod("GetSequence")),
      m_list_(metrics->RpcMethod("ListSequences")),
      m_drop_(metrics->RpcMethod("DropSequence")),
      m_stats_(metrics->RpcMethod("GetStats")),
      m_config_(metrics->RpcMethod("GetConfig")) {}

void IceCacheService::SetListening(const std::string& tcp_address, int metrics_port) {
  absl::MutexLock lock(&mu_);
  tcp_address_ = tcp_address;
  metrics_port_ = metrics_port;
}

absl::StatusOr<Caller> IceCacheService::CallerOf(grpc::CallbackServerContext* ctx) const {
  const auto& md = ctx->client_metadata();
  auto it = md.find(abi::kTokenMetadataKey);
  if (it == md.end()) {
    return absl::UnauthenticatedError(
        "this call acts for an attached client: attach on the daemon's attach socket and send "
        "the token in the icecache-client-token metadata");
  }
  return data_plane_->Authenticate(absl::string_view(it->second.data(), it->second.size()));
}

template <typename Fn>
grpc::ServerUnaryReactor* IceCacheService::Unary(grpc::CallbackServerContext* ctx,
                                                 const Metrics::RpcMethodMetrics* method, Fn&& fn) {
  const auto start = std::chrono::steady_clock::now();
  const absl::Status status =
      draining_.load(std::memory_order_acquire)
          ? absl::UnavailableError("icecached is shutting down; retry against its successor")
          : std::forward<Fn>(fn)();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  method->Record(static_cast<int>(status.code()), seconds);
  // Caller mistakes are the caller's to see; only the daemon's own failures are logged.
  if (status.code() == absl::StatusCode::kInternal || status.code() == absl::StatusCode::kUnknown ||
      status.code() == absl::StatusCode::kDataLoss) {
    ICECACHE_LOG(WARNING) << "rpc from " << ctx->peer() << " failed: " << status;
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

grpc::ServerUnaryReactor* IceCacheService::CreateSequence(grpc::CallbackServerContext* ctx,
                                                          const v1::CreateSequenceRequest* request,
                                                          v1::CreateSequenceResponse* response) {
  return Unary(ctx, m_create_, [&]() -> absl::Status {
    absl::StatusOr<Caller> caller = CallerOf(ctx);
    if (!caller.ok()) return caller.status();
    if (!request->has_geometry()) {
      return absl::InvalidArgumentError("geometry is required");
    }
    absl::StatusOr<SequenceInfo> info =
        data_plane_->CreateSequence(*caller, FromProto(request->geometry()), request->label());
    if (!info.ok()) return info.status();
    ToProto(*info, response->mutable_sequence());
    ICECACHE_LOG(INFO) << "created " << info->handle << " (" << info->geometry.num_layers
                       << " layers, " << info->geometry.num_kv_heads << " kv heads, "
                       << info->geometry.max_tokens << " tokens, " << info->kv_bytes << " bytes)";
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* IceCacheService::GetSequence(grpc::CallbackServerContext* ctx,
                                                       const v1::GetSequenceRequest* request,
                                                       v1::GetSequenceResponse* response) {
  return Unary(ctx, m_get_, [&]() -> absl::Status {
    absl::StatusOr<Caller> caller = CallerOf(ctx);
    if (!caller.ok()) return caller.status();
    absl::StatusOr<SequenceInfo> info = registry_->Get(request->handle(), *caller);
    if (!info.ok()) return info.status();
    ToProto(*info, response->mutable_sequence());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* IceCacheService::ListSequences(grpc::CallbackServerContext* ctx,
                                                         const v1::ListSequencesRequest* request,
                                                         v1::ListSequencesResponse* response) {
  return Unary(ctx, m_list_, [&]() -> absl::Status {
    absl::StatusOr<Caller> caller = CallerOf(ctx);
    if (!caller.ok()) return caller.status();
    absl::StatusOr<SequencePage> page =
        registry_->List(request->page_size(), request->page_token(), *caller);
    if (!page.ok()) return page.status();
    for (const SequenceInfo& info : page->sequences) ToProto(info, response->add_sequences());
    response->set_next_page_token(page->next_page_token);
    response->set_total_size(page->total_size);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* IceCacheService::DropSequence(grpc::CallbackServerContext* ctx,
                                                        const v1::DropSequenceRequest* request,
                                                        v1::DropSequenceResponse* response) {
  return Unary(ctx, m_drop_, [&]() -> absl::Status {
    absl::StatusOr<Caller> caller = CallerOf(ctx);
    if (!caller.ok()) return caller.status();
    absl::StatusOr<uint64_t> freed = registry_->Drop(request->handle(), *caller);
    if (!freed.ok()) return freed.status();
    response->set_freed_bytes(*freed);
    ICECACHE_LOG(INFO) << "dropped " << request->handle() << " (" << *freed << " bytes)";
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* IceCacheService::GetStats(grpc::CallbackServerContext* ctx,
                                                    const v1::GetStatsRequest* /*request*/,
                                                    v1::GetStatsResponse* response) {
  return Unary(ctx, m_stats_, [&]() -> absl::Status {
    using google::protobuf::util::TimeUtil;
    response->set_version(info_.version);
    *response->mutable_start_time() =
        TimeUtil::NanosecondsToTimestamp(absl::ToUnixNanos(info_.start_time));
    response->set_uptime_seconds(absl::ToDoubleSeconds(clock_->Now() - info_.start_time));
    response->set_memory_used_bytes(accountant_->used());
    response->set_memory_limit_bytes(accountant_->limit());
    response->set_num_sequences(registry_->size());
    response->set_sequences_created_total(registry_->created_total());
    response->set_sequences_dropped_total(registry_->dropped_total());
    response->set_memory_rejections_total(accountant_->rejections());
    const DataPlaneStats dp = data_plane_->Stats();
    response->set_num_clients(dp.clients);
    response->set_arena_bytes(dp.arena_bytes);
    response->set_page_frames(dp.pages);
    response->set_page_frame_bytes(dp.frame_bytes);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* IceCacheService::GetConfig(grpc::CallbackServerContext* ctx,
                                                     const v1::GetConfigRequest* /*request*/,
                                                     v1::GetConfigResponse* response) {
  return Unary(ctx, m_config_, [&]() -> absl::Status {
    response->set_version(info_.version);
    response->set_socket_path(info_.socket_path);
    {
      absl::MutexLock lock(&mu_);
      response->set_tcp_address(tcp_address_);
      response->set_metrics_port(static_cast<uint32_t>(metrics_port_));
    }
    response->set_memory_limit_bytes(accountant_->limit());
    response->set_log_level(info_.log_level);
    response->set_shutdown_grace_seconds(info_.shutdown_grace_seconds);
    response->set_attach_socket_path(info_.attach_socket_path);
    response->set_client_quota_bytes(info_.client_quota_bytes);
    response->set_recall_sample_every(info_.recall_sample_every);
    response->set_index_preset(info_.index_preset);

    using L = GeometryLimits;
    v1::GeometryLimits* limits = response->mutable_geometry_limits();
    limits->set_max_num_layers(L::kMaxNumLayers);
    limits->set_max_num_q_heads(L::kMaxNumQHeads);
    limits->set_max_num_kv_heads(L::kMaxNumKvHeads);
    limits->set_max_group_size(L::kMaxGroupSize);
    for (uint32_t d : L::kHeadDims) limits->add_head_dims(d);
    for (uint32_t p : L::kPageSizes) limits->add_page_sizes(p);
    limits->add_dtypes(v1::DTYPE_BF16);
    limits->add_dtypes(v1::DTYPE_FP16);
    limits->set_max_tokens(L::kMaxTokens);
    limits->set_max_budget_tokens(L::kMaxBudgetTokens);

    using D = GeometryDefaults;
    v1::SequenceGeometry* defaults = response->mutable_geometry_defaults();
    defaults->set_page_size(D::kPageSize);
    defaults->set_budget_tokens(D::kBudgetTokens);
    defaults->set_sink_tokens(D::kSinkTokens);
    defaults->set_window_tokens(D::kWindowTokens);
    defaults->set_full_kv_layers(D::kFullKvLayers);
    return absl::OkStatus();
  });
}

}  // namespace icecache
