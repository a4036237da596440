// An in-process stand-in for icecached behind the client's Transport interface: the real page
// store and index (server/core Arena and SequenceKv, the index factory), no sockets, no
// processes. A client Sequence built on it (CPU backend) is unit tested end to end, and the
// tests steer what a daemon would decide on its own: when answers arrive (deferred, out of
// order), errors injected into one kind of request, a bounded number of request slots.
//
// Thread safety: one test thread.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "client/backend.h"
#include "client/decoder.h"
#include "client/sequence_impl.h"
#include "client/transport.h"
#include "common/thread_pool.h"
#include "selection/index_factory.h"
#include "server/core/arena.h"
#include "server/core/geometry.h"
#include "server/core/memory_accountant.h"
#include "server/core/sequence_kv.h"

namespace icecache::testing {

class FakeDaemon final : public client_internal::Transport {
 public:
  struct Options {
    std::string preset = "paper";
    uint32_t slots = 8;  // tickets outstanding at most (then SlotsExhausted)
    uint64_t memory = uint64_t{1} << 30;
  };
  explicit FakeDaemon(const Options& options);
  FakeDaemon() : FakeDaemon(Options{}) {}
  ~FakeDaemon() override;
  client_internal::Decoder* decoder() const { return decoder_.get(); }

  // Resolves `spec` like CreateSequence does and returns a context for SequenceFactory on
  // `backend` (the caller sets cache options; the attention's scale is spec.softmax_scale,
  // resolved, as the daemon's).
  absl::StatusOr<client_internal::SequenceContext> CreateSequence(
      const GeometrySpec& spec, client_internal::Backend* backend);

  // ---- steering
  // Answers wait until Finish (or Answer) instead of being computed at submission.
  void set_deferred(bool deferred) { deferred_ = deferred; }
  // Computes the answer of an outstanding ticket now (out of order, when the test wants; a
  // select first answers the staged ops of its layer submitted before it, as icecached).
  void Answer(client_internal::Ticket ticket);
  // The next request of kind `op` (abi::kOp*) gets `status` instead of being run (a
  // kOpStage: the Stage call returns it).
  void FailNext(uint32_t op, absl::Status status) { fail_[op] = std::move(status); }
  // The next PrepareSelectBatch answers `status` (e.g. no scratch within the memory quota).
  void FailNextPrepare(absl::Status status) { fail_prepare_ = std::move(status); }
  // The next batch select's first answer carries one page reference the client must refuse
  // (a valid count above the page size), after some good ones: a step that fails in its
  // plan, after it placed pages in its cache.
  void SpoilNextSelect() { spoil_next_select_ = true; }
  // What was asked: requests of each kind so far, and the positions of every append.
  uint64_t requests(uint32_t op) const;
  const std::vector<uint32_t>& append_positions() const { return append_positions_; }
  // Selects that searched only some KV heads (a head mask), and the heads they searched;
  // batch requests and the largest batch.
  uint64_t masked_selects() const { return masked_selects_; }
  uint64_t masked_heads() const { return masked_heads_; }
  uint64_t batch_selects() const { return requests(abi::kOpSelectBatch); }
  uint64_t largest_batch() const { return largest_batch_; }
  size_t outstanding() const { return tickets_.size(); }
  uint64_t staging_bytes_in_use() const { return arena_->staging_bytes_in_use(); }
  bool has_sequence(const std::string& handle) const { return kv_.count(handle) != 0; }
  // The last select answer computed for a sequence (any layer; empty before one): its pages
  // and, when its geometry keeps a tail estimate, its tail partials.
  client_internal::SelectAnswer last_answer(const std::string& handle) const {
    auto it = last_answers_.find(handle);
    return it == last_answers_.end() ? client_internal::SelectAnswer{} : it->second;
  }

  // ---- Transport
  absl::StatusOr<abi::StageResponse> Stage(const std::string& handle, uint32_t tokens) override;
  absl::Status ReleaseStaging(const std::string& handle, const abi::ArenaRef& staging) override;
  absl::StatusOr<client_internal::Ticket> SubmitStaged(uint32_t op, const std::string& handle,
                                                       uint32_t layer, const abi::ArenaRef& staging,
                                                       uint32_t tokens,
                                                       uint32_t first_position) override;
  absl::Status Finish(client_internal::Ticket ticket) override;
  absl::StatusOr<client_internal::Ticket> SubmitSelectBatch(
      uint32_t layer, absl::Span<const client_internal::SelectRequest> requests) override;
  absl::StatusOr<std::vector<client_internal::SelectAnswer>> FinishSelectBatch(
      client_internal::Ticket ticket) override;
  absl::Status PrepareSelectBatch(absl::Span<const client_internal::SelectRequest>) override {
    return std::exchange(fail_prepare_, absl::OkStatus());
  }
  bool Done(client_internal::Ticket ticket) const override;
  absl::StatusOr<client_internal::ArenaSpan> Map(const abi::ArenaRef& ref, uint64_t bytes) override;
  uint64_t PageBytes(uint32_t segment) const override;
  absl::Status DropSequence(const std::string& handle) override;
  abi::ClientStats& stats() override;

 private:
  struct Pending {
    std::vector<std::string> keys;  // handle/layer: a select runs after the staged ops before
    bool select = false;
    std::function<absl::Status()> run;
    std::optional<absl::Status> status;
    std::vector<client_internal::SelectAnswer> answers;  // a select's
  };
  absl::StatusOr<client_internal::Ticket> Enqueue(uint32_t op, Pending p);
  absl::StatusOr<SequenceKv*> Find(const std::string& handle);

  const Options options_;
  MemoryAccountant memory_;
  ThreadPool pool_;
  std::shared_ptr<Arena> arena_;
  selection::IndexSpec index_;
  std::map<std::string, std::unique_ptr<SequenceKv>> kv_;
  std::unique_ptr<client_internal::Decoder> decoder_;  // the sequences' (one backend)
  std::map<client_internal::Ticket, Pending> tickets_;
  client_internal::Ticket next_ticket_ = 1;
  uint64_t next_handle_ = 1;
  bool deferred_ = false;
  std::map<uint32_t, absl::Status> fail_;
  absl::Status fail_prepare_;
  bool spoil_next_select_ = false;
  std::map<uint32_t, uint64_t> requests_;
  std::vector<uint32_t> append_positions_;
  std::map<client_internal::Ticket, std::shared_ptr<std::vector<client_internal::SelectAnswer>>>
      batch_answers_;
  uint64_t masked_selects_ = 0, masked_heads_ = 0, largest_batch_ = 0;
  std::map<std::string, client_internal::SelectAnswer> last_answers_;
};

}  // namespace icecache::testing
