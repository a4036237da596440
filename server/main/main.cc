// icecached: the IceCache host daemon. See README.md and `icecached --help`.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/build_info.h"
#include "common/bytes.h"
#include "common/flags_compat.h"
#include "common/log.h"
#include "common/paths.h"
#include "server/core/clock.h"
#include "server/main/daemon.h"
#include "server/main/system_memory.h"

ABSL_FLAG(std::string, socket, icecache::DefaultSocketPath(),
          "Unix socket of the control API (and, later, of client attach). Default: "
          "$ICECACHE_SOCKET, else /run/icecache/icecached.sock for root, else "
          "$XDG_RUNTIME_DIR/icecache/icecached.sock, else /tmp/icecache-<uid>/icecached.sock.");
ABSL_FLAG(std::string, tcp, "",
          "Also serve the control API on this TCP address, host:port (port 0 picks one). "
          "Unauthenticated: bind it to loopback or a pod IP only. Empty: no TCP listener.");
ABSL_FLAG(int, metrics_port, icecache::kDefaultMetricsPort,
          "Port of the Prometheus /metrics endpoint; 0 picks a free port, -1 turns it off.");
ABSL_FLAG(std::string, metrics_host, "0.0.0.0", "Address the /metrics endpoint binds to.");
ABSL_FLAG(icecache::ByteSize, memory_limit, icecache::ByteSize{0},
          "Host memory the daemon may promise to sequences, e.g. 64GiB. Default (0): half of "
          "the memory available to the process (physical memory or the cgroup limit).");
ABSL_FLAG(absl::Duration, shutdown_grace, absl::Seconds(10),
          "On SIGTERM/SIGINT, time in-flight RPCs get to finish before they are cancelled.");
ABSL_FLAG(std::string, log_level, "info", "Minimum log severity: debug, info, warning, error.");

namespace {

int Fail(const std::string& message) {
  std::fprintf(stderr, "icecached: %s\n", message.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  absl::FlagsUsageConfig usage;
  usage.version_string = [] { return "icecached " + icecache::VersionString() + "\n"; };
  usage.normalize_filename = [](absl::string_view f) { return std::string(f); };
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "IceCache host daemon: keeps long-context KV caches in host memory and serves page "
      "selections.\nUsage: icecached [--flag=value ...]   (dashes and underscores in flag "
      "names are interchangeable: --memory-limit = --memory_limit)");

  std::vector<std::string> args = icecache::NormalizeFlagNames(argc, argv);
  std::vector<char*> ptrs = icecache::ArgvPointers(args);
  std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(args.size()), ptrs.data());
  if (positional.size() > 1) {
    return Fail(absl::StrCat("unexpected argument '", positional[1],
                             "'; icecached takes only --flags (see --help)"));
  }

  icecache::LogSeverity severity;
  const std::string log_level = absl::GetFlag(FLAGS_log_level);
  if (!icecache::ParseLogSeverity(log_level, &severity)) {
    return Fail(absl::StrCat("--log-level must be debug, info, warning or error, got '",
                             log_level, "'"));
  }
  icecache::SetMinLogSeverity(severity);

  absl::StatusOr<uint64_t> available = icecache::AvailableMemoryBytes();
  if (!available.ok()) return Fail(std::string(available.status().message()));
  uint64_t limit = absl::GetFlag(FLAGS_memory_limit).bytes;
  if (limit == 0) {
    limit = *available / 2;
  } else if (limit > *available) {
    return Fail(absl::StrCat("--memory-limit=", icecache::FormatBytes(limit),
                             " exceeds the memory available to this process (",
                             icecache::FormatBytes(*available),
                             "); the kernel would kill the daemon before the limit is reached"));
  }

  icecache::DaemonOptions options;
  options.socket_path = absl::GetFlag(FLAGS_socket);
  options.tcp_address = absl::GetFlag(FLAGS_tcp);
  options.metrics_host = absl::GetFlag(FLAGS_metrics_host);
  options.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  options.memory_limit_bytes = limit;
  options.shutdown_grace = absl::GetFlag(FLAGS_shutdown_grace);
  options.log_level = log_level;

  // Block the shutdown signals in every thread (gRPC's threads inherit this mask) and take
  // them synchronously below. SIGPIPE from a vanished peer must never kill the daemon.
  sigset_t shutdown_signals;
  sigemptyset(&shutdown_signals);
  sigaddset(&shutdown_signals, SIGTERM);
  sigaddset(&shutdown_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &shutdown_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  absl::StatusOr<std::unique_ptr<icecache::Daemon>> daemon =
      icecache::Daemon::Start(options, icecache::RealClock::Get());
  if (!daemon.ok()) return Fail(std::string(daemon.status().message()));

  int sig = 0;
  sigwait(&shutdown_signals, &sig);
  ICECACHE_LOG(INFO) << "received " << (sig == SIGTERM ? "SIGTERM" : "SIGINT");
  (*daemon)->Shutdown();
  daemon->reset();
  return 0;
}
