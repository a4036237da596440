#include "server/main/daemon.h"

#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <fstream>
#include <iterator>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/build_info.h"
#include "common/log.h"
#include "common/paths.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/resource_quota.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "proto/icecache/v1/abi.h"
#include "server/core/clock.h"
#include "server/core/data_plane.h"
#include "server/core/memory_accountant.h"
#include "server/core/sequence_registry.h"
#include "server/main/socket_lock.h"
#include "server/metrics/metrics.h"
#include "server/service/control_listener.h"
#include "server/service/icecache_service.h"

namespace icecache {

// Counts what the data plane and the index report into the daemon's metrics. Children are
// created once here; the callbacks only increment.
class DaemonObserver final : public DataPlaneObserver {
 public:
  explicit DaemonObserver(Metrics* m) {
    const auto& lat = Metrics::LatencyBuckets();
    build_ =
        m->Histogram("icecache_index_build_seconds",
                     "Time to build one layer's index (every KV head) from a prefill", {}, lat);
    insert_ = m->Histogram("icecache_index_insert_seconds",
                           "Time to insert one window page into a layer (every KV head)", {}, lat);
    select_ =
        m->Histogram("icecache_select_seconds",
                     "Time to select one layer's pages (every KV head), in the daemon", {}, lat);
    build_tokens_ = m->Counter("icecache_index_built_tokens_total",
                               "Tokens indexed by prefills (summed over KV heads)", {});
    insert_tokens_ = m->Counter("icecache_index_inserted_tokens_total",
                                "Tokens inserted by appends (summed over KV heads)", {});
    recall_ = m->Histogram(
        "icecache_select_recall",
        "Sampled attention recall of selected pages: the share of the exact softmax mass over "
        "the offloaded tokens that lies on the returned pages",
        {}, {0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 1.0});
    attach_ok_ =
        m->Counter("icecache_attach_total", "Attach attempts by result", {{"result", "ok"}});
    attach_refused_ =
        m->Counter("icecache_attach_total", "Attach attempts by result", {{"result", "refused"}});
    detach_ = m->Counter("icecache_detach_total", "Clients detached (exit, crash or close)", {});
    protocol_errors_ = m->Counter("icecache_protocol_errors_total",
                                  "Queue entries or slots a client submitted that could not be "
                                  "answered (bad index, wrong state)",
                                  {});
    evicted_ = m->Counter("icecache_clients_evicted_total",
                          "Clients the daemon detached because they kept making protocol errors",
                          {{"reason", "protocol_errors"}});
    for (uint32_t op = 0; op < abi::kNumOps; ++op) {
      auto& per = ops_[op];
      per.latency =
          m->Histogram("icecache_data_request_seconds", "Data-plane request handling time, by op",
                       {{"op", abi::OpName(op)}}, lat);
      for (int code = 0; code < Metrics::kNumStatusCodes; ++code) {
        per.by_code[code] = m->Counter("icecache_data_requests_total",
                                       "Data-plane requests answered, by op and status code",
                                       {{"op", abi::OpName(op)}, {"code", StatusCodeName(code)}});
      }
    }
  }
  void OnBuild(double seconds, uint64_t tokens) override {
    build_->Observe(seconds);
    build_tokens_->Increment(static_cast<double>(tokens));
  }
  void OnInsert(double seconds, uint64_t tokens) override {
    insert_->Observe(seconds);
    insert_tokens_->Increment(static_cast<double>(tokens));
  }
  void OnSelect(double seconds) override { select_->Observe(seconds); }
  void OnRecallSample(double recall) override { recall_->Observe(recall); }
  void OnAttach(bool ok) override { (ok ? attach_ok_ : attach_refused_)->Increment(); }
  void OnDetach() override { detach_->Increment(); }
  void OnProtocolError() override { protocol_errors_->Increment(); }
  void OnClientEvicted() override { evicted_->Increment(); }
  void OnRequest(uint32_t op, int code, double seconds) override {
    if (op >= abi::kNumOps) return;  // unknown ops are counted as protocol errors
    if (code < 0 || code >= Metrics::kNumStatusCodes) code = 2;
    ops_[op].by_code[code]->Increment();
    ops_[op].latency->Observe(seconds);
  }

