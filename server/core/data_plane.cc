#include "server/core/data_plane.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <functional>
#include <optional>

#include "absl/cleanup/cleanup.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/keyed_serial_executor.h"
#include "common/log.h"
#include "server/core/recovery.h"

namespace icecache {
namespace {

using SteadyClock = std::chrono::steady_clock;

// Scratch buffers (kOpScratch): their arena tag, and the most one client holds at once (a
// batch of abi::kMaxBatchSelect sequences of 64 query heads of dim 256 needs 64 MiB).
constexpr uint64_t kScratchTag = ~uint64_t{0};
constexpr uint64_t kMaxScratchBytes = uint64_t{256} << 20;

void FutexWake(std::atomic<uint32_t>* word) {
  ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

std::string RandomToken() {
  uint8_t bytes[abi::kTokenChars / 2];
  size_t got = 0;
  while (got < sizeof(bytes)) {
    const ssize_t n = ::getrandom(bytes + got, sizeof(bytes) - got, 0);
    ICECACHE_CHECK(n > 0) << "getrandom failed: " << std::strerror(errno);
    got += static_cast<size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string token;
  for (uint8_t b : bytes) {
    token.push_back(kHex[b >> 4]);
    token.push_back(kHex[b & 15]);
  }
  return token;
}

// What every request and attach gets once shutdown has begun.
absl::Status ShuttingDown() {
  return absl::UnavailableError("icecached is shutting down; attach to its successor");
}

bool Contains(const std::vector<uid_t>& uids, uid_t uid) {
  return std::find(uids.begin(), uids.end(), uid) != uids.end();
}

// Sends `len` bytes and, when fds are given, the descriptors as SCM_RIGHTS. Never blocks.
bool SendWithFds(int sock, const void* data, size_t len, const int* fds, int nfds) {
  struct iovec iov;
  iov.iov_base = const_cast<void*>(data);
  iov.iov_len = len;
  struct msghdr msg {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
  if (nfds > 0) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  const ssize_t n = ::sendmsg(sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  return n == static_cast<ssize_t>(len);
}

}  // namespace

// ------------------------------------------------------------------ Client
struct DataPlane::Client final : public SegmentListener {
  uint64_t id = 0;
  std::string token;
  uid_t uid = 0;
  pid_t pid = 0;
  bool is_operator = false;
  int conn_fd = -1;
  int doorbell_fd = -1;          // client rings it
  int wake_fd = -1;              // wakes the dispatcher to stop
  std::shared_ptr<Arena> arena;  // null for operators
  std::thread dispatcher;
  std::atomic<bool> dead{false};
  // Set by the dispatcher while stages wait for staging room; a freed buffer then wakes it.
  std::atomic<bool> staging_waiters{false};
  std::atomic<bool> staging_freed{false};
  std::atomic<uint32_t> sq_head{0};  // the daemon's own copy: the shared one is never trusted
  // Appends of each (sequence, layer) in order; set at attach.
  std::unique_ptr<KeyedSerialExecutor> appends;
  // Without dispatcher threads (DataPlaneOptions::dispatcher_threads false, for fuzzing): the
  // dispatcher a caller drives with DispatchForTesting.
  std::shared_ptr<Dispatcher> manual;

  absl::Mutex mu;
  int in_flight ABSL_GUARDED_BY(mu) = 0;

  // The client's scratch buffers (kOpScratch): (segment, offset) -> promised footprint.
  absl::Mutex scratch_mu;
  absl::flat_hash_map<std::pair<uint32_t, uint64_t>, uint64_t> scratch ABSL_GUARDED_BY(scratch_mu);
  uint64_t scratch_bytes ABSL_GUARDED_BY(scratch_mu) = 0;

  absl::Mutex send_mu;

  // A recovery attach: the previous arena, until the client's last RestoreSequence.
  absl::Mutex previous_mu;
  std::shared_ptr<DonatedArena> previous ABSL_GUARDED_BY(previous_mu);

  ~Client() override {
    for (int fd : {conn_fd, doorbell_fd, wake_fd}) {
      if (fd >= 0) ::close(fd);
    }
  }

  void OnSegmentAdded(uint32_t segment, int fd, uint64_t bytes) override {
    abi::SegmentNotice notice{abi::kArenaMagic, segment, 0, bytes};
    absl::MutexLock lock(&send_mu);
    if (!SendWithFds(conn_fd, &notice, sizeof(notice), &fd, 1)) {
      // A client that does not drain its attach connection loses it: the attach thread sees
      // the hang-up and reaps it.
      ICECACHE_LOG(WARNING) << "client " << id << ": cannot send a segment notice; detaching";
      ::shutdown(conn_fd, SHUT_RDWR);
    }
  }

  void OnStagingFreed() override {
    staging_freed.store(true);
    if (staging_waiters.load() && wake_fd >= 0) {
      const uint64_t one = 1;
      (void)!::write(wake_fd, &one, sizeof(one));
    }
  }

  void BeginOp() {
    absl::MutexLock lock(&mu);
    ++in_flight;
  }
  // BeginOp unless the reaper has started on this client: the reaper marks it dead, then
  // waits for in_flight to reach 0 and drops the sequences it owns, so an operation begun
  // here is over before that drop (and whatever it created is dropped with the rest), and
  // none begins after it. Both are decided under mu, as the reaper's wait is.
  bool TryBeginOp() {
    absl::MutexLock lock(&mu);
    if (dead.load()) return false;
    ++in_flight;
    return true;
  }
  void EndOp() {
    absl::MutexLock lock(&mu);
    --in_flight;
  }
};

// ------------------------------------------------------------------ request handling
class DataPlane::Dispatcher {
 public:
  Dispatcher(DataPlane* dp, std::shared_ptr<Client> client) : dp_(dp), c_(std::move(client)) {}

  // One pass of Run's loop without waiting (DispatchForTesting): the requests taken.
  uint32_t Pass() {
    if (!started_) {
      error_budget_ = dp_->options_.protocol_error_burst;
      last_refill_ = SteadyClock::now();
      started_ = true;
    }
    RetryDeferredStages(/*all=*/true);
    const uint32_t taken = Drain(c_->arena->header());
    CheckProtocolErrors();
    return taken;
  }

  void Run() {
    abi::ArenaHeader* h = c_->arena->header();
    auto last_activity = SteadyClock::now();
    const auto spin = absl::ToChronoNanoseconds(dp_->options_.poll_spin);
    error_budget_ = dp_->options_.protocol_error_burst;
    last_refill_ = SteadyClock::now();
    while (!c_->dead.load(std::memory_order_acquire)) {
      RetryDeferredStages(/*all=*/false);
      const uint32_t taken = Drain(h);
      if (!CheckProtocolErrors()) break;  // evicted
      if (taken > 0) {
        last_activity = SteadyClock::now();
        continue;
      }
      if (SteadyClock::now() - last_activity < spin) {
        __builtin_ia32_pause();
        continue;
      }
      h->daemon_sleeping.store(1, std::memory_order_seq_cst);
      if (h->sq_tail.load(std::memory_order_seq_cst) != c_->sq_head.load()) {
        h->daemon_sleeping.store(0, std::memory_order_relaxed);
        // Entries that are not requests (a lying tail, stray indices) are not activity: a
        // client cannot keep its dispatcher spinning with them.
        if (throttled_) Pause(dp_->options_.protocol_error_pause);
        continue;
      }
      struct pollfd fds[2] = {{c_->doorbell_fd, POLLIN, 0}, {c_->wake_fd, POLLIN, 0}};
      // Waiting stages are looked at again when a buffer is freed, and at least every 100 ms
      // (for their deadline).
      ::poll(fds, 2, deferred_.empty() ? 1000 : 100);
      uint64_t v;
      if (fds[0].revents & POLLIN) (void)!::read(c_->doorbell_fd, &v, sizeof(v));
      if ((fds[1].revents & POLLIN) && !c_->dead.load()) {
        (void)!::read(c_->wake_fd, &v, sizeof(v));
      }
      h->daemon_sleeping.store(0, std::memory_order_relaxed);
      last_activity = SteadyClock::now();
    }
    // Stages still waiting get an answer: the client is going away or the daemon stops.
    for (const DeferredStage& d : deferred_) {
      Finish(d.r, d.start, absl::UnavailableError("the client is being detached"), 0);
    }
    deferred_.clear();
  }

 private:
  // Counts a protocol error against the client's budget.
  void ProtocolError() {
    dp_->observer_->OnProtocolError();
    error_budget_ -= 1;
  }

  // Refills the error budget; throttles a client that has spent it (a pause per pass) and
  // evicts one that stays throttled past the grace. False when the client was evicted.
  bool CheckProtocolErrors() {
    const DataPlaneOptions& o = dp_->options_;
    const auto now = SteadyClock::now();
    const double elapsed = std::chrono::duration<double>(now - last_refill_).count();
    last_refill_ = now;
    error_budget_ = std::min<double>(o.protocol_error_burst,
                                     error_budget_ + elapsed * o.protocol_errors_per_second);
    if (error_budget_ > 0) {
      throttled_ = false;
      return true;
    }
    if (!throttled_) {
      throttled_ = true;
      throttled_since_ = now;
      ICECACHE_LOG(WARNING) << "client " << c_->id << " (uid " << c_->uid << ", pid " << c_->pid
                            << "): too many protocol errors; throttled";
    }
    if (now - throttled_since_ > absl::ToChronoNanoseconds(o.protocol_error_grace)) {
      ICECACHE_LOG(WARNING) << "client " << c_->id << " (uid " << c_->uid << ", pid " << c_->pid
                            << "): kept making protocol errors for "
                            << absl::FormatDuration(o.protocol_error_grace) << "; detaching it";
      dp_->observer_->OnClientEvicted();
      // The attach thread sees the hang-up and hands the client to the reaper.
      ::shutdown(c_->conn_fd, SHUT_RDWR);
      c_->dead.store(true);
      return false;
    }
    Pause(o.protocol_error_pause);
    return true;
  }

  // Sleeps (a throttled client), waking early only when the client is being detached.
  void Pause(absl::Duration d) {
    struct pollfd fd = {c_->wake_fd, POLLIN, 0};
    ::poll(&fd, 1, static_cast<int>(absl::ToInt64Milliseconds(d)));
  }

  // Takes every submitted entry (at most num_slots per pass); returns how many were requests.
  uint32_t Drain(abi::ArenaHeader* h) {
    const uint32_t slots = dp_->options_.arena.slots;  // ours, not the shared header's
    const uint32_t head = c_->sq_head.load(std::memory_order_relaxed);
    const uint32_t tail = h->sq_tail.load(std::memory_order_acquire);
    uint32_t n = tail - head;
    if (n == 0) return 0;
    if (n > slots) {
      // A tail more than a ring ahead names entries the client never wrote: skip them all
      // (a bounded, constant amount of work) and count the lie.
      ProtocolError();
      c_->sq_head.store(tail, std::memory_order_relaxed);
      h->sq_head.store(tail, std::memory_order_release);
      return 0;
    }
    std::atomic<uint32_t>* sq = c_->arena->SubmissionQueue();
    uint32_t taken = 0;
    for (uint32_t i = 0; i < n; ++i) {
      taken += Take(sq[(head + i) & (slots - 1)].load(std::memory_order_acquire)) ? 1 : 0;
    }
    c_->sq_head.store(head + n, std::memory_order_relaxed);
    h->sq_head.store(head + n, std::memory_order_release);
    return taken;
  }

  // The request as copied out of shared memory (the client may change the slot meanwhile).
  struct Request {
    uint32_t slot;
    uint32_t op;
    std::string handle;
    uint32_t layer, tokens, k, query_dtype, payload_bytes, first_position, select_flags;
    abi::ArenaRef staging;
  };

  // Takes and runs (or starts) the request in slot `index`; false when the entry names no
  // submitted slot (a protocol error, counted).
  bool Take(uint32_t index) {
    const uint32_t slots = dp_->options_.arena.slots;
    if (index >= slots) {
      ProtocolError();
      return false;
    }
    abi::SlotHeader* slot = c_->arena->Slot(index);
    uint32_t expected = abi::kSlotSubmitted;
    if (!slot->state.compare_exchange_strong(expected, abi::kSlotRunning,
                                             std::memory_order_acq_rel)) {
      ProtocolError();  // not submitted (duplicate entry, or a stray one)
      return false;
    }
    Request r;
    r.slot = index;
    r.op = slot->op;
    char handle[sizeof(slot->handle) + 1] = {};
    std::memcpy(handle, slot->handle, sizeof(slot->handle));
    r.handle = handle;
    r.layer = slot->layer;
    r.tokens = slot->tokens;
    r.k = slot->k;
    r.query_dtype = slot->query_dtype;
    r.payload_bytes = slot->payload_bytes;
    r.first_position = slot->first_position;
    r.select_flags = slot->select_flags;
    r.staging = slot->staging;
    const auto start = SteadyClock::now();
    if (dp_->draining_.load(std::memory_order_relaxed)) {
      Finish(r, start, ShuttingDown(), 0);
      return true;
    }
    switch (r.op) {
      case abi::kOpNop:
        Finish(r, start, absl::OkStatus(), 0);
        break;
      case abi::kOpStage:
        Stage(r, start);
        break;
      case abi::kOpRelease:
        Release(r, start);
        break;
      case abi::kOpPrefill:
      case abi::kOpAppend:
        Ingest(r, start);
        break;
      case abi::kOpSelect:
        Select(r, start);
        break;
      case abi::kOpScratch:
        Scratch(r, start);
        break;
      case abi::kOpSelectBatch:
        SelectBatch(r, start);
        break;
      default:
        ProtocolError();
        Finish(r, start, absl::InvalidArgumentError(absl::StrCat("unknown op ", r.op)), 0);
        break;
    }
    return true;
  }

  // Writes the response and releases the slot to the client.
  void Finish(const Request& r, SteadyClock::time_point start, const absl::Status& status,
              uint32_t response_bytes) {
    Respond(dp_, c_.get(), r.slot, r.op, start, status, response_bytes);
  }

 public:
  static void Respond(DataPlane* dp, Client* c, uint32_t index, uint32_t op,
                      SteadyClock::time_point start, const absl::Status& status,
                      uint32_t response_bytes) {
    abi::SlotHeader* slot = c->arena->Slot(index);
    slot->status = static_cast<uint32_t>(status.code());
    const std::string msg(status.message().substr(0, sizeof(slot->message) - 1));
    std::memset(slot->message, 0, sizeof(slot->message));
    std::memcpy(slot->message, msg.data(), msg.size());
    slot->response_bytes = status.ok() ? response_bytes : 0;
    // Counted before the client can see the answer: a scrape after a request returns always
    // includes it (the other order lost the last request to a scrape racing the counter).
    dp->observer_->OnRequest(op, static_cast<int>(status.code()),
                             std::chrono::duration<double>(SteadyClock::now() - start).count());
    slot->state.store(abi::kSlotDone, std::memory_order_release);
    FutexWake(&slot->state);
  }

 private:
  // The sequence behind a handle, if this client owns it.
  absl::StatusOr<std::shared_ptr<SequenceKv>> Sequence(const Request& r) {
    const Caller me{c_->id, false};
    absl::StatusOr<SequenceInfo> info = dp_->registry_->Get(r.handle, me);
    if (!info.ok()) return info.status();
    if (info->kv == nullptr) return absl::InternalError("sequence has no stored KV");
    return info->kv;
  }

  void Stage(const Request& r, SteadyClock::time_point start) {
    if (TryStage(r, start)) return;
    // Over the sequence's staging allowance: the stage waits (the client sees a stall, not an
    // error) until its prefills consume buffers, at most kStagingWait.
    deferred_.push_back({r, start, SteadyClock::now() + kStagingWait});
    c_->staging_waiters.store(true);
  }

  // Answers a stage (a buffer, or an error) and returns true; false when the sequence's
  // staged buffers leave no room for it within its allowance (nothing changed).
  bool TryStage(const Request& r, SteadyClock::time_point start) {
    absl::StatusOr<std::shared_ptr<SequenceKv>> kv = Sequence(r);
    if (!kv.ok()) {
      Finish(r, start, kv.status(), 0);
      return true;
    }
    const Geometry& g = (*kv)->geometry();
    if (r.tokens == 0 || r.tokens > g.max_tokens) {
      Finish(r, start,
             absl::InvalidArgumentError(absl::StrCat(
                 "stage of ", r.tokens, " tokens: must be in 1..max_tokens (", g.max_tokens, ")")),
             0);
      return true;
    }
    const uint64_t bytes = (*kv)->StagingBytesPerToken() * r.tokens;
    const std::optional<StagingAllowance> allowance = AllowanceOf(kv->get());
    if (!allowance) {
      // Dropped since it was found: nothing may be staged for it (an untagged buffer would
      // stay charged until the client detaches).
      Finish(r, start, absl::NotFoundError("the sequence was dropped"), 0);
      return true;
    }
    const uint64_t tag = allowance->tag;
    const uint64_t allowed = ShrinkAfterPrefill(**kv, allowance->charge.get());
    // One reading of the sequence's staged bytes decides: a prefill's pool thread frees its
    // buffer after answering, so a second reading could find it gone and refuse as "cannot fit
    // alone" a stage that had only to wait for that buffer (the soak test hit that window).
    const uint64_t held = c_->arena->StagingBytes(tag);
    if (held + Arena::StagingFootprint(bytes) > allowed) {
      if (held == 0) {  // cannot fit even alone (never, by the promise)
        Finish(r, start,
               absl::ResourceExhaustedError(absl::StrCat(
                   "a stage of ", r.tokens, " tokens (", Arena::StagingFootprint(bytes),
                   " bytes) exceeds the sequence's staging allowance of ", allowed, " bytes")),
               0);
        return true;
      }
      return false;
    }
    absl::StatusOr<abi::ArenaRef> ref = c_->arena->AllocStaging(bytes, tag);
    if (!ref.ok()) {
      Finish(r, start, ref.status(), 0);
      return true;
    }
    abi::StageResponse resp{*ref, bytes, bytes / 2};
    std::memcpy(abi::SlotPayload(c_->arena->Slot(r.slot)), &resp, sizeof(resp));
    Finish(r, start, absl::OkStatus(), sizeof(resp));
    return true;
  }

  // The staging allowance (and tag) of a live sequence; none once it has been released.
  std::optional<StagingAllowance> AllowanceOf(const SequenceKv* kv) const {
    absl::MutexLock lock(&dp_->allowance_mu_);
    auto it = dp_->allowances_.find(kv);
    if (it == dp_->allowances_.end()) return std::nullopt;
    return it->second;
  }

  // The sequence's staging allowance. Once every offloaded layer is built, its promise
  // shrinks (once) to what the rest of the sequence can need (PromiseCalculator::AfterPrefill)
  // and the difference goes back to the client's budget.
  uint64_t ShrinkAfterPrefill(const SequenceKv& kv, SequenceCharge* charge) {
    absl::MutexLock lock(&charge->mu);
    if (!charge->prefilled) {
      const Geometry& g = kv.geometry();
      bool built = g.offloaded_layers() > 0;
      for (uint32_t l = g.full_kv_layers; l < g.num_layers && built; ++l) {
        built = kv.layer_state(l) == SequenceKv::LayerState::kReady;
      }
      if (built) {
        // The tokens still to come are counted from the layer furthest behind (the layers'
        // appends run in their own queues, so a later one can trail), and the pages held
        // are read after the counts: an append that lands in between then adds pages to the
        // count rather than tokens the pages miss. Either way the promise errs on the large side.
        uint64_t tokens = UINT64_MAX;
        for (uint32_t l = g.full_kv_layers; l < g.num_layers; ++l) {
          tokens = std::min(tokens, kv.tokens(l));
        }
        const uint64_t pages = kv.pages();
        SequencePromise after = dp_->promises_.AfterPrefill(g, charge->promise, pages, tokens);
        // The staging segments the prompt filled stay held (the window pages' buffers go to
        // them too), so the promise keeps covering what the client's staging segments hold
        // beyond the other sequences' staging promises: were it to shrink below, the page
        // frames still to come would find that room taken and the arena would outgrow the
        // promise. With several sequences this errs on the large side.
        ClientBudget* budget = c_->arena->budget();
        const uint64_t staging_promised = budget->promised(ArenaUse::kStaging);
        const uint64_t others = staging_promised > charge->promise.staging
                                    ? staging_promised - charge->promise.staging
                                    : 0;
        const uint64_t held = budget->held(ArenaUse::kStaging);
        if (held > others) {
          after.staging = std::min(charge->promise.staging, std::max(after.staging, held - others));
        }
        budget->Unpromise(charge->promise.arena() - after.arena(),
                          charge->promise.heap - after.heap,
                          charge->promise.staging - after.staging);
        charge->promise = after;
        charge->prefilled = true;
      }
    }
    return charge->promise.staging;
  }

  // Answers the waiting stages that fit now (in arrival order) and those past their deadline;
  // the others keep waiting. Looks only when a buffer was freed, or `all`.
  void RetryDeferredStages(bool all) {
    if (deferred_.empty()) return;
    const auto now = SteadyClock::now();
    const bool freed = c_->staging_freed.exchange(false);
    std::vector<DeferredStage> still;
    for (DeferredStage& d : deferred_) {
      if (dp_->draining_.load()) {
        Finish(d.r, d.start, ShuttingDown(), 0);
      } else if ((freed || all) && TryStage(d.r, d.start)) {
        continue;
      } else if (now >= d.deadline) {
        Finish(d.r, d.start,
               absl::ResourceExhaustedError(absl::StrCat(
                   "the sequence's staged buffers stayed at its staging allowance for ",
                   absl::FormatDuration(absl::FromChrono(kStagingWait)),
                   ": prefill or release them before staging more")),
               0);
      } else {
        still.push_back(std::move(d));
      }
    }
    deferred_.swap(still);
    c_->staging_waiters.store(!deferred_.empty());
  }

  void Ingest(const Request& r, SteadyClock::time_point start) {
    absl::StatusOr<std::shared_ptr<SequenceKv>> kv = Sequence(r);
    if (!kv.ok()) return Finish(r, start, kv.status(), 0);
    const uint64_t bytes = (*kv)->StagingBytesPerToken() * uint64_t{r.tokens};
    if (r.tokens == 0) {
      return Finish(r, start, absl::InvalidArgumentError("0 tokens to ingest"), 0);
    }
    // Only a buffer staged for this sequence (kOpStage): not another sequence's, whose own
    // prefill or append may be using it, nor a scratch buffer, whose bookkeeping its release
    // keeps.
    absl::Status layer_ok = (*kv)->CheckLayer(r.layer);
    if (!layer_ok.ok()) return Finish(r, start, layer_ok, 0);
    // Pinned until the operation ends: the client cannot release the buffer (and have its
    // range reused or its segment given back) while the operation reads it.
    const std::optional<StagingAllowance> allowance = AllowanceOf(kv->get());
    // Dropped since it was found: without its tag any buffer (scratch, another sequence's)
    // would pass the check below.
    if (!allowance) return Finish(r, start, absl::NotFoundError("the sequence was dropped"), 0);
    absl::StatusOr<uint8_t*> data = c_->arena->PinStaging(
        r.staging, bytes, allowance->tag,
        "the staging buffer was not staged for this sequence (another sequence's, or scratch)");
    if (!data.ok()) return Finish(r, start, data.status(), 0);
    const bool prefill = r.op == abi::kOpPrefill;
    // Run asynchronously: prefill on the pool, appends in order per (sequence, layer).
    c_->BeginOp();
    std::shared_ptr<Client> client = c_;
    DataPlane* dp = dp_;
    auto task = [dp, client, kv = *kv, r, start, base = *data, bytes, prefill] {
      absl::Status s;
      if (client->dead.load()) {
        (void)client->arena->UnpinStaging(r.staging, /*consumed=*/false);
      } else {
        // The keys are validated, then read again by the index and written into pages: they
        // are copied out of shared memory first, so that the client cannot change them in
        // between (no double fetch). V rows are copied into pages verbatim, never interpreted.
        const std::vector<uint8_t> keys(base, base + bytes / 2);
        const uint8_t* k_rows = keys.data();
        const uint8_t* v_rows = base + bytes / 2;
        // A build stops early when the client goes away (its memory comes back at once).
        s = prefill
                ? kv->Prefill(r.layer, k_rows, v_rows, r.tokens, r.first_position, &client->dead)
                : kv->Append(r.layer, k_rows, v_rows, r.tokens, r.first_position);
        // A successful operation consumes the buffer; a refused one changes nothing (the
        // client may fix and resubmit it, or release it: unpinned before the answer, so that
        // a release right after it is not refused). Answered first, freed after on success:
        // until the client has the answer its buffer is not handed to anyone else, so that a
        // client recovering from a crash in between resubmits it intact (docs/data_plane.md).
        if (!s.ok()) (void)client->arena->UnpinStaging(r.staging, /*consumed=*/false);
        Respond(dp, client.get(), r.slot, r.op, start, s, 0);
        if (s.ok()) (void)client->arena->UnpinStaging(r.staging, /*consumed=*/true);
      }
      client->EndOp();
    };
    if (prefill) {
      dp_->pool_->Schedule(std::move(task));
    } else {
      c_->appends->Submit(AppendKey(r), std::move(task));
    }
  }

  void Select(const Request& r, SteadyClock::time_point start) {
    absl::StatusOr<std::shared_ptr<SequenceKv>> kv = Sequence(r);
    if (!kv.ok()) return Finish(r, start, kv.status(), 0);
    const Geometry& g = (*kv)->geometry();
    if (r.query_dtype != 0) {
      return Finish(r, start, absl::InvalidArgumentError("query_dtype must be 0 (fp32)"), 0);
    }
    if ((r.select_flags & ~uint32_t{abi::kSelectHeadMask}) != 0) {
      return Finish(r, start,
                    absl::InvalidArgumentError(
                        absl::StrCat("unknown select_flags 0x", absl::Hex(r.select_flags))),
                    0);
    }
    const bool masked = (r.select_flags & abi::kSelectHeadMask) != 0;
    const uint64_t qbytes = uint64_t{g.num_q_heads} * g.head_dim * sizeof(float);
    const uint64_t want = qbytes + (masked ? g.num_kv_heads : 0);
    const uint32_t capacity = dp_->options_.arena.slot_payload;
    if (r.payload_bytes != want || want > capacity) {
      return Finish(r, start,
                    absl::InvalidArgumentError(absl::StrCat(
                        "select payload must be the ", g.num_q_heads, " x ", g.head_dim,
                        " fp32 queries", masked ? " and a byte per KV head" : "", " (", want,
                        " bytes), got ", r.payload_bytes)),
                    0);
    }
    const uint32_t k = (*kv)->SelectK(r.k);
    const uint64_t tail_bytes = g.keeps_summaries() ? abi::TailBytes(g.num_q_heads, g.head_dim) : 0;
    if (uint64_t{g.num_kv_heads} * k * sizeof(abi::SelectedPageRef) + tail_bytes > capacity) {
      return Finish(
          r, start,
          absl::InvalidArgumentError(absl::StrCat(
              "k=", k, " pages for ", g.num_kv_heads, " KV heads",
              tail_bytes != 0 ? absl::StrCat(" and ", tail_bytes, " bytes of tail") : std::string(),
              " do not fit a slot's payload (", capacity, " bytes)")),
          0);
    }
    // Copied out of shared memory once; only the copies are used.
    const uint8_t* payload = abi::SlotPayload(c_->arena->Slot(r.slot));
    std::vector<float> queries(qbytes / sizeof(float));
    std::memcpy(queries.data(), payload, qbytes);
    std::vector<uint8_t> mask;
    if (masked) mask.assign(payload + qbytes, payload + qbytes + g.num_kv_heads);
    // Recall samples score every head: not for a select of some heads.
    const bool sample = !masked && dp_->options_.recall_sample_every != 0 &&
                        ++selects_ % dp_->options_.recall_sample_every == 0;
    // A select runs after the appends of its (sequence, layer) submitted before it (the ABI's
    // promise): behind them in the layer's queue when there are any, at once otherwise.
    c_->BeginOp();
    std::shared_ptr<Client> client = c_;
    DataPlane* dp = dp_;
    std::function<void()> task = [dp, client, kv = *kv, r, start, k, sample,
                                  queries = std::move(queries), mask = std::move(mask)] {
      std::vector<abi::SelectedPageRef> out;
      std::vector<float> tail;
      absl::StatusOr<uint32_t> got = kv->Select(r.layer, queries.data(), k, &out, sample,
                                                mask.empty() ? nullptr : mask.data(), &tail);
      uint32_t bytes = 0;
      if (got.ok()) {
        uint8_t* answer = abi::SlotPayload(client->arena->Slot(r.slot));
        bytes = static_cast<uint32_t>(out.size() * sizeof(abi::SelectedPageRef));
        std::memcpy(answer, out.data(), bytes);
        // The tail partials right after the entries (abi.h); sized against the slot above.
        std::memcpy(answer + bytes, tail.data(), tail.size() * sizeof(float));
        bytes += static_cast<uint32_t>(tail.size() * sizeof(float));
      }
      Respond(dp, client.get(), r.slot, r.op, start, got.status(), bytes);
      client->EndOp();
    };
    if (!c_->appends->SubmitIfBusy(AppendKey(r), task)) task();
  }

  static std::string AppendKey(const Request& r) { return AppendKey(r.handle, r.layer); }
  static std::string AppendKey(const std::string& handle, uint32_t layer) {
    return absl::StrCat(handle, "/", layer);
  }

  // Frees a staging or scratch buffer (a scratch buffer's promise goes back to the budget).
  void Release(const Request& r, SteadyClock::time_point start) {
    absl::MutexLock lock(&c_->scratch_mu);
    absl::Status st = c_->arena->FreeStaging(r.staging);
    if (st.ok()) {
      auto it = c_->scratch.find({r.staging.segment, r.staging.offset});
      if (it != c_->scratch.end()) {
        c_->arena->budget()->Unpromise(it->second, 0, it->second);
        c_->scratch_bytes -= it->second;
        c_->scratch.erase(it);
        // The buffer was freed while still promised: its segment, empty now, goes back.
        c_->arena->GiveBackEmptySegments();
      }
    }
    Finish(r, start, st, 0);
  }

  // A scratch buffer of the client's own (kOpScratch): a staging allocation of no sequence,
  // charged to the client's arena like any staging buffer.
  void Scratch(const Request& r, SteadyClock::time_point start) {
    if (r.payload_bytes != sizeof(uint64_t)) {
      return Finish(r, start,
                    absl::InvalidArgumentError("scratch payload must be one uint64 byte count"), 0);
    }
    uint64_t bytes = 0;
    abi::SlotHeader* slot = c_->arena->Slot(r.slot);
    std::memcpy(&bytes, abi::SlotPayload(slot), sizeof(bytes));
    if (bytes == 0 || bytes > kMaxScratchBytes) {
      return Finish(r, start,
                    absl::InvalidArgumentError(absl::StrCat(
                        "scratch of ", bytes, " bytes: must be in 1..", kMaxScratchBytes)),
                    0);
    }
    // Promised like a sequence's staging (so that it never takes room a sequence was
    // promised), within a per-client bound, and given back on kOpRelease.
    const uint64_t footprint = Arena::StagingFootprint(bytes);
    absl::MutexLock lock(&c_->scratch_mu);
    if (c_->scratch_bytes + footprint > kMaxScratchBytes) {
      return Finish(r, start,
                    absl::ResourceExhaustedError(
                        absl::StrCat("scratch buffers of ", c_->scratch_bytes + footprint,
                                     " bytes in all: at most ", kMaxScratchBytes, " per client")),
                    0);
    }
    absl::Status promised =
        c_->arena->budget()->Promise(footprint, 0, "a scratch buffer", footprint);
    if (!promised.ok()) return Finish(r, start, promised, 0);
    absl::StatusOr<abi::ArenaRef> ref = c_->arena->AllocStaging(bytes, kScratchTag);
    if (!ref.ok()) {
      c_->arena->budget()->Unpromise(footprint, 0, footprint);
      return Finish(r, start, ref.status(), 0);
    }
    c_->scratch[{ref->segment, ref->offset}] = footprint;
    c_->scratch_bytes += footprint;
    const abi::StageResponse resp{*ref, bytes, 0};
    std::memcpy(abi::SlotPayload(slot), &resp, sizeof(resp));
    Finish(r, start, absl::OkStatus(), sizeof(resp));
  }

  // Several sequences' selects for one layer (kOpSelectBatch). Every field is read once from
  // the client's scratch buffer and checked; an entry that is wrong gets its own error and
  // the others go on. The searches of every (entry, KV head) are spread over the pool, after
  // the appends each entry's (sequence, layer) had queued.
  void SelectBatch(const Request& r, SteadyClock::time_point start) {
    const uint32_t count = r.tokens;
    if (count == 0 || count > abi::kMaxBatchSelect) {
      return Finish(
          r, start,
          absl::InvalidArgumentError(absl::StrCat(
              "a batch select of ", count, " entries: must be in 1..", abi::kMaxBatchSelect)),
          0);
    }
    const uint64_t entries_bytes = uint64_t{count} * sizeof(abi::BatchSelectEntry);
    // A scratch buffer (kOpScratch), pinned until the answer: the batch writes its results
    // there after this call, so the client cannot release it (and have its range reused as
    // a staging buffer, or its segment given back) meanwhile.
    absl::StatusOr<uint8_t*> base =
        c_->arena->PinStaging(r.staging, entries_bytes, kScratchTag,
                              "a batch select needs a scratch buffer (kOpScratch), not a "
                              "sequence's staging buffer");
    if (!base.ok()) return Finish(r, start, base.status(), 0);
    std::vector<abi::BatchSelectEntry> entries(count);
    std::memcpy(entries.data(), *base, entries_bytes);

    struct Job {
      std::shared_ptr<SequenceKv> kv;
      std::vector<float> queries;
      std::vector<uint8_t> mask;
      uint32_t k = 0;
      bool sample = false;        // a recall sample, as for single selects
      uint8_t* result = nullptr;  // in the client's scratch buffer
      absl::Status status;
      std::vector<abi::SelectedPageRef> pages;  // [num_kv_heads][k]
      std::vector<float> tail;                  // [num_q_heads][2 + head_dim] or empty
    };
    auto jobs = std::make_shared<std::vector<Job>>(count);
    std::vector<std::string> keys;
    for (uint32_t i = 0; i < count; ++i) {
      const abi::BatchSelectEntry& e = entries[i];
      Job& job = (*jobs)[i];
      job.status = PrepareBatchEntry(r, e, &job.kv, &job.queries, &job.mask, &job.k, &job.result);
      if (job.status.ok()) {
        char handle[sizeof(e.handle) + 1] = {};
        std::memcpy(handle, e.handle, sizeof(e.handle));
        keys.push_back(AppendKey(handle, r.layer));
        job.sample = job.mask.empty() && dp_->options_.recall_sample_every != 0 &&
                     ++selects_ % dp_->options_.recall_sample_every == 0;
      }
    }
    c_->BeginOp();
    std::shared_ptr<Client> client = c_;
    DataPlane* dp = dp_;
    uint8_t* const entries_base = *base;
    auto run = [dp, client, jobs, r, start, count, entries_base] {
      // The entries' searches over the pool: each entry is one select of its sequence (its
      // heads spread further where a pool thread is free), observed and sampled as one.
      std::vector<uint32_t> live;
      for (uint32_t i = 0; i < count; ++i) {
        if ((*jobs)[i].status.ok()) live.push_back(i);
      }
      dp->pool_->ParallelFor(live.size(), [&](size_t n) {
        Job& job = (*jobs)[live[n]];
        job.status = job.kv
                         ->Select(r.layer, job.queries.data(), job.k, &job.pages, job.sample,
                                  job.mask.empty() ? nullptr : job.mask.data(), &job.tail)
                         .status();
      });
      // Results and statuses into the client's scratch buffer.
      for (uint32_t i = 0; i < count; ++i) {
        Job& job = (*jobs)[i];
        auto* e = reinterpret_cast<abi::BatchSelectEntry*>(entries_base) + i;
        if (job.status.ok()) {
          std::memcpy(job.result, job.pages.data(),
                      job.pages.size() * sizeof(abi::SelectedPageRef));
          // The tail partials after the entries (room checked in PrepareBatchEntry).
          std::memcpy(job.result + job.pages.size() * sizeof(abi::SelectedPageRef), job.tail.data(),
                      job.tail.size() * sizeof(float));
          e->result_k = job.k;
        } else {
          e->result_k = 0;
        }
        e->status = static_cast<uint32_t>(job.status.code());
        const std::string msg(job.status.message().substr(0, sizeof(e->message) - 1));
        std::memset(e->message, 0, sizeof(e->message));
        std::memcpy(e->message, msg.data(), msg.size());
      }
      // Unpinned before the answer: a client may release or reuse the buffer right after it.
      (void)client->arena->UnpinStaging(r.staging, /*consumed=*/false);
      Respond(dp, client.get(), r.slot, r.op, start, absl::OkStatus(), 0);
      client->EndOp();
    };
    // After every append already queued for each entry's (sequence, layer): a barrier in each
    // busy key's queue; the last one to pass runs the batch.
    struct Gate {
      std::atomic<int> remaining{1};
      std::function<void()> run;
    };
    auto gate = std::make_shared<Gate>();
    gate->run = std::move(run);
    std::sort(keys.begin(), keys.end());
    keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
    for (const std::string& key : keys) {
      gate->remaining.fetch_add(1);
      std::function<void()> barrier = [gate] {
        if (gate->remaining.fetch_sub(1) == 1) gate->run();
      };
      if (!c_->appends->SubmitIfBusy(key, barrier)) gate->remaining.fetch_sub(1);
    }
    if (gate->remaining.fetch_sub(1) == 1) gate->run();
  }

  // Checks one batch entry and copies what it needs out of the scratch buffer.
  absl::Status PrepareBatchEntry(const Request& r, const abi::BatchSelectEntry& e,
                                 std::shared_ptr<SequenceKv>* kv, std::vector<float>* queries,
                                 std::vector<uint8_t>* mask, uint32_t* k, uint8_t** result) {
    Request er = r;
    char handle[sizeof(e.handle) + 1] = {};
    std::memcpy(handle, e.handle, sizeof(e.handle));
    er.handle = handle;
    absl::StatusOr<std::shared_ptr<SequenceKv>> found = Sequence(er);
    if (!found.ok()) return found.status();
    const Geometry& g = (*found)->geometry();
    absl::Status layer_ok = (*found)->CheckLayer(r.layer);
    if (!layer_ok.ok()) return layer_ok;
    if ((e.select_flags & ~uint32_t{abi::kSelectHeadMask}) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown select_flags 0x", absl::Hex(e.select_flags)));
    }
    const bool masked = (e.select_flags & abi::kSelectHeadMask) != 0;
    const uint64_t qbytes = uint64_t{g.num_q_heads} * g.head_dim * sizeof(float);
    const uint64_t want = qbytes + (masked ? g.num_kv_heads : 0);
    if (e.query_bytes != want) {
      return absl::InvalidArgumentError(
          absl::StrCat("queries of ", e.query_bytes, " bytes, the sequence needs ", want));
    }
    *k = (*found)->SelectK(e.k);
    if (*k > 4096) return absl::InvalidArgumentError(absl::StrCat("k=", *k, " is above 4096"));
    const uint64_t rbytes = uint64_t{g.num_kv_heads} * *k * sizeof(abi::SelectedPageRef) +
                            (g.keeps_summaries() ? abi::TailBytes(g.num_q_heads, g.head_dim) : 0);
    if (e.result_bytes < rbytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("room for ", e.result_bytes, " result bytes, need ", rbytes));
    }
    // Both ranges inside the scratch buffer (overflow-safe: offsets and sizes are bounded).
    if (e.query_offset > (uint64_t{1} << 40) || e.result_offset > (uint64_t{1} << 40)) {
      return absl::InvalidArgumentError("offset outside the scratch buffer");
    }
    absl::StatusOr<uint8_t*> qbase = c_->arena->StagingAddress(r.staging, e.query_offset + want);
    if (!qbase.ok()) return absl::InvalidArgumentError("queries outside the scratch buffer");
    absl::StatusOr<uint8_t*> rbase = c_->arena->StagingAddress(r.staging, e.result_offset + rbytes);
    if (!rbase.ok()) return absl::InvalidArgumentError("results outside the scratch buffer");
    queries->resize(qbytes / sizeof(float));
    std::memcpy(queries->data(), *qbase + e.query_offset, qbytes);
    if (masked) mask->assign(*qbase + e.query_offset + qbytes, *qbase + e.query_offset + want);
    *result = *rbase + e.result_offset;
    *kv = std::move(*found);
    return absl::OkStatus();
  }

  DataPlane* dp_;
  std::shared_ptr<Client> c_;
  uint64_t selects_ = 0;
  bool started_ = false;
  // Stages waiting for staging room (answered by RetryDeferredStages).
  struct DeferredStage {
    Request r;
    SteadyClock::time_point start;
    SteadyClock::time_point deadline;
  };
  static constexpr std::chrono::seconds kStagingWait{30};
  std::vector<DeferredStage> deferred_;
  // Protocol errors: a token bucket (see DataPlaneOptions) and the throttled state.
  double error_budget_ = 0;
  SteadyClock::time_point last_refill_;
  bool throttled_ = false;
  SteadyClock::time_point throttled_since_;
};

// ------------------------------------------------------------------ DataPlane
DataPlane::DataPlane(const DataPlaneOptions& options, SequenceRegistry* registry,
                     MemoryAccountant* memory, ThreadPool* pool, DataPlaneObserver* observer)
    : options_(options),
      registry_(registry),
      memory_(memory),
      pool_(pool),
      observer_(observer),
      promises_(options.index_spec, static_cast<uint32_t>(pool->size())) {}

DataPlane::~DataPlane() { Stop(); }

absl::Status DataPlane::Start() {
  absl::MutexLock lock(&mu_);
  if (started_) return absl::FailedPreconditionError("data plane already started");
  const std::string& path = options_.attach_socket;
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("bad attach socket path '", path, "'"));
  }
  ::unlink(path.c_str());  // stale: the caller holds the socket lock
  listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (listen_fd_ < 0) return absl::UnavailableError(std::strerror(errno));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(listen_fd_, 64) != 0) {
    const int err = errno;
    ::close(listen_fd_);
    listen_fd_ = -1;
    return absl::UnavailableError(
        absl::StrCat("cannot listen on attach socket ", path, ": ", std::strerror(err)));
  }
  // Who may connect is the socket's mode and group (--socket-mode, --socket-group); who is let
  // in is decided by SO_PEERCRED against the allowlists.
  absl::Status access = ApplySocketAccess(path, options_.socket_access);
  if (!access.ok()) {
    ::close(listen_fd_);
    listen_fd_ = -1;
    ::unlink(path.c_str());
    return access;
  }
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  started_ = true;
  attach_thread_ = std::thread([this] { AttachLoop(); });
  reaper_thread_ = std::thread([this] { ReaperLoop(); });
  ICECACHE_LOG(INFO) << "data plane: attach socket " << path;
  return absl::OkStatus();
}

void DataPlane::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (!started_ || stopping_.load()) return;
    stopping_.store(true);
  }
  uint64_t one = 1;
  (void)!::write(stop_fd_, &one, sizeof(one));
  attach_thread_.join();
  {
    absl::MutexLock lock(&mu_);
    for (auto& [token, c] : by_token_) {
      // The clients outlive this daemon and recover from their arenas with its successor:
      // their frames keep their tags as the sequences are torn down.
      if (c->arena != nullptr) c->arena->KeepTagsOnRelease();
      reaping_.push_back(c.get());
      reap_queue_.push_back(c);
    }
    by_token_.clear();
    reaper_exit_ = true;
  }
  reaper_thread_.join();
  ::close(listen_fd_);
  ::close(stop_fd_);
  ::unlink(options_.attach_socket.c_str());
}

