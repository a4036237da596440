#include "model/attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/half.h"

namespace icecache::model {

void RoundToHalf(const float* in, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i) out[i] = HalfToFloat(FloatToHalf(in[i]));
}

// ---- KvStore

KvStore::KvStore(const LlamaConfig& config, uint32_t max_tokens)
    : config_(config), max_tokens_(max_tokens) {
  const uint64_t n = uint64_t{config.n_layers} * config.n_kv_heads * max_tokens * config.head_dim;
  k_.assign(n, 0.0f);
  v_.assign(n, 0.0f);
  k_half_.assign(n, 0);
}

uint64_t KvStore::Offset(uint32_t layer, uint32_t head) const {
  return (uint64_t{layer} * config_.n_kv_heads + head) * max_tokens_ * config_.head_dim;
}

absl::Status KvStore::Write(uint32_t layer, uint32_t pos, uint32_t n, const float* k,
                            const float* v) {
  if (layer >= config_.n_layers || pos + uint64_t{n} > max_tokens_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV store holds ", max_tokens_, " tokens; position ", pos + n, " needed"));
  }
  const uint32_t d = config_.head_dim;
  for (uint32_t t = 0; t < n; ++t) {
    for (uint32_t h = 0; h < config_.n_kv_heads; ++h) {
      const uint64_t dst = Offset(layer, h) + uint64_t{pos + t} * d;
      const uint64_t src = (uint64_t{t} * config_.n_kv_heads + h) * d;
      for (uint32_t i = 0; i < d; ++i) {
        const uint16_t kh = FloatToHalf(k[src + i]);
        k_half_[dst + i] = kh;
        k_[dst + i] = HalfToFloat(kh);
        v_[dst + i] = HalfToFloat(FloatToHalf(v[src + i]));
      }
    }
  }
  return absl::OkStatus();
}

const float* KvStore::k(uint32_t layer, uint32_t head) const { return &k_[Offset(layer, head)]; }
const float* KvStore::v(uint32_t layer, uint32_t head) const { return &v_[Offset(layer, head)]; }
const uint16_t* KvStore::k_half(uint32_t layer, uint32_t head) const {
  return &k_half_[Offset(layer, head)];
}

void AttendPositions(const KvStore& kv, uint32_t layer, uint32_t kv_head, const float* q,
                     const uint32_t* positions, size_t count, float scale, float* out) {
  const uint32_t d = kv.config().head_dim;
  const float* K = kv.k(layer, kv_head);
  const float* V = kv.v(layer, kv_head);
  std::vector<float> s(count);
  float mx = -std::numeric_limits<float>::infinity();
  for (size_t j = 0; j < count; ++j) {
    const float* kr = K + uint64_t{positions[j]} * d;
    float dot = 0;
    for (uint32_t i = 0; i < d; ++i) dot += q[i] * kr[i];
    s[j] = dot * scale;
    mx = std::max(mx, s[j]);
  }
  float sum = 0;
  for (float& x : s) sum += (x = std::exp(x - mx));
  std::fill(out, out + d, 0.0f);
  for (size_t j = 0; j < count; ++j) {
    const float w = s[j] / sum;
    const float* vr = V + uint64_t{positions[j]} * d;
    for (uint32_t i = 0; i < d; ++i) out[i] += w * vr[i];
  }
}

void AttendPrefix(const KvStore& kv, uint32_t layer, uint32_t kv_head, const float* q, uint32_t pos,
                  float scale, float* out) {
  const uint32_t d = kv.config().head_dim;
  std::vector<float> w(pos + 1);
  // w = softmax(K[0..pos] . q * scale); out = V[0..pos]^T . w (rows contiguous per head).
  cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(pos + 1), static_cast<int>(d), scale,
              kv.k(layer, kv_head), static_cast<int>(d), q, 1, 0.0f, w.data(), 1);
  const float mx = *std::max_element(w.begin(), w.end());
  float sum = 0;
  for (float& x : w) sum += (x = std::exp(x - mx));
  cblas_sgemv(CblasRowMajor, CblasTrans, static_cast<int>(pos + 1), static_cast<int>(d), 1.0f / sum,
              kv.v(layer, kv_head), static_cast<int>(d), w.data(), 1, 0.0f, out, 1);
}

