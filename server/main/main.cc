// icecached: the IceCache host daemon. See README.md and `icecached --help`.
#include <grp.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/build_info.h"
#include "common/bytes.h"
#include "common/flags_compat.h"
#include "common/log.h"
#include "common/paths.h"
#include "selection/index_factory.h"
#include "server/core/clock.h"
#include "server/main/daemon.h"
#include "server/main/system_memory.h"

ABSL_FLAG(std::string, socket, icecache::DefaultSocketPath(),
          "Unix socket of the control API (and, later, of client attach). Default: "
          "$ICECACHE_SOCKET, else /run/icecache/icecached.sock for root, else "
          "$XDG_RUNTIME_DIR/icecache/icecached.sock, else /tmp/icecache-<uid>/icecached.sock.");
ABSL_FLAG(std::string, tcp, "",
          "Also listen on this TCP address, host:port (port 0 picks one): the control API over "
          "TLS with --tls-cert/--tls-key; without TLS only health and reflection (for gRPC "
          "probes), or the whole control API with --tcp-insecure on a loopback address. Calls "
          "that act for a client (a token) are never served over TCP. Empty: no TCP listener.");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate (chain) the --tcp listener presents; with --tls-key it serves TLS.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA certificate(s): --tcp clients must present a certificate they signed "
          "(mutual TLS). Empty: no client certificate asked.");
ABSL_FLAG(bool, tcp_insecure, false,
          "Serve the control API on --tcp in plaintext. Allowed only on a loopback address.");
ABSL_FLAG(std::string, socket_mode, "0666",
          "File mode (octal) of the control and attach sockets: who may connect. Who may "
          "attach is decided by --allow-uids (SO_PEERCRED) whatever the mode; e.g. 0660 with "
          "--socket-group limits connecting to a group.");
ABSL_FLAG(std::string, socket_group, "",
          "Group (name or gid) of the control and attach sockets. Empty: the daemon's.");
ABSL_FLAG(int, metrics_port, icecache::kDefaultMetricsPort,
          "Port of the Prometheus /metrics endpoint; 0 picks a free port, -1 turns it off.");
ABSL_FLAG(std::string, metrics_host, "0.0.0.0", "Address the /metrics endpoint binds to.");
ABSL_FLAG(icecache::ByteSize, memory_limit, icecache::ByteSize{0},
          "Host memory the daemon may promise to sequences, e.g. 64GiB. Default (0): half of "
          "the memory available to the process (physical memory or the cgroup limit).");
ABSL_FLAG(absl::Duration, shutdown_grace, absl::Seconds(10),
          "On SIGTERM/SIGINT, time in-flight RPCs get to finish before they are cancelled.");
ABSL_FLAG(std::string, log_level, "info", "Minimum log severity: debug, info, warning, error.");
ABSL_FLAG(std::string, attach_socket, "",
          "Unix socket clients attach on (data plane). Default: next to --socket, "
          "<name>.attach.sock.");
ABSL_FLAG(std::string, allow_uids, "",
          "Comma-separated uids allowed to attach (SO_PEERCRED). Default: the daemon's own uid.");
ABSL_FLAG(std::string, operator_uids, "",
          "Comma-separated uids allowed to attach as operators (the icecache CLI, which sees "
          "every client's sequences). Default: the daemon's own uid.");
ABSL_FLAG(icecache::ByteSize, client_quota, icecache::ByteSize{0},
          "Shared memory one client's arena may hold. Default (0): the whole memory limit.");
ABSL_FLAG(uint32_t, max_clients, 256, "Most clients attached at once.");
ABSL_FLAG(uint32_t, max_clients_per_uid, 64, "Most clients of one uid attached at once.");
ABSL_FLAG(uint32_t, max_pending_attaches_per_uid, 8,
          "Attach handshakes one uid may have in progress; more connections are refused at "
          "once, before anything is read from them.");
ABSL_FLAG(absl::Duration, handshake_timeout, absl::Seconds(2),
          "An attach connection that has not sent its request by then is closed, and a control "
          "connection that has not begun HTTP/2 (its 24-byte preface).");
ABSL_FLAG(uint32_t, max_sequences_per_client, 1024, "Most sequences one client holds at once.");
ABSL_FLAG(double, control_rate, 1000,
          "Control calls per second one caller (a uid on the unix socket, a host over TCP) may "
          "make (bursts of as many); above it calls get RESOURCE_EXHAUSTED. 0: no limit.");
ABSL_FLAG(uint32_t, max_control_connections_per_uid, 64,
          "Connections one uid may hold open to the control socket.");
ABSL_FLAG(icecache::ByteSize, segment_size, icecache::ByteSize{uint64_t{64} << 20},
          "Size of an arena segment (a client registers each with CUDA in one call); past 8, "
          "a client's segments grow to an eighth of what its arena holds, up to 32 times this.");
