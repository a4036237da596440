#include "client/attachment_transport.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/status_macros.h"

namespace icecache::client_internal {
namespace {

uint64_t Align64(uint64_t n) { return (n + 63) / 64 * 64; }

bool DaemonLost(const absl::Status& s) { return s.code() == absl::StatusCode::kUnavailable; }

absl::Status FromGrpc(const grpc::Status& st, absl::string_view what) {
  if (st.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(st.error_code()),
                      absl::StrCat(what, ": ", st.error_message()));
}

}  // namespace

AttachmentTransport::AttachmentTransport(Backend* backend, const std::string& socket,
                                         absl::Duration timeout, absl::Duration reconnect_timeout)
    : backend_(backend),
      socket_(socket),
      timeout_(timeout),
      reconnect_timeout_(reconnect_timeout) {}

absl::StatusOr<std::unique_ptr<AttachmentTransport>> AttachmentTransport::Create(
    Backend* backend, const std::string& socket, absl::Duration timeout,
    absl::Duration reconnect_timeout) {
  std::unique_ptr<AttachmentTransport> t(
      new AttachmentTransport(backend, socket, timeout, reconnect_timeout));
  ICECACHE_ASSIGN_OR_RETURN(std::unique_ptr<Generation> g, t->Connect(nullptr));
  absl::MutexLock lock(&t->mu_);
  g->id = t->next_generation_++;
  t->current_ = std::move(g);
  return t;
}

AttachmentTransport::~AttachmentTransport() {
  // Registrations go before the attachments unmap the segments.
  absl::MutexLock lock(&mu_);
  if (current_ != nullptr) Unregister(current_.get());
  for (auto& g : old_) Unregister(g.get());
}

void AttachmentTransport::Unregister(Generation* g) {
  for (Registered& r : g->segments) {
    if (r.host != nullptr) backend_->UnregisterHost(r.host);
    r = Registered{};
  }
}

absl::StatusOr<std::unique_ptr<AttachmentTransport::Generation>> AttachmentTransport::Connect(
    Attachment* previous) {
  Attachment::Options ao;
  ao.socket = socket_;
  ao.timeout = timeout_;
  ao.previous = previous;
  // CUDA registers every segment it maps (MapIn): its pinned pages must never be freed.
  ao.pins_segments = backend_->mode() == ExecutionMode::kCuda;
  ICECACHE_ASSIGN_OR_RETURN(std::unique_ptr<Attachment> a, Attachment::Attach(ao));
  auto g = std::make_unique<Generation>();
  g->attachment = std::move(a);
  g->segments.resize(abi::kMaxSegments);
  // A fresh channel: the old one may sit in gRPC's reconnect backoff for a second.
  g->channel = grpc::CreateChannel("unix:" + socket_, grpc::InsecureChannelCredentials());
  g->stub = v1::IceCache::NewStub(g->channel);
  return g;
}

Attachment& AttachmentTransport::attachment() {
  absl::ReaderMutexLock lock(&mu_);
  return *current_->attachment;
}

uint64_t AttachmentTransport::generation() const {
  absl::ReaderMutexLock lock(&mu_);
  return current_->id;
}

void AttachmentTransport::MarkLostForTesting(const std::string& handle, absl::Status why) {
  absl::MutexLock book(&book_mu_);
  SequenceRecord& r = sequences_.at(handle);
  r.current.clear();
  r.lost = std::move(why);
}

RecoveryCounters AttachmentTransport::recovery_counters() const {
  absl::ReaderMutexLock lock(&mu_);
  return counters_;
}

void AttachmentTransport::PrepareContext(grpc::ClientContext* ctx) const {
  ctx->AddMetadata(abi::kTokenMetadataKey, current_->attachment->token());
  ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout_));
}

template <typename T>
absl::StatusOr<T> AttachmentTransport::Retry(const std::function<absl::StatusOr<T>()>& f) {
  bool retried_live = false;
  for (int attempt = 0;; ++attempt) {
    uint64_t seen;
    absl::StatusOr<T> r;
    bool peer_gone;
    {
      absl::ReaderMutexLock lock(&mu_);
      seen = current_->id;
      r = f();
      peer_gone = current_->attachment->PeerGone();
    }
    if (r.ok() || !DaemonLost(r.status()) || attempt == 3) return r;
    // UNAVAILABLE from a daemon that is still attached: a control connection it closed (its
    // transport's memory bound reclaims connections under pressure) is made again by the
    // next call, so the call is tried once more before the daemon is taken for gone (a
    // recovery waits up to reconnect_timeout for a daemon to go away; a draining one answers
    // UNAVAILABLE again and then does).
    if (!peer_gone && !retried_live) {
      retried_live = true;
      --attempt;
      absl::SleepFor(absl::Milliseconds(20));
      continue;
    }
    ICECACHE_RETURN_IF_ERROR(Recover(seen));
  }
}

