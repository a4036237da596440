// Where the daemon listens by default; shared by icecached, the CLI and the client library so
// that all of them find each other with no flags at all.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace icecache {

inline constexpr int kDefaultMetricsPort = 9464;
inline constexpr const char* kSocketEnvVar = "ICECACHE_SOCKET";

// The control socket path used when none is given, in this order:
//   1. $ICECACHE_SOCKET when set and non-empty;
//   2. /run/icecache/icecached.sock for root (the path the Kubernetes manifests mount);
//   3. $XDG_RUNTIME_DIR/icecache/icecached.sock when XDG_RUNTIME_DIR is set;
//   4. /tmp/icecache-<uid>/icecached.sock.
// Each works without root for the user it belongs to.
std::string DefaultSocketPath();

// Creates the socket's parent directory when it is missing (mode 0755; 0700 for a directory
// directly under /tmp, which must then be owned by this user and not writable by others,
// so that no other user can plant a socket for us there).
// Errors: INVALID_ARGUMENT (relative or empty path, or longer than a sockaddr_un allows),
// FAILED_PRECONDITION (the /tmp directory exists with the wrong owner or mode),
// PERMISSION_DENIED / INTERNAL for mkdir failures.
absl::Status PrepareSocketDirectory(const std::string& socket_path);

// The attach socket (the data plane's) that belongs to a control socket:
// "<dir>/<name>.attach.sock" for "<dir>/<name>.sock", else "<path>.attach".
std::string AttachSocketPath(const std::string& control_socket);

// Maximum length of a unix socket path (sizeof(sockaddr_un::sun_path) - 1).
size_t MaxSocketPathLength();

// Who may connect to a socket the daemon listens on: its file mode (permission bits only,
// e.g. 0660) and, when `gid` is not -1, its group. Applied after bind(), whatever the umask.
// Errors: INVALID_ARGUMENT for bits outside 0777; PERMISSION_DENIED / INTERNAL when chmod or
// chown fail (a group the daemon is not a member of needs CAP_CHOWN).
struct SocketAccess {
  uint32_t mode = 0666;
  int64_t gid = -1;
};
absl::Status ApplySocketAccess(const std::string& path, const SocketAccess& access);

}  // namespace icecache