void PromptAttention(const LlamaConfig& c, const float* q, const float* k, const float* v,
                     uint32_t n, float* out) {
  std::vector<float> kr(uint64_t{n} * c.kv_dim()), vr(uint64_t{n} * c.kv_dim());
  RoundToHalf(k, kr.size(), kr.data());
  RoundToHalf(v, vr.size(), vr.data());
  CausalAttention(q, kr.data(), vr.data(), n, c.n_heads, c.n_kv_heads, c.head_dim,
                  1.0f / std::sqrt(static_cast<float>(c.head_dim)), out);
}

namespace {

// The share of query q's exact softmax mass over positions [0, pos] of one (layer, KV head)
// carried by the positions t where in(t) holds (called once per t, in ascending order).
template <class In>
double ExactMassShare(const KvStore& kv, uint32_t layer, uint32_t kv_head, const float* q,
                      uint32_t pos, float scale, In in) {
  const uint32_t d = kv.config().head_dim;
  std::vector<float> s(pos + 1);
  // scores = K[0..pos] . q * scale (rows contiguous per (layer, head)).
  cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(pos + 1), static_cast<int>(d), scale,
              kv.k(layer, kv_head), static_cast<int>(d), q, 1, 0.0f, s.data(), 1);
  const float mx = *std::max_element(s.begin(), s.end());
  double all = 0, part = 0;
  for (uint32_t t = 0; t <= pos; ++t) {
    const double e = std::exp(double{s[t]} - mx);
    all += e;
    if (in(t)) part += e;
  }
  return part / all;
}

// Softmax mass that `attended` (sorted positions) carries among all positions [0, pos] for
// query q on one (layer, KV head).
double Recall(const KvStore& kv, uint32_t layer, uint32_t kv_head, const float* q, uint32_t pos,
              const std::vector<uint32_t>& attended, float scale) {
  size_t j = 0;
  return ExactMassShare(kv, layer, kv_head, q, pos, scale, [&](uint32_t t) {
    while (j < attended.size() && attended[j] < t) ++j;
    return j < attended.size() && attended[j] == t;
  });
}

// The share of query q's exact attention over positions [0, pos] that falls outside the sink
// [0, sink) and the window [window_begin, pos].
double OutsideShareExact(const KvStore& kv, uint32_t layer, uint32_t kv_head, const float* q,
                         uint32_t pos, uint32_t sink, uint32_t window_begin, float scale) {
  return ExactMassShare(kv, layer, kv_head, q, pos, scale,
                        [&](uint32_t t) { return t >= sink && t < window_begin; });
}

// The same share in what a step attended: the positions exactly, the unfetched pages through
// the tail estimate's virtual tokens (all of them outside the sink and window).
double OutsideShareAttended(const KvStore& kv, uint32_t layer, uint32_t kv_head, const float* q,
                            const std::vector<uint32_t>& positions, uint32_t sink,
                            uint32_t window_begin, selection::TailMode mode,
                            const std::vector<selection::PageSummaryView>& tail, float scale) {
  const uint32_t d = kv.config().head_dim;
  const float* K = kv.k(layer, kv_head);
  std::vector<double> s;
  std::vector<bool> outside;
  for (uint32_t t : positions) {
    double dot = 0;
    for (uint32_t i = 0; i < d; ++i) dot += double{q[i]} * K[uint64_t{t} * d + i];
    s.push_back(dot * scale);
    outside.push_back(t >= sink && t < window_begin);
  }
  if (mode != selection::TailMode::kNone) {
    for (const selection::PageSummaryView& p : tail) {
      if (p.count == 0) continue;
      s.push_back(selection::TailLogit(mode, q, d, scale, p));
      outside.push_back(true);
    }
  }
  if (s.empty()) return 0;
  const double mx = *std::max_element(s.begin(), s.end());
  double all = 0, out = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const double e = std::exp(s[i] - mx);
    all += e;
    if (outside[i]) out += e;
  }
  return out / all;
}

