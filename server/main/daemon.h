// icecached's composition root: builds the core, the metrics, the gRPC server and the
// listeners from DaemonOptions, and tears them down in order on Shutdown.
//
// Thread safety: Start and Shutdown are called from the main thread; the objects built here
// are used concurrently by gRPC's threads and are thread-safe themselves.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

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

struct DaemonOptions {
  // Unix socket for the control API (absolute path).
  std::string socket_path;
  // Optional TCP listener for the control API, "host:port" (port 0 picks one); "" for none.
  std::string tcp_address;
  // Metrics endpoint: host to bind and port; port -1 disables it, 0 picks a free port.
  std::string metrics_host = "0.0.0.0";
  int metrics_port = 9464;
  // Host bytes the daemon may promise to sequences.
  uint64_t memory_limit_bytes = 0;
  // Time in-flight RPCs get to finish after Shutdown begins.
  absl::Duration shutdown_grace = absl::Seconds(10);
  std::string log_level = "info";
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

  // Health turns NOT_SERVING, listeners close, in-flight RPCs get the grace period to finish,
  // the metrics endpoint stops, and the socket and lock files are removed. Idempotent.
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
  std::unique_ptr<SequenceRegistry> registry_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<IceCacheService> service_;
  std::unique_ptr<grpc::Server> server_;
  bool running_ = false;
};

}  // namespace icecache
