// A synthetic attention workload with the structure that makes IceCache work on real
// models, so that tests can tell a correct index from a broken one:
//   - keys come from semantic clusters, visited in runs ("topics") that recur through the
//     sequence, so a cluster's tokens are scattered over many positional pages;
//   - a few outlier channels carry a large common offset (as real keys do), which stresses
//     the maximum-inner-product lift;
//   - rotary position embedding is applied (post-RoPE keys and queries, GGUF pair layout),
//     with cluster energy concentrated in the low-frequency pairs as in real models;
//   - each query targets a few clusters, so a few hundred tokens carry most of its softmax
//     mass, while recency alone (sink + window) carries little.
// Values are cluster-dependent too, so the attention output error is meaningful.
#pragma once

#include <cstdint>

#include "eval/index_types.h"
#include "eval/trace.h"

namespace icecache::eval {

struct SyntheticOptions {
  uint32_t num_tokens = 8192;
  uint32_t head_dim = 64;
  uint32_t num_layers = 1;
  uint32_t num_kv_heads = 2;
  uint32_t group_size = 4;    // query heads per KV head
  uint32_t num_queries = 16;  // at the last positions of the sequence
  uint32_t num_clusters = 96;
  uint32_t mean_run = 3;         // mean length of a run of tokens from one cluster
  float cluster_spread = 0.45f;  // within-cluster noise relative to the centre's norm
  uint32_t outlier_channels = 2;
  float outlier_offset = 4.0f;   // in units of a typical key element
  uint32_t query_clusters = 2;   // clusters each query attends to
  float query_sharpness = 9.0f;  // scale of the query; larger = more peaked attention
  // Chance that a query head re-draws each of its target clusters at the next query position
  // (1: every query independent; below 1: consecutive decode queries stay on a topic, as a
  // model's do, which is what a page cache lives on).
  float query_drift = 1.0f;
  float rope_base = 10000.0f;
  ElemType kv_type = ElemType::kF16;
  uint64_t seed = 1;
};

// Deterministic for a given options struct.
Trace GenerateSynthetic(const SyntheticOptions& options);

// Rotates pairs (2i, 2i+1) of x[dim] by position * base^(-2i/dim) (GGUF llama layout).
void ApplyRope(float* x, uint32_t dim, uint32_t position, float base);

}  // namespace icecache::eval
