// All the KV heads of one (sequence, layer): one index per KV head, built and searched in
// parallel on a worker pool. Query heads map to KV heads by GQA groups: query head h searches
// KV head h / group_size.
//
// Thread safety: as KvIndex (per head). Build/Insert/Search may be called from any thread;
// the pool's ParallelFor runs nested loops inline, so calling from a pool worker is safe.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "common/thread_pool.h"
#include "eval/index_types.h"
#include "selection/index_factory.h"

namespace icecache::eval {

class LayerIndex {
 public:
  // `readers[h]` holds the pages of KV head h; `pool` runs the per-head work. All must
  // outlive the LayerIndex.
  LayerIndex(const IndexGeometry& geometry, const selection::IndexSpec& spec, uint32_t num_kv_heads,
             uint32_t group_size, std::vector<const PageReader*> readers, ThreadPool* pool);

  uint32_t num_kv_heads() const { return static_cast<uint32_t>(heads_.size()); }
  KvIndex& head(uint32_t h) { return *heads_[h]; }
  const KvIndex& head(uint32_t h) const { return *heads_[h]; }

  // batches[h] and writers[h] for every KV head, built in parallel. INVALID_ARGUMENT when the
  // counts do not match num_kv_heads; otherwise the first head's error (heads that succeeded
  // stay built).
  absl::Status Build(const std::vector<KeyBatch>& batches, const std::vector<PageWriter*>& writers);
  absl::Status Insert(const std::vector<KeyBatch>& batches,
                      const std::vector<PageWriter*>& writers);

  // queries: [num_kv_heads * group_size][dim] fp32, row-major. out[h] receives KV head h's
  // merged selection of k pages. Errors as KvIndex::Search (the first head's).
  absl::Status Search(const float* queries, uint32_t k,
                      std::vector<std::vector<SelectedPage>>* out) const;

 private:
  absl::Status ForEachHead(const std::function<absl::Status(uint32_t)>& fn) const;

  IndexGeometry geometry_;
  uint32_t group_size_;
  std::vector<std::unique_ptr<KvIndex>> heads_;
  ThreadPool* pool_;
};

}  // namespace icecache::eval
