#include "model/llama.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/io/quant.h"

namespace icecache::model {
namespace {

// out[rows][out_dim] = x[rows][in_dim] . W^T, W [out_dim][in_dim] row-major (GGUF's layout:
// ne[0] = in_dim is the fastest-varying dimension).
void MatMulT(const float* x, uint32_t rows, uint32_t in_dim, const float* w, uint32_t out_dim,
             float* out, float beta = 0.0f) {
  if (rows == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(out_dim), static_cast<int>(in_dim),
                1.0f, w, static_cast<int>(in_dim), x, 1, beta, out, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
              static_cast<int>(out_dim), static_cast<int>(in_dim), 1.0f, x,
              static_cast<int>(in_dim), w, static_cast<int>(in_dim), beta, out,
              static_cast<int>(out_dim));
}

void RmsNorm(const float* x, const float* weight, uint32_t rows, uint32_t d, float eps,
             float* out) {
  for (uint32_t r = 0; r < rows; ++r) {
    const float* xr = x + uint64_t{r} * d;
    double ss = 0;
    for (uint32_t i = 0; i < d; ++i) ss += double{xr[i]} * xr[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / d) + eps);
    float* o = out + uint64_t{r} * d;
    for (uint32_t i = 0; i < d; ++i) o[i] = xr[i] * inv * weight[i];
  }
}

// Dequantizes a whole tensor after checking its shape: dims must equal `want` (ne[0] first).
absl::Status LoadTensor(const GgufFile& f, const std::string& name,
                        const std::vector<uint64_t>& want, std::vector<float>* out) {
  const GgufTensor* t = f.FindTensor(name);
  if (t == nullptr) return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " missing"));
  if (t->dims != want) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " has dims [",
                                                   absl::StrJoin(t->dims, ", "), "], expected [",
                                                   absl::StrJoin(want, ", "), "]"));
  }
  out->resize(t->elements());
  absl::Status s = Dequantize(t->type, t->data, t->elements(), out->data());
  if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": ", s.message()));
  return absl::OkStatus();
}

absl::StatusOr<uint32_t> MetaU32(const GgufFile& f, const std::string& key) {
  absl::StatusOr<uint64_t> v = f.GetUint(key);
  if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat(key, ": ", v.status().message()));
  if (*v == 0 || *v > (1u << 24)) {
    return absl::InvalidArgumentError(absl::StrCat(key, " = ", *v, " is out of range"));
  }
  return static_cast<uint32_t>(*v);
}

}  // namespace

void CausalAttention(const float* q, const float* k, const float* v, uint32_t n, uint32_t n_heads,
                     uint32_t n_kv, uint32_t d, float scale, float* out) {
  constexpr uint32_t kBlock = 128;
  const uint32_t group = n_heads / n_kv;
  const int q_stride = static_cast<int>(n_heads * d), kv_stride = static_cast<int>(n_kv * d);
  std::vector<float> scores(uint64_t{kBlock} * n);
  for (uint32_t h = 0; h < n_heads; ++h) {
    const uint32_t kvh = h / group;
    for (uint32_t b0 = 0; b0 < n; b0 += kBlock) {
      const uint32_t rows = std::min(kBlock, n - b0);
      const uint32_t cols = b0 + rows;  // keys [0, b0 + rows) can be visible to this block
      // scores[rows][cols] = Q_block . K^T * scale
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
                  static_cast<int>(cols), static_cast<int>(d), scale,
                  q + uint64_t{b0} * q_stride + uint64_t{h} * d, q_stride, k + uint64_t{kvh} * d,
                  kv_stride, 0.0f, scores.data(), static_cast<int>(cols));
      for (uint32_t r = 0; r < rows; ++r) {
        float* s = scores.data() + uint64_t{r} * cols;
        const uint32_t visible = b0 + r + 1;
        float mx = -std::numeric_limits<float>::infinity();
        for (uint32_t c = 0; c < visible; ++c) mx = std::max(mx, s[c]);
        float sum = 0;
        for (uint32_t c = 0; c < visible; ++c) sum += (s[c] = std::exp(s[c] - mx));
        const float inv = 1.0f / sum;
        for (uint32_t c = 0; c < visible; ++c) s[c] *= inv;
        for (uint32_t c = visible; c < cols; ++c) s[c] = 0.0f;
      }
      // out_block = P . V
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows),
                  static_cast<int>(d), static_cast<int>(cols), 1.0f, scores.data(),
                  static_cast<int>(cols), v + uint64_t{kvh} * d, kv_stride, 0.0f,
                  out + uint64_t{b0} * q_stride + uint64_t{h} * d, q_stride);
    }
  }
}