absl::StatusOr<std::string> AttachmentTransport::Current(const std::string& handle) const {
  absl::MutexLock lock(&book_mu_);
  auto it = sequences_.find(handle);
  if (it == sequences_.end()) return handle;  // not created through this transport
  if (it->second.current.empty()) {
    // A lost sequence is lost for good: its rows were in the arena of a daemon that is gone.
    // The restore's code is kept, except UNAVAILABLE (a successor that went away or drained
    // during the restore): from a call, UNAVAILABLE means "the daemon is gone", and every
    // call on the sequence would then wait up to reconnect_timeout, holding the transport
    // against every other thread, for a live daemon to go away.
    const absl::StatusCode code = it->second.lost.code();
    return absl::Status(
        code == absl::StatusCode::kOk || code == absl::StatusCode::kUnavailable
            ? absl::StatusCode::kFailedPrecondition
            : code,
        absl::StrCat("sequence ", handle, " could not be restored after icecached went away (",
                     absl::StatusCodeToString(code), "): ", it->second.lost.message(),
                     "; drop it and create it again"));
  }
  return it->second.current;
}

// ------------------------------------------------------------------ sequences
absl::StatusOr<v1::Sequence> AttachmentTransport::CreateSequence(
    const v1::CreateSequenceRequest& request) {
  return Retry<v1::Sequence>([&]() -> absl::StatusOr<v1::Sequence> {
    grpc::ClientContext ctx;
    PrepareContext(&ctx);
    v1::CreateSequenceResponse resp;
    const grpc::Status st = current_->stub->CreateSequence(&ctx, request, &resp);
    if (!st.ok()) {
      return absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
    }
    absl::MutexLock lock(&book_mu_);
    SequenceRecord& r = sequences_[resp.sequence().handle()];
    r.request = request;
    // A restore asks for what this daemon resolved, not for its defaults (a successor may
    // default otherwise): the tail estimate and softmax scale shape every select's answer.
    const v1::SequenceGeometry& resolved = resp.sequence().geometry();
    v1::SequenceGeometry* pinned = r.request.mutable_geometry();
    if (resolved.tail_estimate() != v1::TAIL_ESTIMATE_UNSPECIFIED) {
      pinned->set_tail_estimate(resolved.tail_estimate());
    }
    if (resolved.has_softmax_scale()) pinned->set_softmax_scale(resolved.softmax_scale());
    r.current = resp.sequence().handle();
    return resp.sequence();
  });
}

absl::Status AttachmentTransport::DropSequence(const std::string& handle) {
  // Not through Retry: a daemon found gone takes the sequence with it (a draining one frees
  // it when it exits), so the drop is done once the sequence is forgotten here, and no
  // successor will restore it. Recovering first would wait up to reconnect_timeout for a
  // successor (every sequence an engine lets go while its daemon restarts, every one
  // collected at a Python interpreter's exit) and then rebuild the sequence only to free it.
  absl::ReaderMutexLock lock(&mu_);
  absl::StatusOr<std::string> cur = Current(handle);
  if (cur.ok()) {
    absl::Status dropped;
    // Tried once more when the daemon is still attached (a control connection it closed: see
    // Retry), since a live daemon would keep the sequence until this client detaches.
    for (int attempt = 0; attempt < 2; ++attempt) {
      if (attempt > 0) absl::SleepFor(absl::Milliseconds(20));
      grpc::ClientContext ctx;
      PrepareContext(&ctx);
      v1::DropSequenceRequest req;
      req.set_handle(*cur);
      v1::DropSequenceResponse resp;
      const grpc::Status st = current_->stub->DropSequence(&ctx, req, &resp);
      dropped = st.ok() ? absl::OkStatus() : FromGrpc(st, "DropSequence");
      if (!DaemonLost(dropped) || current_->attachment->PeerGone()) break;
    }
    if (DaemonLost(dropped)) {
      ICECACHE_LOG(INFO) << "sequence " << handle << " forgotten: its daemon is gone ("
                         << dropped.message() << ")";
    } else if (!dropped.ok() && dropped.code() != absl::StatusCode::kNotFound) {
      return dropped;
    }
  }
  absl::MutexLock book(&book_mu_);
  sequences_.erase(handle);
  return absl::OkStatus();
}

// ------------------------------------------------------------------ staging
absl::StatusOr<abi::StageResponse> AttachmentTransport::Stage(const std::string& handle,
                                                              uint32_t tokens) {
  bool old_generations;
  {
    absl::ReaderMutexLock lock(&mu_);
    old_generations = !old_.empty();
  }
  if (old_generations) {
    absl::MutexLock lock(&mu_);
    DropOldGenerations();
  }
  return Retry<abi::StageResponse>([&]() -> absl::StatusOr<abi::StageResponse> {
    ICECACHE_ASSIGN_OR_RETURN(const std::string cur, Current(handle));
    Attachment& a = *current_->attachment;
    ICECACHE_ASSIGN_OR_RETURN(const abi::StageResponse real, a.Stage(cur, tokens));
    absl::StatusOr<uint8_t*> host = a.Address(real.buffer, real.bytes);
    if (!host.ok()) {
      (void)a.ReleaseStaging(cur, real.buffer);
      return host.status();
    }
    absl::MutexLock lock(&book_mu_);
    const uint32_t vid = next_vid_++ & ~kVirtualSegment;
    staged_[vid] =
        Staged{handle, tokens, current_.get(), real.buffer, real.bytes, real.v_offset, *host};
    return abi::StageResponse{abi::ArenaRef{kVirtualSegment | vid, 0, 0}, real.bytes,
                              real.v_offset};
  });
}