 private:
  struct PerOp {
    prometheus::Histogram* latency = nullptr;
    std::array<prometheus::Counter*, Metrics::kNumStatusCodes> by_code{};
  };
  prometheus::Histogram* build_;
  prometheus::Histogram* insert_;
  prometheus::Histogram* select_;
  prometheus::Histogram* recall_;
  prometheus::Counter* build_tokens_;
  prometheus::Counter* insert_tokens_;
  prometheus::Counter* attach_ok_;
  prometheus::Counter* attach_refused_;
  prometheus::Counter* detach_;
  prometheus::Counter* protocol_errors_;
  prometheus::Counter* evicted_;
  std::array<PerOp, abi::kNumOps> ops_;
};

namespace {

constexpr const char* kServiceName = "icecache.v1.IceCache";
// The control transport's bounds (see BuildAndStart below). The largest request a client
// library sends is a RestoreSequence: a history of a few runs per layer, kilobytes.
constexpr uint32_t kControlStreamsPerConnection = 16;
constexpr uint64_t kMaxControlMessageBytes = uint64_t{1} << 20;
constexpr size_t kControlTransportBytes = size_t{64} << 20;

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Whether host:port names a loopback address (127.0.0.0/8, [::1], localhost).
bool IsLoopback(const std::string& address) {
  const size_t colon = address.rfind(':');
  std::string host = colon == std::string::npos ? address : address.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  return host == "localhost" || host == "::1" || absl::StartsWith(host, "127.");
}

absl::Status ValidateTcpSecurity(const DaemonOptions& o) {
  const bool tls = !o.tls_cert_path.empty() || !o.tls_key_path.empty();
  if (tls && (o.tls_cert_path.empty() || o.tls_key_path.empty())) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  if (!o.tls_client_ca_path.empty() && !tls) {
    return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key");
  }
  if ((tls || o.tcp_insecure) && o.tcp_address.empty()) {
    return absl::InvalidArgumentError("--tls-cert, --tls-key and --tcp-insecure need --tcp");
  }
  if (o.tcp_insecure && tls) {
    return absl::InvalidArgumentError("--tcp-insecure and --tls-cert exclude each other");
  }
  if (o.tcp_insecure && !IsLoopback(o.tcp_address)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tcp-insecure serves the control API in plaintext and is allowed on a loopback "
        "address only (127.0.0.1, [::1], localhost), not on ",
        o.tcp_address, "; use --tls-cert and --tls-key"));
  }
  for (const std::string* f : {&o.tls_cert_path, &o.tls_key_path, &o.tls_client_ca_path}) {
    if (!f->empty() && ReadWholeFile(*f).empty()) {
      return absl::InvalidArgumentError(absl::StrCat("cannot read ", *f, " (or it is empty)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> TcpCredentials(const DaemonOptions& o) {
  if (o.tls_cert_path.empty()) {
    if (!o.tcp_insecure) {
      ICECACHE_LOG(WARNING) << "--tcp=" << o.tcp_address
                            << " without TLS: it serves health and reflection only (control "
                               "calls get UNAUTHENTICATED); give --tls-cert and --tls-key";
    }
    return grpc::InsecureServerCredentials();
  }
  grpc::SslServerCredentialsOptions ssl(
      o.tls_client_ca_path.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                   : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_key_cert_pairs.push_back({ReadWholeFile(o.tls_key_path), ReadWholeFile(o.tls_cert_path)});
  if (!o.tls_client_ca_path.empty()) ssl.pem_root_certs = ReadWholeFile(o.tls_client_ca_path);
  return grpc::SslServerCredentials(ssl);
}

// Resident set size of this process in bytes (0 if /proc is unreadable).
double ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t pages_total = 0, pages_resident = 0;
  if (!(statm >> pages_total >> pages_resident)) return 0;
  return static_cast<double>(pages_resident) * static_cast<double>(::getpagesize());
}

}  // namespace

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const DaemonOptions& options,
                                                      const Clock* clock) {
  if (options.memory_limit_bytes == 0) {
    return absl::InvalidArgumentError("--memory-limit must be positive");
  }
  if (options.metrics_port < -1 || options.metrics_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-port must be -1 (off), 0 (any free port) or 1..65535, got ",
                     options.metrics_port));
  }
  if (options.shutdown_grace < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--shutdown-grace must not be negative");
  }
  absl::StatusOr<selection::IndexSpec> index_spec = selection::Preset(options.index_preset);
  if (!index_spec.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--index-preset: ", index_spec.status().message()));
  }
  if (options.segment_bytes < (uint64_t{1} << 20) || options.segment_bytes > (uint64_t{1} << 36)) {
    return absl::InvalidArgumentError("--segment-size must be in 1MiB..64GiB");
  }
  if (options.max_clients == 0) return absl::InvalidArgumentError("--max-clients must be positive");
  if (options.max_clients_per_uid == 0 || options.max_pending_attaches_per_uid == 0 ||
      options.max_control_connections_per_uid == 0) {
    return absl::InvalidArgumentError(
        "--max-clients-per-uid, --max-pending-attaches-per-uid and "
        "--max-control-connections-per-uid must be positive");
  }
  if (options.handshake_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--handshake-timeout must be positive");
  }
  if (!(options.control_rate >= 0)) {
    return absl::InvalidArgumentError("--control-rate must not be negative");
  }
  ICECACHE_RETURN_IF_ERROR(ValidateTcpSecurity(options));
  const std::string attach_path = options.attach_socket_path.empty()
                                      ? AttachSocketPath(options.socket_path)
                                      : options.attach_socket_path;
  if (attach_path.size() > MaxSocketPathLength()) {
    return absl::InvalidArgumentError(
        absl::StrCat("attach socket path '", attach_path, "' is too long for a unix socket"));
  }
  ICECACHE_RETURN_IF_ERROR(PrepareSocketDirectory(options.socket_path));