LlamaModel::~LlamaModel() = default;

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::LoadFile(const std::string& path) {
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(path);
  if (!f.ok()) return f.status();
  return Load(**f);
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const GgufFile& f) {
  absl::StatusOr<std::string> arch = f.GetString("general.architecture");
  if (!arch.ok()) return absl::InvalidArgumentError("not a model file: no general.architecture");
  if (*arch != "llama") {
    return absl::InvalidArgumentError(absl::StrCat("architecture ", *arch, " is not llama"));
  }
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  LlamaConfig& c = m->config_;
  for (auto [key, field] : {std::pair<const char*, uint32_t*>{"llama.block_count", &c.n_layers},
                            {"llama.embedding_length", &c.d_model},
                            {"llama.attention.head_count", &c.n_heads},
                            {"llama.feed_forward_length", &c.ffn},
                            {"llama.context_length", &c.context}}) {
    absl::StatusOr<uint32_t> v = MetaU32(f, key);
    if (!v.ok()) return v.status();
    *field = *v;
  }
  c.n_kv_heads = c.n_heads;
  if (f.Has("llama.attention.head_count_kv")) {
    absl::StatusOr<uint32_t> v = MetaU32(f, "llama.attention.head_count_kv");
    if (!v.ok()) return v.status();
    c.n_kv_heads = *v;
  }
  if (c.d_model % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0) {
    return absl::InvalidArgumentError("head counts do not divide the model width");
  }
  c.head_dim = c.d_model / c.n_heads;
  if (f.Has("llama.rope.dimension_count")) {
    absl::StatusOr<uint32_t> rd = MetaU32(f, "llama.rope.dimension_count");
    if (!rd.ok()) return rd.status();
    if (*rd != c.head_dim) {
      return absl::InvalidArgumentError("partial rotary embeddings are not supported");
    }
  }
  if (c.head_dim % 2 != 0) return absl::InvalidArgumentError("head_dim must be even");
  if (f.Has("llama.rope.freq_base")) {
    absl::StatusOr<double> b = f.GetFloat("llama.rope.freq_base");
    if (!b.ok()) return b.status();
    c.rope_base = static_cast<float>(*b);
  }
  if (f.Has("llama.attention.layer_norm_rms_epsilon")) {
    absl::StatusOr<double> e = f.GetFloat("llama.attention.layer_norm_rms_epsilon");
    if (!e.ok()) return e.status();
    c.norm_eps = static_cast<float>(*e);
  }
  if (f.Has("general.name")) c.name = f.GetString("general.name").value_or("");

  absl::StatusOr<TokenizerSpec> spec = TokenizerSpecFromGguf(f);
  if (!spec.ok()) return spec.status();
  absl::StatusOr<Tokenizer> tok = Tokenizer::Create(std::move(*spec));
  if (!tok.ok()) return tok.status();
  m->tokenizer_ = std::make_unique<Tokenizer>(std::move(*tok));
  c.vocab = static_cast<uint32_t>(m->tokenizer_->vocab_size());

  const uint64_t d = c.d_model, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.ffn;
  absl::Status s = LoadTensor(f, "token_embd.weight", {d, c.vocab}, &m->embedding_);
  if (s.ok()) s = LoadTensor(f, "output_norm.weight", {d}, &m->output_norm_);
  if (s.ok() && f.FindTensor("output.weight") != nullptr) {
    s = LoadTensor(f, "output.weight", {d, c.vocab}, &m->output_);
  }
  m->blocks_.resize(c.n_layers);
  for (uint32_t l = 0; l < c.n_layers && s.ok(); ++l) {
    Block& b = m->blocks_[l];
    const std::string p = absl::StrCat("blk.", l, ".");
    for (auto [name, want, dst] :
         {std::tuple<const char*, std::vector<uint64_t>, std::vector<float>*>{
              "attn_norm.weight", {d}, &b.attn_norm},
          {"attn_q.weight", {d, qd}, &b.wq},
          {"attn_k.weight", {d, kvd}, &b.wk},
          {"attn_v.weight", {d, kvd}, &b.wv},
          {"attn_output.weight", {qd, d}, &b.wo},
          {"ffn_norm.weight", {d}, &b.ffn_norm},
          {"ffn_gate.weight", {d, ff}, &b.w_gate},
          {"ffn_up.weight", {d, ff}, &b.w_up},
          {"ffn_down.weight", {ff, d}, &b.w_down}}) {
      s = LoadTensor(f, p + name, want, dst);
      if (!s.ok()) break;
    }
  }
  if (!s.ok()) return s;
  m->rope_inv_freq_.resize(c.head_dim / 2);
  for (uint32_t i = 0; i < c.head_dim / 2; ++i) {
    m->rope_inv_freq_[i] = static_cast<float>(std::pow(double{c.rope_base}, -2.0 * i / c.head_dim));
  }
  return m;
}

void LlamaModel::Rope(float* x, uint32_t rows, uint32_t heads, uint32_t pos0) const {
  const uint32_t d = config_.head_dim;
  for (uint32_t r = 0; r < rows; ++r) {
    const double pos = pos0 + r;
    for (uint32_t i = 0; i < d / 2; ++i) {
      const double angle = pos * rope_inv_freq_[i];
      const float cs = static_cast<float>(std::cos(angle)),
                  sn = static_cast<float>(std::sin(angle));
      for (uint32_t h = 0; h < heads; ++h) {
        float* p = x + (uint64_t{r} * heads + h) * d + 2 * i;
        const float a = p[0], b = p[1];
        p[0] = a * cs - b * sn;
        p[1] = a * sn + b * cs;
      }
    }
  }
}