// One connection in the attach handshake: admitted uid, request not (fully) read yet.
struct DataPlane::PendingAttach {
  int fd = -1;
  struct ucred cred {};
  SteadyClock::time_point deadline;
  abi::AttachRequest request{};
  size_t received = 0;
  // Descriptors that came with the request (a recovery's previous arena); closed unless a
  // recovery attach takes them.
  std::shared_ptr<std::vector<int>> fds = std::make_shared<std::vector<int>>();
};

namespace {

// recv that also takes SCM_RIGHTS descriptors (appended to `fds`; at most kMaxDonatedSegments
// are kept, any beyond are closed). MSG_CMSG_CLOEXEC: none leaks into a child.
ssize_t RecvWithFds(int sock, void* data, size_t len, std::vector<int>* fds) {
  struct iovec iov {
    data, len
  };
  struct msghdr msg {};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * 253)];
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  const ssize_t n = ::recvmsg(sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n < 0) return n;
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (fds->size() < abi::kMaxDonatedSegments) {
        fds->push_back(fd);
      } else {
        ::close(fd);
      }
    }
  }
  return n;
}

void CloseAll(std::vector<int>* fds) {
  for (int fd : *fds) ::close(fd);
  fds->clear();
}

}  // namespace

// The attach thread: one poll over the listening socket, every handshake in progress and
// every attached client's connection. Nothing in it blocks on a peer: accept, the credential
// check and the refusals happen without reading; requests are read as they arrive (a silent
// or slow connection only occupies its own pending entry until its deadline).
void DataPlane::AttachLoop() {
  std::vector<PendingAttach> pending;
  std::vector<struct pollfd> fds;
  std::vector<std::shared_ptr<Client>> watched;
  while (!stopping_.load()) {
    fds.clear();
    watched.clear();
    fds.push_back({listen_fd_, POLLIN, 0});
    fds.push_back({stop_fd_, POLLIN, 0});
    for (const PendingAttach& p : pending) fds.push_back({p.fd, POLLIN | POLLRDHUP, 0});
    {
      absl::MutexLock lock(&mu_);
      for (auto& [token, c] : by_token_) {
        fds.push_back({c->conn_fd, POLLIN | POLLRDHUP, 0});
        watched.push_back(c);
      }
    }
    // Wake for the earliest handshake deadline (and at least twice a second).
    auto now = SteadyClock::now();
    int64_t timeout_ms = 500;
    for (const PendingAttach& p : pending) {
      const int64_t left =
          std::chrono::duration_cast<std::chrono::milliseconds>(p.deadline - now).count() + 1;
      timeout_ms = std::clamp<int64_t>(left, 0, timeout_ms);
    }
    if (::poll(fds.data(), fds.size(), static_cast<int>(timeout_ms)) < 0 && errno != EINTR) {
      ICECACHE_LOG(ERROR) << "attach poll: " << std::strerror(errno);
      continue;
    }
    if (fds[1].revents & POLLIN) break;
    const size_t first_client = 2 + pending.size();
    for (size_t i = first_client; i < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      // After the handshake a client sends nothing: data, EOF, hang-up or error all end it.
      Detach(watched[i - first_client]);
    }
    now = SteadyClock::now();
    std::vector<PendingAttach> waiting;
    for (size_t i = 0; i < pending.size(); ++i) {
      PendingAttach& p = pending[i];
      if (fds[2 + i].revents != 0) {
        const ssize_t n = RecvWithFds(p.fd, reinterpret_cast<char*>(&p.request) + p.received,
                                      sizeof(p.request) - p.received, p.fds.get());
        if (n > 0) p.received += static_cast<size_t>(n);
        if (p.received == sizeof(p.request)) {
          Handshake(p);
          continue;
        }
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
          CloseAll(p.fds.get());
          ::close(p.fd);  // gone before it finished its request
          observer_->OnAttach(false);
          continue;
        }
      }
      if (now >= p.deadline) {
        CloseAll(p.fds.get());
        Refuse(p.fd, abi::kAttachBadRequest,
               absl::StrCat("no complete attach request within ",
                            absl::FormatDuration(options_.handshake_timeout)));
        continue;
      }
      waiting.push_back(p);
    }
    pending.swap(waiting);
    if (fds[0].revents & POLLIN) AcceptNew(&pending);
  }
  for (const PendingAttach& p : pending) {
    CloseAll(p.fds.get());
    ::close(p.fd);
  }
}

