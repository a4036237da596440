#include "icecache/attachment.h"

#include <errno.h>
#include <linux/futex.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "common/paths.h"

namespace icecache {
namespace {

absl::Status Errno(absl::StatusCode code, const std::string& what) {
  return absl::Status(code, absl::StrCat(what, ": ", std::strerror(errno)));
}

// Receives one fixed-size message and up to `max_fds` descriptors.
ssize_t RecvWithFds(int sock, void* data, size_t len, int* fds, int max_fds, int* nfds, int flags) {
  struct iovec iov;
  iov.iov_base = data;
  iov.iov_len = len;
  struct msghdr msg {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  const ssize_t n = ::recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
  *nfds = 0;
  if (n <= 0) return n;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const int count = static_cast<int>((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (*nfds < max_fds) {
        fds[(*nfds)++] = fd;
      } else {
        ::close(fd);
      }
    }
  }
  return n;
}

// False when the wait timed out.
bool FutexWait(std::atomic<uint32_t>* word, uint32_t expected, absl::Duration timeout) {
  struct timespec ts = absl::ToTimespec(timeout);
  const long r = ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts,
                           nullptr, 0);
  return !(r != 0 && errno == ETIMEDOUT);
}

// True when the daemon closed its end of the attach connection (it exited or dropped us).
bool PeerGoneFd(int fd) {
  struct pollfd p {};
  p.fd = fd;
  p.events = POLLRDHUP;
  return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

}  // namespace

namespace {
constexpr char kSlotsExhaustedUrl[] = "type.googleapis.com/icecache.client.SlotsExhausted";
}  // namespace

absl::Status SlotsExhaustedError() {
  absl::Status s = absl::ResourceExhaustedError("every request slot is in use");
  s.SetPayload(kSlotsExhaustedUrl, absl::Cord("1"));
  return s;
}

bool IsSlotsExhausted(const absl::Status& status) {
  return status.code() == absl::StatusCode::kResourceExhausted &&
         status.GetPayload(kSlotsExhaustedUrl).has_value();
}

absl::StatusOr<std::unique_ptr<Attachment>> Attachment::Attach(const Options& options) {
  const std::string control = options.socket.empty() ? DefaultSocketPath() : options.socket;
  const std::string path = AttachSocketPath(control);
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("attach socket path too long: ", path));
  }
  std::unique_ptr<Attachment> a(new Attachment());
  a->timeout_ = options.timeout;
  a->conn_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (a->conn_fd_ < 0) return Errno(absl::StatusCode::kInternal, "socket");
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  if (::connect(a->conn_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return Errno(absl::StatusCode::kUnavailable,
                 absl::StrCat("cannot reach icecached's attach socket ", path));
  }
  struct timeval tv = absl::ToTimeval(options.timeout);
  ::setsockopt(a->conn_fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  abi::AttachRequest req{};
  req.magic = abi::kArenaMagic;
  req.abi_version = options.abi_version;
  req.flags = options.as_operator ? uint32_t{abi::kAttachOperator} : 0u;
  if (options.pins_segments && !options.as_operator) req.flags |= abi::kAttachPinsSegments;
  std::vector<int> donated;
  if (options.previous != nullptr) {
    donated = options.previous->ArenaFds();
    if (donated.size() > abi::kMaxDonatedSegments) donated.resize(abi::kMaxDonatedSegments);
    req.flags |= abi::kAttachRecover;
    req.reserved[0] = donated.size();
  }
  // The daemon checks the peer's uid before it reads anything and may refuse at once, so a
  // failed send is not the end: its reply (with the reason) can already be waiting.
  bool sent;
  if (donated.empty()) {
    sent =
        ::send(a->conn_fd_, &req, sizeof(req), MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof(req));
  } else {
    struct iovec iov {
      &req, sizeof(req)
    };
    struct msghdr msg {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    std::vector<char> cmsg(CMSG_SPACE(sizeof(int) * donated.size()));
    msg.msg_control = cmsg.data();
    msg.msg_controllen = cmsg.size();
    struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * donated.size());
    std::memcpy(CMSG_DATA(c), donated.data(), sizeof(int) * donated.size());
    sent = ::sendmsg(a->conn_fd_, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof(req));
  }
  const int send_errno = errno;
  abi::AttachReply reply{};
  int fds[2] = {-1, -1};
  int nfds = 0;
  const ssize_t n = RecvWithFds(a->conn_fd_, &reply, sizeof(reply), fds, 2, &nfds, MSG_WAITALL);
  if (n != static_cast<ssize_t>(sizeof(reply)) || reply.magic != abi::kArenaMagic) {
    for (int i = 0; i < nfds; ++i) ::close(fds[i]);
    if (!sent) {
      errno = send_errno;
      return Errno(absl::StatusCode::kUnavailable, "sending the attach request");
    }
    if (n == 0) {
      return absl::UnavailableError(absl::StrCat(
          "icecached closed the attach connection ", path,
          " without a reply (it is shutting down, or was too busy to take the attach)"));
    }
    return absl::UnavailableError(absl::StrCat(
        "no valid attach reply from ", path, n < 0 ? ": " : "", n < 0 ? std::strerror(errno) : ""));
  }
  const std::string why(reply.message, strnlen(reply.message, sizeof(reply.message)));
  switch (reply.status) {
    case abi::kAttachOk:
      break;
    case abi::kAttachDenied:
      return absl::PermissionDeniedError(absl::StrCat("icecached refused to attach: ", why));
    case abi::kAttachBadVersion:
      return absl::FailedPreconditionError(absl::StrCat("icecached refused to attach: ", why));
    case abi::kAttachExhausted:
      return absl::ResourceExhaustedError(absl::StrCat("icecached refused to attach: ", why));
    default:
      return absl::InvalidArgumentError(absl::StrCat("icecached refused to attach: ", why));
  }
  a->token_.assign(reply.token, abi::kTokenChars);
  a->client_id_ = reply.client_id;
  if (options.as_operator) return a;
  if (nfds != 2) {
    for (int i = 0; i < nfds; ++i) ::close(fds[i]);
    return absl::InternalError("attach reply without the arena's descriptors");
  }
  a->doorbell_fd_ = fds[1];
  a->control_bytes_ = reply.control_bytes;
  a->control_ = ::mmap(nullptr, reply.control_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
  a->control_fd_ = fds[0];
  if (a->control_ == MAP_FAILED) {
    a->control_ = nullptr;
    return Errno(absl::StatusCode::kInternal, "mapping the control segment");
  }
  abi::ArenaHeader* h = a->header();
  if (h->magic != abi::kArenaMagic || h->abi_version != abi::kAbiVersion) {
    return absl::InternalError("control segment has a foreign header");
  }
  a->payload_capacity_ = h->slot_bytes - static_cast<uint32_t>(sizeof(abi::SlotHeader));
  {
    absl::MutexLock lock(&a->slots_mu_);
    for (uint32_t i = h->num_slots; i-- > 0;) a->free_slots_.push_back(i);
  }
  {
    absl::MutexLock lock(&a->map_mu_);
    a->segments_.resize(abi::kMaxSegments);
  }
  return a;
}

Attachment::~Attachment() {
  {
    absl::MutexLock lock(&map_mu_);
    for (Mapped& m : segments_) {
      if (m.base != nullptr) ::munmap(m.base, m.bytes);
      if (m.fd >= 0) ::close(m.fd);
    }
  }
  if (control_ != nullptr) ::munmap(control_, control_bytes_);
  if (control_fd_ >= 0) ::close(control_fd_);
  if (doorbell_fd_ >= 0) ::close(doorbell_fd_);
  if (conn_fd_ >= 0) ::close(conn_fd_);
}

absl::StatusOr<uint32_t> Attachment::AcquireSlot() {
  if (control_ == nullptr)
    return absl::FailedPreconditionError("operator attachments have no slots");
  absl::MutexLock lock(&slots_mu_);
  // Slots released before their answer come back once the daemon has answered them.
  for (auto it = unanswered_slots_.begin(); it != unanswered_slots_.end();) {
    if (Done(*it)) {
      free_slots_.push_back(*it);
      it = unanswered_slots_.erase(it);
    } else {
      ++it;
    }
  }
  if (free_slots_.empty()) return SlotsExhaustedError();
  const uint32_t i = free_slots_.back();
  free_slots_.pop_back();
  abi::SlotHeader* s = slot(i);
  s->state.store(abi::kSlotFree, std::memory_order_relaxed);
  s->status = 0;
  s->select_flags = 0;
  s->response_bytes = 0;
  s->message[0] = '\0';
  return i;
}

abi::SlotHeader* Attachment::slot(uint32_t index) const { return abi::SlotAt(control_, index); }

void Attachment::Submit(uint32_t index) {
  {
    absl::MutexLock lock(&sq_mu_);
    slot(index)->request_id = next_request_id_++;
  }
  slot(index)->state.store(abi::kSlotSubmitted, std::memory_order_release);
  SubmitRaw(index);
}

void Attachment::SubmitRaw(uint32_t queue_entry) {
  abi::ArenaHeader* h = header();
  {
    absl::MutexLock lock(&sq_mu_);
    const uint32_t tail = h->sq_tail.load(std::memory_order_relaxed);
    abi::SubmissionQueue(control_)[tail & (h->num_slots - 1)].store(queue_entry,
                                                                    std::memory_order_relaxed);
    h->sq_tail.store(tail + 1, std::memory_order_seq_cst);
  }
  if (h->daemon_sleeping.load(std::memory_order_seq_cst) != 0) {
    const uint64_t one = 1;
    (void)!::write(doorbell_fd_, &one, sizeof(one));
  }
}

bool Attachment::Done(uint32_t index) const {
  return slot(index)->state.load(std::memory_order_acquire) == abi::kSlotDone;
}

absl::Status Attachment::Wait(uint32_t index, absl::Duration timeout) {
  abi::SlotHeader* s = slot(index);
  const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    const uint32_t state = s->state.load(std::memory_order_acquire);
    if (state == abi::kSlotDone) break;
    if (std::chrono::steady_clock::now() < spin_until) {
      __builtin_ia32_pause();
      continue;
    }
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError("no response from icecached in time");
    }
    if (!FutexWait(&s->state, state, std::min(left, absl::Milliseconds(100))) &&
        s->state.load(std::memory_order_acquire) != abi::kSlotDone && PeerGoneFd(conn_fd_)) {
      return absl::UnavailableError("icecached went away while the request was in flight");
    }
  }
  if (s->status == 0) return absl::OkStatus();
  const uint32_t code = s->status <= 16 ? s->status : 2;
  return absl::Status(static_cast<absl::StatusCode>(code),
                      std::string(s->message, strnlen(s->message, sizeof(s->message))));
}

void Attachment::ReleaseSlot(uint32_t index) {
  const uint32_t state = slot(index)->state.load(std::memory_order_acquire);
  absl::MutexLock lock(&slots_mu_);
  if (state == abi::kSlotSubmitted || state == abi::kSlotRunning) {
    unanswered_slots_.push_back(index);  // the daemon still owns it
    return;
  }
  slot(index)->state.store(abi::kSlotFree, std::memory_order_relaxed);
  free_slots_.push_back(index);
}

namespace {

void FillHandle(abi::SlotHeader* s, const std::string& handle) {
  std::memset(s->handle, 0, sizeof(s->handle));
  std::memcpy(s->handle, handle.data(), std::min(handle.size(), sizeof(s->handle)));
}

}  // namespace

namespace {

// Submits a filled slot whose answer is a buffer (kOpStage, kOpScratch), waits, and returns
// the buffer; the slot is released either way.
absl::StatusOr<abi::StageResponse> SubmitForBuffer(Attachment& a, uint32_t slot) {
  a.Submit(slot);
  absl::Status st = a.Wait(slot);
  abi::StageResponse resp{};
  if (st.ok()) std::memcpy(&resp, a.payload(slot), sizeof(resp));
  a.ReleaseSlot(slot);
  if (!st.ok()) return st;
  return resp;
}

}  // namespace

absl::StatusOr<abi::StageResponse> Attachment::Stage(const std::string& handle, uint32_t tokens) {
  absl::StatusOr<uint32_t> i = AcquireSlot();
  if (!i.ok()) return i.status();
  abi::SlotHeader* s = slot(*i);
  s->op = abi::kOpStage;
  FillHandle(s, handle);
  s->tokens = tokens;
  s->payload_bytes = 0;
  return SubmitForBuffer(*this, *i);
}

absl::StatusOr<uint32_t> Attachment::SubmitStaged(uint32_t op, const std::string& handle,
                                                  uint32_t layer, const abi::ArenaRef& staging,
                                                  uint32_t tokens, uint32_t first_position) {
  absl::StatusOr<uint32_t> i = AcquireSlot();
  if (!i.ok()) return i.status();
  abi::SlotHeader* s = slot(*i);
  s->op = op;
  FillHandle(s, handle);
  s->layer = layer;
  s->tokens = tokens;
  s->staging = staging;
  s->first_position = first_position;
  s->payload_bytes = 0;
  Submit(*i);
  return *i;
}

absl::Status Attachment::Finish(uint32_t index) {
  absl::Status st = Wait(index, absl::InfiniteDuration());
  ReleaseSlot(index);
  return st;
}

absl::Status Attachment::Prefill(const std::string& handle, uint32_t layer,
                                 const abi::ArenaRef& staging, uint32_t tokens,
                                 uint32_t first_position) {
  absl::StatusOr<uint32_t> i =
      SubmitStaged(abi::kOpPrefill, handle, layer, staging, tokens, first_position);
  if (!i.ok()) return i.status();
  return Finish(*i);
}

absl::Status Attachment::Append(const std::string& handle, uint32_t layer,
                                const abi::ArenaRef& staging, uint32_t tokens,
                                uint32_t first_position) {
  absl::StatusOr<uint32_t> i =
      SubmitStaged(abi::kOpAppend, handle, layer, staging, tokens, first_position);
  if (!i.ok()) return i.status();
  return Finish(*i);
}

absl::Status Attachment::ReleaseStaging(const std::string& handle, const abi::ArenaRef& staging) {
  absl::StatusOr<uint32_t> i = SubmitStaged(abi::kOpRelease, handle, 0, staging, 0, 0);
  if (!i.ok()) return i.status();
  return Finish(*i);
}

absl::StatusOr<std::vector<abi::SelectedPageRef>> Attachment::Select(const std::string& handle,
                                                                     uint32_t layer,
                                                                     const float* queries,
                                                                     size_t query_floats,
                                                                     uint32_t k) {
  absl::StatusOr<uint32_t> i = SubmitSelect(handle, layer, queries, query_floats, k);
  if (!i.ok()) return i.status();
  return FinishSelect(*i);
}

absl::StatusOr<uint32_t> Attachment::SubmitSelect(const std::string& handle, uint32_t layer,
                                                  const float* queries, size_t query_floats,
                                                  uint32_t k, const uint8_t* head_mask,
                                                  size_t num_kv_heads) {
  const size_t mask_bytes = head_mask != nullptr ? num_kv_heads : 0;
  if (query_floats * sizeof(float) + mask_bytes > payload_capacity_) {
    return absl::InvalidArgumentError("queries do not fit a request slot");
  }
  absl::StatusOr<uint32_t> i = AcquireSlot();
  if (!i.ok()) return i.status();
  abi::SlotHeader* s = slot(*i);
  s->op = abi::kOpSelect;
  FillHandle(s, handle);
  s->layer = layer;
  s->k = k;
  s->query_dtype = 0;
  s->select_flags = head_mask != nullptr ? uint32_t{abi::kSelectHeadMask} : 0u;
  s->payload_bytes = static_cast<uint32_t>(query_floats * sizeof(float) + mask_bytes);
  std::memcpy(payload(*i), queries, query_floats * sizeof(float));
  if (mask_bytes != 0) {
    std::memcpy(payload(*i) + query_floats * sizeof(float), head_mask, mask_bytes);
  }
  Submit(*i);
  return *i;
}

absl::StatusOr<std::vector<abi::SelectedPageRef>> Attachment::FinishSelect(uint32_t index) {
  absl::Status st = Wait(index);
  std::vector<abi::SelectedPageRef> out;
  if (st.ok()) {
    // The response size is read once and bounded by the payload before use.
    const uint32_t bytes = std::min(slot(index)->response_bytes, payload_capacity_);
    out.resize(bytes / sizeof(abi::SelectedPageRef));
    std::memcpy(out.data(), payload(index), out.size() * sizeof(abi::SelectedPageRef));
  }
  ReleaseSlot(index);
  if (!st.ok()) return st;
  return out;
}

absl::StatusOr<std::vector<abi::SelectedPageRef>> Attachment::FinishSelect(
    uint32_t index, size_t refs, size_t tail_floats, std::vector<float>* tail) {
  absl::Status st = Wait(index);
  std::vector<abi::SelectedPageRef> out;
  if (st.ok()) {
    // The response size is read once and bounded by the payload before use.
    const uint64_t bytes = std::min(slot(index)->response_bytes, payload_capacity_);
    const uint64_t want =
        uint64_t{refs} * sizeof(abi::SelectedPageRef) + uint64_t{tail_floats} * sizeof(float);
    if (bytes < want) {
      st = absl::InternalError(absl::StrCat(
          "icecached answered a select with ", bytes, " bytes, expected ", refs,
          " page references and ", tail_floats, " floats of tail partials (", want, " bytes)"));
    } else {
      out.resize(refs);
      std::memcpy(out.data(), payload(index), refs * sizeof(abi::SelectedPageRef));
      if (tail != nullptr) {
        tail->resize(tail_floats);
        std::memcpy(tail->data(), payload(index) + refs * sizeof(abi::SelectedPageRef),
                    tail_floats * sizeof(float));
      }
    }
  }
  ReleaseSlot(index);
  if (!st.ok()) return st;
  return out;
}

absl::StatusOr<abi::StageResponse> Attachment::Scratch(uint64_t bytes) {
  absl::StatusOr<uint32_t> i = AcquireSlot();
  if (!i.ok()) return i.status();
  abi::SlotHeader* s = slot(*i);
  s->op = abi::kOpScratch;
  s->payload_bytes = sizeof(bytes);
  std::memcpy(payload(*i), &bytes, sizeof(bytes));
  return SubmitForBuffer(*this, *i);
}

absl::StatusOr<uint32_t> Attachment::SubmitSelectBatch(uint32_t layer, const abi::ArenaRef& scratch,
                                                       uint32_t count) {
  absl::StatusOr<uint32_t> i = AcquireSlot();
  if (!i.ok()) return i.status();
  abi::SlotHeader* s = slot(*i);
  s->op = abi::kOpSelectBatch;
  std::memset(s->handle, 0, sizeof(s->handle));
  s->layer = layer;
  s->tokens = count;
  s->staging = scratch;
  s->payload_bytes = 0;
  Submit(*i);
  return *i;
}

absl::Status Attachment::Nop() {
  absl::StatusOr<uint32_t> i = AcquireSlot();
  if (!i.ok()) return i.status();
  slot(*i)->op = abi::kOpNop;
  slot(*i)->payload_bytes = 0;
  Submit(*i);
  absl::Status st = Wait(*i);
  ReleaseSlot(*i);
  return st;
}

absl::Status Attachment::PumpNotices(uint32_t want) {
  const absl::Time deadline = absl::Now() + timeout_;
  while (true) {
    if (want != 0 && segments_[want].base != nullptr) return absl::OkStatus();
    abi::SegmentNotice notice{};
    int fd = -1, nfds = 0;
    const ssize_t n = RecvWithFds(conn_fd_, &notice, sizeof(notice), &fd, 1, &nfds,
                                  want == 0 ? MSG_DONTWAIT : MSG_WAITALL);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (want == 0) return absl::OkStatus();
      if (absl::Now() > deadline) {
        return absl::DeadlineExceededError(absl::StrCat("segment ", want, " was never announced"));
      }
      continue;
    }
    if (n != static_cast<ssize_t>(sizeof(notice)) || nfds != 1 ||
        notice.magic != abi::kArenaMagic || notice.segment == 0 ||
        notice.segment >= abi::kMaxSegments) {
      if (nfds == 1) ::close(fd);
      return absl::UnavailableError("the attach connection to icecached broke");
    }
    void* base = ::mmap(nullptr, notice.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
      ::close(fd);
      return Errno(absl::StatusCode::kInternal, "mapping a segment");
    }
    Mapped& m = segments_[notice.segment];
    if (m.base != nullptr) {  // announced twice (a dormant segment reused): keep the first map
      ::munmap(base, notice.bytes);
      ::close(fd);
      continue;
    }
    m = Mapped{base, notice.bytes, fd};
  }
}

