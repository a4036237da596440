#include "server/main/socket_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace icecache {
namespace {

absl::Status ErrnoError(const std::string& what) {
  return absl::InternalError(absl::StrCat(what, ": ", std::strerror(errno)));
}

std::string ReadPid(int fd) {
  char buf[32] = {};
  const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
  if (n <= 0) return "unknown";
  int pid = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(absl::string_view(buf, n)), &pid)) {
    return "unknown";
  }
  return absl::StrCat(pid);
}

// True when something accepts connections on the unix socket at `path`.
bool SomeoneListens(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SocketLock>> SocketLock::Acquire(const std::string& socket_path) {
  const std::string lock_path = socket_path + ".lock";
  // The lock file may be unlinked by an exiting owner between our open and flock; retry
  // until the inode we locked is the one at the path.
  for (int attempt = 0; attempt < 8; ++attempt) {
    const int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) return ErrnoError(absl::StrCat("cannot open lock file ", lock_path));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      const std::string pid = ReadPid(fd);
      ::close(fd);
      if (err == EWOULDBLOCK) {
        return absl::FailedPreconditionError(
            absl::StrCat("another icecached (pid ", pid, ") is already serving ", socket_path,
                         "; stop it first or choose another --socket"));
      }
      errno = err;
      return ErrnoError(absl::StrCat("cannot lock ", lock_path));
    }
    struct stat held, current;
    if (::fstat(fd, &held) != 0) {
      ::close(fd);
      return ErrnoError(absl::StrCat("stat ", lock_path));
    }
    if (::stat(lock_path.c_str(), &current) != 0 || current.st_ino != held.st_ino ||
        current.st_dev != held.st_dev) {
      ::close(fd);  // Locked a file that was unlinked meanwhile; try the new one.
      continue;
    }
    const std::string pid = absl::StrCat(::getpid(), "\n");
    if (::ftruncate(fd, 0) != 0 ||
        ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
      ::close(fd);
      return ErrnoError(absl::StrCat("cannot write pid to ", lock_path));
    }

    // We own the path. A socket file left there belongs to a daemon that died.
    struct stat st;
    if (::lstat(socket_path.c_str(), &st) == 0) {
      if (!S_ISSOCK(st.st_mode)) {
        ::close(fd);
        ::unlink(lock_path.c_str());
        return absl::FailedPreconditionError(
            absl::StrCat(socket_path, " exists and is not a socket; refusing to replace it"));
      }
      if (SomeoneListens(socket_path)) {
        ::close(fd);
        ::unlink(lock_path.c_str());
        return absl::FailedPreconditionError(absl::StrCat(
            "a process that holds no lock is serving ", socket_path, "; refusing to replace it"));
      }
      if (::unlink(socket_path.c_str()) != 0 && errno != ENOENT) {
        const absl::Status s = ErrnoError(absl::StrCat("cannot remove stale socket ", socket_path));
        ::close(fd);
        return s;
      }
    }
    return std::unique_ptr<SocketLock>(new SocketLock(socket_path, lock_path, fd));
  }
  return absl::UnavailableError(absl::StrCat("lock file ", lock_path, " keeps changing"));
}

SocketLock::~SocketLock() {
  struct stat st;
  if (::lstat(socket_path_.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
    ::unlink(socket_path_.c_str());
  }
  ::unlink(lock_path_.c_str());
  ::close(fd_);
}

}  // namespace icecache
