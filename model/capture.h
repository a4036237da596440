// Capture of a model's real attention into the index's trace format (server/index/trace.h,
// bench/README.md): post-RoPE keys and values of every position (fp16), and the queries of
// chosen positions, so the index benchmarks (index_quality, index_speed --trace) run on real
// attention instead of synthetic data.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "eval/trace.h"
#include "model/llama.h"

namespace icecache::model {

class TraceCapture {
 public:
  // Records keys/values of positions [0, num_tokens) and the queries of `query_positions`
  // (ascending, each < num_tokens).
  TraceCapture(const LlamaConfig& config, uint32_t num_tokens,
               std::vector<uint32_t> query_positions, std::string description);

  // Install as the model's observer: model.set_observer(capture.Observer()).
  LlamaModel::QkvObserver Observer();

  // Every position and every query position seen?
  bool complete() const;
  const eval::Trace& trace() const { return trace_; }

 private:
  void Observe(uint32_t layer, uint32_t pos0, uint32_t n, const float* q, const float* k,
               const float* v);
  const LlamaConfig config_;
  eval::Trace trace_;
  std::vector<uint8_t> seen_;  // [layer][position]
};

}  // namespace icecache::model
