// Attention traces: post-RoPE keys (and optionally values) of every layer and KV head of a
// sequence, and the queries of every layer and query head at chosen positions. The index
// benchmarks and quality evaluations run on them; the synthetic generator (synthetic.h) and
// the real-model capture both produce them. File format: bench/README.md ("Trace format").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "eval/index_types.h"

namespace icecache::eval {

struct Trace {
  std::string description;  // where the data came from (model, text, generator settings)
  uint32_t num_layers = 0;
  uint32_t num_kv_heads = 0;
  uint32_t num_q_heads = 0;
  uint32_t head_dim = 0;
  uint32_t num_tokens = 0;
  ElemType kv_type = ElemType::kF16;  // of keys and values
  bool has_values = false;
  std::vector<uint32_t> query_positions;  // ascending, each < num_tokens
  std::vector<uint8_t> keys;              // [layer][kv_head][token][dim] of kv_type
  std::vector<uint8_t> values;            // same shape, when has_values
  std::vector<float> queries;             // [layer][q_head][query][dim]

  uint32_t group_size() const { return num_q_heads / num_kv_heads; }
  uint64_t HeadBytes() const { return uint64_t{num_tokens} * head_dim * ElemBytes(kv_type); }
  // Rows [0, num_tokens) of one (layer, KV head).
  RowView Keys(uint32_t layer, uint32_t kv_head) const;
  RowView Values(uint32_t layer, uint32_t kv_head) const;  // data null without values
  // Query `qi` (index into query_positions) of one (layer, query head): head_dim floats.
  const float* Query(uint32_t layer, uint32_t q_head, uint32_t qi) const;
  float* MutableQuery(uint32_t layer, uint32_t q_head, uint32_t qi);
  // Sizes the arrays for the header fields set above.
  void Allocate();
};

// INVALID_ARGUMENT for an inconsistent trace; INTERNAL/NOT_FOUND for file errors.
absl::Status WriteTrace(const Trace& trace, const std::string& path);
// NOT_FOUND when missing, DATA_LOSS for a truncated or malformed file.
absl::StatusOr<Trace> ReadTrace(const std::string& path);
absl::Status ValidateTrace(const Trace& trace);

}  // namespace icecache::eval