absl::Status AttachmentTransport::ReleaseStaging(const std::string& handle,
                                                 const abi::ArenaRef& staging) {
  absl::ReaderMutexLock lock(&mu_);
  Staged s;
  {
    absl::MutexLock book(&book_mu_);
    auto it = staged_.find(staging.segment & ~kVirtualSegment);
    if ((staging.segment & kVirtualSegment) == 0 || it == staged_.end()) {
      return absl::InvalidArgumentError("not a staging buffer of this client");
    }
    s = it->second;
    staged_.erase(it);
  }
  if (s.gen != current_.get()) return absl::OkStatus();  // its daemon is gone, and with it
  absl::StatusOr<std::string> cur = Current(handle);
  absl::Status st = current_->attachment->ReleaseStaging(cur.ok() ? *cur : handle, s.real);
  return DaemonLost(st) ? absl::OkStatus() : st;
}

absl::Status AttachmentTransport::MigrateStaging(uint32_t vid) {
  Staged s;
  {
    absl::MutexLock book(&book_mu_);
    s = staged_.at(vid);
  }
  ICECACHE_ASSIGN_OR_RETURN(const std::string cur, Current(s.handle));
  Attachment& a = *current_->attachment;
  ICECACHE_ASSIGN_OR_RETURN(const abi::StageResponse got, a.Stage(cur, s.tokens));
  if (got.bytes != s.bytes || got.v_offset != s.v_offset) {
    (void)a.ReleaseStaging(cur, got.buffer);
    return absl::InternalError("the new daemon stages another layout");
  }
  absl::StatusOr<uint8_t*> host = a.Address(got.buffer, got.bytes);
  if (!host.ok()) {
    (void)a.ReleaseStaging(cur, got.buffer);
    return host.status();
  }
  std::memcpy(*host, s.host, s.bytes);
  {
    absl::MutexLock book(&book_mu_);
    auto it = staged_.find(vid);
    if (it != staged_.end() && it->second.gen == s.gen) {
      it->second =
          Staged{s.handle, s.tokens, current_.get(), got.buffer, s.bytes, s.v_offset, *host};
      return absl::OkStatus();
    }
  }
  // Released or moved by another thread meanwhile (a caller racing itself): not ours to keep.
  (void)a.ReleaseStaging(cur, got.buffer);
  return absl::FailedPreconditionError("the staging buffer was released while it moved");
}

// ------------------------------------------------------------------ requests
absl::Status AttachmentTransport::SubmitLocked(Pending* p) {
  Attachment& a = *current_->attachment;
  if (p->kind == Pending::kStaged) {
    ICECACHE_ASSIGN_OR_RETURN(const std::string cur, Current(p->handle));
    Staged s;
    {
      absl::MutexLock book(&book_mu_);
      auto it = staged_.find(p->vid);
      if (it == staged_.end()) {
        return absl::InvalidArgumentError("not a staging buffer of this client");
      }
      s = it->second;
    }
    if (s.gen != current_.get()) {
      // Staged before a recovery: its owner wrote it through the old arena's mapping, which
      // stays while the buffer is held, and is done writing now that it submits: it moves to
      // the current arena here (a recovery does not move it: it may still be being written).
      ICECACHE_RETURN_IF_ERROR(MigrateStaging(p->vid));
      absl::MutexLock book(&book_mu_);
      s = staged_.at(p->vid);
    }
    ICECACHE_ASSIGN_OR_RETURN(
        p->slot, a.SubmitStaged(p->op, cur, p->layer, s.real, p->tokens, p->first_position));
    p->gen = current_.get();
    return absl::OkStatus();
  }
  const Layout l = LayoutOf(p->selects);
  ICECACHE_ASSIGN_OR_RETURN(Scratch sc, AcquireScratch(l.bytes));
  uint8_t* const host = sc.host;
  for (size_t i = 0; i < p->selects.size(); ++i) {
    const Pending::Select& q = p->selects[i];
    abi::BatchSelectEntry e{};
    absl::StatusOr<std::string> cur = Current(q.handle);
    const std::string& h = cur.ok() ? *cur : q.handle;  // a lost one: the daemon refuses it
    std::memcpy(e.handle, h.data(), std::min(h.size(), sizeof(e.handle)));
    e.k = q.k;
    e.select_flags = q.mask.empty() ? 0u : uint32_t{abi::kSelectHeadMask};
    e.query_offset = l.query_at[i];
    e.query_bytes = q.queries.size() * sizeof(float) + q.mask.size();
    e.result_offset = l.result_at[i];
    e.result_bytes = l.result_bytes[i];
    std::memcpy(host + i * sizeof(abi::BatchSelectEntry), &e, sizeof(e));
    // The room's tail part starts zeroed (empty partials): the buffer is reused.
    const uint64_t refs_bytes = l.result_cap[i] * sizeof(abi::SelectedPageRef);
    std::memset(host + l.result_at[i] + refs_bytes, 0, l.result_bytes[i] - refs_bytes);
    std::memcpy(host + l.query_at[i], q.queries.data(), q.queries.size() * sizeof(float));
    if (!q.mask.empty()) {
      std::memcpy(host + l.query_at[i] + q.queries.size() * sizeof(float), q.mask.data(),
                  q.mask.size());
    }
  }
  absl::StatusOr<uint32_t> slot =
      a.SubmitSelectBatch(p->layer, sc.buffer.buffer, static_cast<uint32_t>(p->selects.size()));
  if (!slot.ok()) {
    ReturnScratch(sc);
    return slot.status();
  }
  p->slot = *slot;
  p->gen = current_.get();
  p->scratch = sc;
  p->result_offsets = l.result_at;
  p->result_capacity = l.result_cap;
  p->result_bytes = l.result_bytes;
  return absl::OkStatus();
}

