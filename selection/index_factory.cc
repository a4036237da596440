#include "selection/index_factory.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace icecache::selection {
namespace {

index::DciOptions TunedOptions() {
  index::DciOptions o;
  o.scale_query_projection = true;
  o.page_granular_scoring = true;
  o.joint_group_search = true;
  o.page_score = index::DciOptions::PageScore::kSoftmaxMass;
  o.group_merge = index::DciOptions::GroupMerge::kSumOfMass;
  o.exact_search_max_tokens = 4096;
  return o;
}

// The best-first search with 1-bit sketches and exact rescoring of each query's 128 best
// estimates (at least the pages asked for: a query nominates only pages of keys it rescored,
// and the default pages of 4 ask for 58 + 24 at 256), the k + 24 best pages re-ranked by the
// group's softmax mass, the beam-descent build, and pages cut from each cell
// by a PCA tree (docs/index.md: measured against the exact scan and the paper configuration;
// docs/model.md: the re-ranking's and the clustered pages' quality).
index::DciOptions FastOptions() {
  index::DciOptions o;
  o.search_mode = index::DciOptions::SearchMode::kBestFirstSketch;
  o.cell_bound_slack = 0.4f;
  o.rescore_tokens = 128;
  o.rerank_extra_pages = 24;
  o.parent_beam = 6;
  o.insert_beam = 8;
  o.page_order = index::DciOptions::PageOrder::kClustered;
  return o;
}

}  // namespace

std::vector<std::string> PresetNames() {
  return {std::string(kPaperPreset), std::string(kTunedPreset), std::string(kFastPreset)};
}

std::string PresetList() { return absl::StrJoin(PresetNames(), ", "); }

absl::StatusOr<IndexSpec> Preset(absl::string_view name) {
  if (name == kPaperPreset) return IndexSpec{std::string(name), index::DciOptions{}};
  if (name == kTunedPreset) return IndexSpec{std::string(name), TunedOptions()};
  if (name == kFastPreset) return IndexSpec{std::string(name), FastOptions()};
  return absl::InvalidArgumentError(
      absl::StrCat("unknown index preset '", name, "' (known: ", PresetList(), ")"));
}

absl::StatusOr<index::DciOptions::PageOrder> ParsePageOrder(absl::string_view name) {
  if (name == "projection") return index::DciOptions::PageOrder::kProjection;
  if (name == "clustered") return index::DciOptions::PageOrder::kClustered;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown page order '", name, "' (known: projection, clustered)"));
}

std::unique_ptr<index::KvIndex> CreateIndex(const IndexSpec& spec,
                                            const index::IndexGeometry& geometry,
                                            const index::PageReader* reader) {
  return std::make_unique<index::DciTree>(geometry, spec.dci, reader);
}

}  // namespace icecache::selection