void DataPlane::Refuse(int fd, uint32_t status, const std::string& why) {
  abi::AttachReply reply{};
  reply.magic = abi::kArenaMagic;
  reply.abi_version = abi::kAbiVersion;
  reply.status = status;
  std::strncpy(reply.message, why.c_str(), sizeof(reply.message) - 1);
  // Counted before the peer can see the answer, so that a scrape it makes after reading the
  // refusal (or the close) always includes it.
  observer_->OnAttach(false);
  SendWithFds(fd, &reply, sizeof(reply), nullptr, 0);
  ::close(fd);
  // Any local uid can connect: one line per refusal would let it fill the log.
  if (const std::optional<uint64_t> n = refuse_log_.Note(absl::Now())) {
    ICECACHE_LOG(WARNING) << "attach refused: " << why << " (" << *n
                          << " refused since the last report)";
  }
}

void DataPlane::AcceptNew(std::vector<PendingAttach>* pending) {
  const std::vector<uid_t> self = {::geteuid()};
  const auto& allowed = options_.allowed_uids.empty() ? self : options_.allowed_uids;
  const auto& operators = options_.operator_uids.empty() ? self : options_.operator_uids;
  // A bounded batch per pass, so that a flood of connections cannot starve the handshakes
  // and detaches of this loop; the rest wait in the backlog for the next pass.
  for (int i = 0; i < 64; ++i) {
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (AcceptShedder::OutOfDescriptors(errno)) {
        // Shed, or the backlog's connection makes poll spin: a pause when even that fails.
        if (attach_shedder_.Shed(listen_fd_, "attach")) continue;
        absl::SleepFor(absl::Milliseconds(50));
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        ICECACHE_LOG(WARNING) << "attach accept: " << std::strerror(errno);
      }
      return;
    }
    if (draining_.load()) {
      // Shutting down: no new attachments (the client sees the connection closed unanswered
      // and retries against the successor). Counted before the close, as in Refuse.
      observer_->OnAttach(false);
      ::close(fd);
      continue;
    }
    // Identity first: nothing is read from a connection before its uid is known and admitted.
    struct ucred cred {};
    socklen_t len = sizeof(cred);
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      Refuse(fd, abi::kAttachBadRequest, "cannot read peer credentials");
      continue;
    }
    if (!Contains(allowed, cred.uid) && !Contains(operators, cred.uid)) {
      Refuse(fd, abi::kAttachDenied, absl::StrCat("uid ", cred.uid, " may not attach"));
      continue;
    }
    const size_t of_uid = std::count_if(pending->begin(), pending->end(),
                                        [&](const auto& p) { return p.cred.uid == cred.uid; });
    if (pending->size() >= options_.max_pending_attaches ||
        of_uid >= options_.max_pending_attaches_per_uid) {
      Refuse(fd, abi::kAttachExhausted,
             absl::StrCat("too many attaches in progress (uid ", cred.uid, " has ", of_uid,
                          ", all uids ", pending->size(), "); retry"));
      continue;
    }
    PendingAttach p;
    p.fd = fd;
    p.cred = cred;
    p.deadline = SteadyClock::now() + absl::ToChronoNanoseconds(options_.handshake_timeout);
    pending->push_back(p);
  }
}