absl::StatusOr<Ticket> AttachmentTransport::SubmitStaged(uint32_t op, const std::string& handle,
                                                         uint32_t layer,
                                                         const abi::ArenaRef& staging,
                                                         uint32_t tokens, uint32_t first_position) {
  if ((staging.segment & kVirtualSegment) == 0 || staging.offset != 0) {
    return absl::InvalidArgumentError("not a staging buffer of this client");
  }
  auto p = std::make_shared<Pending>();
  p->kind = Pending::kStaged;
  p->op = op;
  p->handle = handle;
  p->layer = layer;
  p->vid = staging.segment & ~kVirtualSegment;
  p->tokens = tokens;
  p->first_position = first_position;
  return Track(std::move(p));
}

void AttachmentTransport::Acknowledge(const Pending& p) {
  absl::MutexLock book(&book_mu_);
  staged_.erase(p.vid);  // consumed
  auto it = sequences_.find(p.handle);
  if (it == sequences_.end()) return;
  History& h = it->second.layers[p.layer];
  if (p.op == abi::kOpPrefill) {
    h.built = true;
    h.prefill_first = p.first_position;
    h.prefill_tokens = p.tokens;
  } else if (p.op == abi::kOpAppend) {
    h.appends.emplace_back(p.first_position, p.tokens);
  }
}

absl::StatusOr<Ticket> AttachmentTransport::Track(std::shared_ptr<Pending> p) {
  return Retry<Ticket>([&]() -> absl::StatusOr<Ticket> {
    ICECACHE_RETURN_IF_ERROR(SubmitLocked(p.get()));
    absl::MutexLock book(&book_mu_);
    const Ticket t = next_ticket_++;
    pending_[t] = p;
    return t;
  });
}

template <typename T>
absl::StatusOr<T> AttachmentTransport::Await(
    Ticket ticket, Pending::Kind kind, const char* what,
    const std::function<absl::StatusOr<T>(Pending&, const absl::Status&)>& answered) {
  for (int attempt = 0;; ++attempt) {
    uint64_t seen;
    {
      absl::ReaderMutexLock lock(&mu_);
      seen = current_->id;
      std::shared_ptr<Pending> p;
      {
        absl::MutexLock book(&book_mu_);
        auto it = pending_.find(ticket);
        if (it == pending_.end() || it->second->kind != kind) {
          return absl::InternalError(absl::StrCat("not a ", what, " in flight"));
        }
        p = it->second;
      }
      // Finish waits for the daemon's answer however long it takes.
      const absl::Status st = p->settled ? p->settled_status : p->gen->attachment->Finish(p->slot);
      // The daemon went away: the recovery resubmits the request, then it is waited for again.
      const bool again = !p->settled && DaemonLost(st) && attempt < 3;
      if (!again) {
        absl::StatusOr<T> out = answered(*p, st);
        absl::MutexLock book(&book_mu_);
        pending_.erase(ticket);
        return out;
      }
    }
    absl::Status recovered = Recover(seen);
    if (!recovered.ok()) {
      // The caller is told the request failed: a later recovery must not carry it out.
      absl::ReaderMutexLock lock(&mu_);
      absl::MutexLock book(&book_mu_);
      pending_.erase(ticket);
      return recovered;
    }
  }
}

