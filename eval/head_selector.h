// Online token selection for one (layer, KV head), replayed in process the way the service
// decodes: the sink and the recent window follow selection::WindowPolicy (the client
// library's state machine), and everything handed to the index is indexed by one method (the
// IceCache DCI tree from a preset, a baseline, or an oracle), which picks pages (or tokens)
// for the GQA group's queries. A page handed over at step t is in the index from step t + 1
// on, as when the daemon inserts it while the engine runs the rest of the step.
//
// Used by the quality evaluation on traces (evaluation.h) and by the model's in-process
// attention backends (model/attention.h), so both replay exactly the service's policy.
//
// Thread safety: none (one owner).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "eval/baselines.h"
#include "eval/in_memory_pages.h"
#include "eval/index_types.h"
#include "selection/budget.h"
#include "selection/tail.h"
#include "selection/window_policy.h"

namespace icecache::eval {

enum class MethodKind : uint8_t {
  kDci,                    // the IceCache DCI tree (options in MethodSpec::dci)
  kQuest,                  // Quest-style bound over positional pages
  kStreaming,              // sink + the most recent tokens (the pages' share too)
  kOraclePagesOurLayout,   // best pages (softmax mass) of the DCI layout
  kOraclePagesPositional,  // best positional pages
  kOracleTokens,           // best individual tokens (budget counted in tokens)
};

// How the replay selects, as the client's SelectionMode: kSync searches with each step's own
// queries; kAsync with the previous step's (searched one step ahead in the service), except
// when the lowest cosine between a query head's previous and current query falls below
// drift_threshold (then with the current ones). The first selection is synchronous.
struct ReplayOptions {
  bool async = false;
  float drift_threshold = 0.9f;
};

// How the pages of a layer's decode step are shared between its KV heads.
enum class HeadBudget : uint8_t {
  kFixed,     // every head selected_pages() (the paper's split)
  kObserved,  // the layer's num_kv_heads * selected_pages() shared in proportion to each head's
              // share of attention mass outside its sink and window in the previous step, as
              // its attention saw it (exact over what it attended, plus the tail estimate);
              // realisable by a client from its own softmax partials
  kOracle,    // the same shares from the exact attention over every position at this step
              // (an upper bound of what the split can give, not realisable)
  kObservedLayers,  // the observed shares averaged per layer move pages between layers (all
                    // selective layers' total kept; a layer's heads get the same count)
  kObservedAll,     // the observed shares move pages between every (layer, KV head) pair
};
std::string_view HeadBudgetName(HeadBudget b);

struct MethodSpec {
  std::string name;
  MethodKind kind = MethodKind::kDci;
  DciOptions dci;        // for kDci and kOraclePagesOurLayout
  ReplayOptions replay;  // synchronous unless set
  // How the attention treats the indexed tokens it did not select (selection/tail.h).
  selection::TailMode tail = selection::TailMode::kNone;
  // Recent-window tokens replacing the budget split's (0: the split's): the StreamingLLM +
  // pages hybrid spends part of the pages' share on a longer window. The split stays valid
  // (WithWindow).
  uint32_t window_tokens = 0;
  // Pages between the KV heads of a layer (kFixed: the split's selected_pages() each).
  HeadBudget head_budget = HeadBudget::kFixed;
  // The tail estimate's page summaries rounded to this 16-bit type, as icecached stores them
  // (server/core/sequence_kv.cc); nullopt: kept in fp32.
  std::optional<DType> summary_type;
};

// `split` with the method's window (MethodSpec::window_tokens), the pages' share shrunk to
// keep the budget; INVALID_ARGUMENT when no selected page would be left.
absl::StatusOr<selection::BudgetSplit> WithWindow(const MethodSpec& spec,
                                                  const selection::BudgetSplit& split);

// A method of `kind` named `name` (DCI options and replay at their defaults).
MethodSpec Method(const std::string& name, MethodKind kind);

// The paper-faithful DCI tree, the baselines and the three oracles.
std::vector<MethodSpec> DefaultMethods();
// The DCI tree of an index preset (selection/index_factory.h), named `name`.
absl::StatusOr<MethodSpec> PresetMethod(const std::string& name, const std::string& preset);

class HeadSelector {
 public:
  // The sink and window of `split` (its budget is only the default of Select's `pages`);
  // `geometry` of the keys the caller passes.
  HeadSelector(const MethodSpec& spec, const selection::BudgetSplit& split,
               const IndexGeometry& geometry);
  ~HeadSelector();
  HeadSelector(const HeadSelector&) = delete;
  HeadSelector& operator=(const HeadSelector&) = delete;

  // The positions to attend for the query at position p, sorted and unique: the sink, the
  // window (pages in hand-over included), and the tokens of the `pages` best pages
  // (kOracleTokens: the pages * page_size best tokens; kStreaming: the pages * page_size
  // positions just before the window) for the group's queries ([group][head_dim] fp32).
  // The first call treats positions [0, p) as the prompt; every later position up to p is
  // decoded (appended, windows handed over) before selecting. `keys` holds one row per
  // position, at least p + 1 rows, and the rows of earlier positions must not change
  // between calls. INVALID_ARGUMENT when p goes back or keys are missing.
  absl::StatusOr<std::vector<uint32_t>> Select(const RowView& keys, uint32_t p,
                                               const float* queries, uint32_t group,
                                               uint32_t pages);

  // First position not in the index (the window starts here); the sink's end before
  // anything is indexed.
  // The index's pages after the last Select: each page's token positions (every page of the
  // layout, selected or not; positional pages for the baselines and the token oracle).
  const std::vector<std::vector<uint32_t>>& page_positions() const;

  uint32_t indexed_end() const { return static_cast<uint32_t>(policy_.window_begin()); }
  // kAsync: selections made with the previous step's queries, and those that fell back.
  uint64_t prefetched() const { return prefetched_; }
  uint64_t drift_fallbacks() const { return drift_fallbacks_; }

 private:
  class State;
  absl::Status Ingest(const RowView& keys, uint64_t begin, uint64_t count);
  absl::Status Advance(const RowView& keys, uint32_t p);

  const MethodSpec spec_;
  const IndexGeometry geometry_;
  std::vector<float> previous_;  // kAsync: the last call's queries
  uint64_t prefetched_ = 0, drift_fallbacks_ = 0;
  selection::WindowPolicy policy_;
  std::unique_ptr<State> state_;
  std::vector<uint32_t> positions_;  // identity map position -> position, grown on demand
  std::vector<uint64_t> pending_;    // first positions of the pages in hand-over, oldest first
  bool built_ = false;
};

}  // namespace icecache::eval