void AddRecall(SelectionStats* stats, uint32_t layer, uint32_t layers, uint32_t pos, double r) {
  if (stats->recall_sum.size() < layers) {
    stats->recall_sum.resize(layers, 0.0);
    stats->recall_count.resize(layers, 0);
    stats->recall_pos_sum.resize(layers);
    stats->recall_pos_count.resize(layers);
  }
  stats->recall_sum[layer] += r;
  ++stats->recall_count[layer];
  std::vector<double>& sums = stats->recall_pos_sum[layer];
  std::vector<uint32_t>& counts = stats->recall_pos_count[layer];
  if (sums.size() <= pos) {
    sums.resize(pos + 1, 0.0);
    counts.resize(pos + 1, 0);
  }
  sums[pos] += r;
  ++counts[pos];
}

}  // namespace

double SelectionStats::MeanRecall(uint32_t first_layer) const {
  double sum = 0;
  uint64_t n = 0;
  for (size_t l = first_layer; l < recall_sum.size(); ++l) {
    sum += recall_sum[l];
    n += recall_count[l];
  }
  return n == 0 ? 0.0 : sum / static_cast<double>(n);
}

double SelectionStats::MeanRecallAt(uint32_t first_layer, uint32_t begin, uint32_t end) const {
  double sum = 0;
  uint64_t n = 0;
  for (size_t l = first_layer; l < recall_pos_sum.size(); ++l) {
    const std::vector<double>& sums = recall_pos_sum[l];
    for (size_t p = begin; p < end && p < sums.size(); ++p) {
      sum += sums[p];
      n += recall_pos_count[l][p];
    }
  }
  return n == 0 ? 0.0 : sum / static_cast<double>(n);
}

// ---- InProcessAttention, FullAttention

absl::Status InProcessAttention::LoadPrompt(uint32_t layer, const float* k, const float* v,
                                            uint32_t n) {
  return kv_.Write(layer, 0, n, k, v);
}

absl::Status InProcessAttention::Prefill(uint32_t layer, const float* q, const float* k,
                                         const float* v, uint32_t n, float* out) {
  absl::Status s = kv_.Write(layer, 0, n, k, v);
  if (s.ok()) PromptAttention(kv_.config(), q, k, v, n, out);
  return s;
}

FullAttention::FullAttention(const LlamaConfig& config, uint32_t max_tokens)
    : InProcessAttention(config, max_tokens) {}

absl::Status FullAttention::Decode(uint32_t layer, uint32_t pos, const float* q, const float* k,
                                   const float* v, float* out) {
  absl::Status s = kv_.Write(layer, pos, 1, k, v);
  if (!s.ok()) return s;
  const LlamaConfig& c = kv_.config();
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  for (uint32_t h = 0; h < c.n_heads; ++h) {
    AttendPrefix(kv_, layer, h / c.group(), q + uint64_t{h} * c.head_dim, pos, scale,
                 out + uint64_t{h} * c.head_dim);
  }
  return absl::OkStatus();
}

// ---- SelectiveAttention

void AttendWithTail(const KvStore& kv, uint32_t layer, uint32_t kv_head, const float* q,
                    const std::vector<uint32_t>& positions, selection::TailMode mode,
                    const std::vector<selection::PageSummaryView>& tail, float scale, float* out) {
  const uint32_t d = kv.config().head_dim;
  const float* K = kv.k(layer, kv_head);
  const float* V = kv.v(layer, kv_head);
  selection::SoftmaxPartial part(d);
  for (uint32_t t : positions) {
    const float* kr = K + uint64_t{t} * d;
    double dot = 0;
    for (uint32_t i = 0; i < d; ++i) dot += double{q[i]} * kr[i];
    part.Add(static_cast<float>(dot * scale), V + uint64_t{t} * d);
  }
  selection::AddTail(mode, q, d, scale, tail, &part);
  part.Output(out);
}