absl::Status AttachmentTransport::Finish(Ticket ticket) {
  return Await<bool>(ticket, Pending::kStaged, "prefill or append",
                     [&](Pending& p, const absl::Status& st) -> absl::StatusOr<bool> {
                       if (!st.ok()) return st;
                       if (!p.settled) Acknowledge(p);  // settled ones were at the recovery
                       return true;
                     })
      .status();
}

AttachmentTransport::Layout AttachmentTransport::LayoutOf(
    const std::vector<Pending::Select>& requests) {
  Layout l;
  const uint64_t n = requests.size();
  l.query_at.resize(n);
  l.result_at.resize(n);
  l.result_cap.resize(n);
  l.result_bytes.resize(n);
  l.bytes = Align64(n * sizeof(abi::BatchSelectEntry));
  for (uint64_t i = 0; i < n; ++i) {
    const Pending::Select& q = requests[i];
    l.query_at[i] = l.bytes;
    l.bytes += Align64(q.queries.size() * sizeof(float) + q.mask.size());
    l.result_at[i] = l.bytes;
    l.result_cap[i] = uint64_t{q.num_kv_heads} * q.k;
    // The pages, then (a sequence that keeps a tail estimate) its tail partials.
    l.result_bytes[i] =
        l.result_cap[i] * sizeof(abi::SelectedPageRef) + uint64_t{q.tail_floats} * sizeof(float);
    l.bytes += Align64(l.result_bytes[i]);
  }
  return l;
}

absl::StatusOr<AttachmentTransport::Scratch> AttachmentTransport::AcquireScratch(uint64_t bytes) {
  {
    absl::MutexLock book(&book_mu_);
    size_t best = free_scratch_.size();
    for (size_t i = 0; i < free_scratch_.size(); ++i) {
      if (free_scratch_[i].buffer.bytes >= bytes &&
          (best == free_scratch_.size() ||
           free_scratch_[i].buffer.bytes < free_scratch_[best].buffer.bytes)) {
        best = i;
      }
    }
    if (best < free_scratch_.size()) {
      Scratch sc = free_scratch_[best];
      free_scratch_.erase(free_scratch_.begin() + static_cast<ptrdiff_t>(best));
      return sc;
    }
  }
  Attachment& a = *current_->attachment;
  // Room to grow: a batch may gain sequences.
  ICECACHE_ASSIGN_OR_RETURN(const abi::StageResponse got,
                            a.Scratch(std::max<uint64_t>(bytes * 2, uint64_t{64} << 10)));
  absl::StatusOr<uint8_t*> at = a.Address(got.buffer, got.bytes);
  if (!at.ok()) {
    (void)a.ReleaseStaging("", got.buffer);
    return at.status();
  }
  return Scratch{got, *at};
}

void AttachmentTransport::ReturnScratch(Scratch scratch) {
  Scratch drop;
  {
    absl::MutexLock book(&book_mu_);
    free_scratch_.push_back(scratch);
    if (free_scratch_.size() <= kMaxFreeScratch) return;
    auto smallest = std::min_element(
        free_scratch_.begin(), free_scratch_.end(),
        [](const Scratch& a, const Scratch& b) { return a.buffer.bytes < b.buffer.bytes; });
    drop = *smallest;
    free_scratch_.erase(smallest);
  }
  (void)current_->attachment->ReleaseStaging("", drop.buffer.buffer);
}

absl::Status AttachmentTransport::PrepareSelectBatch(absl::Span<const SelectRequest> requests) {
  if (requests.empty()) return absl::OkStatus();
  std::vector<Pending::Select> sizes(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    sizes[i].queries.resize(requests[i].query_floats);
    if (requests[i].head_mask != nullptr) sizes[i].mask.resize(requests[i].num_kv_heads);
    sizes[i].k = requests[i].k;
    sizes[i].num_kv_heads = requests[i].num_kv_heads;
    sizes[i].tail_floats = requests[i].tail_floats;
  }
  absl::StatusOr<bool> r = Retry<bool>([&]() -> absl::StatusOr<bool> {
    ICECACHE_ASSIGN_OR_RETURN(Scratch sc, AcquireScratch(LayoutOf(sizes).bytes));
    ReturnScratch(sc);
    return true;
  });
  return r.status();
}

absl::StatusOr<Ticket> AttachmentTransport::SubmitSelectBatch(
    uint32_t layer, absl::Span<const SelectRequest> requests) {
  if (requests.empty() || requests.size() > abi::kMaxBatchSelect) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a batch select of ", requests.size(), " sequences: must be in 1..", abi::kMaxBatchSelect));
  }
  auto p = std::make_shared<Pending>();
  p->kind = Pending::kSelect;
  p->layer = layer;
  p->selects.resize(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const SelectRequest& q = requests[i];
    Pending::Select& s = p->selects[i];
    s.handle = q.handle;
    s.queries.assign(q.queries, q.queries + q.query_floats);
    if (q.head_mask != nullptr) s.mask.assign(q.head_mask, q.head_mask + q.num_kv_heads);
    s.k = q.k;
    s.num_kv_heads = q.num_kv_heads;
    s.tail_floats = q.tail_floats;
  }
  return Track(std::move(p));
}

