// The token budget of one decode step and how it is split: the one owner of the selection
// contract's arithmetic. The daemon (geometry resolution, the default k of a select), the
// client library (page cache sizing, descriptor sizing) and the in-process replay all call
// this; nothing else computes a split.
//
// A step of one (layer, KV head) attends to
//   sink     the first sink_tokens positions,
//   window   the (window_tokens - page_size, window_tokens] most recent positions
//            (selection/window_policy.h), and
//   pages    selected_pages() pages chosen by the index, page_size tokens each at most,
// so sink + window + pages * page_size <= budget_tokens.
//
// Thread safety: value types and pure functions.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

namespace icecache::selection {

// The paper's configuration (IceCache, budget 256 = 2 sink + 12 selected + 2 window pages of
// 16 tokens): the defaults of every sequence that leaves a field unset.
struct BudgetDefaults {
  static constexpr uint32_t kPageSize = 16;
  static constexpr uint32_t kBudgetTokens = 256;
  static constexpr uint32_t kSinkTokens = 32;
  static constexpr uint32_t kWindowTokens = 32;
};

struct BudgetSplit {
  uint32_t budget_tokens = BudgetDefaults::kBudgetTokens;
  uint32_t sink_tokens = BudgetDefaults::kSinkTokens;
  uint32_t window_tokens = BudgetDefaults::kWindowTokens;
  uint32_t page_size = BudgetDefaults::kPageSize;

  // Pages chosen by selection per KV head and decode step. Requires a valid split.
  uint32_t selected_pages() const {
    return (budget_tokens - sink_tokens - window_tokens) / page_size;
  }

  friend bool operator==(const BudgetSplit&, const BudgetSplit&) = default;
};

// Largest budget a sequence may ask for.
inline constexpr uint32_t kMaxBudgetTokens = 65536;

// Checks the split's invariants: page_size > 0; sink, window and budget multiples of
// page_size; window >= page_size; budget <= kMaxBudgetTokens; budget >= sink + window +
// page_size (at least one selected page). INVALID_ARGUMENT naming the field as the API spells
// it ("geometry.window_tokens must be ..., got 20").
absl::Status ValidateSplit(const BudgetSplit& split);

// The paper's split of `budget`: 2 sink + 2 window pages from 128 tokens up, 1 + 1 below
// (the paper publishes no split for 64). Used wherever a budget is given alone (the
// benchmarks' budget sweeps, the demo's --budget).
BudgetSplit PaperSplit(uint32_t budget, uint32_t page_size = BudgetDefaults::kPageSize);

}  // namespace icecache::selection
