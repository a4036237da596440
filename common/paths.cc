#include "common/paths.h"

#include <errno.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace icecache {
namespace {

absl::Status ErrnoStatus(int err, const std::string& what) {
  const std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
  return absl::InternalError(msg);
}

// mkdir -p with `mode` for each created component.
absl::Status MakeDirs(const std::string& dir, mode_t mode) {
  if (dir.empty() || dir == "/") return absl::OkStatus();
  struct stat st;
  if (::stat(dir.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) {
      return absl::FailedPreconditionError(absl::StrCat(dir, " exists and is not a directory"));
    }
    return absl::OkStatus();
  }
  const size_t slash = dir.find_last_of('/');
  if (slash != std::string::npos && slash > 0) {
    absl::Status parent = MakeDirs(dir.substr(0, slash), mode);
    if (!parent.ok()) return parent;
  }
  if (::mkdir(dir.c_str(), mode) != 0 && errno != EEXIST) {
    return ErrnoStatus(errno, absl::StrCat("cannot create directory ", dir));
  }
  return absl::OkStatus();
}

}  // namespace

std::string AttachSocketPath(const std::string& control_socket) {
  if (absl::EndsWith(control_socket, ".sock")) {
    return absl::StrCat(control_socket.substr(0, control_socket.size() - 5), ".attach.sock");
  }
  return absl::StrCat(control_socket, ".attach");
}

size_t MaxSocketPathLength() { return sizeof(sockaddr_un{}.sun_path) - 1; }

std::string DefaultSocketPath() {
  const char* env = std::getenv(kSocketEnvVar);
  if (env != nullptr && env[0] != '\0') return env;
  if (::geteuid() == 0) return "/run/icecache/icecached.sock";
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  if (xdg != nullptr && xdg[0] == '/') return absl::StrCat(xdg, "/icecache/icecached.sock");
  return absl::StrCat("/tmp/icecache-", ::geteuid(), "/icecached.sock");
}

absl::Status PrepareSocketDirectory(const std::string& socket_path) {
  if (socket_path.empty() || socket_path[0] != '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("socket path '", socket_path, "' must be absolute"));
  }
  if (socket_path.size() > MaxSocketPathLength()) {
    return absl::InvalidArgumentError(absl::StrCat("socket path '", socket_path, "' is ",
                                                   socket_path.size(), " bytes; at most ",
                                                   MaxSocketPathLength(), " fit a unix socket"));
  }
  const size_t slash = socket_path.find_last_of('/');
  const std::string dir = socket_path.substr(0, slash);
  if (dir.empty()) return absl::OkStatus();
  // A private directory straight under /tmp: create it 0700 and insist that nobody else owns
  // or can write it.
  const bool private_tmp_dir =
      absl::StartsWith(dir, "/tmp/") && dir.find('/', 5) == std::string::npos;
  absl::Status made = MakeDirs(dir, private_tmp_dir ? 0700 : 0755);
  if (!made.ok()) return made;
  if (private_tmp_dir) {
    struct stat st;
    if (::lstat(dir.c_str(), &st) != 0) return ErrnoStatus(errno, absl::StrCat("stat ", dir));
    if (!S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() || (st.st_mode & 0022) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(dir, " must be a directory owned by uid ", ::geteuid(),
                       " and not writable by group or others; remove it or choose --socket"));
    }
  }
  return absl::OkStatus();
}

absl::Status ApplySocketAccess(const std::string& path, const SocketAccess& access) {
  if ((access.mode & ~0777u) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("socket mode 0", absl::Hex(access.mode), " has bits outside 0777"));
  }
  if (access.gid >= 0 &&
      ::chown(path.c_str(), static_cast<uid_t>(-1), static_cast<gid_t>(access.gid)) != 0) {
    return ErrnoStatus(errno, absl::StrCat("chown ", path, " to group ", access.gid));
  }
  if (::chmod(path.c_str(), static_cast<mode_t>(access.mode)) != 0) {
    return ErrnoStatus(errno, absl::StrCat("chmod ", path));
  }
  return absl::OkStatus();
}

}  // namespace icecache
