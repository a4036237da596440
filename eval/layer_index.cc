#include "eval/layer_index.h"

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace icecache::eval {

LayerIndex::LayerIndex(const IndexGeometry& geometry, const selection::IndexSpec& spec,
                       uint32_t num_kv_heads, uint32_t group_size,
                       std::vector<const PageReader*> readers, ThreadPool* pool)
    : geometry_(geometry), group_size_(group_size), pool_(pool) {
  heads_.reserve(num_kv_heads);
  for (uint32_t h = 0; h < num_kv_heads; ++h) {
    heads_.push_back(selection::CreateIndex(spec, geometry, readers.at(h)));
  }
}

absl::Status LayerIndex::ForEachHead(const std::function<absl::Status(uint32_t)>& fn) const {
  std::vector<absl::Status> status(heads_.size());
  pool_->ParallelFor(heads_.size(), [&](size_t h) { status[h] = fn(static_cast<uint32_t>(h)); });
  for (size_t h = 0; h < status.size(); ++h) {
    if (!status[h].ok()) {
      return absl::Status(status[h].code(), absl::StrCat("KV head ", h, ": ", status[h].message()));
    }
  }
  return absl::OkStatus();
}

absl::Status LayerIndex::Build(const std::vector<KeyBatch>& batches,
                               const std::vector<PageWriter*>& writers) {
  if (batches.size() != heads_.size() || writers.size() != heads_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("need ", heads_.size(), " batches and writers (one per KV head)"));
  }
  return ForEachHead([&](uint32_t h) { return heads_[h]->Build(batches[h], writers[h]); });
}

absl::Status LayerIndex::Insert(const std::vector<KeyBatch>& batches,
                                const std::vector<PageWriter*>& writers) {
  if (batches.size() != heads_.size() || writers.size() != heads_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("need ", heads_.size(), " batches and writers (one per KV head)"));
  }
  return ForEachHead([&](uint32_t h) { return heads_[h]->Insert(batches[h], writers[h]); });
}

absl::Status LayerIndex::Search(const float* queries, uint32_t k,
                                std::vector<std::vector<SelectedPage>>* out) const {
  if (queries == nullptr || out == nullptr) return absl::InvalidArgumentError("null argument");
  out->assign(heads_.size(), {});
  return ForEachHead([&](uint32_t h) {
    return heads_[h]->Search(queries + uint64_t{h} * group_size_ * geometry_.dim, group_size_, k,
                             &(*out)[h]);
  });
}

}  // namespace icecache::eval
