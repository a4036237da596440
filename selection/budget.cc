#include "selection/budget.h"

#include <algorithm>
#include <cmath>

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

BudgetSplit DefaultSplit(uint32_t budget) {
  return BudgetSplit{budget, BudgetDefaults::kSinkTokens, BudgetDefaults::kWindowTokens,
                     BudgetDefaults::kPageSize};
}

absl::StatusOr<std::vector<uint32_t>> SplitPagesAcrossHeads(uint32_t total_pages,
                                                            const std::vector<double>& weights,
                                                            uint32_t min_pages,
                                                            uint32_t max_pages) {
  const size_t n = weights.size();
  if (n == 0) return absl::InvalidArgumentError("page split: no heads");
  for (size_t h = 0; h < n; ++h) {
    if (!std::isfinite(weights[h]) || weights[h] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("page split: weight of head ", h,
                                                     " must be finite and >= 0, got ", weights[h]));
    }
  }
  if (min_pages > max_pages) {
    return absl::InvalidArgumentError(absl::StrCat("page split: min_pages (", min_pages,
                                                   ") exceeds max_pages (", max_pages, ")"));
  }
  if (uint64_t{total_pages} < uint64_t{min_pages} * n ||
      uint64_t{total_pages} > uint64_t{max_pages} * n) {
    return absl::InvalidArgumentError(absl::StrCat("page split: ", total_pages, " pages for ", n,
                                                   " heads of ", min_pages, " to ", max_pages,
                                                   " pages each"));
  }
  std::vector<uint32_t> out(n, min_pages);
  uint64_t left = total_pages - uint64_t{min_pages} * n;
  std::vector<bool> open(n, true);
  // Rounds of proportional sharing among the heads below max_pages: a head that would pass
  // its cap takes the cap and leaves the sharing; the rest is shared again.
  while (left > 0) {
    double wsum = 0;
    size_t open_n = 0;
    for (size_t h = 0; h < n; ++h) {
      if (open[h]) {
        wsum += weights[h];
        ++open_n;
      }
    }
    std::vector<double> want(n, 0.0);
    for (size_t h = 0; h < n; ++h) {
      if (!open[h]) continue;
      want[h] = wsum > 0 ? static_cast<double>(left) * weights[h] / wsum
                         : static_cast<double>(left) / static_cast<double>(open_n);
    }
    bool capped = false;
    for (size_t h = 0; h < n; ++h) {
      if (open[h] && out[h] + want[h] >= max_pages) {
        left -= max_pages - out[h];
        out[h] = max_pages;
        open[h] = false;
        capped = true;
      }
    }
    if (capped) continue;
    // No cap reached: whole parts, then the largest remainders (ties to the lower head).
    std::vector<size_t> order;
    uint64_t given = 0;
    for (size_t h = 0; h < n; ++h) {
      if (!open[h]) continue;
      const uint64_t whole = static_cast<uint64_t>(std::floor(want[h]));
      out[h] += static_cast<uint32_t>(whole);
      given += whole;
      want[h] -= static_cast<double>(whole);
      order.push_back(h);
    }
    left -= std::min(left, given);
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return want[a] > want[b]; });
    for (size_t i = 0; i < order.size() && left > 0; ++i) {
      if (out[order[i]] < max_pages) {
        ++out[order[i]];
        --left;
      }
    }
    // Rounding can leave pages when every remainder was zero: the lowest open heads take them.
    for (size_t h = 0; h < n && left > 0; ++h) {
      while (left > 0 && out[h] < max_pages) {
        ++out[h];
        --left;
      }
    }
  }
  return out;
}

}  // namespace icecache::selection
