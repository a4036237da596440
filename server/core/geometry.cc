#include "server/core/geometry.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace icecache {
namespace {

template <size_t N>
bool Contains(const std::array<uint32_t, N>& set, uint32_t v) {
  return std::find(set.begin(), set.end(), v) != set.end();
}

template <size_t N>
std::string OneOf(const std::array<uint32_t, N>& set) {
  std::string s;
  for (size_t i = 0; i < N; ++i) {
    if (i > 0) s += (i + 1 == N) ? " or " : ", ";
    absl::StrAppend(&s, set[i]);
  }
  return s;
}

absl::Status FieldError(absl::string_view field, absl::string_view rule, uint64_t got) {
  return absl::InvalidArgumentError(
      absl::StrCat("geometry.", field, " must be ", rule, ", got ", got));
}

}  // namespace

absl::StatusOr<Geometry> ResolveGeometry(const GeometrySpec& spec) {
  using L = GeometryLimits;
  using D = GeometryDefaults;
  Geometry g;

  if (spec.num_layers < 1 || spec.num_layers > L::kMaxNumLayers) {
    return FieldError("num_layers", absl::StrCat("in 1..", L::kMaxNumLayers), spec.num_layers);
  }
  g.num_layers = spec.num_layers;

  if (spec.num_kv_heads < 1 || spec.num_kv_heads > L::kMaxNumKvHeads) {
    return FieldError("num_kv_heads", absl::StrCat("in 1..", L::kMaxNumKvHeads), spec.num_kv_heads);
  }
  g.num_kv_heads = spec.num_kv_heads;

  if (spec.num_q_heads < 1 || spec.num_q_heads > L::kMaxNumQHeads) {
    return FieldError("num_q_heads", absl::StrCat("in 1..", L::kMaxNumQHeads), spec.num_q_heads);
  }
  if (spec.num_q_heads % spec.num_kv_heads != 0) {
    return FieldError("num_q_heads",
                      absl::StrCat("a multiple of num_kv_heads (", spec.num_kv_heads, ")"),
                      spec.num_q_heads);
  }
  if (spec.num_q_heads / spec.num_kv_heads > L::kMaxGroupSize) {
    return FieldError(
        "num_q_heads",
        absl::StrCat("at most ", L::kMaxGroupSize, " x num_kv_heads (", spec.num_kv_heads, ")"),
        spec.num_q_heads);
  }
  g.num_q_heads = spec.num_q_heads;

  if (!Contains(L::kHeadDims, spec.head_dim)) {
    return FieldError("head_dim", OneOf(L::kHeadDims), spec.head_dim);
  }
  g.head_dim = spec.head_dim;

  if (!spec.dtype.has_value() || (*spec.dtype != DType::kBF16 && *spec.dtype != DType::kFP16)) {
    return absl::InvalidArgumentError(
        "geometry.dtype must be DTYPE_BF16 or DTYPE_FP16, got DTYPE_UNSPECIFIED");
  }
  g.dtype = *spec.dtype;

  if (spec.max_tokens < 1 || spec.max_tokens > L::kMaxTokens) {
    return FieldError("max_tokens", absl::StrCat("in 1..", L::kMaxTokens), spec.max_tokens);
  }
  g.max_tokens = spec.max_tokens;

  g.page_size = spec.page_size.value_or(D::kPageSize);
  if (!Contains(L::kPageSizes, g.page_size)) {
    return FieldError("page_size", OneOf(L::kPageSizes), g.page_size);
  }
  // Unset sink and window: BudgetDefaults' rule for this sequence's page size.
  g.sink_tokens = spec.sink_tokens.value_or(D::SinkFor(g.page_size));
  g.window_tokens = spec.window_tokens.value_or(D::WindowFor(g.page_size));
  g.budget_tokens = spec.budget_tokens.value_or(D::kBudgetTokens);
  absl::Status split = selection::ValidateSplit(g.split());
  if (!split.ok()) return split;

  g.full_kv_layers = spec.full_kv_layers.value_or(std::min(D::kFullKvLayers, g.num_layers));
  if (g.full_kv_layers > g.num_layers) {
    return FieldError("full_kv_layers", absl::StrCat("at most num_layers (", g.num_layers, ")"),
                      g.full_kv_layers);
  }
  g.tail = spec.tail.value_or(D::kTail);
  g.softmax_scale = spec.softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(g.head_dim)));
  if (!std::isfinite(g.softmax_scale) || !(g.softmax_scale > 0) || g.softmax_scale > 1e6f) {
    return absl::InvalidArgumentError(absl::StrCat(
        "geometry.softmax_scale must be finite, above 0 and at most 1e6, got ", g.softmax_scale));
  }
  return g;
}

absl::Status ValidateLabel(const std::string& label) {
  if (label.size() > GeometryLimits::kMaxLabelLength) {
    return absl::InvalidArgumentError(absl::StrCat("label must be at most ",
                                                   GeometryLimits::kMaxLabelLength,
                                                   " characters, got ", label.size()));
  }
  for (char c : label) {
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError("label must be printable ASCII");
    }
  }
  return absl::OkStatus();
}

}  // namespace icecache