void SelectiveAttention::SummarizeTail(uint32_t layer, uint32_t kv_head,
                                       const std::vector<std::vector<uint32_t>>& pages,
                                       const std::vector<uint32_t>& attended) {
  const uint32_t d = kv_.config().head_dim;
  const float* K = kv_.k(layer, kv_head);
  const float* V = kv_.v(layer, kv_head);
  tail_pages_.clear();
  tail_store_.resize(pages.size() * 3 * uint64_t{d});
  // Summaries of whole pages are kept between steps (a page's rows never change while its
  // positions stay the same); a page partly attended is summarised afresh without them.
  std::vector<CachedSummary>& cache =
      tail_cache_[uint64_t{layer} * kv_.config().n_kv_heads + kv_head];
  if (cache.size() < pages.size()) cache.resize(pages.size());
  size_t used = 0;
  for (size_t i = 0; i < pages.size(); ++i) {
    const std::vector<uint32_t>& page = pages[i];
    bool partly = false;
    for (uint32_t t : page) partly |= std::binary_search(attended.begin(), attended.end(), t);
    float* m = &tail_store_[used * 3 * d];
    uint32_t count = 0;
    if (!partly && !page.empty() && cache[i].positions == page) {
      std::copy(cache[i].summary.begin(), cache[i].summary.end(), m);
      count = static_cast<uint32_t>(page.size());
    } else {
      selection::SummaryBuilder b(d);
      for (uint32_t t : page) {
        if (std::binary_search(attended.begin(), attended.end(), t)) continue;
        b.Add(K + uint64_t{t} * d, V + uint64_t{t} * d);
      }
      count = b.count();
      if (count == 0) continue;
      b.Finish(m, m + d, m + 2 * d);
      if (method_.summary_type.has_value()) {  // as icecached stores them
        const bool fp16 = *method_.summary_type == DType::kFP16;
        for (float* x = m; x < m + 3 * d; ++x) {
          *x = Storage16ToFloat(FloatToStorage16Saturated(*x, fp16), fp16);
        }
      }
      if (!partly) {
        cache[i].positions = page;
        cache[i].summary.assign(m, m + 3 * d);
      }
    }
    tail_pages_.push_back({count, m, m + d, m + 2 * d});
    ++used;
  }
}

SelectiveAttention::SelectiveAttention(const LlamaConfig& config, uint32_t max_tokens,
                                       const eval::MethodSpec& method,
                                       const selection::BudgetSplit& split, uint32_t full_kv_layers,
                                       bool measure_recall)
    : InProcessAttention(config, max_tokens),
      method_(method),
      split_(split),
      full_kv_layers_(full_kv_layers),
      measure_recall_(measure_recall),
      observed_share_(uint64_t{config.n_layers} * config.n_kv_heads, -1.0) {
  stats_.pages_asked.assign(uint64_t{config.n_layers} * config.n_kv_heads, 0);
  const index::IndexGeometry geometry{config.head_dim, index::ElemType::kF16, split.page_size};
  for (uint32_t l = 0; l < config.n_layers; ++l) {
    for (uint32_t h = 0; h < config.n_kv_heads; ++h) {
      tail_cache_.emplace_back();
      selectors_.push_back(l < full_kv_layers
                               ? nullptr
                               : std::make_unique<eval::HeadSelector>(method_, split, geometry));
    }
  }
}

