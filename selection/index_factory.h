// The index presets and the factory that turns a preset name (or explicit options) into a
// KvIndex: the one owner of "which index, configured how" for the daemon (--index-preset),
// the benchmarks, the model tools and the in-process replay (faiss's index_factory is the
// model: a name in, a ready index out).
//
// Presets
//   paper   the IceCache paper's configuration (../shared/reference/icecache-method.md), the
//           reference every improvement is measured against;
//   tuned   every measured improvement option of the DCI tree on (docs/index.md);
//   fast    the best-first search over cells with 1-bit sketches and exact rescoring, and the
//           beam-descent (n log n) build (docs/index.md).
// kDefaultPreset is what icecached serves when no preset is given, and what every benchmark
// uses as "the service's default": fast, which wins on speed and quality together
// (docs/index.md).
//
// Thread safety: pure functions; the indexes they create are as documented in kv_index.h.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/index/dci_tree.h"
#include "server/index/kv_index.h"

namespace icecache::selection {

struct IndexSpec {
  std::string name;       // the preset's name, or a caller's label for explicit options
  index::DciOptions dci;  // the IceCache DCI tree's options
};

inline constexpr absl::string_view kPaperPreset = "paper";
inline constexpr absl::string_view kTunedPreset = "tuned";
inline constexpr absl::string_view kFastPreset = "fast";
inline constexpr absl::string_view kDefaultPreset = kFastPreset;

// Every preset name, the paper's reference first.
std::vector<std::string> PresetNames();
// "paper, tuned, fast": for flag help and error messages.
std::string PresetList();

// INVALID_ARGUMENT naming the known presets when `name` is not one.
absl::StatusOr<IndexSpec> Preset(absl::string_view name);

// DciOptions::PageOrder by name: "projection" (the paper's slices along one direction) or
// "clustered" (the default preset's PCA-tree pages); INVALID_ARGUMENT naming both otherwise.
absl::StatusOr<index::DciOptions::PageOrder> ParsePageOrder(absl::string_view name);

// A new, empty index of `spec` over pages read through `reader` (which must outlive it).
std::unique_ptr<index::KvIndex> CreateIndex(const IndexSpec& spec,
                                            const index::IndexGeometry& geometry,
                                            const index::PageReader* reader);

}  // namespace icecache::selection
