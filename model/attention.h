// Attention backends for LlamaModel:
//
//   FullAttention       every token, in process (the reference);
//   ServiceAttention    IceCache for real: the prompt's K/V go to icecached through
//                       libicecache_client, each decode step selects, fetches and attends
//                       through it (CPU or CUDA mode);
//   SelectiveAttention  a selection method replayed in process (index/head_selector.h): the
//                       IceCache DCI tree, the Quest-style and StreamingLLM baselines and the
//                       oracles, each under the same sink + window + pages policy, for the
//                       quality evaluation.
//
// All of them store K/V rounded to fp16, the precision the service keeps, so differences
// between them come from what is attended, not from rounding. The prompt is always attended
// in full (causal); sparsity applies to decode steps, as in the paper.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "eval/head_selector.h"
#include "icecache/client.h"
#include "model/llama.h"

namespace icecache::model {

// Rounds to fp16 and back.
void RoundToHalf(const float* in, size_t n, float* out);

// The prompt's causal attention over its K/V rounded to fp16 (what every backend keeps), the
// same for every backend: q [n][n_heads][d], k and v [n][n_kv][d], out [n][n_heads][d].
void PromptAttention(const LlamaConfig& config, const float* q, const float* k, const float* v,
                     uint32_t n, float* out);

// Keeps every layer's K/V (fp32 rows holding fp16-rounded values) for up to max_tokens.
class KvStore {
 public:
  KvStore(const LlamaConfig& config, uint32_t max_tokens);
  // Rows [pos, pos + n) of layer l from k, v [n][n_kv][head_dim] (rounded to fp16).
  absl::Status Write(uint32_t layer, uint32_t pos, uint32_t n, const float* k, const float* v);
  // [max_tokens][head_dim] rows of one (layer, KV head).
  const float* k(uint32_t layer, uint32_t head) const;
  const float* v(uint32_t layer, uint32_t head) const;
  const uint16_t* k_half(uint32_t layer, uint32_t head) const;  // the same keys as fp16
  uint32_t max_tokens() const { return max_tokens_; }
  const LlamaConfig& config() const { return config_; }

 private:
  uint64_t Offset(uint32_t layer, uint32_t head) const;
  const LlamaConfig config_;
  const uint32_t max_tokens_;
  std::vector<float> k_, v_;  // [layer][kv_head][max_tokens][head_dim]
  std::vector<uint16_t> k_half_;
};

// Softmax attention of one query row over positions [0, pos] of one (layer, KV head), through
// OpenBLAS.
void AttendPrefix(const KvStore& kv, uint32_t layer, uint32_t kv_head, const float* q, uint32_t pos,
                  float scale, float* out);

// Softmax attention of one query row over the listed positions of one (layer, KV head).
void AttendPositions(const KvStore& kv, uint32_t layer, uint32_t kv_head, const float* q,
                     const uint32_t* positions, size_t count, float scale, float* out);

// Exact attention over `positions` (sorted) plus the estimated tail of the pages summarised
// in `tail` (selection/tail.h), in float64 accumulation.
void AttendWithTail(const KvStore& kv, uint32_t layer, uint32_t kv_head, const float* q,
                    const std::vector<uint32_t>& positions, selection::TailMode mode,
                    const std::vector<selection::PageSummaryView>& tail, float scale, float* out);

// What the in-process backends share: every K/V in a KvStore, the prompt attended in full.
class InProcessAttention : public AttentionBackend {
 public:
  absl::Status Prefill(uint32_t layer, const float* q, const float* k, const float* v, uint32_t n,
                       float* out) override;
  absl::Status LoadPrompt(uint32_t layer, const float* k, const float* v, uint32_t n) override;
  const KvStore& kv() const { return kv_; }

 protected:
  InProcessAttention(const LlamaConfig& config, uint32_t max_tokens) : kv_(config, max_tokens) {}
  KvStore kv_;
};

class FullAttention : public InProcessAttention {
 public:
  FullAttention(const LlamaConfig& config, uint32_t max_tokens);
  absl::Status Decode(uint32_t layer, uint32_t pos, const float* q, const float* k, const float* v,
                      float* out) override;
};

// Selection statistics of a SelectiveAttention or ServiceAttention run.
struct SelectionStats {
  // Per layer: sum and count of the attention recall (softmax mass over all positions that
  // the attended positions carry), one sample per (decode step, query head).
  std::vector<double> recall_sum;
  std::vector<uint64_t> recall_count;
  // Per (layer, KV head), layers [full_kv_layers, n): pages asked of the head's selection,
  // summed over decode steps (SelectiveAttention; MethodSpec::head_budget moves them).
  std::vector<uint64_t> pages_asked;
  // Per layer and decode position: the same samples' sum and count (positions never decoded
  // stay 0), to follow the recall along a long continuation.
  std::vector<std::vector<double>> recall_pos_sum;
  std::vector<std::vector<uint32_t>> recall_pos_count;
  double MeanRecall(uint32_t first_layer = 0) const;
  // The mean over layers [first_layer, n) and decode positions [begin, end); 0 without samples.
  double MeanRecallAt(uint32_t first_layer, uint32_t begin, uint32_t end) const;
};

class SelectiveAttention : public InProcessAttention {
 public:
  // Layers [0, full_kv_layers) attend to everything; the others through `method` with the
  // budget split. measure_recall: also compute every head's exact attention recall.
  SelectiveAttention(const LlamaConfig& config, uint32_t max_tokens, const eval::MethodSpec& method,
                     const selection::BudgetSplit& split, uint32_t full_kv_layers,
                     bool measure_recall);
  absl::Status Decode(uint32_t layer, uint32_t pos, const float* q, const float* k, const float* v,
                      float* out) override;
  const SelectionStats& stats() const { return stats_; }

