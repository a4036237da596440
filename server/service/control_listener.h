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
// The preface: a connection is handed to gRPC only once its first 24 bytes are the HTTP/2
// client preface (read with MSG_PEEK, so gRPC still reads them). Until then the accept thread
// holds it, counted against its uid; one that sends anything else is closed at once, and one
// that has not sent the whole preface within preface_timeout is closed then. Without this a
// connection that never spoke kept one of its uid's places for as long as its peer held it
// open (gRPC starts no handshake deadline on a connection handed over by descriptor), so a
// stuck process of the engine's uid could lock the engine out of the control API.
//
// Thread safety: all methods are thread-safe.
#pragma once

#include <poll.h>
#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/accept_shedder.h"
#include "common/log_throttle.h"
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
    absl::Duration preface_timeout = absl::Seconds(2);
    // Connections of every uid held before their preface; more are closed at accept.
    uint32_t max_pending = 1024;
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

  // Connections refused at accept (per-uid limit, or max_pending) since start.
  uint64_t refused() const { return refused_.load(); }
  // Connections closed before gRPC saw them, since start: no whole preface within
  // preface_timeout; something else in its place, or closed by the peer before it.
  uint64_t preface_timeouts() const { return preface_timeouts_.load(); }
  uint64_t bad_prefaces() const { return bad_prefaces_.load(); }

 private:
  struct Connection {
    PeerCredentials cred;
    uint64_t inode = 0;  // the socket's inode: a reused descriptor number has another
  };

  // A connection accepted and not yet handed to gRPC (accept thread only).
  struct Pending {
    int fd = -1;
    Connection conn;
    absl::Time deadline;
    bool partial = false;  // some of the preface came: poll would report it readable again
  };
  enum class Preface { kNothing, kWhole, kPartial, kWrong, kClosed };
  static Preface PeekPreface(int fd);

  explicit ControlListener(const Options& options) : options_(options) {}
  void AcceptLoop();
  void AcceptOne();
  // Hands over, closes or keeps each pending connection whose poll entry fired (or, for a
  // partial preface, on every turn), and closes the ones past their deadline.
  void CheckPending(const struct pollfd* fds, absl::Time now);
  void HandOver(const Pending& p);
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
  std::vector<Pending> pending_;                      // accept thread only
  LogThrottle drop_log_, refuse_log_;
  std::atomic<uint64_t> refused_{0};
  std::atomic<uint64_t> preface_timeouts_{0};
  std::atomic<uint64_t> bad_prefaces_{0};
  std::atomic<bool> stopped_{false};

  mutable absl::Mutex mu_;
  absl::flat_hash_map<int, Connection> connections_ ABSL_GUARDED_BY(mu_);
};

}  // namespace icecache
