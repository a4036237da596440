#include "tests/support/daemon_process.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace icecache::testing {

// The build tree's binaries; an environment variable may point elsewhere (bench/gpu/run.sh
// runs prebuilt test binaries from a copied bundle on another machine).
const char* FromEnvOr(const char* env, const char* built) {
  const char* v = std::getenv(env);
  return v != nullptr && *v != '\0' ? v : built;
}
const char* IcecachedBinary() {
  return FromEnvOr("ICECACHE_ICECACHED_BIN", ICECACHE_TEST_ICECACHED_BIN);
}
const char* IcecacheCliBinary() { return FromEnvOr("ICECACHE_CLI_BIN", ICECACHE_TEST_CLI_BIN); }
const char* TestClientBinary() {
  return FromEnvOr("ICECACHE_TEST_CLIENT_BIN", ICECACHE_TEST_CLIENT_BIN);
}

std::unique_ptr<grpc::ClientContext> ContextWithDeadline(double seconds) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  return ctx;
}

std::unique_ptr<grpc::ClientContext> ContextWithToken(const std::string& token, double seconds) {
  auto ctx = ContextWithDeadline(seconds);
  ctx->AddMetadata(abi::kTokenMetadataKey, token);
  return ctx;
}

absl::StatusOr<std::unique_ptr<Attachment>> DaemonProcess::Attach(bool as_operator) const {
  Attachment::Options o;
  o.socket = socket_path_;
  o.as_operator = as_operator;
  return Attachment::Attach(o);
}

absl::StatusOr<std::unique_ptr<DaemonProcess>> DaemonProcess::Start(const std::string& dir,
                                                                    const DaemonConfig& config) {
  const std::string socket = dir + "/icecached.sock";
  std::vector<std::string> argv = {IcecachedBinary(), "--socket=" + socket, "--metrics-port=0",
                                   "--metrics-host=127.0.0.1",
                                   "--memory-limit=" + config.memory_limit};
  if (config.tcp) {
    // The control API over plaintext TCP: loopback only, and only with --tcp-insecure.
    argv.push_back("--tcp=127.0.0.1:0");
    argv.push_back("--tcp-insecure");
  }
  for (const std::string& a : config.extra_args) argv.push_back(a);
  argv.insert(argv.begin(), config.wrapper.begin(), config.wrapper.end());
  absl::StatusOr<Subprocess> proc = Subprocess::Start(argv, dir);
  if (!proc.ok()) return proc.status();

  std::unique_ptr<DaemonProcess> d(new DaemonProcess(std::move(*proc)));
  d->dir_ = dir;
  d->socket_path_ = socket;
  // Fast reconnects: the daemon comes up within milliseconds, the default backoff is 1 s+.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 20);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 20);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 100);
  d->channel_ =
      grpc::CreateCustomChannel("unix:" + socket, grpc::InsecureChannelCredentials(), args);
  d->stub_ = icecache::v1::IceCache::NewStub(d->channel_);
  d->health_ = grpc::health::v1::Health::NewStub(d->channel_);

  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (true) {
    if (!d->process_.Running()) {
      return absl::FailedPreconditionError(
          absl::StrCat("icecached exited during start: ", d->process_.Stderr()));
    }
    if (::access(socket.c_str(), F_OK) == 0) {
      grpc::health::v1::HealthCheckRequest req;
      grpc::health::v1::HealthCheckResponse resp;
      // Waiting for the channel: a call that fails fast while it is in TRANSIENT_FAILURE (the
      // previous daemon's stale socket refused it) leaves it to gRPC's backup poller, which
      // reads the new daemon's SETTINGS only every 5 s.
      std::unique_ptr<grpc::ClientContext> ctx = ContextWithDeadline(1);
      ctx->set_wait_for_ready(true);
      if (d->health_->Check(ctx.get(), req, &resp).ok() &&
          resp.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
        break;
      }
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("icecached not serving after 20 s: ", d->process_.Stderr()));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  icecache::v1::GetConfigResponse cfg;
  grpc::Status s =
      d->stub_->GetConfig(ContextWithDeadline().get(), icecache::v1::GetConfigRequest(), &cfg);
  if (!s.ok()) return absl::InternalError(absl::StrCat("GetConfig: ", s.error_message()));
  d->metrics_port_ = static_cast<int>(cfg.metrics_port());
  d->tcp_address_ = cfg.tcp_address();
  return d;
}

namespace {
// A "Name:   N kB" line of /proc/<pid>/status, in bytes; 0 when absent.
uint64_t StatusBytes(pid_t pid, absl::string_view field) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, field) && line.size() > field.size() + 3 &&
        line[field.size()] == ':') {
      uint64_t kib = 0;
      (void)absl::SimpleAtoi(
          absl::StripAsciiWhitespace(line.substr(field.size() + 1, line.size() - field.size() - 4)),
          &kib);
      return kib << 10;
    }
  }
  return 0;
}
}  // namespace

uint64_t ResidentBytes(pid_t pid) { return StatusBytes(pid, "VmRSS"); }
uint64_t PeakResidentBytes(pid_t pid) { return StatusBytes(pid, "VmHWM"); }

double MetricValue(const std::string& exposition, const std::string& series) {
  size_t at = 0;
  while ((at = exposition.find(series + " ", at)) != std::string::npos) {
    if (at == 0 || exposition[at - 1] == '\n') {
      return std::strtod(exposition.c_str() + at + series.size() + 1, nullptr);
    }
    at += series.size();
  }
  return std::nan("");
}

absl::StatusOr<std::string> HttpGet(int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError("socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return absl::UnavailableError(
        absl::StrCat("connect 127.0.0.1:", port, ": ", std::strerror(errno)));
  }
  const std::string req =
      absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
  if (::write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    ::close(fd);
    return absl::InternalError("short write");
  }
  std::string response;
  char buf[16384];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0) response.append(buf, n);
  ::close(fd);
  const size_t header_end = response.find("\r\n\r\n");
  if (header_end == std::string::npos) return absl::InternalError("no HTTP header");
  const std::string status_line = response.substr(0, response.find("\r\n"));
  if (!absl::StrContains(status_line, " 200")) {
    return absl::InternalError(absl::StrCat("HTTP status: ", status_line));
  }
  return response.substr(header_end + 4);
}

}  // namespace icecache::testing
