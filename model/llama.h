// A Llama-architecture decoder (SmolLM2 and its relatives) for CPU inference in fp32: weights
// dequantized from a GGUF file at load, matrix products through OpenBLAS, attention through a
// pluggable backend (model/attention.h) so the same forward pass runs with full attention in
// process or with IceCache's sparse attention through the daemon.
//
// Per block: x += Wo . Attn(RoPE(Wq . n), RoPE(Wk . n), Wv . n) with n = RMSNorm(x);
//            x += Wdown . (silu(Wgate . m) * (Wup . m)) with m = RMSNorm(x).
// Logits: Embedding^T . RMSNorm(x) (tied output embeddings when the file has no output.weight).
// RoPE rotates adjacent pairs (2i, 2i+1) with theta_i = base^(-2i / head_dim): GGUF's llama
// tensors are stored permuted for exactly that layout.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/io/gguf.h"
#include "model/io/tokenizer.h"

namespace icecache {
class ThreadPool;
}

namespace icecache::model {

struct LlamaConfig {
  uint32_t n_layers = 0;
  uint32_t d_model = 0;
  uint32_t n_heads = 0;
  uint32_t n_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t ffn = 0;
  uint32_t vocab = 0;
  uint32_t context = 0;
  float rope_base = 10000.0f;
  float norm_eps = 1e-5f;
  std::string name;
  uint32_t group() const { return n_heads / n_kv_heads; }
  uint32_t q_dim() const { return n_heads * head_dim; }
  uint32_t kv_dim() const { return n_kv_heads * head_dim; }
};

// Where attention happens. Called layer by layer, in order, once per prefill or token.
class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  // The prompt's n tokens at positions [0, n), after RoPE: q [n][n_heads][head_dim],
  // k and v [n][n_kv_heads][head_dim]. Writes causal attention to out [n][n_heads][head_dim].
  virtual absl::Status Prefill(uint32_t layer, const float* q, const float* k, const float* v,
                               uint32_t n, float* out) = 0;
  // One token at position `pos` (the number of tokens before it): q [n_heads][head_dim],
  // k and v [n_kv_heads][head_dim]. Writes out [n_heads][head_dim].
  virtual absl::Status Decode(uint32_t layer, uint32_t pos, const float* q, const float* k,
                              const float* v, float* out) = 0;
  // Takes the prompt's K/V without computing attention (another backend computed the same
  // causal attention already): lets several backends share one prefill.
  virtual absl::Status LoadPrompt(uint32_t layer, const float* k, const float* v, uint32_t n) = 0;
};

class LlamaModel {
 public:
  // Reads the configuration from the GGUF metadata (general.architecture must be "llama"),
  // dequantizes every weight to fp32 and builds the tokenizer. INVALID_ARGUMENT for a file
  // that is not a Llama model or whose tensors have the wrong shapes (the message names them).
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const GgufFile& file);
  static absl::StatusOr<std::unique_ptr<LlamaModel>> LoadFile(const std::string& path);
  ~LlamaModel();

  const LlamaConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }

  // Runs the prompt (positions [0, tokens.size())) through every layer. `logits` (optional):
  // [tokens.size()][vocab] for every position when all_logits, else [vocab] for the last.
  // `on_layer(layer)` is called after each layer (progress).
  absl::Status Prefill(const std::vector<int32_t>& tokens, AttentionBackend* attention,
                       std::vector<float>* logits, bool all_logits = false,
                       const std::function<void(uint32_t)>& on_layer = {}) const;

  // One token at position `pos`; logits [vocab].
  absl::Status Decode(int32_t token, uint32_t pos, AttentionBackend* attention,
                      std::vector<float>* logits) const;

  // The post-RoPE queries and keys a forward pass computes are handed to this observer (trace
  // capture), or nothing when null: (layer, first position, count, q, k, v) with the layouts
  // of AttentionBackend::Prefill.
  using QkvObserver =
      std::function<void(uint32_t, uint32_t, uint32_t, const float*, const float*, const float*)>;
  void set_observer(QkvObserver observer) { observer_ = std::move(observer); }

 private:
  struct Block {
    std::vector<float> attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;
  };
  LlamaModel() = default;
  // Runs n rows of x through every block at positions [pos0, pos0 + n), then the final norm;
  // logits of rows [first_logit, n) go to logits.
  absl::Status Forward(float* x, uint32_t n, uint32_t pos0, AttentionBackend* attention,
                       std::vector<float>* logits, uint32_t first_logit,
                       const std::function<void(uint32_t)>& on_layer) const;
  void Rope(float* x, uint32_t rows, uint32_t heads, uint32_t pos0) const;

  LlamaConfig config_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<float> embedding_;  // [vocab][d_model]
  std::vector<float> output_;     // [vocab][d_model]; empty when tied to the embedding
  std::vector<float> output_norm_;
  std::vector<Block> blocks_;
  std::vector<float> rope_inv_freq_;  // [head_dim / 2]
  QkvObserver observer_;
};

// Causal softmax attention over fp32 rows for a prompt, every head, through OpenBLAS:
// q [n][n_heads][d], k and v [n][n_kv][d] (row strides as given), out [n][n_heads][d].
// Processes query blocks so memory stays O(block * n).
void CausalAttention(const float* q, const float* k, const float* v, uint32_t n, uint32_t n_heads,
                     uint32_t n_kv, uint32_t d, float scale, float* out);

// The greedy next token: the index of the largest of `vocab` logits (the first of equals).
int32_t ArgmaxToken(const float* logits, uint32_t vocab);
inline int32_t ArgmaxToken(const std::vector<float>& logits) {
  return ArgmaxToken(logits.data(), static_cast<uint32_t>(logits.size()));
}

// log softmax(logits)[token] over `vocab` logits, summed in double; `token` < vocab.
double TokenLogProb(const float* logits, uint32_t vocab, int32_t token);

}  // namespace icecache::model