// The answers a batch select left in its buffer: each entry's pages ([num_kv_heads][k]) and,
// for a sequence that keeps a tail estimate, the tail partials right after the result_k
// entries per KV head the daemon wrote, within the entry's room.
std::vector<SelectAnswer> AttachmentTransport::ReadAnswers(const uint8_t* host, const Pending& p) {
  std::vector<SelectAnswer> answers(p.result_offsets.size());
  for (size_t i = 0; i < answers.size(); ++i) {
    abi::BatchSelectEntry e;
    std::memcpy(&e, host + i * sizeof(abi::BatchSelectEntry), sizeof(e));
    answers[i].generation = p.gen->id;
    if (e.status != 0) {
      // A code outside google.rpc.Code would be the daemon's bug; it reads as UNKNOWN.
      const uint32_t code = e.status <= 16 ? e.status : 2;
      answers[i].status =
          absl::Status(static_cast<absl::StatusCode>(code),
                       std::string(e.message, strnlen(e.message, sizeof(e.message))));
      continue;
    }
    const uint64_t capacity = p.result_capacity[i];
    const uint64_t tail_floats = p.selects[i].tail_floats;
    if (tail_floats != 0) {
      // Where the daemon put the tail: after result_k entries per KV head (k when it answers
      // as asked). Read only within the room this client gave it.
      const uint64_t refs_bytes =
          uint64_t{p.selects[i].num_kv_heads} * e.result_k * sizeof(abi::SelectedPageRef);
      if (e.result_k > p.selects[i].k ||
          refs_bytes + tail_floats * sizeof(float) > p.result_bytes[i]) {
        answers[i].status = absl::InternalError(
            absl::StrCat("icecached answered a select with ", e.result_k,
                         " pages per KV head and no room left for its tail partials (", tail_floats,
                         " floats in ", p.result_bytes[i], " bytes)"));
        continue;
      }
      answers[i].tail.resize(tail_floats);
      std::memcpy(answers[i].tail.data(), host + p.result_offsets[i] + refs_bytes,
                  tail_floats * sizeof(float));
    }
    answers[i].pages.resize(capacity);
    std::memcpy(answers[i].pages.data(), host + p.result_offsets[i],
                capacity * sizeof(abi::SelectedPageRef));
  }
  return answers;
}

absl::StatusOr<std::vector<SelectAnswer>> AttachmentTransport::FinishSelectBatch(Ticket ticket) {
  using Answers = std::vector<SelectAnswer>;
  return Await<Answers>(ticket, Pending::kSelect, "batch select",
                        [&](Pending& p, const absl::Status& st) -> absl::StatusOr<Answers> {
                          // Settled: refused before its daemon went away (its buffer went with it);
                          // a select answered OK is never settled but asked again.
                          if (p.settled)
                            return st.ok() ? absl::InternalError("a settled select without pages")
                                           : st;
                          absl::StatusOr<Answers> out =
                              st.ok() ? absl::StatusOr<Answers>(ReadAnswers(p.scratch.host, p))
                                      : absl::StatusOr<Answers>(st);
                          if (p.gen == current_.get()) ReturnScratch(p.scratch);
                          return out;
                        });
}

bool AttachmentTransport::Done(Ticket ticket) const {
  absl::ReaderMutexLock lock(&mu_);
  absl::MutexLock book(&book_mu_);
  auto it = pending_.find(ticket);
  if (it == pending_.end()) return false;
  const Pending& p = *it->second;
  return p.settled || p.gen->attachment->Done(p.slot);
}

// ------------------------------------------------------------------ memory
absl::StatusOr<ArenaSpan> AttachmentTransport::MapIn(Generation* g, const abi::ArenaRef& ref,
                                                     uint64_t bytes) {
  if (ref.segment == 0 || ref.segment >= abi::kMaxSegments) {
    return absl::InternalError("the daemon returned a reference outside the data segments");
  }
  {
    absl::MutexLock book(&book_mu_);
    const Registered& r = g->segments[ref.segment];
    if (r.host != nullptr) {
      if (ref.offset > r.bytes || bytes > r.bytes - ref.offset) {
        return absl::InternalError("the daemon returned a reference outside its segment");
      }
      return ArenaSpan{r.host + ref.offset, r.device + ref.offset};
    }
  }
  // First use of the segment: map it (the attachment's lock), then register it.
  ICECACHE_ASSIGN_OR_RETURN(const Attachment::Segment seg, g->attachment->MapSegment(ref.segment));
  absl::MutexLock book(&book_mu_);
  Registered& r = g->segments[ref.segment];
  if (r.host == nullptr) {
    ICECACHE_ASSIGN_OR_RETURN(void* device, backend_->RegisterHost(seg.base, seg.bytes));
    r = Registered{seg.base, static_cast<uint8_t*>(device), seg.bytes};
  }
  if (ref.offset > r.bytes || bytes > r.bytes - ref.offset) {
    return absl::InternalError("the daemon returned a reference outside its segment");
  }
  return ArenaSpan{r.host + ref.offset, r.device + ref.offset};
}

