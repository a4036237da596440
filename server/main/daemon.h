// icecached's composition root: builds the core, the metrics, the gRPC server and the
// listeners from DaemonOptions, and tears them down in order on Shutdown.
//
// Thread safety: Start and Shutdown are called from the main thread; the objects built here
// are used concurrently by gRPC's threads and are thread-safe themselves.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/paths.h"
#include "selection/index_factory.h"

namespace grpc {
class Server;
}

namespace icecache {

class Metrics;
class MemoryAccountant;
class SequenceRegistry;
class IceCacheService;
class SocketLock;
class Clock;
class ThreadPool;
class DataPlane;
class DaemonObserver;
class ControlListener;

struct DaemonOptions {
  // Unix socket for the control API (absolute path).
  std::string socket_path;
  // Optional TCP listener for the control API, "host:port" (port 0 picks one); "" for none.
  // With tls_cert_path and tls_key_path it serves TLS (mutual TLS with tls_client_ca_path:
  // clients must present a certificate that CA signed). Without TLS it serves health and
  // reflection only, unless tcp_insecure, which needs a loopback address.
  std::string tcp_address;
  std::string tls_cert_path;
  std::string tls_key_path;
  std::string tls_client_ca_path;
  bool tcp_insecure = false;
  // Mode and group of both unix sockets (control and attach).
  SocketAccess socket_access;
  // Metrics endpoint: host to bind and port; port -1 disables it, 0 picks a free port.
  std::string metrics_host = "0.0.0.0";
  int metrics_port = 9464;
  // Host bytes the daemon may promise to sequences.
  uint64_t memory_limit_bytes = 0;
  // Time in-flight RPCs get to finish after Shutdown begins.
  absl::Duration shutdown_grace = absl::Seconds(10);
  std::string log_level = "info";

  // ---- data plane
  // Attach socket; empty: derived from socket_path (AttachSocketPath).
  std::string attach_socket_path;
  std::vector<uint32_t> allowed_uids;   // empty: the daemon's own uid
  std::vector<uint32_t> operator_uids;  // empty: the daemon's own uid
  uint64_t client_quota_bytes = 0;      // 0: the memory limit
  uint32_t max_clients = 256;
  uint32_t max_clients_per_uid = 64;
  uint32_t max_pending_attaches_per_uid = 8;
  absl::Duration handshake_timeout = absl::Seconds(2);
  uint32_t max_sequences_per_client = 1024;
  // Control calls per second per caller (uid, or TCP host); 0: no limit.
  double control_rate = 1000;
  uint32_t max_control_connections_per_uid = 64;
  uint64_t segment_bytes = uint64_t{64} << 20;
  uint32_t workers = 0;  // 0: every core
  uint32_t recall_sample_every = 64;
  absl::Duration poll_spin = absl::Microseconds(50);
  // A preset of selection/index_factory.h (INVALID_ARGUMENT for an unknown name).
  std::string index_preset = std::string(selection::kDefaultPreset);
};

class Daemon {
 public:
  // Validates `options`, takes the socket lock, binds every listener and starts serving.
  // Errors: INVALID_ARGUMENT for bad options, FAILED_PRECONDITION when another daemon owns
  // the socket, UNAVAILABLE when a listener cannot be bound.
  static absl::StatusOr<std::unique_ptr<Daemon>> Start(const DaemonOptions& options,
                                                       const Clock* clock);

  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;
  ~Daemon();  // Shutdown() if still running.

  // Health turns NOT_SERVING (and stays reachable through the grace), new control calls and
  // data-plane requests get UNAVAILABLE "shutting down", requests and RPCs in flight get the
  // grace period to finish, then the listeners close, the metrics endpoint stops, and the
  // socket and lock files are removed. Idempotent.
  void Shutdown();

  const std::string& tcp_address() const { return tcp_address_; }
  int metrics_port() const { return metrics_port_; }

 private:
  Daemon() = default;

  DaemonOptions options_;
  std::string tcp_address_;
  int metrics_port_ = 0;
  std::unique_ptr<SocketLock> lock_;
  std::unique_ptr<MemoryAccountant> accountant_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<DaemonObserver> observer_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<SequenceRegistry> registry_;
  std::unique_ptr<DataPlane> data_plane_;
  std::unique_ptr<IceCacheService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<ControlListener> control_listener_;
  bool running_ = false;
};

}  // namespace icecache
