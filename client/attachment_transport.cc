#include "client/attachment_transport.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace icecache::client_internal {

AttachmentTransport::AttachmentTransport(Attachment* attachment, Backend* backend,
                                         const std::string& socket, absl::Duration timeout)
    : attachment_(attachment),
      backend_(backend),
      timeout_(timeout),
      channel_(grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials())),
      stub_(v1::IceCache::NewStub(channel_)),
      segments_(abi::kMaxSegments) {}

AttachmentTransport::~AttachmentTransport() {
  // Registrations go before the attachment unmaps the segments.
  absl::MutexLock lock(&mu_);
  for (Registered& r : segments_) {
    if (r.host != nullptr) backend_->UnregisterHost(r.host);
    r = Registered{};
  }
}

absl::StatusOr<abi::StageResponse> AttachmentTransport::Stage(const std::string& handle,
                                                              uint32_t tokens) {
  return attachment_->Stage(handle, tokens);
}

absl::Status AttachmentTransport::ReleaseStaging(const std::string& handle,
                                                 const abi::ArenaRef& staging) {
  return attachment_->ReleaseStaging(handle, staging);
}

absl::StatusOr<Ticket> AttachmentTransport::SubmitStaged(uint32_t op, const std::string& handle,
                                                         uint32_t layer,
                                                         const abi::ArenaRef& staging,
                                                         uint32_t tokens, uint32_t first_position) {
  return attachment_->SubmitStaged(op, handle, layer, staging, tokens, first_position);
}

absl::Status AttachmentTransport::Finish(Ticket ticket) { return attachment_->Finish(ticket); }

namespace {

uint64_t Align64(uint64_t n) { return (n + 63) / 64 * 64; }

}  // namespace

AttachmentTransport::Layout AttachmentTransport::LayoutOf(
    absl::Span<const SelectRequest> requests) {
  Layout l;
  const uint64_t n = requests.size();
  l.query_at.resize(n);
  l.result_at.resize(n);
  l.result_cap.resize(n);
  l.bytes = Align64(n * sizeof(abi::BatchSelectEntry));
  for (uint64_t i = 0; i < n; ++i) {
    const SelectRequest& q = requests[i];
    l.query_at[i] = l.bytes;
    l.bytes +=
        Align64(q.query_floats * sizeof(float) + (q.head_mask != nullptr ? q.num_kv_heads : 0));
    l.result_at[i] = l.bytes;
    l.result_cap[i] = uint64_t{q.num_kv_heads} * q.k;
    l.bytes += Align64(l.result_cap[i] * sizeof(abi::SelectedPageRef));
  }
  return l;
}

absl::StatusOr<AttachmentTransport::Scratch> AttachmentTransport::AcquireScratch(uint64_t bytes) {
  {
    absl::MutexLock lock(&scratch_mu_);
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
  // Room to grow: a batch may gain sequences.
  absl::StatusOr<abi::StageResponse> got =
      attachment_->Scratch(std::max<uint64_t>(bytes * 2, uint64_t{64} << 10));
  if (!got.ok()) return got.status();
  absl::StatusOr<uint8_t*> at = attachment_->Address(got->buffer, got->bytes);
  if (!at.ok()) {
    (void)attachment_->ReleaseStaging("", got->buffer);
    return at.status();
  }
  return Scratch{*got, *at};
}

void AttachmentTransport::ReturnScratch(Scratch scratch) {
  Scratch drop;
  {
    absl::MutexLock lock(&scratch_mu_);
    free_scratch_.push_back(scratch);
    if (free_scratch_.size() <= kMaxFreeScratch) return;
    auto smallest = std::min_element(
        free_scratch_.begin(), free_scratch_.end(),
        [](const Scratch& a, const Scratch& b) { return a.buffer.bytes < b.buffer.bytes; });
    drop = *smallest;
    free_scratch_.erase(smallest);
  }
  (void)attachment_->ReleaseStaging("", drop.buffer.buffer);
}

absl::Status AttachmentTransport::PrepareSelectBatch(absl::Span<const SelectRequest> requests) {
  if (requests.empty()) return absl::OkStatus();
  absl::StatusOr<Scratch> sc = AcquireScratch(LayoutOf(requests).bytes);
  if (!sc.ok()) return sc.status();
  ReturnScratch(*sc);
  return absl::OkStatus();
}

absl::StatusOr<Ticket> AttachmentTransport::SubmitSelectBatch(
    uint32_t layer, absl::Span<const SelectRequest> requests) {
  if (requests.empty() || requests.size() > abi::kMaxBatchSelect) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a batch select of ", requests.size(), " sequences: must be in 1..", abi::kMaxBatchSelect));
  }
  Layout l = LayoutOf(requests);
  absl::StatusOr<Scratch> sc = AcquireScratch(l.bytes);
  if (!sc.ok()) return sc.status();
  uint8_t* const host = sc->host;
  const uint64_t n = requests.size();
  for (uint64_t i = 0; i < n; ++i) {
    const SelectRequest& q = requests[i];
    abi::BatchSelectEntry e{};
    std::memcpy(e.handle, q.handle.data(), std::min(q.handle.size(), sizeof(e.handle)));
    e.k = q.k;
    e.select_flags = q.head_mask != nullptr ? uint32_t{abi::kSelectHeadMask} : 0u;
    e.query_offset = l.query_at[i];
    e.query_bytes = q.query_floats * sizeof(float) + (q.head_mask != nullptr ? q.num_kv_heads : 0);
    e.result_offset = l.result_at[i];
    e.result_bytes = l.result_cap[i] * sizeof(abi::SelectedPageRef);
    std::memcpy(host + i * sizeof(abi::BatchSelectEntry), &e, sizeof(e));
    std::memcpy(host + l.query_at[i], q.queries, q.query_floats * sizeof(float));
    if (q.head_mask != nullptr) {
      std::memcpy(host + l.query_at[i] + q.query_floats * sizeof(float), q.head_mask,
                  q.num_kv_heads);
    }
  }
  absl::StatusOr<uint32_t> slot =
      attachment_->SubmitSelectBatch(layer, sc->buffer.buffer, static_cast<uint32_t>(n));
  if (!slot.ok()) {
    ReturnScratch(*sc);
    return slot.status();
  }
  absl::MutexLock lock(&scratch_mu_);
  in_flight_[*slot] = InFlight{*sc, std::move(l.result_at), std::move(l.result_cap)};
  return *slot;
}

