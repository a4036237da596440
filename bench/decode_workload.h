// Decode workloads of the 8B shape for the benchmarks (token_step, batch_decode): one layer's
// clustered synthetic K/V laid out as an engine holds them, decode queries whose consecutive
// cosine is set, and the CPU time of a process.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "eval/synthetic.h"
#include "icecache/execution_mode.h"

namespace icecache::bench {

// The 8B shape (Llama 3 8B): 8 KV heads, GQA 4, head dim 128.
inline constexpr uint32_t kKvHeads = 8, kGroup = 4, kDim = 128;

// A benchmark's --mode flag: "auto", "cpu" or "cuda"; INVALID_ARGUMENT otherwise.
absl::StatusOr<ExecutionMode> ParseExecutionMode(absl::string_view name);

// The value at fraction p of `v` (0.5: the median).
double Percentile(std::vector<double> v, double p);

// CPU seconds (user + system) of a process so far, from /proc.
double ProcessCpuSeconds(pid_t pid);

// One layer's K/V ([token][kv][d] bf16) and its generator's queries.
struct LayerData {
  eval::Trace trace;
  std::vector<uint16_t> k, v;
};
LayerData MakeLayer(uint32_t tokens, uint32_t layer, uint32_t queries);

// `steps` queries of the layer ([steps][32][128] bf16): per query head, each step's query is
// the previous one turned toward a fresh generator query so that consecutive queries have
// cosine `cosine` (the norm follows the fresh query).
std::vector<std::vector<uint16_t>> Queries(const LayerData& d, uint32_t steps, double cosine);

}  // namespace icecache::bench