absl::StatusOr<ArenaSpan> AttachmentTransport::Map(const abi::ArenaRef& ref, uint64_t bytes) {
  absl::ReaderMutexLock lock(&mu_);
  if ((ref.segment & kVirtualSegment) == 0) return MapIn(current_.get(), ref, bytes);
  Staged s;
  {
    absl::MutexLock book(&book_mu_);
    auto it = staged_.find(ref.segment & ~kVirtualSegment);
    if (it == staged_.end()) return absl::InvalidArgumentError("not a live staging buffer");
    s = it->second;
  }
  if (ref.offset > s.bytes || bytes > s.bytes - ref.offset) {
    return absl::InvalidArgumentError("outside the staging buffer");
  }
  abi::ArenaRef real = s.real;
  real.offset += ref.offset;
  return MapIn(s.gen, real, bytes);
}

uint64_t AttachmentTransport::PageBytes(uint32_t segment) const {
  if (segment == 0 || segment >= abi::kMaxSegments) return 0;
  absl::ReaderMutexLock lock(&mu_);
  return current_->attachment->header()->segments[segment].page_bytes;
}

abi::ClientStats& AttachmentTransport::stats() {
  absl::ReaderMutexLock lock(&mu_);
  return current_->attachment->stats();
}

// ------------------------------------------------------------------ recovery
absl::Status AttachmentTransport::Recover(uint64_t seen) {
  absl::MutexLock lock(&mu_);
  if (current_->id != seen) return absl::OkStatus();  // another thread did it
  return RecoverLocked();
}

