#include "common/accept_shedder.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "absl/time/clock.h"
#include "common/log.h"

namespace icecache {

namespace {
int OpenSpare() { return ::open("/dev/null", O_RDONLY | O_CLOEXEC); }
}  // namespace

AcceptShedder::AcceptShedder() : spare_(OpenSpare()) {}

AcceptShedder::~AcceptShedder() {
  if (spare_ >= 0) ::close(spare_);
}

bool AcceptShedder::OutOfDescriptors(int error) { return error == EMFILE || error == ENFILE; }

bool AcceptShedder::Shed(int listen_fd, const char* what) {
  bool shed = false;
  if (spare_ >= 0) {
    ::close(spare_);
    spare_ = -1;
    const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      ::close(fd);
      ++shed_;
      shed = true;
    }
  }
  if (spare_ < 0) spare_ = OpenSpare();
  if (const std::optional<uint64_t> n = log_.Note(absl::Now(), shed ? 1 : 0)) {
    ICECACHE_LOG(WARNING) << what << " accept: out of file descriptors; " << *n
                          << " connections closed unanswered since the last report (" << shed_
                          << " in all)";
  }
  return shed;
}

}  // namespace icecache
