// Baselines and the exact oracle, behind the same KvIndex interface as the DCI tree, for
// side-by-side quality and speed numbers.
//
//   PositionalIndex  pages are runs of page_size consecutive tokens (the layout of Quest,
//                    ArkVale, StreamingLLM); abstract over how pages are ranked.
//   QuestIndex       ranks positional pages by the Quest upper bound
//                    sum_c max(q_c * min_c, q_c * max_c) over per-page channel min/max.
//   StreamingIndex   selects nothing: attention is sink + window only (StreamingLLM).
//   ExactOracle      scores every key of another index's layout (any implementation) and
//                    returns its best pages; also the best tokens and full attention.
//
// Thread safety: as KvIndex. ExactOracle reads the layout of the index it wraps; call
// Refresh() after that index builds or inserts.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/index/kv_index.h"

namespace icecache::index {

class PositionalIndex : public KvIndex {
 public:
  PositionalIndex(const IndexGeometry& geometry, const PageReader* reader);

  const IndexGeometry& geometry() const override { return geometry_; }
  absl::Status Build(const KeyBatch& batch, PageWriter* writer) override;
  absl::Status Insert(const KeyBatch& batch, PageWriter* writer) override;
  uint32_t num_tokens() const override;
  uint32_t num_pages() const override;
  uint32_t page_id_limit() const override { return num_pages(); }
  std::vector<PageInfo> Layout() const override;
  uint64_t MemoryBytes() const override;

 protected:
  // Called under the writer lock after `count` tokens were appended to page `page` starting
  // at `slot` (their keys are now readable through the reader).
  virtual void OnAppended(uint32_t page, uint32_t slot, uint32_t count)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    (void)page;
    (void)slot;
    (void)count;
  }
  // Validation shared by the Search implementations.
  absl::Status CheckSearch(const float* queries, uint32_t group, uint32_t k,
                           std::vector<SelectedPage>* out) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  uint32_t valid(uint32_t page) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  IndexGeometry geometry_;
  const PageReader* reader_;
  mutable absl::Mutex mu_;
  std::vector<uint32_t> positions_ ABSL_GUARDED_BY(mu_);  // token order = slot order
  bool built_ ABSL_GUARDED_BY(mu_) = false;

 private:
  absl::Status Append(const KeyBatch& batch, PageWriter* writer)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
};

class QuestIndex final : public PositionalIndex {
 public:
  using PositionalIndex::PositionalIndex;
  const char* name() const override { return "quest"; }
  absl::Status Search(const float* queries, uint32_t group, uint32_t k,
                      std::vector<SelectedPage>* out) const override;
  uint64_t MemoryBytes() const override;

 private:
  void OnAppended(uint32_t page, uint32_t slot, uint32_t count) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<float> min_ ABSL_GUARDED_BY(mu_);  // [page][dim]
  std::vector<float> max_ ABSL_GUARDED_BY(mu_);  // [page][dim]
};

class StreamingIndex final : public PositionalIndex {
 public:
  using PositionalIndex::PositionalIndex;
  const char* name() const override { return "streaming-llm"; }
  // Validates like every index, then selects no page.
  absl::Status Search(const float* queries, uint32_t group, uint32_t k,
                      std::vector<SelectedPage>* out) const override;
};

class ExactOracle final : public KvIndex {
 public:
  enum class Rank : uint8_t {
    kBestToken,    // a page scores as its best token (the DCI tree's criterion; the exact scan)
    kSoftmaxMass,  // a page scores as the softmax mass of its tokens, summed over the group
                   // (the best pages for attention recall)
  };
  // Wraps `layout` (whose pages `reader` holds); both must outlive the oracle.
  ExactOracle(const KvIndex* layout, const PageReader* reader, Rank rank);

  const char* name() const override {
    return rank_ == Rank::kBestToken ? "exact-scan" : "oracle-pages";
  }
  const IndexGeometry& geometry() const override { return layout_->geometry(); }
  // The oracle lays out nothing itself: Build and Insert return FAILED_PRECONDITION (build
  // and insert into the wrapped index, then Refresh()).
  absl::Status Build(const KeyBatch& batch, PageWriter* writer) override;
  absl::Status Insert(const KeyBatch& batch, PageWriter* writer) override;
  // Scores every key. kBestToken: each query ranks pages by best token, lists merge
  // rank-interleaved; kSoftmaxMass: pages ranked by mass summed over the group.
  absl::Status Search(const float* queries, uint32_t group, uint32_t k,
                      std::vector<SelectedPage>* out) const override;
  uint32_t num_tokens() const override;
  uint32_t num_pages() const override;
  uint32_t page_id_limit() const override { return layout_->page_id_limit(); }
  std::vector<PageInfo> Layout() const override { return layout_->Layout(); }
  uint64_t MemoryBytes() const override;

  // Re-reads the wrapped index's layout.
  void Refresh();

  // The `count` best tokens (positions) for the group: largest softmax mass summed over the
  // group's queries. INVALID_ARGUMENT for bad queries.
  absl::Status TopTokens(const float* queries, uint32_t group, uint32_t count,
                         std::vector<uint32_t>* positions) const;

 private:
  const KvIndex* layout_;
  const PageReader* reader_;
  Rank rank_;
  mutable absl::Mutex mu_;
  std::vector<PageInfo> pages_ ABSL_GUARDED_BY(mu_);
  uint32_t tokens_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace icecache::index