absl::StatusOr<std::vector<SelectAnswer>> AttachmentTransport::FinishSelectBatch(Ticket ticket) {
  InFlight f;
  {
    absl::MutexLock lock(&scratch_mu_);
    auto it = in_flight_.find(ticket);
    if (it == in_flight_.end()) return absl::InternalError("not a batch select in flight");
    f = std::move(it->second);
    in_flight_.erase(it);
  }
  // Finish waits for the daemon's answer however long it takes: the buffer is ours again after.
  absl::Status st = attachment_->Finish(ticket);
  if (!st.ok()) {
    ReturnScratch(f.scratch);
    return st;
  }
  std::vector<SelectAnswer> answers(f.result_offsets.size());
  const uint8_t* const host = f.scratch.host;
  for (size_t i = 0; i < answers.size(); ++i) {
    abi::BatchSelectEntry e;
    std::memcpy(&e, host + i * sizeof(abi::BatchSelectEntry), sizeof(e));
    if (e.status != 0) {
      // A code outside google.rpc.Code would be the daemon's bug; it reads as UNKNOWN.
      const uint32_t code = e.status <= 16 ? e.status : 2;
      answers[i].status =
          absl::Status(static_cast<absl::StatusCode>(code),
                       std::string(e.message, strnlen(e.message, sizeof(e.message))));
      continue;
    }
    answers[i].pages.resize(f.result_capacity[i]);
    std::memcpy(answers[i].pages.data(), host + f.result_offsets[i],
                f.result_capacity[i] * sizeof(abi::SelectedPageRef));
  }
  ReturnScratch(f.scratch);
  return answers;
}

bool AttachmentTransport::Done(Ticket ticket) const { return attachment_->Done(ticket); }

absl::StatusOr<ArenaSpan> AttachmentTransport::Map(const abi::ArenaRef& ref, uint64_t bytes) {
  if (ref.segment == 0 || ref.segment >= abi::kMaxSegments) {
    return absl::InternalError("the daemon returned a reference outside the data segments");
  }
  {
    absl::MutexLock lock(&mu_);
    const Registered& r = segments_[ref.segment];
    if (r.host != nullptr) {
      if (ref.offset > r.bytes || bytes > r.bytes - ref.offset) {
        return absl::InternalError("the daemon returned a reference outside its segment");
      }
      return ArenaSpan{r.host + ref.offset, r.device + ref.offset};
    }
  }
  // First use of the segment: map it (the attachment's lock), then register it (ours).
  absl::StatusOr<Attachment::Segment> seg = attachment_->MapSegment(ref.segment);
  if (!seg.ok()) return seg.status();
  absl::MutexLock lock(&mu_);
  Registered& r = segments_[ref.segment];
  if (r.host == nullptr) {
    absl::StatusOr<void*> device = backend_->RegisterHost(seg->base, seg->bytes);
    if (!device.ok()) return device.status();
    r = Registered{seg->base, static_cast<uint8_t*>(*device), seg->bytes};
  }
  if (ref.offset > r.bytes || bytes > r.bytes - ref.offset) {
    return absl::InternalError("the daemon returned a reference outside its segment");
  }
  return ArenaSpan{r.host + ref.offset, r.device + ref.offset};
}

uint64_t AttachmentTransport::PageBytes(uint32_t segment) const {
  if (segment == 0 || segment >= abi::kMaxSegments) return 0;
  return attachment_->header()->segments[segment].page_bytes;
}

void AttachmentTransport::PrepareContext(grpc::ClientContext* ctx) const {
  ctx->AddMetadata(abi::kTokenMetadataKey, attachment_->token());
  ctx->set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout_));
}

absl::Status AttachmentTransport::DropSequence(const std::string& handle) {
  grpc::ClientContext ctx;
  PrepareContext(&ctx);
  v1::DropSequenceRequest req;
  req.set_handle(handle);
  v1::DropSequenceResponse resp;
  const grpc::Status st = stub_->DropSequence(&ctx, req, &resp);
  if (st.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(st.error_code()),
                      absl::StrCat("DropSequence: ", st.error_message()));
}

abi::ClientStats& AttachmentTransport::stats() { return attachment_->stats(); }

}  // namespace icecache::client_internal