 private:
  // Summaries of the parts of `pages` not in `attended` (sorted) into tail_pages_.
  void SummarizeTail(uint32_t layer, uint32_t kv_head,
                     const std::vector<std::vector<uint32_t>>& pages,
                     const std::vector<uint32_t>& attended);
  std::vector<selection::PageSummaryView> tail_pages_;
  std::vector<float> tail_store_;
  struct CachedSummary {
    std::vector<uint32_t> positions;
    std::vector<float> summary;  // [3][head_dim]
  };
  std::vector<std::vector<CachedSummary>> tail_cache_;  // [layer][kv_head][page]
  const eval::MethodSpec method_;
  const selection::BudgetSplit split_;
  const uint32_t full_kv_layers_;
  const bool measure_recall_;
  std::vector<std::unique_ptr<eval::HeadSelector>> selectors_;  // [layer][kv_head]
  // HeadBudget::kObserved: each head's share of attended mass outside its sink and window in
  // its last step ([layer][kv_head], -1 before the first).
  std::vector<double> observed_share_;
  // HeadBudget::kObservedLayers / kObservedAll: this step's pages per (layer, KV head).
  std::vector<uint32_t> step_pages_;
  SelectionStats stats_;
};

// IceCache through the daemon. The sequence must have been created with this model's
// geometry (SequenceOptionsFor) and fp16.
class ServiceAttention : public AttentionBackend {
 public:
  // `mirror` (optional): also keep every K/V here to measure the recall of what the service
  // attended (LastAttended rows matched against all positions); costs a copy per step.
  ServiceAttention(const LlamaConfig& config, Sequence* sequence, bool measure_recall,
                   uint32_t max_tokens);
  absl::Status Prefill(uint32_t layer, const float* q, const float* k, const float* v, uint32_t n,
                       float* out) override;
  absl::Status Decode(uint32_t layer, uint32_t pos, const float* q, const float* k, const float* v,
                      float* out) override;
  absl::Status LoadPrompt(uint32_t layer, const float* k, const float* v, uint32_t n) override;
  const SelectionStats& stats() const { return stats_; }
  // What each Decode of an offloaded layer did (select, fetch, attention times; hits).
  const std::vector<DecodeBreakdown>& breakdowns() const { return breakdowns_; }

 private:
  const LlamaConfig config_;
  Sequence* const sequence_;
  const bool measure_recall_;
  std::unique_ptr<KvStore> mirror_;
  // Per (layer, KV head): K row bytes -> position, for the positions seen so far.
  std::vector<absl::flat_hash_map<std::string, uint32_t>> where_;
  std::vector<uint32_t> where_count_;
  SelectionStats stats_;
  std::vector<uint16_t> q16_, k16_, v16_, out16_, prompt_k_, prompt_v_;
  std::vector<DecodeBreakdown> breakdowns_;
};

// One prefill shared by several backends: `primary` computes the prompt's attention, every
// other backend takes the prompt's K/V through LoadPrompt. Decode goes to `primary`.
class PrefillTee : public AttentionBackend {
 public:
  PrefillTee(AttentionBackend* primary, std::vector<AttentionBackend*> others)
      : primary_(primary), others_(std::move(others)) {}
  absl::Status Prefill(uint32_t layer, const float* q, const float* k, const float* v, uint32_t n,
                       float* out) override;
  absl::Status Decode(uint32_t layer, uint32_t pos, const float* q, const float* k, const float* v,
                      float* out) override {
    return primary_->Decode(layer, pos, q, k, v, out);
  }
  absl::Status LoadPrompt(uint32_t layer, const float* k, const float* v, uint32_t n) override;

 private:
  AttentionBackend* const primary_;
  const std::vector<AttentionBackend*> others_;
};

// The client-side geometry for `config`: fp16, the given budget (sink, window and page size as
// in the paper split), full_kv_layers first layers kept whole.
SequenceOptions SequenceOptionsFor(const LlamaConfig& config, uint64_t max_tokens,
                                   const selection::BudgetSplit& split, uint32_t full_kv_layers);

}  // namespace icecache::model
