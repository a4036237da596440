// The Client: attach (backend, attachment, transport) and sequence creation. A sequence's
// prefill and decode live in client/sequence.cc.
#include "icecache/client.h"

#include <grpcpp/grpcpp.h>

#include <cmath>

#include "client/attachment_transport.h"
#include "client/backend.h"
#include "client/decoder.h"
#include "client/sequence_impl.h"
#include "common/paths.h"
#include "icecache/attachment.h"
#include "icecache/v1/icecache.grpc.pb.h"

namespace icecache {

using client_internal::Backend;

const char* ExecutionModeName(ExecutionMode mode) {
  switch (mode) {
    case ExecutionMode::kAuto:
      return "auto";
    case ExecutionMode::kCpu:
      return "cpu";
    case ExecutionMode::kCuda:
      return "cuda";
  }
  return "unknown";
}

namespace {

v1::TailEstimate ToProto(TailEstimate t) {
  switch (t) {
    case TailEstimate::kNone:
      return v1::TAIL_ESTIMATE_NONE;
    case TailEstimate::kMean:
      return v1::TAIL_ESTIMATE_MEAN;
    case TailEstimate::kMeanVariance:
      return v1::TAIL_ESTIMATE_MEAN_VAR;
  }
  return v1::TAIL_ESTIMATE_UNSPECIFIED;
}

// What the daemon resolved; UNSPECIFIED (a daemon that predates tail estimation) is none.
TailEstimate FromProto(v1::TailEstimate t) {
  switch (t) {
    case v1::TAIL_ESTIMATE_MEAN:
      return TailEstimate::kMean;
    case v1::TAIL_ESTIMATE_MEAN_VAR:
      return TailEstimate::kMeanVariance;
    default:
      return TailEstimate::kNone;
  }
}

}  // namespace

class Client::Impl {
 public:
  ClientOptions options;
  // Destroyed in reverse order: the transport (unregisters segments) before the attachment
  // (unmaps them), the backend last.
  std::unique_ptr<Backend> backend;
  // Holds the attachment (replaced when a daemon that went away is recovered from).
  std::unique_ptr<client_internal::AttachmentTransport> transport;
  std::unique_ptr<client_internal::Decoder> decoder;  // before the transport goes
};

Client::Client(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;
ExecutionMode Client::mode() const { return impl_->backend->mode(); }
Attachment& Client::attachment() { return impl_->transport->attachment(); }

absl::StatusOr<std::unique_ptr<Client>> Client::Attach(const ClientOptions& options) {
  if (!(options.cache_factor >= 1.0) || options.cache_factor > 64.0) {
    return absl::InvalidArgumentError("cache_factor must be within [1, 64]");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  ExecutionMode mode = options.mode;
  if (mode == ExecutionMode::kAuto) {
    mode = client_internal::CudaDeviceUsable(options.device) ? ExecutionMode::kCuda
                                                             : ExecutionMode::kCpu;
  }
  if (mode == ExecutionMode::kCuda) {
    absl::StatusOr<std::unique_ptr<Backend>> b = client_internal::CreateCudaBackend(options.device);
    if (!b.ok()) return b.status();
    impl->backend = std::move(*b);
  } else {
    impl->backend = client_internal::CreateCpuBackend(options.cpu_threads);
  }
  const std::string socket = options.socket.empty() ? DefaultSocketPath() : options.socket;
  absl::StatusOr<std::unique_ptr<client_internal::AttachmentTransport>> transport =
      client_internal::AttachmentTransport::Create(impl->backend.get(), socket, options.timeout,
                                                   options.reconnect_timeout);
  if (!transport.ok()) return transport.status();
  impl->transport = std::move(*transport);
  impl->decoder =
      std::make_unique<client_internal::Decoder>(impl->backend.get(), impl->transport.get());
  return std::unique_ptr<Client>(new Client(std::move(impl)));
}

absl::Status Client::DecodeBatch(uint32_t layer, const std::vector<Sequence*>& batch, const void* q,
                                 const void* k_new, const void* v_new, void* out, void* stream,
                                 std::vector<absl::Status>* statuses) {
  std::vector<Sequence::Impl*> impls;
  impls.reserve(batch.size());
  for (Sequence* s : batch) {
    if (s == nullptr) return absl::InvalidArgumentError("a null sequence in the batch");
    impls.push_back(client_internal::SequenceFactory::ImplOf(s));
  }
  return impl_->decoder->DecodeBatch(layer, impls, q, k_new, v_new, out, stream, statuses);
}

ClientRecovery Client::recovery() const {
  const client_internal::RecoveryCounters c = impl_->transport->recovery_counters();
  return ClientRecovery{.recoveries = c.recoveries,
                        .restored_sequences = c.restored_sequences,
                        .lost_sequences = c.lost_sequences,
                        .resubmitted_requests = c.resubmitted,
                        .last_stall_seconds = c.last_stall_seconds,
                        .total_stall_seconds = c.total_stall_seconds};
}

ClientCounters Client::counters() const {
  const abi::ClientStats& s = impl_->transport->stats();
  return ClientCounters{.cache_hits = s.cache_hits.load(),
                        .cache_misses = s.cache_misses.load(),
                        .fetched_bytes = s.fetched_bytes.load(),
                        .fetch_nanoseconds = s.fetch_nanoseconds.load(),
                        .decode_steps = s.decode_steps.load(),
                        .prefetched_selects = s.prefetched_selects.load(),
                        .drift_fallback_heads = s.drift_fallback_heads.load()};
}

absl::StatusOr<std::unique_ptr<Sequence>> Client::CreateSequence(const SequenceOptions& o) {
  if (!(o.scale >= 0) || !std::isfinite(o.scale)) {
    return absl::InvalidArgumentError("scale must be finite and >= 0");
  }
  v1::CreateSequenceRequest req;
  v1::SequenceGeometry* geo = req.mutable_geometry();
  geo->set_num_layers(o.num_layers);
  geo->set_num_q_heads(o.num_q_heads);
  geo->set_num_kv_heads(o.num_kv_heads);
  geo->set_head_dim(o.head_dim);
  geo->set_dtype(o.dtype == DType::kBF16 ? v1::DTYPE_BF16 : v1::DTYPE_FP16);
  geo->set_max_tokens(o.max_tokens);
  if (o.page_size) geo->set_page_size(*o.page_size);
  if (o.budget_tokens) geo->set_budget_tokens(*o.budget_tokens);
  if (o.sink_tokens) geo->set_sink_tokens(*o.sink_tokens);
  if (o.window_tokens) geo->set_window_tokens(*o.window_tokens);
  if (o.full_kv_layers) geo->set_full_kv_layers(*o.full_kv_layers);
  if (o.tail_estimate) geo->set_tail_estimate(ToProto(*o.tail_estimate));
  if (o.scale != 0) geo->set_softmax_scale(o.scale);
  req.set_label(o.label);
  absl::StatusOr<v1::Sequence> created = impl_->transport->CreateSequence(req);
  if (!created.ok()) return created.status();
  const v1::SequenceGeometry& rg = created->geometry();
  client_internal::SequenceContext c;
  c.backend = impl_->backend.get();
  c.transport = impl_->transport.get();
  c.decoder = impl_->decoder.get();
  c.handle = created->handle();
  c.geometry = ResolvedGeometry{
      .num_layers = rg.num_layers(),
      .num_q_heads = rg.num_q_heads(),
      .num_kv_heads = rg.num_kv_heads(),
      .head_dim = rg.head_dim(),
      .dtype = rg.dtype() == v1::DTYPE_FP16 ? DType::kFP16 : DType::kBF16,
      .max_tokens = rg.max_tokens(),
      .page_size = rg.page_size(),
      .budget_tokens = rg.budget_tokens(),
      .sink_tokens = rg.sink_tokens(),
      .window_tokens = rg.window_tokens(),
      .full_kv_layers = rg.full_kv_layers(),
      .tail_estimate = FromProto(rg.tail_estimate()),
      // A daemon that does not report it (older than ABI 3) computes no tails: the option's.
      .softmax_scale = rg.has_softmax_scale() ? rg.softmax_scale() : o.scale,
  };
  c.scale = o.scale;
  c.cache_factor = impl_->options.cache_factor;
  c.profile = impl_->options.profile;
  c.selection = o.selection;
  c.drift_threshold = o.drift_threshold;
  return client_internal::SequenceFactory::Create(std::move(c));
}

}  // namespace icecache
