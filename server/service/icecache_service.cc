#include "server/service/icecache_service.h"

#include <chrono>
#include <optional>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "google/protobuf/arena.h"
#include "google/protobuf/util/time_util.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/security/auth_context.h"
#include "grpcpp/support/byte_buffer.h"
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
      m_config_(metrics->RpcMethod("GetConfig")),
      m_restore_(metrics->RpcMethod("RestoreSequence")),
      rate_(info_.control_rate, info_.control_burst) {
  // Method indices in the order of icecache.proto's service.
  ServeRaw<v1::CreateSequenceRequest, v1::CreateSequenceResponse>(
      0, m_create_, &IceCacheService::OnCreateSequence);
  ServeRaw<v1::GetSequenceRequest, v1::GetSequenceResponse>(1, m_get_,
                                                            &IceCacheService::OnGetSequence);
  ServeRaw<v1::ListSequencesRequest, v1::ListSequencesResponse>(2, m_list_,
                                                                &IceCacheService::OnListSequences);
  ServeRaw<v1::DropSequenceRequest, v1::DropSequenceResponse>(3, m_drop_,
                                                              &IceCacheService::OnDropSequence);
  ServeRaw<v1::GetStatsRequest, v1::GetStatsResponse>(4, m_stats_, &IceCacheService::OnGetStats);
  ServeRaw<v1::GetConfigRequest, v1::GetConfigResponse>(5, m_config_,
                                                        &IceCacheService::OnGetConfig);
  // A restore rebuilds every layer of a sequence (seconds to minutes): off gRPC's threads.
  ServeRaw<v1::RestoreSequenceRequest, v1::RestoreSequenceResponse>(
      6, m_restore_, &IceCacheService::OnRestoreSequence, /*long_running=*/true);
}

void IceCacheService::SetListening(const std::string& tcp_address, int metrics_port,
                                   const ControlListener* unix_peers) {
  absl::MutexLock lock(&mu_);
  tcp_address_ = tcp_address;
  metrics_port_ = metrics_port;
  unix_peers_ = unix_peers;
}

namespace {

// The transport a call came over, from what gRPC tells a handler.
bool IsTls(grpc::CallbackServerContext* ctx) {
  const std::shared_ptr<const grpc::AuthContext> auth = ctx->auth_context();
  if (auth == nullptr) return false;
  for (const grpc::string_ref& v : auth->FindPropertyValues("transport_security_type")) {
    if (v == "ssl") return true;
  }
  return false;
}

// "ipv4:10.0.0.1:5678" -> "ipv4:10.0.0.1" (callers are limited per host, not per connection).
std::string PeerHost(const std::string& peer) {
  const size_t colon = peer.rfind(':');
  return colon == std::string::npos || colon < 5 ? peer : peer.substr(0, colon);
}

}  // namespace

