#include "server/main/daemon.h"

#include <sys/resource.h>

#include <chrono>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/build_info.h"
#include "common/log.h"
#include "common/paths.h"
#include "common/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "server/core/clock.h"
#include "server/core/memory_accountant.h"
#include "server/core/sequence_registry.h"
#include "server/main/socket_lock.h"
#include "server/metrics/metrics.h"
#include "server/service/icecache_service.h"

namespace icecache {
namespace {

constexpr const char* kServiceName = "icecache.v1.IceCache";

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
    return absl::InvalidArgumentError(absl::StrCat(
        "--metrics-port must be -1 (off), 0 (any free port) or 1..65535, got ",
        options.metrics_port));
  }
  if (options.shutdown_grace < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--shutdown-grace must not be negative");
  }
  ICECACHE_RETURN_IF_ERROR(PrepareSocketDirectory(options.socket_path));

  std::unique_ptr<Daemon> d(new Daemon());
  d->options_ = options;
  ICECACHE_ASSIGN_OR_RETURN(d->lock_, SocketLock::Acquire(options.socket_path));

  const absl::Time start_time = clock->Now();
  d->accountant_ = std::make_unique<MemoryAccountant>(options.memory_limit_bytes);
  d->registry_ = std::make_unique<SequenceRegistry>(d->accountant_.get(), clock);
  d->metrics_ = std::make_unique<Metrics>(VersionString(), GitCommit());

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
  m.AddCallback("icecache_process_start_time_seconds", "Start time of the daemon, Unix seconds",
                MetricType::Gauge,
                [start_time] { return absl::ToUnixMicros(start_time) / 1e6; });
  m.AddCallback("icecache_process_resident_memory_bytes", "Resident set size of the daemon",
                MetricType::Gauge, [] { return ResidentBytes(); });

  ServiceInfo info;
  info.version = VersionString();
  info.socket_path = options.socket_path;
  info.log_level = options.log_level;
  info.shutdown_grace_seconds = absl::ToDoubleSeconds(options.shutdown_grace);
  info.start_time = start_time;
  d->service_ = std::make_unique<IceCacheService>(d->registry_.get(), d->accountant_.get(),
                                                  d->metrics_.get(), clock, std::move(info));

  if (options.metrics_port >= 0) {
    ICECACHE_RETURN_IF_ERROR(d->metrics_->StartExposer(
        absl::StrCat(options.metrics_host, ":", options.metrics_port)));
    d->metrics_port_ = d->metrics_->exposer_port();
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort("unix:" + options.socket_path, grpc::InsecureServerCredentials());
  int tcp_port = 0;
  if (!options.tcp_address.empty()) {
    builder.AddListeningPort(options.tcp_address, grpc::InsecureServerCredentials(), &tcp_port);
  }
  builder.RegisterService(d->service_.get());
  d->server_ = builder.BuildAndStart();
  if (d->server_ == nullptr) {
    return absl::UnavailableError(absl::StrCat(
        "cannot serve gRPC on unix:", options.socket_path,
        options.tcp_address.empty() ? "" : absl::StrCat(" and ", options.tcp_address),
        " (address in use or not permitted)"));
  }
  if (!options.tcp_address.empty()) {
    if (tcp_port == 0) {
      d->server_->Shutdown();
      return absl::UnavailableError(absl::StrCat("cannot listen on ", options.tcp_address));
    }
    const size_t colon = options.tcp_address.rfind(':');
    d->tcp_address_ = absl::StrCat(options.tcp_address.substr(0, colon), ":", tcp_port);
  }
  d->service_->SetListening(d->tcp_address_, d->metrics_port_);
  grpc::HealthCheckServiceInterface* health = d->server_->GetHealthCheckService();
  if (health != nullptr) {
    health->SetServingStatus(kServiceName, true);
    health->SetServingStatus(true);
  }
  d->running_ = true;

  ICECACHE_LOG(INFO) << "icecached " << VersionString() << " serving unix:"
                     << options.socket_path
                     << (d->tcp_address_.empty() ? "" : " and " + d->tcp_address_)
                     << "; metrics "
                     << (options.metrics_port < 0
                             ? std::string("off")
                             : absl::StrCat("on ", options.metrics_host, ":", d->metrics_port_))
                     << "; memory limit " << options.memory_limit_bytes << " bytes";
  return d;
}

void Daemon::Shutdown() {
  if (!running_) return;
  running_ = false;
  ICECACHE_LOG(INFO) << "shutting down: draining in-flight RPCs (grace "
                     << absl::FormatDuration(options_.shutdown_grace) << ")";
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health != nullptr) health->Shutdown();  // every service reports NOT_SERVING
  service_->StartDraining();                  // new calls: UNAVAILABLE, handled, not dropped
  const auto deadline =
      std::chrono::system_clock::now() + absl::ToChronoNanoseconds(options_.shutdown_grace);
  server_->Shutdown(deadline);  // stop accepting; wait for in-flight calls up to deadline
  server_->Wait();
  ICECACHE_LOG(DEBUG) << "gRPC server stopped";
  metrics_->StopExposer();
  ICECACHE_LOG(DEBUG) << "metrics endpoint stopped";
  lock_.reset();  // removes the socket and lock files
  ICECACHE_LOG(INFO) << "shutdown complete";
}

Daemon::~Daemon() { Shutdown(); }

}  // namespace icecache
