#include "selection/window_policy.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/log.h"

namespace icecache::selection {

WindowPolicy::WindowPolicy(const BudgetSplit& split, uint32_t max_pending_pages)
    : split_(split),
      ring_capacity_(split.window_tokens +
                     std::max<uint32_t>(max_pending_pages, 1) * split.page_size),
      sink_end_(split.sink_tokens),
      ring_origin_(split.sink_tokens),
      window_begin_(split.sink_tokens),
      handed_end_(split.sink_tokens) {
  ICECACHE_CHECK(ValidateSplit(split).ok()) << ValidateSplit(split).message();
}

absl::StatusOr<WindowPolicy::PromptPlan> WindowPolicy::Prefill(uint64_t n) {
  if (n == 0) return absl::InvalidArgumentError("a prompt of 0 tokens");
  if (tokens_ != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("the layer holds ", tokens_, " tokens already"));
  }
  PromptPlan plan;
  plan.sink_tokens = std::min<uint64_t>(n, sink_end_);
  const uint64_t rest = n - plan.sink_tokens;
  const uint64_t in_window = std::min<uint64_t>(rest, split_.window_tokens - 1);
  plan.index_begin = plan.sink_tokens;
  plan.index_tokens = rest - in_window;
  plan.window_begin = std::max<uint64_t>(sink_end_, n - in_window);
  ring_origin_ = window_begin_ = handed_end_ = plan.window_begin;
  index_started_ = plan.index_tokens > 0;
  tokens_ = n;
  return plan;
}

bool WindowPolicy::CanAppend() const {
  return NextInSink() || tokens_ + 1 - window_begin_ <= ring_capacity_;
}

absl::StatusOr<std::optional<uint64_t>> WindowPolicy::Append() {
  if (!CanAppend()) {
    return absl::FailedPreconditionError(absl::StrCat("the window ring is full (", pending_pages(),
                                                      " pages in hand-over): retire one first"));
  }
  ++tokens_;
  const uint32_t max_pending = (ring_capacity_ - split_.window_tokens) / split_.page_size;
  if (tokens_ < handed_end_ + split_.window_tokens || pending_pages() >= max_pending) {
    return std::optional<uint64_t>();
  }
  const uint64_t first = handed_end_;
  handed_end_ += split_.page_size;
  index_started_ = true;
  return std::optional<uint64_t>(first);
}

absl::Status WindowPolicy::Retire() {
  if (handed_end_ == window_begin_) {
    return absl::FailedPreconditionError("no window page is in hand-over");
  }
  window_begin_ += split_.page_size;
  return absl::OkStatus();
}

absl::Status WindowPolicy::Rewind(const Mark& mark) {
  if (mark.tokens > tokens_ || mark.handed_end > handed_end_ ||
      (mark.index_started && !index_started_)) {
    return absl::FailedPreconditionError("the mark is ahead of the window");
  }
  if (window_begin_ > mark.handed_end) {
    return absl::FailedPreconditionError(
        "a page handed over since the mark has left the window: it cannot be taken back");
  }
  tokens_ = mark.tokens;
  handed_end_ = mark.handed_end;
  index_started_ = mark.index_started;
  return absl::OkStatus();
}

}  // namespace icecache::selection
