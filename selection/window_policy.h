// The sink + recent-window policy of one offloaded layer: which positions stay with the
// attention side (the sink and the window) and when a page of the window is handed to the
// index. One state machine, used by the client library (which keeps the sink and the window
// in its memory and hands pages to the daemon) and by the in-process replay (eval/), so both
// attend exactly the same positions.
//
// Positions of a layer are split in four runs:
//   [0, sink_end)                   the sink: the first sink_tokens positions, always attended;
//   [sink_end, window_begin)        in the index (built from the prompt, grown by hand-overs);
//   [window_begin, handed_end)      handed to the index but not yet known to be in it: still
//                                   attended as window tokens, never twice;
//   [handed_end, tokens)            the window proper.
// The window is full when it holds window_tokens positions not handed over; then its oldest
// page (page_size positions) is handed over. So every step attends between
// window_tokens - page_size + 1 and window_tokens window positions (the paper's policy), plus
// the pages still in hand-over. The prefill keeps window_tokens - 1 of the prompt's last
// positions, so the first decoded token completes the window.
//
// The window lives in a ring of ring_capacity() rows per KV head (RingRow maps a position to
// its row): pages leave it whole and unwrapped, because the capacity and every hand-over are
// multiples of page_size from the ring's origin.
//
// Thread safety: none (one owner, the layer).
#pragma once

#include <cstdint>
#include <optional>

#include "absl/status/statusor.h"
#include "selection/budget.h"

namespace icecache::selection {

class WindowPolicy {
 public:
  // `split` must be valid (ValidateSplit); `max_pending_pages` bounds the pages in hand-over
  // at a time (the ring holds them), at least 1.
  explicit WindowPolicy(const BudgetSplit& split, uint32_t max_pending_pages = 1);

  // Where a prompt of n tokens goes.
  struct PromptPlan {
    uint64_t sink_tokens = 0;  // positions [0, sink_tokens) to the sink
    uint64_t index_begin = 0;  // [index_begin, index_begin + index_tokens) to the index
    uint64_t index_tokens = 0;
    uint64_t window_begin = 0;  // [window_begin, n) stay in the window
  };
  // INVALID_ARGUMENT for n == 0; FAILED_PRECONDITION when tokens were seen already.
  absl::StatusOr<PromptPlan> Prefill(uint64_t n);

  // Whether the token at position tokens() goes to the sink (else to the window ring).
  bool NextInSink() const { return tokens_ < sink_end_; }
  // Whether the ring has a free row for the next token. False only when hand-overs are
  // pending: Retire() one first.
  bool CanAppend() const;
  // Records the token at position tokens() (the caller has written it to the sink or to
  // RingRow(tokens())). When the window is then full, its oldest page is handed over:
  // returns the page's first position (the caller gives [first, first + page_size) to the
  // index). FAILED_PRECONDITION when !CanAppend().
  absl::StatusOr<std::optional<uint64_t>> Append();

  // The oldest page in hand-over is in the index now: it leaves the window.
  // FAILED_PRECONDITION when no page is in hand-over.
  absl::Status Retire();

  // What Append changes, taken before it: Rewind(mark) takes the appends since back (a decode
  // step that failed before its token was kept), the pages they handed over included; pages
  // retired meanwhile (older ones) stay retired. FAILED_PRECONDITION, nothing changed, when a
  // page handed over since the mark was retired too, or the mark is ahead of the window.
  struct Mark {
    uint64_t tokens = 0;
    uint64_t handed_end = 0;
    bool index_started = false;
  };
  Mark Snapshot() const { return Mark{tokens_, handed_end_, index_started_}; }
  absl::Status Rewind(const Mark& mark);

  uint64_t tokens() const { return tokens_; }
  uint64_t sink_end() const { return sink_end_; }
  uint64_t window_begin() const { return window_begin_; }
  uint64_t handed_end() const { return handed_end_; }
  uint32_t pending_pages() const {
    return static_cast<uint32_t>((handed_end_ - window_begin_) / split_.page_size);
  }
  // Whether anything was given to the index yet (the prompt's run or a hand-over): the first
  // hand-over of a layer whose prompt left nothing to index builds the index.
  bool index_started() const { return index_started_; }
  // Positions [sink_end, window_begin): in the index.
  uint64_t indexed_tokens() const { return window_begin_ - sink_end_; }

  uint32_t ring_capacity() const { return ring_capacity_; }
  uint64_t RingRow(uint64_t position) const { return (position - ring_origin_) % ring_capacity_; }
  const BudgetSplit& split() const { return split_; }

 private:
  const BudgetSplit split_;
  const uint32_t ring_capacity_;
  uint64_t sink_end_;
  uint64_t tokens_ = 0;
  uint64_t ring_origin_;
  uint64_t window_begin_;
  uint64_t handed_end_;
  bool index_started_ = false;
};

}  // namespace icecache::selection
