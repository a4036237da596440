// Ownership of a control-socket path: one daemon per path.
//
// gRPC unlinks an existing unix socket file before it binds, so a second daemon started on
// the same path would silently steal it. SocketLock prevents that: it holds an flock(2) on
// "<socket>.lock" (containing the owner's pid) for the daemon's lifetime and clears a stale
// socket file only when the lock proves its previous owner is gone.
//
// Thread safety: not thread-safe; owned by the daemon's main thread.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace icecache {

class SocketLock {
 public:
  // Takes the lock for `socket_path` and removes a stale socket file left by a daemon that
  // died. Errors: FAILED_PRECONDITION when another live daemon holds the path (the message
  // names its pid) or when the path exists and is not a socket; UNAVAILABLE / INTERNAL for
  // file-system failures.
  static absl::StatusOr<std::unique_ptr<SocketLock>> Acquire(const std::string& socket_path);

  SocketLock(const SocketLock&) = delete;
  SocketLock& operator=(const SocketLock&) = delete;
  // Removes the socket file (if still ours) and the lock file, then releases the lock.
  ~SocketLock();

  const std::string& lock_path() const { return lock_path_; }

 private:
  SocketLock(std::string socket_path, std::string lock_path, int fd)
      : socket_path_(std::move(socket_path)), lock_path_(std::move(lock_path)), fd_(fd) {}

  std::string socket_path_;
  std::string lock_path_;
  int fd_;
};

}  // namespace icecache
