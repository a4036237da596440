#include "server/service/control_listener.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
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

namespace {

// RFC 9113 section 3.4: what an HTTP/2 client sends first on a connection.
constexpr char kHttp2Preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
constexpr size_t kHttp2PrefaceBytes = sizeof(kHttp2Preface) - 1;  // 24
// A connection that sent part of the preface stays readable, so poll cannot wait for the rest:
// it is looked at again this often until it is whole or its deadline passes.
constexpr absl::Duration kPartialRecheck = absl::Milliseconds(20);

}  // namespace

void ControlListener::AcceptLoop() {
  std::vector<struct pollfd> fds;
  while (true) {
    fds.clear();
    fds.push_back({listen_fd_, POLLIN, 0});
    fds.push_back({stop_fd_, POLLIN, 0});
    const absl::Time now = absl::Now();
    absl::Time wake = absl::InfiniteFuture();
    for (const Pending& p : pending_) {
      // A peer that stops writing (POLLRDHUP; hang-ups and errors are reported whatever the
      // events ask for) can no longer complete a partial preface.
      fds.push_back({p.fd, static_cast<short>(p.partial ? POLLRDHUP : POLLIN | POLLRDHUP), 0});
      wake = std::min(wake, p.partial ? std::min(p.deadline, now + kPartialRecheck) : p.deadline);
    }
    int timeout_ms = -1;
    if (wake != absl::InfiniteFuture()) {
      timeout_ms = static_cast<int>(
          std::clamp<int64_t>(absl::ToInt64Milliseconds(wake - now) + 1, 0, 1 << 30));
    }
    if (::poll(fds.data(), fds.size(), timeout_ms) < 0) {
      if (errno != EINTR) {
        ICECACHE_LOG(ERROR) << "control accept poll: " << std::strerror(errno);
        absl::SleepFor(absl::Milliseconds(10));
      }
      continue;
    }
    if (fds[1].revents & POLLIN) {
      for (const Pending& p : pending_) ::close(p.fd);
      pending_.clear();
      return;
    }
    CheckPending(fds.data() + 2, absl::Now());
    if (fds[0].revents & POLLIN) AcceptOne();
  }
}

ControlListener::Preface ControlListener::PeekPreface(int fd) {
  char buf[kHttp2PrefaceBytes];
  const ssize_t n = ::recv(fd, buf, sizeof(buf), MSG_PEEK | MSG_DONTWAIT);
  if (n == 0) return Preface::kClosed;
  if (n < 0) {
    return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? Preface::kNothing
                                                                     : Preface::kClosed;
  }
  if (std::memcmp(buf, kHttp2Preface, static_cast<size_t>(n)) != 0) return Preface::kWrong;
  return static_cast<size_t>(n) == kHttp2PrefaceBytes ? Preface::kWhole : Preface::kPartial;
}

void ControlListener::CheckPending(const struct pollfd* fds, absl::Time now) {
  size_t kept = 0;
  uint64_t dropped = 0;
  PeerCredentials last;
  for (size_t i = 0; i < pending_.size(); ++i) {
    Pending& p = pending_[i];
    if (fds[i].revents != 0 || p.partial) {
      const Preface seen = PeekPreface(p.fd);
      if (seen == Preface::kWhole) {
        HandOver(p);
        continue;
      }
      // Part of a preface (or none) from a peer that has stopped writing never becomes one
      // (and poll would report its hang-up on every turn until the deadline).
      const bool ended = (fds[i].revents & (POLLHUP | POLLERR | POLLRDHUP)) != 0;
      if (seen == Preface::kWrong || seen == Preface::kClosed || ended) {
        // A peer that closed before its preface is no client's call: counted with the wrong
        // ones (nothing of either reached gRPC).
        bad_prefaces_.fetch_add(1);  // counted before its peer can see the close
        ::close(p.fd);
        ++dropped;
        last = p.conn.cred;
        continue;
      }
      p.partial = seen == Preface::kPartial;
    }
    if (now >= p.deadline) {
      preface_timeouts_.fetch_add(1);
      ::close(p.fd);
      ++dropped;
      last = p.conn.cred;
      continue;
    }
    pending_[kept++] = p;
  }
  if (dropped > 0) {
    if (const std::optional<uint64_t> n = drop_log_.Note(now, dropped)) {
      ICECACHE_LOG(WARNING) << "closed " << *n
                            << " control connection(s) that did not begin HTTP/2 within "
                            << options_.preface_timeout << " (the latest of uid " << last.uid
                            << ", pid " << last.pid << ")";
    }
  }
  pending_.resize(kept);
}

void ControlListener::HandOver(const Pending& p) {
  {
    absl::MutexLock lock(&mu_);
    connections_[p.fd] = p.conn;
  }
  // gRPC owns the descriptor from here (and closes it when the connection ends).
  grpc::AddInsecureChannelFromFd(server_, p.fd);
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
      // Forget connections gRPC has closed; count this uid's open ones, held ones included.
      uint32_t of_uid = 0;
      for (auto it = connections_.begin(); it != connections_.end();) {
        if (!Alive(it->first, it->second)) {
          connections_.erase(it++);
          continue;
        }
        of_uid += it->second.cred.uid == cred.uid ? 1 : 0;
        ++it;
      }
      for (const Pending& p : pending_) of_uid += p.conn.cred.uid == cred.uid ? 1 : 0;
      if (of_uid >= options_.max_connections_per_uid || pending_.size() >= options_.max_pending) {
        refused_.fetch_add(1);
        ::close(fd);
        if (const std::optional<uint64_t> n = refuse_log_.Note(absl::Now())) {
          ICECACHE_LOG(WARNING) << "control connection of uid " << cred.uid << " (pid " << cred.pid
                                << ") refused: "
                                << (of_uid >= options_.max_connections_per_uid
                                        ? absl::StrCat("it holds ", of_uid, " already")
                                        : absl::StrCat(pending_.size(),
                                                       " connections are waiting for a preface"))
                                << "; " << *n << " refused since the last report";
        }
        continue;
      }
    }
    // Held until its preface (CheckPending); the next poll looks at it.
    pending_.push_back(Pending{fd,
                               Connection{PeerCredentials{cred.uid, cred.gid, cred.pid}, st.st_ino},
                               absl::Now() + options_.preface_timeout, false});
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
