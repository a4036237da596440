#include "client/attachment_transport.h"

#include <grpcpp/grpcpp.h>

#include <chrono>

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

absl::StatusOr<Ticket> AttachmentTransport::SubmitSelect(const std::string& handle, uint32_t layer,
                                                         const float* queries, size_t query_floats,
                                                         uint32_t k, const uint8_t* head_mask,
                                                         size_t num_kv_heads) {
  return attachment_->SubmitSelect(handle, layer, queries, query_floats, k, head_mask,
                                   num_kv_heads);
}

absl::StatusOr<std::vector<abi::SelectedPageRef>> AttachmentTransport::FinishSelect(Ticket ticket) {
  return attachment_->FinishSelect(ticket);
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