  std::unique_ptr<Daemon> d(new Daemon());
  d->options_ = options;
  ICECACHE_ASSIGN_OR_RETURN(d->lock_, SocketLock::Acquire(options.socket_path));

  const absl::Time start_time = clock->Now();
  // One accountant for --memory-limit: sequences' promises, arenas, the daemon's own share.
  d->accountant_ = std::make_unique<MemoryAccountant>(options.memory_limit_bytes);
  d->metrics_ = std::make_unique<Metrics>(VersionString(), GitCommit());
  d->observer_ = std::make_unique<DaemonObserver>(d->metrics_.get());
  d->pool_ = std::make_unique<ThreadPool>(options.workers);
  d->registry_ = std::make_unique<SequenceRegistry>(d->accountant_.get(), clock);
  DataPlaneOptions dp;
  dp.attach_socket = attach_path;
  dp.allowed_uids.assign(options.allowed_uids.begin(), options.allowed_uids.end());
  dp.operator_uids.assign(options.operator_uids.begin(), options.operator_uids.end());
  dp.socket_access = options.socket_access;
  dp.client_quota = options.client_quota_bytes;
  dp.max_clients = options.max_clients;
  dp.max_clients_per_uid = options.max_clients_per_uid;
  dp.max_pending_attaches_per_uid = options.max_pending_attaches_per_uid;
  dp.handshake_timeout = options.handshake_timeout;
  dp.max_sequences_per_client = options.max_sequences_per_client;
  dp.arena.page_segment_bytes = options.segment_bytes;
  dp.arena.staging_segment_bytes = options.segment_bytes;
  dp.recall_sample_every = options.recall_sample_every;
  dp.poll_spin = options.poll_spin;
  dp.index_spec = *index_spec;
  d->data_plane_ = std::make_unique<DataPlane>(dp, d->registry_.get(), d->accountant_.get(),
                                               d->pool_.get(), d->observer_.get());

