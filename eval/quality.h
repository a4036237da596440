// Quality measures of a selection against exact attention (scale 1/sqrt(dim), fp64 sums).
//   attention recall: the share of the exact softmax mass over ALL tokens of the context that
//                     falls on the attended tokens (sink + selected pages + window);
//   output error:     ||o_sel - o_full|| / ||o_full||, where o_sel is attention restricted
//                     to the attended tokens (softmax renormalised over them).
#pragma once

#include <cstdint>
#include <vector>

#include "eval/index_types.h"

namespace icecache::eval {

struct FullAttention {
  std::vector<double> logits;  // [n] scaled q.k
  std::vector<double> probs;   // [n] softmax
  std::vector<double> out;     // [dim] sum probs * v (empty without values)
  double max_logit = 0;
  double z = 0;  // sum exp(logit - max_logit)
};

// Exact attention of query q[dim] over rows [0, n) of keys (and values, when given).
void ComputeFullAttention(const float* q, const RowView& keys, const RowView* values, uint32_t n,
                          FullAttention* out);

// Share of the softmax mass on `tokens` (row indices < n, duplicates ignored by the caller).
double AttentionRecall(const FullAttention& full, const std::vector<uint32_t>& tokens);

// Relative L2 error of attention restricted to `tokens` against full attention; requires
// values. Returns 0 when the full output is zero.
double OutputError(const FullAttention& full, const RowView& values,
                   const std::vector<uint32_t>& tokens);

}  // namespace icecache::eval