absl::Status SelectiveAttention::Decode(uint32_t layer, uint32_t pos, const float* q,
                                        const float* k, const float* v, float* out) {
  absl::Status s = kv_.Write(layer, pos, 1, k, v);
  if (!s.ok()) return s;
  const LlamaConfig& c = kv_.config();
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  const uint32_t g = c.group(), d = c.head_dim;
  // Pages per KV head (MethodSpec::head_budget): the fixed split, or the layer's total shared
  // by each head's share of mass outside its sink and window.
  const uint32_t per_head = split_.selected_pages();
  std::vector<uint32_t> pages_for(c.n_kv_heads, per_head);
  const eval::HeadBudget hb = method_.head_budget;
  const bool across_layers =
      hb == eval::HeadBudget::kObservedLayers || hb == eval::HeadBudget::kObservedAll;
  const bool adaptive = layer >= full_kv_layers_ && hb != eval::HeadBudget::kFixed &&
                        (c.n_kv_heads > 1 || across_layers);
  const bool observe = adaptive && hb != eval::HeadBudget::kOracle;
  if (adaptive && across_layers) {
    // Once per step (at its first selective layer): every selective layer's pages from the
    // shares observed in the previous step.
    const uint64_t first = uint64_t{full_kv_layers_} * c.n_kv_heads;
    if (layer == full_kv_layers_ || step_pages_.empty()) {
      const uint32_t layers = c.n_layers - full_kv_layers_;
      step_pages_.assign(uint64_t{c.n_layers} * c.n_kv_heads, per_head);
      const bool seen_all = std::all_of(observed_share_.begin() + first, observed_share_.end(),
                                        [](double x) { return x >= 0; });
      if (seen_all) {
        const uint32_t lo = std::max<uint32_t>(1, per_head / 4), hi = 2 * per_head;
        if (hb == eval::HeadBudget::kObservedAll) {
          absl::StatusOr<std::vector<uint32_t>> split = selection::SplitPagesAcrossHeads(
              layers * c.n_kv_heads * per_head,
              std::vector<double>(observed_share_.begin() + first, observed_share_.end()), lo, hi);
          if (!split.ok()) return split.status();
          std::copy(split->begin(), split->end(), step_pages_.begin() + first);
        } else {
          std::vector<double> w(layers, 0.0);
          for (uint32_t l = 0; l < layers; ++l) {
            for (uint32_t h = 0; h < c.n_kv_heads; ++h)
              w[l] += observed_share_[first + l * c.n_kv_heads + h];
          }
          absl::StatusOr<std::vector<uint32_t>> split =
              selection::SplitPagesAcrossHeads(layers * per_head, w, lo, hi);
          if (!split.ok()) return split.status();
          for (uint32_t l = 0; l < layers; ++l) {
            std::fill_n(step_pages_.begin() + first + l * c.n_kv_heads, c.n_kv_heads, (*split)[l]);
          }
        }
      }
    }
    std::copy_n(step_pages_.begin() + uint64_t{layer} * c.n_kv_heads, c.n_kv_heads,
                pages_for.begin());
  } else if (adaptive) {
    std::vector<double> w(c.n_kv_heads, 1.0);
    const double* seen = observed_share_.data() + uint64_t{layer} * c.n_kv_heads;
    for (uint32_t h = 0; h < c.n_kv_heads; ++h) {
      if (method_.head_budget == eval::HeadBudget::kOracle) {
        // The window as it stands before this step's hand-over (Select moves it after).
        const eval::HeadSelector& hs = *selectors_[uint64_t{layer} * c.n_kv_heads + h];
        double share = 0;
        for (uint32_t j = 0; j < g; ++j) {
          share += OutsideShareExact(kv_, layer, h, q + (uint64_t{h} * g + j) * d, pos,
                                     split_.sink_tokens, hs.indexed_end(), scale);
        }
        w[h] = share / g;
      } else if (seen[h] >= 0) {
        w[h] = seen[h];
      } else {
        w.assign(c.n_kv_heads, 1.0);  // a head not yet seen: the fixed split this step
        break;
      }
    }
    absl::StatusOr<std::vector<uint32_t>> split = selection::SplitPagesAcrossHeads(
        c.n_kv_heads * per_head, w, std::max<uint32_t>(1, per_head / 4), 2 * per_head);
    if (!split.ok()) return split.status();
    pages_for = std::move(*split);
  }
  for (uint32_t h = 0; h < c.n_kv_heads; ++h) {
    const float* group_q = q + uint64_t{h} * g * d;
    std::vector<uint32_t> positions;
    if (layer < full_kv_layers_) {
      positions.resize(pos + 1);
      std::iota(positions.begin(), positions.end(), 0u);
    } else {
      index::RowView keys;
      keys.data = kv_.k_half(layer, h);
      keys.type = index::ElemType::kF16;
      keys.dim = d;
      keys.rows = pos + 1;
      absl::StatusOr<std::vector<uint32_t>> sel =
          selectors_[uint64_t{layer} * c.n_kv_heads + h]->Select(keys, pos, group_q, g,
                                                                 pages_for[h]);
      if (!sel.ok()) return sel.status();
      positions = std::move(*sel);
      stats_.pages_asked[uint64_t{layer} * c.n_kv_heads + h] += pages_for[h];
    }
    const bool tail = layer >= full_kv_layers_ && method_.tail != selection::TailMode::kNone &&
                      positions.size() < pos + 1;
    if (tail) {
      SummarizeTail(layer, h, selectors_[uint64_t{layer} * c.n_kv_heads + h]->page_positions(),
                    positions);
    }
    for (uint32_t j = 0; j < g; ++j) {
      const float* qh = group_q + uint64_t{j} * d;
      if (tail) {
        AttendWithTail(kv_, layer, h, qh, positions, method_.tail, tail_pages_, scale,
                       out + (uint64_t{h} * g + j) * d);
      } else if (positions.size() == pos + 1) {  // everything: the same arithmetic as Full
        AttendPrefix(kv_, layer, h, qh, pos, scale, out + (uint64_t{h} * g + j) * d);
      } else {
        AttendPositions(kv_, layer, h, qh, positions.data(), positions.size(), scale,
                        out + (uint64_t{h} * g + j) * d);
      }
      if (measure_recall_) {
        AddRecall(&stats_, layer, c.n_layers, pos,
                  Recall(kv_, layer, h, qh, pos, positions, scale));
      }
    }
    if (observe) {
      const eval::HeadSelector& hs = *selectors_[uint64_t{layer} * c.n_kv_heads + h];
      double share = 0;
      for (uint32_t j = 0; j < g; ++j) {
        share += OutsideShareAttended(
            kv_, layer, h, group_q + uint64_t{j} * d, positions, split_.sink_tokens,
            hs.indexed_end(), method_.tail,
            tail ? tail_pages_ : std::vector<selection::PageSummaryView>{}, scale);
      }
      observed_share_[uint64_t{layer} * c.n_kv_heads + h] = share / g;
    }
  }
  return absl::OkStatus();
}

