// libFuzzer target: the attach handshake. Each input is what a client writes on a fresh
// connection to an in-process data plane's attach socket (then it half-closes): the daemon
// must answer with a well-formed reply or close, never crash, and hand out descriptors only
// with kAttachOk. Successful attachments are detached again when the connection closes.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/time/clock.h"
#include "proto/icecache/v1/abi.h"
#include "tests/fuzz/fuzz_support.h"

namespace icecache::fuzz {
namespace {

Core& TheCore() {
  static Core* core = [] {
    DataPlaneOptions o;
    o.arena.slots = 1;
    o.arena.slot_payload = 4096;
    o.handshake_timeout = absl::Milliseconds(200);
    o.max_pending_attaches_per_uid = 1024;
    o.max_clients_per_uid = 1024;
    return new Core(o);
  }();
  return *core;
}

}  // namespace
}  // namespace icecache::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace icecache;
  namespace abi = ::icecache::abi;  // not cxxabi.h's ::abi
  fuzz::Core& core = fuzz::TheCore();
  const std::string path = core.dir + "/icecached.attach.sock";
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) ::abort();
  if (size > 0) (void)::send(fd, data, size, MSG_NOSIGNAL);
  ::shutdown(fd, SHUT_WR);
  struct timeval tv = {2, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  abi::AttachReply reply{};
  struct iovec iov = {&reply, sizeof(reply)};
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
  struct msghdr msg {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  // libFuzzer's timer (-timeout) interrupts a blocking receive now and then: not an answer.
  ssize_t n;
  do {
    n = ::recvmsg(fd, &msg, MSG_WAITALL | MSG_CMSG_CLOEXEC);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {  // neither an answer nor a close within 2 s
    std::fprintf(stderr, "fuzz_attach: no answer: %s\n", std::strerror(errno));
    ::abort();
  }
  int fds = 0;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const int count = static_cast<int>((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < count; ++i) {
      int received;
      std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      ::close(received);
      ++fds;
    }
  }
  if (n > 0) {
    if (n != static_cast<ssize_t>(sizeof(reply)) || reply.magic != abi::kArenaMagic) ::abort();
    if (reply.message[sizeof(reply.message) - 1] != '\0') ::abort();
    // kAttachOk: the control segment and the doorbell, none for an operator attachment (no
    // arena); any refusal: no descriptor.
    abi::AttachRequest req{};
    if (size > 0) std::memcpy(&req, data, std::min(size, sizeof(req)));
    const bool as_operator = (req.flags & abi::kAttachOperator) != 0;
    if (reply.status == abi::kAttachOk && fds != (as_operator ? 0 : 2)) ::abort();
    if (reply.status != abi::kAttachOk && fds != 0) ::abort();
  }
  ::close(fd);
  return 0;
}
