#include "server/service/control_listener.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "grpcpp/server.h"
#include "grpcpp/server_posix.h"

namespace icecache {

absl::StatusOr<std::unique_ptr<ControlListener>> ControlListener::Listen(const Options& options) {
  sockaddr_un addr{};
  if (options.path.empty() || options.path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("bad control socket path '", options.path, "'"));
  }
  std::unique_ptr<ControlListener> l(new ControlListener(options));
  ::unlink(options.path.c_str());  // stale: the caller holds the socket lock
  l->listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (l->listen_fd_ < 0) return absl::UnavailableError(std::strerror(errno));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, options.path.c_str(), options.path.size());
  if (::bind(l->listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(l->listen_fd_, 128) != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.path, ": ", std::strerror(errno)));
  }
  absl::Status access = ApplySocketAccess(options.path, options.access);
  if (!access.ok()) {
    ::unlink(options.path.c_str());
    return access;
  }
  l->stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  // The rotating descriptor range: the upper half of the limit, raised to its hard maximum.
  struct rlimit lim {};
  if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    const rlim_t want = std::min<rlim_t>(lim.rlim_max, 1 << 20);
    if (want > lim.rlim_cur) {
      struct rlimit raised = lim;
      raised.rlim_cur = want;
      if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) lim = raised;
    }
  }
  const int limit = static_cast<int>(std::min<rlim_t>(lim.rlim_cur, 1 << 20));
  l->range_begin_ = limit / 2;
  l->range_end_ = limit;
  l->cursor_ = l->range_begin_;
  return l;
}

ControlListener::~ControlListener() {
  Stop();
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

void ControlListener::Serve(grpc::Server* server) {
  server_ = server;
  thread_ = std::thread([this] { AcceptLoop(); });
}

void ControlListener::Stop() {
  if (stopped_.exchange(true)) return;
  if (thread_.joinable()) {
    const uint64_t one = 1;
    (void)!::write(stop_fd_, &one, sizeof(one));
    thread_.join();
  }
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    listen_fd_ = -1;
    ::unlink(options_.path.c_str());
  }
}

void ControlListener::AcceptLoop() {
  while (true) {
    struct pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0 && errno != EINTR) {
      ICECACHE_LOG(ERROR) << "control accept poll: " << std::strerror(errno);
      continue;
    }
    if (fds[1].revents & POLLIN) return;
    if (fds[0].revents & POLLIN) AcceptOne();
  }
}

int ControlListener::Rotate(int fd) {
  if (range_end_ - range_begin_ < 64) return fd;
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (cursor_ >= range_end_) cursor_ = range_begin_;
    const int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, cursor_);
    if (moved >= 0) {
      ::close(fd);
      cursor_ = moved + 1;
      return moved;
    }
    cursor_ = range_begin_;  // EMFILE/EINVAL above the cursor: wrap around
  }
  return fd;
}

bool ControlListener::Alive(int fd, const Connection& c) const {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_ino == c.inode;
}

void ControlListener::AcceptOne() {
  for (int batch = 0; batch < 64; ++batch) {
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (AcceptShedder::OutOfDescriptors(errno)) {
        // Shed, or the backlog's connection makes poll spin: a pause when even that fails.
        if (shedder_.Shed(listen_fd_, "control")) continue;
        absl::SleepFor(absl::Milliseconds(50));
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        ICECACHE_LOG(WARNING) << "control accept: " << std::strerror(errno);
      }
      return;
    }
    struct ucred cred {};
    socklen_t len = sizeof(cred);
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      ::close(fd);
      continue;
    }
    fd = Rotate(fd);
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      continue;
    }
    {
      absl::MutexLock lock(&mu_);
      // Forget connections gRPC has closed; count this uid's open ones.
      uint32_t of_uid = 0;
      for (auto it = connections_.begin(); it != connections_.end();) {
        if (!Alive(it->first, it->second)) {
          connections_.erase(it++);
          continue;
        }
        of_uid += it->second.cred.uid == cred.uid ? 1 : 0;
        ++it;
      }
      if (of_uid >= options_.max_connections_per_uid) {
        ::close(fd);
        refused_.fetch_add(1);
        ICECACHE_LOG(WARNING) << "control connection of uid " << cred.uid << " (pid " << cred.pid
                              << ") refused: it holds " << of_uid << " already";
        continue;
      }
      connections_[fd] = Connection{PeerCredentials{cred.uid, cred.gid, cred.pid}, st.st_ino};
    }
    // gRPC owns the descriptor from here (and closes it when the connection ends).
    grpc::AddInsecureChannelFromFd(server_, fd);
  }
}

std::optional<PeerCredentials> ControlListener::PeerOf(absl::string_view peer) const {
  if (!absl::ConsumePrefix(&peer, "fd:")) return std::nullopt;
  int fd = -1;
  if (!absl::SimpleAtoi(peer, &fd) || fd < 0) return std::nullopt;
  absl::MutexLock lock(&mu_);
  auto it = connections_.find(fd);
  if (it == connections_.end() || !Alive(fd, it->second)) return std::nullopt;
  return it->second.cred;
}

}  // namespace icecache
