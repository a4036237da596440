// The real Transport: icecached's request slots and arena through an Attachment, gRPC for the
// control call, and the backend's registration of every data segment the kernels touch (one
// cudaHostRegister per segment in CUDA mode, done here on first use, outside the
// attachment's locks). Internal to libicecache_client.
//
// Thread safety: thread-safe.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/backend.h"
#include "client/transport.h"
#include "icecache/attachment.h"
#include "icecache/v1/icecache.grpc.pb.h"

namespace icecache::client_internal {

class AttachmentTransport final : public Transport {
 public:
  // `attachment` and `backend` must outlive the transport; `socket` is the control socket.
  AttachmentTransport(Attachment* attachment, Backend* backend, const std::string& socket,
                      absl::Duration timeout);
  ~AttachmentTransport() override;  // unregisters the segments it registered

  absl::StatusOr<abi::StageResponse> Stage(const std::string& handle, uint32_t tokens) override;
  absl::Status ReleaseStaging(const std::string& handle, const abi::ArenaRef& staging) override;
  absl::StatusOr<Ticket> SubmitStaged(uint32_t op, const std::string& handle, uint32_t layer,
                                      const abi::ArenaRef& staging, uint32_t tokens,
                                      uint32_t first_position) override;
  absl::Status Finish(Ticket ticket) override;
  absl::StatusOr<Ticket> SubmitSelect(const std::string& handle, uint32_t layer,
                                      const float* queries, size_t query_floats, uint32_t k,
                                      const uint8_t* head_mask, size_t num_kv_heads) override;
  absl::StatusOr<std::vector<abi::SelectedPageRef>> FinishSelect(Ticket ticket) override;
  bool Done(Ticket ticket) const override;
  absl::StatusOr<ArenaSpan> Map(const abi::ArenaRef& ref, uint64_t bytes) override;
  uint64_t PageBytes(uint32_t segment) const override;
  absl::Status DropSequence(const std::string& handle) override;
  abi::ClientStats& stats() override;

  // The control stub and a context carrying this client's token and deadline.
  v1::IceCache::Stub& stub() { return *stub_; }
  void PrepareContext(grpc::ClientContext* ctx) const;

 private:
  struct Registered {
    uint8_t* host = nullptr;
    uint8_t* device = nullptr;
    uint64_t bytes = 0;
  };
  Attachment* const attachment_;
  Backend* const backend_;
  const absl::Duration timeout_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::IceCache::Stub> stub_;
  absl::Mutex mu_;
  std::vector<Registered> segments_ ABSL_GUARDED_BY(mu_);
};

}  // namespace icecache::client_internal