// ---- PrefillTee

absl::Status PrefillTee::Prefill(uint32_t layer, const float* q, const float* k, const float* v,
                                 uint32_t n, float* out) {
  absl::Status s = primary_->Prefill(layer, q, k, v, n, out);
  for (AttentionBackend* b : others_) {
    if (s.ok()) s = b->LoadPrompt(layer, k, v, n);
  }
  return s;
}

absl::Status PrefillTee::LoadPrompt(uint32_t layer, const float* k, const float* v, uint32_t n) {
  absl::Status s = primary_->LoadPrompt(layer, k, v, n);
  for (AttentionBackend* b : others_) {
    if (s.ok()) s = b->LoadPrompt(layer, k, v, n);
  }
  return s;
}

// ---- ServiceAttention

SequenceOptions SequenceOptionsFor(const LlamaConfig& config, uint64_t max_tokens,
                                   const selection::BudgetSplit& split, uint32_t full_kv_layers) {
  SequenceOptions o;
  o.num_layers = config.n_layers;
  o.num_q_heads = config.n_heads;
  o.num_kv_heads = config.n_kv_heads;
  o.head_dim = config.head_dim;
  o.dtype = DType::kFP16;
  o.max_tokens = max_tokens;
  o.page_size = split.page_size;
  o.budget_tokens = split.budget_tokens;
  o.sink_tokens = split.sink_tokens;
  o.window_tokens = split.window_tokens;
  o.full_kv_layers = full_kv_layers;
  o.label = config.name;
  return o;
}

ServiceAttention::ServiceAttention(const LlamaConfig& config, Sequence* sequence,
                                   bool measure_recall, uint32_t max_tokens)
    : config_(config), sequence_(sequence), measure_recall_(measure_recall) {
  if (measure_recall_) {
    mirror_ = std::make_unique<KvStore>(config, max_tokens);
    where_.resize(uint64_t{config.n_layers} * config.n_kv_heads);
    where_count_.assign(where_.size(), 0);
  }
}