void DataPlane::Handshake(const PendingAttach& p) {
  const int fd = p.fd;
  const struct ucred& cred = p.cred;
  const abi::AttachRequest& req = p.request;
  // The descriptors a recovery hands back; closed on every other path.
  std::vector<int> donated;
  donated.swap(*p.fds);
  struct CloseDonated {
    std::vector<int>* fds;
    ~CloseDonated() { CloseAll(fds); }
  } close_donated{&donated};
  if (req.magic != abi::kArenaMagic) {
    return Refuse(fd, abi::kAttachBadRequest, "malformed attach request");
  }
  if (req.abi_version != abi::kAbiVersion) {
    return Refuse(fd, abi::kAttachBadVersion,
                  absl::StrCat("ABI version ", req.abi_version, " is not supported (daemon speaks ",
                               abi::kAbiVersion, ")"));
  }
  if ((req.flags &
       ~uint32_t{abi::kAttachOperator | abi::kAttachRecover | abi::kAttachPinsSegments}) != 0) {
    return Refuse(fd, abi::kAttachBadRequest, "unknown attach flags");
  }
  const bool as_operator = (req.flags & abi::kAttachOperator) != 0;
  const bool recover = (req.flags & abi::kAttachRecover) != 0;
  const bool pins_segments = (req.flags & abi::kAttachPinsSegments) != 0 && !as_operator;
  if (recover && (as_operator || req.reserved[0] != donated.size() || donated.empty())) {
    return Refuse(fd, abi::kAttachBadRequest,
                  absl::StrCat("a recovery attach hands back its previous arena's segments (",
                               req.reserved[0], " announced, ", donated.size(),
                               " descriptors received); operators have none"));
  }
  if (!recover && !donated.empty()) {
    return Refuse(fd, abi::kAttachBadRequest, "descriptors sent with a plain attach request");
  }
  std::shared_ptr<DonatedArena> previous;
  if (recover) {
    std::vector<int> taken;
    taken.swap(donated);  // Map owns them now, also on error
    // No arena of this daemon is larger than a client's quota or the memory limit.
    const uint64_t limit = memory_->limit();
    const uint64_t max_bytes =
        options_.client_quota != 0 ? std::min(options_.client_quota, limit) : limit;
    // Its index of tagged frames is charged to the memory limit until the last restore.
    absl::StatusOr<std::unique_ptr<DonatedArena>> mapped =
        DonatedArena::Map(std::move(taken), max_bytes, memory_);
    if (!mapped.ok()) {
      return Refuse(fd,
                    mapped.status().code() == absl::StatusCode::kResourceExhausted
                        ? abi::kAttachExhausted
                        : abi::kAttachBadRequest,
                    absl::StrCat("recovery: ", mapped.status().message()));
    }
    previous = std::move(*mapped);
  }
  const std::vector<uid_t> self = {::geteuid()};
  const auto& allowed = options_.allowed_uids.empty() ? self : options_.allowed_uids;
  const auto& operators = options_.operator_uids.empty() ? self : options_.operator_uids;
  if (!Contains(as_operator ? operators : allowed, cred.uid)) {
    return Refuse(
        fd, abi::kAttachDenied,
        absl::StrCat("uid ", cred.uid, " may not attach", as_operator ? " as an operator" : ""));
  }
  {
    absl::MutexLock lock(&mu_);
    if (by_token_.size() >= options_.max_clients) {
      return Refuse(
          fd, abi::kAttachExhausted,
          absl::StrCat("the daemon serves its maximum of ", options_.max_clients, " clients"));
    }
    const size_t of_uid = std::count_if(by_token_.begin(), by_token_.end(),
                                        [&](const auto& e) { return e.second->uid == cred.uid; });
    if (of_uid >= options_.max_clients_per_uid) {
      return Refuse(fd, abi::kAttachExhausted,
                    absl::StrCat("uid ", cred.uid, " has its maximum of ",
                                 options_.max_clients_per_uid, " attached clients"));
    }
  }
  abi::AttachReply reply{};
  reply.magic = abi::kArenaMagic;
  reply.abi_version = abi::kAbiVersion;
  auto client = std::make_shared<Client>();
  client->id = next_client_id_.fetch_add(1);
  client->token = RandomToken();
  client->uid = cred.uid;
  client->pid = cred.pid;
  client->is_operator = as_operator;
  client->conn_fd = fd;
  client->appends = std::make_unique<KeyedSerialExecutor>(pool_);
  client->previous = std::move(previous);
  int fds[2];
  int nfds = 0;
  if (!as_operator) {
    // The client's memory: its control segment now, its sequences' promises later.
    ArenaOptions arena_options = options_.arena;
    arena_options.keep_segments = pins_segments;
    absl::StatusOr<std::unique_ptr<Arena>> arena = Arena::Create(
        client->id, arena_options,
        std::make_unique<ClientBudget>(memory_, options_.client_quota, segment_bytes_),
        client.get());
    if (!arena.ok()) {
      client->conn_fd = -1;
      return Refuse(fd, abi::kAttachExhausted, std::string(arena.status().message()));
    }
    client->arena = std::move(*arena);
    client->doorbell_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    client->wake_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    fds[0] = client->arena->control_fd();
    fds[1] = client->doorbell_fd;
    nfds = 2;
    reply.control_bytes = client->arena->control_bytes();
  }
  reply.status = abi::kAttachOk;
  reply.client_id = client->id;
  std::memcpy(reply.token, client->token.data(), abi::kTokenChars);
  // Registered before the reply leaves: the client may use its token the moment it has it.
  if (!as_operator) {
    if (options_.dispatcher_threads) {
      client->dispatcher = std::thread([this, client] { Dispatcher(this, client).Run(); });
    } else {
      client->manual = std::make_shared<Dispatcher>(this, client);
    }
  }
  {
    absl::MutexLock lock(&mu_);
    by_token_[client->token] = client;
  }
  bool sent;
  {
    absl::MutexLock lock(&client->send_mu);
    sent = SendWithFds(fd, &reply, sizeof(reply), fds, nfds);
  }
  if (!sent) {
    observer_->OnAttach(false);
    Detach(client);  // the reaper stops the dispatcher and frees the arena
    return;
  }
  observer_->OnAttach(true);
  ICECACHE_LOG(INFO) << "client " << client->id << " attached (uid " << cred.uid << ", pid "
                     << cred.pid << (as_operator ? ", operator" : "")
                     << (recover ? ", recovering its previous arena" : "")
                     << (pins_segments ? ", pins its segments: none is given back" : "") << ")";
}

