#include "model/capture.h"

#include <algorithm>

#include "common/half.h"

namespace icecache::model {

TraceCapture::TraceCapture(const LlamaConfig& config, uint32_t num_tokens,
                           std::vector<uint32_t> query_positions, std::string description)
    : config_(config) {
  trace_.description = std::move(description);
  trace_.num_layers = config.n_layers;
  trace_.num_kv_heads = config.n_kv_heads;
  trace_.num_q_heads = config.n_heads;
  trace_.head_dim = config.head_dim;
  trace_.num_tokens = num_tokens;
  trace_.kv_type = index::ElemType::kF16;
  trace_.has_values = true;
  trace_.query_positions = std::move(query_positions);
  trace_.Allocate();
  seen_.assign(uint64_t{config.n_layers} * num_tokens, 0);
}

LlamaModel::QkvObserver TraceCapture::Observer() {
  return [this](uint32_t layer, uint32_t pos0, uint32_t n, const float* q, const float* k,
                const float* v) { Observe(layer, pos0, n, q, k, v); };
}

void TraceCapture::Observe(uint32_t layer, uint32_t pos0, uint32_t n, const float* q,
                           const float* k, const float* v) {
  const uint32_t d = config_.head_dim, kv = config_.n_kv_heads;
  for (uint32_t t = 0; t < n; ++t) {
    const uint32_t pos = pos0 + t;
    if (pos >= trace_.num_tokens) break;
    seen_[uint64_t{layer} * trace_.num_tokens + pos] = 1;
    for (uint32_t h = 0; h < kv; ++h) {
      auto* kd = reinterpret_cast<uint16_t*>(const_cast<void*>(trace_.Keys(layer, h).row(pos)));
      auto* vd = reinterpret_cast<uint16_t*>(const_cast<void*>(trace_.Values(layer, h).row(pos)));
      const uint64_t src = (uint64_t{t} * kv + h) * d;
      for (uint32_t i = 0; i < d; ++i) {
        kd[i] = FloatToHalf(k[src + i]);
        vd[i] = FloatToHalf(v[src + i]);
      }
    }
    auto it = std::lower_bound(trace_.query_positions.begin(), trace_.query_positions.end(), pos);
    if (it == trace_.query_positions.end() || *it != pos) continue;
    const uint32_t qi = static_cast<uint32_t>(it - trace_.query_positions.begin());
    for (uint32_t h = 0; h < config_.n_heads; ++h) {
      const float* src = q + (uint64_t{t} * config_.n_heads + h) * d;
      std::copy(src, src + d, trace_.MutableQuery(layer, h, qi));
    }
  }
}

bool TraceCapture::complete() const {
  return std::all_of(seen_.begin(), seen_.end(), [](uint8_t s) { return s != 0; });
}

}  // namespace icecache::model
