// Baselines behind the same KvIndex interface as the DCI tree, for side-by-side quality and
// speed numbers (evaluation only: icecached does not link them).
//
//   PositionalIndex  pages are runs of page_size consecutive tokens (the layout of Quest,
//                    ArkVale, StreamingLLM); abstract over how pages are ranked.
//   QuestIndex       ranks positional pages by the Quest upper bound
//                    sum_c max(q_c * min_c, q_c * max_c) over per-page channel min/max.
//   StreamingIndex   selects nothing: attention is sink + window only (StreamingLLM).
//
// The exact oracle they are measured against is server/index/exact_oracle.h.
//
// Thread safety: as KvIndex.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "eval/index_types.h"

namespace icecache::eval {

class PositionalIndex : public KvIndex {
 public:
  PositionalIndex(const IndexGeometry& geometry, const PageReader* reader);

  const IndexGeometry& geometry() const override { return geometry_; }
  absl::Status Build(const KeyBatch& batch, PageWriter* writer) override;
  absl::Status Insert(const KeyBatch& batch, PageWriter* writer) override;
  // Positional pages: the last partial page is filled first, then whole new pages.
  uint64_t MaxBuildPages(uint64_t tokens) const override {
    return (tokens + geometry_.page_size - 1) / geometry_.page_size;
  }
  uint64_t MaxInsertPages(uint64_t tokens) const override { return MaxBuildPages(tokens) + 1; }
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
  absl::Status Append(const KeyBatch& batch, PageWriter* writer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
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

}  // namespace icecache::eval