void DataPlane::AddClientCounters(const abi::ClientStats& from, DataPlaneStats* to) {
  to->cache_hits += from.cache_hits.load(std::memory_order_relaxed);
  to->cache_misses += from.cache_misses.load(std::memory_order_relaxed);
  to->fetched_bytes += from.fetched_bytes.load(std::memory_order_relaxed);
  to->fetch_nanoseconds += from.fetch_nanoseconds.load(std::memory_order_relaxed);
  to->decode_steps += from.decode_steps.load(std::memory_order_relaxed);
  to->prefetched_selects += from.prefetched_selects.load(std::memory_order_relaxed);
  to->drift_fallback_heads += from.drift_fallback_heads.load(std::memory_order_relaxed);
}

void DataPlane::Detach(std::shared_ptr<Client> client) {
  absl::MutexLock lock(&mu_);
  auto it = by_token_.find(client->token);
  if (it == by_token_.end()) return;
  by_token_.erase(it);
  reaping_.push_back(client.get());
  reap_queue_.push_back(std::move(client));
}

void DataPlane::ReaperLoop() {
  while (true) {
    std::vector<std::shared_ptr<Client>> batch;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](DataPlane* dp) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return !dp->reap_queue_.empty() || dp->reaper_exit_;
          },
          this));
      if (reap_queue_.empty()) return;  // reaper_exit_ and nothing left
      batch.swap(reap_queue_);
    }
    for (std::shared_ptr<Client>& c : batch) {
      c->dead.store(true);
      if (c->wake_fd >= 0) {
        uint64_t one = 1;
        (void)!::write(c->wake_fd, &one, sizeof(one));
      }
      if (c->dispatcher.joinable()) c->dispatcher.join();
      c->manual.reset();  // it holds the client
      {
        absl::MutexLock lock(&c->mu);
        c->mu.Await(absl::Condition(
            +[](Client* cl) ABSL_NO_THREAD_SAFETY_ANALYSIS { return cl->in_flight == 0; },
            c.get()));
      }
      const uint64_t dropped = registry_->DropOwnedBy(c->id);
      if (c->arena != nullptr) c->arena->DetachListener();
      {
        // Retired and no longer reaping in one step: Stats sees it counted once throughout.
        absl::MutexLock lock(&mu_);
        if (c->arena != nullptr) AddClientCounters(c->arena->header()->stats, &retired_);
        reaping_.erase(std::find(reaping_.begin(), reaping_.end(), c.get()));
      }
      ICECACHE_LOG(INFO) << "client " << c->id << " detached; dropped " << dropped << " sequences";
      observer_->OnDetach();
    }
  }
}

