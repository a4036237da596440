// The real icecached binary as a subprocess on a temporary socket, for integration tests,
// with gRPC stubs connected to it over the real unix socket.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/channel.h"
#include "icecache/attachment.h"
#include "icecache/v1/icecache.grpc.pb.h"
#include "tests/support/subprocess.h"

namespace icecache::testing {

// Paths of the binaries under test (set by CMake).
const char* IcecachedBinary();
const char* IcecacheCliBinary();
const char* TestClientBinary();

struct DaemonConfig {
  std::string memory_limit = "1GiB";
  bool tcp = false;                     // also listen on 127.0.0.1:0
  std::vector<std::string> extra_args;  // more flags
  std::vector<std::string> wrapper;     // a command that runs the daemon (e.g. prlimit ...)
};

class DaemonProcess {
 public:
  // Starts the daemon in `dir` (socket dir/icecached.sock, metrics on a free port) and waits
  // until its health service reports SERVING (up to 20 s). Errors carry the daemon's stderr.
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(const std::string& dir,
                                                              const DaemonConfig& config = {});

  const std::string& socket_path() const { return socket_path_; }
  std::string target() const { return "unix:" + socket_path_; }
  int metrics_port() const { return metrics_port_; }
  const std::string& tcp_address() const { return tcp_address_; }
  Subprocess& process() { return process_; }
  const std::string& dir() const { return dir_; }

  // A data-plane attachment to this daemon (a client, or an operator).
  absl::StatusOr<std::unique_ptr<Attachment>> Attach(bool as_operator = false) const;

  icecache::v1::IceCache::Stub& stub() { return *stub_; }
  grpc::health::v1::Health::Stub& health() { return *health_; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }

 private:
  DaemonProcess(Subprocess p) : process_(std::move(p)) {}

  Subprocess process_;
  std::string dir_;
  std::string socket_path_;
  std::string tcp_address_;
  int metrics_port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<icecache::v1::IceCache::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

// A ClientContext with a deadline `seconds` from now (and an attachment token, when given).
std::unique_ptr<grpc::ClientContext> ContextWithDeadline(double seconds = 5);
std::unique_ptr<grpc::ClientContext> ContextWithToken(const std::string& token, double seconds = 5);

// The resident memory of process `pid` now (VmRSS) and at its peak so far (VmHWM), in bytes;
// 0 when unknown.
uint64_t ResidentBytes(pid_t pid);
uint64_t PeakResidentBytes(pid_t pid);

// The value of one series in a Prometheus text exposition ("name" or "name{labels}" exactly
// as exposed); NaN when the series is absent.
double MetricValue(const std::string& exposition, const std::string& series);

// GET http://127.0.0.1:port/path over a plain socket. Returns the body of a 200 response;
// UNAVAILABLE when nothing listens, INTERNAL for any other status line.
absl::StatusOr<std::string> HttpGet(int port, const std::string& path);

}  // namespace icecache::testing