  // State gauges are read from the core when Prometheus scrapes.
  using prometheus::MetricType;
  MemoryAccountant* acc = d->accountant_.get();
  SequenceRegistry* reg = d->registry_.get();
  Metrics& m = *d->metrics_;
  m.AddCallback("icecache_memory_used_bytes", "Host bytes accounted to live sequences",
                MetricType::Gauge, [acc] { return static_cast<double>(acc->used()); });
  m.AddCallback("icecache_memory_limit_bytes", "Host bytes the daemon may account (--memory-limit)",
                MetricType::Gauge, [acc] { return static_cast<double>(acc->limit()); });
  m.AddCallback("icecache_memory_rejections_total",
                "Allocations refused with RESOURCE_EXHAUSTED because of the memory limit",
                MetricType::Counter, [acc] { return static_cast<double>(acc->rejections()); });
  m.AddCallback("icecache_sequences", "Live sequences", MetricType::Gauge,
                [reg] { return static_cast<double>(reg->size()); });
  m.AddCallback("icecache_sequences_created_total", "Sequences created since start",
                MetricType::Counter, [reg] { return static_cast<double>(reg->created_total()); });
  m.AddCallback("icecache_sequences_dropped_total", "Sequences dropped since start",
                MetricType::Counter, [reg] { return static_cast<double>(reg->dropped_total()); });
  DataPlane* plane = d->data_plane_.get();
  MemoryAccountant* arenas = d->accountant_.get();
  auto stat = [plane](uint64_t DataPlaneStats::*field) {
    return [plane, field] { return static_cast<double>(plane->Stats().*field); };
  };
  m.AddCallback("icecache_clients", "Attached clients", MetricType::Gauge,
                stat(&DataPlaneStats::clients));
  m.AddCallback("icecache_arena_bytes", "Shared memory held by client arenas (segments)",
                MetricType::Gauge, stat(&DataPlaneStats::arena_bytes));
  m.AddCallback("icecache_arena_segments_max",
                "The most shared-memory segments one attached client's arena has (of 250)",
                MetricType::Gauge, stat(&DataPlaneStats::max_client_segments));
  m.AddCallback("icecache_arena_beyond_promise_segments",
                "Segments the attached clients' arenas added beyond what their sequences were "
                "promised",
                MetricType::Gauge, stat(&DataPlaneStats::beyond_promise_segments));
  m.AddCallback("icecache_arena_limit_bytes", "Limit on arena bytes (--memory-limit)",
                MetricType::Gauge, [arenas] { return static_cast<double>(arenas->limit()); });
  m.AddCallback("icecache_store_page_bytes", "Bytes of page frames in use", MetricType::Gauge,
                stat(&DataPlaneStats::frame_bytes));
  m.AddCallback("icecache_store_pages", "Page frames in use", MetricType::Gauge,
                stat(&DataPlaneStats::pages));
  m.AddCallback("icecache_store_staging_bytes", "Bytes of staging buffers in use",
                MetricType::Gauge, stat(&DataPlaneStats::staging_bytes));
  m.AddCallback("icecache_ring_depth", "Requests submitted and not yet taken, all clients",
                MetricType::Gauge, stat(&DataPlaneStats::queue_depth));
  m.AddCallback("icecache_requests_in_flight", "Requests taken and not yet answered",
                MetricType::Gauge, stat(&DataPlaneStats::in_flight));
  m.AddCallback("icecache_client_cache_hits_total",
                "Selected pages already resident in clients' GPU page caches (client-published)",
                MetricType::Counter, stat(&DataPlaneStats::cache_hits));
  m.AddCallback("icecache_client_cache_misses_total",
                "Selected pages clients had to fetch (client-published)", MetricType::Counter,
                stat(&DataPlaneStats::cache_misses));
  m.AddCallback("icecache_client_fetched_bytes_total",
                "Bytes clients moved host to GPU (client-published)", MetricType::Counter,
                stat(&DataPlaneStats::fetched_bytes));
  m.AddCallback("icecache_client_fetch_seconds_total",
                "Time clients spent moving pages (client-published)", MetricType::Counter,
                [plane] { return plane->Stats().fetch_nanoseconds * 1e-9; });
  m.AddCallback("icecache_client_decode_steps_total", "Decode steps clients completed",
                MetricType::Counter, stat(&DataPlaneStats::decode_steps));
  m.AddCallback("icecache_client_prefetched_selects_total",
                "Offloaded layer steps served by a select sent one step ahead (client-published)",
                MetricType::Counter, stat(&DataPlaneStats::prefetched_selects));
  m.AddCallback("icecache_client_drift_fallback_heads_total",
                "KV heads searched again because their query moved too far since the select "
                "sent one step ahead (client-published)",
                MetricType::Counter, stat(&DataPlaneStats::drift_fallback_heads));
  m.AddCallback("icecache_process_start_time_seconds", "Start time of the daemon, Unix seconds",
                MetricType::Gauge, [start_time] { return absl::ToUnixMicros(start_time) / 1e6; });
  m.AddCallback("icecache_process_resident_memory_bytes", "Resident set size of the daemon",
                MetricType::Gauge, [] { return ResidentBytes(); });

