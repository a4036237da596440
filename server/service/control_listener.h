// The control API's unix socket, accepted by the daemon itself instead of by gRPC, so that
// every connection's peer credentials (SO_PEERCRED: uid, gid, pid from the kernel) are read
// before gRPC sees a byte of it. Each accepted connection is handed to the gRPC server
// (grpc::AddInsecureChannelFromFd), which names its peer "fd:N" after the descriptor; PeerOf
// maps a call's peer back to the credentials read at accept. This is how a control call is
// tied to the uid that made it (gRPC hands a handler no peer credentials of its own).
//
// Descriptor reuse: gRPC closes a connection's descriptor when the connection ends and the
// kernel hands out the lowest free number next, so a new connection could get the number of
// one that just ended while a call of the old one is still being handled. To keep that from
// ever mapping an old call to a new peer, each accepted connection is moved to a number drawn
// from a rotating range (F_DUPFD at a cursor that cycles through the upper half of the
// descriptor limit, raised to its hard maximum): a number comes back only after the cursor
// has gone once round the range. A handler also checks, after the lookup, that its call was
// not cancelled (a call whose connection ended is).
//
// Limits: a uid may hold max_connections_per_uid connections at once; one more is closed at
// accept, before gRPC reads anything (the client sees UNAVAILABLE).
//
// Thread safety: all methods are thread-safe.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/accept_shedder.h"
#include "common/paths.h"

namespace grpc {
class Server;
}

namespace icecache {

struct PeerCredentials {
  uid_t uid = 0;
  gid_t gid = 0;
  pid_t pid = 0;
};

class ControlListener {
 public:
  struct Options {
    std::string path;     // absolute; a stale file is replaced (the caller holds the lock)
    SocketAccess access;  // mode and group of the socket file
    uint32_t max_connections_per_uid = 64;
  };

  // Binds and listens (nothing is accepted before Serve). UNAVAILABLE when the socket cannot
  // be bound; errors of ApplySocketAccess pass through.
  static absl::StatusOr<std::unique_ptr<ControlListener>> Listen(const Options& options);
  ControlListener(const ControlListener&) = delete;
  ControlListener& operator=(const ControlListener&) = delete;
  ~ControlListener();  // Stop()

  // Starts accepting and handing connections to `server` (which must outlive Stop()).
  void Serve(grpc::Server* server);
  // Stops accepting, closes and removes the socket. Connections already handed over stay
  // with gRPC. Idempotent.
  void Stop();

  // The credentials behind a call's peer string, for a connection accepted here that is still
  // open; nullopt for any other peer (TCP, or unknown).
  std::optional<PeerCredentials> PeerOf(absl::string_view peer) const;

  // Connections refused at accept (per-uid limit) since start.
  uint64_t refused() const { return refused_.load(); }

 private:
  struct Connection {
    PeerCredentials cred;
    uint64_t inode = 0;  // the socket's inode: a reused descriptor number has another
  };

  explicit ControlListener(const Options& options) : options_(options) {}
  void AcceptLoop();
  void AcceptOne();
  // A descriptor number from the rotating range for `fd` (which is closed), or `fd` itself
  // when the range is exhausted.
  int Rotate(int fd);
  bool Alive(int fd, const Connection& c) const;

  const Options options_;
  int listen_fd_ = -1;
  int stop_fd_ = -1;
  grpc::Server* server_ = nullptr;
  std::thread thread_;
  int range_begin_ = 0, range_end_ = 0, cursor_ = 0;  // accept thread only
  AcceptShedder shedder_;                             // accept thread only
  std::atomic<uint64_t> refused_{0};
  std::atomic<bool> stopped_{false};

  mutable absl::Mutex mu_;
  absl::flat_hash_map<int, Connection> connections_ ABSL_GUARDED_BY(mu_);
};

}  // namespace icecache