bool Attachment::PeerGone() const { return PeerGoneFd(conn_fd_); }

std::vector<int> Attachment::ArenaFds() {
  absl::MutexLock lock(&map_mu_);
  // Every notice still buffered (a daemon that died leaves them readable before the EOF).
  (void)PumpNotices(0);
  std::vector<int> fds;
  if (control_fd_ < 0) return fds;
  fds.push_back(control_fd_);
  for (uint32_t i = 1; i < segments_.size() && segments_[i].fd >= 0; ++i) {
    fds.push_back(segments_[i].fd);
  }
  return fds;
}

absl::StatusOr<Attachment::Segment> Attachment::MapSegment(uint32_t segment) {
  if (segment == 0 || segment >= abi::kMaxSegments) {
    return absl::InvalidArgumentError("not a data segment");
  }
  absl::MutexLock lock(&map_mu_);
  absl::Status pumped = PumpNotices(segment);
  if (!pumped.ok()) return pumped;
  return Segment{static_cast<uint8_t*>(segments_[segment].base), segments_[segment].bytes};
}

absl::StatusOr<uint8_t*> Attachment::Address(const abi::ArenaRef& ref, uint64_t bytes) {
  absl::StatusOr<Segment> m = MapSegment(ref.segment);
  if (!m.ok()) return m.status();
  if (ref.offset > m->bytes || bytes > m->bytes - ref.offset) {
    return absl::InvalidArgumentError("reference outside its segment");
  }
  return m->base + ref.offset;
}

absl::Status Attachment::MapAnnouncedSegments() {
  absl::MutexLock lock(&map_mu_);
  return PumpNotices(0);
}

absl::StatusOr<const uint8_t*> Attachment::Frame(uint32_t segment, uint32_t frame,
                                                 uint32_t* page_bytes) {
  if (segment == 0 || segment >= abi::kMaxSegments) {
    return absl::InvalidArgumentError("not a data segment");
  }
  const uint32_t pb = header()->segments[segment].page_bytes;
  if (pb == 0) return absl::InvalidArgumentError("not a page segment");
  *page_bytes = pb;
  absl::StatusOr<uint8_t*> a = Address(abi::ArenaRef{segment, 0, uint64_t{frame} * pb}, pb);
  if (!a.ok()) return a.status();
  return *a;
}

}  // namespace icecache