uint32_t DataPlane::DispatchForTesting(absl::string_view token) {
  // The dispatcher is copied while the client is still listed: the reaper resets the client's
  // `manual` only after Detach has unlisted it (under mu_), so the copy comes first.
  std::shared_ptr<Dispatcher> manual;
  {
    absl::MutexLock lock(&mu_);
    auto it = by_token_.find(token);
    if (it == by_token_.end() || it->second->manual == nullptr) return 0;
    manual = it->second->manual;
  }
  return manual->Pass();
}

absl::StatusOr<uid_t> DataPlane::TokenUid(absl::string_view token) const {
  absl::MutexLock lock(&mu_);
  auto it = by_token_.find(token);
  if (it == by_token_.end()) {
    return absl::UnauthenticatedError("unknown or expired attachment token");
  }
  return it->second->uid;
}

void DataPlane::Drain(absl::Duration grace) {
  draining_.store(true);
  {
    // Stages waiting for staging room get their answer now.
    absl::MutexLock lock(&mu_);
    for (auto& [token, c] : by_token_) {
      if (c->wake_fd < 0) continue;
      c->staging_freed.store(true);
      const uint64_t one = 1;
      (void)!::write(c->wake_fd, &one, sizeof(one));
    }
  }
  const absl::Time deadline = absl::Now() + grace;
  while (absl::Now() < deadline && Stats().in_flight > 0) absl::SleepFor(absl::Milliseconds(5));
}

