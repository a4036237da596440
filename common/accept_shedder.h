// Accepting connections when the process is out of descriptors. accept4 then fails with
// EMFILE (or ENFILE) and leaves the connection in the backlog, so poll reports the listening
// socket readable again at once: an accept loop spins on a core and logs every turn. The
// shedder keeps one spare descriptor; on EMFILE it gives the spare up, accepts the pending
// connection and closes it at once (its peer sees the connection closed), and takes the spare
// again.
//
// Thread safety: one shedder per accepting thread.
#pragma once

#include <cstdint>

#include "common/log_throttle.h"

namespace icecache {

class AcceptShedder {
 public:
  AcceptShedder();
  ~AcceptShedder();
  AcceptShedder(const AcceptShedder&) = delete;
  AcceptShedder& operator=(const AcceptShedder&) = delete;

  // Whether accept4 failed for want of descriptors (EMFILE, ENFILE).
  static bool OutOfDescriptors(int error);

  // After such a failure on `listen_fd`: sheds one pending connection as above. False when
  // none could be taken (no spare: the caller should pause before polling again). Logs, at
  // most every 10 s, how many connections `what` (e.g. "control") shed since the last line.
  bool Shed(int listen_fd, const char* what);

  uint64_t shed() const { return shed_; }

 private:
  int spare_ = -1;
  uint64_t shed_ = 0;
  LogThrottle log_;
};

}  // namespace icecache