absl::Status ServiceAttention::LoadPrompt(uint32_t layer, const float* k, const float* v,
                                          uint32_t n) {
  const uint64_t elems = uint64_t{n} * config_.kv_dim();
  prompt_k_.resize(elems);
  prompt_v_.resize(elems);
  for (uint64_t i = 0; i < elems; ++i) {
    prompt_k_[i] = FloatToHalf(k[i]);
    prompt_v_[i] = FloatToHalf(v[i]);
  }
  if (mirror_ != nullptr) {
    absl::Status s = mirror_->Write(layer, 0, n, k, v);
    if (!s.ok()) return s;
  }
  return sequence_->Prefill(layer, prompt_k_.data(), prompt_v_.data(), n);
}

absl::Status ServiceAttention::Prefill(uint32_t layer, const float* q, const float* k,
                                       const float* v, uint32_t n, float* out) {
  // The prompt attends in full, here; its K/V go to the daemon (the layer's sink and window
  // stay in the client).
  PromptAttention(config_, q, k, v, n, out);
  return LoadPrompt(layer, k, v, n);
}

absl::Status ServiceAttention::Decode(uint32_t layer, uint32_t pos, const float* q, const float* k,
                                      const float* v, float* out) {
  const uint32_t qn = config_.q_dim(), kvn = config_.kv_dim(), d = config_.head_dim;
  q16_.resize(qn);
  k16_.resize(kvn);
  v16_.resize(kvn);
  out16_.resize(qn);
  for (uint32_t i = 0; i < qn; ++i) q16_[i] = FloatToHalf(q[i]);
  for (uint32_t i = 0; i < kvn; ++i) {
    k16_[i] = FloatToHalf(k[i]);
    v16_[i] = FloatToHalf(v[i]);
  }
  absl::Status s = sequence_->Decode(layer, q16_.data(), k16_.data(), v16_.data(), out16_.data());
  if (!s.ok()) return s;
  if (!sequence_->last_decode().full_kv) breakdowns_.push_back(sequence_->last_decode());
  for (uint32_t i = 0; i < qn; ++i) out[i] = HalfToFloat(out16_[i]);
  if (mirror_ == nullptr) return absl::OkStatus();
  s = mirror_->Write(layer, pos, 1, k, v);
  if (!s.ok()) return s;
  // What the service attended, identified by the K rows' bytes.
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (uint32_t h = 0; h < config_.n_kv_heads; ++h) {
    absl::StatusOr<Sequence::AttendedRows> rows = sequence_->LastAttended(layer, h);
    if (!rows.ok()) return rows.status();
    const uint64_t slot = uint64_t{layer} * config_.n_kv_heads + h;
    absl::flat_hash_map<std::string, uint32_t>& where = where_[slot];
    const uint16_t* kh = mirror_->k_half(layer, h);
    for (uint32_t t = where_count_[slot]; t <= pos; ++t) {
      where.emplace(std::string(reinterpret_cast<const char*>(kh + uint64_t{t} * d), d * 2), t);
    }
    where_count_[slot] = pos + 1;
    std::vector<uint32_t> attended;
    for (uint32_t r = 0; r < rows->count; ++r) {
      auto it =
          where.find(std::string(reinterpret_cast<const char*>(&rows->k[uint64_t{r} * d]), d * 2));
      if (it != where.end()) attended.push_back(it->second);
    }
    std::sort(attended.begin(), attended.end());
    attended.erase(std::unique(attended.begin(), attended.end()), attended.end());
    for (uint32_t j = 0; j < config_.group(); ++j) {
      const float* qh = q + (uint64_t{h} * config_.group() + j) * d;
      std::vector<float> qr(d);
      RoundToHalf(qh, d, qr.data());
      AddRecall(&stats_, layer, config_.n_layers, pos,
                Recall(*mirror_, layer, h, qr.data(), pos, attended, scale));
    }
  }
  return absl::OkStatus();
}

}  // namespace icecache::model