  ServiceInfo info;
  info.version = VersionString();
  info.socket_path = options.socket_path;
  info.log_level = options.log_level;
  info.shutdown_grace_seconds = absl::ToDoubleSeconds(options.shutdown_grace);
  info.start_time = start_time;
  info.attach_socket_path = attach_path;
  info.client_quota_bytes =
      options.client_quota_bytes != 0 ? options.client_quota_bytes : options.memory_limit_bytes;
  info.recall_sample_every = options.recall_sample_every;
  info.index_preset = options.index_preset;
  info.control_rate = options.control_rate;
  info.control_burst = std::max(1.0, options.control_rate);
  info.tcp_plaintext_control = options.tcp_insecure;
  info.tcp_tls = !options.tls_cert_path.empty();
  info.tcp_client_auth = !options.tls_client_ca_path.empty();
  info.socket_mode = options.socket_access.mode;
  info.max_sequences_per_client = options.max_sequences_per_client;
  d->service_ = std::make_unique<IceCacheService>(d->registry_.get(), d->accountant_.get(),
                                                  d->data_plane_.get(), d->metrics_.get(), clock,
                                                  std::move(info));
  ICECACHE_RETURN_IF_ERROR(d->data_plane_->Start());

  if (options.metrics_port >= 0) {
    ICECACHE_RETURN_IF_ERROR(
        d->metrics_->StartExposer(absl::StrCat(options.metrics_host, ":", options.metrics_port)));
    d->metrics_port_ = d->metrics_->exposer_port();
  }