absl::StatusOr<Caller> DataPlane::Authenticate(absl::string_view token) const {
  absl::MutexLock lock(&mu_);
  auto it = by_token_.find(token);
  if (it == by_token_.end()) {
    return absl::UnauthenticatedError("unknown or expired attachment token");
  }
  return Caller{it->second->id, it->second->is_operator};
}

std::shared_ptr<DataPlane::Client> DataPlane::FindClient(const Caller& caller) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [token, c] : by_token_) {
    if (c->id == caller.client_id && !c->is_operator) return c;
  }
  return nullptr;
}

absl::StatusOr<std::shared_ptr<DataPlane::Client>> DataPlane::ClaimClient(
    const Caller& caller, absl::string_view what) const {
  std::shared_ptr<Client> client = FindClient(caller);
  if (client == nullptr) {
    return absl::UnauthenticatedError(
        absl::StrCat(what, " needs a client attachment (operators cannot own sequences)"));
  }
  if (create_hook_for_testing_) create_hook_for_testing_(false);
  // A client found above can be detached and reaped before this call creates anything; the
  // claim makes the reaper wait for it, or refuses the call once the reaper has started.
  if (!client->TryBeginOp()) {
    return absl::UnauthenticatedError(
        absl::StrCat(what, ": the client's attachment is being detached"));
  }
  if (create_hook_for_testing_) create_hook_for_testing_(true);
  return client;
}