absl::Status LlamaModel::Forward(float* x, uint32_t n, uint32_t pos0, AttentionBackend* attention,
                                 std::vector<float>* logits, uint32_t first_logit,
                                 const std::function<void(uint32_t)>& on_layer) const {
  const LlamaConfig& c = config_;
  const uint32_t d = c.d_model, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.ffn;
  std::vector<float> h(uint64_t{n} * d), q(uint64_t{n} * qd), k(uint64_t{n} * kvd),
      v(uint64_t{n} * kvd), att(uint64_t{n} * qd), gate(uint64_t{n} * ff), up(uint64_t{n} * ff);
  for (uint32_t l = 0; l < c.n_layers; ++l) {
    const Block& b = blocks_[l];
    RmsNorm(x, b.attn_norm.data(), n, d, c.norm_eps, h.data());
    MatMulT(h.data(), n, d, b.wq.data(), qd, q.data());
    MatMulT(h.data(), n, d, b.wk.data(), kvd, k.data());
    MatMulT(h.data(), n, d, b.wv.data(), kvd, v.data());
    Rope(q.data(), n, c.n_heads, pos0);
    Rope(k.data(), n, c.n_kv_heads, pos0);
    if (observer_) observer_(l, pos0, n, q.data(), k.data(), v.data());
    absl::Status s = n == 1 && pos0 > 0
                         ? attention->Decode(l, pos0, q.data(), k.data(), v.data(), att.data())
                         : attention->Prefill(l, q.data(), k.data(), v.data(), n, att.data());
    if (!s.ok()) return s;
    MatMulT(att.data(), n, qd, b.wo.data(), d, x, /*beta=*/1.0f);  // x += attn . Wo^T
    RmsNorm(x, b.ffn_norm.data(), n, d, c.norm_eps, h.data());
    MatMulT(h.data(), n, d, b.w_gate.data(), ff, gate.data());
    MatMulT(h.data(), n, d, b.w_up.data(), ff, up.data());
    for (uint64_t i = 0; i < uint64_t{n} * ff; ++i) {
      const float g = gate[i];
      gate[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
    MatMulT(gate.data(), n, ff, b.w_down.data(), d, x, /*beta=*/1.0f);
    if (on_layer) on_layer(l);
  }
  if (logits != nullptr) {
    const uint32_t rows = n - first_logit;
    RmsNorm(x + uint64_t{first_logit} * d, output_norm_.data(), rows, d, c.norm_eps, h.data());
    logits->resize(uint64_t{rows} * c.vocab);
    const float* w = output_.empty() ? embedding_.data() : output_.data();
    MatMulT(h.data(), rows, d, w, c.vocab, logits->data());
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::Prefill(const std::vector<int32_t>& tokens, AttentionBackend* attention,
                                 std::vector<float>* logits, bool all_logits,
                                 const std::function<void(uint32_t)>& on_layer) const {
  const uint32_t n = static_cast<uint32_t>(tokens.size());
  if (n == 0) return absl::InvalidArgumentError("empty prompt");
  const uint32_t d = config_.d_model;
  std::vector<float> x(uint64_t{n} * d);
  for (uint32_t t = 0; t < n; ++t) {
    if (tokens[t] < 0 || static_cast<uint32_t>(tokens[t]) >= config_.vocab) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", tokens[t], " out of range"));
    }
    std::copy_n(embedding_.data() + uint64_t{static_cast<uint32_t>(tokens[t])} * d, d,
                x.data() + uint64_t{t} * d);
  }
  return Forward(x.data(), n, 0, attention, logits, all_logits ? 0 : n - 1, on_layer);
}

absl::Status LlamaModel::Decode(int32_t token, uint32_t pos, AttentionBackend* attention,
                                std::vector<float>* logits) const {
  if (token < 0 || static_cast<uint32_t>(token) >= config_.vocab) {
    return absl::InvalidArgumentError(absl::StrCat("token id ", token, " out of range"));
  }
  if (pos == 0) return absl::InvalidArgumentError("decode needs a prefilled prompt (pos > 0)");
  const uint32_t d = config_.d_model;
  std::vector<float> x(embedding_.data() + uint64_t{static_cast<uint32_t>(token)} * d,
                       embedding_.data() + uint64_t{static_cast<uint32_t>(token) + 1} * d);
  return Forward(x.data(), 1, pos, attention, logits, 0, {});
}

int32_t ArgmaxToken(const float* logits, uint32_t vocab) {
  return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
}

double TokenLogProb(const float* logits, uint32_t vocab, int32_t token) {
  const float mx = *std::max_element(logits, logits + vocab);
  double z = 0;
  for (uint32_t i = 0; i < vocab; ++i) z += std::exp(double{logits[i]} - mx);
  return logits[token] - mx - std::log(z);
}

}  // namespace icecache::model