  // The control socket is accepted here, not by gRPC: each connection's peer credentials are
  // read first, then it is handed to the server (server/service/control_listener.h).
  ControlListener::Options lo;
  lo.path = options.socket_path;
  lo.access = options.socket_access;
  lo.max_connections_per_uid = options.max_control_connections_per_uid;
  lo.preface_timeout = options.handshake_timeout;
  ICECACHE_ASSIGN_OR_RETURN(d->control_listener_, ControlListener::Listen(lo));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int tcp_port = 0;
  if (!options.tcp_address.empty()) {
    ICECACHE_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds,
                              TcpCredentials(options));
    builder.AddListeningPort(options.tcp_address, creds, &tcp_port);
  }
  builder.RegisterService(d->service_.get());
  // What a control connection can make the daemon hold before any handler sees a call (no
  // token is checked before a message is whole): gRPC buffers every stream's partial message,
  // so streams per connection, message size and the transport's memory are bounded here. An
  // unauthenticated peer with 1000 streams of unfinished 4 MB messages on one connection took
  // the daemon from 17 MiB to 3.6 GiB, past any --memory-limit (docs/data_plane.md, Memory).
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             static_cast<int>(kControlStreamsPerConnection));
  builder.SetMaxReceiveMessageSize(static_cast<int>(kMaxControlMessageBytes));
  grpc::ResourceQuota quota("icecached-control");
  quota.Resize(kControlTransportBytes);
  builder.SetResourceQuota(quota);
  d->server_ = builder.BuildAndStart();
  if (d->server_ == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve gRPC", options.tcp_address.empty() ? "" : " on ",
                     options.tcp_address, " (address in use or not permitted)"));
  }
  d->control_listener_->Serve(d->server_.get());
  if (!options.tcp_address.empty()) {
    if (tcp_port == 0) {
      d->server_->Shutdown();
      return absl::UnavailableError(absl::StrCat("cannot listen on ", options.tcp_address));
    }
    const size_t colon = options.tcp_address.rfind(':');
    d->tcp_address_ = absl::StrCat(options.tcp_address.substr(0, colon), ":", tcp_port);
  }
  d->service_->SetListening(d->tcp_address_, d->metrics_port_, d->control_listener_.get());
  ControlListener* listener = d->control_listener_.get();
  m.AddCallback("icecache_control_connections_refused_total",
                "Control socket connections closed at accept: their uid held "
                "--max-control-connections-per-uid already",
                MetricType::Counter,
                [listener] { return static_cast<double>(listener->refused()); });
  m.AddCallback("icecache_control_preface_timeouts_total",
                "Control socket connections closed because they had not begun HTTP/2 within "
                "--handshake-timeout",
                MetricType::Counter,
                [listener] { return static_cast<double>(listener->preface_timeouts()); });
  m.AddCallback("icecache_control_bad_prefaces_total",
                "Control socket connections closed because they began with something other "
                "than HTTP/2, or closed before they began",
                MetricType::Counter,
                [listener] { return static_cast<double>(listener->bad_prefaces()); });
  grpc::HealthCheckServiceInterface* health = d->server_->GetHealthCheckService();
  if (health != nullptr) {
    health->SetServingStatus(kServiceName, true);
    health->SetServingStatus(true);
  }
  d->running_ = true;

  ICECACHE_LOG(INFO) << "icecached " << VersionString() << " serving unix:" << options.socket_path
                     << (d->tcp_address_.empty() ? "" : " and " + d->tcp_address_) << "; metrics "
                     << (options.metrics_port < 0
                             ? std::string("off")
                             : absl::StrCat("on ", options.metrics_host, ":", d->metrics_port_))
                     << "; memory limit " << options.memory_limit_bytes << " bytes";
  return d;
}

void Daemon::Shutdown() {
  if (!running_) return;
  running_ = false;
  ICECACHE_LOG(INFO) << "shutting down: draining in-flight requests and RPCs (grace "
                     << absl::FormatDuration(options_.shutdown_grace) << ")";
  const absl::Time deadline = absl::Now() + options_.shutdown_grace;
  // Health reports NOT_SERVING while the server still answers it: a probe or a client sees
  // the daemon going away, not a refused connection.
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health != nullptr) health->Shutdown();  // every service reports NOT_SERVING
  service_->StartDraining();                  // new control calls: UNAVAILABLE "shutting down"
  // Data-plane requests: new ones are answered UNAVAILABLE "shutting down", attaches are
  // refused, and those in flight (prefills, appends, selects) get the grace to finish.
  data_plane_->Drain(deadline - absl::Now());
  control_listener_->Stop();  // no new control connections
  server_->Shutdown(absl::ToChronoTime(std::max(deadline, absl::Now())));
  server_->Wait();
  ICECACHE_LOG(DEBUG) << "gRPC server stopped";
  data_plane_->Stop();  // detaches every client, frees their arenas
  ICECACHE_LOG(DEBUG) << "data plane stopped";
  metrics_->StopExposer();
  ICECACHE_LOG(DEBUG) << "metrics endpoint stopped";
  lock_.reset();  // removes the socket and lock files
  ICECACHE_LOG(INFO) << "shutdown complete";
}

Daemon::~Daemon() { Shutdown(); }

}  // namespace icecache