ABSL_FLAG(uint32_t, workers, 0, "Worker threads for builds, inserts and selects (0: every core).");
ABSL_FLAG(uint32_t, recall_sample_every, 64,
          "Also score one select in N exactly, off the critical path, to export the recall of "
          "the pages returned (icecache_select_recall); 0 turns it off.");
ABSL_FLAG(absl::Duration, poll_spin, absl::Microseconds(50),
          "How long a client's dispatcher keeps polling its queue after activity before it "
          "sleeps on the doorbell (lower latency against CPU).");
ABSL_FLAG(std::string, index_preset, std::string(icecache::selection::kDefaultPreset),
          "Index configuration, a preset of selection/index_factory.h: paper (the IceCache "
          "paper's, the reference) or tuned (every improvement option; see docs/index.md).");

namespace {

int Fail(const std::string& message) {
  std::fprintf(stderr, "icecached: %s\n", message.c_str());
  return 2;
}

// "1000,1001" -> {1000, 1001}; false on anything else.
bool ParseUids(const std::string& text, std::vector<uint32_t>* out) {
  out->clear();
  if (text.empty()) return true;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    uint32_t uid;
    if (!absl::SimpleAtoi(part, &uid)) return false;
    out->push_back(uid);
  }
  return true;
}

// "" -> -1 (the daemon's group); a number or a group name -> its gid.
absl::StatusOr<int64_t> ParseGroup(const std::string& text) {
  if (text.empty()) return -1;
  uint32_t gid;
  if (absl::SimpleAtoi(text, &gid)) return gid;
  struct group* g = ::getgrnam(text.c_str());
  if (g == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("--socket-group: no group named '", text, "'"));
  }
  return static_cast<int64_t>(g->gr_gid);
}

}  // namespace

int main(int argc, char** argv) {
  absl::FlagsUsageConfig usage;
  usage.version_string = [] { return "icecached " + icecache::VersionString() + "\n"; };
  usage.normalize_filename = [](absl::string_view f) { return std::string(f); };
  // --help and --helpshort list the daemon's own flags (those defined under server/main/);
  // --helpfull lists every flag linked in.
  usage.contains_help_flags = [](absl::string_view f) {
    return absl::StrContains(f, "server/main/");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
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
    return Fail(
        absl::StrCat("--log-level must be debug, info, warning or error, got '", log_level, "'"));
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
  options.attach_socket_path = absl::GetFlag(FLAGS_attach_socket);
  if (!ParseUids(absl::GetFlag(FLAGS_allow_uids), &options.allowed_uids)) {
    return Fail("--allow-uids must be comma-separated numeric uids");
  }
  if (!ParseUids(absl::GetFlag(FLAGS_operator_uids), &options.operator_uids)) {
    return Fail("--operator-uids must be comma-separated numeric uids");
  }
  options.client_quota_bytes = absl::GetFlag(FLAGS_client_quota).bytes;
  if (options.client_quota_bytes > limit) {
    return Fail("--client-quota must not exceed --memory-limit");
  }
  options.max_clients = absl::GetFlag(FLAGS_max_clients);
  options.max_clients_per_uid = absl::GetFlag(FLAGS_max_clients_per_uid);
  options.max_pending_attaches_per_uid = absl::GetFlag(FLAGS_max_pending_attaches_per_uid);
  options.handshake_timeout = absl::GetFlag(FLAGS_handshake_timeout);
  options.max_sequences_per_client = absl::GetFlag(FLAGS_max_sequences_per_client);
  options.control_rate = absl::GetFlag(FLAGS_control_rate);
  options.max_control_connections_per_uid = absl::GetFlag(FLAGS_max_control_connections_per_uid);
  options.tls_cert_path = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_path = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_path = absl::GetFlag(FLAGS_tls_client_ca);
  options.tcp_insecure = absl::GetFlag(FLAGS_tcp_insecure);
  {
    const std::string mode = absl::GetFlag(FLAGS_socket_mode);
    char* end = nullptr;
    const unsigned long bits = std::strtoul(mode.c_str(), &end, 8);
    if (mode.empty() || *end != '\0' || bits > 0777) {
      return Fail(
          absl::StrCat("--socket-mode must be an octal mode within 0777, got '", mode, "'"));
    }
    options.socket_access.mode = static_cast<uint32_t>(bits);
    absl::StatusOr<int64_t> gid = ParseGroup(absl::GetFlag(FLAGS_socket_group));
    if (!gid.ok()) return Fail(std::string(gid.status().message()));
    options.socket_access.gid = *gid;
  }
  options.segment_bytes = absl::GetFlag(FLAGS_segment_size).bytes;
  options.workers = absl::GetFlag(FLAGS_workers);
  options.recall_sample_every = absl::GetFlag(FLAGS_recall_sample_every);
  options.poll_spin = absl::GetFlag(FLAGS_poll_spin);
  options.index_preset = absl::GetFlag(FLAGS_index_preset);

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
