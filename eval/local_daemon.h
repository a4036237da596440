// The real icecached (the binary users run) as a child process in a private temporary
// directory, for the benchmarks and the demo: started with a socket there, metrics and recall
// sampling off unless flags say otherwise; stopped (SIGTERM, then reaped) and the directory
// removed when the object goes. The child also receives SIGTERM when this process dies
// however it ends, so it never outlives its parent or holds its output pipe open.
//
// Thread safety: none (one owner).
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace icecache::eval {

class LocalDaemon {
 public:
  // Starts `binary` (IcecachedPath() decides which) with `extra_flags` after the defaults and
  // returns once a client can attach. UNAVAILABLE (with the path) when it does not come up
  // within `timeout`; INTERNAL when the directory cannot be made or fork fails.
  static absl::StatusOr<std::unique_ptr<LocalDaemon>> Start(
      const std::string& binary, const std::vector<std::string>& extra_flags = {},
      absl::Duration timeout = absl::Seconds(10));
  ~LocalDaemon();
  LocalDaemon(const LocalDaemon&) = delete;
  LocalDaemon& operator=(const LocalDaemon&) = delete;

  const std::string& socket() const { return socket_; }
  pid_t pid() const { return pid_; }

  // Ends the daemon with `signal` (SIGKILL: a crash; SIGTERM: a planned stop), reaps it, and
  // starts the same binary with the same flags on the same socket (a successor), returning
  // once a client can attach. Errors as Start.
  absl::Status Restart(int signal, absl::Duration timeout = absl::Seconds(10));

 private:
  LocalDaemon() = default;
  absl::Status Spawn(absl::Duration timeout);
  std::vector<std::string> args_;
  pid_t pid_ = -1;
  std::string dir_;
  std::string socket_;
};

// `built` unless the environment variable ICECACHE_ICECACHED_BIN names another binary
// (bench/gpu/run.sh runs a copied bundle on another machine).
std::string IcecachedPath(const char* built);

}  // namespace icecache::eval