absl::StatusOr<SequenceInfo> DataPlane::CreateSequence(const Caller& caller,
                                                       const GeometrySpec& spec,
                                                       const std::string& label) {
  if (draining_.load()) return absl::UnavailableError("icecached is shutting down");
  absl::StatusOr<std::shared_ptr<Client>> client = ClaimClient(caller, "creating a sequence");
  if (!client.ok()) return client.status();
  const std::shared_ptr<Client> claimed = *std::move(client);
  const absl::Cleanup end_op = [&claimed] { claimed->EndOp(); };
  const std::shared_ptr<Arena> arena = claimed->arena;
  SequenceRegistry::CreateOptions o;
  o.owner = caller.client_id;
  o.max_owned = options_.max_sequences_per_client;
  // The sequence's staging allowance is keyed by its SequenceKv (Stage finds that through the
  // handle); the key is known once make_kv ran, and the release may run before or after that.
  auto kv_key = std::make_shared<const SequenceKv*>(nullptr);
  auto charge = std::make_shared<SequenceCharge>();
  o.charge = [&](const Geometry& g) -> absl::StatusOr<SequenceRegistry::Charge> {
    const uint64_t qbytes = uint64_t{g.num_q_heads} * g.head_dim * sizeof(float);
    if (qbytes > options_.arena.slot_payload) {
      return absl::InvalidArgumentError(absl::StrCat(
          "geometry.num_q_heads x head_dim fp32 queries (", qbytes,
          " bytes) exceed a request slot's payload (", options_.arena.slot_payload, ")"));
    }
    const SequencePromise p = promises_.For(g);
    {
      absl::MutexLock lock(&charge->mu);
      charge->promise = p;
    }
    SequenceRegistry::Charge c;
    c.bytes = p.total();
    c.reserve = [arena, p] {
      return arena->budget()->Promise(p.arena(), p.heap, "sequence", p.staging);
    };
    // Gives back the promise as it stands then (it may have shrunk).
    c.release = [this, arena, charge, kv_key] {
      {
        absl::MutexLock lock(&charge->mu);
        arena->budget()->Unpromise(charge->promise.arena(), charge->promise.heap,
                                   charge->promise.staging);
        charge->promise = SequencePromise{};
      }
      absl::MutexLock lock(&allowance_mu_);
      if (*kv_key != nullptr) allowances_.erase(*kv_key);
    };
    return c;
  };
  o.make_kv = [&](const Geometry& g) -> absl::StatusOr<std::shared_ptr<SequenceKv>> {
    auto kv = std::make_shared<SequenceKv>(g, options_.index_spec, arena, pool_, observer_);
    absl::MutexLock lock(&allowance_mu_);
    *kv_key = kv.get();
    allowances_[kv.get()] = StagingAllowance{next_staging_tag_.fetch_add(1), charge};
    return kv;
  };
  absl::StatusOr<SequenceInfo> info = registry_->Create(spec, label, o);
  if (info.ok() && info->kv != nullptr)
    info->kv->set_durable_id(SequenceRegistry::DurableIdOf(info->handle));
  return info;
}

absl::StatusOr<SequenceInfo> DataPlane::RestoreSequence(
    const Caller& caller, const GeometrySpec& spec, const std::string& label,
    const std::string& previous_handle, const std::vector<SequenceKv::LayerJournal>& layers,
    bool last, const std::atomic<bool>* cancel) {
  if (draining_.load()) return absl::UnavailableError("icecached is shutting down");
  // Not claimed here: CreateSequence below claims the client for the sequence's creation, and
  // a detach after it drops the sequence while the restore goes on (the restore rebuilds every
  // layer's index, which the reaper, shared by every client, does not wait for).
  const std::shared_ptr<Client> client = FindClient(caller);
  if (client == nullptr) {
    return absl::UnauthenticatedError("restoring a sequence needs a client attachment");
  }
  if (!SequenceRegistry::IsWellFormedHandle(previous_handle)) {
    return absl::InvalidArgumentError(
        absl::StrCat("previous_handle \"", previous_handle.substr(0, 64), "\" is not a handle"));
  }
  std::shared_ptr<DonatedArena> previous;
  {
    absl::MutexLock lock(&client->previous_mu);
    previous = client->previous;
    if (last) client->previous.reset();
  }
  if (previous == nullptr) {
    return absl::FailedPreconditionError(
        "this attachment handed back no previous arena (attach with kAttachRecover), or its "
        "last restore was already made");
  }
  absl::StatusOr<SequenceInfo> info = CreateSequence(caller, spec, label);
  if (!info.ok()) return info.status();
  const Geometry& g = info->geometry;
  // Dropped again on every way out but success (a refusal, or an exception such as a failed
  // allocation): the client never learns its handle, so nothing else would drop it before
  // the client detaches.
  absl::Cleanup drop_unless_restored = [&] { (void)registry_->Drop(info->handle, caller); };
  std::vector<char> seen(g.num_layers, 0);
  for (const SequenceKv::LayerJournal& j : layers) {
    if (j.layer >= g.num_layers || j.layer < g.full_kv_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("layers: layer ", j.layer, " is not an offloaded layer of the sequence"));
    }
    if (seen[j.layer]) {
      return absl::InvalidArgumentError(absl::StrCat("layers: layer ", j.layer, " twice"));
    }
    seen[j.layer] = 1;
    // Every history checked before any layer is rebuilt.
    absl::Status valid = info->kv->CheckJournal(j);
    if (!valid.ok()) return valid;
  }
  const std::unique_ptr<SequenceKv::RowSource> rows =
      previous->RowsOf(SequenceRegistry::DurableIdOf(previous_handle), g);
  const auto start = SteadyClock::now();
  uint64_t tokens = 0;
  for (const SequenceKv::LayerJournal& j : layers) {
    // A call cancelled (its caller gave up, or a shutdown's grace ran out: gRPC cancels the
    // calls in flight then) ends within the layer it is at (SequenceKv::Restore: CANCELLED). A
    // drain alone lets the restore finish within the grace: a sequence restored here moves on
    // with the client's arena to the successor, one refused is lost (its rows are in an arena
    // no successor will be handed).
    absl::Status st = info->kv->Restore(j, *rows, cancel);
    if (!st.ok()) {
      return absl::Status(st.code(), absl::StrCat("restoring layer ", j.layer, " of ",
                                                  previous_handle, ": ", st.message()));
    }
    tokens += info->kv->tokens(j.layer);
  }
  std::move(drop_unless_restored).Cancel();
  ICECACHE_LOG(INFO) << "client " << caller.client_id << ": restored " << previous_handle << " as "
                     << info->handle << " (" << layers.size() << " layers, " << tokens
                     << " tokens) in "
                     << std::chrono::duration<double>(SteadyClock::now() - start).count() << " s";
  return info;
}

DataPlaneStats DataPlane::Stats() const {
  absl::MutexLock lock(&mu_);
  DataPlaneStats s = retired_;
  s.clients = by_token_.size();
  // Every arena's segments, including those of clients being reaped (the accountant is the
  // truth: an arena is charged until its last user lets it go).
  s.arena_bytes = segment_bytes_->load();
  for (const auto& [token, c] : by_token_) {
    if (c->arena == nullptr) continue;
    s.max_client_segments = std::max<uint64_t>(s.max_client_segments, c->arena->num_segments());
    s.beyond_promise_segments += c->arena->beyond_promise_segments();
    s.frame_bytes += c->arena->frame_bytes_in_use();
    s.staging_bytes += c->arena->staging_bytes_in_use();
    s.pages += c->arena->frames_in_use();
    const abi::ArenaHeader* h = c->arena->header();
    s.queue_depth += std::min<uint32_t>(
        h->sq_tail.load(std::memory_order_relaxed) - c->sq_head.load(), options_.arena.slots);
    {
      absl::MutexLock cl(&c->mu);
      s.in_flight += static_cast<uint64_t>(c->in_flight);
    }
    AddClientCounters(h->stats, &s);
  }
  for (const Client* c : reaping_) {
    if (c->arena != nullptr) AddClientCounters(c->arena->header()->stats, &s);
  }
  return s;
}

}  // namespace icecache
