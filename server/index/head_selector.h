// Online token selection for one (layer, KV head), the way the service decodes: the first
// `sink` positions and a window of the most recent positions are always attended; everything
// between them is indexed by one method (the IceCache DCI tree, a baseline, or an oracle),
// which picks pages (or tokens) for the GQA group's queries. The window slides as positions
// grow: each full page that leaves it is inserted into the index.
//
// Used by the quality evaluation on traces (evaluation.h) and by the model's in-process
// attention backends (model/attention.h), so both replay exactly the same policy.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/index/baselines.h"
#include "server/index/dci_tree.h"
#include "server/index/in_memory_pages.h"

namespace icecache::index {

// How a token budget is split: sink tokens, a window of (window - page_size, window] most
// recent tokens, and selected pages filling the rest.
struct BudgetSplit {
  uint32_t budget = 256;
  uint32_t sink = 32;
  uint32_t window = 32;
  uint32_t page_size = 16;
  uint32_t selected_pages() const { return (budget - sink - window) / page_size; }
};

// The paper's split for budget 256 (32 sink, 12 pages, 32 window), the same sink and window
// for larger budgets, and 16 + 16 below 128 (the paper's 64-token split is not published).
BudgetSplit PaperSplit(uint32_t budget, uint32_t page_size = 16);

enum class MethodKind : uint8_t {
  kDci,                   // the IceCache DCI tree (options in MethodSpec::dci)
  kQuest,                 // Quest-style bound over positional pages
  kStreaming,             // sink + the most recent tokens (the pages' share too)
  kOraclePagesOurLayout,  // best pages (softmax mass) of the DCI layout
  kOraclePagesPositional, // best positional pages
  kOracleTokens,          // best individual tokens (budget counted in tokens)
};

struct MethodSpec {
  std::string name;
  MethodKind kind = MethodKind::kDci;
  DciOptions dci;  // for kDci and kOraclePagesOurLayout
};

// The paper-faithful DCI tree, the baselines and the three oracles.
std::vector<MethodSpec> DefaultMethods();

class HeadSelector {
 public:
  // `sink` and `window` as in BudgetSplit; `geometry` of the keys the caller passes.
  HeadSelector(const MethodSpec& spec, uint32_t sink, uint32_t window,
               const IndexGeometry& geometry);
  ~HeadSelector();
  HeadSelector(const HeadSelector&) = delete;
  HeadSelector& operator=(const HeadSelector&) = delete;

  // The positions to attend for the query at position p, sorted and unique: [0, sink), the
  // window, and the tokens of the `pages` best pages (kOracleTokens: the pages * page_size
  // best tokens; kStreaming: the pages * page_size positions just before the window) for the
  // group's queries ([group][head_dim] fp32). `keys` holds one row per
  // position, at least p + 1 rows, and the rows of earlier positions must not change between
  // calls. p never decreases between calls. When p + 1 < sink + window + page_size there is
  // nothing to index yet and every position [0, p] is returned.
  absl::StatusOr<std::vector<uint32_t>> Select(const RowView& keys, uint32_t p,
                                               const float* queries, uint32_t group,
                                               uint32_t pages);

  // First position not in the index (the window starts here); 0 before anything is indexed.
  uint32_t indexed_end() const { return end_; }

 private:
  class State;
  absl::Status Ingest(bool build, const RowView& keys, uint32_t begin, uint32_t count);

  const MethodSpec spec_;
  const uint32_t sink_, window_;
  const IndexGeometry geometry_;
  std::unique_ptr<State> state_;
  std::vector<uint32_t> positions_;  // identity map position -> position, grown on demand
  bool built_ = false;
  uint32_t end_ = 0;
};

}  // namespace icecache::index
