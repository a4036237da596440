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
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace icecache::selection {

// The defaults of every sequence that leaves a field unset: pages of 4 tokens, a sink of 2
// pages (8 tokens) and a recent window of 16 tokens, the rest selected, so budget 256 = 8 sink
// + 58 selected pages of 4 + 16 window tokens. Pages of 4 with a sink of 8 were the only
// layout that reached an attention recall of 0.90 at 256 on every text (docs/model.md "Pages
// of 4: the default"); before them the default was pages of 8 (16 sink + 28 pages + 16
// window). The paper uses pages of 16 (kPaperPageSize: 32 sink + 12 pages of 16 + 32 window at
// 256).
// A sequence that sets its page_size but not its sink or window gets SinkFor(page_size) and
// WindowFor(page_size): 2 pages of sink, and a window of 2 pages but at least kMinWindowTokens
// (so pages of 8, 16 and 32 keep their 2 + 2 pages, and any allowed page size is valid with
// the other defaults).
struct BudgetDefaults {
  static constexpr uint32_t kPageSize = 4;
  static constexpr uint32_t kBudgetTokens = 256;
  static constexpr uint32_t kEdgePages = 2;
  static constexpr uint32_t kMinWindowTokens = 16;
  static constexpr uint32_t SinkFor(uint32_t page_size) { return kEdgePages * page_size; }
  static constexpr uint32_t WindowFor(uint32_t page_size) {
    return kEdgePages * page_size > kMinWindowTokens ? kEdgePages * page_size : kMinWindowTokens;
  }
  static constexpr uint32_t kSinkTokens = kEdgePages * kPageSize;
  static constexpr uint32_t kWindowTokens = kMinWindowTokens;  // WindowFor(kPageSize)
  static constexpr uint32_t kPaperPageSize = 16;
};
static_assert(BudgetDefaults::kSinkTokens == BudgetDefaults::SinkFor(BudgetDefaults::kPageSize) &&
              BudgetDefaults::kWindowTokens ==
                  BudgetDefaults::WindowFor(BudgetDefaults::kPageSize));
static_assert(BudgetDefaults::WindowFor(8) == 16 && BudgetDefaults::WindowFor(16) == 32 &&
              BudgetDefaults::WindowFor(32) == 64);

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
// (the paper publishes no split for 64), pages of 16 tokens unless `page_size` is given.
BudgetSplit PaperSplit(uint32_t budget, uint32_t page_size = BudgetDefaults::kPaperPageSize);

// The daemon's default split of `budget`: exactly what the daemon gives a sequence that sets
// only its budget (pages of BudgetDefaults::kPageSize, kSinkTokens of sink, kWindowTokens of
// window, at every budget). Used wherever a budget is given alone (the demo's --budget, the
// benchmarks' budget sweeps). Valid from kSinkTokens + kWindowTokens + kPageSize (28) up.
BudgetSplit DefaultSplit(uint32_t budget);

// Adaptive split between the KV heads of a layer: `total_pages` (the layer's budget, e.g.
// num_kv_heads * selected_pages()) shared out in proportion to weights[h] >= 0 (for example
// each head's share of attention mass outside its sink and window), each head getting at
// least min_pages and at most max_pages. Largest remainders, ties to the lower head; a
// head's share above max_pages goes to the others in proportion to their weights; weights
// all zero share evenly. The result sums to total_pages exactly. INVALID_ARGUMENT when there
// are no heads, a weight is negative or not finite, min_pages > max_pages, or total_pages
// is outside [heads * min_pages, heads * max_pages].
absl::StatusOr<std::vector<uint32_t>> SplitPagesAcrossHeads(uint32_t total_pages,
                                                            const std::vector<double>& weights,
                                                            uint32_t min_pages, uint32_t max_pages);

}  // namespace icecache::selection