absl::Status IceCacheService::Admit(grpc::CallbackServerContext* ctx) {
  const std::string peer = ctx->peer();
  std::optional<PeerCredentials> cred;
  {
    absl::MutexLock lock(&mu_);
    if (unix_peers_ != nullptr) cred = unix_peers_->PeerOf(peer);
  }
  std::string key;
  if (cred.has_value()) {
    key = absl::StrCat("uid:", cred->uid);
  } else {
    if (!IsTls(ctx) && !info_.tcp_plaintext_control && !absl::StartsWith(peer, "fd:")) {
      return absl::UnauthenticatedError(
          "the control API over TCP needs TLS (icecached --tls-cert and --tls-key); plaintext "
          "TCP serves health and reflection only, unless the daemon runs with --tcp-insecure on "
          "a loopback address");
    }
    key = PeerHost(peer);
  }
  if (!rate_.Allow(key)) {
    return absl::ResourceExhaustedError(absl::StrCat("too many control calls from ", key,
                                                     ": at most ", info_.control_rate,
                                                     " per second (--control-rate); retry later"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Caller> IceCacheService::CallerOf(grpc::CallbackServerContext* ctx) const {
  const auto& md = ctx->client_metadata();
  auto it = md.find(abi::kTokenMetadataKey);
  if (it == md.end()) {
    return absl::UnauthenticatedError(
        "this call acts for an attached client: attach on the daemon's attach socket and send "
        "the token in the icecache-client-token metadata");
  }
  const absl::string_view token(it->second.data(), it->second.size());
  absl::StatusOr<Caller> caller = data_plane_->Authenticate(token);
  if (!caller.ok()) return caller.status();
  // A token is not an identity by itself: the call must come from the uid it was issued to,
  // as the kernel reports it for the unix socket connection the call arrived on.
  std::optional<PeerCredentials> cred;
  {
    absl::MutexLock lock(&mu_);
    if (unix_peers_ != nullptr) cred = unix_peers_->PeerOf(ctx->peer());
  }
  if (!cred.has_value()) {
    return absl::PermissionDeniedError(
        "calls that act for an attached client are served only on the daemon's unix socket, "
        "where the caller's uid is checked (TCP serves status, stats and config)");
  }
  absl::StatusOr<uid_t> owner = data_plane_->TokenUid(token);
  if (!owner.ok()) return owner.status();
  if (*owner != cred->uid) {
    return absl::PermissionDeniedError(
        absl::StrCat("this attachment token belongs to another uid; the call comes from uid ",
                     cred->uid, " (pid ", cred->pid, ")"));
  }
  // A call whose connection ended is cancelled before its descriptor can be reused.
  if (ctx->IsCancelled()) return absl::CancelledError("the call's connection ended");
  return caller;
}

namespace {

// The reactor of a long call: it records the call's cancellation (the caller gave up, its
// deadline passed, its connection ended, or the server's shutdown grace ran out) in a flag
// that the call's work polls where it runs long (a restore's index build). The default
// reactor offers only ServerContext::IsCancelled, which work deep in the index cannot reach.
class LongCallReactor final : public grpc::ServerUnaryReactor {
 public:
  void OnCancel() override { cancelled_.store(true); }
  void OnDone() override { delete this; }
  const std::atomic<bool>* cancelled() const { return &cancelled_; }

 private:
  std::atomic<bool> cancelled_{false};
};

// The cancellation flag of the long call this thread is running (null outside one).
thread_local const std::atomic<bool>* t_long_call_cancelled = nullptr;

}  // namespace

template <typename Request, typename Response>
void IceCacheService::ServeRaw(int method_index, const Metrics::RpcMethodMetrics* method,
                               Handler<Request, Response> handler, bool long_running) {
  // The request arrives as bytes and is parsed here: a body that is not the method's message
  // gets INVALID_ARGUMENT with a message, not gRPC's bare UNIMPLEMENTED.
  MarkMethodRawCallback(
      method_index,
      new grpc::internal::CallbackUnaryHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
          [this, method, handler, long_running](
              grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* in,
              grpc::ByteBuffer* out) -> grpc::ServerUnaryReactor* {
            if (!long_running) {
              grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
              reactor->Finish(Unary<Request, Response>(ctx, method, handler, in, out));
              return reactor;
            }
            // A long call runs on the service's own threads and finishes from there: gRPC's
            // threads, which serve every other call and health probe, are not held by it. The
            // call's context, request and response stay valid until it finishes (the reactor
            // until OnDone, after Finish).
            auto* reactor = new LongCallReactor();
            long_calls_.Schedule([this, method, handler, ctx, in, out, reactor] {
              t_long_call_cancelled = reactor->cancelled();
              const grpc::Status status = Unary<Request, Response>(ctx, method, handler, in, out);
              t_long_call_cancelled = nullptr;
              reactor->Finish(status);
            });
            return reactor;
          }));
}

template <typename Request, typename Response>
grpc::Status IceCacheService::Unary(grpc::CallbackServerContext* ctx,
                                    const Metrics::RpcMethodMetrics* method,
                                    Handler<Request, Response> handler, const grpc::ByteBuffer* in,
                                    grpc::ByteBuffer* out) {
  const auto start = std::chrono::steady_clock::now();
  absl::Status status =
      draining_.load(std::memory_order_acquire)
          ? absl::UnavailableError("icecached is shutting down; retry against its successor")
          : Admit(ctx);
  google::protobuf::Arena arena;
  Request* request = google::protobuf::Arena::CreateMessage<Request>(&arena);
  Response* response = google::protobuf::Arena::CreateMessage<Response>(&arena);
  if (status.ok()) {
    grpc::ByteBuffer copy(*in);  // Deserialize consumes its buffer
    if (!grpc::SerializationTraits<Request>::Deserialize(&copy, request).ok()) {
      status = absl::InvalidArgumentError(absl::StrCat("the request body is not a valid ",
                                                       Request::descriptor()->full_name(),
                                                       " (protobuf parse failed)"));
    }
  }
  if (status.ok()) status = (this->*handler)(ctx, request, response);
  if (status.ok()) {
    bool own = false;
    const grpc::Status serialized =
        grpc::SerializationTraits<Response>::Serialize(*response, out, &own);
    if (!serialized.ok()) status = absl::InternalError("cannot serialize the response");
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  method->Record(static_cast<int>(status.code()), seconds);
  // Caller mistakes are the caller's to see; only the daemon's own failures are logged.
  if (status.code() == absl::StatusCode::kInternal || status.code() == absl::StatusCode::kUnknown ||
      status.code() == absl::StatusCode::kDataLoss) {
    ICECACHE_LOG(WARNING) << "rpc from " << ctx->peer() << " failed: " << status;
  }
  return ToGrpcStatus(status);
}

absl::Status IceCacheService::OnRestoreSequence(grpc::CallbackServerContext* ctx,
                                                const v1::RestoreSequenceRequest* request,
                                                v1::RestoreSequenceResponse* response) {
  absl::StatusOr<Caller> caller = CallerOf(ctx);
  if (!caller.ok()) return caller.status();
  if (!request->has_geometry()) return absl::InvalidArgumentError("geometry is required");
  // The history as runs (never expanded: a run of 2^32 appends is 12 bytes here); each
  // layer's is checked whole against the geometry by SequenceKv::Restore before anything is
  // read or allocated for it.
  if (request->layers_size() > static_cast<int>(GeometryLimits::kMaxNumLayers)) {
    return absl::InvalidArgumentError(absl::StrCat("layers: ", request->layers_size(),
                                                   " histories; a sequence has at most ",
                                                   GeometryLimits::kMaxNumLayers, " layers"));
  }
  std::vector<SequenceKv::LayerJournal> layers;
  layers.reserve(request->layers_size());
  for (const v1::LayerHistory& h : request->layers()) {
    SequenceKv::LayerJournal j;
    j.layer = h.layer();
    j.prefill_first = h.prefill_first_position();
    j.prefill_tokens = h.prefill_tokens();
    j.appends.reserve(h.appends_size());
    for (const v1::AppendRun& r : h.appends()) {
      j.appends.push_back(SequenceKv::AppendRun{r.first_position(), r.tokens(), r.count()});
    }
    layers.push_back(std::move(j));
  }
  absl::StatusOr<GeometrySpec> spec = FromProto(request->geometry());
  if (!spec.ok()) return spec.status();
  absl::StatusOr<SequenceInfo> info =
      data_plane_->RestoreSequence(*caller, *spec, request->label(), request->previous_handle(),
                                   layers, request->last(), t_long_call_cancelled);
  if (!info.ok()) return info.status();
  ToProto(*info, response->mutable_sequence());
  return absl::OkStatus();
}

absl::Status IceCacheService::OnCreateSequence(grpc::CallbackServerContext* ctx,
                                               const v1::CreateSequenceRequest* request,
                                               v1::CreateSequenceResponse* response) {
  absl::StatusOr<Caller> caller = CallerOf(ctx);
  if (!caller.ok()) return caller.status();
  if (!request->has_geometry()) {
    return absl::InvalidArgumentError("geometry is required");
  }
  absl::StatusOr<GeometrySpec> spec = FromProto(request->geometry());
  if (!spec.ok()) return spec.status();
  absl::StatusOr<SequenceInfo> info = data_plane_->CreateSequence(*caller, *spec, request->label());
  if (!info.ok()) return info.status();
  ToProto(*info, response->mutable_sequence());
  ICECACHE_LOG(INFO) << "created " << info->handle << " (" << info->geometry.num_layers
                     << " layers, " << info->geometry.num_kv_heads << " kv heads, "
                     << info->geometry.max_tokens << " tokens, " << info->kv_bytes << " bytes)";
  return absl::OkStatus();
}

absl::Status IceCacheService::OnGetSequence(grpc::CallbackServerContext* ctx,
                                            const v1::GetSequenceRequest* request,
                                            v1::GetSequenceResponse* response) {
  absl::StatusOr<Caller> caller = CallerOf(ctx);
  if (!caller.ok()) return caller.status();
  absl::StatusOr<SequenceInfo> info = registry_->Get(request->handle(), *caller);
  if (!info.ok()) return info.status();
  ToProto(*info, response->mutable_sequence());
  return absl::OkStatus();
}

absl::Status IceCacheService::OnListSequences(grpc::CallbackServerContext* ctx,
                                              const v1::ListSequencesRequest* request,
                                              v1::ListSequencesResponse* response) {
  absl::StatusOr<Caller> caller = CallerOf(ctx);
  if (!caller.ok()) return caller.status();
  absl::StatusOr<SequencePage> page =
      registry_->List(request->page_size(), request->page_token(), *caller);
  if (!page.ok()) return page.status();
  for (const SequenceInfo& info : page->sequences) ToProto(info, response->add_sequences());
  response->set_next_page_token(page->next_page_token);
  response->set_total_size(page->total_size);
  return absl::OkStatus();
}

absl::Status IceCacheService::OnDropSequence(grpc::CallbackServerContext* ctx,
                                             const v1::DropSequenceRequest* request,
                                             v1::DropSequenceResponse* response) {
  absl::StatusOr<Caller> caller = CallerOf(ctx);
  if (!caller.ok()) return caller.status();
  absl::StatusOr<uint64_t> freed = registry_->Drop(request->handle(), *caller);
  if (!freed.ok()) return freed.status();
  response->set_freed_bytes(*freed);
  ICECACHE_LOG(INFO) << "dropped " << request->handle() << " (" << *freed << " bytes)";
  return absl::OkStatus();
}

absl::Status IceCacheService::OnGetStats(grpc::CallbackServerContext* /*ctx*/,
                                         const v1::GetStatsRequest* /*request*/,
                                         v1::GetStatsResponse* response) {
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
}

absl::Status IceCacheService::OnGetConfig(grpc::CallbackServerContext* /*ctx*/,
                                          const v1::GetConfigRequest* /*request*/,
                                          v1::GetConfigResponse* response) {
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
  response->set_tcp_tls(info_.tcp_tls);
  response->set_tcp_client_auth(info_.tcp_client_auth);
  response->set_socket_mode(info_.socket_mode);
  response->set_max_sequences_per_client(info_.max_sequences_per_client);
  response->set_control_rate(info_.control_rate);

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
  defaults->set_tail_estimate(ToProto(D::kTail));
  return absl::OkStatus();
}

}  // namespace icecache