absl::Status AttachmentTransport::RecoverLocked() {
  const auto start = std::chrono::steady_clock::now();
  const absl::Time deadline = absl::Now() + reconnect_timeout_;
  Generation* const old = current_.get();
  // The daemon is gone once it closed the attach connection (a draining one answers
  // "shutting down" first and closes it when it exits).
  while (!old->attachment->PeerGone()) {
    if (absl::Now() > deadline) {
      return absl::UnavailableError("icecached answered UNAVAILABLE but did not go away");
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  // Answers that arrived before it went: acknowledged (a select's answers are read now,
  // while its buffer is still mapped). Unanswered requests are carried out again below.
  std::vector<std::shared_ptr<Pending>> resubmit, acknowledged;
  bool any_sequence;
  {
    absl::MutexLock book(&book_mu_);
    any_sequence = !sequences_.empty();
    for (auto& [t, p] : pending_) {
      if (p->settled || p->gen != old) continue;
      const abi::SlotHeader* slot = old->attachment->slot(p->slot);
      const uint32_t status = slot->status;
      const bool answered = old->attachment->Done(p->slot) &&
                            status != static_cast<uint32_t>(absl::StatusCode::kUnavailable);
      // A select answered OK is asked again: its pages are frames of the daemon that went.
      if (!answered || (p->kind == Pending::kSelect && status == 0)) {
        resubmit.push_back(p);
        continue;
      }
      p->settled = true;
      const uint32_t code = status <= 16 ? status : 2;
      p->settled_status =
          absl::Status(static_cast<absl::StatusCode>(code),
                       std::string(slot->message, strnlen(slot->message, sizeof(slot->message))));
      if (p->kind == Pending::kStaged && status == 0) acknowledged.push_back(p);
    }
  }
  for (auto& p : acknowledged) Acknowledge(*p);
  // Reconnect with backoff, handing back the old arena when there is something to restore.
  absl::Duration backoff = absl::Milliseconds(20);
  std::unique_ptr<Generation> g;
  while (true) {
    absl::StatusOr<std::unique_ptr<Generation>> got =
        Connect(any_sequence ? old->attachment.get() : nullptr);
    if (got.ok()) {
      g = std::move(*got);
      break;
    }
    if (absl::Now() + backoff > deadline) {
      return absl::UnavailableError(absl::StrCat("icecached did not come back within ",
                                                 absl::FormatDuration(reconnect_timeout_), ": ",
                                                 got.status().message()));
    }
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Milliseconds(500));
  }
  g->id = next_generation_++;
  // The counters this client published go on in the new arena.
  {
    abi::ClientStats& from = old->attachment->stats();
    abi::ClientStats& to = g->attachment->stats();
    to.cache_hits.fetch_add(from.cache_hits.load());
    to.cache_misses.fetch_add(from.cache_misses.load());
    to.fetched_bytes.fetch_add(from.fetched_bytes.load());
    to.fetch_nanoseconds.fetch_add(from.fetch_nanoseconds.load());
    to.decode_steps.fetch_add(from.decode_steps.load());
    to.prefetched_selects.fetch_add(from.prefetched_selects.load());
    to.drift_fallback_heads.fetch_add(from.drift_fallback_heads.load());
  }
  old_.push_back(std::move(current_));
  current_ = std::move(g);
  {
    absl::MutexLock book(&book_mu_);
    free_scratch_.clear();  // buffers of the old arena
  }
  // Restore every sequence from its acknowledged history.
  std::vector<std::string> handles;
  {
    absl::MutexLock book(&book_mu_);
    for (auto& [h, r] : sequences_) {
      if (!r.current.empty()) handles.push_back(h);
    }
  }
  for (size_t i = 0; i < handles.size(); ++i) {
    v1::RestoreSequenceRequest req;
    {
      absl::MutexLock book(&book_mu_);
      const SequenceRecord& r = sequences_.at(handles[i]);
      *req.mutable_geometry() = r.request.geometry();
      req.set_label(r.request.label());
      req.set_previous_handle(r.current);
      for (const auto& [layer, h] : r.layers) {
        if (!h.built) continue;
        v1::LayerHistory* lh = req.add_layers();
        lh->set_layer(layer);
        lh->set_prefill_first_position(h.prefill_first);
        lh->set_prefill_tokens(h.prefill_tokens);
        for (const auto& [first, tokens] : h.appends) {
          const int n = lh->appends_size();
          v1::AppendRun* last = n > 0 ? lh->mutable_appends(n - 1) : nullptr;
          if (last != nullptr && last->tokens() == tokens &&
              last->first_position() + last->count() * last->tokens() == first) {
            last->set_count(last->count() + 1);
          } else {
            v1::AppendRun* run = lh->add_appends();
            run->set_first_position(first);
            run->set_tokens(tokens);
            run->set_count(1);
          }
        }
      }
    }
    req.set_last(i + 1 == handles.size());
    v1::RestoreSequenceResponse resp;
    grpc::Status st;
    // The successor's control socket may come up after its attach socket: wait for it, and
    // try again while the channel is not connected, up to the deadline.
    for (absl::Duration pause = absl::Milliseconds(10);;
         pause = std::min(pause * 2, absl::Milliseconds(200))) {
      grpc::ClientContext ctx;
      ctx.AddMetadata(abi::kTokenMetadataKey, current_->attachment->token());
      ctx.set_wait_for_ready(true);
      // A restore rebuilds every layer: as long as the reconnect may take.
      ctx.set_deadline(std::chrono::system_clock::now() +
                       absl::ToChronoMilliseconds(std::max(reconnect_timeout_, timeout_)));
      st = current_->stub->RestoreSequence(&ctx, req, &resp);
      if (st.error_code() != grpc::StatusCode::UNAVAILABLE || absl::Now() + pause > deadline) {
        break;
      }
      absl::SleepFor(pause);
    }
    absl::MutexLock book(&book_mu_);
    SequenceRecord& r = sequences_.at(handles[i]);
    if (st.ok()) {
      r.current = resp.sequence().handle();
      ++counters_.restored_sequences;
    } else {
      r.lost = FromGrpc(st, "RestoreSequence");
      r.current.clear();
      ++counters_.lost_sequences;
      ICECACHE_LOG(WARNING) << "sequence " << handles[i]
                            << " could not be restored: " << r.lost.message();
    }
  }
  // Staging buffers stay in the arena they were staged in until they are submitted
  // (SubmitLocked moves them then, the resubmissions below included): a buffer staged before
  // the loss may still be being written through its old mapping by its owner.
  // Requests that had no answer, again, in their original order.
  for (auto& p : resubmit) {
    absl::Status st = SubmitLocked(p.get());
    if (!st.ok()) {
      p->settled = true;
      p->settled_status = st;
    }
    ++counters_.resubmitted;
  }
  // The old generations go later, from Stage (never from a host callback, which may be
  // where this recovery runs: unregistering host memory is a CUDA call).
  ++counters_.recoveries;
  counters_.last_stall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  counters_.total_stall_seconds += counters_.last_stall_seconds;
  ICECACHE_LOG(INFO) << "icecached came back: " << handles.size() << " sequences restored ("
                     << counters_.lost_sequences << " lost so far), " << resubmit.size()
                     << " requests resubmitted, " << counters_.last_stall_seconds << " s";
  return absl::OkStatus();
}

void AttachmentTransport::DropOldGenerations() {
  absl::MutexLock book(&book_mu_);
  for (auto it = old_.begin(); it != old_.end();) {
    Generation* g = it->get();
    bool used = false;
    for (auto& [vid, s] : staged_) used |= s.gen == g;
    for (auto& [t, p] : pending_) used |= !p->settled && p->gen == g;
    if (used) {
      ++it;
      continue;
    }
    for (Registered& r : g->segments) {
      if (r.host != nullptr) backend_->UnregisterHost(r.host);
      r = Registered{};
    }
    it = old_.erase(it);
  }
}

}  // namespace icecache::client_internal
