// The exact oracle behind the KvIndex interface: scores every key of another index's layout
// and returns its best pages. Every quality number is measured against it (attention recall
// of a selection, the exact page scan that bounds the DCI tree's speed), and the daemon's
// recall sampler calls it to export the recall of the pages it returned.
//
// Thread safety: as KvIndex. The oracle reads the layout of the index it wraps; call
// Refresh() after that index builds or inserts.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "server/index/kv_index.h"

namespace icecache::index {

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
  uint64_t MaxBuildPages(uint64_t) const override { return 0; }
  uint64_t MaxInsertPages(uint64_t) const override { return 0; }
  uint32_t num_tokens() const override;
  uint32_t num_pages() const override;
  uint32_t page_id_limit() const override { return layout_->page_id_limit(); }
  std::vector<PageInfo> Layout() const override { return layout_->Layout(); }
  uint64_t MemoryBytes() const override;

  // Re-reads the wrapped index's layout.
  void Refresh();

  // For each of the group's queries, the share of its softmax mass over every token of the
  // layout that falls on the tokens of `pages` (page ids of the layout; unknown ids carry
  // nothing): the attention recall of a selection. shares: [group].
  // INVALID_ARGUMENT for bad queries; FAILED_PRECONDITION before the layout holds a page.
  absl::Status MassShares(const float* queries, uint32_t group, absl::Span<const uint32_t> pages,
                          std::vector<double>* shares) const;

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
