// The geometry of one sequence's KV cache: what the client declares at CreateSequence and
// everything the daemon derives from it. Domain types only (no protobuf).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "kernels/head_dim.h"
#include "kernels/page_layout.h"
#include "selection/budget.h"
#include "selection/tail.h"

namespace icecache {

// Limits a geometry must meet. One place, reported by GetConfig and enforced by
// ResolveGeometry. The closed sets are the ones the kernels are instantiated for.
struct GeometryLimits {
  static constexpr uint32_t kMaxNumLayers = 1024;
  static constexpr uint32_t kMaxNumQHeads = 4096;
  static constexpr uint32_t kMaxNumKvHeads = 1024;
  static constexpr uint32_t kMaxGroupSize = 64;
  static constexpr std::array<uint32_t, 3> kHeadDims = kSupportedHeadDims;  // kernels/head_dim.h
  static constexpr std::array<uint32_t, 4> kPageSizes = {4, 8, 16, 32};
  static constexpr uint64_t kMaxTokens = uint64_t{1} << 24;
  static constexpr uint32_t kMaxBudgetTokens = selection::kMaxBudgetTokens;
  static constexpr uint32_t kMaxLabelLength = 128;
};

// Defaults for the optional fields: the budget split's (selection/budget.h: pages of 4, a sink
// of 8 and a window of 16 tokens) and 2 full-KV layers.
struct GeometryDefaults : selection::BudgetDefaults {
  static constexpr uint32_t kFullKvLayers = 2;  // clamped to num_layers
  // The tail estimate of a sequence that names none (docs/model.md: the measured winner).
  static constexpr selection::TailMode kTail = selection::TailMode::kMeanVariance;
};

// What a client asks for. Required fields are plain (0 = missing); optional ones are
// std::optional and take GeometryDefaults when absent.
struct GeometrySpec {
  uint32_t num_layers = 0;
  uint32_t num_q_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  std::optional<DType> dtype;  // nullopt: unspecified (an error)
  uint64_t max_tokens = 0;
  std::optional<uint32_t> page_size;
  std::optional<uint32_t> budget_tokens;
  std::optional<uint32_t> sink_tokens;
  std::optional<uint32_t> window_tokens;
  std::optional<uint32_t> full_kv_layers;
  std::optional<selection::TailMode> tail;  // nullopt: GeometryDefaults::kTail
  std::optional<float> softmax_scale;       // nullopt: 1/sqrt(head_dim)
};

// A validated geometry with every default applied. Invariants (established by
// ResolveGeometry): all fields within GeometryLimits; num_q_heads % num_kv_heads == 0;
// sink, window and budget are multiples of page_size; window >= page_size;
// budget >= sink + window + page_size; full_kv_layers <= num_layers.
struct Geometry {
  uint32_t num_layers = 0;
  uint32_t num_q_heads = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kBF16;
  uint64_t max_tokens = 0;
  uint32_t page_size = 0;
  uint32_t budget_tokens = 0;
  uint32_t sink_tokens = 0;
  uint32_t window_tokens = 0;
  uint32_t full_kv_layers = 0;
  // How selects estimate the unselected pages (selection/tail.h), and the attention's softmax
  // scale the estimate is computed in.
  selection::TailMode tail = selection::TailMode::kNone;
  float softmax_scale = 0;
  bool keeps_summaries() const { return tail != selection::TailMode::kNone; }

  uint32_t group_size() const { return num_q_heads / num_kv_heads; }
  // Layers whose KV the daemon stores and indexes.
  uint32_t offloaded_layers() const { return num_layers - full_kv_layers; }
  // The budget split (selection/budget.h owns its arithmetic).
  selection::BudgetSplit split() const {
    return selection::BudgetSplit{budget_tokens, sink_tokens, window_tokens, page_size};
  }
  // Pages chosen by selection per KV head and decode step.
  uint32_t selected_pages() const { return split().selected_pages(); }
  // Addressing of this sequence's pages (K then V rows of page_size tokens).
  PageLayout page_layout() const { return PageLayout{page_size, head_dim, DTypeBytes(dtype)}; }
  uint64_t page_bytes() const { return page_layout().page_bytes(); }
  // Pages per (layer, KV head) that hold max_tokens tokens when full.
  uint64_t pages_per_head() const { return (max_tokens + page_size - 1) / page_size; }
  // Host KV bytes the daemon accounts for the sequence: every offloaded layer and KV head,
  // max_tokens rounded up to whole pages. Fits in 64 bits for every valid geometry.
  uint64_t host_kv_bytes() const {
    return uint64_t{offloaded_layers()} * num_kv_heads * pages_per_head() * page_bytes();
  }

  friend bool operator==(const Geometry&, const Geometry&) = default;
};

// Applies defaults and validates. Errors: INVALID_ARGUMENT with a message that names the
// offending field as the API spells it (e.g. "geometry.head_dim must be 64, 128 or 256,
// got 96").
absl::StatusOr<Geometry> ResolveGeometry(const GeometrySpec& spec);

// Validates an operator-facing label: at most kMaxLabelLength printable ASCII characters.
// Errors: INVALID_ARGUMENT naming "label".
absl::Status ValidateLabel(const std::string& label);

}  // namespace icecache
