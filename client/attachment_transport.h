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
#include "absl/container/flat_hash_map.h"
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
  absl::StatusOr<Ticket> SubmitSelectBatch(uint32_t layer,
                                           absl::Span<const SelectRequest> requests) override;
  absl::StatusOr<std::vector<SelectAnswer>> FinishSelectBatch(Ticket ticket) override;
  absl::Status PrepareSelectBatch(absl::Span<const SelectRequest> requests) override;
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

  // Scratch buffers for batch selects: a pool, each buffer owned by one ticket in flight at a
  // time (decodes of different sequences, and a decode's select one step ahead, may be in
  // flight together), back in the pool once its answers are read.
  struct Scratch {
    abi::StageResponse buffer{};
    uint8_t* host = nullptr;
  };
  struct InFlight {
    Scratch scratch;
    std::vector<uint64_t> result_offsets;
    std::vector<uint64_t> result_capacity;  // SelectedPageRef entries
  };
  // The layout of a batch's buffer.
  struct Layout {
    std::vector<uint64_t> query_at, result_at, result_cap;
    uint64_t bytes = 0;
  };
  static Layout LayoutOf(absl::Span<const SelectRequest> requests);
  // A free buffer of at least `bytes` (the smallest that fits), or a new one from the daemon.
  absl::StatusOr<Scratch> AcquireScratch(uint64_t bytes);
  // Back into the pool; beyond kMaxFreeScratch free buffers, the smallest goes back to the
  // daemon.
  void ReturnScratch(Scratch scratch);
  static constexpr size_t kMaxFreeScratch = 8;
  absl::Mutex scratch_mu_;
  std::vector<Scratch> free_scratch_ ABSL_GUARDED_BY(scratch_mu_);
  absl::flat_hash_map<Ticket, InFlight> in_flight_ ABSL_GUARDED_BY(scratch_mu_);
};

}  // namespace icecache::client_internal
