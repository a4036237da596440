#include "selection/budget.h"

#include "absl/strings/str_cat.h"

namespace icecache::selection {
namespace {

absl::Status FieldError(absl::string_view field, absl::string_view rule, uint64_t got) {
  return absl::InvalidArgumentError(
      absl::StrCat("geometry.", field, " must be ", rule, ", got ", got));
}

}  // namespace

absl::Status ValidateSplit(const BudgetSplit& s) {
  const uint32_t ps = s.page_size;
  if (ps == 0) return FieldError("page_size", "positive", ps);
  if (s.sink_tokens % ps != 0) {
    return FieldError("sink_tokens", absl::StrCat("a multiple of page_size (", ps, ")"),
                      s.sink_tokens);
  }
  if (s.window_tokens < ps || s.window_tokens % ps != 0) {
    return FieldError("window_tokens", absl::StrCat("a positive multiple of page_size (", ps, ")"),
                      s.window_tokens);
  }
  if (s.budget_tokens > kMaxBudgetTokens || s.budget_tokens % ps != 0) {
    return FieldError(
        "budget_tokens",
        absl::StrCat("a multiple of page_size (", ps, ") and at most ", kMaxBudgetTokens),
        s.budget_tokens);
  }
  // 64-bit sum: sink and window are unbounded 32-bit inputs.
  const uint64_t fixed = uint64_t{s.sink_tokens} + s.window_tokens + ps;
  if (s.budget_tokens < fixed) {
    return FieldError("budget_tokens",
                      absl::StrCat("at least sink_tokens + window_tokens + page_size (", fixed,
                                   ") so that one page is selected"),
                      s.budget_tokens);
  }
  return absl::OkStatus();
}

BudgetSplit PaperSplit(uint32_t budget, uint32_t page_size) {
  BudgetSplit s;
  s.budget_tokens = budget;
  s.page_size = page_size;
  const uint32_t edge_pages = budget < 128 ? 1 : 2;
  s.sink_tokens = edge_pages * page_size;
  s.window_tokens = edge_pages * page_size;
  return s;
}

}  // namespace icecache::selection
